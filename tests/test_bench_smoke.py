"""`python -m bench --quick` runs end to end and prints its markdown report.

A smoke test only: the quick sizes make every number meaningless, so nothing
here looks at a timing or at whether a target was met.
"""

from __future__ import annotations

import importlib.util
import os
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
        "## 8. Approval requests over message brokers",
        "## 9. Policy evaluation, and the cycle with a policy",
        "## 10. `clearance audit verify` over a large audit log",
        "## 11. The cycle with a quorum of approvals",
        "## Targets",
    ):
        assert heading in out
    assert "| synchronous | system | cycles/s |" in out
    assert "| synchronous | system | in flight | cycles/s |" in out
    assert "| FULL | Clearance, concurrent | 64 |" in out
    assert "|---|" in out
    _check_brokers(out.split("## 8. Approval requests over message brokers", 1)[1])
    _check_policy(out.split("## 9. Policy evaluation", 1)[1])
    audit = out.split("## 10. `clearance audit verify`", 1)[1].split("\n## ", 1)[0]
    assert "| SQLite (WAL, one file) |" in audit and "| PostgreSQL |" in audit
    _check_quorum(out.split("## 11. The cycle with a quorum", 1)[1])
    # Every target has a row saying whether it was met, whatever the answer.
    targets = out.split("## Targets", 1)[1]
    rows = [line for line in targets.splitlines() if line.startswith("| ") and "target" not in line]
    assert len(rows) >= 16
    assert sum("5. concurrent" in row for row in rows) == 4
    assert sum("9. policy" in row for row in rows) == 2
    assert all(row.rstrip().endswith(("yes |", "**no** |")) for row in rows)


def _check_brokers(section: str) -> None:
    """Benchmark 8's table: memory and the webhook baseline run in this process, Redis
    where a server answers; NATS and RabbitMQ only in a full run."""
    section = section.split("\n## ", 1)[0]
    assert "| channel | server | requests | requests/s | wall s |" in section
    rows = {
        cells[0]: cells[1:]
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| channel")
        for cells in [[c.strip() for c in line.strip("|").split(" | ")]]
    }
    assert set(rows) == {
        "memory",
        "Redis Streams",
        "NATS JetStream",
        "RabbitMQ",
        "webhook (baseline)",
    }, rows
    measured = ["memory", "webhook (baseline)"]
    no_redis = rows["Redis Streams"][2].startswith("skipped: no Redis answers")
    if not no_redis or os.environ.get("CLEARANCE_REQUIRE_SERVICES") == "1":
        measured.append("Redis Streams")
    for label in measured:
        _server, requests, rate, *_ = rows[label]
        assert requests == "20", rows[label]
        assert float(rate.replace(",", "")) > 0, rows[label]
    for label in ("NATS JetStream", "RabbitMQ"):
        assert rows[label][2] == "skipped: not run with --quick", rows[label]


def _check_policy(section: str) -> None:
    """Benchmark 9's tables: six policies evaluated (1, 10, 100 rules; early and worst
    case, with the verdicts those cases mean), and the cycle for the three agents."""
    section = section.split("\n## ", 1)[0]
    assert "| rules | case | rules covering the tool | conditions evaluated | verdict |" in section
    rows = [
        [c.strip() for c in line.strip("|").split(" | ")]
        for line in section.splitlines()
        if line.startswith(("| 1 |", "| 10 |", "| 100 |"))
    ]
    assert [(r[0], r[1].split(" ")[0]) for r in rows] == [
        (n, case) for n in ("1", "10", "100") for case in ("verdict", "worst")
    ], rows
    for row in rows:
        early = row[1].startswith("verdict")
        assert row[4] == ("deny (eur-refunds-over-200)" if early else "none"), row
        if not early:  # every condition of a rule covering the tool was evaluated
            assert row[2] == row[3], row
        assert float(row[5]) > 0, row
    assert "| synchronous | agent | cycles/s | µs/cycle |" in section
    agents = [
        line.split(" | ")[1]
        for line in section.splitlines()
        if line.startswith(("| FULL |", "| NORMAL |"))
    ]
    assert len(agents) == 6 and len(set(agents)) == 3, agents


def _check_quorum(section: str) -> None:
    """Benchmark 11's table: the single-approval cycle, 2 of 2 and 2 of 3 with groups,
    under FULL and NORMAL; the quorum cycles cast two votes, and the first is timed."""
    section = section.split("\n## ", 1)[0]
    assert "| synchronous | approval | votes/cycle | cycles/s | ms/cycle p50 / p95 |" in section
    rows = [
        [c.strip() for c in line.strip("|").split(" | ")]
        for line in section.splitlines()
        if line.startswith(("| FULL |", "| NORMAL |"))
    ]
    variants = (
        ("single approval", "1"),
        ("2 of 2", "2"),
        ("2 of 3, one from finance and one from risk", "2"),
    )
    assert [tuple(r[:3]) for r in rows] == [
        (sync, name, votes) for sync in ("FULL", "NORMAL") for name, votes in variants
    ], rows
    for row in rows:
        assert float(row[3].split(" ")[0].replace(",", "")) > 0, row
        single = row[2] == "1"
        assert (row[6] == "-") == single, row  # ms per pending vote: quorum cycles only
        assert (row[8] == "-") == single, row  # vs single approval
