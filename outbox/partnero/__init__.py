"""The one seam to the Partnero API: `client` (the calls the daemon makes, each returning an
`Exchange`, never raising for HTTP) over `transport` (httpx's interface on an aiohttp pool)."""

from outbox.partnero.client import (
    BODY_EXCERPT_CHARS,
    ERROR_MAX_CHARS,
    LOOKUP_MAX_BODY_BYTES,
    MAX_BODY_BYTES,
    TRANSACTIONS_PATH,
    ApiKey,
    ClientClosedError,
    ConfigurationError,
    PartneroClient,
    PartneroError,
    api_root,
    build_create_body,
    build_customer_body,
    parse_retry_after,
)
from outbox.partnero.transport import AiohttpTransport

__all__ = [
    "BODY_EXCERPT_CHARS",
    "ERROR_MAX_CHARS",
    "LOOKUP_MAX_BODY_BYTES",
    "MAX_BODY_BYTES",
    "TRANSACTIONS_PATH",
    "AiohttpTransport",
    "ApiKey",
    "ClientClosedError",
    "ConfigurationError",
    "PartneroClient",
    "PartneroError",
    "api_root",
    "build_create_body",
    "build_customer_body",
    "parse_retry_after",
]
