"""`python -m bench --quick` runs end to end and prints its markdown report.

A smoke test only: the quick sizes make every number meaningless, so nothing
here looks at a timing or at whether a target was met.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXTRA = ("langgraph", "langgraph.checkpoint.sqlite", "aiosqlite", "holdpoint")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


missing = [m for m in EXTRA if not _installed(m)]
pytestmark = pytest.mark.skipif(
    bool(missing),
    reason=f"the bench extra is not installed (missing {', '.join(missing)}): "
    "pip install -e '.[bench]'",
)


def test_quick_bench_prints_a_markdown_report() -> None:
    # From the repository root, exactly as documented: the entry point must not let the
    # ./clearance folder shadow the installed package.
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("# Clearance benchmarks")
    for heading in (
        "## 1. Pause/resume cycle",
        "## 2. Scale of pending approvals",
        "## 3. Core step cost",
        "## 4. Approval latency",
        "## 5. Concurrent executions in one process",
        "## Targets",
    ):
        assert heading in out
    assert "| synchronous | system | cycles/s |" in out
    assert "| synchronous | system | in flight | cycles/s |" in out
    assert "| FULL | Clearance, concurrent | 64 |" in out
    assert "|---|" in out
    # Every target has a row saying whether it was met, whatever the answer.
    targets = out.split("## Targets", 1)[1]
    rows = [line for line in targets.splitlines() if line.startswith("| ") and "target" not in line]
    assert len(rows) >= 14
    assert sum("5. concurrent" in row for row in rows) == 4
    assert all(row.rstrip().endswith(("yes |", "**no** |")) for row in rows)
