"""A bad setting stops `outbox run` with one clear line naming it (exit 2), before anything
starts. tests/test_run_process.py runs a few of these as real processes; these are the rest,
through the same click command in-process (a bad setting fails before the daemon is built)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from outbox.cli import main
from outbox.service.settings import SPECS, SettingError, resolve

KEY = "pk_test_0123456789abcdef"


def environment(**values: str | None) -> dict[str, str | None]:
    """Every outbox variable unset (the test's own environment must not leak in), then these."""
    env: dict[str, str | None] = {spec.envvar: None for spec in SPECS}
    env.update(
        PARTNERO_API_KEY=KEY,
        CREDENTIALS_DIRECTORY=None,
        OUTBOX_DATABASE_URL="postgresql://outbox@127.0.0.1:9/shop",
    )
    env.update(values)
    return env


def one_line(result_stderr: str) -> str:
    lines = result_stderr.splitlines()
    assert len(lines) == 1, result_stderr
    return lines[0]


CASES: list[tuple[dict[str, str | None], list[str], str]] = [
    (
        {"OUTBOX_LEASE_SECONDS": "nan"},
        [],
        "OUTBOX_LEASE_SECONDS (--lease-seconds): 'nan' is out of range: must be at least 1 "
        "and at most 86400",
    ),
    (
        {"OUTBOX_RETRY_MAX_DELAY_SECONDS": "inf"},
        [],
        "OUTBOX_RETRY_MAX_DELAY_SECONDS (--retry-max-delay-seconds): 'inf' is out of range: "
        "must be at least 0 and at most 604800",
    ),
    ({}, ["--lease-seconds", "-1"], "OUTBOX_LEASE_SECONDS (--lease-seconds): '-1' is out of range"),
    (
        {"OUTBOX_MAX_ATTEMPTS": "1.5"},
        [],
        "OUTBOX_MAX_ATTEMPTS (--max-attempts): '1.5' is not a whole number",
    ),
    (
        {"OUTBOX_REQUEST_TIMEOUT_SECONDS": "0"},
        [],
        "OUTBOX_REQUEST_TIMEOUT_SECONDS (--request-timeout-seconds): '0' is out of range",
    ),
    (
        {"OUTBOX_INSECURE_SKIP_TLS_VERIFY": "maybe"},
        [],
        "OUTBOX_INSECURE_SKIP_TLS_VERIFY (--insecure-skip-tls-verify): 'maybe' is not a boolean",
    ),
    ({"OUTBOX_LOG_FORMAT": "xml"}, [], "OUTBOX_LOG_FORMAT (--log-format): 'xml' is not one of"),
    ({"OUTBOX_LOG_LEVEL": "loud"}, [], "OUTBOX_LOG_LEVEL (--log-level): 'loud' is not one of"),
    (
        {"OUTBOX_METRICS_PORT": "70000"},
        [],
        "OUTBOX_METRICS_PORT (--metrics-port): '70000' is out of range: must be from 0 to 65535",
    ),
    ({"OUTBOX_OWNER": "   "}, [], "OUTBOX_OWNER (--owner): must not be empty"),
    (
        {"PARTNERO_API_URL": "ftp://api.partnero.com"},
        [],
        "PARTNERO_API_URL (--partnero-api-url): 'ftp://api.partnero.com' is not an http(s) URL",
    ),
    ({"OUTBOX_DATABASE_URL": ""}, [], "OUTBOX_DATABASE_URL (--database-url): must start with"),
    (
        {"OUTBOX_API_KEY_FILE": "/nonexistent/partnero_api_key"},
        [],
        "OUTBOX_API_KEY_FILE (--api-key-file): cannot read /nonexistent/partnero_api_key: "
        "No such file or directory",
    ),
    (
        {"OUTBOX_ENV_FILE": "/nonexistent/outbox.env"},
        [],
        "OUTBOX_ENV_FILE (--env-file): cannot read /nonexistent/outbox.env: "
        "No such file or directory",
    ),
    (
        {"PARTNERO_API_KEY": "pk_test with_a_space"},
        [],
        "PARTNERO_API_KEY: the API key contains whitespace or control characters",
    ),
]


@pytest.mark.parametrize(
    ("env", "args", "message"),
    CASES,
    ids=[m.split(" ", 1)[0] + str(i) for i, (_, _, m) in enumerate(CASES)],
)
def test_a_bad_setting_stops_start_up_with_one_line(
    env: dict[str, str | None], args: list[str], message: str
) -> None:
    result = CliRunner().invoke(main, ["run", *args], env=environment(**env))
    assert result.exit_code == 2, result.output
    assert one_line(result.stderr).startswith(f"outbox: invalid setting {message}")
    assert result.stdout == ""


def test_bad_files_stop_start_up_with_one_line(tmp_path: Path) -> None:
    empty_key = tmp_path / "empty_key"
    empty_key.write_text("\n")
    env_file = tmp_path / "outbox.env"
    env_file.write_text("# comment\nOUTBOX_CONCURRENCY=8\nthis line is not a setting\n")
    bad_value = tmp_path / "bad_value.env"
    bad_value.write_text("OUTBOX_CONCURRENCY=lots\n")
    runner = CliRunner()
    expected = {
        str(empty_key): f"OUTBOX_API_KEY_FILE (--api-key-file): {empty_key} is empty",
        str(env_file): f"OUTBOX_ENV_FILE (--env-file): {env_file} line 3 is not KEY=VALUE",
        str(bad_value): "OUTBOX_CONCURRENCY (--concurrency): 'lots' is not a whole number",
    }
    for path, message in expected.items():
        variable = "OUTBOX_API_KEY_FILE" if path == str(empty_key) else "OUTBOX_ENV_FILE"
        result = runner.invoke(main, ["run"], env=environment(**{variable: path}))
        assert result.exit_code == 2, result.output
        assert one_line(result.stderr) == f"outbox: invalid setting {message}"


# Partnero URLs the client cannot use: refused by the settings too (before 0edb6ca they passed,
# and `outbox run` died with a ConfigurationError traceback, or - for the port - started and
# failed every call at request time).
BAD_PARTNERO_URLS = [
    "https://user:secret@api.partnero.com",
    "https://api.partnero.com/?token=1",
    "https://api.partnero.com/#fragment",
    "https://api.partnero.com:99999",
]


@pytest.mark.parametrize("url", BAD_PARTNERO_URLS)
def test_a_partnero_url_the_client_cannot_use_is_a_bad_setting(url: str) -> None:
    environ = {k: v for k, v in environment(PARTNERO_API_URL=url).items() if v is not None}
    with pytest.raises(SettingError, match=r"PARTNERO_API_URL \(--partnero-api-url\)"):
        resolve({}, environ)
