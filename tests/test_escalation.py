"""Reminders and escalation stages, through real webhook receivers and a real Redis.

A request nobody answers gets a reminder (`type: "approval_reminder"`) on its
channels `remind_before` its deadline; each escalation stage, `after` it opened,
delivers it again on the stage's own channel (`escalation: {stage, after}` in the
body) and opens it to the stage's reviewers. Both are timers in the store: they fire
once, never after a decision, and each firing is an event of the execution's log.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from conftest import Recorder, refund_script, wait_for
from servers import serving
from test_webhooks import PUBLIC, SECRET, Receiver

from clearance import ApprovalBroker, Clearance, Grant, HumanInLoop, Refusal, Reviewer, Stage
from clearance.core.replay import replay
from clearance.ports.store import Delivery
from clearance.testing import FakeClock

MINUTE = 60_000


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def receivers() -> AsyncIterator[tuple[Receiver, str, Receiver, str]]:
    """The agent's webhook receiver and the on-call lead's, on real HTTP."""
    team, lead = Receiver(), Receiver()
    with serving(team.app) as team_url, serving(lead.app) as lead_url:
        yield team, team_url, lead, lead_url


def open_app(db: Path, clock: FakeClock, **options: Any) -> Clearance:
    return Clearance.open(
        f"sqlite:///{db}",
        clock=clock,
        public_url=PUBLIC,
        webhook_secret=SECRET,
        webhook_timeout=2.0,
        webhook_retry_base=0.02,
        poll_interval=0.02,
        **options,
    )


def define(app: Clearance, recorder: Recorder, hitl: HumanInLoop) -> None:
    app.define(tag="safe-agent", model=refund_script(), tools=recorder.tools(), human_in_loop=hitl)


async def delivered(app: Clearance, request_id: str, count: int) -> list[Delivery]:
    """The request's deliveries, once `count` of them are no longer pending."""

    async def done() -> list[Delivery] | None:
        await app.deliver_webhooks()
        found = await app.deliveries(request_id)
        finished = [d for d in found if d.status != "pending"]
        return found if len(finished) >= count else None

    result: list[Delivery] = await wait_for(done, 10)
    return result


async def test_a_reminder_goes_out_before_the_deadline_once(
    tmp_path: Path, clock: FakeClock, recorder: Recorder, receivers: Any
) -> None:
    team, team_url, _, _ = receivers
    app = open_app(tmp_path / "a.db", clock)
    async with app:
        define(
            app,
            recorder,
            HumanInLoop(
                enabled=True,
                approval_timeout=5 * MINUTE,
                approval_webhook=team_url,
                remind_before="2m",
            ),
        )
        ex = await app.run("safe-agent", input="Refund order ORD-123")
        [request] = ex.pending_approvals
        await delivered(app, request.request_id, 1)
        clock.advance(minutes=2, seconds=59)
        assert await app.fire_due_timers() == 0  # not yet
        clock.advance(seconds=1)
        assert await app.fire_due_timers() == 1
        assert await app.fire_due_timers() == 0  # once
        deliveries = await delivered(app, request.request_id, 2)
        assert [(d.purpose, d.status) for d in deliveries] == [
            ("request", "delivered"),
            ("reminder", "delivered"),
        ]
        first, reminder = (hit.payload for hit in team.hits)
        assert first["type"] == "approval_request"
        assert reminder["type"] == "approval_reminder"
        assert reminder["requestId"] == first["requestId"] == request.request_id
        assert reminder["expiresAt"] == first["expiresAt"]
        assert team.hits[0].webhook_id != team.hits[1].webhook_id
        stored = await app.store.load(ex.id)
        assert stored is not None
        [pending] = stored.pending_approvals
        assert pending.reminded
        events = await app.store.events(ex.id)
        assert [e.TAG for e in events].count("timer_fired") == 1
        assert replay(stored.agent, None, events) == stored
        # The deadline still times it out, as before.
        clock.advance(minutes=2)
        assert await app.fire_due_timers() == 1


