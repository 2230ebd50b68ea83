"""Stand-ins the unit tests share."""

from __future__ import annotations


class FakeNotifier:
    """systemd's notify socket, recorded: the STATUS= lines and the WATCHDOG=1 pings."""

    def __init__(self) -> None:
        self.statuses: list[str] = []
        self.watchdogs = 0

    def status(self, status: str) -> bool:
        self.statuses.append(status)
        return True

    def watchdog(self) -> bool:
        self.watchdogs += 1
        return True
