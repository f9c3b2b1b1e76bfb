"""The broker contract: one pytest suite that every `Broker` adapter must pass.

Written once against the port (`clearance.ports.broker`, `clearance.ports.channel`),
it drives a broker as Clearance does: the delivery relay `send`s approval requests,
the decision consumer reads `decisions` and acknowledges or hands messages back,
refusals go out with `publish`. A plugin author subclasses it::

    import pytest

    pytest.register_assert_rewrite("clearance.testing.contract")  # in conftest.py

    from clearance.testing.contract import BrokerContract

    class TestMyBroker(BrokerContract):
        redeliver_after = 0.5  # seconds, as the URL below configures it

        def make_broker(self, path, name, sign):
            return open_url(name, f"mybroker://127.0.0.1?redeliver_after=0.5", sign=sign)

Hooks:

- `make_broker(path, name, sign)` (required): a broker named `name` (unique to the
  test: Clearance calls it with the name given in `Clearance.open(brokers=...)`),
  signing with `sign`. `path` is the test's fresh `tmp_path`. Every subject the
  test uses starts with `name`, so a server broker's streams, queues or keys are
  the test's own. It may return an awaitable of the broker.
- `redeliver_after` (seconds): how long the broker, as `make_broker` configured it,
  waits before handing out again a message that was taken and not acknowledged
  (its consumer died). The suite waits up to ten times this plus a few seconds.
- `published(path, name, subject)` (optional): what a reader outside Clearance
  finds on `subject`, in order: each message's body bytes and its signature
  headers (`webhook-id`, `webhook-timestamp`, `webhook-signature`). Without it the
  test that signatures travel with the message is skipped.
- `unreachable(path, name, sign)` (optional): a broker whose server does not
  answer (a closed port). Without it the outage tests are skipped.
- `forget(path, name, subjects)` (optional): remove what the test made on a server
  (streams, queues, keys); called after each test, pass or fail.

Needs pytest and pytest-asyncio; import it explicitly (the `clearance.testing`
package does not load it).
"""

from __future__ import annotations

import abc
import asyncio
import base64
import contextlib
import hashlib
import inspect
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from clearance.core.rows import broker_channel
from clearance.ports.broker import SIGNATURE, Broker, Incoming, Signer
from clearance.ports.channel import DELIVERED, FAILED, RETRY, Sent
from clearance.ports.store import Delivery

__all__ = ["BrokerContract"]

GROUP = "clearance"  # the decision consumer's group, as Clearance names it
T0 = datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
# Seconds an outage test gives a send or a read against a server that does not answer:
# the relay's lease must outlive an attempt, so a send must give up well before.
OUTAGE_BOUND = 20.0


def sign(delivery: Delivery, text: str) -> dict[str, str]:
    """Signature headers for `text`, made so that a reader can check the body arrived
    byte for byte (a digest of it stands in for the HMAC the runtime makes)."""
    digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
    return {
        "webhook-id": delivery.webhook_id,
        "webhook-timestamp": str(int(T0.timestamp())),
        "webhook-signature": f"v1,{digest}",
    }


def cannot_sign(delivery: Delivery, text: str) -> None:
    """The runtime's answer for a delivery no secret here signs."""
    return None


def delivery(event: str, request_id: str) -> Delivery:
    return Delivery(
        id=1,
        request_id=request_id,
        execution_id=f"exec-{request_id}",
        agent_tag="contract-agent",
        url=event,
        webhook_id=request_id,
        status="pending",
        attempts=(),
        next_attempt_at=T0,
        expires_at=T0 + timedelta(hours=1),
        channel="broker",
        signer="instance",
    )


def request_body(request_id: str, **more: Any) -> dict[str, Any]:
    """An approval request's body, as the relay hands it to `send`."""
    return {
        "type": "approval_requested",
        "requestId": request_id,
        "executionId": f"exec-{request_id}",
        "toolName": "refund",
        "parameters": {"orderId": "A-1", "amount": 12.5},
        **more,
    }


async def _resolve(made: Any) -> Any:
    return await made if inspect.isawaitable(made) else made


