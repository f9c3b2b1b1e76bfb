"""Benchmark 6: PostgreSQL, with 1, 2 and 4 worker processes, beside SQLite and LangGraph.

Throughput: benchmark 5's cycle (run -> pause -> approve -> tool -> answer) with 64
executions in flight in all. Clearance on PostgreSQL runs in W worker processes
(`python -m bench --worker pg-lanes URL LANES N`), each with 64/W lanes on one
database (a schema of its own per measurement); a cycle's approval is made by the
process that started it, and any worker may carry out the work. The rate is all
cycles over the span from the first worker's start to the last one's end. Beside
it, in the same run: Clearance on SQLite (one process, 64 in flight, benchmark 5's
function) and LangGraph with `AsyncPostgresSaver` (one process, 64 threads in
flight on one event loop, `durability="sync"`, a connection pool of 8).

Latency: as benchmark 4, on PostgreSQL: a second process approves, the agent's
process hears of it by LISTEN/NOTIFY; its poll interval is 1 s, so only the
notification can make it fast.

The server is the machine's PostgreSQL (`CLEARANCE_BENCH_POSTGRES`, default
postgresql://postgres@127.0.0.1:5432/test); each measurement uses a fresh schema
and drops it. `synchronous_commit` is on (Clearance's FULL).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench import concurrent
from bench.agents import AGENT, INPUT
from bench.common import ROOT, Section, Sizes, Target, fmt, median, percentile, scratch_dir, table
from bench.latency import measure_latency
from clearance import Clearance

SERVER = os.environ.get("CLEARANCE_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
IN_FLIGHT = 64
WORKERS = (1, 2, 4)


@contextmanager
def schema() -> Iterator[str]:
    """A store URL on a fresh schema, dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"bench_{secrets.token_hex(5)}"
    try:
        yield f"{SERVER}?schema={name}"
    finally:
        with psycopg.connect(SERVER, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


# -- Clearance workers ----------------------------------------------------------------------


async def _lanes(url: str, lanes: int, n: int) -> dict[str, Any]:
    from bench.agents import define_refund_agent

    async with Clearance.open(url) as app:
        define_refund_agent(app)

        async def one() -> None:
            ex = await app.run(AGENT, input=INPUT)
            request = ex.pending_approvals[0]
            ex = await app.signal(ex.id, "approve", request_id=request.request_id, by="bench")
            assert ex.status == "completed", ex.status

        await concurrent.in_flight(one, lanes, lanes)  # warm-up, untimed
        print("warm", flush=True)
        # Every worker starts timing together. Read off the event loop: this worker's
        # background tasks carry work of the others' executions meanwhile, and a blocked
        # loop would hold their transactions open.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        start = time.time()
        await concurrent.in_flight(one, n, lanes)
        return {"count": n, "start": start, "end": time.time()}


def lanes_worker(url: str, lanes: str, n: str) -> dict[str, Any]:
    return asyncio.run(_lanes(url, int(lanes), int(n)))


async def _workers(url: str, workers: int, n: int) -> float:
    """Cycles/s of `workers` processes sharing `IN_FLIGHT` lanes and `n` cycles."""
    # The tables first, so the workers do not all wait on their creation at once.
    async with Clearance.open(url):
        pass
    procs = []
    for _ in range(workers):
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench",
                "--worker",
                "pg-lanes",
                url,
                str(IN_FLIGHT // workers),
                str(n // workers),
                cwd=ROOT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        )
    for proc in procs:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 120)).strip() == b"warm"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
    results = []
    for proc in procs:
        assert proc.stdout is not None
        results.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), 600)))
        await proc.wait()
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return sum(r["count"] for r in results) / span


# -- LangGraph with its PostgreSQL checkpointer ------------------------------------------


