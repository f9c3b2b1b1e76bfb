"""A process that pauses on an approval with a webhook agent and dies before delivering it.

    python webhook_process.py DB WEBHOOK_URL PUBLIC_URL SECRET exit
    python webhook_process.py DB WEBHOOK_URL PUBLIC_URL SECRET hold

`exit`: never enters `async with` (no background delivery), runs until paused,
prints, closes and exits. `hold`: enters `async with` with a 60 s poll interval
and the relay's wake-up on commit turned off, runs until paused, prints, then
waits to be SIGKILLed before its delivery loop looks again. Either way the
request is committed, with its `deliveries` row, and nothing has been sent.
Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys

from clearance import Clearance, HumanInLoop, Tool, ToolContext
from clearance.testing import ScriptedModel, text, tool_use

REFUND = {"orderId": "ORD-123", "amount": 50, "reason": "Damaged item"}
PARAMS = {
    "orderId": {"type": "string", "required": True},
    "amount": {"type": "number", "required": True},
    "reason": {"type": "string", "required": True},
}


def define(app: Clearance, webhook_url: str) -> None:
    async def process_refund(ctx: ToolContext, params: dict[str, object]) -> dict[str, object]:
        return {"refunded": params["amount"]}

    app.define(
        tag="safe-agent",
        model=ScriptedModel([[text("Refunding."), tool_use("process-refund", REFUND)], []]),
        tools=[
            Tool(
                tag="process-refund",
                parameters=PARAMS,
                requires_confirmation=True,
                handler=process_refund,
            )
        ],
        human_in_loop=HumanInLoop(enabled=True, approval_webhook=webhook_url),
    )


async def main(db: str, webhook_url: str, public_url: str, secret: str, mode: str) -> None:
    app = Clearance.open(
        f"sqlite:///{db}", public_url=public_url, webhook_secret=secret, poll_interval=60
    )
    if mode == "hold":
        await app.__aenter__()
        await asyncio.sleep(0.1)  # the delivery loop has looked once (nothing yet) and sleeps
        # The commit below would wake it at once: keep it asleep, so the kill lands in
        # the window between the commit and the relay's next look.
        app.engine.on_deliveries = lambda: None
    define(app, webhook_url)
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    [request] = ex.pending_approvals
    print(json.dumps({"status": ex.status, "request_id": request.request_id}), flush=True)
    if mode == "hold":
        await asyncio.sleep(60)  # SIGKILLed here
    await app.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
