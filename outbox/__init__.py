"""outbox: deliver sale and refund events from a Postgres outbox table to Partnero."""

from importlib.metadata import PackageNotFoundError, version

from outbox.record import record_refund, record_sale

try:
    __version__ = version("outbox")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = ["__version__", "record_refund", "record_sale"]
