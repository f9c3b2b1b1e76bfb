"""Approval channels: a second way out is one class, and the relay does the rest.

The memory channel below stands for a message broker (Redis Streams, NATS, RabbitMQ):
registered with a relay under its own name, it is handed the deliveries of its channel
and nothing else, and the relay claims, retries, backs off and records for it exactly
as for webhooks.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Recorder, Releases, refund_script

from clearance import Clearance, HumanInLoop, views
from clearance.adapters.webhook_channel import WebhookChannel, classify
from clearance.adapters.webhook_sender import WebhookSender
from clearance.core import rows
from clearance.core.execution import ApprovalRequest, Execution
from clearance.delivery import DeliveryRelay
from clearance.ports.channel import DELIVERED, DISABLED, FAILED, RETRY, ApprovalChannel, Sent
from clearance.ports.store import Delivery
from clearance.testing import FakeClock

SECRET = "whsec_" + base64.b64encode(b"instance-secret-0123456789abcdef").decode()
PUBLIC = "https://approvals.example.com"
MEMORY = "memory"
STREAM = "memory://reviewers"


class MemoryChannel:
    """Answers the n-th send with `answers[n]`, then delivered; keeps what it was sent."""

    name = MEMORY
    per_target = None

    def __init__(self, *answers: Sent | BaseException | float) -> None:
        self.answers = list(answers)
        self.sent: list[tuple[Delivery, dict[str, Any]]] = []
        self.closed = False

    async def send(self, delivery: Delivery, body: dict[str, Any]) -> Sent:
        self.sent.append((delivery, body))
        answer = self.answers.pop(0) if self.answers else Sent(DELIVERED)
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, float):  # hang this long, then say delivered
            await asyncio.sleep(answer)
            return Sent(DELIVERED)
        return answer

    async def aclose(self) -> None:
        self.closed = True


@pytest.fixture
def memory_rows(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every approval request also gets a delivery on the memory channel, written by the
    core in the commit that opens the request, as a broker channel's row will be."""
    webhook_rows = rows._deliveries

    def both(execution: Execution, request: ApprovalRequest) -> list[rows.DeliveryRow]:
        memory = rows.DeliveryRow(
            request_id=request.request_id,
            channel=MEMORY,
            target=STREAM,
            message_id=f"msg_{request.request_id}",
            signer=rows.INSTANCE_SIGNER,
            not_before=request.timestamp,
            expires_at=request.timeout,
        )
        return [*webhook_rows(execution, request), memory]

    monkeypatch.setattr(rows, "_deliveries", both)
    yield


async def paused(
    tmp_path: Path, clock: FakeClock, recorder: Recorder
) -> tuple[Clearance, ApprovalRequest]:
    app = Clearance.open(
        f"sqlite:///{tmp_path / 'approvals.db'}",
        clock=clock,
        public_url=PUBLIC,
        webhook_secret=SECRET,
    )
    app.define(
        tag="safe-agent",
        model=refund_script(),
        tools=recorder.tools(),
        human_in_loop=HumanInLoop(enabled=True, approval_timeout=300_000),
    )
    ex = await app.run("safe-agent", input="Refund order ORD-123")
    [request] = ex.pending_approvals
    return app, request


def relay_for(
    app: Clearance, clock: FakeClock, *channels: ApprovalChannel, **options: Any
) -> DeliveryRelay:
    """A relay in another process: it hosts no agent and holds the instance's secret."""
    return DeliveryRelay(
        app.store,
        clock,
        "relay-2",
        {},
        channels,
        public_url=lambda: PUBLIC,
        secret=lambda: SECRET,
        **options,
    )


def outcomes(delivery: Delivery) -> list[tuple[int | None, str | None, str]]:
    return [(a.status_code, a.error, a.outcome) for a in delivery.attempts]


