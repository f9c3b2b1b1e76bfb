"""The spec's refund scenario, runnable: `clearance demo`, and reusable by tests.

The agent 'safe-agent' looks up order ORD-123, then asks to refund $50. The
refund is gated: the execution pauses, durably, until a human approves (maybe
with a smaller amount), rejects with a reason, or the request times out. The
agent's last turn reads the tool_result it got back and answers accordingly,
with the sentences the spec shows.

The model is a script, so the demo needs no API key. `demo_model()` is the one
place that picks the model, so a real one can be slotted in there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from clearance.adapters.scripted_model import Block, ScriptedModel, text, tool_use
from clearance.app import Clearance
from clearance.core.agent import DEFAULT_TIMEOUT_MS
from clearance.definition import HumanInLoop, Model, Tool
from clearance.ports.model import ModelPort, ModelRequest
from clearance.ports.tools import ToolContext

AGENT_TAG = "safe-agent"
ORDER_ID = "ORD-123"
REFUND_PARAMS: dict[str, Any] = {"orderId": ORDER_ID, "amount": 50, "reason": "Damaged item"}
USER_INPUT = "Hi, order ORD-123 arrived damaged. Can I get a $50 refund?"
SYSTEM_PROMPT = (
    "You are a customer support agent. Look up an order before refunding it. "
    "Refunds need a human's approval; tell the customer what happened."
)
ORDER: dict[str, Any] = {
    "orderId": ORDER_ID,
    "status": "delivered",
    "total": 79.99,
    "currency": "USD",
    "items": [{"sku": "MUG-01", "name": "Ceramic mug", "quantity": 2}],
}

RefundListener = Callable[[ToolContext, dict[str, Any]], None]


def money(amount: Any) -> str:
    """50 -> '$50', 25.5 -> '$25.50'."""
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        return f"${amount}"
    if float(amount).is_integer():
        return f"${int(amount)}"
    return f"${amount:.2f}"


def refund_tools(on_refund: RefundListener | None = None) -> list[Tool]:
    """The spec's two tools. `on_refund` hears every refund that really runs."""

    def get_order(ctx: ToolContext, params: dict[str, Any]) -> dict[str, Any]:
        if params["orderId"] != ORDER_ID:
            return {"error": "not_found", "orderId": params["orderId"]}
        return ORDER

    def process_refund(ctx: ToolContext, params: dict[str, Any]) -> dict[str, Any]:
        if on_refund is not None:
            on_refund(ctx, params)
        return {
            "refundId": f"rf-{ctx.idempotency_key}",
            "orderId": params["orderId"],
            "amount": params["amount"],
            "reason": params["reason"],
            "status": "refunded",
            "approvedBy": ctx.approved_by,
        }

    return [
        Tool(
            tag="process-refund",
            description="Process a refund for an order",
            requires_confirmation=True,
            parameters={
                "orderId": {"type": "string", "required": True},
                "amount": {"type": "number", "required": True},
                "reason": {"type": "string", "required": True},
            },
            handler=process_refund,
            confirmation_message="Refund request requires approval",
        ),
        Tool(
            tag="get-order",
            description="Look up order information",
            requires_confirmation=False,
            parameters={"orderId": {"type": "string", "required": True}},
            handler=get_order,
        ),
    ]


# -- the scripted model ------------------------------------------------------------------


