"""The Anthropic model adapter end to end: the official SDK against a fake Messages API.

Each test defines the spec's refund agent with `Model(provider="anthropic", ...)`
as a user would, pointed at `FakeAnthropic` on 127.0.0.1. The fake enforces the
API's request rules (a `tool_use` without its `tool_result` is a 400 there, as
it is at Anthropic), so a test that completes also proves every request was one
the real API would take; `assert_clean` says so explicitly.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest
from conftest import REFUND, Recorder, define_refund_agent
from fake_anthropic import FakeAnthropic, Reply, text, tool_use
from servers import free_port

from clearance import Clearance, HumanInLoop, Model
from clearance.core.execution import Usage
from clearance.testing import FakeClock, SequentialIds

MODEL = "claude-sonnet-4-20250514"
SYSTEM = "You are a helpful assistant..."
ASKS = "I need to process a refund of $50 for order ORD-123"
DONE = "I've processed the $50 refund for order ORD-123"
REFUND_SCHEMA = {
    "type": "object",
    "properties": {
        "orderId": {"type": "string"},
        "amount": {"type": "number"},
        "reason": {"type": "string"},
    },
    "additionalProperties": False,
    "required": ["orderId", "amount", "reason"],
}
TOOLS = [
    {
        "name": "process-refund",
        "description": "Process a refund for an order",
        "input_schema": REFUND_SCHEMA,
    },
    {
        "name": "get-order",
        "description": "Look up order information",
        "input_schema": {
            "type": "object",
            "properties": {"orderId": {"type": "string"}},
            "additionalProperties": False,
            "required": ["orderId"],
        },
    },
]


@pytest.fixture(autouse=True)
def _no_anthropic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys, URLs or profiles from the developer's shell must not leak into these tests."""
    for name in (
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_CUSTOM_HEADERS",
        "ANTHROPIC_PROFILE",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake() -> Iterator[FakeAnthropic]:
    api = FakeAnthropic()
    with api.serving():
        yield api


def claude(fake: FakeAnthropic, **options: Any) -> Model:
    options = {"api_key": "test-key", "max_retries": 2, **options}
    return Model(provider="anthropic", model=MODEL, base_url=fake.url, **options)


def script_refund(fake: FakeAnthropic, final: str = DONE) -> None:
    fake.reply(text(ASKS), tool_use("process-refund", REFUND), usage=(120, 40))
    fake.reply(text(final), usage=(200, 15))


def assert_clean(fake: FakeAnthropic, requests: int) -> None:
    """Every request was valid, answered 200, and the script was used up."""
    assert fake.rejections == []
    assert [r.status for r in fake.requests] == [200] * requests
    assert fake.left == 0


def sent(fake: FakeAnthropic, i: int = -1) -> dict[str, Any]:
    body = fake.requests[i].body
    assert isinstance(body, dict)
    return body


def first_turn(fake: FakeAnthropic) -> list[dict[str, Any]]:
    """The assistant message the first reply became, as the next request echoes it."""
    reply = fake.requests[0].answer
    return [{"role": "assistant", "content": reply["content"]}]


def tool_use_id(fake: FakeAnthropic, turn: int = 0) -> str:
    [use] = [b for b in fake.requests[turn].answer["content"] if b["type"] == "tool_use"]
    return str(use["id"])


# -- the spec's refund scenario -------------------------------------------------------


async def test_approve_sends_the_api_what_it_expects_and_finishes_with_the_answer(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic
) -> None:
    script_refund(fake)
    define_refund_agent(app, recorder, model=claude(fake))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert ex.status == "awaiting_approval"
    assert recorder.calls == []
    first = fake.requests[0]
    assert first.headers["authorization"] == "Bearer test-key"
    assert first.headers["anthropic-version"]
    assert first.body == {
        "model": MODEL,
        "max_tokens": 4096,
        "system": SYSTEM,
        "tools": TOOLS,
        "messages": [{"role": "user", "content": "Refund order ORD-123"}],
    }
    [req] = ex.pending_approvals
    assert (req.tool, req.parameters, req.tool_use_id) == (
        "process-refund",
        REFUND,
        tool_use_id(fake),
    )

    ex = await app.signal(ex.id, "approve", request_id=req.request_id, by="ops-lead")
    assert ex.status == "completed"
    assert ex.output == DONE
    assert recorder.ran("process-refund") == [REFUND]
    assert_clean(fake, 2)
    second = sent(fake)
    assert {k: v for k, v in second.items() if k != "messages"} == {
        "model": MODEL,
        "max_tokens": 4096,
        "system": SYSTEM,
        "tools": TOOLS,
    }
    [user, assistant, results] = second["messages"]
    assert user == {"role": "user", "content": "Refund order ORD-123"}
    assert [assistant] == first_turn(fake)
    assert assistant["content"] == [
        {"type": "text", "text": ASKS},
        {"type": "tool_use", "id": req.tool_use_id, "name": "process-refund", "input": REFUND},
    ]
    [result] = results["content"]
    assert results["role"] == "user"
    assert result["type"] == "tool_result"
    assert result["tool_use_id"] == req.tool_use_id
    assert result["is_error"] is False
    assert json.loads(result["content"]) == {"refunded": 50, "orderId": "ORD-123"}
    assert ex.usage == Usage(320, 55)


async def test_approve_with_modified_params_runs_them_and_tells_the_model(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic
) -> None:
    script_refund(fake, final="I've processed a $25 refund for order ORD-123")
    define_refund_agent(app, recorder, model=claude(fake))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    rid = ex.pending_approvals[0].request_id
    ex = await app.signal(ex.id, "approve", request_id=rid, modified_params={"amount": 25})
    assert ex.status == "completed"
    assert ex.output == "I've processed a $25 refund for order ORD-123"
    assert recorder.ran("process-refund") == [{**REFUND, "amount": 25}]
    assert_clean(fake, 2)
    [result] = fake.requests[-1].tool_results
    assert result["tool_use_id"] == tool_use_id(fake)
    assert result["is_error"] is False
    note, output = result["content"]
    assert note["type"] == output["type"] == "text"
    assert '"amount": 25' in note["text"] and "modified" in note["text"]
    assert json.loads(output["text"]) == {"refunded": 25, "orderId": "ORD-123"}


async def test_reject_sends_an_error_tool_result_with_the_reason(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic
) -> None:
    final = (
        "I wasn't able to process the refund. The approval was rejected because the amount "
        "exceeds the refund limit."
    )
    script_refund(fake, final=final)
    define_refund_agent(app, recorder, model=claude(fake))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    rid = ex.pending_approvals[0].request_id
    ex = await app.signal(ex.id, "reject", request_id=rid, reason="Amount exceeds refund limit")
    assert (ex.status, ex.output) == ("completed", final)
    assert recorder.calls == []
    assert_clean(fake, 2)
    [result] = fake.requests[-1].tool_results
    assert result["tool_use_id"] == tool_use_id(fake)
    assert result["is_error"] is True
    payload = json.loads(result["content"])
    assert payload["error"] == "approval_rejected"
    assert payload["reason"] == "Amount exceeds refund limit"
    assert "Amount exceeds refund limit" in payload["message"]


async def test_timeout_sends_the_spec_payload_as_an_error_tool_result(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic, clock: FakeClock
) -> None:
    final = "I wasn't able to process the refund because the approval request timed out."
    script_refund(fake, final=final)
    define_refund_agent(app, recorder, model=claude(fake))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    clock.advance(minutes=4, seconds=59)
    assert await app.fire_due_timers() == 0
    assert len(fake.requests) == 1
    clock.advance(seconds=1)
    assert await app.fire_due_timers() == 1
    done = await app.get_execution(ex.id)
    assert (done.status, done.output) == ("completed", final)
    assert recorder.calls == []
    assert_clean(fake, 2)
    [result] = fake.requests[-1].tool_results
    assert result["tool_use_id"] == tool_use_id(fake)
    assert result["is_error"] is True
    assert json.loads(result["content"]) == {
        "error": "approval_timeout",
        "message": "Approval request timed out after 5 minutes",
        "tool": "process-refund",
        "parameters": REFUND,
    }


async def test_restart_mid_approval_then_approve_in_the_new_process(
    tmp_path: Path, recorder: Recorder, fake: FakeAnthropic, clock: FakeClock
) -> None:
    url = f"sqlite:///{tmp_path / 'approvals.db'}"
    script_refund(fake)
    async with Clearance.open(url, clock=clock, ids=SequentialIds("a")) as first:
        define_refund_agent(first, recorder, model=claude(fake))
        ex = await first.run("safe-agent", input="Refund order ORD-123")
        assert ex.status == "awaiting_approval"
    async with Clearance.open(url, clock=clock, ids=SequentialIds("b")) as second:
        define_refund_agent(second, recorder, model=claude(fake))
        [req] = await second.pending()
        assert req.execution_id == ex.id
        done = await second.signal(ex.id, "approve", request_id=req.request_id)
    assert (done.status, done.output) == ("completed", DONE)
    assert recorder.ran("process-refund") == [REFUND]
    assert_clean(fake, 2)
    [_user, assistant, results] = sent(fake)["messages"]
    assert [assistant] == first_turn(fake)
    [result] = results["content"]
    assert (result["tool_use_id"], result["is_error"]) == (tool_use_id(fake), False)


# -- model options and how the key is found -----------------------------------------------


async def test_stop_sequences_and_max_tokens_from_model_reach_the_api(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic
) -> None:
    fake.reply(text("Hello."))
    define_refund_agent(
        app, recorder, model=claude(fake, max_tokens=1024, stop_sequences=["\n\nHuman:"])
    )
    ex = await app.run("safe-agent", input="Hi")
    assert (ex.status, ex.output) == ("completed", "Hello.")
    assert_clean(fake, 1)
    body = sent(fake)
    assert body["max_tokens"] == 1024
    assert body["stop_sequences"] == ["\n\nHuman:"]
    assert "temperature" not in body and "top_p" not in body


async def test_temperature_and_top_p_from_model_reach_the_api(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic
) -> None:
    fake.reply(text("Hello."))
    define_refund_agent(app, recorder, model=claude(fake, temperature=0.2, top_p=0.9))
    ex = await app.run("safe-agent", input="Hi")
    assert ex.error is None
    assert (ex.status, ex.output) == ("completed", "Hello.")
    assert_clean(fake, 1)
    assert (sent(fake)["temperature"], sent(fake)["top_p"]) == (0.2, 0.9)


async def test_an_injected_sdk_client_is_used_as_is(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic
) -> None:
    fake.api_key = "injected-key"
    script_refund(fake)
    client = anthropic.AsyncAnthropic(base_url=fake.url, api_key="injected-key", max_retries=0)
    try:
        define_refund_agent(
            app, recorder, model=Model(provider="anthropic", model=MODEL, client=client)
        )
        ex = await app.run("safe-agent", input="Refund order ORD-123")
        ex = await app.signal(ex.id, "approve", request_id=ex.pending_approvals[0].request_id)
    finally:
        await client.close()
    assert (ex.status, ex.output) == ("completed", DONE)
    assert_clean(fake, 2)
    assert {r.headers["authorization"] for r in fake.requests} == {"Bearer injected-key"}


async def test_the_key_comes_from_anthropic_api_key_when_model_has_none(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.api_key = "env-key"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "env-key")
    fake.reply(text("Hello."))
    define_refund_agent(app, recorder, model=claude(fake, api_key=None))
    ex = await app.run("safe-agent", input="Hi")
    assert (ex.status, ex.output) == ("completed", "Hello.")
    assert_clean(fake, 1)
    assert fake.requests[0].headers["authorization"] == "Bearer env-key"


async def test_no_key_anywhere_fails_the_execution_without_calling_the_api(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic
) -> None:
    define_refund_agent(app, recorder, model=claude(fake, api_key=None))
    ex = await app.run("safe-agent", input="Hi")
    assert ex.status == "failed"
    assert ex.error is not None and "ANTHROPIC_API_KEY" in ex.error
    assert fake.requests == []


# -- several tool_use blocks in one reply ---------------------------------------------------


def script_many(fake: FakeAnthropic) -> None:
    fake.reply(
        text("Let me check both orders and refund them."),
        tool_use("get-order", {"orderId": "ORD-1"}),
        tool_use("process-refund", {**REFUND, "orderId": "ORD-1"}),
        tool_use("process-refund", {**REFUND, "orderId": "ORD-2"}),
        tool_use("get-order", {"orderId": "ORD-2"}),
    )
    fake.reply(text("One refund went through, the other was rejected."))


def check_results_of_many(fake: FakeAnthropic, errors: list[bool]) -> None:
    assert_clean(fake, 2)
    uses = [b["id"] for b in fake.requests[0].answer["content"] if b["type"] == "tool_use"]
    [_user, assistant, results] = sent(fake)["messages"]
    assert [assistant] == first_turn(fake)
    assert results["role"] == "user"
    blocks = results["content"]
    assert [b["type"] for b in blocks] == ["tool_result"] * 4
    assert [b["tool_use_id"] for b in blocks] == uses
    assert [b["is_error"] for b in blocks] == errors


async def test_parallel_tool_uses_decided_one_at_a_time_each_get_one_result(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic
) -> None:
    script_many(fake)
    define_refund_agent(app, recorder, model=claude(fake))
    ex = await app.run("safe-agent", input="Refund ORD-1 and ORD-2")
    assert recorder.ran("get-order") == [{"orderId": "ORD-1"}]
    [first] = ex.pending_approvals
    assert first.parameters["orderId"] == "ORD-1"
    ex = await app.signal(ex.id, "approve", request_id=first.request_id)
    [second] = ex.pending_approvals
    assert second.parameters["orderId"] == "ORD-2"
    assert len(fake.requests) == 1
    ex = await app.signal(ex.id, "reject", request_id=second.request_id, reason="Duplicate")
    assert (ex.status, ex.output) == (
        "completed",
        "One refund went through, the other was rejected.",
    )
    assert [name for name, _, _ in recorder.calls] == ["get-order", "process-refund", "get-order"]
    check_results_of_many(fake, [False, False, True, False])


async def test_parallel_tool_uses_with_parallel_approvals_each_get_one_result(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic
) -> None:
    script_many(fake)
    hitl = HumanInLoop(enabled=True, approval_order="parallel")
    define_refund_agent(app, recorder, model=claude(fake), hitl=hitl)
    ex = await app.run("safe-agent", input="Refund ORD-1 and ORD-2")
    assert ex.status == "awaiting_approval"
    assert recorder.ran("get-order") == [{"orderId": "ORD-1"}, {"orderId": "ORD-2"}]
    first, second = ex.pending_approvals
    # Decided out of the model's order: the results still go back in it.
    ex = await app.signal(ex.id, "reject", request_id=second.request_id, reason="Duplicate")
    assert ex.status == "awaiting_approval"
    assert len(fake.requests) == 1
    ex = await app.signal(ex.id, "approve", request_id=first.request_id)
    assert ex.status == "completed"
    assert recorder.ran("process-refund") == [{**REFUND, "orderId": "ORD-1"}]
    check_results_of_many(fake, [False, False, True, False])


async def test_ungated_parallel_tool_uses_all_run_in_one_go(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic
) -> None:
    fake.reply(*(tool_use("get-order", {"orderId": f"ORD-{i}"}) for i in range(3)))
    fake.reply(text("All three are delivered."))
    define_refund_agent(app, recorder, model=claude(fake))
    ex = await app.run("safe-agent", input="Where are my orders?")
    assert (ex.status, ex.output) == ("completed", "All three are delivered.")
    assert_clean(fake, 2)
    assert len(fake.requests[-1].tool_results) == 3


# -- transient and permanent API errors -------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "message"),
    [
        (529, "overloaded_error", "Overloaded"),
        (429, "rate_limit_error", "Number of request tokens has exceeded your rate limit"),
        (500, "api_error", "Internal server error"),
    ],
)
async def test_a_transient_error_is_retried_and_the_execution_completes(
    app: Clearance,
    recorder: Recorder,
    fake: FakeAnthropic,
    status: int,
    kind: str,
    message: str,
) -> None:
    fake.error(status, kind, message)
    fake.reply(text(ASKS), tool_use("process-refund", REFUND))
    fake.error(status, kind, message)
    fake.reply(text(DONE))
    define_refund_agent(app, recorder, model=claude(fake))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert ex.status == "awaiting_approval"
    ex = await app.signal(ex.id, "approve", request_id=ex.pending_approvals[0].request_id)
    assert (ex.status, ex.output) == ("completed", DONE)
    assert recorder.ran("process-refund") == [REFUND]
    assert [r.status for r in fake.requests] == [status, 200, status, 200]
    assert [r.headers["x-stainless-retry-count"] for r in fake.requests] == ["0", "1"] * 2
    assert fake.rejections == [] and fake.left == 0
    # A retry resends the same request: the tool_result is there exactly once.
    assert fake.requests[2].body == fake.requests[3].body
    assert len(fake.requests[3].tool_results) == 1


