"""Every block of docs/operations.md and README.md is run, or says why not (issue 14).

A `console` block is a transcript: its commands run for real against a database in the state
the transcript shows, built by the scenario in tests/doc_operations/scenario.py, and what they
print is compared with the document (tests/doc_operations/runner.py says how: exit status, every
word with the numbers normalised, JSON by keys and types). A `sql` or `python` block runs as
written. A `text` block is output or a listing: nothing to run. Any other block must carry
`<!-- doc-test skip="why" -->` and say "not run" where a reader sees it. A block the scenario
does not run fails here, so a transcript added to a document cannot go unchecked.

When a doc and the code disagree and the code is right: OUTBOX_DOC_REWRITE=1 with this file
rewrites the transcripts with what the commands print now; read the diff before committing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from outbox.dev import pgtemp
from tests.doc_blocks import ROOT, Block, blocks
from tests.doc_operations import runner as docrun
from tests.doc_operations import scenario
from tests.helpers import psql_binary

DOCS = [ROOT / "docs" / "operations.md", ROOT / "README.md"]
RUN = {"console", "sql", "python"}
NOT_RUN = {"text"}  # what a command printed, or a listing
BLOCKS = [block for doc in DOCS for block in blocks(doc)]


@pytest.fixture(scope="module")
def runs(
    databases: pgtemp.DatabaseFactory, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, docrun.Ran]:
    workdir = tmp_path_factory.mktemp("doc_operations")
    bindir = workdir / "bin"
    bindir.mkdir()
    (bindir / "psql").symlink_to(psql_binary())
    (bindir / "outbox").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m outbox.cli "$@"\n')
    (bindir / "outbox").chmod(0o755)
    runner = docrun.Runner(BLOCKS, workdir, bindir)
    scenario.session_a(runner, databases)
    scenario.session_b(runner, databases)
    scenario.session_r(runner, databases)
    scenario.readme(runner, databases)
    if docrun.REWRITE:
        for doc in DOCS:
            docrun.rewrite(
                doc, [r for r in runner.ran.values() if r.block.path == doc and r.commands]
            )
    return runner.ran


def visible_near(block: Block, words: str) -> bool:
    """The words are in the prose just before or after the block."""
    lines = Path(block.path).read_text(encoding="utf-8").splitlines()
    end = block.line + len(block.text.splitlines())
    around = lines[max(0, block.line - 8) : block.line - 1] + lines[end + 1 : end + 8]
    return words in " ".join(" ".join(around).split()).lower()


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.where)
def test_every_block_runs_or_says_why_not(block: Block, request: pytest.FixtureRequest) -> None:
    if block.skip:
        assert block.skip.strip(), f"{block.where}: an empty skip reason"
        assert visible_near(block, "not run"), f"{block.where}: say 'not run' (and why) on the page"
        return
    assert block.lang in RUN | NOT_RUN, (
        f"{block.where}: a block of language {block.lang!r}: give it one of "
        f"{sorted(RUN | NOT_RUN)}, or a doc-test skip with the reason"
    )
    if block.lang in NOT_RUN:
        return
    runs: dict[str, docrun.Ran] = request.getfixturevalue("runs")
    assert block.where in runs, f"{block.where}: the scenario does not run this block"
    if docrun.REWRITE:
        pytest.skip("transcripts rewritten: run again to compare")
    problems = [
        f"$ {command.line}\n{problem}"
        for command in runs[block.where].commands
        for problem in docrun.compare(command)
    ]
    assert not problems, f"{block.where}:\n" + "\n\n".join(problems)


def _command(line: str, documented: str, printed: str, code: int = 0) -> docrun.Command:
    (command,) = docrun.parse_transcript(f"$ {line}\n{documented}")
    command.output, command.exit_code = printed, code
    return command


def test_the_comparison_ignores_what_varies_and_sees_the_rest() -> None:
    documented = (
        "id  type  key       age  reason\n"
        "52  sale  INV-1042   3s  HTTP 422: The given data wa…\n"
        "recorded  2026-11-21 16:53:50 UTC (9s ago) by vm:17396\n"
        "[exit 1]"
    )
    printed = (
        "id  type  key       age    reason\n"
        "7   sale  INV-1042  1m01s  HTTP 422: The given…\n"
        "recorded  2026-11-30 09:01:02 UTC (1m01s ago)\nby vm:4\n"
    )
    assert docrun.compare(_command("outbox failed", documented, printed, 1)) == []
    assert docrun.compare(_command("outbox failed", documented, printed, 0)) == [
        "exit 0, the doc says 1"
    ]
    renamed = printed.replace("reason", "why")
    assert docrun.compare(_command("outbox failed", documented, renamed, 1))
    moved = printed.replace("sale  INV-1042", "INV-1042  sale")
    assert docrun.compare(_command("outbox failed", documented, moved, 1))


def test_json_is_compared_by_keys_in_order_and_types() -> None:
    documented = '{"ok": false, "count": 2, "at": "2026-11-21T16:54:14.058334+00:00", "rows": []}'
    same = '{"ok": false, "count": 7, "at": "2026-11-30T01:02:03.000001+00:00", "rows": []}'
    assert docrun.compare(_command("outbox x --json", documented, same)) == []
    for printed in [
        '{"ok": false, "count": 2, "at": "2026-11-21T16:54:14+00:00"}',  # a key missing
        '{"ok": false, "at": "2026-11-21T16:54:14+00:00", "count": 2, "rows": []}',  # order
        '{"ok": false, "count": "2", "at": "2026-11-21T16:54:14+00:00", "rows": []}',  # type
        '{"ok": true, "count": 2, "at": "2026-11-21T16:54:14+00:00", "rows": []}',  # a boolean
    ]:
        assert docrun.compare(_command("outbox x --json", documented, printed)), printed


def test_the_modules_the_readme_lists_exist() -> None:
    """README.md's module listing: each path it names (a top-level path, or a file under the
    directory above it) is in the repository."""
    (listing,) = [b for b in blocks(ROOT / "README.md") if b.lang == "text"]
    folder, missing = ROOT, []
    for line in listing.text.splitlines():
        if not line.strip() or len(line) - len(line.lstrip()) > 4:
            continue  # a description's second line
        name = line.split()[0]
        if not line.startswith(" "):
            path = ROOT / name
            folder = path if name.endswith("/") else folder
        else:
            path = folder / name
        if not path.exists():
            missing.append(name)
    assert not missing, f"{listing.where}: no such file or directory: {missing}"
