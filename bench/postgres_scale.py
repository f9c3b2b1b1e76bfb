"""Benchmark 7: many executions paused at once on PostgreSQL (up to 1M).

Benchmark 2's questions on PostgreSQL: with N approvals pending, what does the
first page of pending cost, what does a sweep of 1,000 due timers cost, and how
many bytes does a paused execution take? The goal is that the page and the sweep
cost at 1M within 1.5x of what they cost at 1k: both should touch only what they
return (an index on pending requests, one on due time).

Setup: the N executions are paused through the public API (`app.run`), by
`BUILDERS` processes (`python -m bench --worker pg-pause URL N START`) with 32 in
flight each, `synchronous="NORMAL"` (PostgreSQL's `synchronous_commit = off`) for
setup speed. `FakeClock`s move 1 ms per execution, so requests have distinct
times. Of the N, `batch` belong to an agent whose approval timeout is 60 s, the
rest to one with 24 h.

Measured in a fresh process (`--worker pg-scale URL N BATCH PAGES`), on the
default `synchronous="FULL"`, after `VACUUM ANALYZE`: `app.pending(limit=50)`
(median of PAGES calls), then `fire_due_timers()` with the clock moved past the
60 s timeouts (exactly `batch` due among N pending), twice with a fresh batch,
the faster reported. Bytes: `pg_total_relation_size` of every table of the
schema (indexes and TOAST included), divided by N.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from bench import concurrent
from bench.agents import INPUT, define_refund_agent
from bench.common import ROOT, Section, Sizes, Target, fmt, median, table
from bench.postgres import SERVER, schema, unreachable
from bench.scale import DUE, DUE_MS, LONG, LONG_MS, first_page_times
from clearance import Clearance
from clearance.testing import FakeClock

T0 = datetime(2026, 1, 1, tzinfo=UTC)
BUILDERS = 2
LANES = 32


def _agents(app: Clearance) -> list[Any]:
    return [
        define_refund_agent(app, tag=LONG, timeout_ms=LONG_MS),
        define_refund_agent(app, tag=DUE, timeout_ms=DUE_MS),
    ]


async def _pause(app: Clearance, clock: FakeClock, models: list[Any], tag: str, n: int) -> None:
    done = 0

    async def one() -> None:
        nonlocal done
        ex = await app.run(tag, input=INPUT)
        assert ex.status == "awaiting_approval", ex.status
        clock.advance(milliseconds=1)
        done += 1
        if done % 1000 == 0:
            for model in models:  # the test double records requests; the library not
                model.requests.clear()

    await concurrent.in_flight(one, n, LANES)
    for model in models:
        model.requests.clear()


async def _builder(url: str, n: int, start_ms: int, tag: str) -> dict[str, Any]:
    clock = FakeClock(T0 + timedelta(milliseconds=start_ms))
    async with Clearance.open(url, clock=clock, synchronous="NORMAL") as app:
        models = _agents(app)
        began = time.perf_counter()
        await _pause(app, clock, models, tag, n)
        return {"n": n, "seconds": time.perf_counter() - began}


def builder_worker(url: str, n: str, start_ms: str, tag: str) -> dict[str, Any]:
    return asyncio.run(_builder(url, int(n), int(start_ms), tag))


async def _build(url: str, n: int, batch: int) -> float:
    """Pause n - batch executions of LONG and batch of DUE, in BUILDERS processes; the
    seconds it took."""
    async with Clearance.open(url):  # the tables, before the builders race to make them
        pass
    parts = [
        (LONG, (n - batch) // BUILDERS + (i < (n - batch) % BUILDERS)) for i in range(BUILDERS)
    ]
    parts.append((DUE, batch))
    began = time.perf_counter()
    procs = []
    for i, (tag, count) in enumerate(parts):
        if count == 0:
            continue
        # Each builder's clock starts where the one before it ends.
        start_ms = sum(c for _, c in parts[:i])
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench",
                "--worker",
                "pg-pause",
                url,
                str(count),
                str(start_ms),
                tag,
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
            )
        )
    for proc in procs:
        out, _ = await proc.communicate()
        assert proc.returncode == 0, proc.returncode
        json.loads(out.splitlines()[-1])
    return time.perf_counter() - began


async def _measure(url: str, n: int, batch: int, page_calls: int) -> dict[str, Any]:
    import psycopg

    base, name = url.split("?schema=")
    async with await psycopg.AsyncConnection.connect(base, autocommit=True) as conn:
        await conn.execute(f"SET search_path = {name}")
        await conn.execute("VACUUM ANALYZE")
        cur = await conn.execute(
            "SELECT count(*) FROM clearance_approvals WHERE status = 'pending'"
        )
        (pending,) = await cur.fetchone() or (0,)
        assert pending == n, (pending, n)
        cur = await conn.execute(
            "SELECT relname, pg_total_relation_size(c.oid) FROM pg_class c"
            " JOIN pg_namespace s ON s.oid = c.relnamespace"
            " WHERE s.nspname = %s AND c.relkind = 'r'",
            (name,),
        )
        tables = {rel: size for rel, size in await cur.fetchall()}
    # Past every builder's clock: the DUE requests opened last.
    clock = FakeClock(T0 + timedelta(milliseconds=n + 1))
    async with Clearance.open(url, clock=clock) as app:
        models = _agents(app)
        pages = await first_page_times(app, page_calls, n)
        sweeps = []
        for round_no in range(2):
            if round_no:
                await _pause(app, clock, models, DUE, batch)  # N pending again
            clock.advance(seconds=DUE_MS / 1000 + 1)
            began = time.perf_counter()
            fired = await app.fire_due_timers()
            sweeps.append(time.perf_counter() - began)
            assert fired == batch, (fired, batch)
    return {
        "n": n,
        "bytes": sum(tables.values()),
        "tables": tables,
        "page_s": median(pages),
        "sweep_s": min(sweeps),
        "sweeps_s": sweeps,
    }


def measure_worker(url: str, n: str, batch: str, page_calls: str) -> dict[str, Any]:
    return asyncio.run(_measure(url, int(n), int(batch), int(page_calls)))


def _level(n: int, batch: int, page_calls: int) -> dict[str, Any]:
    from bench.common import worker

    with schema() as url:
        build_s = asyncio.run(_build(url, n, batch))
        result = worker("pg-scale", url, str(n), str(batch), str(page_calls), timeout=3600)
    result["build_s"] = build_s
    return result


def run(sizes: Sizes) -> Section:
    section = Section("7. Scale of pending approvals on PostgreSQL")
    absent = unreachable()
    if absent:
        section.add(absent, "")
        return section
    batch = sizes.sweep_batch
    levels = sizes.postgres_scale_levels
    results = {n: _level(n, batch, sizes.page_calls) for n in levels}
    section.add(
        f"Server: {SERVER.split('@')[-1]} (the machine's PostgreSQL). Each level a fresh"
        f" schema; N executions paused through `app.run` by {BUILDERS} processes"
        f' ({LANES} in flight each, `synchronous="NORMAL"` for setup), measured in a'
        " fresh process on the default FULL after `VACUUM ANALYZE`. `first page` ="
        f" `app.pending(limit=50)`, median of {sizes.page_calls} calls; `sweep` ="
        f" `app.fire_due_timers()` with exactly {batch:,} of the N timers due, best of 2,"
        " each fired timer running the rest of its execution (timeout, model turn, final"
        " answer). Bytes: every table of the schema with its indexes and TOAST, divided"
        " by N.",
        "",
    )
    rows = [
        [
            f"{n:,}",
            fmt(n / r["build_s"]),
            fmt(r["bytes"] / n),
            f"{r['page_s'] * 1000:.3f}",
            f"{r['sweep_s']:.3f}",
        ]
        for n, r in results.items()
    ]
    section.add(
        *table(
            [
                "paused executions",
                "setup runs/s",
                "bytes / paused execution",
                "first page ms",
                f"{batch:,}-timer sweep s",
            ],
            rows,
        ),
        "",
    )
    biggest = max(results)
    big, small = results[biggest], results[min(results)]
    tables = ", ".join(
        f"{rel.removeprefix('clearance_')} {size / biggest:,.0f}"
        for rel, size in sorted(big["tables"].items(), key=lambda kv: -kv[1])
        if size / biggest >= 1
    )
    section.add(f"Bytes per paused execution by table at {biggest:,}: {tables}.", "")
    for what, key in (("first page", "page_s"), (f"{batch:,}-timer sweep", "sweep_s")):
        grew = big[key] / small[key]
        section.targets.append(
            Target(
                f"7. PostgreSQL {what} at {biggest:,} pending",
                f"within 1.5x of its cost at {min(results):,}",
                f"{grew:.2f}x ({small[key] * 1000:.2f} -> {big[key] * 1000:.2f} ms)",
                grew <= 1.5,
            )
        )
    return section
