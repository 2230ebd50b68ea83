"""Every setting of `outbox run`, in one table: flag, environment variable, default, bounds, help.

Each setting is read from its flag, else from `OUTBOX_<NAME>` (PARTNERO_API_URL keeps the name
of the service it points to), else its default (docs/design.md, "Settings"). A bad value stops
start-up with one line naming the setting and why (SettingError). The Partnero API key is never a
flag value (it would show in /proc/<pid>/cmdline): it comes from PARTNERO_API_KEY, a file, or a
systemd credential.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from outbox import db
from outbox.domain import RetryPolicy


class SettingError(ValueError):
    """A setting has a value outbox cannot use. str() is the one line to show."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"invalid setting {setting}: {problem}")
        self.setting = setting
        self.problem = problem


def _number(minimum: float, maximum: float = math.inf) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a number") from None
        if not math.isfinite(value) or not minimum <= value <= maximum:
            bound = f"at least {minimum:g}" + (
                "" if maximum == math.inf else f" and at most {maximum:g}"
            )
            raise ValueError(f"{raw!r} is out of range: must be {bound}")
        return value

    return parse


def _integer(minimum: int, maximum: int = 1_000_000_000) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a whole number") from None
        if not minimum <= value <= maximum:
            raise ValueError(f"{raw!r} is out of range: must be from {minimum} to {maximum}")
        return value

    return parse


def _boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{raw!r} is not a boolean (true/false)")


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in options:
            raise ValueError(f"{raw!r} is not one of {', '.join(options)}")
        return raw

    return parse


def _database_url(raw: str) -> str:
    db.sqlalchemy_url(raw)  # the one check of a database URL's form (DatabaseUrlError)
    return raw


def _http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"{raw!r} is not an http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (the API key goes in PARTNERO_API_KEY)")
    if parts.query or parts.fragment:
        raise ValueError(f"{raw!r} must not have a query or a fragment")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port range only when asked
    except ValueError:
        raise ValueError(f"{raw!r} has a port outside 1-65535") from None
    return raw.rstrip("/")


