"""The host process of the crash harness (tests/test_crash.py): SIGKILLed at random moments.

    python crash_process.py DB EVENTS --seed N --launch L [--start K]

Opens the SQLite file DB through the public API only, defines two agents (one
with sequential approvals, one with `approval_order="parallel"`), starts K
executions (inputs `order L-0` ... `order L-{K-1}`) and hosts until killed.
stdout: `ready <pid>` once it hosts, then `started <execution id> <status>` per
start that came back.

Every model call, every tool run and every broken tool_use/tool_result pairing
is one JSON line appended to EVENTS (O_APPEND, fsync'd) *before* the call goes
on, so the test counts them from outside across any number of kills. Sleeps
(model 0-30 ms, handlers 0-50 ms) widen the windows a kill can land in; their
lengths derive from --seed and the call, so a trial repeats apart from the
moments of the kills.

The scripted conversation, by the order's index (the model's turn = number of
assistant messages so far):

    seq-agent: get-order | process-refund [+ get-order] | send-email | final text
    par-agent: get-order | process-refund + send-email + get-order (parallel) | final text

`process-refund` and `send-email` are gated; `send-email` times out after
EMAIL_TIMEOUT_MS so timeouts happen too; `get-order` is not gated. A policy lets a
refund of ALLOWED_UP_TO run unasked and denies one above DENIED_ABOVE; each order
asks for one of those or for one in between (a person decides).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import time
from typing import Any

from clearance import Clearance, HumanInLoop, ModelRequest, Rule, Tool, ToolContext
from clearance.testing import ScriptedModel, text, tool_use

EMAIL_TIMEOUT_MS = 1_000
REFUND_TIMEOUT_MS = 300_000
GATED = ("process-refund", "send-email")
# The policy both agents run under: small refunds run unasked, large ones never.
ALLOWED_UP_TO = 30
DENIED_ABOVE = 100
REFUND_RULES = [
    Rule.deny("process-refund", when=f"args.amount > {DENIED_ABOVE}.0", id="too-large"),
    Rule.allow("process-refund", when=f"args.amount <= {ALLOWED_UP_TO}.0", id="small"),
]


class Events:
    """One JSON object per line, appended and fsync'd before the caller goes on."""

    def __init__(self, path: str, launch: int) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.launch = launch

    def write(self, **record: Any) -> None:
        record.update(launch=self.launch, pid=os.getpid(), t=time.time())
        os.write(self._fd, (json.dumps(record, sort_keys=True) + "\n").encode())
        os.fsync(self._fd)


def order_of(request: ModelRequest) -> str:
    first = request.messages[0]["content"]
    assert isinstance(first, str) and first.startswith("order "), first
    return first.removeprefix("order ")


def pairing_problems(messages: list[dict[str, Any]]) -> list[str]:
    """Guarantee 5: every tool_use gets exactly one tool_result, in order, in the next message."""
    problems = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or isinstance(message["content"], str):
            continue
        uses = [b["id"] for b in message["content"] if b.get("type") == "tool_use"]
        if not uses:
            continue
        if i + 1 >= len(messages):
            problems.append(f"message {i}: tool_use {uses} has no following message")
            continue
        reply = messages[i + 1]["content"]
        results = (
            []
            if isinstance(reply, str)
            else [b.get("tool_use_id") for b in reply if b.get("type") == "tool_result"]
        )
        if results != uses:
            problems.append(f"message {i}: tool_use ids {uses} answered by tool_results {results}")
    return problems


