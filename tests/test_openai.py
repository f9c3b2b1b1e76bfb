"""The spec's refund flow on the OpenAI-compatible adapter, against a fake Chat Completions
server that keeps the real API's rules (tests/fake_openai.py), under real uvicorn."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from conftest import REFUND, Recorder, define_refund_agent
from fake_openai import FakeOpenAI, call, check_request, error, reply
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion
from servers import free_port, serving

from clearance import Clearance, HumanInLoop, Model, Tool
from clearance.adapters.openai_model import (
    OpenAIModel,
    from_chat_completion,
    to_chat_messages,
    token_limit_name,
)
from clearance.core.execution import Usage
from clearance.ports.model import ModelCallError, ModelRequest
from clearance.testing import FakeClock, SequentialIds

SYSTEM = "You are a helpful assistant..."


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI()
    with serving(fake.app) as url:
        yield fake, url


@pytest.fixture(autouse=True)
def no_openai_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake(server: tuple[FakeOpenAI, str]) -> Iterator[FakeOpenAI]:
    fake = server[0]
    fake.reset()
    fake.api_key = None
    yield fake
    # Whatever a test did, the adapter never sent a conversation the real API would refuse
    # (tests that provoke refusals on purpose clear them).
    assert fake.rejections == []


@pytest.fixture
def url(server: tuple[FakeOpenAI, str]) -> str:
    return f"{server[1]}/v1"


def gpt(url: str | None, **options: Any) -> Model:
    return Model(
        **{
            "provider": "openai",
            "model": "gpt-4o",
            "api_key": "k",
            "base_url": url,
            "max_retries": 2,
            **options,
        }
    )


def refund_turn(**kwargs: Any) -> Any:
    return reply(
        "I need to process a refund of $50 for order ORD-123",
        tool_calls=[call("process-refund", REFUND)],
        **kwargs,
    )


def tool_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The tool messages at the end of a request, after the last assistant message."""
    messages = body["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [m for m in messages[last + 1 :] if m["role"] == "tool"]


# -- the spec's scenario --------------------------------------------------------------


async def test_approve_runs_the_refund_once_and_the_model_sees_its_result(
    app: Clearance, recorder: Recorder, fake: FakeOpenAI, url: str
) -> None:
    fake.script(refund_turn(), reply("Refunded $50."))
    define_refund_agent(app, recorder, model=gpt(url))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert ex.status == "awaiting_approval"
    [req] = ex.pending_approvals
    assert (req.tool, req.parameters) == ("process-refund", REFUND)
    assert recorder.calls == []

    ex = await app.signal(ex.id, "approve", request_id=req.request_id, by="ops-lead")
    assert (ex.status, ex.output) == ("completed", "Refunded $50.")
    assert recorder.ran("process-refund") == [REFUND]

    first, second = fake.requests
    assert first["model"] == "gpt-4o"
    assert first["max_tokens"] == 4096 and "max_completion_tokens" not in first
    assert first["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Refund order ORD-123"},
    ]
    refund = next(t for t in first["tools"] if t["function"]["name"] == "process-refund")
    assert refund["type"] == "function"
    assert refund["function"]["description"] == "Process a refund for an order"
    assert refund["function"]["parameters"]["required"] == ["orderId", "amount", "reason"]
    assert fake.seen[0].headers["authorization"] == "Bearer k"

    assistant = second["messages"][2]
    assert assistant["content"] == "I need to process a refund of $50 for order ORD-123"
    [tool_call] = assistant["tool_calls"]
    assert tool_call["id"] == req.tool_use_id
    assert tool_call["type"] == "function"
    assert tool_call["function"]["name"] == "process-refund"
    assert json.loads(tool_call["function"]["arguments"]) == REFUND
    [answer] = tool_messages(second)
    assert second["messages"][3] == answer
    assert answer["tool_call_id"] == req.tool_use_id
    assert json.loads(answer["content"]) == {"refunded": 50, "orderId": "ORD-123"}


async def test_approve_with_modified_params_runs_them_and_tells_the_model(
    app: Clearance, recorder: Recorder, fake: FakeOpenAI, url: str
) -> None:
    fake.script(refund_turn(), reply("Refunded $25."))
    define_refund_agent(app, recorder, model=gpt(url))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    rid = ex.pending_approvals[0].request_id
    ex = await app.signal(ex.id, "approve", request_id=rid, modified_params={"amount": 25})
    assert ex.status == "completed"
    assert recorder.ran("process-refund") == [{**REFUND, "amount": 25}]
    [answer] = tool_messages(fake.requests[-1])
    note, output = answer["content"].split("\n", 1)  # two text blocks, joined
    assert '"amount": 25' in note and "modified" in note
    assert json.loads(output)["refunded"] == 25


