"""The sd_notify protocol, spoken directly: one datagram per message to $NOTIFY_SOCKET.

systemd documents it as "a simple text protocol over an AF_UNIX datagram socket": newline-
separated KEY=VALUE assignments (READY=1, STATUS=..., WATCHDOG=1, STOPPING=1, RELOADING=1,
MONOTONIC_USEC=...). A name starting with '@' is an abstract socket. Without NOTIFY_SOCKET (not
under systemd) every call does nothing, so the daemon runs the same anywhere.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from outbox.text import one_line


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        path = environ.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if path.startswith("@"):
            self._address = "\0" + path[1:]
        elif path.startswith("/"):
            self._address = path
        self.watchdog_seconds = _watchdog_seconds(environ)
        self._socket: socket.socket | None = None

    def send(self, **fields: str | int) -> bool:
        """Send one message; True if it went out. Never raises: systemd may be gone."""
        if self._address is None:
            return False
        message = "\n".join(f"{key.upper()}={one_line(value)}" for key, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                # Never block the event loop on a socket nobody reads: drop the message.
                self._socket.setblocking(False)
            self._socket.sendto(message.encode(), self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(ready=1, status=status)

    def status(self, status: str) -> bool:
        return self.send(status=status)

    def watchdog(self) -> bool:
        return self.send(watchdog=1)

    def reloading(self) -> bool:
        # systemd 253+ wants MONOTONIC_USEC with RELOADING=1 (Type=notify-reload); older ones
        # ignore it.
        return self.send(
            reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        )

    def stopping(self, status: str) -> bool:
        return self.send(stopping=1, status=status)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_seconds(environ: Mapping[str, str]) -> float | None:
    """WATCHDOG_USEC as seconds, when it is meant for this process (WATCHDOG_PID)."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000
