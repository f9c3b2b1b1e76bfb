"""Benchmark 2: many executions paused at once in one SQLite file.

Each level runs in a fresh process (`python -m bench --worker scale-clearance N ...`)
so RSS compares like with like: imports, one open store and the agents are the
same at every level, only the number of paused executions changes.

Clock: `FakeClock`, moved 1 ms per execution so requests have distinct
timestamps. `synchronous=NORMAL` for setup speed (the reads timed here do not
depend on it; the timer sweep's commits do, see the notes).

The sweep: `batch` of the N executions belong to an agent whose approval
timeout is 60 s, the rest to one with 24 h. Moving the clock past the short
timeouts makes exactly `batch` timers due among N pending; `fire_due_timers()`
is timed (each fired timer is two commits: the timeout, then the model's
final answer). That is done twice, the second time with a fresh batch so N
is pending again; the faster of the two is reported.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.agents import INPUT, CommitCounter, define_refund_agent, langgraph_connection
from bench.common import (
    Section,
    Sizes,
    Target,
    bytes_by_table,
    closing_db,
    db_bytes,
    fmt,
    median,
    ratio,
    rss_bytes,
    scratch_dir,
    table,
    worker,
)
from clearance import Clearance
from clearance.testing import FakeClock

LONG = "safe-agent"  # 24 h approval timeout: stays paused
DUE = "safe-agent-due"  # 60 s approval timeout: the timers the sweep fires
LONG_MS = 24 * 3600 * 1000
DUE_MS = 60 * 1000
MB = 1024 * 1024


# -- workers (run in their own process) -------------------------------------------------------


async def first_page_times(app: Clearance, calls: int, n: int) -> list[float]:
    """Seconds of `calls` calls of `app.pending(limit=50)` with `n` pending, after one
    untimed call that warms the caches (page, statement, connection pool)."""
    await app.pending(limit=50)
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        page = await app.pending(limit=50)
        times.append(time.perf_counter() - began)
        assert len(page) == min(50, n)
    return times


async def _clearance_level(path: Path, n: int, batch: int, page_calls: int) -> dict[str, Any]:
    clock = FakeClock()
    app = Clearance.open(f"sqlite:///{path}", clock=clock, synchronous="NORMAL")
    try:
        models = [define_refund_agent(app, tag=LONG, timeout_ms=LONG_MS)]
        models.append(define_refund_agent(app, tag=DUE, timeout_ms=DUE_MS))
        rss_before = rss_bytes()

        async def pause(tag: str, count: int) -> None:
            for i in range(count):
                ex = await app.run(tag, input=INPUT)
                assert ex.status == "awaiting_approval", ex.status
                clock.advance(milliseconds=1)
                if i % 1000 == 999:
                    for model in models:  # the test double records requests; the library not
                        model.requests.clear()
            for model in models:
                model.requests.clear()

        start = time.perf_counter()
        await pause(LONG, n - batch)
        await pause(DUE, batch)
        build = time.perf_counter() - start
        rss_after = rss_bytes()
        with closing_db(str(path)) as db:
            (pending,) = db.execute(
                "SELECT count(*) FROM approvals WHERE status = 'pending'"
            ).fetchone()
        assert pending == n, (pending, n)
        size = db_bytes(path)
        tables = bytes_by_table(path)

        pages = await first_page_times(app, page_calls, n)

        sweeps = []
        counter = CommitCounter()
        app.store._db.set_trace_callback(counter)  # type: ignore[attr-defined]
        commits = []
        for round_no in range(2):
            if round_no:
                await pause(DUE, batch)  # N pending again, `batch` of them due soon
            clock.advance(seconds=DUE_MS / 1000 + 1)
            before = counter.commits
            t = time.perf_counter()
            fired = await app.fire_due_timers()
            sweeps.append(time.perf_counter() - t)
            commits.append(counter.commits - before)
            assert fired == batch, (fired, batch)
        return {
            "n": n,
            "build_s": build,
            "rss_before": rss_before,
            "rss_after": rss_after,
            "db_bytes": size,
            "page_s": median(pages),
            "sweep_s": min(sweeps),
            "sweeps_s": sweeps,
            "sweep_commits": commits[0],
            "rss_end": rss_bytes(),
            "tables": tables,
        }
    finally:
        await app.close()


def clearance_level(n: int, batch: int, page_calls: int) -> dict[str, Any]:
    with scratch_dir(f"scale{n}") as where:
        return asyncio.run(_clearance_level(where / "bench.db", n, batch, page_calls))


def langgraph_level(n: int) -> dict[str, Any]:
    """N threads interrupted before the gated tool, checkpointed with SqliteSaver."""
    from langchain_core.messages import HumanMessage
    from langgraph.checkpoint.sqlite import SqliteSaver

    from bench.langgraph_flow import builder

    with scratch_dir(f"lgscale{n}") as where:
        path = where / "bench.db"
        conn = langgraph_connection(str(path), "NORMAL")
        counter = CommitCounter()
        conn.set_trace_callback(counter)
        graph = builder().compile(checkpointer=SqliteSaver(conn))
        rss_before = rss_bytes()
        start = time.perf_counter()
        for i in range(n):
            config: Any = {"configurable": {"thread_id": f"thread-{i}"}}
            out = graph.invoke({"messages": [HumanMessage(INPUT)]}, config, durability="sync")
            assert "__interrupt__" in out
        build = time.perf_counter() - start
        rss_after = rss_bytes()
        conn.close()
        return {
            "n": n,
            "build_s": build,
            "rss_before": rss_before,
            "rss_after": rss_after,
            "db_bytes": db_bytes(path),
            "tables": bytes_by_table(path),
            "commits": counter.commits,
        }


# -- the benchmark ------------------------------------------------------------------------


def run(sizes: Sizes) -> Section:
    batch = sizes.sweep_batch
    ours = {
        n: worker("scale-clearance", str(n), str(batch), str(sizes.page_calls))
        for n in sizes.scale_levels
    }
    theirs = {n: worker("scale-langgraph", str(n)) for n in sizes.langgraph_levels}
    biggest_lg = max(theirs)
    lg_per = {n: r["db_bytes"] / n for n, r in theirs.items()}

    section = Section("2. Scale of pending approvals (one SQLite file)")
    section.add(
        "Each level is a fresh process and a fresh database; `FakeClock`; "
        "`synchronous=NORMAL` for setup speed (Clearance and LangGraph alike). "
        f"`first page` = `app.pending(limit=50)`, median of {sizes.page_calls} calls. "
        f"`sweep` = `app.fire_due_timers()` with exactly {batch:,} of the N pending timers "
        "due (a 60 s approval timeout for those, 24 h for the rest), best of 2; each fired "
        "timer runs the rest of its execution (timeout event, model turn, final answer). "
        "DB bytes are the main file after `wal_checkpoint(TRUNCATE)`, divided by N. "
        "LangGraph: the same conversation interrupted before the tool, `SqliteSaver`, "
        "durability sync.",
        "",
    )
    rows = []
    for n, r in ours.items():
        per = r["db_bytes"] / n
        lg = lg_per.get(n)
        lg_note = ""
        if lg is None:
            lg = lg_per[biggest_lg]
            lg_note = f" (extrapolated: bytes/thread measured at {biggest_lg:,})"
        rows.append(
            [
                f"{n:,}",
                fmt(n / r["build_s"]),
                fmt(r["rss_after"] / MB),
                fmt((r["rss_after"] - r["rss_before"]) / MB),
                fmt(per),
                fmt(lg) + lg_note,
                ratio(per / lg),
                f"{r['page_s'] * 1000:.3f}",
                f"{r['sweep_s']:.3f} ({r['sweep_commits']:,} commits)",
            ]
        )
    section.add(
        *table(
            [
                "paused executions",
                "setup runs/s",
                "RSS MB",
                "RSS growth while pausing, MB",
                "DB bytes / paused execution",
                "LangGraph bytes / interrupted thread",
                "bytes vs LangGraph",
                "first page ms",
                f"{batch:,}-timer sweep s",
            ],
            rows,
        ),
        "",
    )
    section.add(
        *table(
            [
                "LangGraph interrupted threads",
                "setup threads/s",
                "RSS MB",
                "RSS growth while interrupting, MB",
                "DB bytes / thread",
                "commits / thread",
            ],
            [
                [
                    f"{n:,}",
                    fmt(n / r["build_s"]),
                    fmt(r["rss_after"] / MB),
                    fmt((r["rss_after"] - r["rss_before"]) / MB),
                    fmt(r["db_bytes"] / n),
                    fmt(r["commits"] / n),
                ]
                for n, r in theirs.items()
            ],
        ),
        "",
    )
    section.add(
        "Where the bytes go (each table with its indexes, from SQLite's dbstat, per paused "
        "execution / interrupted thread):",
        "",
        *table(
            ["system (count)", "table: bytes each"],
            [
                [
                    f"{name} ({n:,})",
                    ", ".join(f"{t} {fmt(b / n)}" for t, b in r["tables"].items() if b / n >= 1),
                ]
                for name, n, r in (
                    ("Clearance", max(ours), ours[max(ours)]),
                    ("LangGraph", biggest_lg, theirs[biggest_lg]),
                )
            ],
        ),
        "",
    )
    small, big = min(ours), max(ours)
    growth = (ours[big]["rss_after"] - ours[small]["rss_after"]) / MB
    where = f"{small:,} -> {big:,}"
    section.targets.append(
        Target("2. scale", f"RSS growth {where} <= 50 MB", f"{growth:+.1f} MB", growth <= 50)
    )
    common = max(n for n in ours if n in lg_per) if any(n in lg_per for n in ours) else big
    per = ours[common]["db_bytes"] / common
    lg = lg_per.get(common, lg_per[biggest_lg])
    section.targets.append(
        Target(
            "2. scale",
            f"DB bytes per paused execution <= 0.25x LangGraph's (at {common:,})",
            f"{ratio(per / lg)} ({fmt(per)} vs {fmt(lg)} bytes)",
            per <= 0.25 * lg,
        )
    )
    for key, what in (("page_s", "first page"), ("sweep_s", f"{batch:,}-timer sweep")):
        cost = ours[big][key] / ours[small][key]
        section.targets.append(
            Target(
                "2. scale",
                f"{what} at {big:,} <= 1.5x at {small:,}",
                f"{ratio(cost)} ({ours[big][key] * 1000:.3g} vs {ours[small][key] * 1000:.3g} ms)",
                cost <= 1.5,
            )
        )
    return section