async def test_an_escalation_stage_delivers_to_its_channel_and_opens_to_its_reviewers(
    tmp_path: Path, clock: FakeClock, recorder: Recorder, receivers: Any
) -> None:
    team, team_url, lead, lead_url = receivers
    app = open_app(tmp_path / "b.db", clock)
    async with app:
        await app.save_reviewer(Reviewer("olga", [Grant(agents="other", tools="*")]))
        define(
            app,
            recorder,
            HumanInLoop(
                enabled=True,
                approval_timeout=30 * MINUTE,
                approval_webhook=team_url,
                escalation=[Stage(after="10m", channel=lead_url, reviewers=["olga"])],
            ),
        )
        ex = await app.run("safe-agent", input="Refund order ORD-123")
        [request] = ex.pending_approvals
        olga = await app.reviewer_identity("olga")
        assert olga is not None
        with pytest.raises(Refusal) as caught:
            await app.signal(ex.id, "approve", request_id=request.request_id, by=olga)
        assert caught.value.code == "not_granted"
        # Delivered first: with a fake clock, a send in flight while the clock jumps ten
        # minutes would outlive its lease and be sent again.
        await delivered(app, request.request_id, 1)
        clock.advance(minutes=10)
        assert await app.fire_due_timers() == 1
        deliveries = await delivered(app, request.request_id, 2)
        assert sorted((d.purpose, d.url) for d in deliveries) == [
            ("request", team_url),
            ("stage:1", lead_url),
        ]
        [escalated] = (hit.payload for hit in lead.hits)
        assert escalated["type"] == "approval_request"
        assert escalated["escalation"] == {"stage": 1, "after": "10 minutes"}
        assert escalated["requestId"] == request.request_id
        assert len(team.hits) == 1  # the team's channel is not sent the stage
        # Olga may decide it now; the tool runs once.
        ex = await app.signal(ex.id, "approve", request_id=request.request_id, by=olga)
        assert ex.status == "completed" and len(recorder.calls) == 1


async def test_a_stage_never_fires_after_a_decision(
    tmp_path: Path, clock: FakeClock, recorder: Recorder, receivers: Any
) -> None:
    _, team_url, lead, lead_url = receivers
    app = open_app(tmp_path / "c.db", clock)
    async with app:
        define(
            app,
            recorder,
            HumanInLoop(
                enabled=True,
                approval_timeout=30 * MINUTE,
                approval_webhook=team_url,
                remind_before="5m",
                escalation=[Stage(after="10m", channel=lead_url)],
            ),
        )
        ex = await app.run("safe-agent", input="Refund order ORD-123")
        [request] = ex.pending_approvals
        await app.signal(ex.id, "approve", request_id=request.request_id, by="ops")
        clock.advance(minutes=31)
        assert await app.fire_due_timers() == 0
        # The decision took its timers with it: no row is left to fire later.
        assert await app.store.claim_timers(clock.now(), clock.now(), 10) == []
        await delivered(app, request.request_id, 1)
        assert lead.hits == []
        events = await app.store.events(ex.id)
        assert "timer_fired" not in [e.TAG for e in events]


async def test_stages_in_order_each_once_even_when_the_process_was_down(
    tmp_path: Path, clock: FakeClock, recorder: Recorder, receivers: Any
) -> None:
    """Nobody fired timers for an hour: the first sweep after finds both stages and
    the reminder due, and sends each once."""
    _, team_url, lead, lead_url = receivers
    app = open_app(tmp_path / "d.db", clock)
    async with app:
        define(
            app,
            recorder,
            HumanInLoop(
                enabled=True,
                approval_timeout=120 * MINUTE,
                approval_webhook=team_url,
                remind_before="90m",
                escalation=[
                    Stage(after="10m", channel=lead_url),
                    Stage(after="20m", channel=lead_url + "/second"),
                ],
            ),
        )
        ex = await app.run("safe-agent", input="Refund order ORD-123")
        [request] = ex.pending_approvals
        await delivered(app, request.request_id, 1)
        clock.advance(minutes=60)
        fired = await app.fire_due_timers()
        assert fired >= 1
        assert await app.fire_due_timers() == 0
        deliveries = await delivered(app, request.request_id, 4)
        assert sorted(d.purpose for d in deliveries) == [
            "reminder",
            "request",
            "stage:1",
            "stage:2",
        ]
        assert sorted(hit.path for hit in lead.hits) == ["/", "/second"]
        stored = await app.store.load(ex.id)
        assert stored is not None
        [pending] = stored.pending_approvals
        assert (pending.reminded, pending.stages_fired) == (True, 2)


async def test_an_extension_moves_the_reminder(
    tmp_path: Path, clock: FakeClock, recorder: Recorder, receivers: Any
) -> None:
    _, team_url, _, _ = receivers
    app = open_app(tmp_path / "e.db", clock)
    async with app:
        app.define(
            tag="safe-agent",
            model=refund_script(),
            tools=recorder.tools(
                approval_timeout=10 * MINUTE, max_approval_timeout="1h", remind_before="2m"
            ),
            human_in_loop=HumanInLoop(enabled=True, approval_webhook=team_url),
        )
        ex = await app.run("safe-agent", input="Refund order ORD-123")
        [request] = ex.pending_approvals
        await delivered(app, request.request_id, 1)
        until = request.timestamp + (request.timeout - request.timestamp) * 3  # 30 minutes
        await app.signal(ex.id, "extend", request_id=request.request_id, until=until, by="ops")
        clock.advance(minutes=9)  # the old reminder time (8 minutes) has passed
        assert await app.fire_due_timers() == 0
        clock.advance(minutes=19)  # 28 minutes: 2 before the new deadline
        assert await app.fire_due_timers() == 1
        deliveries = await delivered(app, request.request_id, 2)
        assert [d.purpose for d in deliveries] == ["request", "reminder"]


