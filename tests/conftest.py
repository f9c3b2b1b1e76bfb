"""Shared pieces: the spec's refund agent, with handlers that record every call."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import settings

from clearance import Clearance, HumanInLoop, Tool, ToolContext
from clearance.testing import FakeClock, ScriptedModel, SequentialIds, text, tool_use

# Every Hypothesis test runs the same examples on every run, with no example database:
# a red is a defect, never a fluke, and no example saved by one run turns the next one
# red. `HYPOTHESIS_PROFILE=explore` draws fresh examples (and saves failures) to hunt.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

REFUND_PARAMS = {
    "orderId": {"type": "string", "required": True},
    "amount": {"type": "number", "required": True},
    "reason": {"type": "string", "required": True},
}
REFUND = {"orderId": "ORD-123", "amount": 50, "reason": "Damaged item"}


class Recorder:
    """Tool handlers that remember every call (context and parameters)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ToolContext, dict[str, Any]]] = []

    async def process_refund(self, ctx: ToolContext, params: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("process-refund", ctx, params))
        return {"refunded": params["amount"], "orderId": params["orderId"]}

    def get_order(self, ctx: ToolContext, params: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("get-order", ctx, params))
        return {"orderId": params["orderId"], "total": 80, "status": "delivered"}

    def tools(self, **refund_options: Any) -> list[Tool]:
        options = {"requires_confirmation": True, **refund_options}
        return [
            Tool(
                tag="process-refund",
                description="Process a refund for an order",
                parameters=REFUND_PARAMS,
                handler=self.process_refund,
                **options,
            ),
            Tool(
                tag="get-order",
                description="Look up order information",
                parameters={"orderId": {"type": "string", "required": True}},
                handler=self.get_order,
            ),
        ]

    def ran(self, tool: str) -> list[dict[str, Any]]:
        return [params for name, _, params in self.calls if name == tool]


def refund_script() -> ScriptedModel:
    return ScriptedModel(
        [
            [
                text("I need to process a refund of $50 for order ORD-123"),
                tool_use("process-refund", REFUND),
            ],
            [text("Done.")],
        ]
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def app(tmp_path: Any, clock: FakeClock) -> Any:
    async with Clearance.open(
        f"sqlite:///{tmp_path / 'approvals.db'}", clock=clock, ids=SequentialIds()
    ) as instance:
        yield instance


def define_refund_agent(
    app: Clearance,
    recorder: Recorder,
    model: Any = None,
    hitl: HumanInLoop | None = None,
    **refund_options: Any,
) -> ScriptedModel:
    model = model or refund_script()
    app.define(
        tag="safe-agent",
        name="Agent with Approvals",
        product="my-product",
        model=model,
        system_prompt="You are a helpful assistant...",
        tools=recorder.tools(**refund_options),
        human_in_loop=hitl or HumanInLoop(enabled=True, approval_timeout=300_000),
    )
    return model


def as_if_restarted(app: Clearance) -> None:
    """Forget the states the store's connection keeps from its own recent commits, as a
    restart would: for tests that change the file underneath it."""
    app.store._states.clear()  # type: ignore[attr-defined]


class Commits:
    """Counts the transactions a SQLite store's connection commits (SQLite's trace hook),
    from when it is made: `Commits(app).count`."""

    def __init__(self, app: Clearance) -> None:
        self.count = 0
        app.store._db.set_trace_callback(self._saw)  # type: ignore[attr-defined]

    def _saw(self, statement: str) -> None:
        if statement.strip().upper() == "COMMIT":
            self.count += 1


async def wait_for(predicate: Callable[[], Any], seconds: float = 20.0) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy; return that."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def check_the_timer_is_kept_and_claimed(store: Any, run: Any) -> None:
    """After a store's upgrade: the timer of `run`'s request 'apr-1' is still there, is
    claimed at its due time and, claimed, is held."""
    from datetime import timedelta

    due = run.request("apr-1").timeout
    far = due + timedelta(days=1)
    (timer,) = await store.claim_timers(far, far + timedelta(seconds=30), 9)
    assert (timer.request_id, timer.due_at) == ("apr-1", due)
    assert await store.claim_timers(far, far, 9) == []  # held


class StoreWrapper:
    """A store passed through unchanged, but for the methods a subclass overrides (to
    count, slow down or fail them)."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class Releases(StoreWrapper):
    """A relay's store, counting the claimed deliveries it hands back unsent."""

    released = 0

    async def release_delivery(self, *args: Any) -> Any:
        self.released += 1
        return await self._store.release_delivery(*args)
