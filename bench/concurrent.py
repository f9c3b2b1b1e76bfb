"""Benchmark 5: many executions in flight in one process, against one at a time.

The cycle is benchmark 1's (run -> the model asks for the gated refund -> durable
pause -> approve with `app.signal` -> the tool runs -> final answer). Here
`in_flight` executions go through it at once in ONE process and one event loop:
each of `in_flight` lanes starts its next cycle the moment its last one ends, so
the number in flight stays at `in_flight` until the last few cycles.

In the same run, and interleaved in rounds as benchmark 1 does (a fresh
database per measurement), it measures Clearance one at a time and holdpoint
one at a time (benchmark 1's functions) and holdpoint with as many in flight,
through its async API (`async def` guard + `approve_async`).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from bench import cycle
from bench.agents import (
    AGENT,
    COMMIT_STATEMENTS,
    INPUT,
    PARAMS,
    CommitCounter,
    define_refund_agent,
    holdpoint_refund_async,
    holdpoint_store,
)
from bench.common import (
    Section,
    Sizes,
    Target,
    fmt,
    load_average,
    median,
    ratio,
    scratch_dir,
    table,
)
from clearance import Clearance

SYNCS = cycle.SYNCS
MAX_CONCURRENCY = 32  # Clearance.open's default, spelled out


@dataclass
class Result:
    """One timed run: `count` cycles in `seconds`, with `commits` COMMITs SQLite ran."""

    count: int
    seconds: float
    commits: int

    @property
    def rate(self) -> float:
        return self.count / self.seconds


class SharedCommitCounter(CommitCounter):
    """`CommitCounter` for connections used from several threads."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def __call__(self, statement: str) -> None:
        if statement in COMMIT_STATEMENTS:
            with self._lock:
                self.commits += 1


async def in_flight(one: Callable[[], Awaitable[None]], n: int, width: int) -> float:
    """Run `n` cycles with `width` in flight (`width` lanes, each starting its next cycle
    as soon as its last one ends); the seconds it took."""
    left = n

    async def lane() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(min(width, n))))
    return time.perf_counter() - start


# -- the systems ------------------------------------------------------------------------


async def _clearance_concurrent(path: Path, synchronous: str, n: int, width: int) -> Result:
    async with Clearance.open(
        f"sqlite:///{path}", synchronous=synchronous, max_concurrency=MAX_CONCURRENCY
    ) as app:
        model = define_refund_agent(app)
        counter = CommitCounter()
        app.store._db.set_trace_callback(counter)  # type: ignore[attr-defined]

        async def one() -> None:
            ex = await app.run(AGENT, input=INPUT)
            assert ex.status == "awaiting_approval", ex.status
            request = ex.pending_approvals[0]
            ex = await app.signal(ex.id, "approve", request_id=request.request_id, by="bench")
            assert ex.status == "completed", ex.status

        await in_flight(one, width, width)  # warm-up: one full set in flight, untimed
        model.requests.clear()
        before = counter.commits
        seconds = await in_flight(one, n, width)
        commits = counter.commits - before
        model.requests.clear()
    return Result(n, seconds, commits)


def clearance_concurrent(path: Path, synchronous: str, n: int, width: int) -> Result:
    return asyncio.run(_clearance_concurrent(path, synchronous, n, width))


async def _holdpoint_concurrent(path: Path, synchronous: str, n: int, width: int) -> Result:
    from holdpoint import HoldPoint

    counter = SharedCommitCounter()
    store = holdpoint_store(str(path), synchronous, counter)
    hold = HoldPoint(store=store)
    refund = holdpoint_refund_async(hold)

    async def one() -> None:
        action = await refund(**PARAMS)
        decision = await hold.approve_async(action.id, actor="bench")
        assert decision.action.status.value == "executed", decision

    try:
        await in_flight(one, width, width)
        before = counter.commits
        seconds = await in_flight(one, n, width)
        commits = counter.commits - before
        return Result(n, seconds, commits)
    finally:
        store.close()


def holdpoint_concurrent(path: Path, synchronous: str, n: int, width: int) -> Result:
    return asyncio.run(_holdpoint_concurrent(path, synchronous, n, width))


def clearance_serial(path: Path, synchronous: str, n: int, width: int) -> Result:
    run = cycle.clearance(path, synchronous, n)
    return Result(run.count, run.seconds, run.commits)


def holdpoint_serial(path: Path, synchronous: str, n: int, width: int) -> Result:
    run = cycle.holdpoint(path, synchronous, n)
    return Result(run.count, run.seconds, run.commits)


OURS = "Clearance, concurrent"
SERIAL = "Clearance, one at a time"
HP_CONCURRENT = "holdpoint, concurrent"
HP_SERIAL = "holdpoint, one at a time"
SYSTEMS: dict[str, Callable[[Path, str, int, int], Result]] = {
    OURS: clearance_concurrent,
    SERIAL: clearance_serial,
    HP_CONCURRENT: holdpoint_concurrent,
    HP_SERIAL: holdpoint_serial,
}


