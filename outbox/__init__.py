"""outbox: deliver signup, sale and refund events from a Postgres outbox table to Partnero.

`outbox.record_signup`, `outbox.record_sale` and `outbox.record_refund` (for SQLAlchemy
applications) are imported on first use, so that the command line and the daemon do not pay for
them."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

# The name on the package index (`outbox` there is an unrelated SMTP client); the import package
# and the command stay `outbox`.
DISTRIBUTION = "partnero-outbox"

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = ["__version__", "record_refund", "record_sale", "record_signup"]


def __getattr__(name: str) -> Any:
    if name in ("record_signup", "record_sale", "record_refund"):
        from outbox import record

        return getattr(record, name)
    raise AttributeError(f"module 'outbox' has no attribute {name!r}")