async def test_reject_never_runs_the_tool_and_the_model_sees_the_reason(
    app: Clearance, recorder: Recorder, fake: FakeOpenAI, url: str
) -> None:
    fake.script(refund_turn(), reply("The refund was declined."))
    define_refund_agent(app, recorder, model=gpt(url))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    rid = ex.pending_approvals[0].request_id
    ex = await app.signal(ex.id, "reject", request_id=rid, reason="Amount exceeds policy limit")
    assert (ex.status, ex.output) == ("completed", "The refund was declined.")
    assert recorder.calls == []
    [answer] = tool_messages(fake.requests[-1])
    payload = json.loads(answer["content"])
    assert payload["error"] == "approval_rejected"
    assert payload["reason"] == "Amount exceeds policy limit"


async def test_timeout_auto_rejects_and_the_model_gets_the_spec_payload(
    app: Clearance, recorder: Recorder, clock: FakeClock, fake: FakeOpenAI, url: str
) -> None:
    fake.script(refund_turn(), reply("Nobody approved in time."))
    define_refund_agent(app, recorder, model=gpt(url))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    clock.advance(minutes=5)
    assert await app.fire_due_timers() == 1
    assert recorder.calls == []
    [answer] = tool_messages(fake.requests[-1])
    assert json.loads(answer["content"]) == {
        "error": "approval_timeout",
        "message": "Approval request timed out after 5 minutes",
        "tool": "process-refund",
        "parameters": REFUND,
    }
    history = await app.get_execution(ex.id)
    assert (history.status, history.output) == ("completed", "Nobody approved in time.")


async def test_restart_mid_approval_then_approve(
    tmp_path: Path, recorder: Recorder, fake: FakeOpenAI, url: str
) -> None:
    fake.script(refund_turn(), reply("Refunded after the restart."))
    db = f"sqlite:///{tmp_path / 'approvals.db'}"
    async with Clearance.open(db, clock=FakeClock(), ids=SequentialIds()) as app:
        define_refund_agent(app, recorder, model=gpt(url))
        ex = await app.run("safe-agent", input="Refund order ORD-123")
        [req] = ex.pending_approvals
    async with Clearance.open(db, clock=FakeClock()) as app:
        define_refund_agent(app, recorder, model=gpt(url))
        assert [r.request_id for r in await app.pending()] == [req.request_id]
        ex = await app.signal(ex.id, "approve", request_id=req.request_id)
        assert (ex.status, ex.output) == ("completed", "Refunded after the restart.")
    assert recorder.ran("process-refund") == [REFUND]
    [answer] = tool_messages(fake.requests[-1])
    assert answer["tool_call_id"] == req.tool_use_id


# -- several tool calls in one reply ---------------------------------------------------


def three_calls() -> Any:
    return reply(
        tool_calls=[
            call("process-refund", {**REFUND, "orderId": "A"}),
            call("get-order", {"orderId": "B"}),
            call("process-refund", {**REFUND, "orderId": "C"}),
        ]
    )


