"""Run the transcripts of a markdown document and compare them with what the code prints.

A `console` block is a transcript: `$ COMMAND` lines, each followed by what it printed and, when
it did not exit 0, `[exit N]`. `Runner.transcript` runs each command for real (an `outbox ...`
command in this process through click's runner, anything else in bash; a block marked
`process=1` runs `outbox` as a process of its own, where the process boundary matters) and
records what it printed; `compare` then checks a recorded run against the document. Ids, times,
ages, durations and process ids differ from run to run, so both sides are normalised first
(`tokens`): what stays is every word, in order, with the numbers replaced, and the exit status.
`--json` output is compared by shape: the same keys in the same order at every level, the same
types, the same strings once normalised, the same booleans.

With OUTBOX_DOC_REWRITE=1 the documents are rewritten with what the commands printed, so a doc
that disagrees with the code can be brought up to date in one run (then read the diff: a change
there is a change users see).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from outbox.cli import main
from tests.doc_blocks import Block

REWRITE = os.environ.get("OUTBOX_DOC_REWRITE") == "1"
ELIDED = "..."  # a transcript's output may start with this: "the lines above are not shown"
_EXIT = re.compile(r"^\[exit (\d+)\]$")
_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


@dataclass
class Command:
    line: str  # without the "$ "
    expected: list[str]  # the documented output lines, without [exit N]
    expected_exit: int
    output: str = ""
    exit_code: int | None = None


@dataclass
class Ran:
    block: Block
    commands: list[Command] = field(default_factory=list)


def parse_transcript(text: str) -> list[Command]:
    commands: list[Command] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            commands.append(Command(line[2:], [], 0))
        elif not commands:
            raise ValueError(f"a transcript starts with {line!r}, not a $ command")
        else:
            commands[-1].expected.append(line)
    for command in commands:
        while command.expected and not command.expected[-1].strip():
            command.expected.pop()
        if command.expected and (match := _EXIT.match(command.expected[-1])):
            command.expected.pop()
            command.expected_exit = int(match[1])
    return commands


# ---- normalising -------------------------------------------------------------------------------

_HOST = socket.gethostname()
_RULES = [
    # a time, ISO or as the tables print it, to the second or finer, with or without an offset
    (
        re.compile(
            r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}(?::?\d{2})?)?"
        ),
        "<time>",
    ),
    (re.compile(r"\b(?:\d+[dhm])*\d+[dhms]\b"), "<age>"),  # 2s, 1m01s, 3d
    (re.compile(r"\d+"), "0"),  # ids, counts, amounts, pids, durations
]


_RULE = re.compile(r"^[-+─]+$")


def _cut_cells(line: str) -> str:
    """A table cell cut to its column (`…`) keeps only its first word: where the cut falls
    depends on the widths of the other columns, which depend on the ages printed."""
    cells = re.split(r"(\s{2,})", line)
    return "".join(cell.split()[0] + "…" if "…" in cell else cell for cell in cells)


def normal_lines(text: str) -> list[str]:
    if _HOST != "vm":
        text = text.replace(f"@{_HOST}", "@vm").replace(f"{_HOST}:", "vm:")
    lines = []
    for line in text.splitlines():
        if _RULE.match(line):  # a table's rule: its width is the columns'
            lines.append("<rule>")
            continue
        line = _cut_cells(line)
        for pattern, replacement in _RULES:
            line = pattern.sub(replacement, line)
        lines.append(" ".join(line.split()))
    return _collapse_repeats([line for line in lines if line])


def _collapse_repeats(lines: list[str]) -> list[str]:
    """Consecutive repeats of a group of up to 3 lines count once: the number of retries a row
    went through in a grace period, say, depends on timing; what each call looks like does not."""
    out: list[str] = []
    for line in lines:
        out.append(line)
        for size in (1, 2, 3):
            if len(out) >= 2 * size and out[-size:] == out[-2 * size : -size]:
                del out[-size:]
                break
    return out


def tokens(text: str) -> list[str]:
    """The words of an output, normalised, wrapping undone."""
    return " ".join(normal_lines(text)).split()


def shape(value: Any) -> Any:
    """A JSON value with what varies between runs taken out: key order and types kept, strings
    normalised, numbers reduced to their type, booleans and null kept."""
    if isinstance(value, dict):
        return [(key, shape(item)) for key, item in value.items()]
    if isinstance(value, list):
        out: list[Any] = []
        for item in (shape(item) for item in value):
            if not out or out[-1] != item:
                out.append(item)
        return ["list", *out]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return type(value).__name__
    return " ".join(tokens(str(value)))


# ---- comparing ---------------------------------------------------------------------------------


def compare(command: Command) -> list[str]:
    """What differs between the documented output of a command and the recorded one."""
    problems = []
    if command.exit_code != command.expected_exit:
        problems.append(f"exit {command.exit_code}, the doc says {command.expected_exit}")
    expected = "\n".join(command.expected)
    actual = command.output
    if command.expected[:1] == [ELIDED]:
        expected, actual = _after_elision(command.expected, actual)
    if _is_json(command):
        try:
            got = json.loads(actual)
        except ValueError:
            return [*problems, f"not JSON: {actual!r}"]
        if shape(json.loads(expected)) != shape(got):
            problems.append(_json_difference(json.loads(expected), got))
    elif tokens(expected) != tokens(actual):
        problems.append(_text_difference(expected, actual))
    return problems


def _is_json(command: Command) -> bool:
    return "--json" in shlex.split(command.line) and command.expected_exit in (0, 1)


def _after_elision(expected: list[str], actual: str) -> tuple[str, str]:
    """`...` then lines: the recorded output from the first of those lines on."""
    rest = expected[1:]
    lines = actual.splitlines()
    start = next((n for n, line in enumerate(lines) if rest and line == rest[0]), len(lines))
    return "\n".join(rest), "\n".join(lines[start:])


def _text_difference(expected: str, actual: str) -> str:
    want, got = normal_lines(expected), normal_lines(actual)
    for n, (a, b) in enumerate(zip(want, got, strict=False)):
        if a != b:
            return f"line {n + 1} normalised:\n  doc:  {a}\n  code: {b}\n\ncode printed:\n{actual}"
    counts = f"the doc has {len(want)} lines, the code {len(got)} (normalised)"
    return f"{counts}\n\ncode printed:\n{actual}"


def _json_difference(expected: Any, actual: Any, path: str = "$") -> str:
    if isinstance(expected, dict) and isinstance(actual, dict):
        if list(expected) != list(actual):
            return f"{path}: keys {list(expected)} in the doc, {list(actual)} in the code"
        for key in expected:
            if shape(expected[key]) != shape(actual[key]):
                return _json_difference(expected[key], actual[key], f"{path}.{key}")
    if isinstance(expected, list) and isinstance(actual, list):
        for n, (a, b) in enumerate(zip(expected, actual, strict=False)):
            if shape(a) != shape(b):
                return _json_difference(a, b, f"{path}[{n}]")
    return f"{path}: {json.dumps(expected)} in the doc, {json.dumps(actual)} in the code"


# ---- running -----------------------------------------------------------------------------------


class Runner:
    """Runs the blocks of documents for a scenario, keeping what each command printed."""

    def __init__(self, blocks: list[Block], workdir: Path, bindir: Path) -> None:
        self.by_id = {b.id: b for b in blocks if b.id}
        self.ran: dict[str, Ran] = {}
        self.workdir = workdir
        self.bindir = bindir
        self.env: dict[str, str | None] = {}

    def block(self, block_id: str) -> Block:
        return self.by_id[block_id]

    def transcript(
        self, block_id: str, before: Mapping[str | int, Callable[[], object]] | None = None
    ) -> Ran:
        """Run every command of a console block; `before` maps a piece of a command line (the
        first command holding it), or a command's index, to what must happen first (the
        scenario's next step, or waiting for the daemon)."""
        block = self.block(block_id)
        assert block.lang == "console", f"{block.where}: {block_id} is not a console block"
        pending = dict(before or {})
        process = block.directives.get("process") == "1"  # `outbox` as a process of its own
        ran = Ran(block, parse_transcript(block.text))
        for index, command in enumerate(ran.commands):
            due = [p for p in pending if p == index or (isinstance(p, str) and p in command.line)]
            for piece in due:
                pending.pop(piece)()
            command.exit_code, command.output = self.run(command.line, process)
        assert not pending, f"{block.where}: no command holds {list(pending)}"
        self.ran[block.where] = ran
        return ran

    def mark_run(self, block_id: str) -> Block:
        block = self.block(block_id)
        self.ran[block.where] = Ran(block)
        return block

    def run(self, line: str, process: bool = False) -> tuple[int, str]:
        words = shlex.split(line)
        assignments = {}
        while words and _ASSIGNMENT.match(words[0]):
            name, _, value = words.pop(0).partition("=")
            assignments[name] = value
        if words[:1] == ["outbox"] and not process and not {"|", "&&", ";", ">"} & set(words):
            result = CliRunner().invoke(
                main, words[1:], env={**self.env, **assignments}, catch_exceptions=False
            )
            return result.exit_code, _without_daemon_lines(result.output)
        env = {k: v for k, v in {**os.environ, **self.env}.items() if v is not None}
        env["PATH"] = f"{self.bindir}:{env['PATH']}"
        done = subprocess.run(
            ["bash", "-c", line],
            cwd=self.workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
            check=False,
        )
        return done.returncode, done.stdout