async def test_overloaded_beyond_max_retries_fails_naming_the_status_and_message(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic
) -> None:
    fake.error(529, "overloaded_error", "Overloaded", times=3)
    define_refund_agent(app, recorder, model=claude(fake, max_retries=2))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert ex.status == "failed"
    assert ex.error is not None
    assert "529" in ex.error and "overloaded_error" in ex.error and "Overloaded" in ex.error
    assert len(fake.requests) == 3
    assert recorder.calls == []
    assert await app.pending() == []


@pytest.mark.parametrize(
    ("status", "kind", "message"),
    [
        (400, "invalid_request_error", "prompt is too long: 215000 tokens > 200000 maximum"),
        (
            403,
            "permission_error",
            "Your API key does not have permission to use the specified resource.",
        ),
    ],
)
async def test_a_client_error_fails_at_once_naming_the_status_and_message(
    app: Clearance,
    recorder: Recorder,
    fake: FakeAnthropic,
    status: int,
    kind: str,
    message: str,
) -> None:
    fake.error(status, kind, message)
    define_refund_agent(app, recorder, model=claude(fake))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert ex.status == "failed"
    assert ex.error is not None
    assert str(status) in ex.error and kind in ex.error and message in ex.error
    assert len(fake.requests) == 1  # a 4xx is not retried
    assert recorder.calls == []
    persisted = await app.get_execution(ex.id)
    assert (persisted.status, persisted.execution.error) == ("failed", ex.error)


