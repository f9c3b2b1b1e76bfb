"""Webhook delivery of approval requests, against real HTTP receivers and a real SQLite file.

Receivers are Starlette apps under a real uvicorn on 127.0.0.1 (`servers.serving`);
they answer from a script and keep every request, raw, so the tests can check the
body and the Standard Webhooks signature with the public `standardwebhooks`
library, as a receiver would.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from conftest import REFUND, Recorder, refund_script, wait_for
from servers import free_port, serving
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from clearance import Clearance, HumanInLoop
from clearance.core.execution import TERMINAL
from clearance.ports.store import Delivery
from clearance.testing import FakeClock, ScriptedModel, text, tool_use

SECRET = "whsec_" + base64.b64encode(b"instance-secret-0123456789abcdef").decode()
AGENT_SECRET = "whsec_" + base64.b64encode(b"per-agent-secret-0123456789abcd").decode()
PUBLIC = "https://approvals.example.com"
SPEC_KEYS = {
    "type",
    "requestId",
    "executionId",
    "agentTag",
    "tool",
    "parameters",
    "reason",  # beyond the spec's example: the confirmation message, one body for all
    "timestamp",
    "expiresAt",
    "callbackUrl",
    "callDigest",
}
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$")
PROCESS = str(Path(__file__).with_name("webhook_process.py"))


# -- receivers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hang:
    """Answer after `seconds` (longer than the sender's timeout: it never sees the answer)."""

    seconds: float
    status: int = 200


@dataclass(frozen=True)
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    at: datetime  # wall clock on arrival

    @property
    def payload(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


class Receiver:
    """Answers the n-th request with `answers[n]`, then `then` forever; keeps every request."""

    def __init__(self, *answers: int | Hang, then: int | Hang = 200) -> None:
        self.answers = answers
        self.then = then
        self.hits: list[Hit] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.app = Starlette(routes=[Route("/{path:path}", self.receive, methods=["POST"])])

    async def receive(self, request: Request) -> Response:
        body = await request.body()
        n = len(self.hits)
        self.hits.append(Hit(request.url.path, dict(request.headers), body, datetime.now(UTC)))
        answer = self.answers[n] if n < len(self.answers) else self.then
        if isinstance(answer, Hang):
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                await asyncio.sleep(answer.seconds)
            finally:
                self.in_flight -= 1
            answer = answer.status
        return Response(f"answer {answer}", status_code=answer)


# -- helpers --------------------------------------------------------------------------------


def open_app(db: Path, **options: Any) -> Clearance:
    settings: dict[str, Any] = {
        "public_url": PUBLIC,
        "webhook_secret": SECRET,
        "webhook_timeout": 2.0,
        "webhook_retry_base": 0.02,
        "poll_interval": 0.02,
        **options,
    }
    return Clearance.open(f"sqlite:///{db}", **settings)


def define(
    app: Clearance,
    recorder: Recorder,
    webhook: str | None = None,
    *,
    tag: str = "safe-agent",
    timeout_ms: int = 300_000,
    webhook_secret: str | None = None,
    model: ScriptedModel | None = None,
) -> ScriptedModel:
    model = model or refund_script()
    app.define(
        tag=tag,
        model=model,
        tools=recorder.tools(),
        human_in_loop=HumanInLoop(
            enabled=True,
            approval_timeout=timeout_ms,
            approval_webhook=webhook,
            webhook_secret=webhook_secret,
        ),
    )
    return model


async def settled(app: Clearance, request_id: str, seconds: float = 10.0) -> Delivery:
    """The request's one delivery, once it is no longer pending."""

    async def done() -> Delivery | None:
        [delivery] = await app.deliveries(request_id)
        return delivery if delivery.status != "pending" else None

    result: Delivery = await wait_for(done, seconds)
    return result


async def paused(app: Clearance, tag: str = "safe-agent") -> tuple[str, str]:
    ex = await app.run(tag, input="Refund order ORD-123")
    assert ex.status == "awaiting_approval"
    [request] = ex.pending_approvals
    return ex.id, request.request_id


def outcomes(delivery: Delivery) -> list[tuple[int | None, str]]:
    return [(a.status_code, a.outcome) for a in delivery.attempts]


def parse_iso(value: str) -> datetime:
    assert ISO_UTC.match(value), value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def last_tool_result(model: ScriptedModel, execution_id: str) -> dict[str, Any]:
    [request] = [r for r in model.requests if r.execution_id == execution_id][-1:]
    [result] = request.messages[-1]["content"]
    return dict(result)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "approvals.db"


# -- the body and its signature -------------------------------------------------------------


async def test_body_is_the_spec_webhook_with_the_reason(db: Path, recorder: Recorder) -> None:
    receiver = Receiver()
    with serving(receiver.app) as url:
        async with open_app(db) as app:
            define(app, recorder, url + "/api/approvals", timeout_ms=120_000)
            before = datetime.now(UTC)
            execution_id, request_id = await paused(app)
            delivery = await settled(app, request_id)
            [request] = (await app.get_execution(execution_id)).pending_approvals
            expected_callback = app.callback_url(request)

    assert delivery.status == "delivered"
    [hit] = receiver.hits
    assert hit.path == "/api/approvals"
    assert hit.headers["content-type"] == "application/json"
    assert hit.webhook_id == f"msg_{request_id}" == delivery.webhook_id
    body = hit.payload
    assert set(body) == SPEC_KEYS
    assert body["type"] == "approval_request"
    assert body["requestId"] == request_id
    assert body["executionId"] == execution_id
    assert body["agentTag"] == "safe-agent"
    assert body["tool"] == "process-refund"
    assert body["parameters"] == REFUND
    assert body["reason"] == "Calling 'process-refund' requires approval"
    timestamp, expires = parse_iso(body["timestamp"]), parse_iso(body["expiresAt"])
    assert before - timedelta(seconds=1) <= timestamp <= hit.at
    assert expires - timestamp == timedelta(minutes=2)
    assert body["callbackUrl"] == expected_callback
    assert body["callDigest"] == request.digest and request.digest.startswith("sha256:")
    match = re.fullmatch(
        re.escape(f"{PUBLIC}/approvals/{request_id}/respond") + r"\?token=([^&]+)",
        body["callbackUrl"],
    )
    assert match, body["callbackUrl"]


async def test_signature_verifies_with_the_instance_secret_and_not_when_tampered(
    db: Path, recorder: Recorder
) -> None:
    params = {**REFUND, "reason": "Beschädigt, 破損 🚚"}  # signed as UTF-8, not escaped
    model = ScriptedModel([[tool_use("process-refund", params)], [text("Done.")]])
    receiver = Receiver()
    with serving(receiver.app) as url:
        async with open_app(db) as app:
            define(app, recorder, url + "/hook", model=model)
            _, request_id = await paused(app)
            await settled(app, request_id)

    [hit] = receiver.hits
    body = Webhook(SECRET).verify(hit.body, hit.headers)
    assert (body["requestId"], body["parameters"]) == (request_id, params)
    tampered = hit.body.replace(b'"amount":50', b'"amount":5000')
    assert tampered != hit.body
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(tampered, hit.headers)
    with pytest.raises(WebhookVerificationError):  # replayed under another message id
        Webhook(SECRET).verify(hit.body, {**hit.headers, "webhook-id": "msg_other"})
    with pytest.raises(WebhookVerificationError):  # someone else's secret
        Webhook(AGENT_SECRET).verify(hit.body, hit.headers)


async def test_per_agent_secret_signs_that_agents_webhooks(db: Path, recorder: Recorder) -> None:
    receiver = Receiver()
    with serving(receiver.app) as url:
        async with open_app(db) as app:
            define(app, recorder, url + "/hook", webhook_secret=AGENT_SECRET)
            define(app, recorder, url + "/hook", tag="other-agent")
            _, own = await paused(app)
            _, other = await paused(app, "other-agent")
            await settled(app, own)
            await settled(app, other)
            [request] = await app.pending("safe-agent")
            expected_callback = app.callback_url(request)

    [own_hit] = [h for h in receiver.hits if h.webhook_id == f"msg_{own}"]
    [other_hit] = [h for h in receiver.hits if h.webhook_id == f"msg_{other}"]
    body = Webhook(AGENT_SECRET).verify(own_hit.body, own_hit.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(own_hit.body, own_hit.headers)
    # The callback token is still the instance's: any process sharing it can check it.
    assert body["callbackUrl"] == expected_callback
    # An agent without its own secret keeps the instance's.
    Webhook(SECRET).verify(other_hit.body, other_hit.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(AGENT_SECRET).verify(other_hit.body, other_hit.headers)


# -- retries --------------------------------------------------------------------------------


@pytest.mark.parametrize("failures", [(500, 503), (429, 408)])
async def test_retryable_answers_are_retried_until_delivered(
    db: Path, recorder: Recorder, failures: tuple[int, int]
) -> None:
    receiver = Receiver(*failures, then=200)
    with serving(receiver.app) as url:
        async with open_app(db) as app:
            define(app, recorder, url + "/hook")
            started = datetime.now(UTC)
            _, request_id = await paused(app)
            delivery = await settled(app, request_id)
            await asyncio.sleep(0.1)  # nothing more is sent once delivered
            finished = datetime.now(UTC)

    assert delivery.status == "delivered"
    assert outcomes(delivery) == [
        (failures[0], "retry"),
        (failures[1], "retry"),
        (200, "delivered"),
    ]
    times = [a.at for a in delivery.attempts]
    assert all(t.tzinfo is not None for t in times)
    assert started <= times[0] < times[1] < times[2] <= finished
    assert len(receiver.hits) == 3
    assert {h.webhook_id for h in receiver.hits} == {f"msg_{request_id}"}
    for hit, attempt in zip(receiver.hits, delivery.attempts, strict=True):
        Webhook(SECRET).verify(hit.body, hit.headers)  # each attempt signed afresh
        sent_at = int(hit.headers["webhook-timestamp"])
        assert int(hit.at.timestamp()) - 1 <= sent_at <= int(attempt.at.timestamp())


async def test_each_retry_is_signed_with_a_fresh_timestamp_and_backs_off(
    db: Path, recorder: Recorder
) -> None:
    """Driven by hand on a fake clock (near real time, so signatures stay verifiable)."""
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))
    receiver = Receiver(500, 503, then=200)
    with serving(receiver.app) as url:
        app = open_app(db, clock=clock, webhook_retry_base=1.0)
        try:
            define(app, recorder, url + "/hook")
            _, request_id = await paused(app)
            sent = []
            for step, (code, outcome) in enumerate([(500, "retry"), (503, "retry"), (200, "x")]):
                sent.append(clock.now())
                assert await app.deliver_webhooks() == 1
                [delivery] = await app.deliveries(request_id)
                assert delivery.attempts[-1].status_code == code
                if outcome == "retry":
                    backoff = timedelta(seconds=2**step)  # retry_base * 2**(attempt - 1)
                    assert clock.now() < delivery.next_attempt_at <= clock.now() + backoff
                    assert await app.deliver_webhooks() == 0  # not due yet
                    clock.advance(seconds=7)
        finally:
            await app.close()

    assert delivery.status == "delivered"
    assert [h.headers["webhook-timestamp"] for h in receiver.hits] == [
        str(int(at.timestamp())) for at in sent
    ]
    assert len({h.headers["webhook-signature"] for h in receiver.hits}) == 3
    assert {h.webhook_id for h in receiver.hits} == {f"msg_{request_id}"}
    for hit in receiver.hits:
        Webhook(SECRET).verify(hit.body, hit.headers)


async def test_connection_refused_is_retried_until_the_receiver_comes_up(
    db: Path, recorder: Recorder
) -> None:
    port = free_port()  # nothing listens here yet
    receiver = Receiver()
    async with open_app(db) as app:
        define(app, recorder, f"http://127.0.0.1:{port}/hook")
        _, request_id = await paused(app)

        async def refused_twice() -> bool:
            [delivery] = await app.deliveries(request_id)
            return len(delivery.attempts) >= 2

        await wait_for(refused_twice)
        assert receiver.hits == []
        with serving(receiver.app, port):
            delivery = await settled(app, request_id)

    assert delivery.status == "delivered"
    *refused, last = delivery.attempts
    assert [(a.status_code, a.outcome) for a in refused] == [(None, "retry")] * len(refused)
    assert all("Connect" in (a.error or "") for a in refused), refused
    assert (last.status_code, last.outcome) == (200, "delivered")
    [hit] = receiver.hits
    assert hit.webhook_id == f"msg_{request_id}"


async def test_hanging_receiver_times_out_and_never_blocks_other_executions(
    db: Path, recorder: Recorder
) -> None:
    timeout = 0.4
    receiver = Receiver(Hang(1.5), then=200)
    with serving(receiver.app) as url:
        async with open_app(db, webhook_timeout=timeout) as app:
            define(app, recorder, url + "/hook")
            define(app, recorder, tag="plain-agent")  # no webhook
            _, request_id = await paused(app)
            await wait_for(lambda: receiver.in_flight == 1)  # the receiver is sitting on it

            # Meanwhile another execution runs, pauses, is decided and completes.
            other_id, other_request = await paused(app, "plain-agent")
            done = await app.signal(other_id, "approve", request_id=other_request)
            assert done.status == "completed"
            assert recorder.ran("process-refund") == [REFUND]
            [delivery] = await app.deliveries(request_id)
            assert receiver.in_flight == 1 and delivery.attempts == (), (
                "the other execution should finish while the webhook is still in flight"
            )

            delivery = await settled(app, request_id)

    assert delivery.status == "delivered"
    timed_out, delivered = delivery.attempts
    assert (timed_out.status_code, timed_out.outcome) == (None, "retry")
    assert "timed out" in (timed_out.error or "")
    waited = (timed_out.at - receiver.hits[0].at).total_seconds()
    assert timeout * 0.8 <= waited < 1.5, waited  # cut by the timeout, not by the receiver
    assert (delivered.status_code, delivered.outcome) == (200, "delivered")
    assert [h.webhook_id for h in receiver.hits] == [f"msg_{request_id}"] * 2


async def test_a_dead_receiver_never_delays_another_endpoints_webhooks(
    db: Path, recorder: Recorder
) -> None:
    timeout = 0.6
    slow, fast = Receiver(then=Hang(1.0)), Receiver()
    with serving(slow.app) as slow_url, serving(fast.app) as fast_url:
        async with open_app(db, webhook_timeout=timeout) as app:
            define(app, recorder, slow_url + "/hook")
            define(app, recorder, fast_url + "/hook", tag="fast-agent")
            for _ in range(16):
                await paused(app)
            # 16 requests for a hanging receiver: it gets its per-endpoint share of
            # attempts in flight, never every slot.
            await wait_for(lambda: slow.in_flight == app.webhooks.per_endpoint)
            started = time.monotonic()
            _, request_id = await paused(app, "fast-agent")
            delivery = await settled(app, request_id)
            waited = time.monotonic() - started

    assert delivery.status == "delivered"
    assert waited < timeout / 2, f"a healthy endpoint's webhook waited {waited:.2f}s"
    assert slow.most_in_flight == app.webhooks.per_endpoint


async def test_request_decided_before_delivery_is_skipped(db: Path, recorder: Recorder) -> None:
    port = free_port()  # the receiver is down while the approval is decided elsewhere
    receiver = Receiver()
    async with open_app(db) as app:
        define(app, recorder, f"http://127.0.0.1:{port}/hook")
        execution_id, request_id = await paused(app)

        async def refused_once() -> bool:
            [delivery] = await app.deliveries(request_id)
            return len(delivery.attempts) >= 1

        await wait_for(refused_once)
        ex = await app.signal(execution_id, "approve", request_id=request_id, by="cli")
        assert ex.status == "completed"
        with serving(receiver.app, port):
            delivery = await settled(app, request_id)
            await asyncio.sleep(0.1)

    assert delivery.status == "skipped"
    last = delivery.attempts[-1]
    assert (last.status_code, last.outcome) == (None, "skipped")
    assert receiver.hits == []  # nobody is asked about a request already decided


# -- answers that end the delivery ----------------------------------------------------------


@pytest.mark.parametrize("code", [400, 404, 422])
async def test_client_errors_fail_for_good_without_retry(
    db: Path, recorder: Recorder, code: int
) -> None:
    receiver = Receiver(code, then=200)
    with serving(receiver.app) as url:
        async with open_app(db) as app:
            define(app, recorder, url + "/hook")
            _, request_id = await paused(app)
            delivery = await settled(app, request_id)
            await asyncio.sleep(0.2)  # ten poll intervals: no retry comes
            [after] = await app.deliveries(request_id)

    assert delivery.status == "failed"
    assert outcomes(delivery) == [(code, "failed")]
    assert after == delivery
    assert len(receiver.hits) == 1


async def test_410_disables_the_endpoint_for_later_requests(db: Path, recorder: Recorder) -> None:
    gone, other = Receiver(then=410), Receiver()
    with serving(gone.app) as gone_url, serving(other.app) as other_url:
        async with open_app(db) as app:
            define(app, recorder, gone_url + "/hook")
            define(app, recorder, other_url + "/hook", tag="other-agent")
            _, first = await paused(app)
            disabled = await settled(app, first)
            _, second = await paused(app)
            later = await settled(app, second)
            _, elsewhere = await paused(app, "other-agent")
            delivered = await settled(app, elsewhere)

        # Disabled for good: the next process on this store does not send either.
        async with open_app(db) as app:
            define(app, recorder, gone_url + "/hook")
            _, third = await paused(app)
            after_restart = await settled(app, third)

    assert (disabled.status, outcomes(disabled)) == ("disabled", [(410, "disabled")])
    assert (later.status, outcomes(later)) == ("disabled", [(None, "disabled")])
    assert (after_restart.status, outcomes(after_restart)) == ("disabled", [(None, "disabled")])
    assert [h.webhook_id for h in gone.hits] == [f"msg_{first}"]  # never sent again
    assert delivered.status == "delivered"  # only that endpoint is disabled
    assert [h.webhook_id for h in other.hits] == [f"msg_{elsewhere}"]


IN_FLIGHT = timedelta(milliseconds=200)  # from the sender's last check to the receiver


async def test_retries_stop_at_the_approvals_expiry(db: Path, recorder: Recorder) -> None:
    receiver = Receiver(then=500)
    with serving(receiver.app) as url:
        async with open_app(db, webhook_retry_base=0.05) as app:
            model = define(app, recorder, url + "/hook", timeout_ms=1000)
            execution_id, request_id = await paused(app)
            delivery = await settled(app, request_id, seconds=5)

            async def finished() -> Any:
                ex = (await app.get_execution(execution_id)).execution
                return ex if ex.status in TERMINAL else None

            ex = await wait_for(finished, 5)
            count = len(receiver.hits)
            await asyncio.sleep(0.3)  # and nothing is sent afterwards

    assert delivery.status == "expired"
    assert len(receiver.hits) == count >= 2  # it did retry, then stopped
    expires = delivery.expires_at
    # The wire spells milliseconds; the stored expiry may carry microseconds.
    wire = parse_iso(receiver.hits[0].payload["expiresAt"])
    assert timedelta(0) <= expires - wire < timedelta(milliseconds=1)
    # No attempt starts at or after the expiry; one started just before it may land a
    # moment after it on a loaded machine (CI saw one arrive late with both CPUs busy).
    assert all(hit.at < expires + IN_FLIGHT for hit in receiver.hits)
    assert all(int(h.headers["webhook-timestamp"]) <= expires.timestamp() for h in receiver.hits)
    *retries, last = delivery.attempts
    assert [(a.status_code, a.outcome) for a in retries] == [(500, "retry")] * len(retries)
    assert last.outcome == "expired"
    assert len(delivery.attempts) == count + (last.status_code is None)
    # The approval itself timed out and the model was told; the tool never ran.
    assert ex.status == "completed"
    assert json.loads(last_tool_result(model, execution_id)["content"])["error"] == (
        "approval_timeout"
    )
    assert recorder.ran("process-refund") == []


# -- a crash between commit and delivery ----------------------------------------------------


def pause_then_crash(db: Path, hook: str, crash: str) -> dict[str, Any]:
    """Another process pauses on an approval for `hook`, then dies before delivering it."""
    mode = "exit" if crash == "exit" else "hold"
    proc = subprocess.Popen(
        [sys.executable, PROCESS, str(db), hook, PUBLIC, SECRET, mode],
        cwd=db.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        if crash == "sigkill":
            proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == (0 if crash == "exit" else -signal.SIGKILL)
        return dict(json.loads(line))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("crash", ["exit", "sigkill"])
async def test_request_committed_before_a_crash_is_delivered_once_after_restart(
    db: Path, recorder: Recorder, crash: str
) -> None:
    receiver = Receiver()
    with serving(receiver.app) as url:
        hook = url + "/hook"
        first = pause_then_crash(db, hook, crash)
        assert first["status"] == "awaiting_approval"
        request_id = first["request_id"]
        await asyncio.sleep(0.2)
        assert receiver.hits == []  # committed, never sent

        async with open_app(db) as app:
            [waiting] = await app.deliveries(request_id)
            assert (waiting.status, waiting.attempts) == ("pending", ())
            define(app, recorder, hook)  # hosting the agent again picks the delivery up
            delivery = await settled(app, request_id)
            await asyncio.sleep(0.2)

        async with open_app(db) as app:  # and a later process does not send it again
            define(app, recorder, hook)
            await asyncio.sleep(0.2)
            [final] = await app.deliveries(request_id)

    assert outcomes(delivery) == [(200, "delivered")]
    assert final == delivery
    [hit] = receiver.hits
    assert hit.webhook_id == f"msg_{request_id}"
    assert Webhook(SECRET).verify(hit.body, hit.headers)["requestId"] == request_id


# -- end to end through the HTTP API --------------------------------------------------------


DECISIONS: list[tuple[dict[str, Any], list[Any], str]] = [
    ({"approved": True}, [50], "ran"),
    ({"approved": True, "modifiedParams": {"amount": 25}}, [25], "modified"),
    ({"approved": False, "reason": "Amount exceeds refund limit"}, [], "approval_rejected"),
]


@asynccontextmanager
async def serving_here(app: Any, port: int) -> AsyncIterator[str]:
    """Serve `app` from this event loop, as `clearance serve` does: the HTTP API then
    shares the loop (and the store connection) with the Clearance it fronts."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await wait_for(lambda: server.started or task.done())
    if task.done():
        task.result()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.mark.parametrize(("decision", "amounts", "told"), DECISIONS)
async def test_receiver_decides_through_the_callback_url(
    db: Path, recorder: Recorder, decision: dict[str, Any], amounts: list[Any], told: str
) -> None:
    pytest.importorskip("clearance.http_api", reason="the HTTP API is not written yet")
    answers: list[tuple[int, Any]] = []

    async def decide(callback_url: str) -> None:
        async with httpx.AsyncClient() as client:
            for _ in range(2):  # the second decision is refused: the first one stands
                answer = await client.post(callback_url, json=decision)
                answers.append((answer.status_code, answer.json()))

    async def receive(request: Request) -> Response:
        body = await request.body()
        try:
            payload = Webhook(SECRET).verify(body, dict(request.headers))
        except WebhookVerificationError:
            return Response(status_code=400)
        # Acknowledge now; the "human" decides a moment later.
        return Response(status_code=204, background=BackgroundTask(decide, payload["callbackUrl"]))

    receiver = Starlette(routes=[Route("/hook", receive, methods=["POST"])])
    port = free_port()
    with serving(receiver) as url:
        async with open_app(db, public_url=f"http://127.0.0.1:{port}") as app:
            model = define(app, recorder, url + "/hook")
            async with serving_here(app.asgi(), port):
                execution_id, request_id = await paused(app)

                async def finished() -> Any:
                    ex = (await app.get_execution(execution_id)).execution
                    return ex if ex.status in TERMINAL else None

                ex = await wait_for(finished)
                delivery = await settled(app, request_id)
                await wait_for(lambda: len(answers) == 2)
                [record] = await app.audit(request_id=request_id)

    assert outcomes(delivery) == [(204, "delivered")]
    (first_status, first), (second_status, second) = answers
    assert first_status == 200, first
    assert first["requestId"] == request_id
    assert first["decision"] == ("approved" if decision["approved"] else "rejected")
    assert second_status == 409, second
    assert second["error"]["code"] == "already_decided"
    assert record.decision == first["outcome"]
    assert record.modified_params == decision.get("modifiedParams")
    assert ex.status == "completed"
    assert [p["amount"] for p in recorder.ran("process-refund")] == amounts
    result = last_tool_result(model, execution_id)
    if told == "approval_rejected":
        assert result["is_error"] is True
        error = json.loads(result["content"])
        assert error["error"] == "approval_rejected"
        assert error["reason"] == decision["reason"]
    elif told == "modified":
        note, output = result["content"]
        assert "modified parameters" in note["text"]
        assert json.loads(output["text"]) == {"refunded": 25, "orderId": "ORD-123"}
    else:
        assert json.loads(result["content"]) == {"refunded": 50, "orderId": "ORD-123"}


async def test_closing_mid_attempt_hands_the_delivery_back_at_once(
    db: Path, recorder: Recorder
) -> None:
    receiver = Receiver(Hang(2.0), then=200)
    with serving(receiver.app) as url:
        async with open_app(db, webhook_timeout=3.0) as app:
            define(app, recorder, url + "/hook")
            _, request_id = await paused(app)
            await wait_for(lambda: receiver.in_flight == 1)
        # Closed while the receiver sits on the first attempt. Without handing the
        # claim back, the next process would wait 2 x timeout + 5 s for the lease.
        started = time.monotonic()
        async with open_app(db, webhook_timeout=3.0) as app:
            define(app, recorder, url + "/hook")
            delivery = await settled(app, request_id)
        waited = time.monotonic() - started
    assert delivery.status == "delivered"
    assert waited < 2.0, f"redelivery waited {waited:.2f}s for a lease"
    assert [h.headers["webhook-id"] for h in receiver.hits] == [f"msg_{request_id}"] * 2


@pytest.mark.parametrize("own_secret", [False, True])
async def test_a_process_hosting_no_agent_delivers_only_instance_signed_webhooks(
    db: Path, recorder: Recorder, own_secret: bool
) -> None:
    """`clearance serve` hosts no agent: it can sign with the instance's secret, never
    with an agent's own, so it must leave those deliveries to the agent's host."""
    receiver = Receiver()
    agent_secret = "whsec_" + base64.b64encode(b"agent-secret-0123456789abcdef").decode()
    with serving(receiver.app) as url:
        host = open_app(db)  # no `async with`: this process never delivers
        define(host, recorder, url + "/hook", webhook_secret=agent_secret if own_secret else None)
        _, request_id = await paused(host)
        await host.close()
        server = open_app(db)  # defines nothing, like `clearance serve`
        attempted = await server.deliver_webhooks()
        [delivery] = await server.deliveries(request_id)
        await server.close()
    if own_secret:
        assert (attempted, delivery.status, receiver.hits) == (0, "pending", [])
    else:
        assert (attempted, delivery.status, len(receiver.hits)) == (1, "delivered", 1)


@pytest.mark.parametrize("hosts_the_agent", [True, False])
async def test_a_process_without_the_instance_secret_never_claims_instance_signed_deliveries(
    db: Path, recorder: Recorder, hosts_the_agent: bool
) -> None:
    """The CLI, a reviewer's app or `serve` without the env var cannot sign with the
    instance's secret: it must leave instance-signed deliveries pending for a process
    that can, never claim them and fail them for good, even for an agent it hosts."""
    receiver = Receiver()
    with serving(receiver.app) as url:
        host = open_app(db)  # no `async with`: this process never delivers
        define(host, recorder, url + "/hook")
        _, request_id = await paused(host)
        await host.close()
        keyless = open_app(db, webhook_secret=None, public_url=None)
        if hosts_the_agent:  # the same agent, defined without the webhook it cannot sign
            define(keyless, recorder)
        attempted = await keyless.deliver_webhooks()
        [delivery] = await keyless.deliveries(request_id)
        await keyless.close()
        assert (attempted, delivery.status, delivery.attempts, receiver.hits) == (
            0,
            "pending",
            (),
            [],
        )
        # A process that holds the secret delivers it afterwards, as if nothing happened.
        async with open_app(db) as server:
            assert await server.deliver_webhooks() == 1
            [delivery] = await server.deliveries(request_id)
    assert (delivery.status, len(receiver.hits)) == ("delivered", 1)
