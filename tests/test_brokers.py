"""Approval requests over a message broker (`approval_broker`): published from the
store's outbox, decided by a consumer publishing on `<event>.decisions`, refusals
answered on `<event>.errors`. Each test runs on the in-memory broker of
`clearance.testing` (`memory://NAME`) and on the machine's Redis (its own stream keys,
deleted afterwards).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from conftest import REFUND, Recorder, define_refund_agent, wait_for
from standardwebhooks.webhooks import Webhook

from clearance import ApprovalBroker, Clearance, ClearanceError, DefinitionError, HumanInLoop
from clearance.testing import MemoryBroker

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
REDIS = os.environ.get("CLEARANCE_TEST_REDIS", "redis://127.0.0.1:6379/0")
SIGNATURE = ("webhook-id", "webhook-timestamp", "webhook-signature")


class Memory:
    """The test's side of a memory broker."""

    kind = "memory"

    def __init__(self) -> None:
        self.name = f"test-{secrets.token_hex(4)}"
        self.hub = MemoryBroker.named(self.name)
        self.url = f"memory://{self.name}"
        self.event = "approval-requested"

    def messages(self, subject: str) -> list[dict[str, Any]]:
        return self.hub.messages(subject)

    def message_ids(self, subject: str) -> list[str]:
        return self.hub.message_ids(subject)

    def raw(self, subject: str) -> list[tuple[bytes, dict[str, str]]]:
        return self.hub.raw(subject)

    def publish(self, subject: str, body: dict[str, Any] | str) -> None:
        self.hub.publish(subject, body)

    def redeliver_soon(self) -> None:
        self.hub.redeliver_after = 0.05

    def close(self) -> None:
        self.hub.clear()


class Redis:
    """The test's side of the machine's Redis: stream keys of its own."""

    kind = "redis"

    def __init__(self) -> None:
        import redis

        self.client = redis.Redis.from_url(REDIS, socket_connect_timeout=3)
        try:
            self.client.ping()
        except redis.RedisError as err:
            why = f"no Redis answers at {REDIS} ({err})"
            if os.environ.get("CLEARANCE_REQUIRE_SERVICES") == "1":
                pytest.fail(f"CLEARANCE_REQUIRE_SERVICES=1 but {why}")
            pytest.skip(why)
        self.event = f"clearance-test-{secrets.token_hex(4)}.approval-requested"
        # Entries a consumer took and did not acknowledge come again after 0.2 s.
        self.url = f"{REDIS}?claim_after=0.2"

    def _entries(self, subject: str) -> list[dict[bytes, bytes]]:
        return [fields for _, fields in self.client.xrange(subject)]

    def messages(self, subject: str) -> list[dict[str, Any]]:
        return [json.loads(f[b"data"]) for f in self._entries(subject)]

    def message_ids(self, subject: str) -> list[str]:
        return [f[b"id"].decode() for f in self._entries(subject)]

    def raw(self, subject: str) -> list[tuple[bytes, dict[str, str]]]:
        return [
            (f[b"data"], {k: f[k.encode()].decode() for k in SIGNATURE if k.encode() in f})
            for f in self._entries(subject)
        ]

    def publish(self, subject: str, body: dict[str, Any] | str) -> None:
        self.client.xadd(subject, {"data": body if isinstance(body, str) else json.dumps(body)})

    def redeliver_soon(self) -> None:
        pass  # claim_after=0.2 in the URL

    def close(self) -> None:
        keys = list(self.client.scan_iter(match=f"{self.event}*"))
        if keys:
            self.client.delete(*keys)
        self.client.close()


@pytest.fixture(params=["memory", "redis"])
def hub(request: pytest.FixtureRequest) -> Iterator[Memory | Redis]:
    side = Memory() if request.param == "memory" else Redis()
    try:
        yield side
    finally:
        side.close()


@pytest.fixture
def memory_hub() -> Iterator[Memory]:
    side = Memory()
    yield side
    side.close()


async def _opened(tmp_path: Any, side: Memory | Redis) -> Clearance:
    return Clearance.open(
        f"sqlite:///{tmp_path / 'b.db'}",
        poll_interval=0.02,
        webhook_secret=SECRET,
        brokers={"approval-events": side.url},
    )


@pytest.fixture
async def app(tmp_path: Any, hub: Memory | Redis) -> AsyncIterator[Clearance]:
    async with await _opened(tmp_path, hub) as app:
        yield app


