"""Approval requests over a message broker (`approval_broker`), on the in-memory broker
of `clearance.testing` (`memory://NAME`): published from the store's outbox, decided
by a consumer publishing on `<event>.decisions`, refusals answered on `<event>.errors`.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import REFUND, Recorder, define_refund_agent, wait_for
from standardwebhooks.webhooks import Webhook

from clearance import ApprovalBroker, Clearance, ClearanceError, DefinitionError, HumanInLoop
from clearance.testing import MemoryBroker

EVENT = "approval-requested"
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture
def hub() -> MemoryBroker:
    return MemoryBroker.named(f"test-{secrets.token_hex(4)}")


@pytest.fixture
async def app(tmp_path: Any, hub: MemoryBroker) -> AsyncIterator[Clearance]:
    name = next(k for k, v in MemoryBroker._hubs.items() if v is hub)
    async with Clearance.open(
        f"sqlite:///{tmp_path / 'b.db'}",
        poll_interval=0.02,
        webhook_secret=SECRET,
        brokers={"approval-events": f"memory://{name}"},
    ) as app:
        yield app


def _define(app: Clearance, recorder: Recorder) -> None:
    define_refund_agent(
        app,
        recorder,
        hitl=HumanInLoop(
            enabled=True,
            approval_broker=ApprovalBroker(broker="approval-events", event=EVENT),
        ),
    )


async def _published(hub: MemoryBroker, n: int = 1) -> list[dict[str, Any]]:
    return await wait_for(lambda: (m := hub.messages(EVENT)) and len(m) >= n and m)  # type: ignore[no-any-return]


async def _status(app: Clearance, execution_id: str, *statuses: str) -> Any:
    async def rested() -> Any:
        ex = await app.execution(execution_id)
        return ex if ex is not None and ex.status in statuses else None

    return await wait_for(rested)


async def test_a_request_is_published_signed_and_decided_over_the_broker(
    app: Clearance, hub: MemoryBroker
) -> None:
    recorder = Recorder()
    _define(app, recorder)
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
    assert hub.message_ids(EVENT) == [request.request_id]
    [(data, headers)] = hub.raw(EVENT)
    assert headers["webhook-id"] == request.request_id
    Webhook(SECRET).verify(data, headers)
    hub.publish(
        f"{EVENT}.decisions",
        {"requestId": request.request_id, "approved": True, "by": "slack-bot"},
    )
    done = await _status(app, ex.id, "completed")
    assert len(recorder.ran("process-refund")) == 1
    [record] = await app.audit(request_id=request.request_id)
    assert (record.decision, record.by) == ("approved", "slack-bot")
    assert done.request(request.request_id).status == "approved"
    assert hub.messages(f"{EVENT}.errors") == []


async def test_modified_and_rejected_over_the_broker(app: Clearance, hub: MemoryBroker) -> None:
    recorder = Recorder()
    _define(app, recorder)
    first = await app.run("safe-agent", input="Refund ORD-1")
    second = await app.run("safe-agent", input="Refund ORD-2")
    a, b = first.pending_approvals[0].request_id, second.pending_approvals[0].request_id
    await _published(hub, 2)
    hub.publish(
        f"{EVENT}.decisions",
        {"requestId": a, "approved": True, "modifiedParams": {"amount": 20}, "by": "ops"},
    )
    hub.publish(
        f"{EVENT}.decisions",
        {"requestId": b, "approved": False, "reason": "Exceeds the limit", "by": "ops"},
    )
    await _status(app, first.id, "completed")
    rejected = await _status(app, second.id, "completed")
    [(_, params)] = [(n, p) for n, _, p in recorder.calls if n == "process-refund"]
    assert params["amount"] == 20
    assert rejected.request(b).rejection_reason == "Exceeds the limit"


async def test_an_invalid_modification_is_answered_on_the_error_subject_and_stays_pending(
    app: Clearance, hub: MemoryBroker
) -> None:
    recorder = Recorder()
    _define(app, recorder)
    ex = await app.run("safe-agent", input="Refund ORD-123")
    request_id = ex.pending_approvals[0].request_id
    await _published(hub)
    bad = {"requestId": request_id, "approved": True, "modifiedParams": {"amount": "lots"}}
    hub.publish(f"{EVENT}.decisions", bad)
    [error] = await wait_for(lambda: hub.messages(f"{EVENT}.errors"))
    assert error["type"] == "decision_refused" and error["requestId"] == request_id
    assert error["error"]["code"] == "invalid_parameters", error
    assert "amount" in error["error"]["message"]
    assert (await app.execution(ex.id)).status == "awaiting_approval"  # type: ignore[union-attr]
    assert recorder.ran("process-refund") == []
    # Acknowledged: a valid decision after it is the one applied.
    hub.publish(f"{EVENT}.decisions", {"requestId": request_id, "approved": True, "by": "ops"})
    await _status(app, ex.id, "completed")
    assert len(recorder.ran("process-refund")) == 1
    assert len(hub.messages(f"{EVENT}.errors")) == 1


async def test_a_decision_delivered_twice_is_one_decision_and_one_run(
    app: Clearance, hub: MemoryBroker
) -> None:
    recorder = Recorder()
    _define(app, recorder)
    ex = await app.run("safe-agent", input="Refund ORD-123")
    request_id = ex.pending_approvals[0].request_id
    await _published(hub)
    decision = {"requestId": request_id, "approved": True, "by": "ops"}
    hub.publish(f"{EVENT}.decisions", decision)
    hub.publish(f"{EVENT}.decisions", decision)  # a redelivery: the same decision
    # Then a different one, which is refused: the first decision stands.
    hub.publish(f"{EVENT}.decisions", {**decision, "approved": False, "reason": "no"})
    [error] = await wait_for(lambda: hub.messages(f"{EVENT}.errors"))
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
    app: Clearance, hub: MemoryBroker, message: str, says: str
) -> None:
    _define(app, Recorder())
    await app.run("safe-agent", input="Refund ORD-123")  # a consumer reads the subject
    hub.redeliver_after = 0.05
    hub.publish(f"{EVENT}.decisions", message)
    [error] = await wait_for(lambda: hub.messages(f"{EVENT}.errors"))
    assert says in error["error"]["message"], error
    assert error["decision"] == message
    await _status_settled(hub)
    assert len(hub.messages(f"{EVENT}.errors")) == 1  # acknowledged: not handed out again


async def _status_settled(hub: MemoryBroker) -> None:
    import asyncio

    await asyncio.sleep(0.3)  # several redelivery periods


async def test_a_broker_down_is_retried_and_published_once_it_is_back(
    app: Clearance, hub: MemoryBroker
) -> None:
    hub.down = True
    _define(app, Recorder())
    ex = await app.run("safe-agent", input="Refund ORD-123")
    request_id = ex.pending_approvals[0].request_id

    async def attempts() -> Any:
        [delivery] = await app.deliveries(request_id)
        return delivery if delivery.attempts else None

    tried = await wait_for(attempts)
    assert tried.channel == "broker:approval-events" and tried.status == "pending"
    assert tried.attempts[0].outcome == "retry" and "down" in (tried.attempts[0].error or "")
    assert hub.messages(EVENT) == []
    hub.down = False
    # The relay's backoff starts at 1 s (webhook_retry_base): it comes within a few.
    await wait_for(lambda: hub.messages(EVENT), seconds=20)
    delivered = (await app.deliveries(request_id))[0]
    assert delivered.status == "delivered"
    assert hub.message_ids(EVENT) == [request_id]


async def test_broker_definitions_are_checked(tmp_path: Any) -> None:
    with pytest.raises(ClearanceError, match=r"unsupported URL 'kafka://x'.*memory://"):
        Clearance.open(f"sqlite:///{tmp_path / 'x.db'}", brokers={"events": "kafka://x"})
    with pytest.raises(ClearanceError, match="broker name"):
        Clearance.open(f"sqlite:///{tmp_path / 'x.db'}", brokers={"no spaces": "memory://x"})
    async with Clearance.open(
        f"sqlite:///{tmp_path / 'x.db'}", brokers={"events": "memory://defs"}
    ) as app:
        for broker, says in (
            (ApprovalBroker("other", EVENT), "was not opened with"),
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
            hitl=HumanInLoop(enabled=True, approval_broker={"broker": "events", "event": EVENT}),
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
    app: Clearance, hub: MemoryBroker
) -> None:
    recorder = Recorder()
    _define(app, recorder)
    ex = await app.run("safe-agent", input="Refund ORD-123")
    request_id = ex.pending_approvals[0].request_id
    await _published(hub)
    flaky = _FirstDecisionFails(app.store)
    app.engine.store = flaky  # type: ignore[assignment]
    hub.redeliver_after = 0.05
    hub.publish(f"{EVENT}.decisions", {"requestId": request_id, "approved": True, "by": "ops"})
    await _status(app, ex.id, "completed")
    assert flaky.failed == 1
    assert len(recorder.ran("process-refund")) == 1
    assert hub.messages(f"{EVENT}.errors") == []
