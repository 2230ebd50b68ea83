"""`outbox web`'s credentials: password hashes and the users file, session cookies, the proxy
header mode (only trusted peers may name a user), `outbox web hash-password`, and the command's
bad settings; and the command itself, started as a process, serving until SIGTERM."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from structlog.testing import capture_logs

from outbox import db
from outbox.cli import main
from outbox.dev import pgtemp
from outbox.web import auth, server, session
from outbox.web.app import ProxyAuth
from tests.daemon_helpers import wait_until
from tests.test_ops_seed import seed, snapshot
from tests.web.server import PASSWORDS, SECRET, Browser, WebServer, config, csrf_of

# ---- hashes, the users file, cookies -------------------------------------------------------


def test_a_password_hash_verifies_its_password_only() -> None:
    hashed = auth.hash_password("correct horse")
    assert hashed.startswith("scrypt$16384$8$1$")
    assert auth.verify_password("correct horse", hashed)
    assert not auth.verify_password("correct horsE", hashed)
    assert not auth.verify_password("correct horse", "scrypt$1$2$3$bad")
    assert hashed != auth.hash_password("correct horse")  # a salt of its own


def test_the_users_file_is_read_and_a_bad_line_is_named_without_its_hash() -> None:
    hashed = auth.hash_password("pw")
    text = f"# staff\nalice:operator:{hashed}\n\nvictor:viewer:{hashed}\n"
    users = auth.parse_users(text, "users")
    assert {n: a.user.role for n, a in users.items()} == {
        "alice": auth.Role.OPERATOR,
        "victor": auth.Role.VIEWER,
    }
    for bad, message in (
        (f"alice:admin:{hashed}", "users line 1: the role must be operator or viewer"),
        ("alice:viewer:plaintext", "users line 1: the hash is not one"),
        (f"al ice:viewer:{hashed}", "users line 1: expected name:role:hash"),
        (f"a:viewer:{hashed}\na:operator:{hashed}", "users line 2: user 'a' is listed twice"),
        ("# nobody", "users: no users"),
    ):
        with pytest.raises(auth.AuthError) as caught:
            auth.parse_users(bad, "users")
        assert str(caught.value).startswith(message)
        assert hashed not in str(caught.value)


def test_a_session_cookie_is_signed_expires_and_can_be_revoked() -> None:
    signer = auth.Signer(b"k" * 32)
    session = signer.new_session("alice", now=1000.0)
    cookie = signer.cookie(session)
    assert signer.read(cookie, now=1001.0) == session
    assert signer.read(cookie, now=1000.0 + auth.SESSION_SECONDS) is None  # expired
    sid, _user, expires, signature = cookie.split(".")
    forged = f"{sid}.{auth._b64(b'mallory')}.{expires}.{signature}"
    assert signer.read(forged, now=1001.0) is None
    assert auth.Signer(b"j" * 32).read(cookie, now=1001.0) is None  # another secret
    assert signer.read("garbage", now=1001.0) is None
    signer.revoke(session)
    assert signer.read(cookie, now=1001.0) is None


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/rows?key=a%2Fb", "/rows?key=a%2Fb"),
        ("https://evil.example/", "/"),
        ("//evil.example/", "/"),
        ("/\\evil.example/", "/"),
        ("/\t/evil.example/", "/"),
        ("/ /evil.example/", "/"),
        ("", "/"),
    ],
)
def test_after_login_only_a_path_on_this_site(target: str, expected: str) -> None:
    assert session._next(target) == expected


def _settings(**given: object) -> server.Settings:
    defaults: dict[str, object] = {
        "host": "127.0.0.1", "port": 0, "database_url": "postgresql://x@127.0.0.1/x",
        "users_file": None, "secret_file": None, "cookie_secure": False, "proxy_header": None,
        "trusted_proxies": frozenset(), "proxy_operators": frozenset(),
        "max_pending_age": timedelta(minutes=15),
    }  # fmt: skip
    return server.Settings(**{**defaults, **given})  # type: ignore[arg-type]


def test_the_users_and_the_secret_come_from_systemd_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OUTBOX_WEB_USERS_FILE", "OUTBOX_WEB_SECRET_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    (tmp_path / "web_users").write_text(f"alice:viewer:{auth.hash_password('pw')}\n")
    config_, generated = server.config_from(_settings())
    assert list(config_.accounts) == ["alice"] and generated  # no web_secret: a random one
    (tmp_path / "web_secret").write_text("z" * 40 + "\n")
    config_, generated = server.config_from(_settings())
    assert config_.signer.secret == b"z" * 40 and not generated
    # An explicit option wins over the credential.
    other = tmp_path / "other"
    other.write_text(f"bob:operator:{auth.hash_password('pw')}\n")
    assert list(server.config_from(_settings(users_file=str(other)))[0].accounts) == ["bob"]


# ---- the proxy header mode -----------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(databases: pgtemp.DatabaseFactory) -> Iterator[tuple[sa.Engine, dict[str, int], str]]:
    url = databases.create_migrated()
    eng = db.create_engine(url, poolclass=sa.NullPool)
    yield eng, seed(eng), url
    eng.dispose()
    databases.drop(url)


@pytest.fixture(scope="module")
def proxied(shared: tuple[sa.Engine, dict[str, int], str]) -> Iterator[WebServer]:
    """Two servers: one trusting 127.0.0.1 (where the tests connect from), one trusting
    another address only."""
    trusting = ProxyAuth("X-Remote-User", frozenset({"127.0.0.1"}), frozenset({"olga"}))
    elsewhere = ProxyAuth("X-Remote-User", frozenset({"10.9.9.9"}), frozenset({"olga"}))
    with WebServer(shared[2], [config(trusting), config(elsewhere)]) as running:
        yield running


def test_behind_a_trusted_proxy_its_header_names_the_user_and_the_role(
    proxied: WebServer,
) -> None:
    base = proxied.url(0)
    olga = httpx.get(base + "/", headers={"X-Remote-User": "olga"})
    assert olga.status_code == 200 and "olga (operator)" in olga.text
    assert "Sign out" not in olga.text  # the proxy signs people out
    pat = httpx.get(base + "/rows", headers={"X-Remote-User": "pat"})
    assert pat.status_code == 200 and "pat (viewer)" in pat.text
    assert "/actions/retry" not in pat.text
    api = httpx.get(base + "/api/status", headers={"X-Remote-User": "pat"})
    assert api.status_code == 200 and "problems" in api.json()
    for path in ("/", "/api/status", "/login"):
        nobody = httpx.get(base + path, follow_redirects=False)
        assert nobody.status_code in (401, 303), path
        assert nobody.status_code == 401 or nobody.headers["location"] == "/"


def test_a_proxy_header_from_an_untrusted_peer_is_refused(
    proxied: WebServer, shared: tuple[sa.Engine, dict[str, int], str]
) -> None:
    base = proxied.url(1)
    for path in ("/", "/rows", "/api/status", "/api/rows"):
        response = httpx.get(base + path, headers={"X-Remote-User": "olga"})
        assert response.status_code == 401, path
        assert "problems" not in response.text
        assert "untrusted address" in response.text
    before = snapshot(shared[0])
    ids = shared[1]
    response = httpx.post(
        base + "/actions/retry",
        headers={"X-Remote-User": "olga"},
        data={"ids": str(ids["server"]), "reason": "x", "csrf": "x"},
    )
    assert response.status_code == 401
    assert snapshot(shared[0]) == before


def test_behind_the_proxy_actions_need_the_csrf_token_of_that_user(
    proxied: WebServer, shared: tuple[sa.Engine, dict[str, int], str]
) -> None:
    base, (engine, ids, _) = proxied.url(0), shared
    as_olga = {"X-Remote-User": "olga"}
    token = csrf_of(httpx.get(base + "/rows", headers=as_olga).text)
    form = {"ids": str(ids["rate"])}
    pat_token = auth.Signer(SECRET).csrf("user:pat")  # a viewer's page has no form
    before = snapshot(engine)
    refused = httpx.post(base + "/actions/retry/preview", headers=as_olga,
                         data={**form, "csrf": pat_token})  # fmt: skip
    assert refused.status_code == 403
    viewer = httpx.post(base + "/actions/retry/preview", headers={"X-Remote-User": "pat"},
                        data={**form, "csrf": pat_token})  # fmt: skip
    assert viewer.status_code == 403
    preview = httpx.post(
        base + "/actions/retry/preview", headers=as_olga, data={**form, "csrf": token}
    )
    assert preview.status_code == 200 and "Confirm: retry 1 row" in preview.text
    assert snapshot(engine) == before
    done = httpx.post(
        base + "/actions/retry",
        headers=as_olga,
        data={**form, "csrf": token, "reason": "limit raised"},
    )
    assert done.status_code == 303
    with engine.connect() as conn:
        actor = conn.execute(sa.text("SELECT actor FROM outbox.operator_actions")).scalar_one()
    assert actor == "olga"


def test_without_the_database_pages_say_so_with_503_and_no_password() -> None:
    url = "postgresql://web:hunter2-secret@127.0.0.1:1/shop"
    with capture_logs() as logs, WebServer(url, [config()]) as down:
        browser = Browser(down.url())
        health = browser.get("/healthz")
        browser.login("alice")
        page = browser.get("/")
        api = httpx.get(
            down.url() + "/api/status", auth=httpx.BasicAuth("alice", PASSWORDS["alice"])
        )
        browser.close()
    assert health.status_code == 503
    assert page.status_code == 503 and "the database could not be asked" in page.text
    assert api.status_code == 503
    assert api.json() == {"error": "the database could not be asked; try again in a moment"}
    assert any(e["event"] == "outbox.web.database_error" for e in logs)
    for text in (health.text, page.text, api.text, repr(logs)):
        assert "hunter2-secret" not in text


def test_cookie_secure_marks_the_session_cookie(
    shared: tuple[sa.Engine, dict[str, int], str],
) -> None:
    with WebServer(shared[2], [dataclasses.replace(config(), cookie_secure=True)]) as running:
        login_page = httpx.get(running.url() + "/login")
        # (a client keeps a Secure cookie for HTTPS: hand it back by hand over plain HTTP)
        anonymous = login_page.cookies["outbox_session"]
        signed = httpx.post(
            running.url() + "/login",
            data={
                "username": "alice",
                "password": PASSWORDS["alice"],
                "csrf": csrf_of(login_page.text),
            },
            headers={"Cookie": f"outbox_session={anonymous}"},
        )
    assert signed.status_code == 303
    for response in (login_page, signed):
        cookie = response.headers["set-cookie"]
        assert "; Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie


# ---- the command ---------------------------------------------------------------------------


def test_hash_password_prints_a_hash_or_a_users_file_line() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["web", "hash-password"], input="s3cret pass\n")
    assert result.exit_code == 0, result.output
    assert auth.verify_password("s3cret pass", result.stdout.strip())
    line = runner.invoke(
        main,
        ["web", "hash-password", "--name", "alice", "--role", "operator"],
        input="alice's long password\n",
    )
    (user,) = auth.parse_users(line.stdout, "out").values()
    assert user.user == auth.User("alice", auth.Role.OPERATOR)
    # (A password longer than anything base64 writes by chance: "pw" once showed up in a salt.)
    assert "alice's long password" not in line.stdout
    assert auth.verify_password("alice's long password", line.stdout.strip().split(":", 2)[2])
    empty = runner.invoke(main, ["web", "hash-password"], input="\n")
    assert (empty.exit_code, empty.stderr) == (2, "outbox: the password is empty\n")


def _web(*args: str, env: dict[str, str]) -> Result:
    """`outbox web ARGS` in this process, with only `env`'s settings."""
    unset: dict[str, str | None] = {
        k: None for k in os.environ if k.startswith(("OUTBOX_", "CREDENTIALS"))
    }
    return CliRunner().invoke(main, ["web", *args], env={**unset, **env})


