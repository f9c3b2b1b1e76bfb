"""A second (or third) process for the durability tests: hosts, decides or sweeps.

    python agent_process.py DB pause   [--timeout-ms N] [--exit|--wait] [--slow-model] [--slow-tool]
    python agent_process.py DB decide  REQUEST_ID approve|reject
    python agent_process.py DB fire    ISO_TIME

Every line it prints is one JSON object. Tool runs and model calls are
appended to files next to the database, so the test can count them across
processes, crashes included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from clearance import Clearance, ClearanceError, HumanInLoop, Tool, ToolContext
from clearance.core.execution import RESTING, TERMINAL
from clearance.testing import FakeClock, ScriptedModel, text, tool_use

REFUND = {"orderId": "ORD-123", "amount": 50, "reason": "Damaged item"}
PARAMS = {
    "orderId": {"type": "string", "required": True},
    "amount": {"type": "number", "required": True},
    "reason": {"type": "string", "required": True},
}


def say(**data: Any) -> None:
    print(json.dumps(data), flush=True)


def log_line(db: str, name: str, line: str) -> None:
    with open(Path(db).with_suffix(f".{name}"), "a") as f:
        f.write(line + "\n")
        f.flush()


def refund_agent(
    app: Clearance, db: str, *, timeout_ms: int, slow_model: bool = False, slow_tool: bool = False
) -> None:
    def script(request: Any) -> list[dict[str, Any]]:
        log_line(db, "model", f"{request.execution_id} turn {request.turn}")
        if slow_model:
            time.sleep(60)  # the test kills us during this call
        last = request.messages[-1]["content"]
        if isinstance(last, str):
            return [text("Refunding."), tool_use("process-refund", REFUND)]
        return [text("Finished: " + json.dumps(last[0]["content"]))]

    async def process_refund(ctx: ToolContext, params: dict[str, Any]) -> dict[str, Any]:
        log_line(db, "tool", f"{ctx.idempotency_key} {json.dumps(params)}")
        if slow_tool:
            await asyncio.sleep(60)  # the test kills us during this run
        return {"refunded": params["amount"]}

    async def threaded_script(request: Any) -> list[dict[str, Any]]:
        return await asyncio.to_thread(script, request)

    app.define(
        tag="safe-agent",
        model=ScriptedModel(threaded_script),
        tools=[
            Tool(
                tag="process-refund",
                parameters=PARAMS,
                requires_confirmation=True,
                handler=process_refund,
            )
        ],
        human_in_loop=HumanInLoop(enabled=True, approval_timeout=timeout_ms),
    )


async def pause(args: argparse.Namespace) -> None:
    clock = FakeClock(datetime.fromisoformat(args.fake_now)) if args.fake_now else None
    # A short lease, so a killed host's claims are taken over within seconds.
    async with Clearance.open(
        f"sqlite:///{args.db}", clock=clock, poll_interval=0.05, lease=2, renew_every=0.5
    ) as app:
        refund_agent(
            app,
            args.db,
            timeout_ms=args.timeout_ms,
            slow_model=args.slow_model,
            slow_tool=args.slow_tool,
        )
        ex = await app.run("safe-agent", input="Refund order ORD-123")
        say(
            execution_id=ex.id,
            status=ex.status,
            request_id=ex.pending_approvals[0].request_id if ex.pending_approvals else None,
        )
        if args.exit:
            return
        while ex.status not in TERMINAL:
            await asyncio.sleep(0.02)
            ex = (await app.get_execution(ex.id)).execution
        say(execution_id=ex.id, status=ex.status, output=ex.output)


async def decide(args: argparse.Namespace) -> None:
    async with Clearance.open(f"sqlite:///{args.db}") as app:
        try:
            ex = await app.decide(
                args.request_id,
                approved=args.decision == "approve",
                reason="racing",
                by=f"process-{args.by}",
            )
        except ClearanceError as err:
            say(ok=False, error=str(err))
            return
        say(ok=True, status=ex.status, resting=ex.status in RESTING)


async def fire(args: argparse.Namespace) -> None:
    clock = FakeClock(datetime.fromisoformat(args.now))
    async with Clearance.open(f"sqlite:///{args.db}", clock=clock) as app:
        say(fired=await app.fire_due_timers())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("pause")
    p.add_argument("--timeout-ms", type=int, default=300_000)
    p.add_argument("--exit", action="store_true")
    p.add_argument("--wait", action="store_true", help="host until the execution ends (default)")
    p.add_argument("--slow-model", action="store_true")
    p.add_argument("--slow-tool", action="store_true")
    p.add_argument("--fake-now")
    d = sub.add_parser("decide")
    d.add_argument("request_id")
    d.add_argument("decision", choices=["approve", "reject"])
    d.add_argument("--by", default="x")
    f = sub.add_parser("fire")
    f.add_argument("now")
    args = parser.parse_args()
    asyncio.run({"pause": pause, "decide": decide, "fire": fire}[args.mode](args))


if __name__ == "__main__":
    sys.exit(main())