class Reader:
    """One consumer of a group reading a subject in a task of its own, as the decision
    consumer does; it keeps what it took and acknowledges only when told."""

    def __init__(self, broker: Broker, subject: str, consumer: str, *, ack: bool) -> None:
        self.taken: list[Incoming] = []
        self.errors: list[BaseException] = []
        self._ack = ack
        self._changed = asyncio.Event()
        self._messages = broker.decisions(subject, GROUP, consumer)
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self._messages:
                if self._ack:
                    await message.ack()
                self.taken.append(message)
                self._changed.set()
        except Exception as err:  # an outage: the decision consumer reads again later
            self.errors.append(err)
            self._changed.set()

    @property
    def bodies(self) -> list[Any]:
        return [json.loads(m.data) for m in self.taken]

    async def until(self, done: Callable[[], bool], within: float, what: str) -> None:
        deadline = time.monotonic() + within
        while not done():
            if self.errors:
                raise AssertionError(f"reading failed while waiting for {what}: {self.errors!r}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {within:.1f} s; took {self.bodies!r}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.1))

    async def stop(self, within: float = 5.0) -> None:
        """Cancel the reading task; it must end promptly (Clearance stops it on close)."""
        self._task.cancel()
        done, _ = await asyncio.wait({self._task}, timeout=within)
        assert done, (
            f"reading did not stop within {within} s of being cancelled (a client library"
            f" that swallows a cancellation?); it waits in:\n{self._where()}"
        )

    def _where(self) -> str:
        """Where the reading waits: the awaits of `decisions`, innermost last."""
        lines = []
        waiting: Any = getattr(self._messages, "ag_await", None)
        while waiting is not None:
            frame = getattr(waiting, "cr_frame", None) or getattr(waiting, "gi_frame", None)
            if frame is not None:
                lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno}")
            waiting = getattr(waiting, "cr_await", None) or getattr(waiting, "gi_yieldfrom", None)
        return "\n".join(lines) or "  (not in decisions)"


