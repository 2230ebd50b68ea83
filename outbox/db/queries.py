"""Named SQL queries, kept in outbox/sql/*.sql and loaded by name (the procrastinate way).

A file holds several queries, each introduced by a line `-- name: NAME`; the comment lines
right after it document the query.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = body.strip()
    return queries


@functools.cache
def load(filename: str = "queries.sql") -> dict[str, str]:
    return parse(resources.files("outbox").joinpath("sql", filename).read_text(encoding="utf-8"))


def get(name: str, filename: str = "queries.sql") -> str:
    try:
        return load(filename)[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in {filename}") from None