async def test_a_wrong_key_fails_with_the_apis_401(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic
) -> None:
    script_refund(fake)
    define_refund_agent(app, recorder, model=claude(fake, api_key="wrong-key"))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert ex.status == "failed"
    assert ex.error is not None
    assert "401" in ex.error and "authentication_error" in ex.error
    assert "invalid x-api-key" in ex.error
    assert len(fake.requests) == 1
    assert recorder.calls == []


async def test_a_failure_after_an_approved_tool_ran_fails_the_execution(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic
) -> None:
    fake.reply(text(ASKS), tool_use("process-refund", REFUND))
    fake.error(400, "invalid_request_error", "messages: something the API did not like")
    define_refund_agent(app, recorder, model=claude(fake))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    ex = await app.signal(ex.id, "approve", request_id=ex.pending_approvals[0].request_id)
    assert ex.status == "failed"
    assert ex.error is not None and "something the API did not like" in ex.error
    assert recorder.ran("process-refund") == [REFUND]  # ran once, before the failure


async def test_an_unreachable_api_fails_the_execution_naming_the_connection_error(
    app: Clearance, recorder: Recorder
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    model = Model(provider="anthropic", model=MODEL, api_key="k", base_url=nowhere, max_retries=0)
    define_refund_agent(app, recorder, model=model)
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert ex.status == "failed"
    assert ex.error is not None and "could not reach the Anthropic API" in ex.error
    assert recorder.calls == []


async def test_model_timeout_bounds_a_slow_call(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic
) -> None:
    def slow(body: dict[str, Any]) -> Reply:
        time.sleep(0.5)
        return Reply((text("too late"),))

    fake.respond(slow)
    define_refund_agent(app, recorder, model=claude(fake, timeout=0.1, max_retries=0))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert ex.status == "failed"
    assert ex.error is not None and "timed out" in ex.error.lower()


async def test_unknown_tools_and_invalid_parameters_still_get_their_tool_results(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic
) -> None:
    fake.reply(
        tool_use("delete-account", {"userId": "u1"}),
        tool_use("process-refund", {"orderId": "ORD-123", "amount": "fifty"}),
        tool_use("get-order", {"orderId": "ORD-123"}),
    )
    fake.reply(text("I could only look the order up."))
    define_refund_agent(app, recorder, model=claude(fake))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert (ex.status, ex.output) == ("completed", "I could only look the order up.")
    assert [name for name, _, _ in recorder.calls] == ["get-order"]
    assert_clean(fake, 2)
    results = fake.requests[-1].tool_results
    assert [r["is_error"] for r in results] == [True, True, False]
    assert [json.loads(r["content"]).get("error") for r in results[:2]] == [
        "unknown_tool",
        "invalid_parameters",
    ]


def test_closing_clearance_closes_the_sdk_client_it_made(
    tmp_path: Path, fake: FakeAnthropic
) -> None:
    fake.reply(text("Hello."))

    async def one_session() -> None:
        url = f"sqlite:///{tmp_path / 'approvals.db'}"
        async with Clearance.open(url, clock=FakeClock()) as app:
            app.define(tag="greeter", model=claude(fake))
            assert (await app.run("greeter", input="Hi")).status == "completed"

    gc.collect()  # what earlier tests left behind is not this test's business
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        # Its own event loop, closed at the end: a socket still open then is a leak.
        asyncio.run(one_session())
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []


# -- usage and stop reasons -------------------------------------------------------------------


async def test_usage_is_summed_over_every_turn(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic
) -> None:
    fake.reply(tool_use("get-order", {"orderId": "ORD-123"}), usage=(100, 20))
    fake.reply(text(ASKS), tool_use("process-refund", REFUND), usage=(150, 30))
    fake.reply(text(DONE), usage=(210, 12))
    define_refund_agent(app, recorder, model=claude(fake))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert ex.usage == Usage(250, 50)
    ex = await app.signal(ex.id, "approve", request_id=ex.pending_approvals[0].request_id)
    assert (ex.status, ex.output) == ("completed", DONE)
    assert ex.usage == Usage(460, 62)
    assert (await app.get_execution(ex.id)).execution.usage == Usage(460, 62)
    assert_clean(fake, 3)


async def test_a_refusal_fails_the_execution_keeping_the_text(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic
) -> None:
    fake.reply(text("I can't help with that request."), stop_reason="refusal")
    define_refund_agent(app, recorder, model=claude(fake))
    ex = await app.run("safe-agent", input="Refund every order there is")
    assert ex.stop_reason == "refusal"
    assert ex.status == "failed"
    assert ex.error is not None and "refus" in ex.error  # refused / refusal
    assert ex.output == "I can't help with that request."
    assert recorder.calls == []


async def test_running_out_of_max_tokens_fails_the_execution_keeping_the_partial_text(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic
) -> None:
    fake.reply(text("Our refund policy says that"), stop_reason="max_tokens")
    define_refund_agent(app, recorder, model=claude(fake, max_tokens=16))
    ex = await app.run("safe-agent", input="Explain the refund policy")
    assert ex.stop_reason == "max_tokens"
    assert ex.status == "failed"
    assert ex.error is not None and "max_tokens" in ex.error
    assert ex.output == "Our refund policy says that"


async def test_stop_sequence_is_a_normal_end(
    app: Clearance, recorder: Recorder, fake: FakeAnthropic
) -> None:
    fake.reply(text("Refunds take 5 days."), stop_reason="stop_sequence", stop_sequence="END")
    define_refund_agent(app, recorder, model=claude(fake, stop_sequences=["END"]))
    ex = await app.run("safe-agent", input="How long do refunds take?")
    assert (ex.status, ex.output, ex.stop_reason) == (
        "completed",
        "Refunds take 5 days.",
        "stop_sequence",
    )


# -- the fake itself: it must refuse what the API refuses ---------------------------------------

USE = {"type": "tool_use", "id": "toolu_1", "name": "get-order", "input": {"orderId": "A"}}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "{}"}
ASKED = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [USE]}]
GOOD: dict[str, Any] = {"model": MODEL, "max_tokens": 64, "tools": TOOLS[1:]}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({**GOOD, "messages": []}, "at least one message"),
        ({**GOOD, "messages": ASKED[1:]}, 'first message must use the "user" role'),
        ({**GOOD, "messages": [ASKED[0], ASKED[0]]}, "roles must alternate"),
        (
            {**GOOD, "messages": [*ASKED, {"role": "user", "content": "go on"}]},
            "without `tool_result` blocks immediately after: toolu_1",
        ),
        (
            {**GOOD, "messages": [*ASKED, {"role": "user", "content": [RESULT, RESULT]}]},
            "single result",
        ),
        (
            {
                **GOOD,
                "messages": [
                    *ASKED,
                    {"role": "user", "content": [{"type": "text", "text": "so"}, RESULT]},
                ],
            },
            "tool_result blocks must come first",
        ),
        (
            {
                **GOOD,
                "messages": [
                    ASKED[0],
                    {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": [RESULT]},
                ],
            },
            "unexpected `tool_use_id`",
        ),
        ({**GOOD, "model": None, "messages": ASKED[:1]}, "model: Input should be"),
        (
            {k: v for k, v in GOOD.items() if k != "max_tokens"} | {"messages": ASKED[:1]},
            "max_tokens: Field required",
        ),
        ({**GOOD, "max_tokens": 0, "messages": ASKED[:1]}, "greater than or equal to 1"),
        (
            {**GOOD, "tools": [{"name": "get order", "input_schema": {"type": "object"}}]}
            | {"messages": ASKED[:1]},
            "should match pattern",
        ),
        (
            {**GOOD, "tools": [{"name": "get-order"}], "messages": ASKED[:1]},
            "input_schema: Field required",
        ),
        ({**GOOD, "temperature": 1.5, "messages": ASKED[:1]}, "temperature"),
        ({**GOOD, "messages": ASKED[:1], "seed": 1}, "seed: Extra inputs are not permitted"),
    ],
)
async def test_the_fake_answers_a_broken_request_with_the_apis_400(
    fake: FakeAnthropic, body: dict[str, Any], fragment: str
) -> None:
    fake.reply(text("unused"))
    headers = {"x-api-key": "test-key", "anthropic-version": "2023-06-01"}
    async with httpx2.AsyncClient(base_url=fake.url) as http:
        response = await http.post("/v1/messages", json=body, headers=headers)
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert fragment in error["error"]["message"]
    assert fake.left == 1  # a refused request uses up no scripted reply