class BrokerContract(abc.ABC):
    """Subclass with `make_broker` (and the optional hooks) to run the suite."""

    redeliver_after: float = 1.0

    @abc.abstractmethod
    def make_broker(
        self, path: Path, name: str, sign: Signer | None
    ) -> Broker | Awaitable[Broker]: ...

    async def published(
        self, path: Path, name: str, subject: str
    ) -> list[tuple[bytes, dict[str, str]]]:
        raise NotImplementedError

    def unreachable(
        self, path: Path, name: str, sign: Signer | None
    ) -> Broker | Awaitable[Broker] | None:
        return None

    async def forget(self, path: Path, name: str, subjects: list[str]) -> None:
        return None

    # -- the suite's own plumbing -------------------------------------------------------

    @pytest.fixture
    async def place(self, tmp_path: Path) -> AsyncIterator[tuple[Path, str]]:
        """The test's path and broker name; what it made is forgotten afterwards."""
        name = f"contract-{secrets.token_hex(4)}"
        yield tmp_path, name
        event = self.event(name)
        await self.forget(tmp_path, name, [event, f"{event}.decisions", f"{event}.errors"])

    @staticmethod
    def event(name: str) -> str:
        """The event the test's approval requests are published on."""
        return f"{name}.approval-requested"

    @contextlib.asynccontextmanager
    async def opened(
        self, place: tuple[Path, str], signer: Signer | None = sign
    ) -> AsyncIterator[Broker]:
        broker: Broker = await _resolve(self.make_broker(*place, signer))
        try:
            yield broker
        finally:
            await broker.aclose()

    @contextlib.asynccontextmanager
    async def reading(
        self, broker: Broker, subject: str, consumer: str = "c1", *, ack: bool = True
    ) -> AsyncIterator[Reader]:
        reader = Reader(broker, subject, consumer, ack=ack)
        try:
            yield reader
        finally:
            await reader.stop()

    @property
    def patience(self) -> float:
        """Seconds to wait for what must come: a message, or one coming again."""
        return 10 * self.redeliver_after + 5

    async def quiet(self, reader: Reader, count: int) -> None:
        """Wait long enough that a message that would come again has, and check that
        `reader` has still taken exactly `count` messages."""
        await asyncio.sleep(3 * self.redeliver_after + 0.5)
        assert len(reader.taken) == count, f"expected {count} messages, took {reader.bodies!r}"

    # -- identity ------------------------------------------------------------------------

    async def test_it_names_its_channel_and_bounds_its_publishes(
        self, place: tuple[Path, str]
    ) -> None:
        async with self.opened(place) as broker:
            assert broker.name == broker_channel(place[1])
            per = broker.per_target
            assert per is None or (isinstance(per, int) and per >= 1), per

    # -- sending approval requests -------------------------------------------------------

    async def test_a_sent_request_is_read_back_as_the_same_json(
        self, place: tuple[Path, str]
    ) -> None:
        event = self.event(place[1])
        body = request_body(
            "req-1",
            reason="Réembolso — 返金 \U0001f4b8",
            parameters={"nested": {"list": [1, 2.5, None, True, "x"]}, "big": 2**53},
            note="x" * 100_000,
        )
        async with self.opened(place) as broker:
            sent = await broker.send(delivery(event, "req-1"), body)
            assert sent == Sent(DELIVERED, sent.status_code, sent.error), sent
            async with self.reading(broker, event) as reader:
                await reader.until(lambda: len(reader.taken) == 1, self.patience, "request")
                assert reader.bodies == [body]

    async def test_many_requests_sent_at_once_each_arrive_once(
        self, place: tuple[Path, str]
    ) -> None:
        event = self.event(place[1])
        ids = [f"req-{i}" for i in range(64)]
        async with self.opened(place) as broker:
            sent = await asyncio.gather(
                *(broker.send(delivery(event, rid), request_body(rid)) for rid in ids)
            )
            assert {s.outcome for s in sent} == {DELIVERED}, sent
            async with self.reading(broker, event) as reader:
                await reader.until(lambda: len(reader.taken) >= 64, self.patience, "64 requests")
                await self.quiet(reader, 64)
                assert sorted(b["requestId"] for b in reader.bodies) == sorted(ids)

    async def test_a_request_no_secret_signs_fails_unsent(self, place: tuple[Path, str]) -> None:
        event = self.event(place[1])
        async with self.opened(place, cannot_sign) as broker:
            sent = await broker.send(delivery(event, "req-unsigned"), request_body("req-unsigned"))
            assert sent.outcome == FAILED, sent
            assert sent.error, "a failed send says why"
        async with self.opened(place) as broker:
            assert (await broker.send(delivery(event, "req-2"), request_body("req-2"))).outcome == (
                DELIVERED
            )
            async with self.reading(broker, event) as reader:
                await reader.until(lambda: len(reader.taken) == 1, self.patience, "request")
                assert [b["requestId"] for b in reader.bodies] == ["req-2"]

    async def test_the_signature_and_message_id_travel_with_the_body(
        self, place: tuple[Path, str]
    ) -> None:
        event = self.event(place[1])
        body = request_body("req-signed", reason="ünïcode")
        async with self.opened(place) as broker:
            assert (await broker.send(delivery(event, "req-signed"), body)).outcome == DELIVERED
        try:
            [(data, headers)] = await self.published(*place, event)
        except NotImplementedError:
            pytest.skip("define `published(path, name, subject)` to check what readers see")
        assert json.loads(data) == body
        expected = sign(delivery(event, "req-signed"), data.decode())
        assert {k: headers.get(k) for k in SIGNATURE} == expected, (
            "the signature headers must travel unchanged with the body bytes they sign"
        )

    # -- reading decisions ---------------------------------------------------------------

    async def test_decisions_published_before_anyone_reads_are_not_lost(
        self, place: tuple[Path, str]
    ) -> None:
        subject = f"{self.event(place[1])}.decisions"
        async with self.opened(place) as broker:
            await broker.publish(subject, {"requestId": "req-1", "approved": True, "by": "ops"})
            async with self.reading(broker, subject) as reader:
                await reader.until(lambda: len(reader.taken) == 1, self.patience, "decision")
                assert reader.bodies == [{"requestId": "req-1", "approved": True, "by": "ops"}]
                assert isinstance(reader.taken[0].message_id, str) and reader.taken[0].message_id

    async def test_one_subjects_messages_come_in_order_and_only_to_its_readers(
        self, place: tuple[Path, str]
    ) -> None:
        event = self.event(place[1])
        decisions, errors = f"{event}.decisions", f"{event}.errors"
        async with self.opened(place) as broker, self.reading(broker, decisions) as reader:
            for i in range(20):
                await broker.publish(decisions, {"requestId": f"req-{i}", "approved": True})
                await broker.publish(errors, {"requestId": f"req-{i}", "error": "nope"})
            await reader.until(lambda: len(reader.taken) >= 20, self.patience, "20 decisions")
            await self.quiet(reader, 20)
            assert [b["requestId"] for b in reader.bodies] == [f"req-{i}" for i in range(20)]
            assert all("error" not in b for b in reader.bodies)

    async def test_an_acknowledged_message_does_not_come_again(
        self, place: tuple[Path, str]
    ) -> None:
        subject = f"{self.event(place[1])}.decisions"
        async with self.opened(place) as broker:
            await broker.publish(subject, {"requestId": "req-1"})
            async with self.reading(broker, subject) as reader:
                await reader.until(lambda: len(reader.taken) == 1, self.patience, "decision")
                await self.quiet(reader, 1)
            async with self.reading(broker, subject, "c2") as again:
                await self.quiet(again, 0)

    async def test_a_message_taken_and_not_acknowledged_comes_again(
        self, place: tuple[Path, str]
    ) -> None:
        """Its consumer died while settling it: another consumer of the group gets it."""
        subject = f"{self.event(place[1])}.decisions"
        async with self.opened(place) as broker:
            await broker.publish(subject, {"requestId": "req-1", "approved": False})
            async with (
                self.opened(place) as dying,
                self.reading(dying, subject, "c1", ack=False) as first,
            ):
                await first.until(lambda: len(first.taken) == 1, self.patience, "decision")
            async with self.reading(broker, subject, "c2") as second:
                await second.until(lambda: len(second.taken) == 1, self.patience, "it again")
                assert second.bodies == [{"requestId": "req-1", "approved": False}]
                await self.quiet(second, 1)

    async def test_a_message_handed_back_comes_again(self, place: tuple[Path, str]) -> None:
        """The store could not be reached: the consumer hands the message back."""
        subject = f"{self.event(place[1])}.decisions"
        async with self.opened(place) as broker:
            await broker.publish(subject, {"requestId": "req-1"})
            async with self.reading(broker, subject, ack=False) as reader:
                await reader.until(lambda: len(reader.taken) == 1, self.patience, "decision")
                await reader.taken[0].retry(0.1)
                await reader.until(lambda: len(reader.taken) == 2, self.patience, "it again")
                assert reader.bodies == [{"requestId": "req-1"}] * 2
                await reader.taken[1].ack()

    async def test_consumers_of_one_group_share_its_messages(self, place: tuple[Path, str]) -> None:
        subject = f"{self.event(place[1])}.decisions"
        ids = [f"req-{i}" for i in range(40)]
        async with (
            self.opened(place) as one,
            self.opened(place) as other,
            self.reading(one, subject, "c1") as a,
            self.reading(other, subject, "c2") as b,
        ):
            await asyncio.gather(*(one.publish(subject, {"requestId": i}) for i in ids))

            def took() -> list[str]:
                return [m["requestId"] for m in a.bodies + b.bodies]

            await a.until(lambda: len(took()) >= 40, self.patience, "40 decisions")
            await self.quiet(a, len(a.taken))
            assert sorted(took()) == sorted(ids), "each message goes to one consumer, once"

    # -- outages -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def down(self, place: tuple[Path, str]) -> AsyncIterator[Broker]:
        made = self.unreachable(*place, sign)
        if made is None:
            pytest.skip("define `unreachable(path, name, sign)` to run the outage tests")
        broker: Broker = await _resolve(made)
        try:
            yield broker
        finally:
            await asyncio.wait_for(broker.aclose(), OUTAGE_BOUND)

    async def test_a_send_to_a_broker_that_is_down_is_a_retry(
        self, place: tuple[Path, str]
    ) -> None:
        event = self.event(place[1])
        async with self.down(place) as broker:
            sent = await asyncio.wait_for(
                broker.send(delivery(event, "req-1"), request_body("req-1")), OUTAGE_BOUND
            )
            assert sent.outcome == RETRY, sent
            assert sent.error, "a retry says what went wrong"

    async def test_a_publish_to_a_broker_that_is_down_raises(self, place: tuple[Path, str]) -> None:
        subject = f"{self.event(place[1])}.errors"
        async with self.down(place) as broker:
            with pytest.raises(Exception):  # noqa: B017 - which one is the adapter's own
                await asyncio.wait_for(broker.publish(subject, {"error": "x"}), OUTAGE_BOUND)

    async def test_reading_from_a_broker_that_is_down_fails_or_waits_and_stops(
        self, place: tuple[Path, str]
    ) -> None:
        """The decision consumer reads again after a pause when reading raises; a reader
        that waits instead must still stop when cancelled."""
        subject = f"{self.event(place[1])}.decisions"
        async with self.down(place) as broker, self.reading(broker, subject) as reader:
            await asyncio.sleep(1.0)
            assert not reader.taken
