"""The spec's approval flow end to end, on a real SQLite file with a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import json
import warnings
from typing import Any

import pytest
from conftest import REFUND, Commits, Recorder, define_refund_agent

from clearance import (
    Clearance,
    ClearanceError,
    ClearanceWarning,
    DefinitionError,
    HumanInLoop,
    Model,
    Tool,
    ToolContext,
)
from clearance.testing import FakeClock, ScriptedModel, text, tool_use


def last_results(model: ScriptedModel) -> list[dict[str, Any]]:
    message = model.requests[-1].messages[-1]
    assert message["role"] == "user"
    return list(message["content"])


async def test_pauses_before_gated_tool_and_runs_it_once_on_approval(
    app: Clearance, recorder: Recorder
) -> None:
    model = define_refund_agent(app, recorder)
    ex = await app.run("safe-agent", input="Refund order ORD-123", session_id="sess-1")
    assert ex.status == "awaiting_approval"
    assert ex.id.startswith("exec-")
    assert recorder.calls == []
    [req] = ex.pending_approvals
    assert req.request_id.startswith("apr-")
    assert req.to_dict() == {
        "requestId": req.request_id,
        "executionId": ex.id,
        "agentTag": "safe-agent",
        "tool": "process-refund",
        "parameters": REFUND,
        "reason": "Calling 'process-refund' requires approval",
        "timestamp": "2024-01-15T10:30:00Z",
        "timeout": "2024-01-15T10:35:00Z",
    }
    assert [r.request_id for r in await app.pending()] == [req.request_id]

    ex = await app.signal(ex.id, "approve", request_id=req.request_id, by="ops-lead")
    assert ex.status == "completed"
    assert ex.output == "Done."
    [(name, ctx, params)] = recorder.calls
    assert (name, params) == ("process-refund", REFUND)
    assert ctx == ToolContext(
        execution_id=ex.id,
        agent_tag="safe-agent",
        product="my-product",
        session_id="sess-1",
        tool="process-refund",
        tool_use_id=req.tool_use_id,
        idempotency_key=req.request_id,
        request_id=req.request_id,
        approved_by="ops-lead",
    )
    [result] = last_results(model)
    assert result["tool_use_id"] == req.tool_use_id
    assert result["is_error"] is False
    assert json.loads(result["content"]) == {"refunded": 50, "orderId": "ORD-123"}
    assert await app.pending() == []
    [record] = await app.audit(execution_id=ex.id)
    assert (record.decision, record.by, record.parameters, record.modified_params) == (
        "approved",
        "ops-lead",
        REFUND,
        None,
    )


async def test_model_request_carries_system_prompt_and_tool_schemas(
    app: Clearance, recorder: Recorder
) -> None:
    model = define_refund_agent(app, recorder)
    await app.run("safe-agent", input="Refund order ORD-123")
    request = model.requests[0]
    assert request.system == "You are a helpful assistant..."
    assert request.messages == [{"role": "user", "content": "Refund order ORD-123"}]
    refund = next(t for t in request.tools if t["name"] == "process-refund")
    assert refund["description"] == "Process a refund for an order"
    assert refund["input_schema"]["required"] == ["orderId", "amount", "reason"]
    assert refund["input_schema"]["properties"]["amount"] == {"type": "number"}


async def test_approve_with_modifications_merges_revalidates_and_tells_the_model(
    app: Clearance, recorder: Recorder
) -> None:
    model = define_refund_agent(app, recorder)
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    rid = ex.pending_approvals[0].request_id

    with pytest.raises(ClearanceError, match="amount"):
        await app.signal(ex.id, "approve", request_id=rid, modified_params={"amount": "lots"})
    with pytest.raises(ClearanceError, match="amout"):
        await app.signal(ex.id, "approve", request_id=rid, modified_params={"amout": 25})
    with pytest.raises(ClearanceError, match="modified_params must be a dict"):
        await app.signal(ex.id, "approve", request_id=rid, modified_params=[25])  # type: ignore[arg-type]
    assert recorder.calls == []
    assert [r.request_id for r in await app.pending()] == [rid]
    assert await app.audit(execution_id=ex.id) == []

    ex = await app.signal(
        ex.id, "approve", request_id=rid, modified_params={"amount": 25}, by="ops-lead"
    )
    assert ex.status == "completed"
    assert recorder.ran("process-refund") == [{**REFUND, "amount": 25}]
    [result] = last_results(model)
    note, output = result["content"]
    assert '"amount": 25' in note["text"] and "modified" in note["text"]
    assert json.loads(output["text"])["refunded"] == 25
    [record] = await app.audit(execution_id=ex.id)
    assert record.modified_params == {"amount": 25}
    assert record.parameters == REFUND


async def test_reject_never_runs_the_tool_and_the_model_sees_the_reason(
    app: Clearance, recorder: Recorder
) -> None:
    model = define_refund_agent(app, recorder)
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    rid = ex.pending_approvals[0].request_id
    ex = await app.signal(
        ex.id, "reject", request_id=rid, reason="Amount exceeds policy limit", by="finance"
    )
    assert ex.status == "completed"
    assert recorder.calls == []
    [result] = last_results(model)
    assert result["is_error"] is True
    payload = json.loads(result["content"])
    assert payload["error"] == "approval_rejected"
    assert payload["reason"] == "Amount exceeds policy limit"
    assert "Amount exceeds policy limit" in payload["message"]
    [record] = await app.audit(request_id=rid)
    assert (record.decision, record.by, record.reason) == (
        "rejected",
        "finance",
        "Amount exceeds policy limit",
    )


async def test_timeout_auto_rejects_with_the_spec_payload(
    app: Clearance, recorder: Recorder, clock: FakeClock
) -> None:
    model = define_refund_agent(app, recorder)
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    rid = ex.pending_approvals[0].request_id
    clock.advance(minutes=4, seconds=59)
    assert await app.fire_due_timers() == 0
    clock.advance(seconds=1)
    assert await app.fire_due_timers() == 1
    assert await app.fire_due_timers() == 0
    [result] = last_results(model)
    assert result["is_error"] is True
    assert json.loads(result["content"]) == {
        "error": "approval_timeout",
        "message": "Approval request timed out after 5 minutes",
        "tool": "process-refund",
        "parameters": REFUND,
    }
    assert recorder.calls == []
    with pytest.raises(ClearanceError, match="timed out"):
        await app.signal(ex.id, "approve", request_id=rid)
    assert recorder.calls == []
    [record] = await app.audit(request_id=rid)
    assert record.decision == "timed_out"
    assert (await app.get_execution(ex.id)).status == "completed"


async def test_decision_after_expiry_is_refused_even_before_any_sweep(
    app: Clearance, recorder: Recorder, clock: FakeClock
) -> None:
    define_refund_agent(app, recorder)
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    rid = ex.pending_approvals[0].request_id
    clock.advance(minutes=6)
    with pytest.raises(ClearanceError, match="timed out"):
        await app.signal(ex.id, "approve", request_id=rid)
    assert recorder.calls == []
    assert (await app.get_execution(ex.id)).status == "completed"
    assert [r.decision for r in await app.audit(request_id=rid)] == ["timed_out"]


async def test_tool_level_timeout_overrides_and_is_spelled_out(
    app: Clearance, recorder: Recorder, clock: FakeClock
) -> None:
    model = define_refund_agent(app, recorder, approval_timeout=60_000)
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert ex.pending_approvals[0].to_dict()["timeout"] == "2024-01-15T10:31:00Z"
    clock.advance(minutes=1)
    assert await app.fire_due_timers() == 1
    message = json.loads(last_results(model)[0]["content"])["message"]
    assert message == "Approval request timed out after 1 minute"


async def test_second_decision_and_bad_signals_are_clear_errors_that_change_nothing(
    app: Clearance, recorder: Recorder
) -> None:
    define_refund_agent(app, recorder)
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    rid = ex.pending_approvals[0].request_id
    with pytest.raises(ClearanceError, match="no approval request 'apr-nope'"):
        await app.signal(ex.id, "approve", request_id="apr-nope")
    with pytest.raises(ClearanceError, match="no execution 'exec-nope'"):
        await app.signal("exec-nope", "approve", request_id=rid)
    with pytest.raises(ClearanceError, match=r"unknown signal .aprove.*approve, reject, stop"):
        await app.signal(ex.id, "aprove", request_id=rid)
    with pytest.raises(ClearanceError, match="needs request_id"):
        await app.signal(ex.id, "approve")
    before = await app.get_execution(ex.id)
    assert before.execution.seq == ex.seq

    await app.signal(ex.id, "reject", request_id=rid, reason="no", by="alice")
    after = await app.get_execution(ex.id)
    for signal in ("approve", "reject"):
        with pytest.raises(ClearanceError, match=r"already rejected by alice.*stands"):
            await app.signal(ex.id, signal, request_id=rid, by="bob")
    assert (await app.get_execution(ex.id)).execution == after.execution
    assert len(await app.audit(request_id=rid)) == 1
    assert recorder.calls == []


async def test_stop_cancels_pending_requests_and_records_it(
    app: Clearance, recorder: Recorder
) -> None:
    define_refund_agent(app, recorder)
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    rid = ex.pending_approvals[0].request_id
    ex = await app.signal(ex.id, "stop", by="ops", reason="customer withdrew")
    assert ex.status == "stopped"
    assert await app.pending() == []
    [record] = await app.audit(request_id=rid)
    assert (record.decision, record.by) == ("cancelled", "ops")
    with pytest.raises(ClearanceError, match="already cancelled"):
        await app.signal(ex.id, "approve", request_id=rid)
    with pytest.raises(ClearanceError, match="is stopped"):
        await app.signal(ex.id, "stop")
    assert recorder.calls == []


def two_refunds_then_lookup() -> ScriptedModel:
    return ScriptedModel(
        [
            [
                tool_use("process-refund", {**REFUND, "orderId": "A"}),
                tool_use("get-order", {"orderId": "B"}),
                tool_use("process-refund", {**REFUND, "orderId": "C"}),
            ],
            [text("All done.")],
        ]
    )


async def test_sequential_order_opens_one_approval_at_a_time_in_model_order(
    app: Clearance, recorder: Recorder
) -> None:
    model = define_refund_agent(app, recorder, model=two_refunds_then_lookup())
    ex = await app.run("safe-agent", input="three things")
    [first] = ex.pending_approvals
    assert first.parameters["orderId"] == "A"
    assert recorder.calls == []  # get-order waits behind the first approval
    ex = await app.signal(ex.id, "approve", request_id=first.request_id)
    [second] = ex.pending_approvals
    assert second.parameters["orderId"] == "C"
    assert [(n, p["orderId"]) for n, _, p in recorder.calls] == [
        ("process-refund", "A"),
        ("get-order", "B"),
    ]
    ex = await app.signal(ex.id, "reject", request_id=second.request_id, reason="dup")
    assert ex.status == "completed"
    results = last_results(model)
    uses = [b["id"] for b in model.requests[-1].messages[-2]["content"]]
    assert [r["tool_use_id"] for r in results] == uses
    assert [r["is_error"] for r in results] == [False, False, True]


async def test_parallel_order_opens_every_approval_of_the_turn_at_once(
    app: Clearance, recorder: Recorder
) -> None:
    model = define_refund_agent(
        app,
        recorder,
        model=two_refunds_then_lookup(),
        hitl=HumanInLoop(enabled=True, approval_order="parallel"),
    )
    ex = await app.run("safe-agent", input="three things")
    assert [r.parameters["orderId"] for r in ex.pending_approvals] == ["A", "C"]
    assert [(n, p["orderId"]) for n, _, p in recorder.calls] == [("get-order", "B")]
    a, c = ex.pending_approvals
    ex = await app.signal(ex.id, "approve", request_id=c.request_id)
    assert ex.status == "awaiting_approval"
    assert [p["orderId"] for p in recorder.ran("process-refund")] == ["C"]
    ex = await app.signal(ex.id, "reject", request_id=a.request_id, reason="no")
    assert ex.status == "completed"
    results = last_results(model)
    uses = [b["id"] for b in model.requests[-1].messages[-2]["content"]]
    assert [r["tool_use_id"] for r in results] == uses
    assert [r["is_error"] for r in results] == [True, False, False]


async def test_unknown_tools_and_invalid_params_go_back_to_the_model(
    app: Clearance, recorder: Recorder
) -> None:
    model = ScriptedModel(
        [
            [
                tool_use("wire-money", {"to": "me"}),
                tool_use("process-refund", {"orderId": "ORD-123", "amount": "fifty"}),
            ],
            [text("Sorry.")],
        ]
    )
    define_refund_agent(app, recorder, model=model)
    ex = await app.run("safe-agent", input="go")
    assert ex.status == "completed"
    assert await app.pending() == []
    unknown, invalid = (json.loads(r["content"]) for r in last_results(model))
    assert unknown["error"] == "unknown_tool"
    assert "process-refund, get-order" in unknown["message"]
    assert invalid["error"] == "invalid_parameters"
    assert any(p.startswith("amount:") for p in invalid["problems"])
    assert any("reason" in p for p in invalid["problems"])
    assert recorder.calls == []


async def test_ungated_tools_run_without_approval(app: Clearance, recorder: Recorder) -> None:
    model = ScriptedModel(
        [[tool_use("get-order", {"orderId": "ORD-9"})], [text("It was delivered.")]]
    )
    define_refund_agent(app, recorder, model=model)
    ex = await app.run("safe-agent", input="where is my order")
    assert ex.status == "completed"
    [(name, ctx, _)] = recorder.calls
    assert name == "get-order"
    # The model turn is in the key: a later turn may use the same tool_use id again.
    assert ctx.request_id is None and ctx.idempotency_key == f"{ex.id}:1:{ctx.tool_use_id}"
    assert await app.audit(execution_id=ex.id) == []


async def test_always_require_approval_gates_a_tool_without_the_flag(
    app: Clearance, recorder: Recorder
) -> None:
    model = ScriptedModel([[tool_use("get-order", {"orderId": "ORD-9"})], [text("ok")]])
    define_refund_agent(
        app,
        recorder,
        model=model,
        hitl=HumanInLoop(enabled=True, always_require_approval=["get-order"]),
    )
    ex = await app.run("safe-agent", input="where is my order")
    assert [r.tool for r in ex.pending_approvals] == ["get-order"]
    assert recorder.calls == []


async def test_hitl_disabled_runs_everything(app: Clearance, recorder: Recorder) -> None:
    define_refund_agent(
        app,
        recorder,
        requires_confirmation=False,
        hitl=HumanInLoop(enabled=False),
    )
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert ex.status == "completed"
    assert recorder.ran("process-refund") == [REFUND]


async def test_confirmation_message_gives_the_reason(app: Clearance, recorder: Recorder) -> None:
    define_refund_agent(
        app,
        recorder,
        confirmation_message=lambda p: f"Refund ${p['amount']} for {p['orderId']}?",
    )
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert ex.pending_approvals[0].reason == "Refund $50 for ORD-123?"
    define_refund_agent(app, recorder, confirmation_message="Refund request requires approval")
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert ex.pending_approvals[0].reason == "Refund request requires approval"


async def test_max_iterations_fails_the_execution(app: Clearance, recorder: Recorder) -> None:
    model = ScriptedModel(lambda request: [tool_use("get-order", {"orderId": "loop"})])
    app.define(
        tag="loopy",
        model=model,
        tools=recorder.tools(requires_confirmation=False),
        max_iterations=3,
    )
    ex = await app.run("loopy", input="go")
    assert ex.status == "failed"
    assert "max_iterations=3" in (ex.error or "")
    assert len(model.requests) == 3


async def test_failing_handler_becomes_an_error_result(app: Clearance, recorder: Recorder) -> None:
    def broken(ctx: ToolContext, params: dict[str, Any]) -> None:
        raise RuntimeError("payments API down")

    model = ScriptedModel([[tool_use("refund", {"amount": 5})], [text("It failed.")]])
    app.define(
        tag="a",
        model=model,
        tools=[Tool(tag="refund", parameters={"amount": {"type": "number"}}, handler=broken)],
    )
    ex = await app.run("a", input="go")
    assert ex.status == "completed"
    [result] = last_results(model)
    assert result["is_error"] is True
    assert "payments API down" in json.loads(result["content"])["message"]


async def test_failing_model_fails_the_execution(app: Clearance, recorder: Recorder) -> None:
    def boom(request: Any) -> list[dict[str, Any]]:
        raise ConnectionError("no route to model")

    app.define(
        tag="a", model=ScriptedModel(boom), tools=recorder.tools(requires_confirmation=False)
    )
    ex = await app.run("a", input="go")
    assert ex.status == "failed"
    assert "no route to model" in (ex.error or "")


async def test_defaults_are_filled_before_approval(app: Clearance, recorder: Recorder) -> None:
    model = ScriptedModel([[tool_use("email", {"to": "a@b.c"})], [text("sent")]])
    app.define(
        tag="a",
        model=model,
        tools=[
            Tool(
                tag="email",
                requires_confirmation=True,
                parameters={
                    "to": {"type": "string", "required": True},
                    "priority": {"type": "string", "enum": ["low", "high"], "default": "low"},
                    "cc": {"type": "array", "items": {"type": "string"}},
                    "meta": {
                        "type": "object",
                        "properties": {"tag": {"type": "string", "required": True}},
                    },
                },
                handler=recorder.get_order,
            )
        ],
        human_in_loop=HumanInLoop(enabled=True),
    )
    ex = await app.run("a", input="go")
    req = ex.pending_approvals[0]
    assert req.parameters == {"to": "a@b.c", "priority": "low"}
    for bad, field in (
        ({"priority": "urgent"}, "priority"),
        ({"cc": [1]}, "cc.0"),
        ({"meta": {}}, "meta"),
    ):
        with pytest.raises(ClearanceError, match=field):
            await app.signal(ex.id, "approve", request_id=req.request_id, modified_params=bad)
    ex = await app.signal(
        ex.id,
        "approve",
        request_id=req.request_id,
        modified_params={"cc": ["x@y.z"], "meta": {"tag": "t"}},
    )
    assert ex.status == "completed"


async def test_pending_lists_oldest_first_and_filters_by_agent(
    app: Clearance, recorder: Recorder, clock: FakeClock
) -> None:
    define_refund_agent(app, recorder)
    app.define(
        tag="other",
        model=ScriptedModel([[tool_use("process-refund", REFUND)], [text("ok")]]),
        tools=recorder.tools(),
        human_in_loop=HumanInLoop(enabled=True),
    )
    first = await app.run("safe-agent", input="1")
    clock.advance(seconds=1)
    second = await app.run("other", input="2")
    clock.advance(seconds=1)
    third = await app.run("safe-agent", input="3")
    assert [r.execution_id for r in await app.pending()] == [first.id, second.id, third.id]
    assert [r.execution_id for r in await app.pending("safe-agent")] == [first.id, third.id]
    assert [r.execution_id for r in await app.pending(limit=1)] == [first.id]


async def test_get_execution_has_the_event_history(app: Clearance, recorder: Recorder) -> None:
    define_refund_agent(app, recorder)
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    await app.signal(ex.id, "approve", request_id=ex.pending_approvals[0].request_id)
    history = await app.get_execution(ex.id)
    assert history.status == "completed" and history.output == "Done."
    assert [e.TAG for e in history.events] == [
        "started",
        "model_replied",
        "approved",
        "tool_finished",
        "model_replied",
    ]
    with pytest.raises(ClearanceError, match="no execution"):
        await app.get_execution("exec-missing")


async def test_a_pause_and_a_resume_cost_a_fixed_number_of_commits(
    app: Clearance, recorder: Recorder
) -> None:
    define_refund_agent(app, recorder)
    # Once per definition, the process records it as the agent's current one.
    await app.engine.define_agents()
    commits = Commits(app)
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert commits.count == 2  # started, model replied (paused)
    await app.signal(ex.id, "approve", request_id=ex.pending_approvals[0].request_id)
    assert commits.count == 5  # approved, tool finished, final reply


async def test_memory_store_works_the_same(recorder: Recorder) -> None:
    async with Clearance.open("memory://", clock=FakeClock()) as app:
        define_refund_agent(app, recorder)
        ex = await app.run("safe-agent", input="Refund order ORD-123")
        ex = await app.signal(ex.id, "approve", request_id=ex.pending_approvals[0].request_id)
        assert ex.status == "completed"


def test_bad_store_urls_are_clear() -> None:
    with pytest.raises(ClearanceError, match="unsupported store URL scheme 'redis://'"):
        Clearance.open("redis://localhost")


def test_definition_errors_say_what_to_do(recorder: Recorder) -> None:
    app = Clearance.open("memory://")
    model = ScriptedModel([[text("hi")]])
    with pytest.raises(DefinitionError, match="requires_confirmation=True but human_in_loop"):
        app.define(tag="a", model=model, tools=recorder.tools())
    with pytest.raises(DefinitionError, match="positive whole number of milliseconds"):
        app.define(
            tag="a",
            model=model,
            tools=recorder.tools(),
            human_in_loop=HumanInLoop(enabled=True, approval_timeout=0),
        )
    with pytest.raises(DefinitionError, match=r"at most 31622400000 \(366 days\)"):
        app.define(
            tag="a",
            model=model,
            tools=recorder.tools(),
            human_in_loop=HumanInLoop(enabled=True, approval_timeout=10**15),
        )
    with pytest.raises(DefinitionError, match=r"always_require_approval.*not enabled"):
        app.define(
            tag="a",
            model=model,
            tools=recorder.tools(requires_confirmation=False),
            human_in_loop=HumanInLoop(always_require_approval=["process-refund"]),
        )
    with pytest.raises(DefinitionError, match="approval_order must be one of"):
        app.define(
            tag="a",
            model=model,
            tools=recorder.tools(),
            human_in_loop=HumanInLoop(enabled=True, approval_order="random"),
        )
    with pytest.raises(DefinitionError, match="type 'money'; accepted types"):
        app.define(
            tag="a",
            model=model,
            tools=[Tool(tag="t", parameters={"x": {"type": "money"}}, handler=recorder.get_order)],
        )
    with pytest.raises(DefinitionError, match="unknown key"):
        app.define(
            tag="a",
            model=model,
            tools=[
                Tool(
                    tag="t",
                    parameters={"x": {"type": "string", "requird": True}},
                    handler=recorder.get_order,
                )
            ],
        )
    with pytest.raises(DefinitionError, match="defined twice"):
        app.define(tag="a", model=model, tools=recorder.tools(requires_confirmation=False) * 2)
    with pytest.raises(DefinitionError, match="needs a handler"):
        app.define(tag="a", model=model, tools=[Tool(tag="t")])
    with pytest.raises(DefinitionError, match="not a valid tool name"):
        app.define(tag="a", model=model, tools=[Tool(tag="no spaces", handler=recorder.get_order)])
    with pytest.raises(ClearanceError, match="unknown model provider 'gemini'"):
        app.define(tag="a", model=Model(provider="gemini", model="x"))
    with pytest.warns(ClearanceWarning, match="does not define: send-email"):
        app.define(
            tag="a",
            model=model,
            tools=recorder.tools(),
            human_in_loop=HumanInLoop(enabled=True, always_require_approval=["send-email"]),
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        app.define(
            tag="a",
            model=Model(provider="anthropic", model="claude-sonnet-4-20250514"),
            tools=recorder.tools(),
            human_in_loop=HumanInLoop(enabled=True),
        )


async def test_running_an_undefined_agent_names_the_defined_ones(app: Clearance) -> None:
    with pytest.raises(ClearanceError, match=r"no agent 'nope' is defined here \(defined: none\)"):
        await app.run("nope", input="x")


async def test_the_audit_log_refuses_updates_and_deletes(tmp_path: Any, recorder: Recorder) -> None:
    import sqlite3

    path = tmp_path / "audit.db"
    async with Clearance.open(f"sqlite:///{path}", clock=FakeClock()) as app:
        define_refund_agent(app, recorder)
        ex = await app.run("safe-agent", input="Refund order ORD-123")
        await app.signal(ex.id, "reject", request_id=ex.pending_approvals[0].request_id)
    db = sqlite3.connect(path)
    for statement in ("UPDATE audit SET body = '{}'", "DELETE FROM audit"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute(statement)
    assert db.execute("SELECT count(*) FROM audit").fetchone() == (1,)


async def test_a_caller_that_stops_waiting_does_not_strand_the_execution(
    app: Clearance, recorder: Recorder
) -> None:
    import asyncio

    release = asyncio.Event()

    async def slow_lookup(ctx: ToolContext, params: dict[str, Any]) -> str:
        await release.wait()
        return "found"

    model = ScriptedModel([[tool_use("lookup", {})], [text("done")]])
    app.define(tag="a", model=model, tools=[Tool(tag="lookup", handler=slow_lookup)])
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(app.run("a", input="go"), timeout=0.1)
    [execution_id] = {r.execution_id for r in model.requests}
    assert (await app.get_execution(execution_id)).status == "running"
    release.set()
    for _ in range(100):
        if (await app.get_execution(execution_id)).status == "completed":
            break
        await asyncio.sleep(0.01)
    assert (await app.get_execution(execution_id)).output == "done"


@pytest.mark.parametrize("stop_reason", ["max_tokens", "refusal"])
async def test_cut_off_or_refused_answers_fail_with_the_text_kept(
    app: Clearance, recorder: Recorder, stop_reason: str
) -> None:
    async def cut_off(request: Any) -> Any:
        from clearance import ModelReply

        return ModelReply(content=[{"type": "text", "text": "Partial"}], stop_reason=stop_reason)

    class CutOff:
        reply = staticmethod(cut_off)

    app.define(tag="a", model=CutOff(), tools=recorder.tools(requires_confirmation=False))
    ex = await app.run("a", input="go")
    assert ex.status == "failed"
    assert ex.output == "Partial"
    assert f"stop_reason '{stop_reason}'" in (ex.error or "")


async def test_a_reply_with_repeated_tool_use_ids_fails_the_run_instead_of_stranding_it(
    app: Clearance, recorder: Recorder
) -> None:
    model = ScriptedModel(
        [
            [
                tool_use("get-order", {"orderId": "A"}, id="x"),
                tool_use("get-order", {"orderId": "B"}, id="x"),
            ]
        ]
    )
    define_refund_agent(app, recorder, model=model)
    ex = await app.run("safe-agent", input="go")
    assert ex.status == "failed"
    assert "repeated tool_use ids" in (ex.error or "")
    assert recorder.calls == []


async def test_redefining_an_agent_closes_the_replaced_model_on_close(tmp_path: Any) -> None:
    closed: list[str] = []

    class Closable(ScriptedModel):
        def __init__(self, name: str) -> None:
            super().__init__([[text("hi")]])
            self.label = name

        async def aclose(self) -> None:
            closed.append(self.label)

    app = Clearance.open("memory://")
    app.define(tag="a", model=Closable("first"))
    app.define(tag="a", model=Closable("second"))
    await app.close()
    assert sorted(closed) == ["first", "second"]


async def test_close_returns_though_a_background_task_swallows_a_cancellation() -> None:
    # As psycopg_pool may, when the cancellation lands while it hands out a connection.
    app = Clearance.open("memory://")
    await app.__aenter__()

    async def stubborn() -> Any:
        with contextlib.suppress(asyncio.CancelledError):  # swallowed: the task carries on
            await asyncio.sleep(3600)
        await asyncio.sleep(3600)

    app._driving.add(asyncio.ensure_future(stubborn()))
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(app.close())
    done, _ = await asyncio.wait({closing}, timeout=10)  # a hang, not a speed, is the failure
    assert closing in done, "close() is still waiting for a task that swallowed its cancellation"
    closing.result()
