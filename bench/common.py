"""What every benchmark shares: sizes, results, timing, memory, subprocess workers, tables."""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sizes:
    """How big each benchmark runs: `full()` for BENCHMARKS.md, `quick_sizes()` for CI smoke."""

    quick: bool
    cycles: int  # pause/resume cycles per system per round
    rounds: int  # interleaved rounds; medians are reported
    raw_commits: int  # with synchronous=FULL; NORMAL runs 10x as many (it is ~20x faster)
    scale_levels: tuple[int, ...]
    sweep_batch: int  # timers made due at once in the sweep benchmark
    langgraph_levels: tuple[int, ...]
    page_calls: int
    replay_seconds: float
    latency_samples: int
    poll_intervals: tuple[float, ...]
    concurrent_cycles: int  # cycles per system per round in benchmark 5
    in_flight: int  # executions kept in flight at once in benchmark 5
    postgres_scale_levels: tuple[int, ...]  # paused executions, benchmark 7
    broker_requests: int  # approval requests per broker, benchmark 8
    policy_calls: int  # evaluate() calls per policy per round, benchmark 9
    policy_rounds: int  # interleaved rounds of benchmark 9's cycles (`cycles` each)
    quorum_rounds: int  # interleaved rounds of benchmark 11's cycles (`cycles` each)

    @classmethod
    def full(cls) -> Sizes:
        return cls(
            quick=False,
            cycles=300,
            rounds=5,
            raw_commits=4000,
            scale_levels=(1_000, 10_000, 100_000),
            sweep_batch=1_000,
            langgraph_levels=(1_000, 10_000, 100_000),
            page_calls=50,
            replay_seconds=2.0,
            latency_samples=50,
            poll_intervals=(0.2, 0.05),
            concurrent_cycles=2_000,
            in_flight=64,
            postgres_scale_levels=(1_000, 1_000_000),
            broker_requests=1_000,
            policy_calls=2_000,
            policy_rounds=20,
            quorum_rounds=6,
        )

    @classmethod
    def quick_sizes(cls) -> Sizes:
        return cls(
            quick=True,
            cycles=15,
            rounds=1,
            raw_commits=300,
            scale_levels=(200, 1_000),
            sweep_batch=100,
            langgraph_levels=(200,),
            page_calls=10,
            replay_seconds=0.2,
            latency_samples=5,
            poll_intervals=(0.2, 0.05),
            concurrent_cycles=128,
            in_flight=64,
            postgres_scale_levels=(200, 1_000),
            broker_requests=20,
            policy_calls=50,
            policy_rounds=1,
            quorum_rounds=1,
        )


@dataclass
class Target:
    benchmark: str
    goal: str
    measured: str
    met: bool


@dataclass
class Section:
    title: str
    body: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        self.body.extend(lines)

    def markdown(self) -> str:
        return "\n".join([f"## {self.title}", "", *self.body, ""])


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = [
        "| " + " | ".join(cell(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def fmt(value: float, digits: int = 3) -> str:
    """A number with `digits` significant figures, thousands separated."""
    if value == 0 or not math.isfinite(value):
        return str(value)
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def ratio(value: float) -> str:
    return f"{value:.2f}x"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): with 50 samples, p99 is the largest."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def rss_bytes() -> int:
    """Resident set size now (not the peak), after a full collection."""
    gc.collect()
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def db_bytes(path: str | Path) -> int:
    """Bytes on disk for a SQLite file after folding its WAL back in."""
    with closing_db(str(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    total = 0
    for suffix in ("", "-wal", "-shm"):
        candidate = Path(f"{path}{suffix}")
        if candidate.exists() and suffix != "-shm":
            total += candidate.stat().st_size
    return total


def bytes_by_table(path: str | Path) -> dict[str, int]:
    """Bytes of each table, its indexes included (SQLite's dbstat), largest first;
    empty if this SQLite was built without dbstat."""
    with closing_db(str(path)) as db:
        try:
            rows = db.execute(
                "SELECT m.tbl_name, SUM(s.pgsize) FROM dbstat AS s"
                " JOIN sqlite_master AS m ON m.name = s.name GROUP BY m.tbl_name"
            ).fetchall()
        except sqlite3.OperationalError:
            return {}
    return dict(sorted(((str(t), int(b)) for t, b in rows), key=lambda r: -r[1]))


@contextmanager
def closing_db(path: str) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        yield db
    finally:
        db.close()


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A fresh temporary directory, removed afterwards (TMPDIR picks the disk)."""
    with tempfile.TemporaryDirectory(prefix=f"clearance-bench-{prefix}-") as path:
        yield Path(path)


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def worker(kind: str, *args: str, timeout: float = 1800) -> dict[str, Any]:
    """Run `python -m bench --worker KIND ARGS...` in a fresh process; its last stdout
    line is a JSON object. Fresh processes give each scale level a clean RSS baseline."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--worker", kind, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"bench worker {kind} {' '.join(args)} failed ({done.returncode}):\n{done.stderr}"
        )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_lines() -> list[str]:
    dists = (
        "clearance",
        "langgraph",
        "langgraph-checkpoint",
        "langgraph-checkpoint-sqlite",
        "langchain-core",
        "holdpoint",
        "transitions",
        "cattrs",
        "aiosqlite",
    )
    versions = ", ".join(f"{d} {version(d)}" for d in dists)
    return [
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} (start)",
        f"- Machine: {os.cpu_count()} CPUs (`nproc`), {cpu_model()}, "
        f"{platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}",
        f"- Versions: {versions}",
        f"- Load average as the run began (1, 5, 15 min): {load_average()}",
    ]


def load_average() -> str:
    """The machine's load averages: other jobs share these CPUs and this disk."""
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"
