"""The command line starts cold and light: `outbox --help` and an operator command's help import
neither the daemon, nor the fake Partnero or the demo, nor an HTTP or database library; and the
help the group shows for a command it has not imported is that command's own."""

from __future__ import annotations

import importlib
import subprocess
import sys

import click
import pytest

from outbox.cli import LAZY_COMMANDS, main

HEAVY = (
    "outbox.daemon",
    "outbox.dev",
    "outbox.delivery",
    "aiohttp",
    "httpx",
    "sqlalchemy",
    "psycopg",
)


def imported_after(code: str) -> list[str]:
    probe = (
        f"{code}\nimport sys\nprint('\\n'.join(m for m in sys.modules if m.startswith({HEAVY!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout.split()


def test_importing_the_cli_imports_nothing_heavy() -> None:
    assert imported_after("import outbox.cli") == []


def test_the_group_help_and_an_operator_commands_help_import_nothing_heavy() -> None:
    code = (
        "from click.testing import CliRunner\nfrom outbox.cli import main\n"
        "r = CliRunner()\n"
        "assert r.invoke(main, ['--help']).exit_code == 0\n"
        "assert r.invoke(main, ['status', '--help']).exit_code == 0\n"
        "assert r.invoke(main, ['retry', '--help']).exit_code == 0"
    )
    assert imported_after(code) == []


@pytest.mark.parametrize("name", sorted(LAZY_COMMANDS))
def test_a_lazy_commands_listed_help_is_its_own(name: str) -> None:
    module, attribute, short_help = LAZY_COMMANDS[name]
    command = getattr(importlib.import_module(module), attribute)
    assert isinstance(command, click.Command) and command.name == name
    assert command.get_short_help_str(limit=1000) == short_help
    assert main.get_command(click.Context(main), name) is command
