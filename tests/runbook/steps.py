"""What each `sh` block of systemd/README.md promises, checked after it ran in the container.

Every block of the runbook has an id (`<!-- doc-test id=... -->`) that STEPS knows: a block
without one, or with an unknown one, fails the run (and tests/test_systemd.py), so a step added to
the page is not silently left unchecked. `before` runs on the host ahead of the block (what the
operator does outside the server: copy a wheel, create a key in Partnero), `after` checks.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.doc_blocks import Block, blocks
from tests.runbook.container import APP_PASSWORD, Container

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "systemd" / "README.md"
SECRETS = [
    "OWNER-PASSWORD",
    "DAEMON-PASSWORD",
    "YOUR-PARTNERO-API-KEY",
    "NEW-PARTNERO-API-KEY",
    "WEB-PASSWORD",
    "ALICE-PASSWORD",
]
WEB = "http://127.0.0.1:8090"  # the container shares the host's network
OWNER = "OUTBOX_ENV_FILE=/etc/outbox/migrate.env PGPASSFILE=/etc/outbox/migrate.pgpass"
UPGRADE_MIGRATION = "runbook_upgrade"


@dataclass
class Run:
    """What the steps share: the container, the fake Partnero, what was measured."""

    box: Container
    fake_url: str
    notes: list[str] = field(default_factory=list)
    version: str = ""
    sales: int = 0
    main_pid: str = ""

    # ---- in the container --------------------------------------------------------------------

    def sql(self, query: str) -> str:
        """A query as the database administrator (postgres, by peer)."""
        return self.box.out(f"runuser -u postgres -- psql -XAtq -d shop -c {quote(query)}")

    def as_app(self, query: str) -> subprocess.CompletedProcess[str]:
        """A statement as the shop's application login role (a member of outbox_app)."""
        url = "postgresql://shop_app@/shop?host=/var/run/postgresql"
        return self.box.exec(
            f"psql -XAtq -v ON_ERROR_STOP=1 {quote(url)} -c {quote(query)}",
            env={"PGPASSWORD": APP_PASSWORD},
        )

    def unit(self, name: str, *properties: str) -> dict[str, str]:
        text = self.box.out(f"systemctl show {name} " + " ".join(f"-p {p}" for p in properties))
        return dict(line.split("=", 1) for line in text.splitlines())

    def journal(self, unit: str = "outbox") -> list[dict[str, Any]]:
        """The JSON log lines of the unit's running process."""
        pid = self.unit(unit, "MainPID")["MainPID"]
        text = self.box.out(f"journalctl -q -o cat _SYSTEMD_UNIT={unit}.service _PID={pid}")
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def all_journal_lines(self) -> str:
        return self.box.out("journalctl -q -o cat -u outbox -u outbox-migrate -u outbox-web")

    # ---- on the host -------------------------------------------------------------------------

    def fake(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        answer = httpx.request(method, f"{self.fake_url}{path}", json=body, timeout=10)
        answer.raise_for_status()
        return answer.json()

    def ledger_keys(self) -> list[str]:
        return [t["key"] for t in self.fake("GET", "/_fake/ledger")["transactions"]]

    def deliver_one(self) -> str:
        """Record a sale as the shop's app role; wait until Partnero has it."""
        self.sales += 1
        key = f"inv_runbook_{self.sales}"
        done = self.as_app(f"SELECT outbox.record_sale('{key}', 'cust_1', 10.00, 'EUR')")
        assert done.returncode == 0, f"shop_app could not record a sale: {done.stderr}"
        wait_for(lambda: key in self.ledger_keys(), f"{key} to reach the fake Partnero")
        return key


def quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)
    return value


# ---- the steps, in the page's order ----------------------------------------------------------


def after_build(run: Run) -> None:
    wheels = sorted((ROOT / "dist").glob("partnero_outbox-*-py3-none-any.whl"))
    assert len(wheels) == 1, f"make dist should leave one wheel in dist/: {wheels}"
    run.version = wheels[0].name.split("-")[1]
    run.box.put(wheels[0])


