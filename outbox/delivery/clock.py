"""The daemon's clock: now, as the database reckons it.

Retry times, the unknown-customer grace and attempt timestamps meet times the database wrote
(`created_at`, the leases' `now()`), so they must come from the same clock. A host without NTP
can be minutes off: 5 minutes behind, every backoff vanished (a retry was due before it was
written); 5 minutes ahead, a 2 s retry waited 5 minutes. So the daemon measures how far its own
clock is from the database's, at start-up and at every monitor round, and reads the time as its
own clock plus that offset (docs/design.md, "Decisions", one clock).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from outbox.text import utcnow


class DatabaseClock:
    def __init__(self, local: Callable[[], datetime] = utcnow) -> None:
        self._local = local
        self.offset = timedelta(0)  # the database's clock minus this host's

    def __call__(self) -> datetime:
        return self._local() + self.offset

    async def measure(self, database_now: Callable[[], Awaitable[datetime]]) -> timedelta:
        """Ask the database for its time and take the offset against the middle of the round
        trip (off by at most half of it)."""
        before = self._local()
        theirs = await database_now()
        after = self._local()
        self.offset = theirs - (before + (after - before) / 2)
        return self.offset
