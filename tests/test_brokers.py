"""Approval requests over a message broker (`approval_broker`): published from the
store's outbox, decided by a consumer publishing on `<event>.decisions`, refusals
answered on `<event>.errors`. Each test runs on the in-memory broker of
`clearance.testing` (`memory://NAME`) and on the machine's Redis (its own stream keys,
deleted afterwards).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from broker_sides import SECRET, SERVED, SIDES, Memory, Side
from conftest import REFUND, Recorder, Releases, StoreWrapper, define_refund_agent, wait_for
from standardwebhooks.webhooks import Webhook

from clearance import ApprovalBroker, Clearance, ClearanceError, DefinitionError, HumanInLoop


@pytest.fixture(params=sorted(SIDES))
def hub(request: pytest.FixtureRequest) -> Iterator[Side]:
    side = SIDES[request.param]()
    try:
        yield side
    finally:
        side.close()


@pytest.fixture
def memory_hub() -> Iterator[Memory]:
    side = Memory()
    yield side
    side.close()


async def _opened(tmp_path: Any, side: Side) -> Clearance:
    return Clearance.open(
        f"sqlite:///{tmp_path / 'b.db'}",
        poll_interval=0.02,
        webhook_secret=SECRET,
        brokers={"approval-events": side.url},
    )


@pytest.fixture
async def app(tmp_path: Any, hub: Side) -> AsyncIterator[Clearance]:
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


async def _published(hub: Side, n: int = 1) -> list[dict[str, Any]]:
    return await wait_for(lambda: (m := hub.messages(hub.event)) and len(m) >= n and m)  # type: ignore[no-any-return]


async def _paused_and_published(app: Clearance, hub: Side, recorder: Recorder) -> tuple[Any, str]:
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
    app: Clearance, hub: Side
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
    assert (record.decision, record.by, record.by_kind) == ("approved", "slack-bot", "claimed")
    assert done.request(request.request_id).status == "approved"
    assert hub.messages(f"{hub.event}.errors") == []


async def test_modified_and_rejected_over_the_broker(app: Clearance, hub: Side) -> None:
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
    app: Clearance, hub: Side
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
    app: Clearance, hub: Side
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
    app: Clearance, hub: Side, message: str, says: str
) -> None:
    _define(app, Recorder(), hub.event)
    await app.run("safe-agent", input="Refund ORD-123")  # a consumer reads the subject
    await _published(hub)  # (on NATS the stream that takes the decisions is made then)
    hub.redeliver_soon()
    hub.publish(f"{hub.event}.decisions", message)
    [error] = await wait_for(lambda: hub.messages(f"{hub.event}.errors"))
    assert says in error["error"]["message"], error
    assert error["decision"] == message
    await _status_settled(hub)
    assert len(hub.messages(f"{hub.event}.errors")) == 1  # acknowledged: not handed out again


async def _status_settled(hub: Side) -> None:
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

    async def recorded() -> Any:
        # The relay records the attempt after the broker took the message: wait for both.
        [delivery] = await app.deliveries(request_id)
        return delivery if delivery.status != "pending" else None

    delivered = await wait_for(recorded)
    assert delivered.status == "delivered"
    assert hub.message_ids(hub.event) == [request_id]


async def test_broker_definitions_are_checked(tmp_path: Any) -> None:
    with pytest.raises(ClearanceError, match=r"unsupported URL 'kafka://x'.*memory://"):
        Clearance.open(f"sqlite:///{tmp_path / 'x.db'}", brokers={"events": "kafka://x"})
    assert not (tmp_path / "x.db").exists()  # refused before the store was opened
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


async def test_a_request_committed_here_is_published_at_once_not_at_the_next_poll(
    tmp_path: Any, memory_hub: Memory
) -> None:
    """The commit that opens a request wakes the relay: with a 30 s poll, it still goes
    out within the wait below."""
    async with Clearance.open(
        f"sqlite:///{tmp_path / 'b.db'}",
        poll_interval=30,
        webhook_secret=SECRET,
        brokers={"approval-events": memory_hub.url},
    ) as app:
        _define(app, Recorder(), memory_hub.event)
        await asyncio.sleep(0.2)  # the relay's first look (nothing due) is over
        ex = await app.run("safe-agent", input="Refund ORD-123")
        request_id = ex.pending_approvals[0].request_id
        await wait_for(lambda: memory_hub.message_ids(memory_hub.event) == [request_id], 10)


async def test_a_broker_takes_many_publishes_at_once(tmp_path: Any, memory_hub: Memory) -> None:
    """A webhook endpoint gets at most `per_endpoint` (4) attempts at once; a broker's
    event takes many (all twelve here, held open until they are all in flight), and
    nothing claimed is handed back unsent."""
    async with await _opened(tmp_path, memory_hub) as app:
        channel = app.brokers["approval-events"]
        publish, open_ = channel.send, asyncio.Event()
        in_flight = 0

        async def held(delivery: Any, body: dict[str, Any]) -> Any:
            nonlocal in_flight
            in_flight += 1
            await open_.wait()
            in_flight -= 1
            return await publish(delivery, body)

        channel.send = held  # type: ignore[method-assign]
        counting = Releases(app.webhooks.store)
        app.webhooks.store = counting  # type: ignore[assignment]
        _define(app, Recorder(), memory_hub.event)
        for n in range(12):
            await app.run("safe-agent", input=f"Refund ORD-{n}")
        await wait_for(lambda: in_flight == 12)
        open_.set()
        await wait_for(lambda: len(memory_hub.messages(memory_hub.event)) == 12)
        assert counting.released == 0


async def test_two_processes_share_the_decisions_each_applied_once(
    app: Clearance, hub: Side, tmp_path: Any
) -> None:
    """Two runtimes on one store host the agent and read the decisions as one group:
    every decision is applied once, by one of them, and every tool runs once."""
    recorder = Recorder()
    _define(app, recorder, hub.event)
    async with await _opened(tmp_path, hub) as other:
        _define(other, recorder, hub.event)
        runs = [await app.run("safe-agent", input=f"Refund ORD-{n}") for n in range(12)]
        await _published(hub, 12)
        for ex in runs:
            hub.publish(
                f"{hub.event}.decisions",
                {"requestId": ex.pending_approvals[0].request_id, "approved": True, "by": "ops"},
            )
        for ex in runs:
            await _status(app, ex.id, "completed")
        assert len(recorder.ran("process-refund")) == 12
        audits = [await app.audit(request_id=ex.pending_approvals[0].request_id) for ex in runs]
        assert all(len(records) == 1 for records in audits)
        assert hub.messages(f"{hub.event}.errors") == []


class _SlowApproval(StoreWrapper):
    """A store whose commit of an approval takes a while, as a busy store's does."""

    async def commit(self, writes: Any, **kwargs: Any) -> Any:
        if writes.event.TAG == "approved":
            await asyncio.sleep(0.3)
        return await self._store.commit(writes, **kwargs)


