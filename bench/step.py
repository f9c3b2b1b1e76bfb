"""Benchmark 3: the cost of one `decide()` step against one `transitions` trigger.

The event mix is real: the scenarios below run through Clearance (in-memory
store, fake clock), and their stored event logs are replayed through
`decide()` from a fresh `Execution`, as the replay guarantee does (and as
the SQLite store does on every load). The reference is one trigger on the
shared machine (`execution_move_allowed`) for the same (event, source,
destination) triples. `decide()` no longer triggers the machine itself: it
checks each move against sets read from the same machines once at import
(`core/machine.py`; tests/test_state_table.py keeps the two equal).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from bench.agents import INPUT, PARAMS, SAYS, SCHEMA, TOOL, process_refund
from bench.common import Section, Sizes, Target, fmt, ratio, table
from clearance import Clearance, HumanInLoop, Tool
from clearance.core.agent import AgentSpec
from clearance.core.decide import decide
from clearance.core.events import Event
from clearance.core.execution import Execution
from clearance.core.machine import execution_move_allowed
from clearance.ports.model import ModelRequest
from clearance.testing import FakeClock, ScriptedModel, SequentialIds, text, tool_use

# scenario -> how many runs of it per 100 (a plausible mix for a gated agent)
MIX = {
    "approve": 30,
    "approve-modified": 10,
    "reject": 10,
    "timeout": 10,
    "lookup-then-approve": 15,
    "two-calls-sequential": 5,
    "two-calls-parallel": 5,
    "stop": 5,
    "invalid-then-approve": 5,
    "no-tools": 5,
}

Log = tuple[AgentSpec, tuple[Event, ...]]


def _script(request: ModelRequest) -> list[dict[str, Any]]:
    scenario = str(request.messages[0]["content"]).split(":", 1)[0]
    turn = sum(1 for m in request.messages if m["role"] == "assistant")
    refund = [text(SAYS), tool_use(TOOL, PARAMS)]
    answer = [text("Done: the refund is settled.")]
    plays: dict[str, list[list[dict[str, Any]]]] = {
        "lookup-then-approve": [[tool_use("get-order", {"orderId": "ORD-123"})], refund, answer],
        "two-calls-sequential": [[tool_use(TOOL, PARAMS), tool_use(TOOL, PARAMS)], answer],
        "two-calls-parallel": [[tool_use(TOOL, PARAMS), tool_use(TOOL, PARAMS)], answer],
        "invalid-then-approve": [[tool_use(TOOL, {"orderId": "ORD-123"})], refund, answer],
        "no-tools": [answer],
    }
    play = plays.get(scenario, [refund, answer])
    blocks: list[dict[str, Any]] = play[min(turn, len(play) - 1)]
    return blocks


async def _record_logs() -> list[Log]:
    clock = FakeClock()
    app = Clearance.open("memory://", clock=clock, ids=SequentialIds())
    tools = [
        Tool(
            tag=TOOL,
            description="Process a refund for an order",
            parameters=SCHEMA,
            requires_confirmation=True,
            handler=process_refund,
        ),
        Tool(
            tag="get-order",
            description="Look up order information",
            parameters={"orderId": {"type": "string", "required": True}},
            handler=lambda ctx, params: {"orderId": params["orderId"], "total": 80},
        ),
    ]
    for tag, order in (("sequential", "sequential"), ("parallel", "parallel")):
        app.define(
            tag=tag,
            model=ScriptedModel(_script),
            tools=tools,
            system_prompt="You are a helpful assistant...",
            human_in_loop=HumanInLoop(enabled=True, approval_order=order),
        )
    logs: list[Log] = []
    try:
        for scenario, weight in MIX.items():
            for _ in range(weight):
                tag = "parallel" if scenario == "two-calls-parallel" else "sequential"
                ex = await app.run(tag, input=f"{scenario}: {INPUT}")
                while ex.status == "awaiting_approval":
                    request = ex.pending_approvals[0]
                    if scenario == "reject":
                        ex = await app.decide(
                            request.request_id, approved=False, reason="Over the limit", by="b"
                        )
                    elif scenario == "timeout":
                        clock.advance(minutes=6)
                        await app.fire_due_timers()
                        ex = (await app.get_execution(ex.id)).execution
                    elif scenario == "stop":
                        ex = await app.signal(ex.id, "stop", by="b", reason="Customer withdrew")
                    else:
                        modified = {"amount": 25} if scenario == "approve-modified" else None
                        ex = await app.decide(
                            request.request_id, approved=True, modified_params=modified, by="b"
                        )
                assert ex.status in ("completed", "stopped"), (scenario, ex.status)
                history = await app.get_execution(ex.id)
                logs.append((history.execution.agent, history.events))
    finally:
        await app.close()
    return logs


def _replay(logs: Sequence[Log]) -> int:
    steps = 0
    for spec, events in logs:
        ex = Execution(agent=spec)
        for event in events:
            ex, _ = decide(ex, event)
        steps += len(events)
    return steps


def _moves(logs: Sequence[Log]) -> list[tuple[str, str, str]]:
    moves = []
    for spec, events in logs:
        ex = Execution(agent=spec)
        for event in events:
            source = ex.status
            ex, _ = decide(ex, event)
            moves.append((event.TAG, source, ex.status))
    return moves


def _timed(work: Any, seconds: float) -> tuple[int, float]:
    """Repeat `work()` (which returns how many steps it did) for about `seconds`."""
    work()  # warm-up
    steps = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        steps += work()
    return steps, elapsed


def run(sizes: Sizes) -> Section:
    logs = asyncio.run(_record_logs())
    moves = _moves(logs)

    def triggers() -> int:
        for move in moves:
            execution_move_allowed(*move)
        return len(moves)

    best_decide = best_trigger = float("inf")
    for _ in range(3):  # interleaved, best of 3: the least disturbed run of each
        steps, elapsed = _timed(lambda: _replay(logs), sizes.replay_seconds)
        best_decide = min(best_decide, elapsed / steps)
        steps, elapsed = _timed(triggers, sizes.replay_seconds)
        best_trigger = min(best_trigger, elapsed / steps)

    mix = Counter(tag for tag, _, _ in moves)
    section = Section("3. Core step cost: `decide()` vs one `transitions` trigger")
    section.add(
        f"{len(logs)} recorded runs ({', '.join(f'{k} x{v}' for k, v in MIX.items())}), "
        f"{len(moves)} events: "
        + ", ".join(f"{tag} {count / len(moves):.0%}" for tag, count in mix.most_common())
        + ". Each log is replayed through `decide()` from `Execution(agent=spec)`; the "
        "reference triggers the shared machine once for each of the same moves. "
        f"About {sizes.replay_seconds:g} s per measurement, best of 3.",
        "",
        *table(
            ["what", "steps/s", "µs/step", "vs trigger"],
            [
                [
                    "`decide()` over the replayed mix",
                    fmt(1 / best_decide),
                    f"{best_decide * 1e6:.1f}",
                    ratio(best_decide / best_trigger),
                ],
                [
                    "one trigger (`execution_move_allowed`)",
                    fmt(1 / best_trigger),
                    f"{best_trigger * 1e6:.1f}",
                    "1.00x",
                ],
            ],
        ),
    )
    cost = best_decide / best_trigger
    section.targets.append(
        Target("3. core step", "decide() <= 2x one trigger", ratio(cost), cost <= 2)
    )
    return section