def after_install(run: Run) -> None:
    said = run.box.out("/opt/outbox/bin/outbox --version")
    assert run.version in said, said
    # The units' Documentation= links name files the wheel installed.
    for unit in ("outbox.service", "outbox-migrate.service"):
        text = (ROOT / "systemd" / unit).read_text()
        for link in re.findall(r"file://(\S+)", text):
            run.box.out(f"test -s {link}")


def after_user(run: Run) -> None:
    run.box.out("id outbox")


def after_roles(run: Run) -> None:
    members = run.sql(
        "SELECT r.rolname || ' in ' || g.rolname FROM pg_auth_members m "
        "JOIN pg_roles r ON r.oid = m.member JOIN pg_roles g ON g.oid = m.roleid "
        "WHERE g.rolname LIKE 'outbox%' ORDER BY 1"
    )
    assert members.split("\n") == ["partnero_sync in outbox_daemon", "shop_app in outbox_app"], (
        members
    )


def after_settings(run: Run) -> None:
    modes = run.box.out("stat -c '%n %a %U:%G' /etc/outbox/*.env")
    assert modes.split("\n") == [
        "/etc/outbox/migrate.env 640 root:outbox",
        "/etc/outbox/outbox.env 640 root:outbox",
    ], modes


def after_credentials(run: Run) -> None:
    modes = run.box.out("stat -c '%n %a %U' /etc/outbox/partnero_api_key /etc/outbox/*pgpass")
    assert all(line.endswith(" 600 root") for line in modes.split("\n")), modes


def after_units(run: Run) -> None:
    assert run.unit("outbox-migrate", "Result")["Result"] == "success"
    owner = run.sql("SELECT nspowner::regrole FROM pg_namespace WHERE nspname = 'outbox'")
    assert owner == "outbox_owner", f"the outbox schema belongs to {owner!r}"
    rights = run.sql(
        "SELECT has_table_privilege('partnero_sync', 'outbox.events', 'UPDATE'), "
        "has_table_privilege('partnero_sync', 'outbox.events', 'DELETE'), "
        "has_database_privilege('partnero_sync', 'shop', 'CREATE'), "
        "has_column_privilege('shop_app', 'outbox.events', 'payload', 'INSERT')"
    )
    assert rights == "t|f|f|t", f"daemon UPDATE, DELETE, CREATE; app INSERT: {rights}"


def after_start(run: Run) -> None:
    shown = run.unit("outbox", "ActiveState", "SubState", "StatusText", "MainPID", "Environment")
    assert (shown["ActiveState"], shown["SubState"]) == ("active", "running"), shown
    assert shown["StatusText"].startswith("backlog"), shown  # READY came with a status line
    assert "OUTBOX_DATABASE_URL" not in shown["Environment"], "settings belong in the file"
    run.main_pid = shown["MainPID"]
    # outbox.service pulled outbox-migrate in again: with nothing pending it succeeds.
    finished = run.box.out("journalctl -q -o cat -u outbox-migrate | grep -c '^Finished' || true")
    assert finished == "2", f"outbox-migrate finished {finished} times, not 2 (step 7, step 8)"
    assert run.unit("outbox-migrate", "Result")["Result"] == "success"
    user = run.box.out(f"ps -o user= -p {run.main_pid}")
    assert user == "outbox", f"the daemon runs as {user!r}"
    key = run.deliver_one()
    logins = run.sql(
        "SELECT string_agg(DISTINCT usename, ',') FROM pg_stat_activity "
        "WHERE datname = 'shop' AND pid <> pg_backend_pid()"
    )
    assert logins == "partnero_sync", f"logged in to shop: {logins}"
    refused = run.as_app("SELECT status FROM outbox.events")
    assert "permission denied" in refused.stderr, "shop_app may read the events back"
    events = {line["event"] for line in run.journal()}
    assert {"outbox.daemon.starting", "outbox.delivery.delivered"} <= events, events
    run.notes.append(f"{key} delivered by partnero_sync, the daemon running as user outbox")
    for unit in ("outbox.service", "outbox-migrate.service"):
        said = run.box.out(f"systemd-analyze security {unit} | tail -n 1")
        score = re.search(r"exposure level for \S+: (\d+\.\d+)", said)
        assert score and float(score.group(1)) <= 2.0, said
        run.notes.append(f"live exposure of {unit}: {score.group(1)}")