def _text(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw


@dataclass(frozen=True, slots=True)
class Spec:
    name: str  # attribute name; flag is --name-with-dashes
    parse: Callable[[str], Any]
    default: str | None  # as text, like the environment would give it
    help: str
    env: str = ""  # defaults to OUTBOX_<NAME>
    secret: bool = False

    @property
    def envvar(self) -> str:
        return self.env or f"OUTBOX_{self.name.upper()}"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SPECS: tuple[Spec, ...] = (
    Spec(
        "database_url",
        _database_url,
        None,
        "PostgreSQL URL of the shop's database.",
        env="OUTBOX_DATABASE_URL",
        secret=True,
    ),
    Spec(
        "partnero_api_url",
        _http_url,
        "https://api.partnero.com",
        "Partnero API base URL (a trailing / or /v1 is fine); GET /v1/test there must answer "
        "before anything is sent, and a 404 there stops start-up.",
        env="PARTNERO_API_URL",
    ),
    Spec(
        "lease_seconds",
        _number(1, 86400),
        "60",
        "How long a claim is held. A request is only started while the lease has more than "
        "the request timeout left, so an expired lease means no request is in flight.",
    ),
    Spec(
        "database_timeout_seconds",
        _number(0.5, 3600),
        "10",
        "Bound on one database statement of the daemon, and on waiting for a connection (a "
        "pooler's queue); past it the database counts as not answering and the daemon says so.",
    ),
    Spec(
        "request_timeout_seconds",
        _number(0.1, 3600),
        "15",
        "Hard deadline for one HTTP call (connect, send, whole answer).",
    ),
    Spec(
        "retry_base_delay_seconds",
        _number(0, 86400),
        "2",
        "First retry delay; doubles each attempt.",
    ),
    Spec(
        "retry_max_delay_seconds",
        _number(0, 7 * 86400),
        "1800",
        "Cap on the retry delay, and on any Retry-After honoured.",
    ),
    Spec(
        "max_attempts",
        _integer(1, 10000),
        "20",
        "Attempts per row, over every retry class; then the row fails with the class as reason "
        "(a customer Partnero does not know ends skipped instead).",
    ),
    Spec(
        "unknown_customer_grace_seconds",
        _number(0, 30 * 86400),
        "900",
        "How long after a sale was recorded a 400 Customer not found is retried (the customer "
        "may be created a moment later); then the sale is skipped. A sale whose customer's "
        "signup was skipped is skipped at the first such answer.",
    ),
    Spec("concurrency", _integer(1, 1024), "16", "HTTP calls in flight at once, at most."),
    Spec(
        "rate_limit_per_second",
        _number(0, 1_000_000),
        "0",
        "Client-side cap on calls per second (0 = no cap).",
    ),
    Spec("batch_size", _integer(1, 10000), "100", "Rows claimed per claim query, at most."),
    Spec(
        "poll_interval_seconds",
        _number(0.05, 3600),
        "5",
        "Fallback polling when no NOTIFY arrives (LISTEN wakes the daemon at once).",
    ),
    Spec(
        "doorbell_wait_seconds",
        _number(0.001, 60),
        "0.2",
        "How long a daemon that has caught up waits for transactions that inserted without a "
        "NOTIFY to end before it sleeps (then it claims again and retries); see "
        "docs/benchmarks.md.",
    ),
    Spec(
        "blocked_recheck_seconds",
        _number(0.05, 86400),
        "30",
        "How long a row blocked behind another row of its key waits before being checked again "
        "(a delivered predecessor wakes it at once).",
    ),
    Spec(
        "orphan_refund_grace_seconds",
        _number(0, 30 * 86400),
        "60",
        "A refund whose key has no sale row at all waits this long for the sale to commit, "
        "then is sent anyway (its sale may predate the outbox or have been pruned).",
    ),
    Spec(
        "auth_pause_seconds",
        _number(0.1, 86400),
        "60",
        "After the API key is refused (401, or 403 on GET /v1/test too), stop sending this "
        "long, then check the key with GET /v1/test.",
    ),
    Spec(
        "shutdown_grace_seconds",
        _number(0, 3600),
        "20",
        "On SIGTERM, how long in-flight calls may finish before their leases are released.",
    ),
    Spec("owner", _text, None, "Name of this daemon in leases and attempts (default host:pid)."),
    Spec(
        "api_key_file",
        _text,
        None,
        "Read the Partnero API key from this file instead of PARTNERO_API_KEY. Under systemd "
        "the credential 'partnero_api_key' is read from $CREDENTIALS_DIRECTORY.",
    ),
    Spec(
        "send_created_at",
        _boolean,
        "true",
        "Send each sale's created_at (the row's own time, Unix seconds), so a sale delivered late "
        "(after an outage, or retried across midnight) keeps its commission period; a payload's "
        "own created_at wins. false: Partnero dates each sale when it arrives.",
    ),
    Spec(
        "insecure_skip_tls_verify",
        _boolean,
        "false",
        "Turn TLS certificate verification off (testing only; logged loudly).",
    ),
    Spec(
        "metrics_port",
        _integer(0, 65535),
        "0",
        "Serve Prometheus /metrics and /healthz on this port (0: off).",
    ),
    Spec("metrics_host", _text, "127.0.0.1", "Address for /metrics and /healthz."),
    Spec(
        "stall_seconds",
        _number(0.5, 3600),
        "60",
        "The delivery loop counts as wedged when one turn overruns its expected wait by this "
        "much: watchdog pings stop and /healthz fails.",
    ),
    Spec(
        "status_interval_seconds",
        _number(0.1, 3600),
        "5",
        "How often the systemd STATUS= line and the backlog gauges are refreshed.",
    ),
    Spec(
        "env_file",
        _text,
        None,
        "A KEY=VALUE file of settings, read at start and again on SIGHUP (over the "
        "environment, under the flags); settings that can change live take effect at once.",
    ),
    Spec(
        "log_format",
        _choice("auto", "json", "console"),
        "auto",
        "auto: coloured text on a terminal, JSON lines otherwise.",
    ),
    Spec("log_level", _choice("debug", "info", "warning", "error"), "info", "Lowest level logged."),
)

SPECS_BY_NAME = {spec.name: spec for spec in SPECS}

# What a SIGHUP reload can change without a restart (the API key is read again too).
LIVE = frozenset(
    {
        "retry_base_delay_seconds",
        "retry_max_delay_seconds",
        "max_attempts",
        "unknown_customer_grace_seconds",
        "concurrency",
        "rate_limit_per_second",
        "batch_size",
        "poll_interval_seconds",
        "doorbell_wait_seconds",
        "blocked_recheck_seconds",
        "orphan_refund_grace_seconds",
        "auth_pause_seconds",
        "shutdown_grace_seconds",
        "stall_seconds",
        "status_interval_seconds",
        "log_level",
    }
)


def read_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines (blank lines and # comments skipped; values may be quoted), the format of
    systemd's EnvironmentFile=."""
    values: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingError(
            "OUTBOX_ENV_FILE (--env-file)", f"cannot read {path}: {exc.strerror}"
        ) from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "").isalnum():
            raise SettingError(
                "OUTBOX_ENV_FILE (--env-file)", f"{path} line {number} is not KEY=VALUE"
            )
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str
    partnero_api_url: str
    lease_seconds: float
    database_timeout_seconds: float
    request_timeout_seconds: float
    retry_base_delay_seconds: float
    retry_max_delay_seconds: float
    max_attempts: int
    unknown_customer_grace_seconds: float
    concurrency: int
    rate_limit_per_second: float
    batch_size: int
    doorbell_wait_seconds: float
    poll_interval_seconds: float
    blocked_recheck_seconds: float
    orphan_refund_grace_seconds: float
    auth_pause_seconds: float
    shutdown_grace_seconds: float
    owner: str
    api_key_file: str | None
    send_created_at: bool
    insecure_skip_tls_verify: bool
    metrics_port: int
    metrics_host: str
    stall_seconds: float
    status_interval_seconds: float
    env_file: str | None
    log_format: str
    log_level: str
    api_key: str = field(default="", repr=False)

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            base_delay_seconds=self.retry_base_delay_seconds,
            max_delay_seconds=self.retry_max_delay_seconds,
            auth_pause_seconds=self.auth_pause_seconds,
            unknown_customer_grace_seconds=self.unknown_customer_grace_seconds,
        )

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "api_key"}
        shown["database_url"] = "<hidden>"
        return f"Settings({shown})"