async def test_one_requests_decisions_are_applied_in_the_order_they_came(
    app: Clearance, hub: Side
) -> None:
    """Decisions are settled several at once, but the first one published for a
    request is the one that wins, even while it is slow to commit."""
    recorder = Recorder()
    ex, request_id = await _paused_and_published(app, hub, recorder)
    app.engine.store = _SlowApproval(app.store)  # type: ignore[assignment]
    subject = f"{hub.event}.decisions"
    hub.publish(subject, {"requestId": request_id, "approved": True, "by": "first"})
    hub.publish(subject, {"requestId": request_id, "approved": False, "by": "second"})
    errors = await wait_for(lambda: hub.messages(f"{hub.event}.errors"))
    # (At least once: on NATS the second may come again while the first is slow, and
    # be answered again.)
    assert {(e["error"]["code"], json.loads(e["decision"])["by"]) for e in errors} == {
        ("already_decided", "second")
    }, errors
    done = await _status(app, ex.id, "completed")
    assert done.request(request_id).decided_by == "first"
    assert len(recorder.ran("process-refund")) == 1


class _FirstDecisionFails(StoreWrapper):
    """A store whose first commit of a decision fails, as a store that went away does."""

    failed = 0

    async def commit(self, writes: Any, **kwargs: Any) -> Any:
        if writes.event.TAG == "approved" and not self.failed:
            self.failed += 1
            raise sqlite3.OperationalError("disk I/O error")
        return await self._store.commit(writes, **kwargs)


