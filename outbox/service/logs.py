"""structlog set-up: JSON lines when not on a terminal (journald keeps them as they are),
readable coloured text on a terminal. Any secret handed to `configure` is masked in every value
of every event, as a last line of defence behind code that never logs it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class MaskSecrets:
    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = [s for s in secrets if s and len(s) >= 4]

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if not self._secrets:
            return event
        for key, value in event.items():
            if isinstance(value, str):
                for secret in self._secrets:
                    if secret in value:
                        value = value.replace(secret, "***")
                event[key] = value
        return event


def configure(
    fmt: str = "auto", level: str = "info", secrets: Iterable[str] = (), stream: Any = None
) -> None:
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            MaskSecrets(secrets),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def set_level(level: str) -> None:
    """Change the lowest level logged, keeping everything else (SIGHUP reload)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]))
