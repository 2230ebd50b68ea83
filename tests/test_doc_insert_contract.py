"""Every fenced block of docs/insert-contract.md, run against a real migrated database.

One test per block, in the page's order; a block of a language this module cannot run fails.
The test server's superuser plays both the administrator who creates roles and the owner of the
`outbox` schema; the application examples run as a login role in the `outbox_app` group, made
by the page's own blocks (create-roles, grant-roles, shop-tables). Roles belong to the whole
cluster, which other runs may share, so every role name of the page is given a suffix of this
run's own (`outbox_app` becomes `outbox_app_1a2b3c4d`, and `outbox roles-sql` gets the matching
`--app-role`/`--daemon-role`), and the roles are dropped afterwards.

- `console` blocks are transcripts: each `$ ` command runs in a shell (psql is the test's psql);
  what it writes to stderr must appear in the block as one run of lines, and the block's other
  lines must be what it writes to stdout (LOCATION's source line number aside).
- `sql` blocks run through psql (`as=owner` or `as=admin`: as the superuser, else as the app
  role); `file=NAME` blocks are files the transcripts use; `sh` blocks run in bash.
- Programs (Python, Node, Go, PHP, Ruby, Java) run with their toolchain, which a developer's
  machine may lack: then they are skipped, unless OUTBOX_DOC_EXAMPLES_REQUIRED=1 (CI), where a
  missing toolchain fails. The trailing comment of a line that prints is what it must print; the
  rows the program leaves in outbox.events and orders are compared with EXPECTED_ROWS. A Ruby or
  Java block without its own connection is a fragment: it runs with `conn` connected.
- The Go example is written for pgx v5; Debian 12 packages v4, so REWRITE_GO_V5_TO_V4 applies.
- The `json` block is the body the daemon sends for its `from=` block's row: the daemon runs
  against the fake Partnero and the body it received is compared, key order included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg.conninfo import conninfo_to_dict

from outbox import db
from outbox.dev import pgtemp
from outbox.dev.fake_partnero import FakeConfig, FakePartneroThread
from tests import doc_blocks
from tests.daemon_helpers import API_KEY, DaemonThread, make_settings, wait_until
from tests.helpers import psql_binary
from tests.pg_proxy import PoolerProxy

DOCUMENT = "docs/insert-contract.md"
BLOCKS = doc_blocks.blocks(DOCUMENT)
REQUIRED = os.environ.get("OUTBOX_DOC_EXAMPLES_REQUIRED") == "1"
# The blocks the module fixture runs first, in this order, since every other block needs them.
SETUP = ("create-roles", "grant-roles", "shop-tables")
GOPATH = "/usr/share/gocode"  # where Debian's golang-*-dev packages put their sources
JDBC_JAR = "/usr/share/java/postgresql.jar"  # Debian's libpostgresql-jdbc-java
NODE_MODULES = "/usr/share/nodejs"  # where Debian's node-* packages put their modules
REWRITE_GO_V5_TO_V4 = (
    ('"github.com/jackc/pgx/v5/pgxpool"', '"github.com/jackc/pgx/v4/pgxpool"'),
    ('"github.com/jackc/pgx/v5/pgconn"', '"github.com/jackc/pgconn"'),
    ("pgxpool.New(", "pgxpool.Connect("),
)
RUN_TIMEOUT = 120  # a cold Go build of pgx takes a while on a busy machine

Row = tuple[Any, ...]

# What the examples of section 3 leave behind: a first purchase with its signup, its refund, and
# a refused sale that took its order with it.
FIRST_PURCHASE_AND_REFUND: dict[str, list[Row]] = {
    "events": [
        (
            "signup",
            None,
            "cust_42",
            None,
            None,
            {"email": "jane@example.com", "partner": {"key": "partner_7"}},
        ),
        ("sale", "inv_1001", "cust_42", Decimal("99.99"), "EUR", {"product_id": "prod_123"}),
        ("refund", "inv_1001", None, None, None, None),
    ],
    "orders": [("inv_1001", "cust_42", Decimal("99.99"), True)],
}

EXPECTED_ROWS: dict[str, dict[str, list[Row]]] = {
    "psql-example": {
        "events": [
            *FIRST_PURCHASE_AND_REFUND["events"][:1],
            (
                "sale",
                "inv_1001",
                "cust_42",
                Decimal("99.99"),
                "EUR",
                {"product_id": "prod_123", "product_type": "monthly"},
            ),
            ("refund", "inv_1001", None, None, None, None),
            ("signup", None, "cust_43", None, None, {"email": "joe@example.com"}),
            ("sale", "inv_1002", "cust_42", Decimal("25.00"), "EUR", {"product_id": "prod_7"}),
            ("refund", "inv_1002", None, None, None, None),
        ],
        "orders": [
            ("inv_1001", "cust_42", Decimal("99.99"), True),
            ("inv_1002", "cust_42", Decimal("25.00"), True),
        ],
    },
    "python-example": FIRST_PURCHASE_AND_REFUND,
    "node-example": FIRST_PURCHASE_AND_REFUND,
    "go-example": FIRST_PURCHASE_AND_REFUND,
    "php-example": FIRST_PURCHASE_AND_REFUND,
    "ruby-example": FIRST_PURCHASE_AND_REFUND,
    "java-example": FIRST_PURCHASE_AND_REFUND,
    # The pitfall is real: a Hash parameter is stored as NULL, without an error.
    "ruby-pitfall": {
        "events": [
            ("sale", "inv_1003", "cust_42", Decimal("10.00"), None, None),
            ("sale", "inv_1004", "cust_42", Decimal("10.00"), None, {"product_id": "prod_7"}),
        ],
        "orders": [],
    },
    "java-pitfall": {
        "events": [
            ("sale", "inv_1004", "cust_42", Decimal("10.00"), None, {"product_id": "prod_7"}),
        ],
        "orders": [],
    },
    "merge-sale": {
        "events": [
            (
                "sale",
                "inv_A",
                "cust_42",
                Decimal("99.90"),
                "EUR",
                {
                    "product_id": "prod_1",
                    "options": {"create_customer": True},
                    "created_at": 1767225600,
                    "customer": {"email": "a@example.com", "partner": {"key": "partner_7"}},
                },
            )
        ],
        "orders": [],
    },
}


def url_as(url: str, user: str, password: str | None = None) -> str:
    parsed = sa.engine.make_url(db.sqlalchemy_url(url)).set(username=user, password=password)
    return db.libpq_url(parsed.render_as_string(hide_password=False))


# The role names the page uses; each run renames them with a suffix of its own.
ROLES = ("shop_app", "outbox_app", "outbox_daemon", "outbox_operator")


@dataclass
class Page:
    """The database the page's blocks run against, and the names they use there."""

    owner_url: str
    suffix: str
    work: Path
    login_password: str = field(default_factory=lambda: uuid.uuid4().hex)
    jdbc_address: str = ""  # host:port for JDBC, which cannot use a Unix socket

    def name(self, role: str) -> str:
        return f"{role}_{self.suffix}"

    def localize(self, text: str) -> str:
        """The page's text with this run's role names."""
        for role in ROLES:
            text = re.sub(rf"\b{role}\b", self.name(role), text)
        return text.replace(
            "outbox roles-sql",
            f"outbox roles-sql --app-role {self.name('outbox_app')} "
            f"--daemon-role {self.name('outbox_daemon')} "
            f"--operator-role {self.name('outbox_operator')}",
        )

    @property
    def app_url(self) -> str:
        return url_as(self.owner_url, self.name("shop_app"), self.login_password)

    def environ(self) -> dict[str, str]:
        """The connection settings the examples read, for the app role (section 3)."""
        url = sa.engine.make_url(db.sqlalchemy_url(self.app_url))
        info = conninfo_to_dict(self.app_url)
        host, port, name = info.get("host", "localhost"), info.get("port", 5432), info["dbname"]
        user, password = self.name("shop_app"), self.login_password
        bin_dirs = [str(Path(psql_binary()).parent), str(Path(sys.executable).parent)]
        return {
            **os.environ,
            "PATH": os.pathsep.join([*bin_dirs, os.environ.get("PATH", "")]),
            "OWNER_URL": self.owner_url,
            "DATABASE_URL": self.app_url,
            "SQLALCHEMY_DATABASE_URL": url.set(drivername="postgresql+psycopg").render_as_string(
                hide_password=False
            ),
            "DB_DSN": f"pgsql:host={host};port={port};dbname={name}",
            "JDBC_URL": f"jdbc:postgresql://{self.jdbc_address}/{name}?sslmode=disable",
            "DB_USER": user,
            "DB_PASSWORD": password,
            "PGCONNECT_TIMEOUT": "10",
        }

    def owner(self, sql: str, *params: Any) -> list[Row]:
        with psycopg.connect(self.owner_url, autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return list(cur.fetchall()) if cur.description else []

    def reset(self) -> None:
        """Empty the outbox and the shop's tables, so that each example starts alike."""
        self.owner("TRUNCATE outbox.events, orders, customers CASCADE")

    def rows(self) -> dict[str, list[Row]]:
        return {
            "events": self.owner(
                "SELECT event_type, transaction_key, customer_key, amount, currency, payload "
                "FROM outbox.events ORDER BY id"
            ),
            "orders": self.owner("SELECT id, customer_id, total, refunded FROM orders ORDER BY id"),
        }


def by_id(block_id: str) -> doc_blocks.Block:
    found = [b for b in BLOCKS if b.id == block_id]
    assert len(found) == 1, f"{DOCUMENT} has {len(found)} blocks with id={block_id}"
    return found[0]


def run(
    argv: list[str], env: dict[str, str], cwd: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        input=stdin,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def succeeded(result: subprocess.CompletedProcess[str], block: doc_blocks.Block) -> str:
    assert result.returncode == 0, (
        f"{block.where} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


def run_psql(page: Page, block: doc_blocks.Block) -> None:
    as_ = block.directives.get("as", "app")
    assert as_ in ("app", "owner", "admin"), f"{block.where}: as={as_} is not app, owner or admin"
    url = page.app_url if as_ == "app" else page.owner_url
    argv = [psql_binary(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url]
    succeeded(run(argv, page.environ(), page.work, stdin=page.localize(block.text)), block)


def run_setup(page: Page) -> None:
    for block_id in SETUP:
        block = by_id(block_id)
        if block.lang == "sh":
            argv = ["bash", "-euo", "pipefail", "-c", page.localize(block.text)]
            succeeded(run(argv, page.environ(), page.work), block)
        else:
            run_psql(page, block)
        if block_id == "create-roles":  # the page's password is a placeholder
            page.owner(f"ALTER ROLE {page.name('shop_app')} PASSWORD '{page.login_password}'")


@pytest.fixture(scope="module")
def page(
    databases: pgtemp.DatabaseFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Page]:
    url = databases.create_migrated()
    page = Page(url, uuid.uuid4().hex[:8], tmp_path_factory.mktemp("doc"))
    info = conninfo_to_dict(url)
    try:
        run_setup(page)
        if str(info.get("host", "")).startswith("/"):  # the embedded server: a socket only
            with PoolerProxy(url, drop_notifications=False) as tcp:
                page.jdbc_address = f"127.0.0.1:{tcp.port}"
                yield page
        else:
            page.jdbc_address = f"{info.get('host', 'localhost')}:{info.get('port', 5432)}"
            yield page
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            for role in ROLES:
                name = page.name(role)
                if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
                    conn.execute(f"DROP OWNED BY {name}")
                    conn.execute(f"DROP ROLE {name}")
        databases.drop(url)


# ----------------------------------------------------------------------------- transcripts


def normalize(line: str) -> str:
    return re.sub(r"pl_exec\.c:\d+", "pl_exec.c:N", line.rstrip())


def commands(block: doc_blocks.Block) -> list[tuple[str, list[str]]]:
    """The `$ ` commands of a transcript with the lines shown after each."""
    found: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            found.append((line[2:], []))
        else:
            assert found, f"{block.where}: a transcript starts with a `$ ` command"
            found[-1][1].append(normalize(line))
    return found


def check_transcript(page: Page, block: doc_blocks.Block) -> None:
    for name, text in files_for(block).items():
        (page.work / name).write_text(text)
    for command, shown in commands(block):
        argv = ["bash", "-c", page.localize(command)]
        result = run(argv, page.environ(), page.work)
        err = [normalize(line) for line in result.stderr.splitlines()]
        out = [normalize(line) for line in result.stdout.rstrip("\n").splitlines()]
        starts = [i for i in range(len(shown) + 1) if shown[i : i + len(err)] == err]
        assert err and starts, (
            f"{block.where}: `{command}` wrote to stderr\n" + "\n".join(err) + "\n"
            "which the page does not show as one run of lines:\n" + "\n".join(shown)
        )
        rest = shown[: starts[0]] + shown[starts[0] + len(err) :]
        assert rest == out, f"{block.where}: `{command}` printed\n" + "\n".join(out)


def files_for(block: doc_blocks.Block) -> dict[str, str]:
    """The page's `file=` blocks a transcript's commands name."""
    files = {b.directives["file"]: b.text for b in BLOCKS if "file" in b.directives}
    return {name: text for name, text in files.items() if name in block.text}


# ------------------------------------------------------------------------------- programs

PRINTS = {
    "python": (r"\bprint\(", "#"),
    "js": (r"\bconsole\.log\(", "//"),
    "go": (r"\bfmt\.Println\(", "//"),
    "php": (r"\becho\b", "//"),
    "ruby": (r"\bputs\b", "#"),
    "java": (r"\bSystem\.out\.println\(", "//"),
}
APT = {
    "js": "node-pg (or: apt-get download node-pg node-split2 node-xtend, unpack, set NODE_PATH)",
    "go": "golang-go golang-github-jackc-pgx-v4-dev",
    "php": "php-cli php-pgsql",
    "ruby": "ruby ruby-pg",
    "java": "default-jdk-headless libpostgresql-jdbc-java",
}


def expected_prints(block: doc_blocks.Block) -> list[str]:
    """What the block prints: the trailing comment of each line that prints."""
    call, marker = PRINTS[block.lang]
    expected = []
    for number, line in enumerate(block.text.splitlines(), start=block.line + 1):
        found = re.search(call, line)
        if found is None:
            continue
        _, sep, comment = line[found.start() :].partition(f" {marker} ")
        assert sep, f"{DOCUMENT}:{number}: a line that prints has no comment saying what"
        expected.append(comment.strip())
    return expected


def node_path() -> str:
    return os.pathsep.join(p for p in (os.environ.get("NODE_PATH"), NODE_MODULES) if p)


def probe(argv: list[str], env: dict[str, str] | None = None) -> bool:
    if shutil.which(argv[0]) is None:
        return False
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    return result.returncode == 0


_MISSING: dict[str, str | None] = {}


def missing_toolchain(lang: str) -> str | None:
    """Why the block's language cannot run here, or None when it can."""
    if lang not in _MISSING:
        checks: dict[str, Callable[[], bool]] = {
            "python": lambda: True,
            "js": lambda: probe(
                ["node", "-e", "require.resolve('pg')"], {**os.environ, "NODE_PATH": node_path()}
            ),
            "go": lambda: (
                shutil.which("go") is not None
                and Path(GOPATH, "src/github.com/jackc/pgx/v4/pgxpool").is_dir()
            ),
            "php": lambda: probe(["php", "-r", "exit(extension_loaded('pdo_pgsql') ? 0 : 1);"]),
            "ruby": lambda: probe(["ruby", "-e", "require 'pg'"]),
            "java": lambda: shutil.which("java") is not None and Path(JDBC_JAR).is_file(),
        }
        _MISSING[lang] = None if checks[lang]() else f"apt-get install {APT[lang]}"
    return _MISSING[lang]


def need_toolchain(block: doc_blocks.Block) -> None:
    reason = missing_toolchain(block.lang)
    if reason is None:
        return
    message = f"{block.where}: no toolchain for {block.lang} here ({reason})"
    if REQUIRED:
        pytest.fail(f"{message}, and OUTBOX_DOC_EXAMPLES_REQUIRED=1")
    pytest.skip(message)


def java_source(block: doc_blocks.Block) -> tuple[str, str]:
    """(file name, source): a fragment runs in a main() with `conn` connected."""
    if "public class" in block.text:
        name = re.search(r"public class (\w+)", block.text)
        assert name is not None
        return f"{name[1]}.java", block.text
    body = "\n".join(f"            {line}" for line in block.text.splitlines())
    return "Fragment.java", (
        "import java.sql.*;\nimport org.postgresql.util.PGobject;\n\n"
        "public class Fragment {\n"
        "    public static void main(String[] args) throws Exception {\n"
        "        try (Connection conn = DriverManager.getConnection(\n"
        '                System.getenv("JDBC_URL"), System.getenv("DB_USER"),\n'
        '                System.getenv("DB_PASSWORD"))) {\n'
        f"{body}\n"
        "        }\n    }\n}\n"
    )


def program(page: Page, block: doc_blocks.Block, work: Path) -> list[str]:
    """Write the block where its toolchain wants it; the command that runs it."""
    text = page.localize(block.text)
    if block.lang == "python":
        (work / "example.py").write_text(text)
        return [sys.executable, "example.py"]
    if block.lang == "js":
        (work / "example.js").write_text(text)
        return ["node", "example.js"]
    if block.lang == "php":
        (work / "example.php").write_text(text)
        return ["php", "example.php"]
    if block.lang == "ruby":
        if "PG.connect" not in text:
            text = (
                "require 'json'\nrequire 'pg'\nconn = PG.connect(ENV.fetch('DATABASE_URL'))\n"
                + text
            )
        (work / "example.rb").write_text(text)
        return ["ruby", "example.rb"]
    if block.lang == "java":
        name, source = java_source(block)
        (work / name).write_text(page.localize(source))
        return ["java", "-cp", JDBC_JAR, name]
    assert block.lang == "go"
    for v5, v4 in REWRITE_GO_V5_TO_V4:
        assert v5 in text, f"{block.where}: the v4 rewrite expects {v5}"
        text = text.replace(v5, v4)
    (work / "main.go").write_text(text)
    build = ["go", "build", "-o", "example", "main.go"]
    succeeded(run(build, go_environ(page), work), block)
    return ["./example"]


def go_environ(page: Page) -> dict[str, str]:
    env = {**page.environ(), "GOPATH": GOPATH, "GO111MODULE": "off", "GOFLAGS": ""}
    env.setdefault("GOCACHE", str(Path.home() / ".cache" / "go-build"))
    return env


def expected_rows(block: doc_blocks.Block) -> dict[str, list[Row]]:
    expected = EXPECTED_ROWS.get(block.id or "")
    assert expected is not None, f"{block.where}: EXPECTED_ROWS has nothing for this block"
    return expected


def check_program(page: Page, block: doc_blocks.Block) -> None:
    need_toolchain(block)
    expected = expected_rows(block)
    work = page.work / (block.id or f"line{block.line}")
    work.mkdir(exist_ok=True)
    page.reset()
    argv = program(page, block, work)
    env = go_environ(page) if block.lang == "go" else page.environ()
    env["NODE_PATH"] = node_path()
    printed = succeeded(run(argv, env, work), block).splitlines()
    assert printed == expected_prints(block), f"{block.where} printed {printed}"
    assert page.rows() == expected


def check_sql(page: Page, block: doc_blocks.Block) -> None:
    if "file" in block.directives:
        users = [b for b in BLOCKS if b.lang == "console" and block.directives["file"] in b.text]
        assert users, f"{block.where}: no transcript uses file={block.directives['file']}"
        return
    page.reset()
    run_psql(page, block)
    if block.directives.get("as", "app") == "app":
        assert page.rows() == expected_rows(block)


def check_body(page: Page, block: doc_blocks.Block) -> None:
    """The daemon's POST body for the row of the `from=` block, as the fake Partnero got it."""
    source = by_id(block.directives["from"])
    check_sql(page, source)
    (key,) = {row[1] for row in expected_rows(source)["events"]}
    with (
        FakePartneroThread(FakeConfig(api_key=API_KEY)) as fake,
        DaemonThread(make_settings(page.owner_url, fake.url)),
    ):
        entry = wait_until(
            lambda: next((t for t in fake.ledger() if t["key"] == key), None),
            what=f"the sale {key} at the fake Partnero",
        )
    assert json.dumps(entry["body"]) == json.dumps(json.loads(block.text))


def check_setup(page: Page, block: doc_blocks.Block) -> None:
    """The module fixture ran the block; here, what it left."""
    if block.id == "create-roles":
        assert page.owner(
            "SELECT pg_has_role(%s, %s, 'MEMBER'), r.rolcanlogin FROM pg_roles r "
            "WHERE r.rolname = %s",
            page.name("shop_app"),
            page.name("outbox_app"),
            page.name("outbox_app"),
        ) == [(True, False)]
    elif block.id == "grant-roles":  # idempotent: again, as after every migrate
        argv = ["bash", "-euo", "pipefail", "-c", page.localize(block.text)]
        succeeded(run(argv, page.environ(), page.work), block)
    else:
        assert page.owner("SELECT to_regclass('orders'), to_regclass('customers')") == [
            ("orders", "customers")
        ]


RUNNERS: dict[str, Callable[[Page, doc_blocks.Block], None]] = {
    "console": check_transcript,
    "sql": check_sql,
    "json": check_body,
    **dict.fromkeys(PRINTS, check_program),
}


def block_name(block: doc_blocks.Block) -> str:
    return f"{block.id or block.directives.get('file') or block.lang}-line{block.line}"


@pytest.mark.parametrize("block", BLOCKS, ids=[block_name(b) for b in BLOCKS])
def test_every_block_of_the_page_runs(page: Page, block: doc_blocks.Block) -> None:
    if block.skip:
        lines = DOCUMENT_TEXT.splitlines()[max(0, block.line - 12) : block.line]
        assert "not run in CI" in "\n".join(lines), f"{block.where}: say 'not run in CI' above it"
        pytest.skip(f"{block.where}: {block.skip}")
    if block.id in SETUP:
        check_setup(page, block)
        return
    runner = RUNNERS.get(block.lang)
    if runner is None:
        pytest.fail(f"{block.where}: no runner for a ```{block.lang} block: add one or skip=")
    runner(page, block)


DOCUMENT_TEXT = (doc_blocks.ROOT / DOCUMENT).read_text(encoding="utf-8")


def test_the_python_helper_refuses_a_list_payload_as_the_page_says(page: Page) -> None:
    import outbox

    said = re.search(r"raises `TypeError` \(`([^`]+)`\)", " ".join(DOCUMENT_TEXT.split()))
    assert said is not None
    engine = db.create_engine(page.app_url, poolclass=sa.NullPool)
    try:
        with pytest.raises(TypeError) as refused, engine.begin() as conn:
            outbox.record_sale(
                conn,
                transaction_key="inv_9",
                customer_key="c",
                amount=1,
                payload=[1, 2],
            )
    finally:
        engine.dispose()
    assert str(refused.value) == said[1]