def test_bad_settings_are_one_line_and_exit_2(tmp_path: Path) -> None:
    url = {"OUTBOX_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    bad_users = tmp_path / "users"
    bad_users.write_text("alice:root:x\n")
    short = tmp_path / "secret"
    short.write_text("too short\n")
    cases = [
        ({}, [], "outbox: invalid setting OUTBOX_DATABASE_URL (--database-url): is required"),
        (url, [], "outbox: no users: set OUTBOX_WEB_USERS_FILE"),
        ({**url, "OUTBOX_WEB_USERS_FILE": str(bad_users)}, [], f"outbox: {bad_users} line 1"),
        (url, ["--users-file", str(tmp_path / "missing")], "outbox: cannot read the users file"),
        (url, ["--trust-proxy-header", "X-Remote-User"], "outbox: --trust-proxy-header needs"),
        (url, ["--trust-proxy-header", "X-U", "--trusted-proxy", "x"], "outbox: --trusted-proxy"),
        ({**url, "OUTBOX_WEB_SECRET_FILE": str(short)}, [], "outbox: the session secret in"),
        (url, ["--max-pending-age", "soon"], "outbox: --max-pending-age: 'soon' is not"),
    ]
    for env, args, start in cases:
        result = _web(*args, env=env)
        assert result.exit_code == 2, (args, result.stderr)
        assert result.stderr.startswith(start), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr


def test_without_jinja2_the_command_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "jinja2" else real(name, *a)
    )
    result = CliRunner().invoke(main, ["web"])
    assert result.exit_code == 2
    assert result.stderr == (
        "outbox: outbox web needs Jinja2: pip install 'partnero-outbox[web]'\n"
    )


def test_outbox_web_serves_until_sigterm(
    tmp_path: Path, shared: tuple[sa.Engine, dict[str, int], str]
) -> None:
    users = tmp_path / "users"
    users.write_text(f"alice:operator:{auth.hash_password('pw-alice')}\n")
    secret = tmp_path / "secret"
    secret.write_text("x" * 40)
    with socket_port() as port:
        pass
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "CREDENTIALS"))}
    env |= {"OUTBOX_DATABASE_URL": shared[2], "OUTBOX_WEB_USERS_FILE": str(users),
            "OUTBOX_WEB_SECRET_FILE": str(secret), "OUTBOX_LOG_FORMAT": "json"}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "outbox.cli", "web", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            assert process.poll() is None, process.communicate()
            try:
                return httpx.get(base + "/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(answers, 20, "outbox web to answer /healthz")
        browser = Browser(base)
        assert browser.login("alice", "pw-alice").status_code == 303
        assert browser.get("/").status_code == 200
        browser.close()
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert '"event": "outbox.web.listening"' in err
    assert "pw-alice" not in err and "x" * 40 not in err


class socket_port:
    """A free TCP port on loopback (closed again before the server binds it)."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        return int(self._sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self._sock.close()
