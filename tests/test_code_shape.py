"""The shape of the code under outbox/: no function longer than 60 lines (SQL strings aside),
no class longer than 250, so every piece fits on a screen and does one thing."""

from __future__ import annotations

import ast
from pathlib import Path

OUTBOX = Path(__file__).resolve().parent.parent / "outbox"
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 250


def _string_lines(node: ast.AST) -> int:
    """Lines taken by string constants of three lines or more (SQL, help texts, docstrings)."""
    total = 0
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str):
            assert child.end_lineno is not None
            span = child.end_lineno - child.lineno + 1
            if span >= 3:
                total += span
    return total


def _too_long() -> list[str]:
    found = []
    for path in sorted(OUTBOX.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                assert node.end_lineno is not None
                length = node.end_lineno - node.lineno + 1 - _string_lines(node)
                limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                if length > limit:
                    where = path.relative_to(OUTBOX.parent)
                    found.append(f"{where}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_function_over_60_lines_and_no_class_over_250() -> None:
    assert _too_long() == []
