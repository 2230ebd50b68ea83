"""What the daemon knows about itself: read by the STATUS= line, the watchdog and /healthz."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

from outbox.text import format_age


@dataclass(slots=True)
class Health:
    """The daemon's own state. `problems()` empty means healthy: the watchdog pings only then,
    and /healthz answers 200 only then."""

    database_ok: bool = False
    listening: bool = False
    last_delivery_at: datetime | None = None
    last_error: str | None = None
    delivered: int = 0
    skipped: int = 0  # settled without delivery by rule (a customer no partner referred)
    failed: int = 0
    retried: int = 0
    stall_seconds: float = 60.0
    # The claimer promises to turn again by this monotonic time; past it, the loop is wedged.
    next_tick_due: float = field(default_factory=lambda: time.monotonic() + 3600)
    backlog: int | None = None
    oldest_pending_seconds: float | None = None
    failed_rows: int | None = None
    paused: bool = False  # Partnero refused the API key: nothing is sent
    waiting_for_partnero: str | None = None  # GET /v1/test has not answered 2xx yet: why
    # Services that crashed and have not been restarted yet: name -> the error.
    services_down: dict[str, str] = field(default_factory=dict)
    # Monotonic time since which the writer has held results it has not written (None: none).
    unwritten_since: float | None = None
    # Why the writer's last write failed (None: it worked): a database that does not answer it
    # (a pooler's queue, a lock) is a problem at once, not only after the stall limit.
    write_error: str | None = None

    def tick(self, waiting: float = 0.0) -> None:
        """The claimer turned; it may now wait up to `waiting` seconds before turning again."""
        self.next_tick_due = time.monotonic() + waiting + self.stall_seconds

    def problems(self) -> list[str]:
        """Why the daemon is not healthy (empty when it is)."""
        now = time.monotonic()
        found = []
        if now > self.next_tick_due:
            found.append("delivery loop wedged")
        if not self.listening:
            found.append("not listening for new rows")
        if not self.database_ok:
            found.append("database not answering")
        for name, error in sorted(self.services_down.items()):
            found.append(f"{name} crashed: {error}")
        if self.write_error is not None:
            found.append(f"results cannot be written: {self.write_error}")
        if self.unwritten_since is not None and now - self.unwritten_since > self.stall_seconds:
            found.append(
                f"results unwritten for {format_age(now - self.unwritten_since)} "
                "(the writer cannot record deliveries)"
            )
        return found

    def status_line(self) -> str:
        """The systemd STATUS= line."""
        if self.backlog is None:
            parts = ["starting"]
        else:
            oldest = format_age(self.oldest_pending_seconds)
            parts = [
                f"backlog {self.backlog}" + (f" (oldest {oldest})" if oldest else ""),
                f"failed {self.failed_rows}",
                f"delivered {self.delivered}, skipped {self.skipped} since start",
            ]
        if self.paused:
            parts.insert(0, "PAUSED (Partnero refused the API key)")
        elif self.waiting_for_partnero:
            parts.insert(0, f"WAITING FOR PARTNERO ({self.waiting_for_partnero[:120]})")
        if self.services_down:
            parts.insert(0, "CRASHED: " + ", ".join(sorted(self.services_down)))
        if self.last_error:
            parts.append(f"last error: {self.last_error[:120]}")
        return "; ".join(parts)
