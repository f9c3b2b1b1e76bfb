"""Benchmark 1: the pause/resume cycle on SQLite, side by side, and the raw commit ceiling.

One cycle = run -> the model asks for the gated tool -> durable pause -> approve ->
the tool runs -> final answer. Every system gets a fresh database per round,
WAL, the same `synchronous` setting, and a few warm-up cycles that are not
timed. Rounds interleave the systems so that a noisy neighbour hurts all of
them alike; medians are reported with the spread.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.agents import (
    AGENT,
    INPUT,
    PARAMS,
    CommitCounter,
    define_refund_agent,
    holdpoint_refund,
    holdpoint_store,
    langgraph_connection,
)
from bench.common import Section, Sizes, Target, fmt, median, ratio, scratch_dir, table
from clearance import Clearance, Policy, Rule

SYNCS = ("FULL", "NORMAL")
WARMUP = 3


@dataclass
class Run:
    """One timed run: `count` cycles (or commits) in `seconds`, with `commits` commits."""

    count: int
    seconds: float
    commits: int

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    @property
    def commits_per(self) -> float:
        return self.commits / self.count


# -- the systems ----------------------------------------------------------------------


async def _clearance(
    path: Path, synchronous: str, n: int, policy: Policy | Sequence[Rule] | None
) -> Run:
    async with Clearance.open(f"sqlite:///{path}", synchronous=synchronous) as app:
        model = define_refund_agent(app, policy=policy)
        counter = CommitCounter()
        app.store._db.set_trace_callback(counter)  # type: ignore[attr-defined]

        async def cycle() -> None:
            ex = await app.run(AGENT, input=INPUT)
            assert ex.status == "awaiting_approval", ex.status
            request = ex.pending_approvals[0]
            ex = await app.signal(ex.id, "approve", request_id=request.request_id, by="bench")
            assert ex.status == "completed", ex.status

        for _ in range(WARMUP):
            await cycle()
        before = counter.commits
        start = time.perf_counter()
        for _ in range(n):
            await cycle()
        seconds = time.perf_counter() - start
        commits = counter.commits - before
        model.requests.clear()
    return Run(n, seconds, commits)


def clearance(
    path: Path, synchronous: str, n: int, *, policy: Policy | Sequence[Rule] | None = None
) -> Run:
    """Benchmark 1's Clearance cycle; `policy`: the agent's (benchmark 9), none by default."""
    return asyncio.run(_clearance(path, synchronous, n, policy))


def langgraph_sync(path: Path, synchronous: str, n: int) -> Run:
    from langchain_core.messages import HumanMessage
    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.types import Command

    from bench.langgraph_flow import builder

    conn = langgraph_connection(str(path), synchronous)
    counter = CommitCounter()
    conn.set_trace_callback(counter)
    graph = builder().compile(checkpointer=SqliteSaver(conn))

    def cycle(i: int) -> None:
        config: Any = {"configurable": {"thread_id": f"thread-{i}"}}
        out = graph.invoke({"messages": [HumanMessage(INPUT)]}, config, durability="sync")
        assert "__interrupt__" in out, out
        out = graph.invoke(Command(resume={"approved": True}), config, durability="sync")
        assert "ORD-123" in out["messages"][-1].content

    try:
        for i in range(WARMUP):
            cycle(-1 - i)
        before = counter.commits
        start = time.perf_counter()
        for i in range(n):
            cycle(i)
        seconds = time.perf_counter() - start
        return Run(n, seconds, counter.commits - before)
    finally:
        conn.close()


async def _langgraph_async(path: Path, synchronous: str, n: int) -> Run:
    import aiosqlite
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    from bench.langgraph_flow import approved_cycle, builder

    counter = CommitCounter()
    async with aiosqlite.connect(str(path)) as conn:
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute(f"PRAGMA synchronous={synchronous}")
        await conn.set_trace_callback(counter)
        graph = builder().compile(checkpointer=AsyncSqliteSaver(conn))

        async def cycle(i: int) -> None:
            await approved_cycle(graph, f"thread-{i}")

        for i in range(WARMUP):
            await cycle(-1 - i)
        before = counter.commits
        start = time.perf_counter()
        for i in range(n):
            await cycle(i)
        seconds = time.perf_counter() - start
    return Run(n, seconds, counter.commits - before)


def langgraph_async(path: Path, synchronous: str, n: int) -> Run:
    return asyncio.run(_langgraph_async(path, synchronous, n))


def holdpoint(path: Path, synchronous: str, n: int) -> Run:
    from holdpoint import HoldPoint

    counter = CommitCounter()
    store = holdpoint_store(str(path), synchronous, counter)
    hold = HoldPoint(store=store)
    refund = holdpoint_refund(hold)

    def cycle() -> None:
        action = refund(**PARAMS)
        decision = hold.approve(action.id, actor="bench")
        assert decision.action.status.value == "executed", decision

    try:
        for _ in range(WARMUP):
            cycle()
        before = counter.commits
        start = time.perf_counter()
        for _ in range(n):
            cycle()
        seconds = time.perf_counter() - start
        return Run(n, seconds, counter.commits - before)
    finally:
        store.close()


def raw_commits(path: Path, synchronous: str, n: int) -> Run:
    """The ceiling: `BEGIN IMMEDIATE; INSERT one row; COMMIT`, as fast as SQLite goes."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        row = ("x" * 200,)
        start = time.perf_counter()
        for _ in range(n):
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t (body) VALUES (?)", row)
            db.execute("COMMIT")
        return Run(n, time.perf_counter() - start, n)
    finally:
        db.close()