def test_stages_are_checked_at_define(clock: FakeClock, recorder: Recorder, tmp_path: Path) -> None:
    from clearance import DefinitionError

    app = open_app(tmp_path / "f.db", clock)
    bad = [
        ([Stage(after="10m")], "give it a channel"),
        ([Stage(after="20m", reviewers=["a"]), Stage(after="10m", reviewers=["b"])], "in order"),
        ([Stage(after="1h", reviewers=["a"])], "never fire"),
        ([Stage(after="soon", reviewers=["a"])], "after is milliseconds"),
        ([Stage(after="1m", channel="ftp://x")], "webhook URL"),
    ]
    for stages, message in bad:
        with pytest.raises(DefinitionError, match=message):
            define(
                app,
                recorder,
                HumanInLoop(enabled=True, approval_timeout=30 * MINUTE, escalation=stages),
            )
    with pytest.raises(DefinitionError, match="shorter than"):
        define(
            app, recorder, HumanInLoop(enabled=True, approval_timeout=MINUTE, remind_before="5m")
        )


# -- a broker stage (Redis) ------------------------------------------------------------------


async def test_an_escalation_stage_published_on_redis(
    tmp_path: Path, clock: FakeClock, recorder: Recorder
) -> None:
    redis = pytest.importorskip("redis.asyncio")
    client = redis.Redis(host="127.0.0.1", port=6379)
    event = f"clearance-test.escalated.{uuid.uuid4().hex[:8]}"
    try:
        await client.ping()
    except Exception as err:  # pragma: no cover - the machine runs Redis
        await client.aclose()
        pytest.fail(f"Redis at 127.0.0.1:6379 does not answer: {err}")
    app = open_app(tmp_path / "g.db", clock, brokers={"events": "redis://127.0.0.1:6379"})
    try:
        async with app:
            define(
                app,
                recorder,
                HumanInLoop(
                    enabled=True,
                    approval_timeout=30 * MINUTE,
                    escalation=[Stage(after="5m", channel=ApprovalBroker("events", event))],
                ),
            )
            ex = await app.run("safe-agent", input="Refund order ORD-123")
            [request] = ex.pending_approvals
            clock.advance(minutes=5)
            assert await app.fire_due_timers() == 1

            async def published() -> list[Any] | None:
                await app.deliver_webhooks()
                entries = await client.xrange(event)
                return entries or None

            [(_, fields)] = await wait_for(published, 10)
            data = {k.decode(): v.decode() for k, v in fields.items()}
            body = json.loads(data["data"])
            assert body["requestId"] == request.request_id
            assert body["escalation"]["stage"] == 1
            [delivery] = await app.deliveries(request.request_id)
            assert (delivery.purpose, delivery.status) == ("stage:1", "delivered")
    finally:
        await client.delete(event, f"{event}.decisions", f"{event}.errors")
        await client.aclose()


async def test_a_redeploy_that_changes_the_call_sends_it_again_with_a_fresh_url(
    tmp_path: Path, clock: FakeClock, recorder: Recorder, receivers: Any
) -> None:
    """The callback URL already sent is bound to the call as it was; a redefinition
    that changes the call (here: a policy now asks for it) sends the request again, as
    its own message, with a URL that decides it."""
    import httpx

    from clearance import Rule
    from clearance.http_api import build_asgi

    team, team_url, _, _ = receivers
    app = open_app(tmp_path / "h.db", clock)
    async with app:
        hitl = HumanInLoop(enabled=True, approval_webhook=team_url)
        define(app, recorder, hitl)
        ex = await app.run("safe-agent", input="Refund order ORD-123")
        [request] = ex.pending_approvals
        await delivered(app, request.request_id, 1)
        policy = [Rule.ask("process-refund", id="refunds", reason="Refunds need a person.")]
        define(app, recorder, attrs.evolve(hitl, policy=policy))
        await app.engine.sweep_redefined()
        deliveries = await delivered(app, request.request_id, 2)
        purposes = [d.purpose for d in deliveries]
        assert purposes[0] == "request" and purposes[1].startswith("revised:")
        first, again = (hit.payload for hit in team.hits)
        assert first["callDigest"] != again["callDigest"]
        assert again["policy"]["ruleId"] == "refunds"
        transport = httpx.ASGITransport(app=build_asgi(app))
        async with httpx.AsyncClient(transport=transport, base_url=PUBLIC) as client:
            stale = await client.post(first["callbackUrl"], json={"approved": True})
            assert stale.status_code == 409, stale.text
            assert stale.json()["error"]["code"] == "stale_decision"
            fresh = await client.post(again["callbackUrl"], json={"approved": True})
            assert fresh.status_code == 200, fresh.text
        assert len(recorder.calls) == 1
