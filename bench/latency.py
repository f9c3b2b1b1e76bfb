"""Benchmark 4: approval latency across processes.

The agent's process (this one) hosts the agent inside `async with
Clearance.open(...)`, whose background task polls the store every
`poll_interval`. A second process (`python -m bench --worker decider DB`, a
long-lived Python process doing what `clearance approve` does: `app.decide()`
on the same file, without hosting the agent) records the decision and
reports the monotonic time right after the commit. Latency = the moment the
tool handler starts in the agent's process minus that time (CLOCK_MONOTONIC
is system-wide on Linux, so the two processes' readings compare).

The decider waits a random 0..poll_interval before deciding so decisions land
at every phase of the poll loop, as real ones do.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from typing import Any

from bench.agents import AGENT, INPUT, RESULT, define_refund_agent
from bench.common import ROOT, Section, Sizes, Target, percentile, scratch_dir, table
from clearance import Clearance, ToolContext
from clearance.app import DEFAULT_POLL_INTERVAL


async def _decider(store: str) -> None:
    """Worker: decide each request id read from stdin, after the delay given with it."""
    loop = asyncio.get_running_loop()
    app = Clearance.open(store)
    try:
        print("ready", flush=True)
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line.strip():
                return
            request_id, delay = line.split()
            await asyncio.sleep(float(delay))
            await app.decide(request_id, approved=True, by="bench-decider")
            print(f"{time.monotonic():.9f}", flush=True)
    finally:
        await app.close()


def decider(store: str) -> dict[str, Any]:
    asyncio.run(_decider(store))
    return {}


async def measure_latency(store: str, poll: float, samples: int) -> list[float]:
    """Seconds from a decision's commit in another process to the tool's start here."""
    started: dict[str, float] = {}
    arrived = asyncio.Event()

    async def handler(ctx: ToolContext, params: dict[str, Any]) -> dict[str, Any]:
        started[ctx.request_id or ""] = time.monotonic()
        arrived.set()
        return RESULT

    latencies = []
    async with Clearance.open(store, poll_interval=poll) as app:
        model = define_refund_agent(app, handler=handler)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench",
            "--worker",
            "decider",
            store,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            ready = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert ready.strip() == b"ready", ready
            for _ in range(samples):
                ex = await app.run(AGENT, input=INPUT)
                request_id = ex.pending_approvals[0].request_id
                arrived.clear()
                proc.stdin.write(f"{request_id} {random.uniform(0, poll):.6f}\n".encode())
                await proc.stdin.drain()
                decided = float(await asyncio.wait_for(proc.stdout.readline(), 30))
                await asyncio.wait_for(arrived.wait(), 30)
                latencies.append(started[request_id] - decided)
                for _ in range(3000):  # let the execution finish before the next one
                    if (await app.get_execution(ex.id)).status == "completed":
                        break
                    await asyncio.sleep(0.001)
                model.requests.clear()
        finally:
            proc.stdin.close()
            await asyncio.wait_for(proc.wait(), 30)
    return latencies


def run(sizes: Sizes) -> Section:
    section = Section("4. Approval latency across processes")
    section.add(
        "A second process records the decision with `app.decide(request_id, approved=True)` "
        "on the same SQLite file (what `clearance approve` does) and does not host the "
        "agent; latency runs from just after its commit to the tool handler's first line in "
        "the agent's process. The runtime's poll interval is `poll_interval`, default "
        f"{DEFAULT_POLL_INTERVAL} s. {sizes.latency_samples} decisions per interval, each "
        "made after a random 0..poll_interval delay; `synchronous=FULL` (the default). "
        "Percentiles are nearest-rank: with 50 samples p99 is the largest.",
        "",
    )
    rows = []
    for poll in sizes.poll_intervals:
        with scratch_dir("latency") as where:
            store = f"sqlite:///{where / 'bench.db'}"
            latencies = asyncio.run(measure_latency(store, poll, sizes.latency_samples))
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        default = " (default)" if poll == DEFAULT_POLL_INTERVAL else ""
        rows.append(
            [
                f"{poll:g} s{default}",
                f"{p50 * 1000:.1f}",
                f"{p99 * 1000:.1f}",
                f"{max(latencies) * 1000:.1f}",
                f"{p99 / poll:.2f}x",
            ]
        )
        section.targets.append(
            Target(
                "4. latency",
                f"p99 <= 2x poll interval ({poll:g} s)",
                f"p99 {p99 * 1000:.0f} ms = {p99 / poll:.2f}x",
                p99 <= 2 * poll,
            )
        )
    section.add(*table(["poll interval", "p50 ms", "p99 ms", "max ms", "p99 / interval"], rows))
    return section