async def test_a_decision_that_could_not_be_recorded_is_not_acknowledged_and_comes_again(
    app: Clearance, hub: Side
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


@pytest.mark.parametrize("kind", SERVED)
async def test_a_broker_that_lost_its_streams_or_queues_gets_them_made_again(
    tmp_path: Any, kind: str
) -> None:
    """What Clearance made on the broker is gone (Redis here keeps nothing on disk, so
    a restart loses the streams and the group: NOGROUP; an operator deletes a NATS
    stream or the RabbitMQ queues): the next request and decision make it again."""
    side = SIDES[kind]()
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
            side.forget()  # type: ignore[union-attr]
            second = await app.run("safe-agent", input="Refund ORD-2")
            request_id = second.pending_approvals[0].request_id
            await wait_for(lambda: request_id in side.message_ids(side.event))
            await asyncio.sleep(1.5)  # the consumer's reads meet what is gone
            side.publish(
                f"{side.event}.decisions",
                {"requestId": request_id, "approved": True},
            )
            await _status(app, second.id, "completed")
            assert len(recorder.ran("process-refund")) == 2
    finally:
        side.close()


@pytest.mark.parametrize("kind", SERVED)
async def test_a_broker_that_does_not_answer_is_a_retry_not_a_crash(
    tmp_path: Any, kind: str
) -> None:
    """Nothing listens on port 1: opening, defining and running are not held up, and
    the delivery records its attempts as retries that say why."""
    side = SIDES[kind]()
    try:
        async with Clearance.open(
            f"sqlite:///{tmp_path / 'x.db'}",
            brokers={"events": side.url_for("127.0.0.1", 1)},  # type: ignore[union-attr]
            webhook_secret=SECRET,
        ) as app:
            _define_on(app, "events")
            ex = await app.run("safe-agent", input="Refund ORD-1")
            assert ex.status == "awaiting_approval"
            request_id = ex.pending_approvals[0].request_id

            async def tried() -> Any:
                [delivery] = await app.deliveries(request_id)
                return delivery.attempts[0] if delivery.attempts else None

            attempt = await wait_for(tried)
            assert attempt.outcome == "retry" and attempt.error, attempt
    finally:
        side.close()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://127.0.0.1/0?claim_after=x", "claim_after"),
        ("redis://127.0.0.1/0?maxlen=0", "above 0"),
        ("nats://127.0.0.1:4222?ack_wait=nan", "above 0"),
        ("nats://127.0.0.1:4222?max_msgs=lots", "max_msgs"),
        ("amqp://127.0.0.1/?prefetch=0", "above 0"),
        ("amqp://127.0.0.1/?prefetch=x", "prefetch"),
    ],
)
def test_broker_url_options_are_checked(tmp_path: Any, url: str, says: str) -> None:
    with pytest.raises(ClearanceError, match=says):
        Clearance.open(f"sqlite:///{tmp_path / 'y.db'}", brokers={"e": url})


def _define_on(app: Clearance, broker: str) -> None:
    define_refund_agent(
        app,
        Recorder(),
        hitl=HumanInLoop(
            enabled=True,
            approval_broker=ApprovalBroker(broker=broker, event="approval-requested"),
        ),
    )


async def test_a_decision_for_another_call_is_answered_stale_and_the_right_one_applies(
    app: Clearance, hub: Side
) -> None:
    recorder = Recorder()
    ex, request_id = await _paused_and_published(app, hub, recorder)
    [published] = hub.messages(hub.event)
    digest = published["callDigest"]
    assert digest.startswith("sha256:")
    stale = {"requestId": request_id, "approved": True, "callDigest": "sha256:" + "0" * 64}
    hub.publish(f"{hub.event}.decisions", stale)
    [error] = await wait_for(lambda: hub.messages(f"{hub.event}.errors"))
    assert error["error"]["code"] == "stale_decision", error
    assert recorder.ran("process-refund") == []
    right = {"requestId": request_id, "approved": True, "callDigest": digest, "by": "ops"}
    hub.publish(f"{hub.event}.decisions", right)
    await _status(app, ex.id, "completed")
    assert len(recorder.ran("process-refund")) == 1
