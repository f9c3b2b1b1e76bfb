"""The plugin as Clearance finds it: installed, through its entry points, opened by URL.
An agent's approval request goes out on the spool, a reviewer service outside Clearance
reads it there and writes the decision back, and the gated tool runs once."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import time
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import clearance_example_plugin
import outside
import pytest
from clearance_example_plugin import spool_broker, tenant_store
from standardwebhooks.webhooks import Webhook

from clearance import ApprovalBroker, Clearance, HumanInLoop, Tool, ToolContext
from clearance.testing import ScriptedModel, text, tool_use

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
REFUND = {"orderId": "ORD-7", "amount": 40}


async def until(found: Callable[[], Any], seconds: float = 20.0) -> Any:
    """What `found` (sync or async) returns, once it is something."""
    deadline = time.monotonic() + seconds
    while True:
        value = found()
        value = await value if inspect.isawaitable(value) else value
        if value:
            return value
        assert time.monotonic() < deadline, "not there in time"
        await asyncio.sleep(0.02)


def test_the_entry_points_name_the_openers() -> None:
    [store] = entry_points(group="clearance.stores", name="tenant")
    [broker] = entry_points(group="clearance.channels", name="spool")
    assert store.load() is tenant_store.open_url
    assert broker.load() is spool_broker.open_url


@pytest.mark.skipif(
    not os.environ.get("CLEARANCE_EXAMPLE_PLUGIN_WHEEL"),
    reason="set by .ci/example-plugin, which runs these tests on the installed wheel",
)
def test_the_installed_wheel_is_what_runs() -> None:
    where = Path(clearance_example_plugin.__file__)
    assert "site-packages" in where.parts, where
    assert where.is_relative_to(sys.prefix), f"{where} is not in this venv ({sys.prefix})"


async def test_a_request_goes_out_and_its_decision_comes_back_through_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEARANCE_TENANTS", str(tmp_path / "tenants"))
    spool = tmp_path / "spool"
    refunds: list[dict[str, Any]] = []

    async def process_refund(ctx: ToolContext, params: dict[str, Any]) -> dict[str, Any]:
        refunds.append(params)
        return {"refunded": params["amount"]}

    async with Clearance.open(
        "tenant://acme",
        webhook_secret=SECRET,  # broker messages are signed as webhooks are
        poll_interval=0.05,
        brokers={"files": f"spool://{spool}?redeliver_after=0.5"},
    ) as app:
        app.define(
            tag="refunds",
            name="Refunds",
            product="shop",
            model=ScriptedModel([[tool_use("process-refund", REFUND)], [text("Refunded.")]]),
            system_prompt="You process refunds.",
            tools=[
                Tool(
                    tag="process-refund",
                    description="Refund an order",
                    requires_confirmation=True,
                    parameters={
                        "orderId": {"type": "string", "required": True},
                        "amount": {"type": "number", "required": True},
                    },
                    handler=process_refund,
                )
            ],
            human_in_loop=HumanInLoop(
                enabled=True, approval_broker=ApprovalBroker("files", "approval-requested")
            ),
        )
        ex = await app.run("refunds", input="Refund ORD-7")
        assert ex.status == "awaiting_approval" and refunds == []

        # The reviewer service: read the request, check it is Clearance's, decide it.
        [(data, headers)] = await until(lambda: outside.read(spool, "approval-requested"))
        Webhook(SECRET).verify(data, headers)
        request = json.loads(data)
        assert request["requestId"] == ex.pending_approvals[0].request_id
        assert request["parameters"] == REFUND
        decision = {"requestId": request["requestId"], "approved": True, "by": "ops"}
        outside.write(spool, "approval-requested.decisions", decision)

        async def completed() -> bool:
            now = await app.execution(ex.id)
            return now is not None and now.status == "completed"

        await until(completed)
        assert refunds == [REFUND]
        [record] = await app.audit(request_id=request["requestId"])
        assert (record.decision, record.by) == ("approved", "ops")
        assert outside.read(spool, "approval-requested.errors") == []
    assert (tmp_path / "tenants" / "acme.db").is_file()
