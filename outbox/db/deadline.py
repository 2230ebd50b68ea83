"""A bound on each statement of the operator commands, so that none of them hangs.

Behind a pooler whose session pool is full, a statement waits in the pooler's queue, and behind
a lock it waits in the server: either way `outbox status` used to sit there with nothing said.
Each statement now has `OUTBOX_DATABASE_TIMEOUT_SECONDS` (60 s for the operator commands when
unset); past it the statement is cancelled the way Ctrl-C cancels it (psycopg sends PostgreSQL,
or the pooler, a cancel request) and the command ends with one line.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import sqlalchemy as sa

ENV = "OUTBOX_DATABASE_TIMEOUT_SECONDS"
COMMAND_DEFAULT_SECONDS = 60.0


def command_seconds(environ: dict[str, str] | None = None) -> float:
    """The bound for an operator command's statements; ValueError for a value that is not a
    number of seconds above 0."""
    text = (os.environ if environ is None else environ).get(ENV, "").strip()
    if not text:
        return COMMAND_DEFAULT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{text!r} is not above 0")
    return seconds


class StatementDeadline:
    """Interrupts the main thread (as Ctrl-C does) when one statement of `engine` runs longer
    than `seconds`; `expired` then says it was the deadline, not a person."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._timer: threading.Timer | None = None

    def attach(self, engine: sa.Engine) -> None:
        from sqlalchemy import event

        event.listen(engine, "before_cursor_execute", self._start)
        event.listen(engine, "after_cursor_execute", self.stop)
        event.listen(engine, "handle_error", self.stop)

    def _start(self, *_: Any) -> None:
        self.stop()
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def stop(self, *_: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self.expired = True
        os.kill(os.getpid(), signal.SIGINT)