def assert_each_call_answered_once_in_order(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body["messages"]
    i = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids = [c["id"] for c in messages[i]["tool_calls"]]
    after = messages[i + 1 :]
    assert [m["role"] for m in after] == ["tool"] * len(ids)
    assert [m["tool_call_id"] for m in after] == ids
    assert messages[i]["content"] is None  # tool calls only
    return after


async def test_parallel_tool_calls_sequential_order(
    app: Clearance, recorder: Recorder, fake: FakeOpenAI, url: str
) -> None:
    fake.script(three_calls(), reply("All done."))
    define_refund_agent(app, recorder, model=gpt(url))
    ex = await app.run("safe-agent", input="three things")
    [first] = ex.pending_approvals
    assert first.parameters["orderId"] == "A"
    ex = await app.signal(ex.id, "approve", request_id=first.request_id)
    [second] = ex.pending_approvals
    assert second.parameters["orderId"] == "C"
    ex = await app.signal(ex.id, "reject", request_id=second.request_id, reason="duplicate")
    assert (ex.status, ex.output) == ("completed", "All done.")
    assert [(n, p["orderId"]) for n, _, p in recorder.calls] == [
        ("process-refund", "A"),
        ("get-order", "B"),
    ]
    a, b, c = (
        json.loads(m["content"]) for m in assert_each_call_answered_once_in_order(fake.requests[-1])
    )
    assert (a["orderId"], b["orderId"], c["error"]) == ("A", "B", "approval_rejected")


async def test_parallel_tool_calls_parallel_order(
    app: Clearance, recorder: Recorder, fake: FakeOpenAI, url: str
) -> None:
    fake.script(three_calls(), reply("All done."))
    define_refund_agent(
        app, recorder, model=gpt(url), hitl=HumanInLoop(enabled=True, approval_order="parallel")
    )
    ex = await app.run("safe-agent", input="three things")
    assert [r.parameters["orderId"] for r in ex.pending_approvals] == ["A", "C"]
    assert [(n, p["orderId"]) for n, _, p in recorder.calls] == [("get-order", "B")]
    a, c = ex.pending_approvals
    ex = await app.signal(ex.id, "approve", request_id=c.request_id)
    assert ex.status == "awaiting_approval"
    assert len(fake.requests) == 1  # the model waits for every answer of the turn
    ex = await app.signal(ex.id, "reject", request_id=a.request_id, reason="no")
    assert ex.status == "completed"
    results = assert_each_call_answered_once_in_order(fake.requests[-1])
    assert [json.loads(m["content"]).get("error") for m in results] == [
        "approval_rejected",
        None,
        None,
    ]


# -- failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first",
    [
        error(429, "Rate limit reached for gpt-4o", code="rate_limit_exceeded"),
        error(503, "The server is overloaded or not ready yet."),
    ],
    ids=["429", "503"],
)
async def test_transient_error_then_success(
    app: Clearance, recorder: Recorder, fake: FakeOpenAI, url: str, first: Any
) -> None:
    fake.script(first, refund_turn())
    define_refund_agent(app, recorder, model=gpt(url))
    started = time.monotonic()
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert ex.status == "awaiting_approval"
    assert len(fake.seen) == 2
    # retry-after-ms is honoured: no 0.5 s exponential backoff (retry-after: 0 is not).
    assert time.monotonic() - started < 0.4


async def test_persistent_503_beyond_max_retries_fails_the_execution(
    app: Clearance, recorder: Recorder, fake: FakeOpenAI, url: str
) -> None:
    fake.script(*[error(503, "The server is overloaded or not ready yet.")] * 3, reply("never"))
    define_refund_agent(app, recorder, model=gpt(url, max_retries=2))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert ex.status == "failed"
    assert "503" in (ex.error or "")
    assert "The server is overloaded or not ready yet." in (ex.error or "")
    assert len(fake.seen) == 3  # one call and two retries
    assert fake.left == 1
    assert recorder.calls == [] and await app.pending() == []


@pytest.mark.parametrize(
    ("status", "message", "code", "expected"),
    [
        (
            400,
            "Invalid 'messages[1].content': string too long.",
            "string_above_max_length",
            "400 invalid_request_error (string_above_max_length)",
        ),
        (401, "Incorrect API key provided: k.", "invalid_api_key", "check OPENAI_API_KEY"),
        (
            403,
            "Project does not have access to model gpt-4o",
            "model_not_found",
            "403 permission_denied (model_not_found)",
        ),
        (404, "The model `gpt-4o` does not exist", "model_not_found", "check the model name"),
    ],
    ids=["400", "401", "403", "404"],
)
async def test_client_errors_fail_the_execution_at_once_naming_status_and_message(
    app: Clearance,
    recorder: Recorder,
    fake: FakeOpenAI,
    url: str,
    status: int,
    message: str,
    code: str,
    expected: str,
) -> None:
    fake.script(error(status, message, code=code))
    define_refund_agent(app, recorder, model=gpt(url))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert ex.status == "failed"
    assert f"answered {status}" in (ex.error or "")
    assert message in (ex.error or "")
    assert expected in (ex.error or "")
    assert len(fake.seen) == 1  # not retried
    assert recorder.calls == []