def _define(app: Clearance, recorder: Recorder, event: str) -> None:
    define_refund_agent(
        app,
        recorder,
        hitl=HumanInLoop(
            enabled=True,
            approval_broker=ApprovalBroker(broker="approval-events", event=event),
        ),
    )


async def _published(hub: Memory | Redis, n: int = 1) -> list[dict[str, Any]]:
    return await wait_for(lambda: (m := hub.messages(hub.event)) and len(m) >= n and m)  # type: ignore[no-any-return]


async def _paused_and_published(
    app: Clearance, hub: Memory | Redis, recorder: Recorder
) -> tuple[Any, str]:
    """The refund agent defined on the broker, one execution paused, its request out."""
    _define(app, recorder, hub.event)
    ex = await app.run("safe-agent", input="Refund ORD-123")
    await _published(hub)
    return ex, ex.pending_approvals[0].request_id


async def _status(app: Clearance, execution_id: str, *statuses: str) -> Any:
    async def rested() -> Any:
        ex = await app.execution(execution_id)
        return ex if ex is not None and ex.status in statuses else None

    return await wait_for(rested)


async def test_a_request_is_published_signed_and_decided_over_the_broker(
    app: Clearance, hub: Memory | Redis
) -> None:
    recorder = Recorder()
    _define(app, recorder, hub.event)
    ex = await app.run("safe-agent", input="Refund ORD-123")
    [request] = ex.pending_approvals
    [body] = await _published(hub)
    assert body["type"] == "approval_request"
    assert (body["requestId"], body["executionId"], body["tool"]) == (
        request.request_id,
        ex.id,
        "process-refund",
    )
    assert body["parameters"] == REFUND and body["agentTag"] == "safe-agent"
    assert {"reason", "timestamp", "expiresAt"} <= set(body)
    # The request id is the message id; signed as the webhook is (Standard Webhooks).
    assert hub.message_ids(hub.event) == [request.request_id]
    [(data, headers)] = hub.raw(hub.event)
    assert headers["webhook-id"] == request.request_id
    Webhook(SECRET).verify(data, headers)
    hub.publish(
        f"{hub.event}.decisions",
        {"requestId": request.request_id, "approved": True, "by": "slack-bot"},
    )
    done = await _status(app, ex.id, "completed")
    assert len(recorder.ran("process-refund")) == 1
    [record] = await app.audit(request_id=request.request_id)
    assert (record.decision, record.by) == ("approved", "slack-bot")
    assert done.request(request.request_id).status == "approved"
    assert hub.messages(f"{hub.event}.errors") == []


async def test_modified_and_rejected_over_the_broker(app: Clearance, hub: Memory | Redis) -> None:
    recorder = Recorder()
    _define(app, recorder, hub.event)
    first = await app.run("safe-agent", input="Refund ORD-1")
    second = await app.run("safe-agent", input="Refund ORD-2")
    a, b = first.pending_approvals[0].request_id, second.pending_approvals[0].request_id
    await _published(hub, 2)
    hub.publish(
        f"{hub.event}.decisions",
        {"requestId": a, "approved": True, "modifiedParams": {"amount": 20}, "by": "ops"},
    )
    hub.publish(
        f"{hub.event}.decisions",
        {"requestId": b, "approved": False, "reason": "Exceeds the limit", "by": "ops"},
    )
    await _status(app, first.id, "completed")
    rejected = await _status(app, second.id, "completed")
    [(_, params)] = [(n, p) for n, _, p in recorder.calls if n == "process-refund"]
    assert params["amount"] == 20
    assert rejected.request(b).rejection_reason == "Exceeds the limit"


async def test_an_invalid_modification_is_answered_on_the_error_subject_and_stays_pending(
    app: Clearance, hub: Memory | Redis
) -> None:
    recorder = Recorder()
    ex, request_id = await _paused_and_published(app, hub, recorder)
    bad = {"requestId": request_id, "approved": True, "modifiedParams": {"amount": "lots"}}
    hub.publish(f"{hub.event}.decisions", bad)
    [error] = await wait_for(lambda: hub.messages(f"{hub.event}.errors"))
    assert error["type"] == "decision_refused" and error["requestId"] == request_id
    assert error["error"]["code"] == "invalid_parameters", error
    assert "amount" in error["error"]["message"]
    assert (await app.execution(ex.id)).status == "awaiting_approval"  # type: ignore[union-attr]
    assert recorder.ran("process-refund") == []
    # Acknowledged: a valid decision after it is the one applied.
    hub.publish(f"{hub.event}.decisions", {"requestId": request_id, "approved": True, "by": "ops"})
    await _status(app, ex.id, "completed")
    assert len(recorder.ran("process-refund")) == 1
    assert len(hub.messages(f"{hub.event}.errors")) == 1