SYSTEMS: dict[str, Callable[[Path, str, int], Run]] = {
    "Clearance": clearance,
    "LangGraph (SqliteSaver)": langgraph_sync,
    "LangGraph (AsyncSqliteSaver)": langgraph_async,
    "holdpoint (SQLiteStore)": holdpoint,
    "raw SQLite commits": raw_commits,
}


def paired_spread(ratios: list[float]) -> str:
    if len(ratios) < 2:
        return "1 round"
    return f"rounds {min(ratios):.2f}-{max(ratios):.2f}x"


# -- the benchmark -----------------------------------------------------------------------


def run(sizes: Sizes) -> Section:
    runs: dict[tuple[str, str], list[Run]] = {}
    for round_no in range(sizes.rounds):
        for synchronous in SYNCS:
            for name, system in SYSTEMS.items():
                n = sizes.cycles
                if system is raw_commits:
                    n = sizes.raw_commits * (10 if synchronous == "NORMAL" else 1)
                with scratch_dir(f"cycle{round_no}") as where:
                    result = system(where / "bench.db", synchronous, n)
                runs.setdefault((name, synchronous), []).append(result)

    section = Section("1. Pause/resume cycle on SQLite (one process, fresh database, WAL)")
    section.add(
        f"{sizes.cycles} cycles per system per round ({WARMUP} untimed warm-up cycles), "
        f"{sizes.rounds} interleaved rounds, median (min-max) reported; the raw ceiling is "
        f"{sizes.raw_commits} (FULL) or {sizes.raw_commits * 10} (NORMAL) single-row "
        "`BEGIN IMMEDIATE; INSERT; COMMIT` transactions. "
        "Commits are counted by SQLite's trace hook (COMMIT statements) for every "
        "system. holdpoint gates a function call and has no agent loop: its cycle is "
        "submit then approve-and-run, no model turns. "
        "Targets compare medians; the per-round ratios beside them show how much a noisy "
        "disk moves the answer.",
        "",
    )
    rows = []
    rounds = sizes.rounds
    for synchronous in SYNCS:
        ceiling = median([r.rate for r in runs[("raw SQLite commits", synchronous)]])
        ours = median([r.rate for r in runs[("Clearance", synchronous)]])
        for name in SYSTEMS:
            results = runs[(name, synchronous)]
            rate = median([r.rate for r in results])
            per = median([r.commits_per for r in results])
            spread = f"{fmt(min(r.rate for r in results))}-{fmt(max(r.rate for r in results))}"
            raw = name == "raw SQLite commits"
            rows.append(
                [
                    synchronous,
                    name,
                    "-" if raw else f"{fmt(rate)} ({spread})",
                    fmt(per) if not raw else "1",
                    fmt(rate * per),
                    ratio(rate * per / ceiling),
                    "-" if raw or name == "Clearance" else ratio(ours / rate),
                ]
            )

        mine = runs[("Clearance", synchronous)]
        # Per round, the systems ran side by side: these paired ratios show the noise.
        vs_lg = [
            mine[i].rate
            / max(runs[(n, synchronous)][i].rate for n in SYSTEMS if n.startswith("LangGraph"))
            for i in range(rounds)
        ]
        vs_hp = [
            mine[i].rate / runs[("holdpoint (SQLiteStore)", synchronous)][i].rate
            for i in range(rounds)
        ]
        vs_ceiling = [
            mine[i].rate * mine[i].commits_per / runs[("raw SQLite commits", synchronous)][i].rate
            for i in range(rounds)
        ]
        lg = max(
            median([r.rate for r in runs[(name, synchronous)]])
            for name in SYSTEMS
            if name.startswith("LangGraph")
        )
        hp = median([r.rate for r in runs[("holdpoint (SQLiteStore)", synchronous)]])
        per = median([r.commits_per for r in runs[("Clearance", synchronous)]])
        section.targets += [
            Target(
                f"1. cycle, {synchronous}",
                ">= 3x LangGraph (its faster saver)",
                f"{ratio(ours / lg)} ({paired_spread(vs_lg)})",
                ours / lg >= 3,
            ),
            Target(
                f"1. cycle, {synchronous}",
                ">= 1x holdpoint",
                f"{ratio(ours / hp)} ({paired_spread(vs_hp)})",
                ours >= hp,
            ),
            Target(
                f"1. cycle, {synchronous}",
                "cycles/s x commits/cycle >= 0.5x raw ceiling",
                f"{ratio(ours * per / ceiling)} ({fmt(ours * per)} of {fmt(ceiling)} commits/s; "
                f"{paired_spread(vs_ceiling)})",
                ours * per >= 0.5 * ceiling,
            ),
        ]
    section.add(
        *table(
            [
                "synchronous",
                "system",
                "cycles/s",
                "commits/cycle",
                "commits/s",
                "vs raw ceiling",
                "Clearance is",
            ],
            rows,
        )
    )
    return section
