"""TLS verification stays on unless OUTBOX_INSECURE_SKIP_TLS_VERIFY says otherwise, loudly.

Partnero is played by the fake behind a small TLS-terminating proxy with a throwaway
self-signed certificate (made with openssl). Two `outbox run` processes talk to it at once:
one with the default settings (and the environment variables that turn verification off in
other tools), which must refuse the certificate, record it as a retryable network error and
keep the row pending; one with the explicit setting, which delivers and logs the warning.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from outbox import db
from outbox.dev import pgtemp
from outbox.dev.fake_partnero import FakeConfig, FakePartneroThread
from tests.daemon_helpers import API_KEY, env_for, insert_sales, rows, settled, wait_until
from tests.helpers import LoopbackServer


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


class TlsProxy(LoopbackServer):
    """HTTPS on loopback in front of a plain HTTP server: terminates TLS, pipes the bytes."""

    def __init__(self, target_port: int, cert: Path, key: Path) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        super().__init__(context)
        self._target = target_port
        self._loop.set_exception_handler(lambda loop, context: None)  # refused handshakes

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            writer.close()
            self.untrack(writer)
            return
        self.track(up_writer)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        await asyncio.gather(writer.wait_closed(), up_writer.wait_closed(), return_exceptions=True)
        self.untrack(writer)
        self.untrack(up_writer)


def start_daemon(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "outbox.cli", "run"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def test_tls_is_verified_unless_the_explicit_setting_turns_it_off_loudly(
    engine: sa.Engine,
    database_url: str,
    databases: pgtemp.DatabaseFactory,
    certificate: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    insecure_url = databases.create_migrated()
    insecure_engine = db.create_engine(insecure_url, poolclass=sa.NullPool)
    cert, key = certificate
    try:
        with (
            FakePartneroThread(FakeConfig(api_key=API_KEY, dedupe=False)) as fake,
            TlsProxy(fake.port, cert, key) as proxy,
        ):
            https = f"https://127.0.0.1:{proxy.port}"
            verified_env = env_for(database_url, https, log_level="info")
            # What turns verification off elsewhere must not here.
            verified_env.update(
                PYTHONHTTPSVERIFY="0", CURL_CA_BUNDLE="", REQUESTS_CA_BUNDLE="", SSL_NO_VERIFY="1"
            )
            insecure_env = env_for(insecure_url, https, log_level="info")
            insecure_env["OUTBOX_INSECURE_SKIP_TLS_VERIFY"] = "true"
            insert_sales(engine, ["inv_tls_verified"])
            insert_sales(insecure_engine, ["inv_tls_insecure"])
            verified = start_daemon(verified_env, tmp_path / "verified.log")
            insecure = start_daemon(insecure_env, tmp_path / "insecure.log")
            try:
                wait_until(lambda: settled(insecure_engine, 1), what="delivery without checks")
                wait_until(
                    lambda: (
                        (tmp_path / "verified.log").read_text().count("CERTIFICATE_VERIFY_FAILED")
                        >= 2
                    ),
                    what="the verified daemon to refuse the certificate twice",
                )
            finally:
                for proc in (verified, insecure):
                    proc.send_signal(signal.SIGTERM)
                codes = [verified.wait(60), insecure.wait(60)]
            ledger = [t["key"] for t in fake.ledger()]
        verified_log = (tmp_path / "verified.log").read_text()
        insecure_log = (tmp_path / "insecure.log").read_text()
        assert codes == [0, 0], verified_log[-2000:] + insecure_log[-2000:]

        # Verification on: the key check (GET /v1/test) is refused before any row is sent, with
        # a clear reason, and asked again; the row waits, untouched.
        (row,) = rows(engine, "SELECT status, attempts, last_error FROM outbox.events")
        assert (row.status, row.attempts, row.last_error) == ("pending", 0, None)
        assert rows(engine, "SELECT 1 FROM outbox.attempts") == []
        refusals = [
            json.loads(line)
            for line in verified_log.splitlines()
            if "outbox.partnero.unreachable" in line
        ]
        assert len(refusals) >= 2
        assert all(r["level"] == "warning" for r in refusals)
        assert refusals[0]["error"].startswith(f"GET {https}/v1/test: Not sent: ")
        assert "CERTIFICATE_VERIFY_FAILED" in refusals[0]["error"]
        assert ledger == ["inv_tls_insecure"]
        assert "tls_verification_off" not in verified_log

        # Verification off by the explicit setting: delivered, and said loudly.
        warnings = [
            json.loads(line)
            for line in insecure_log.splitlines()
            if "outbox.daemon.tls_verification_off" in line
        ]
        assert [w["level"] for w in warnings] == ["warning"]
        assert "NOT checked" in warnings[0]["note"]
        assert rows(insecure_engine, "SELECT outcome FROM outbox.events")[0][0] == "created"
    finally:
        insecure_engine.dispose()
        databases.drop(insecure_url)


@pytest.mark.parametrize("value", ["", "maybe", "2", "off please"])
def test_the_tls_setting_takes_only_a_clear_boolean(value: str) -> None:
    from outbox.service.settings import SettingError, resolve

    environ = {
        "OUTBOX_DATABASE_URL": "postgresql://u@h/d",
        "PARTNERO_API_KEY": API_KEY,
        "OUTBOX_INSECURE_SKIP_TLS_VERIFY": value,
    }
    with pytest.raises(SettingError, match="OUTBOX_INSECURE_SKIP_TLS_VERIFY"):
        resolve({}, environ)
    off = resolve({}, {k: v for k, v in environ.items() if k != "OUTBOX_INSECURE_SKIP_TLS_VERIFY"})
    assert off.insecure_skip_tls_verify is False