async def test_a_decision_delivered_twice_is_one_decision_and_one_run(
    app: Clearance, hub: Memory | Redis
) -> None:
    recorder = Recorder()
    ex, request_id = await _paused_and_published(app, hub, recorder)
    decision = {"requestId": request_id, "approved": True, "by": "ops"}
    hub.publish(f"{hub.event}.decisions", decision)
    hub.publish(f"{hub.event}.decisions", decision)  # a redelivery: the same decision
    # Then a different one, which is refused: the first decision stands.
    hub.publish(f"{hub.event}.decisions", {**decision, "approved": False, "reason": "no"})
    [error] = await wait_for(lambda: hub.messages(f"{hub.event}.errors"))
    assert error["error"]["code"] == "already_decided"
    await _status(app, ex.id, "completed")
    assert len(recorder.ran("process-refund")) == 1
    assert len(await app.audit(request_id=request_id)) == 1


@pytest.mark.parametrize(
    ("message", "says"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"approved": true}', "requestId"),
        ('{"requestId": "apr-x", "approved": "yes"}', "approved must be true or false"),
        ('{"requestId": "apr-x", "approved": true, "extra": 1}', "unknown fields"),
        ('{"requestId": "apr-nope", "approved": true}', "no approval request"),
    ],
)
async def test_a_malformed_decision_is_answered_and_not_delivered_again(
    app: Clearance, hub: Memory | Redis, message: str, says: str
) -> None:
    _define(app, Recorder(), hub.event)
    await app.run("safe-agent", input="Refund ORD-123")  # a consumer reads the subject
    hub.redeliver_soon()
    hub.publish(f"{hub.event}.decisions", message)
    [error] = await wait_for(lambda: hub.messages(f"{hub.event}.errors"))
    assert says in error["error"]["message"], error
    assert error["decision"] == message
    await _status_settled(hub)
    assert len(hub.messages(f"{hub.event}.errors")) == 1  # acknowledged: not handed out again


async def _status_settled(hub: Memory | Redis) -> None:
    await asyncio.sleep(0.6)  # several redelivery periods


async def test_a_broker_down_is_retried_and_published_once_it_is_back(
    tmp_path: Any, memory_hub: Memory
) -> None:
    async with await _opened(tmp_path, memory_hub) as app:
        await _down_then_back(app, memory_hub)


async def _down_then_back(app: Clearance, hub: Memory) -> None:
    hub.hub.down = True
    _define(app, Recorder(), hub.event)
    ex = await app.run("safe-agent", input="Refund ORD-123")
    request_id = ex.pending_approvals[0].request_id

    async def attempts() -> Any:
        [delivery] = await app.deliveries(request_id)
        return delivery if delivery.attempts else None

    tried = await wait_for(attempts)
    assert tried.channel == "broker:approval-events" and tried.status == "pending"
    assert tried.attempts[0].outcome == "retry" and "down" in (tried.attempts[0].error or "")
    assert hub.messages(hub.event) == []
    hub.hub.down = False
    # The relay's backoff starts at 1 s (webhook_retry_base): it comes within a few.
    await wait_for(lambda: hub.messages(hub.event), seconds=20)
    delivered = (await app.deliveries(request_id))[0]
    assert delivered.status == "delivered"
    assert hub.message_ids(hub.event) == [request_id]


async def test_broker_definitions_are_checked(tmp_path: Any) -> None:
    with pytest.raises(ClearanceError, match=r"unsupported URL 'kafka://x'.*memory://"):
        Clearance.open(f"sqlite:///{tmp_path / 'x.db'}", brokers={"events": "kafka://x"})
    with pytest.raises(ClearanceError, match="broker name"):
        Clearance.open(f"sqlite:///{tmp_path / 'x.db'}", brokers={"no spaces": "memory://x"})
    async with Clearance.open(
        f"sqlite:///{tmp_path / 'u.db'}", brokers={"events": "memory://defs"}
    ) as unsigned:
        with pytest.raises(DefinitionError, match="signs its messages"):
            _define_on(unsigned, "events")
    async with Clearance.open(
        f"sqlite:///{tmp_path / 'x.db'}", brokers={"events": "memory://defs"}, webhook_secret=SECRET
    ) as app:
        for broker, says in (
            (ApprovalBroker("other", "approval-requested"), "was not opened with"),
            ({"broker": "events"}, "takes the keys 'broker' and 'event'"),
            (ApprovalBroker("events", "has space"), "dot-separated"),
            (ApprovalBroker("events", "x.decisions"), "not ending in .decisions"),
            (ApprovalBroker("events", "a..b"), "dot-separated"),
        ):
            with pytest.raises(DefinitionError, match=says):
                define_refund_agent(
                    app, Recorder(), hitl=HumanInLoop(enabled=True, approval_broker=broker)
                )
        # The spec's dict form works too.
        define_refund_agent(
            app,
            Recorder(),
            hitl=HumanInLoop(
                enabled=True,
                approval_broker={"broker": "events", "event": "approval-requested"},
            ),
        )