async def test_wrong_key_is_a_401_from_the_server(
    app: Clearance, recorder: Recorder, fake: FakeOpenAI, url: str
) -> None:
    fake.api_key = "sk-right"
    fake.script(refund_turn())
    define_refund_agent(app, recorder, model=gpt(url, api_key="sk-wrong"))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert ex.status == "failed"
    assert "401 invalid_request_error (invalid_api_key): Incorrect API key provided" in (
        ex.error or ""
    )
    assert fake.left == 1 and recorder.calls == []
    fake.rejections.clear()


async def test_unreachable_server_fails_after_retries(app: Clearance, recorder: Recorder) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    define_refund_agent(app, recorder, model=gpt(dead, max_retries=1))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert ex.status == "failed"
    assert f"could not reach the OpenAI-compatible API at {dead}/ after 1 retries" in (
        ex.error or ""
    )


@pytest.mark.parametrize(
    ("finish_reason", "error_part"),
    [("length", "max_tokens limit"), ("content_filter", "declined")],
)
async def test_unfinished_answers_fail_the_execution(
    app: Clearance,
    recorder: Recorder,
    fake: FakeOpenAI,
    url: str,
    finish_reason: str,
    error_part: str,
) -> None:
    fake.script(reply("Half an ans", finish_reason=finish_reason))
    define_refund_agent(app, recorder, model=gpt(url))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert (ex.status, ex.output) == ("failed", "Half an ans")
    assert error_part in (ex.error or "")


async def test_a_refusal_fails_the_execution_with_the_refusal_as_output(
    app: Clearance, recorder: Recorder, fake: FakeOpenAI, url: str
) -> None:
    fake.script(reply(refusal="I can't help with that."))
    define_refund_agent(app, recorder, model=gpt(url))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert (ex.status, ex.output) == ("failed", "I can't help with that.")
    assert "declined" in (ex.error or "")


# -- what the model sends that the core must not trust ---------------------------------


async def test_unparseable_arguments_go_back_to_the_model_and_ask_nobody(
    app: Clearance, recorder: Recorder, fake: FakeOpenAI, url: str
) -> None:
    cut_off = '{"orderId": "ORD-123", "amount": 5'
    fake.script(
        reply(
            tool_calls=[
                call("process-refund", cut_off),
                call("process-refund", "[1, 2]"),
                call("get-order", {"orderId": "ORD-123"}),
            ]
        ),
        reply("Let me try again."),
    )
    define_refund_agent(app, recorder, model=gpt(url))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert (ex.status, ex.output) == ("completed", "Let me try again.")
    assert await app.pending() == [] and await app.audit(execution_id=ex.id) == []
    assert recorder.ran("process-refund") == []
    assert recorder.ran("get-order") == [{"orderId": "ORD-123"}]
    results = assert_each_call_answered_once_in_order(fake.requests[-1])
    broken, listed, fine = (json.loads(m["content"]) for m in results)
    assert broken["error"] == listed["error"] == "invalid_parameters"
    assert "is not of type 'object'" in broken["message"] and cut_off in broken["message"]
    assert fine["orderId"] == "ORD-123"
    # The calls go back as JSON objects that compatible servers can parse.
    sent = fake.requests[-1]["messages"][2]["tool_calls"]
    assert json.loads(sent[0]["function"]["arguments"]) == {"_unparseable_arguments": cut_off}


async def test_a_call_of_a_tool_under_a_name_the_api_refuses_keeps_the_conversation_valid(
    app: Clearance, recorder: Recorder, fake: FakeOpenAI, url: str
) -> None:
    fake.script(reply(tool_calls=[call("functions.process-refund", REFUND)]), reply("Oops."))
    define_refund_agent(app, recorder, model=gpt(url))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert (ex.status, ex.output) == ("completed", "Oops.")
    assert recorder.calls == [] and await app.pending() == []
    [answer] = assert_each_call_answered_once_in_order(fake.requests[-1])
    assert json.loads(answer["content"])["error"] == "unknown_tool"
    [sent] = fake.requests[-1]["messages"][2]["tool_calls"]
    assert sent["function"]["name"] == "functions_process-refund"


async def test_tool_calls_with_finish_reason_stop_and_no_arguments_still_run(
    app: Clearance, recorder: Recorder, fake: FakeOpenAI, url: str
) -> None:
    seen: list[dict[str, Any]] = []

    def ping(ctx: Any, params: dict[str, Any]) -> str:
        seen.append(params)
        return "pong"

    fake.script(reply(tool_calls=[call("ping", "")], finish_reason="stop"), reply("pong!"))
    app.define(tag="a", model=gpt(url), tools=[Tool(tag="ping", handler=ping)])
    ex = await app.run("a", input="ping")
    assert (ex.status, ex.output) == ("completed", "pong!")
    assert seen == [{}]


