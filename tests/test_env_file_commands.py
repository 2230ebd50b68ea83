"""`outbox migrate` and the operator commands read OUTBOX_DATABASE_URL from OUTBOX_ENV_FILE, as
`outbox run` does (flag, then the file, then the environment): outbox-migrate.service names its
own env file, with the schema owner's URL, and has no EnvironmentFile= to put it in the
environment."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from outbox.cli import main

UNREACHABLE = "postgresql://nobody@127.0.0.1:1/nowhere?connect_timeout=1"


def run(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args, env=env)
    return result.exit_code, result.output


def test_the_env_file_gives_the_database_url(database_url: str, tmp_path: Path) -> None:
    env_file = tmp_path / "migrate.env"
    env_file.write_text(f"# the schema owner\nOUTBOX_DATABASE_URL={database_url}\n")
    env = {"OUTBOX_ENV_FILE": str(env_file), "OUTBOX_DATABASE_URL": UNREACHABLE}
    assert run(["migrate"], env) == (0, "nothing to apply: the schema is up to date\n")
    code, output = run(["status", "--json"], env)
    assert code == 0, output

    # A flag still wins over the file.
    code, output = run(["migrate", "--database-url", UNREACHABLE], env)
    assert code == 1 and output.startswith("outbox: cannot reach the database at "), output


def test_the_environment_is_used_when_the_file_has_no_url(
    database_url: str, tmp_path: Path
) -> None:
    env_file = tmp_path / "outbox.env"
    env_file.write_text("OUTBOX_CONCURRENCY=4\n")
    env = {"OUTBOX_ENV_FILE": str(env_file), "OUTBOX_DATABASE_URL": database_url}
    assert run(["migrate"], env) == (0, "nothing to apply: the schema is up to date\n")


def test_an_unreadable_env_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.env"
    code, output = run(["migrate"], {"OUTBOX_ENV_FILE": str(missing)})
    assert (code, output) == (
        2,
        f"outbox: invalid setting OUTBOX_ENV_FILE (--env-file): cannot read {missing}: "
        "No such file or directory\n",
    )
    bad = tmp_path / "bad.env"
    bad.write_text("OUTBOX_DATABASE_URL\n")
    code, output = run(["status"], {"OUTBOX_ENV_FILE": str(bad)})
    assert (code, output) == (
        2,
        f"outbox: invalid setting OUTBOX_ENV_FILE (--env-file): {bad} line 1 is not KEY=VALUE\n",
    )