def load(
    raw: Mapping[str, str | None],
    *,
    environ: Mapping[str, str] | None = None,
    need_api_key: bool = True,
) -> Settings:
    """Build Settings from raw texts (flags already merged over the environment)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for spec in SPECS:
        text = raw.get(spec.name)
        if text is None:
            text = spec.default
        if text is None:
            values[spec.name] = None
            continue
        try:
            values[spec.name] = spec.parse(text)
        except ValueError as exc:
            raise SettingError(f"{spec.envvar} ({spec.flag})", str(exc)) from None
    if values["database_url"] is None:
        raise SettingError("OUTBOX_DATABASE_URL (--database-url)", "is required")
    if values["owner"] is None:
        values["owner"] = f"{socket.gethostname()}:{os.getpid()}"
    if values["lease_seconds"] < values["request_timeout_seconds"] + 1:
        raise SettingError(
            "OUTBOX_LEASE_SECONDS (--lease-seconds)",
            f"{values['lease_seconds']:g} must exceed the request timeout "
            f"({values['request_timeout_seconds']:g} s) by at least 1 s, so that an expired lease "
            "means no request is still in flight",
        )
    values["api_key"] = read_api_key(values["api_key_file"], environ) if need_api_key else ""
    return Settings(**values)


def systemd_credential(name: str, environ: Mapping[str, str]) -> Path | None:
    """The file of the systemd credential `name` (LoadCredential=), if the unit loaded one:
    $CREDENTIALS_DIRECTORY/name."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    path = Path(directory) / name if directory else None
    return path if path is not None and path.exists() else None


def read_api_key(api_key_file: str | None, environ: Mapping[str, str]) -> str:
    """The key from --api-key-file, the systemd credential, or PARTNERO_API_KEY, in that order."""
    source: str
    if api_key_file:
        source = "OUTBOX_API_KEY_FILE (--api-key-file)"
        key = _read_key_file(Path(api_key_file), source)
    elif (credential := systemd_credential("partnero_api_key", environ)) is not None:
        source = "systemd credential partnero_api_key"
        key = _read_key_file(credential, source)
    else:
        source = "PARTNERO_API_KEY"
        key = environ.get("PARTNERO_API_KEY", "").strip()
        if not key:
            raise SettingError(
                "PARTNERO_API_KEY",
                "is required (or --api-key-file, or the systemd credential partnero_api_key)",
            )
    if any(c.isspace() or not c.isprintable() for c in key):
        raise SettingError(source, "the API key contains whitespace or control characters")
    return key


def _read_key_file(path: Path, source: str) -> str:
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SettingError(source, f"cannot read {path}: {exc.strerror}") from None
    if not key:
        raise SettingError(source, f"{path} is empty")
    return key


def resolve(
    flags: Mapping[str, str | None],
    environ: Mapping[str, str] | None = None,
    *,
    need_api_key: bool = True,
) -> Settings:
    """Flags over OUTBOX_ENV_FILE over the environment over the defaults. Called at start and
    again on SIGHUP with the same flags."""
    environ = dict(os.environ if environ is None else environ)
    env_file = flags.get("env_file") or environ.get(SPECS_BY_NAME["env_file"].envvar)
    if env_file:
        environ.update(read_env_file(env_file))
    raw: dict[str, str | None] = {}
    for spec in SPECS:
        value = flags.get(spec.name)
        raw[spec.name] = value if value is not None else environ.get(spec.envvar)
    return load(raw, environ=environ, need_api_key=need_api_key)
