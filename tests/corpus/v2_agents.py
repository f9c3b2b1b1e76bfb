"""The agents the schema-2 corpus (`v2.sqlite3`) was written with, to host them again.

Imported by `make_v2_corpus.py` (which wrote the corpus, against the release that
wrote schema 2) and by `tests/test_upgrade.py` (which opens the corpus with the
current code). Only public API that existed at schema 2 is used here: `Tool`,
`HumanInLoop`, `ToolContext`, `Clearance.define`, and `clearance.testing`'s
`ScriptedModel`, `text` and `tool_use`. Changing a tag, a tool, its parameters or
a script turn here changes the agent spec an execution was stored with (or what
the model says next): regenerate nothing, but expect test_upgrade to notice.
"""

from __future__ import annotations

from typing import Any

from clearance import Clearance, HumanInLoop, Tool, ToolContext
from clearance.testing import ScriptedModel, text, tool_use

# The instance settings the webhook agent needs (define() refuses it without them).
PUBLIC_URL = "https://clearance.example.invalid"
# 'whsec_' + base64 of 32 fixed bytes: a test secret, not a credential.
WEBHOOK_SECRET = "whsec_Y2xlYXJhbmNlLXYyLWNvcnB1cy10ZXN0LXNlY3JldA=="
APPROVAL_WEBHOOK = "https://approvals.example.invalid/hooks/clearance"

ONE_DAY_MS = 86_400_000  # long enough that the corpus's pending requests stay decidable
WIRE_TIMEOUT_MS = 60_000  # short, so the corpus can time a request out

REFUND_PARAMS = {
    "orderId": {"type": "string", "required": True},
    "amount": {"type": "number", "required": True},
    "reason": {"type": "string", "required": True},
}
ORDER_PARAMS = {"orderId": {"type": "string", "required": True}}
WIRE_PARAMS = {
    "iban": {"type": "string", "required": True},
    "amount": {"type": "number", "required": True},
}

REFUND = {"orderId": "ORD-123", "amount": 50, "reason": "Damaged item"}
WIRE = {"iban": "DE89370400440532013000", "amount": 1200}
BATCH_A = {"orderId": "ORD-201", "amount": 20, "reason": "Late delivery"}
BATCH_B = {"orderId": "ORD-202", "amount": 35, "reason": "Wrong size"}
LONG_REFUND = {"orderId": "ORD-309", "amount": 15, "reason": "Duplicate charge"}
LOOKUPS = 9  # the long run's lookup turns before its gated call: > 16 events in all

# Each agent's model replies, turn by turn (turn n = the n-th assistant message).
REFUNDS_SCRIPT = [
    [
        text("I need to process a refund of $50 for order ORD-123"),
        tool_use("process-refund", REFUND),
    ],
    [text("Done.")],
]
WIRES_SCRIPT = [
    [text("Sending the wire transfer."), tool_use("wire-transfer", WIRE)],
    [text("The wire was not sent.")],
]
BATCH_SCRIPT = [
    [
        text("Looking up ORD-200 and refunding ORD-201 and ORD-202."),
        tool_use("get-order", {"orderId": "ORD-200"}),
        tool_use("process-refund", BATCH_A),
        tool_use("process-refund", BATCH_B),
    ],
    [text("All handled.")],
]
AUDITOR_SCRIPT = [
    *([tool_use("get-order", {"orderId": f"ORD-30{turn}"})] for turn in range(LOOKUPS)),
    [text("ORD-309 was charged twice; refunding it."), tool_use("process-refund", LONG_REFUND)],
    [text("Audit finished.")],
]


def looper_script(request: Any) -> list[dict[str, Any]]:
    """Never answers: looks up one more order every turn, until max_iterations."""
    turn = sum(1 for m in request.messages if m["role"] == "assistant") + 1
    return [tool_use("get-order", {"orderId": f"ORD-4{turn:02d}"})]


