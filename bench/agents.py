"""The one flow every system runs: the spec's refund scenario, with identical content.

The user asks for a refund; the model says what it will do and calls the gated
`process-refund` tool; a human approves; the tool runs (trivially); the model
answers. Clearance plays it with `ScriptedModel`, LangGraph with a scripted
agent node and a tool node that calls `interrupt()`, holdpoint with a guarded
function (holdpoint gates a call, it has no agent loop, so its cycle is submit
then approve-and-run).
"""

from __future__ import annotations

import sqlite3
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from clearance import (
    ApprovalBroker,
    Clearance,
    ClearanceWarning,
    HumanInLoop,
    Policy,
    Rule,
    Tool,
    ToolContext,
)
from clearance.testing import ScriptedModel, text, tool_use

AGENT = "safe-agent"
TOOL = "process-refund"
INPUT = "Refund order ORD-123, it arrived damaged"
SAYS = "I need to process a refund of $50 for order ORD-123"
PARAMS: dict[str, Any] = {"orderId": "ORD-123", "amount": 50, "reason": "Damaged item"}
ANSWER = "I've processed the $50 refund for order ORD-123."
RESULT: dict[str, Any] = {"refunded": 50, "orderId": "ORD-123"}
SCHEMA = {
    "orderId": {"type": "string", "required": True},
    "amount": {"type": "number", "required": True},
    "reason": {"type": "string", "required": True},
}

Handler = Callable[[ToolContext, dict[str, Any]], Any]


async def process_refund(ctx: ToolContext, params: dict[str, Any]) -> dict[str, Any]:
    return RESULT


def refund_model() -> ScriptedModel:
    return ScriptedModel([[text(SAYS), tool_use(TOOL, PARAMS)], [text(ANSWER)]])


def define_refund_agent(
    app: Clearance,
    *,
    tag: str = AGENT,
    timeout_ms: int = 300_000,
    handler: Handler = process_refund,
    model: ScriptedModel | None = None,
    approval_broker: ApprovalBroker | None = None,
    approval_webhook: str | None = None,
    policy: Policy | Sequence[Rule] | None = None,
    **tool_options: Any,
) -> ScriptedModel:
    """The refund agent; `tool_options` go to its refund Tool (a quorum, say)."""
    model = model or refund_model()
    with warnings.catch_warnings():
        if policy is not None:
            # Benchmark 9's policies name tools this agent does not define, as a policy
            # shared by many agents does: define() warns about each such rule.
            warnings.simplefilter("ignore", ClearanceWarning)
        app.define(
            tag=tag,
            name="Agent with Approvals",
            product="bench",
            model=model,
            system_prompt="You are a helpful assistant...",
            tools=[
                Tool(
                    tag=TOOL,
                    description="Process a refund for an order",
                    parameters=SCHEMA,
                    requires_confirmation=True,
                    handler=handler,
                    **tool_options,
                )
            ],
            human_in_loop=HumanInLoop(
                enabled=True,
                approval_timeout=timeout_ms,
                approval_broker=approval_broker,
                approval_webhook=approval_webhook,
                policy=policy,
            ),
        )
    return model


# -- LangGraph: the graph is in bench/langgraph_flow.py (imported only when it runs) --------


def langgraph_connection(path: str, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


COMMIT_STATEMENTS = frozenset(
    spelling
    for word in ("COMMIT", "END", "COMMIT TRANSACTION")
    for spelling in (word, word.lower(), word + ";", word.lower() + ";")
)


class CommitCounter:
    """Counts COMMITs a connection runs (SQLite's trace hook sees `conn.commit()` too)."""

    def __init__(self) -> None:
        self.commits = 0

    def __call__(self, statement: str) -> None:
        # Called for every statement of the system measured: the cheapest test that
        # knows the spellings these systems send.
        if statement in COMMIT_STATEMENTS:
            self.commits += 1


# -- holdpoint: the same tool call as a guarded function -------------------------------------


def holdpoint_store(path: str, synchronous: str, counter: CommitCounter) -> Any:
    """holdpoint's SQLiteStore (WAL; it hard-codes synchronous=NORMAL), with the pragma
    set as asked and its commits counted, on every per-thread connection it opens."""
    import holdpoint

    class Store(holdpoint.SQLiteStore):
        def _connect(self) -> sqlite3.Connection:
            conn: sqlite3.Connection = super()._connect()
            conn.execute(f"PRAGMA synchronous={synchronous}")
            conn.set_trace_callback(counter)
            return conn

    return Store(path)


def holdpoint_refund(hold: Any) -> Callable[..., Any]:
    """`process_refund(**PARAMS)` submits the call; `hold.approve(id)` runs it."""

    def process_refund(orderId: str, amount: float, reason: str) -> dict[str, Any]:
        return RESULT

    guarded: Callable[..., Any] = hold.guard(kind=TOOL, ttl="5m")(process_refund)
    return guarded


def holdpoint_refund_async(hold: Any) -> Callable[..., Any]:
    """The same guarded call as an `async def`: `await process_refund(**PARAMS)` submits
    it and `await hold.approve_async(id)` runs it (holdpoint's store calls go through
    `asyncio.to_thread`, one SQLite connection per thread)."""

    async def process_refund(orderId: str, amount: float, reason: str) -> dict[str, Any]:
        return RESULT

    guarded: Callable[..., Any] = hold.guard(kind=TOOL, ttl="5m")(process_refund)
    return guarded