class _FirstDecisionFails:
    """A store whose first commit of a decision fails, as a store that went away does."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.failed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def commit(self, writes: Any, **kwargs: Any) -> Any:
        if writes.event.TAG == "approved" and not self.failed:
            self.failed += 1
            raise sqlite3.OperationalError("disk I/O error")
        return await self._store.commit(writes, **kwargs)


async def test_a_decision_that_could_not_be_recorded_is_not_acknowledged_and_comes_again(
    app: Clearance, hub: Memory | Redis
) -> None:
    recorder = Recorder()
    ex, request_id = await _paused_and_published(app, hub, recorder)
    flaky = _FirstDecisionFails(app.store)
    app.engine.store = flaky  # type: ignore[assignment]
    hub.redeliver_soon()
    hub.publish(f"{hub.event}.decisions", {"requestId": request_id, "approved": True, "by": "ops"})
    await _status(app, ex.id, "completed")
    assert flaky.failed == 1
    assert len(recorder.ran("process-refund")) == 1
    assert hub.messages(f"{hub.event}.errors") == []


async def test_a_redis_that_lost_the_consumer_group_gets_it_made_again(tmp_path: Any) -> None:
    """Redis here keeps nothing on disk: after a restart the decisions stream and its
    group are gone (NOGROUP); the consumer makes them again and goes on."""
    side = Redis()
    try:
        async with await _opened(tmp_path, side) as app:
            recorder = Recorder()
            _define(app, recorder, side.event)
            first = await app.run("safe-agent", input="Refund ORD-1")
            await _published(side)
            side.publish(
                f"{side.event}.decisions",
                {"requestId": first.pending_approvals[0].request_id, "approved": True},
            )
            await _status(app, first.id, "completed")
            side.client.delete(f"{side.event}.decisions")  # as a restart without disk
            second = await app.run("safe-agent", input="Refund ORD-2")
            await _published(side, 2)
            await asyncio.sleep(1.5)  # the consumer's blocking read meets NOGROUP
            side.publish(
                f"{side.event}.decisions",
                {"requestId": second.pending_approvals[0].request_id, "approved": True},
            )
            await _status(app, second.id, "completed")
            assert len(recorder.ran("process-refund")) == 2
    finally:
        side.close()


async def test_a_redis_that_does_not_answer_is_a_retry_not_a_crash(tmp_path: Any) -> None:
    from clearance.adapters.redis_broker import RedisBroker

    broker = RedisBroker("events", "redis://127.0.0.1:1/0")
    async with Clearance.open(
        f"sqlite:///{tmp_path / 'x.db'}",
        brokers={"events": "redis://127.0.0.1:1/0"},
        webhook_secret=SECRET,
    ) as app:
        _define_on(app, "events")
        ex = await app.run("safe-agent", input="Refund ORD-1")
        request_id = ex.pending_approvals[0].request_id

        async def tried() -> Any:
            [delivery] = await app.deliveries(request_id)
            return delivery.attempts[0] if delivery.attempts else None

        attempt = await wait_for(tried)
        assert attempt.outcome == "retry" and "Connection" in (attempt.error or ""), attempt
    await broker.aclose()
    with pytest.raises(ClearanceError, match="claim_after"):
        Clearance.open(
            f"sqlite:///{tmp_path / 'y.db'}", brokers={"e": "redis://127.0.0.1/0?claim_after=x"}
        )


def _define_on(app: Clearance, broker: str) -> None:
    define_refund_agent(
        app,
        Recorder(),
        hitl=HumanInLoop(
            enabled=True,
            approval_broker=ApprovalBroker(broker=broker, event="approval-requested"),
        ),
    )