# -- the benchmark ------------------------------------------------------------------------


def run(sizes: Sizes) -> Section:
    n, width = sizes.concurrent_cycles, sizes.in_flight
    load_before = load_average()
    runs: dict[tuple[str, str], list[Result]] = {}
    failures: dict[str, str] = {}
    for round_no in range(sizes.rounds):
        for synchronous in SYNCS:
            for name, system in SYSTEMS.items():
                if name in failures:
                    continue
                with scratch_dir(f"concurrent{round_no}") as where:
                    try:
                        result = system(where / "bench.db", synchronous, n, width)
                    except Exception as err:
                        if name in (OURS, SERIAL):
                            raise
                        # A competitor that cannot do this is reported, not fatal.
                        failures[name] = f"{type(err).__name__}: {err}"
                        continue
                runs.setdefault((name, synchronous), []).append(result)
    load_after = load_average()

    section = Section(f"5. Concurrent executions in one process ({width} in flight, SQLite)")
    section.add(
        f"{n:,} cycles per system per round, {sizes.rounds} interleaved rounds (FULL and "
        "NORMAL for each system in turn, a fresh WAL database each time), median "
        "(min-max) reported. Concurrent: "
        f"{width} lanes on one event loop, each starting its next cycle as soon as its "
        f"last one ends, after an untimed warm-up of {width} cycles; Clearance runs with "
        f"`max_concurrency={MAX_CONCURRENCY}` (its default). One at a time: benchmark 1's "
        f"functions ({cycle.WARMUP} warm-up cycles), with the same cycle count. holdpoint "
        "can run concurrently: an `async def` guard and `approve_async` send every store "
        "call through `asyncio.to_thread` (the loop's default executor: "
        f"min(32, CPUs + 4) = {min(32, (os.cpu_count() or 1) + 4)} threads here), one "
        "SQLite connection per thread, writers serialised by `BEGIN IMMEDIATE` and "
        "SQLite's busy timeout. Commits/cycle: COMMIT statements seen by SQLite's trace "
        "hook on every connection of the system, pickups and lease writes included. "
        f"Load average (1, 5, 15 min) before: {load_before}; after: {load_after} "
        "(2 shared CPUs: other jobs may run at the same time).",
        "",
    )
    for name, error in failures.items():
        section.add(f"{name} could not run: {error}", "")

    def rates(name: str, synchronous: str) -> list[float]:
        return [r.rate for r in runs.get((name, synchronous), [])]

    rows = []
    verdicts = []
    for synchronous in SYNCS:
        ours = median(rates(OURS, synchronous))
        for name in SYSTEMS:
            results = runs.get((name, synchronous))
            if not results:
                rows.append([synchronous, name, "-", "could not run", "-", "-"])
                continue
            rate = median([r.rate for r in results])
            rows.append(
                [
                    synchronous,
                    name,
                    width if "concurrent" in name else 1,
                    f"{fmt(rate)} ({fmt(min(r.rate for r in results))}-"
                    f"{fmt(max(r.rate for r in results))})",
                    fmt(median([r.commits / r.count for r in results])),
                    "-" if name == OURS else ratio(ours / rate),
                ]
            )

        mine = rates(OURS, synchronous)
        holdpoints = [h for h in (HP_CONCURRENT, HP_SERIAL) if rates(h, synchronous)]
        best_hp = max(holdpoints, key=lambda h: median(rates(h, synchronous)))
        hp = median(rates(best_hp, synchronous))
        serial = median(rates(SERIAL, synchronous))
        vs_hp = [
            mine[i] / max(rates(h, synchronous)[i] for h in holdpoints) for i in range(len(mine))
        ]
        vs_serial = [mine[i] / rates(SERIAL, synchronous)[i] for i in range(len(mine))]
        checks = [
            (
                f">= 1.5x holdpoint (its faster mode: {best_hp.split(', ')[1]})",
                ours / hp,
                vs_hp,
                1.5,
            ),
            (">= 3x Clearance one at a time", ours / serial, vs_serial, 3.0),
        ]
        for goal, value, paired, needed in checks:
            met = value >= needed
            measured = f"{ratio(value)} ({cycle.paired_spread(paired)})"
            verdicts.append([synchronous, goal, measured, "pass" if met else "**miss**"])
            section.targets.append(Target(f"5. concurrent, {synchronous}", goal, measured, met))

    section.add(
        *table(
            [
                "synchronous",
                "system",
                "in flight",
                "cycles/s",
                "commits/cycle",
                "Clearance concurrent is",
            ],
            rows,
        ),
        "",
        *table(["synchronous", "Clearance concurrent", "ratio (per round)", "result"], verdicts),
    )
    return section