def last_tool_result(request: ModelRequest) -> dict[str, Any] | None:
    for message in reversed(request.messages):
        content = message.get("content")
        if message.get("role") != "user" or not isinstance(content, list):
            continue
        results = [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
        if results:
            return results[-1]
    return None


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [str(b.get("text", "")) for b in content if isinstance(b, dict)]
    return [str(content)]


def _json(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return None


def _because(reason: str) -> str:
    """'The amount exceeds the refund limit.' -> 'the amount exceeds the refund limit'."""
    reason = reason.strip().rstrip(".")
    if len(reason) > 1 and reason[0].isupper() and reason[1].islower():
        reason = reason[0].lower() + reason[1:]
    return reason


def final_answer(request: ModelRequest) -> str:
    """What the agent says once the refund's tool_result is in: approved, modified,
    rejected, timed out or failed, as the spec words it."""
    result = last_tool_result(request)
    if result is None:
        return "I couldn't find the outcome of the refund request."
    texts = _texts(result.get("content"))
    if result.get("is_error"):
        error = _json(texts[0]) if texts else None
        error = error if isinstance(error, dict) else {}
        code = error.get("error")
        if code == "approval_timeout":
            return (
                "I wasn't able to process the refund because the approval request timed "
                "out. Would you like me to try again, or would you prefer to handle this "
                "manually?"
            )
        if code == "approval_rejected":
            reason = error.get("reason")
            why = f" because {_because(reason)}" if isinstance(reason, str) and reason else ""
            return (
                f"I wasn't able to process the refund. The approval was rejected{why}. "
                "Would you like me to escalate this to a supervisor?"
            )
        message = error.get("message") or " ".join(texts)
        return f"I wasn't able to process the refund: {message}"
    # Approved with modified parameters: the first text block says so, the last is the output.
    refund = _json(texts[-1]) if texts else None
    refund = refund if isinstance(refund, dict) else {}
    amount = refund.get("amount", REFUND_PARAMS["amount"])
    order = refund.get("orderId", ORDER_ID)
    answer = f"I've processed the {money(amount)} refund for order {order}"
    if len(texts) > 1 and amount != REFUND_PARAMS["amount"]:
        answer += (
            f" (a reviewer changed the amount from {money(REFUND_PARAMS['amount'])} "
            f"to {money(amount)})"
        )
    return answer + "."


def refund_script(request: ModelRequest) -> Sequence[Block]:
    """Turn 1 looks the order up, turn 2 asks for the refund, turn 3 answers."""
    turn = sum(1 for m in request.messages if m["role"] == "assistant")
    if turn == 0:
        return [
            text(f"Let me look up order {ORDER_ID} first."),
            tool_use("get-order", {"orderId": ORDER_ID}),
        ]
    if turn == 1:
        return [
            text(
                f"I need to process a refund of {money(REFUND_PARAMS['amount'])} "
                f"for order {ORDER_ID}"
            ),
            tool_use("process-refund", REFUND_PARAMS),
        ]
    return [text(final_answer(request))]


CLAUDE = "claude-sonnet-4-20250514"


def demo_model(*, scripted: bool = False) -> tuple[Model | ModelPort, str]:
    """The model the demo runs, and how to describe it to the user: Claude when
    ANTHROPIC_API_KEY is set (ANTHROPIC_BASE_URL and CLEARANCE_DEMO_MODEL are
    honoured), the built-in script otherwise or with `scripted=True`."""
    if os.environ.get("ANTHROPIC_API_KEY") and not scripted:
        name = os.environ.get("CLEARANCE_DEMO_MODEL") or CLAUDE
        model = Model(
            provider="anthropic", model=name, base_url=os.environ.get("ANTHROPIC_BASE_URL") or None
        )
        return model, f"Claude ({name}, because ANTHROPIC_API_KEY is set)"
    return ScriptedModel(refund_script), (
        "scripted model (a built-in script; set ANTHROPIC_API_KEY to use Claude)"
    )


def define_refund_agent(
    app: Clearance,
    *,
    model: Model | ModelPort | None = None,
    timeout_ms: int = DEFAULT_TIMEOUT_MS,
    on_refund: RefundListener | None = None,
) -> None:
    """Define 'safe-agent' on `app`, as the spec's refund example does."""
    app.define(
        tag=AGENT_TAG,
        name="Agent with Approvals",
        product="clearance-demo",
        model=model if model is not None else demo_model()[0],
        system_prompt=SYSTEM_PROMPT,
        tools=refund_tools(on_refund),
        human_in_loop=HumanInLoop(
            enabled=True,
            always_require_approval=["process-refund"],
            approval_timeout=timeout_ms,
        ),
    )