async def test_a_second_channel_is_one_class_and_the_relay_retries_it(
    tmp_path: Path, clock: FakeClock, recorder: Recorder, memory_rows: None
) -> None:
    app, request = await paused(tmp_path, clock, recorder)
    [row] = await app.deliveries(request.request_id)
    assert (row.channel, row.url, row.status) == (MEMORY, STREAM, "pending")
    # The app's relay has the webhook channel only: it never claims the memory row.
    assert await app.deliver_webhooks() == 0
    assert (await app.deliveries(request.request_id))[0].attempts == ()

    memory = MemoryChannel(Sent(RETRY, 503, "stream busy"))
    relay = relay_for(app, clock, memory)
    assert await relay.deliver_due() == 1
    [row] = await app.deliveries(request.request_id)
    assert (row.status, outcomes(row)) == ("pending", [(503, "stream busy", RETRY)])
    assert clock.now() < row.next_attempt_at <= clock.now() + timedelta(seconds=relay.retry_base)
    assert await relay.deliver_due() == 0  # backing off

    clock.advance(seconds=(row.next_attempt_at - clock.now()).total_seconds())
    assert await relay.deliver_due() == 1
    [row] = await app.deliveries(request.request_id)
    assert (row.status, outcomes(row)) == (
        "delivered",
        [(503, "stream busy", RETRY), (None, None, DELIVERED)],
    )
    # The spec's body, built once by the relay; the same message id on every attempt.
    body = views.webhook_body(request, app.callback_url(request))
    assert [b for _, b in memory.sent] == [body, body]
    assert {d.webhook_id for d, _ in memory.sent} == {f"msg_{request.request_id}"}
    await relay.aclose()
    assert memory.closed
    await app.close()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (RuntimeError("broker down"), "RuntimeError: broker down"),
        (5.0, "memory send timed out after 0.1s"),  # outlives the relay's timeout
    ],
)
async def test_a_channel_that_raises_or_hangs_is_retried_not_lost(
    tmp_path: Path,
    clock: FakeClock,
    recorder: Recorder,
    memory_rows: None,
    answer: BaseException | float,
    error: str,
) -> None:
    app, request = await paused(tmp_path, clock, recorder)
    relay = relay_for(app, clock, MemoryChannel(answer), timeout=0.05)
    assert await relay.deliver_due() == 1
    [row] = await app.deliveries(request.request_id)
    assert (row.status, outcomes(row)) == ("pending", [(None, error, RETRY)])
    await relay.aclose()
    await app.close()


async def test_a_channel_that_disables_its_target_ends_every_delivery_to_it(
    tmp_path: Path, clock: FakeClock, recorder: Recorder, memory_rows: None
) -> None:
    app, request = await paused(tmp_path, clock, recorder)
    relay = relay_for(app, clock, MemoryChannel(Sent(DISABLED, None, "stream deleted")))
    assert await relay.deliver_due() == 1
    [row] = await app.deliveries(request.request_id)
    assert (row.status, outcomes(row)) == ("disabled", [(None, "stream deleted", DISABLED)])
    assert await app.store.endpoint_disabled(STREAM)
    await relay.aclose()
    await app.close()


async def test_a_claim_takes_no_more_than_one_target_may_start(
    tmp_path: Path, clock: FakeClock, recorder: Recorder, memory_rows: None
) -> None:
    """Twelve deliveries due for one target that takes 4 at once: the relay claims 4
    and starts them, rather than claim every free slot's worth and hand 8 back."""
    app, _ = await paused(tmp_path, clock, recorder)
    for n in range(11):
        await app.run("safe-agent", input=f"Refund order ORD-{n}")
    hanging = MemoryChannel(*[5.0] * 12)
    relay = relay_for(app, clock, hanging)
    counting = Releases(app.store)
    relay.store = counting  # type: ignore[assignment]
    assert await relay.start_due() == relay.per_endpoint == 4
    assert counting.released == 0
    await relay.aclose()
    await app.close()


async def test_relay_refuses_two_channels_of_one_name(tmp_path: Path, clock: FakeClock) -> None:
    app = Clearance.open(f"sqlite:///{tmp_path / 'a.db'}", clock=clock)
    with pytest.raises(ValueError, match="two approval channels are named 'memory'"):
        relay_for(app, clock, MemoryChannel(), MemoryChannel())
    await app.close()


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, DELIVERED),
        (204, DELIVERED),
        (410, DISABLED),
        (408, RETRY),
        (429, RETRY),
        (500, RETRY),
        (503, RETRY),
        (None, RETRY),
        (301, FAILED),
        (400, FAILED),
        (404, FAILED),
    ],
)
def test_webhook_answers_are_classified_as_before(status: int | None, outcome: str) -> None:
    assert classify(status) == outcome


async def test_a_webhook_nobody_here_can_sign_fails_unsent(clock: FakeClock) -> None:
    sender = WebhookSender()
    channel = WebhookChannel(sender, lambda delivery: None, clock)
    delivery = Delivery(
        id=1,
        request_id="apr-1",
        execution_id="exec-1",
        agent_tag="safe-agent",
        url="https://hooks.example.com/approvals",
        webhook_id="msg_apr-1",
        status="pending",
        attempts=(),
        next_attempt_at=clock.now(),
        expires_at=clock.now() + timedelta(minutes=5),
        signer=rows.AGENT_SIGNER,
    )
    sent = await channel.send(delivery, {"type": "approval_request"})
    assert sent == Sent(FAILED, None, "no webhook_secret configured")
    assert sender._client is None  # never opened a connection
    await channel.aclose()
