"""Text helpers shared by the daemon, the policy and the operator commands. Pure functions."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["cut", "first_line", "format_age", "format_duration", "one_line", "plural", "utcnow"]


def utcnow() -> datetime:
    """The time now, in UTC: the one clock the daemon's parts are given by default."""
    return datetime.now(UTC)


def one_line(text: object) -> str:
    """Every run of whitespace (newlines included) as one space, ends trimmed."""
    return " ".join(str(text).split())


def cut(text: str, width: int) -> str:
    """`text` in at most `width` characters, an ellipsis marking a cut."""
    return text if len(text) <= width else text[: width - 1] + "…"


def first_line(exc: BaseException | None) -> str:
    """The first line of an error's message (psycopg's carry DETAIL and HINT lines), or its type
    name when it has no message: for one-line errors and log fields."""
    text = str(exc or "").strip()
    return text.splitlines()[0] if text else type(exc).__name__


def plural(count: int, word: str) -> str:
    """`1 row`, `2 rows`, `3 batches`."""
    return f"{count} {word}{'' if count == 1 else 'es' if word.endswith('ch') else 's'}"


def format_duration(seconds: float | None) -> str:
    """A short human duration, two units at most: 45s, 12m, 2m08s, 3h05m, 2h, 30d, 2d04h."""
    if seconds is None:
        return "-"
    total = max(0, round(seconds))
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for n, (unit, size) in enumerate(units):
        if total >= size or unit == "s":
            big, rest = divmod(total, size)
            if unit == "s":
                return f"{big}s"
            small_unit, small_size = units[n + 1]
            small = rest // small_size
            return f"{big}{unit}{small:02d}{small_unit}" if small else f"{big}{unit}"
    raise AssertionError("unreachable")


def format_age(seconds: float | None) -> str:
    """`format_duration`, or the empty string for no age at all."""
    return "" if seconds is None else format_duration(seconds)