# -- options, keys and clients -----------------------------------------------------------


async def test_usage_is_summed_over_the_model_calls(
    app: Clearance, recorder: Recorder, fake: FakeOpenAI, url: str
) -> None:
    fake.script(refund_turn(usage=(100, 20)), reply("Done.", usage=(150, 30)))
    define_refund_agent(app, recorder, model=gpt(url))
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    assert ex.usage == Usage(100, 20)
    ex = await app.signal(ex.id, "approve", request_id=ex.pending_approvals[0].request_id)
    assert ex.usage == Usage(250, 50)


async def test_call_options_are_sent(
    app: Clearance, recorder: Recorder, fake: FakeOpenAI, url: str
) -> None:
    fake.script(reply("ok"))
    model = gpt(url, temperature=0.2, top_p=0.9, max_tokens=512, stop_sequences=["END"])
    define_refund_agent(app, recorder, model=model)
    await app.run("safe-agent", input="hi")
    [body] = fake.requests
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["stop"]) == (
        0.2,
        0.9,
        512,
        ["END"],
    )


async def test_an_injected_client_is_used_as_is(
    app: Clearance, recorder: Recorder, fake: FakeOpenAI, url: str
) -> None:
    fake.script(refund_turn(), reply("Done."))
    client = AsyncOpenAI(api_key="injected", base_url=url, max_retries=0)
    define_refund_agent(
        app, recorder, model=Model(provider="openai", model="gpt-4o", client=client)
    )
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    ex = await app.signal(ex.id, "approve", request_id=ex.pending_approvals[0].request_id)
    assert ex.status == "completed"
    assert [s.headers["authorization"] for s in fake.seen] == ["Bearer injected"] * 2


async def test_openai_itself_gets_max_completion_tokens() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        bodies.append(json.loads(request.content))
        check_request(bodies[-1])
        completion = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": "o3-mini",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hi"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
        return httpx2.Response(200, json=completion)

    client = AsyncOpenAI(
        api_key="k", http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    )
    assert str(client.base_url) == "https://api.openai.com/v1/"
    model = OpenAIModel(Model(provider="openai", model="o3-mini", max_tokens=100, client=client))
    answer = await model.reply(
        ModelRequest(
            model="o3-mini", system="", messages=[{"role": "user", "content": "hi"}], tools=[]
        )
    )
    assert answer.content == [{"type": "text", "text": "hi"}]
    assert bodies[0]["max_completion_tokens"] == 100 and "max_tokens" not in bodies[0]
    assert token_limit_name("http://localhost:11434/v1") == "max_tokens"


async def test_no_key_is_fine_for_a_local_server_only(
    app: Clearance, recorder: Recorder, fake: FakeOpenAI, url: str
) -> None:
    fake.script(reply("local answer"))
    define_refund_agent(app, recorder, model=gpt(url, api_key=None))
    ex = await app.run("safe-agent", input="hi")
    assert (ex.status, ex.output) == ("completed", "local answer")
    assert fake.seen[0].headers["authorization"] == "Bearer not-needed"

    define_refund_agent(app, recorder, model=gpt(None, api_key=None))
    ex = await app.run("safe-agent", input="hi")
    assert ex.status == "failed"
    assert "no OpenAI API key: set OPENAI_API_KEY" in (ex.error or "")
    assert len(fake.seen) == 1