def reloaded(run: Run, count: int) -> list[dict[str, Any]]:
    lines = [line for line in run.journal() if line["event"] == "outbox.daemon.reloaded"]
    return lines if len(lines) >= count else []


def after_reload_set(run: Run) -> None:
    (line,) = wait_for(lambda: reloaded(run, 1), "the reload to be logged")
    assert line["changed"] == ["concurrency"], line


def after_reload_unset(run: Run) -> None:
    lines = wait_for(lambda: reloaded(run, 2), "the second reload to be logged")
    # The deleted line is unset: concurrency changed again, back from 4 to its default.
    assert lines[1]["changed"] == ["concurrency"], lines
    assert run.unit("outbox", "MainPID")["MainPID"] == run.main_pid, "reload restarted it"
    run.deliver_one()


def before_rotate_key(run: Run) -> None:
    run.fake("POST", "/_fake/config", {"api_key": "NEW-PARTNERO-API-KEY"})


def after_rotate_key(run: Run) -> None:
    shown = run.unit("outbox", "ActiveState", "MainPID")
    assert shown["ActiveState"] == "active" and shown["MainPID"] != run.main_pid, shown
    run.main_pid = shown["MainPID"]
    run.deliver_one()


def after_web(run: Run) -> None:
    shown = run.unit("outbox-web", "ActiveState", "SubState", "MainPID")
    assert (shown["ActiveState"], shown["SubState"]) == ("active", "running"), shown
    user = run.box.out(f"ps -o user= -p {shown['MainPID']}")
    assert user == "outbox", f"outbox web runs as {user!r}"
    wait_for_page(f"{WEB}/healthz")
    assert httpx.get(f"{WEB}/api/status").status_code == 401  # nothing without signing in
    answer = httpx.get(f"{WEB}/api/status", auth=("alice", "ALICE-PASSWORD"), timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["totals"]["delivered"] == run.sales, answer.json()["totals"]
    logins = run.sql(
        "SELECT string_agg(DISTINCT usename, ',' ORDER BY usename) FROM pg_stat_activity "
        "WHERE datname = 'shop' AND pid <> pg_backend_pid()"
    )
    assert logins == "outbox_web,partnero_sync", f"logged in to shop: {logins}"
    said = run.box.out("systemd-analyze security outbox-web.service | tail -n 1")
    score = re.search(r"exposure level for \S+: (\d+\.\d+)", said)
    assert score and float(score.group(1)) <= 2.0, said
    run.notes.append(
        f"outbox web answered as outbox_web (an outbox_operator member); live exposure "
        f"{score.group(1)}"
    )


def wait_for_page(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).text == "ok":
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer ok within {timeout} s")
        time.sleep(0.1)


def before_upgrade(run: Run) -> None:
    wheel = upgrade_wheel()
    run.box.out("rm ./partnero_outbox-*.whl")
    run.box.put(wheel)
    run.version = wheel.name.split("-")[1]


def after_upgrade(run: Run) -> None:
    said = run.box.out("/opt/outbox/bin/outbox --version")
    assert run.version in said, said
    states = run.box.out(f"{OWNER} /opt/outbox/bin/outbox migrate --status")
    (line,) = [line for line in states.splitlines() if UPGRADE_MIGRATION in line]
    assert "applied" in line, states
    shown = run.unit("outbox", "ActiveState", "MainPID")
    assert shown["ActiveState"] == "active" and shown["MainPID"] != run.main_pid, shown
    run.deliver_one()
    assert run.unit("outbox-web", "ActiveState")["ActiveState"] == "active"
    wait_for_page(f"{WEB}/healthz")  # restarted on the new version, on the migrated schema
    run.notes.append(f"upgraded to {run.version}: migration {line.split()[0]} applied")


def after_uninstall(run: Run) -> None:
    left = run.box.out(
        "systemctl list-units --all --plain --no-legend 'outbox*'; "
        "ps -eo user=,args= | grep -v grep | grep -e outbox -e partnero || true; "
        "ls -d /opt/outbox /etc/outbox /etc/systemd/system/outbox* 2>/dev/null || true; "
        "getent passwd outbox || true"
    )
    assert left == "", f"left after uninstall: {left}"
    logins = run.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE usename IN ('partnero_sync', 'outbox_web')"
    )
    assert logins == "0", f"{logins} connections of partnero_sync or outbox_web left"