@pytest.mark.parametrize(
    ("headers", "status", "fragment"),
    [
        ({"anthropic-version": "2023-06-01"}, 401, "x-api-key header is required"),
        ({"x-api-key": "nope", "anthropic-version": "2023-06-01"}, 401, "invalid x-api-key"),
        ({"x-api-key": "test-key"}, 400, "anthropic-version"),
    ],
)
async def test_the_fake_checks_headers_first(
    fake: FakeAnthropic, headers: dict[str, str], status: int, fragment: str
) -> None:
    body = {**GOOD, "messages": ASKED[:1]}
    async with httpx2.AsyncClient(base_url=fake.url) as http:
        response = await http.post("/v1/messages", json=body, headers=headers)
    assert response.status_code == status
    assert fragment in response.json()["error"]["message"]


async def test_the_fake_accepts_a_complete_round_and_answers_a_callable(
    fake: FakeAnthropic,
) -> None:
    fake.respond(lambda body: Reply((text(f"{len(body['messages'])} messages"),)))
    body = {**GOOD, "messages": [*ASKED, {"role": "user", "content": [RESULT]}]}
    headers = {"x-api-key": "test-key", "anthropic-version": "2023-06-01"}
    async with httpx2.AsyncClient(base_url=fake.url) as http:
        response = await http.post("/v1/messages", json=body, headers=headers)
    assert response.status_code == 200, response.text
    message = response.json()
    assert message["id"].startswith("msg_")
    assert (message["type"], message["role"], message["model"]) == ("message", "assistant", MODEL)
    assert message["content"] == [{"type": "text", "text": "3 messages"}]
    assert (message["stop_reason"], message["stop_sequence"]) == ("end_turn", None)
    assert message["usage"] == {"input_tokens": 10, "output_tokens": 5}
    assert fake.requests[0].body == body


def test_demo_uses_claude_when_the_key_is_set_and_says_so(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    fake = FakeAnthropic(api_key="demo-key")
    fake.reply(text("Let me look that order up."), tool_use("get-order", {"orderId": "ORD-123"}))
    fake.reply(
        text("I need to process a refund of $50 for order ORD-123"),
        tool_use("process-refund", {"orderId": "ORD-123", "amount": 50, "reason": "Damaged item"}),
    )
    fake.reply(text("I've processed the $50 refund for order ORD-123."))
    env = {k: v for k, v in os.environ.items() if k != "CLEARANCE_DB"}
    with fake.serving() as url:
        env.update(ANTHROPIC_API_KEY="demo-key", ANTHROPIC_BASE_URL=url)
        done = subprocess.run(
            [sys.executable, "-m", "clearance", "demo", "--auto", "approve", "--db", "d.db"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    assert done.returncode == 0, done.stderr
    assert "Claude (claude-sonnet-4-20250514, because ANTHROPIC_API_KEY is set)" in done.stdout
    assert "I've processed the $50 refund for order ORD-123." in done.stdout
    assert fake.rejections == [] and fake.left == 0
    assert [r.body["model"] for r in fake.requests] == ["claude-sonnet-4-20250514"] * 3