async def test_key_and_base_url_come_from_the_environment(
    app: Clearance,
    recorder: Recorder,
    fake: FakeOpenAI,
    url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    fake.script(reply("env answer"))
    define_refund_agent(app, recorder, model=Model(provider="openai", model="llama3.1"))
    ex = await app.run("safe-agent", input="hi")
    assert ex.output == "env answer"
    assert fake.seen[0].headers["authorization"] == "Bearer from-env"
    assert fake.requests[0]["model"] == "llama3.1"


async def test_aclose_closes_the_client_it_made_but_not_an_injected_one(
    fake: FakeOpenAI, url: str
) -> None:
    fake.script(reply("one"), reply("two"))
    request = ModelRequest(
        model="gpt-4o", system="", messages=[{"role": "user", "content": "hi"}], tools=[]
    )
    made = OpenAIModel(gpt(url))
    assert (await made.reply(request)).content == [{"type": "text", "text": "one"}]
    client = made._get_client()
    await made.aclose()
    assert client.is_closed()
    injected = AsyncOpenAI(api_key="k", base_url=url)
    model = OpenAIModel(Model(provider="openai", model="gpt-4o", client=injected))
    assert (await model.reply(request)).content == [{"type": "text", "text": "two"}]
    await model.aclose()
    assert not injected.is_closed()
    await injected.close()


def test_closing_clearance_closes_the_sdk_client_it_made(
    tmp_path: Path, fake: FakeOpenAI, url: str
) -> None:
    fake.script(reply("Hello."))

    async def one_session() -> None:
        async with Clearance.open(f"sqlite:///{tmp_path / 'a.db'}", clock=FakeClock()) as app:
            app.define(tag="greeter", model=gpt(url))
            assert (await app.run("greeter", input="Hi")).status == "completed"

    gc.collect()  # what earlier tests left behind is not this test's business
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        asyncio.run(one_session())  # its own loop, closed at the end: an open socket leaks
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_missing_sdk_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)
    app = Clearance.open("memory://")
    with pytest.raises(ModelCallError, match=r"pip install 'clearance\[openai\]'"):
        app.define(tag="a", model=Model(provider="openai", model="gpt-4o"))


# -- translation details and the fake's own rules ---------------------------------------


def test_conversation_translation_keeps_tool_answers_right_after_their_calls() -> None:
    messages = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Looking."},
                {"type": "tool_use", "id": "t1", "name": "get-order", "input": {"orderId": "A"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "also this"},
                {
                    "type": "tool_result",
                    "tool_use_id": "t1",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    "is_error": True,
                },
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
    ]
    out = to_chat_messages("sys", messages)
    assert out == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": "Looking.",
            "tool_calls": [
                {
                    "id": "t1",
                    "type": "function",
                    "function": {"name": "get-order", "arguments": '{"orderId": "A"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "a\nb"},
        {"role": "user", "content": "also this"},
        {"role": "assistant", "content": "ok"},
    ]
    check_request({"model": "m", "messages": out})
    with pytest.raises(ModelCallError, match="image"):
        to_chat_messages("", [{"role": "user", "content": [{"type": "image", "source": {}}]}])


def test_reply_translation_gives_every_tool_call_its_own_id() -> None:
    completion = ChatCompletion.model_validate(
        {
            "id": "chatcmpl-x",
            "object": "chat.completion",
            "created": 0,
            "model": "llama3.1",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "tool_calls",
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": i, "type": "function", "function": {"name": n, "arguments": ""}}
                            for i, n in (("", "a"), ("c", "b"), ("c", "c"))
                        ],
                    },
                }
            ],
        }
    )
    answer = from_chat_completion(completion, turn=3)
    assert [b["id"] for b in answer.content] == ["call_clearance_3_0", "c", "call_clearance_3_2"]
    assert answer.stop_reason == "tool_use" and answer.usage == Usage()


def test_the_fake_refuses_what_the_real_api_refuses() -> None:
    def conversation(*after: dict[str, Any]) -> dict[str, Any]:
        assistant = {
            "role": "assistant",
            "content": None,
            "tool_calls": [call("get-order", "{}", id="x"), call("get-order", "{}", id="y")],
        }
        return {"model": "m", "messages": [{"role": "user", "content": "go"}, assistant, *after]}

    x = {"role": "tool", "tool_call_id": "x", "content": "1"}
    y = {"role": "tool", "tool_call_id": "y", "content": "2"}
    check_request(conversation(x, y))
    bad = [
        (conversation(x), "did not have response messages: y"),
        (conversation(x, {"role": "user", "content": "?"}, y), "did not have response messages"),
        (conversation(x, y, x), "must be a response to a preceeding message"),
        (conversation(x, {"role": "tool", "tool_call_id": "z", "content": "3"}), "preceeding"),
        ({"model": "m", "messages": []}, "too short"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model parameter"),
        ({"model": "m", "messages": [{"role": "bot", "content": "hi"}]}, "Supported values"),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "no spaces"}}],
            },
            "does not match pattern",
        ),
    ]
    for body, message in bad:
        with pytest.raises(Exception, match=message):
            check_request(body)
    args = conversation(x, y)
    args["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"orderId": "A"}
    with pytest.raises(Exception, match="expected a string"):
        check_request(args)
