import asyncio
import json
import os

from clearance import Clearance, HumanInLoop, Model, Tool, ToolContext
from clearance.testing import ScriptedModel, text, tool_use

ORDERS = {"ORD-123": {"orderId": "ORD-123", "total": 50, "status": "delivered"}}
REFUNDS: list[dict] = []  # stands in for your payment API


async def process_refund(ctx: ToolContext, params: dict) -> dict:
    # Only executes after approval. ctx.idempotency_key is stable for this approval:
    # pass it to your payment API so a retry can never refund twice.
    REFUNDS.append({**params, "idempotency_key": ctx.idempotency_key})
    return {"refunded": params["amount"], "orderId": params["orderId"]}


def get_order(ctx: ToolContext, params: dict) -> dict:  # sync handlers run in a thread
    return ORDERS.get(params["orderId"], {"error": "no such order"})


def model() -> Model | ScriptedModel:
    if os.environ.get("ANTHROPIC_API_KEY"):
        return Model(provider="anthropic", model="claude-sonnet-4-20250514")
    # Offline: a scripted model that asks for the refund, then answers.
    refund = {"orderId": "ORD-123", "amount": 50, "reason": "Damaged item"}
    return ScriptedModel(
        [[tool_use("process-refund", refund)], [text("I've processed the $50 refund.")]]
    )


async def main() -> None:
    async with Clearance.open("sqlite:///approvals.db") as app:  # or "memory://"
        app.define(
            tag="safe-agent",
            name="Agent with Approvals",
            product="my-product",
            model=model(),
            system_prompt="You are a helpful assistant...",
            tools=[
                Tool(
                    tag="process-refund",
                    description="Process a refund for an order",
                    requires_confirmation=True,  # this tool needs approval
                    parameters={
                        "orderId": {"type": "string", "required": True},
                        "amount": {"type": "number", "required": True},
                        "reason": {"type": "string", "required": True},
                    },
                    handler=process_refund,
                ),
                Tool(
                    tag="get-order",
                    description="Look up order information",
                    requires_confirmation=False,  # no approval needed
                    parameters={"orderId": {"type": "string", "required": True}},
                    handler=get_order,
                ),
            ],
            human_in_loop=HumanInLoop(
                enabled=True,
                always_require_approval=["process-refund"],
                approval_timeout=300_000,  # 5 minutes, in ms as in the spec
            ),
        )

        ex = await app.run("safe-agent", input="Refund order ORD-123, it arrived damaged")
        print("status:", ex.status)  # awaiting_approval
        if not ex.pending_approvals:  # a real model may answer without asking
            print("no approval was needed:", ex.output)
            return
        req = ex.pending_approvals[0]
        print(json.dumps(req.to_dict(), indent=2))  # the spec's approval request

        # Approve / approve with modifications / reject: the spec's signal API.
        ex = await app.signal(ex.id, "approve", request_id=req.request_id, by="ops-lead")
        # ex = await app.signal(ex.id, "approve", request_id=req.request_id,
        #                       modified_params={"amount": 25}, by="ops-lead")
        # ex = await app.signal(ex.id, "reject", request_id=req.request_id,
        #                       reason="Amount exceeds policy limit", by="finance-reviewer")
        print("status:", ex.status, "| output:", ex.output)  # completed
        print("refunds made:", REFUNDS)

        print("still pending:", len(await app.pending()))  # all pending, oldest first
        for record in await app.audit(execution_id=ex.id):  # who decided what, when, why
            print("audit:", record.decision, "by", record.by)
        history = await app.get_execution(ex.id)  # state plus the full event history
        print("events:", ", ".join(type(e).TAG for e in history.events))


asyncio.run(main())