def define_agents(app: Clearance, events: Events, seed: int) -> None:
    def pause(*key: Any, upto: float) -> float:
        return random.Random(":".join(map(str, (seed, *key)))).uniform(0, upto)

    async def script(request: ModelRequest) -> list[dict[str, Any]]:
        order = order_of(request)
        turn = sum(1 for m in request.messages if m["role"] == "assistant")
        events.write(kind="model", execution=request.execution_id, order=order, turn=turn)
        problems = pairing_problems(list(request.messages))
        if problems:
            events.write(kind="violation", execution=request.execution_id, problems=problems)
        await asyncio.sleep(pause("model", order, turn, upto=0.03))
        refund = {"orderId": f"ORD-{order}", "amount": amount_of(seed, order), "reason": "Damaged"}
        email = {"to": f"customer-{order}@example.com", "body": "Your refund is on its way."}
        lookup = {"orderId": f"ORD-{order}"}
        parallel = uses_parallel(seed, order)
        if turn == 0:
            return [text("Looking the order up."), tool_use("get-order", lookup)]
        if parallel and turn == 1:
            return [
                text("Refunding, telling the customer, checking again."),
                tool_use("process-refund", refund),
                tool_use("send-email", email),
                tool_use("get-order", lookup),
            ]
        if not parallel and turn == 1:
            blocks = [text("Refunding."), tool_use("process-refund", refund)]
            if random.Random(f"{seed}:second-lookup:{order}").random() < 0.5:
                blocks.append(tool_use("get-order", lookup))
            return blocks
        if not parallel and turn == 2:
            return [text("Telling the customer."), tool_use("send-email", email)]
        return [text(f"Done with order {order}.")]

    async def run_tool(ctx: ToolContext, params: dict[str, Any]) -> dict[str, Any]:
        events.write(
            kind="run",
            tool=ctx.tool,
            key=ctx.idempotency_key,
            request=ctx.request_id,
            execution=ctx.execution_id,
            params=params,
        )
        await asyncio.sleep(pause("tool", ctx.idempotency_key, upto=0.05))
        return {"ok": True, "tool": ctx.tool, "key": ctx.idempotency_key}

    def get_order(ctx: ToolContext, params: dict[str, Any]) -> dict[str, Any]:
        # Synchronous, so it runs in a worker thread: a kill can land there too.
        events.write(
            kind="run",
            tool=ctx.tool,
            key=ctx.idempotency_key,
            request=ctx.request_id,
            execution=ctx.execution_id,
            params=params,
        )
        time.sleep(pause("tool", ctx.idempotency_key, upto=0.05))
        return {"orderId": params["orderId"], "total": 80, "status": "delivered"}

    tools = [
        Tool(
            tag="get-order",
            description="Look up an order",
            parameters={"orderId": {"type": "string", "required": True}},
            handler=get_order,
        ),
        Tool(
            tag="process-refund",
            description="Refund an order",
            requires_confirmation=True,
            parameters={
                "orderId": {"type": "string", "required": True},
                "amount": {"type": "number", "required": True},
                "reason": {"type": "string", "required": True},
            },
            handler=run_tool,
        ),
        Tool(
            tag="send-email",
            description="Email the customer",
            requires_confirmation=True,
            approval_timeout=EMAIL_TIMEOUT_MS,
            parameters={
                "to": {"type": "string", "required": True},
                "body": {"type": "string", "required": True},
            },
            handler=run_tool,
        ),
    ]
    for tag, order in (("seq-agent", "sequential"), ("par-agent", "parallel")):
        app.define(
            tag=tag,
            model=ScriptedModel(script),
            tools=tools,
            human_in_loop=HumanInLoop(
                enabled=True,
                approval_timeout=REFUND_TIMEOUT_MS,
                approval_order=order,
                policy=REFUND_RULES,
            ),
        )


def amount_of(seed: int, order: str) -> int:
    """The refund an order asks for: one the policy allows, one it asks about, one it denies."""
    return random.Random(f"{seed}:amount:{order}").choice([ALLOWED_UP_TO, 70, DENIED_ABOVE + 10])


def open_options() -> dict[str, Any]:
    """A short lease, so a killed host's claims are taken over within seconds rather
    than the default 30 s. CLEARANCE_TEST_LEASE sets it (seconds)."""
    lease = float(os.environ.get("CLEARANCE_TEST_LEASE", "2"))
    return {"lease": lease, "renew_every": lease / 4}


def uses_parallel(seed: int, order: str) -> bool:
    return random.Random(f"{seed}:agent:{order}").random() < 0.35


async def host(args: argparse.Namespace) -> None:
    events = Events(args.events, args.launch)
    async with Clearance.open(args.store, poll_interval=0.05, **open_options()) as app:
        define_agents(app, events, args.seed)
        print(f"ready {os.getpid()}", flush=True)

        async def start(k: int) -> None:
            order = f"{args.launch}-{k}"
            tag = "par-agent" if uses_parallel(args.seed, order) else "seq-agent"
            ex = await app.run(tag, input=f"order {order}")
            print(f"started {ex.id} {ex.status}", flush=True)

        await asyncio.gather(*(start(k) for k in range(args.start)))
        await asyncio.Event().wait()  # host until SIGKILLed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store", help="the store URL")
    parser.add_argument("events")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--launch", type=int, required=True)
    parser.add_argument("--start", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(host(args))


if __name__ == "__main__":
    sys.exit(main())