# A daemon running in this process (a scenario's DaemonThread) logs to whatever sys.stdout is at
# that moment, and while CliRunner runs a command that is the command's captured output: a retry
# wakes the daemon, which may deliver the row before the command returns. Such lines are never
# part of an operator command's own output.
_DAEMON_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[\s*\w+\s*\] "
    r"outbox\.(delivery|daemon|listener|partnero|claimer|writer|rescuer|monitor)\."
)


def _without_daemon_lines(output: str) -> str:
    kept = [line for line in output.splitlines(keepends=True) if not _DAEMON_LINE.match(line)]
    return "".join(kept)


# ---- rewriting ---------------------------------------------------------------------------------


def rendered(ran: Ran) -> str:
    """A transcript as the code printed it, in the document's form."""
    parts = []
    for command in ran.commands:
        output = command.output
        if command.expected[:1] == [ELIDED]:
            output = ELIDED + "\n" + _after_elision(command.expected, output)[1]
        output = output.rstrip("\n").replace(f"@{_HOST}", "@vm").replace(f"{_HOST}:", "vm:")
        output = "\n".join(line.rstrip() for line in output.splitlines())
        text = f"$ {command.line}\n{output}\n" if output else f"$ {command.line}\n"
        if command.exit_code:
            text += f"[exit {command.exit_code}]\n"
        parts.append(text)
    return "\n".join(parts)


def rewrite(path: Path, runs: list[Ran]) -> None:
    """Put each run's transcript in place of its block in the document."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for ran in sorted(runs, key=lambda r: r.block.line, reverse=True):
        start = ran.block.line  # the fence's line, 1-based: the body starts at this index
        end = start + len(ran.block.text.splitlines())
        lines[start:end] = rendered(ran).splitlines()
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