async def _langgraph(url: str, n: int, width: int) -> float:
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    from bench.langgraph_flow import approved_cycle, builder

    base, name = url.split("?schema=")
    async with AsyncConnectionPool(
        base,
        max_size=8,
        kwargs={"autocommit": True, "row_factory": dict_row, "options": f"-c search_path={name}"},
        open=False,
    ) as pool:
        async with pool.connection() as conn:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {name}")
        saver = AsyncPostgresSaver(pool)  # type: ignore[arg-type]
        await saver.setup()
        graph = builder().compile(checkpointer=saver)
        counter = 0

        async def one() -> None:
            nonlocal counter
            counter += 1
            await approved_cycle(graph, f"thread-{counter}")

        await concurrent.in_flight(one, width, width)
        seconds = await concurrent.in_flight(one, n, width)
    return n / seconds


# -- the section ------------------------------------------------------------------------------


def unreachable() -> str | None:
    import psycopg

    try:
        psycopg.connect(SERVER, connect_timeout=3).close()
    except psycopg.OperationalError as err:
        return f"no PostgreSQL answers at {SERVER} ({str(err).strip()}): skipped"
    return None


def run(sizes: Sizes) -> Section:
    section = Section("6. PostgreSQL: worker processes, LangGraph's PostgresSaver, latency")
    absent = unreachable()
    if absent:
        section.add(absent, "")
        return section
    n = sizes.concurrent_cycles
    section.add(
        f"{n} cycles per measurement, {IN_FLIGHT} in flight in all, {sizes.rounds} rounds"
        " (median, min-max); a fresh schema (or SQLite file) each time. Clearance on"
        " PostgreSQL in 1, 2 and 4 worker processes sharing the 64 lanes; Clearance on"
        " SQLite (FULL) in one process; LangGraph 1.x with AsyncPostgresSaver in one"
        " process. Server: the machine's PostgreSQL 15 on loopback, synchronous_commit on.",
        "",
    )
    rates: dict[str, list[float]] = {}
    for _ in range(sizes.rounds):
        for workers in WORKERS:
            with schema() as url:
                rate = asyncio.run(_workers(url, workers, n))
            rates.setdefault(f"Clearance, PostgreSQL, {workers} worker(s)", []).append(rate)
        with scratch_dir("pg-sqlite") as where:
            measured = concurrent.clearance_concurrent(where / "c.db", "FULL", n, IN_FLIGHT)
        rates.setdefault("Clearance, SQLite, 1 process", []).append(measured.rate)
        with schema() as url:
            rate = asyncio.run(_langgraph(url, n, IN_FLIGHT))
        rates.setdefault("LangGraph, AsyncPostgresSaver, 1 process", []).append(rate)
    lang = median(rates["LangGraph, AsyncPostgresSaver, 1 process"])
    rows = []
    for system, values in rates.items():
        rows.append(
            [
                system,
                f"{fmt(median(values))} ({fmt(min(values))}-{fmt(max(values))})",
                f"{median(values) / lang:.2f}x",
            ]
        )
    section.add(*table(["system", "cycles/s", "vs LangGraph PostgresSaver"], rows), "")
    best = max(median(rates[f"Clearance, PostgreSQL, {w} worker(s)"]) for w in WORKERS)
    section.targets.append(
        Target(
            "6. PostgreSQL throughput",
            ">= 3x LangGraph's PostgresSaver (64 in flight)",
            f"{best / lang:.2f}x ({fmt(best)} vs {fmt(lang)} cycles/s)",
            best >= 3 * lang,
        )
    )
    one, four = (median(rates[f"Clearance, PostgreSQL, {w} worker(s)"]) for w in (1, 4))
    section.targets.append(
        Target(
            "6. PostgreSQL scaling",
            "throughput rises from 1 to 4 workers",
            f"{four / one:.2f}x ({fmt(one)} -> {fmt(four)} cycles/s)",
            four > one,
        )
    )
    with schema() as url:
        latencies = asyncio.run(measure_latency(url, 1.0, sizes.latency_samples * 2))
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    section.add(
        f"Approval latency by NOTIFY ({len(latencies)} decisions, poll interval 1 s):"
        f" p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms.",
        "",
    )
    section.targets.append(
        Target(
            "6. NOTIFY latency",
            "p99 <= 20 ms on loopback",
            f"p99 {p99 * 1000:.1f} ms",
            p99 <= 0.020,
        )
    )
    return section