def after_drop_database(run: Run) -> None:
    left = run.sql(
        "SELECT string_agg(rolname, ',') FROM pg_roles WHERE rolname LIKE 'outbox%' "
        "OR rolname = 'partnero_sync'"
    )
    assert left == "", f"roles left: {left}"
    assert run.sql("SELECT count(*) FROM pg_namespace WHERE nspname = 'outbox'") == "0"


def check_no_secrets(run: Run) -> None:
    text = run.all_journal_lines()
    shown = [secret for secret in SECRETS if secret in text]
    assert not shown, f"the journal shows {shown}"


@dataclass(frozen=True)
class Step:
    after: Callable[[Run], None]
    before: Callable[[Run], None] | None = None


STEPS: dict[str, Step] = {
    "build": Step(after_build),
    "install": Step(after_install),
    "user": Step(after_user),
    "roles": Step(after_roles),
    "settings": Step(after_settings),
    "credentials": Step(after_credentials),
    "units": Step(after_units),
    "start": Step(after_start),
    "reload-set": Step(after_reload_set),
    "reload-unset": Step(after_reload_unset),
    "rotate-key": Step(after_rotate_key, before_rotate_key),
    "web": Step(after_web),
    "upgrade": Step(after_upgrade, before_upgrade),
    "uninstall": Step(after_uninstall, check_no_secrets),
    "drop-database": Step(after_drop_database),
}


def runbook_blocks() -> list[Block]:
    """The page's `sh` blocks, each with an id STEPS knows (else ValueError)."""
    found = [b for b in blocks(PAGE) if b.lang == "sh"]
    unknown = [f"{b.where} (id {b.id})" for b in found if b.id not in STEPS]
    if unknown:
        raise ValueError(f"sh blocks tests/runbook/steps.py does not know: {unknown}")
    if [b.id for b in found] != list(STEPS):
        raise ValueError(f"the page's blocks {[b.id for b in found]} are not STEPS' order")
    return found


# ---- the upgrade's wheel ---------------------------------------------------------------------


def upgrade_wheel() -> Path:
    """This checkout's wheel with the version bumped (VERSION.post1) and one more migration (a
    comment on the schema), standing in for the next release."""
    out = Path(tempfile.mkdtemp(prefix="outbox-runbook-wheel-"))
    source = out / "src"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    pyproject = source / "pyproject.toml"
    text, bumped = re.subn(
        r'^version = "([^"]+)"', r'version = "\1.post1"', pyproject.read_text(), count=1, flags=re.M
    )
    assert bumped == 1, "no version line in pyproject.toml"
    pyproject.write_text(text)
    numbers = [int(p.name[:4]) for p in (source / "migrations").glob("[0-9][0-9][0-9][0-9]_*.sql")]
    migration = source / "migrations" / f"{max(numbers) + 1:04d}_{UPGRADE_MIGRATION}.sql"
    migration.write_text("COMMENT ON SCHEMA outbox IS 'outbox: the runbook upgrade was here';\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("partnero_outbox-*.whl")
    return wheel