class Handlers:
    """The tools' handlers; every call is remembered as (tool, execution_id, params)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    async def process_refund(self, ctx: ToolContext, params: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("process-refund", ctx.execution_id, params))
        return {"refunded": params["amount"], "orderId": params["orderId"]}

    def get_order(self, ctx: ToolContext, params: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("get-order", ctx.execution_id, params))
        return {"orderId": params["orderId"], "total": 80, "status": "delivered"}

    async def wire_transfer(self, ctx: ToolContext, params: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("wire-transfer", ctx.execution_id, params))
        return {"sent": params["amount"]}

    def ran(self, tool: str, execution_id: str | None = None) -> list[dict[str, Any]]:
        return [
            params for name, ex, params in self.calls if name == tool and execution_id in (None, ex)
        ]

    def refund(self) -> Tool:
        return Tool(
            tag="process-refund",
            description="Process a refund for an order",
            parameters=REFUND_PARAMS,
            handler=self.process_refund,
            requires_confirmation=True,
        )

    def order(self) -> Tool:
        return Tool(
            tag="get-order",
            description="Look up order information",
            parameters=ORDER_PARAMS,
            handler=self.get_order,
        )

    def wire(self) -> Tool:
        return Tool(
            tag="wire-transfer",
            description="Send a wire transfer",
            parameters=WIRE_PARAMS,
            handler=self.wire_transfer,
            requires_confirmation=True,
            confirmation_message=lambda p: f"Wire {p['amount']} to {p['iban']}?",
            approval_timeout=WIRE_TIMEOUT_MS,
        )


AGENT_TAGS = ("refunds", "wires", "batch-refunds", "webhooked", "auditor", "looper")


def define_agents(app: Clearance, handlers: Handlers) -> None:
    """Define every agent of the corpus on `app`. `app` must have been opened with
    public_url=PUBLIC_URL and webhook_secret=WEBHOOK_SECRET (for 'webhooked')."""
    gated = HumanInLoop(enabled=True, approval_timeout=ONE_DAY_MS)
    app.define(
        tag="refunds",
        name="Refunds (sequential)",
        product="corpus-v2",
        model=ScriptedModel(REFUNDS_SCRIPT),
        system_prompt="You process refunds.",
        tools=[handlers.refund(), handlers.order()],
        human_in_loop=gated,
    )
    app.define(
        tag="wires",
        name="Wires (short approval timeout)",
        product="corpus-v2",
        model=ScriptedModel(WIRES_SCRIPT),
        system_prompt="You send wire transfers.",
        tools=[handlers.wire()],
        human_in_loop=gated,
    )
    app.define(
        tag="batch-refunds",
        name="Batch refunds (parallel approvals)",
        product="corpus-v2",
        model=ScriptedModel(BATCH_SCRIPT),
        system_prompt="You process several refunds at once.",
        tools=[handlers.refund(), handlers.order()],
        human_in_loop=HumanInLoop(
            enabled=True, approval_timeout=ONE_DAY_MS, approval_order="parallel"
        ),
    )
    app.define(
        tag="webhooked",
        name="Refunds (approval webhook)",
        product="corpus-v2",
        model=ScriptedModel(REFUNDS_SCRIPT),
        system_prompt="You process refunds.",
        tools=[handlers.refund()],
        human_in_loop=HumanInLoop(
            enabled=True, approval_timeout=ONE_DAY_MS, approval_webhook=APPROVAL_WEBHOOK
        ),
    )
    app.define(
        tag="auditor",
        name="Auditor (long run)",
        product="corpus-v2",
        model=ScriptedModel(AUDITOR_SCRIPT),
        system_prompt="You audit orders, then refund duplicates.",
        tools=[handlers.refund(), handlers.order()],
        human_in_loop=gated,
    )
    app.define(
        tag="looper",
        name="Looper (hits max_iterations)",
        product="corpus-v2",
        model=ScriptedModel(looper_script),
        system_prompt="You look up orders.",
        tools=[handlers.order()],
        max_iterations=2,
    )
