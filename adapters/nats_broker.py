"""The NATS JetStream broker (`nats://` in `Clearance.open(brokers=...)`).

An approval request is one JetStream message on the event's subject: the JSON body as
its data, the request id as `Nats-Msg-Id` (JetStream drops a second publish of it
within the stream's duplicate window, and consumers dedupe on it after), and the
Standard Webhooks signature in the headers `webhook-id`, `webhook-timestamp`,
`webhook-signature` when a secret signs it. The message is stored by whichever stream
already takes the event's subject; when none does, a file-backed stream is made for
the event's three subjects (`<event>`, `<event>.decisions`, `<event>.errors`), named
`clearance-<event>` with the dots as underscores, holding at most `max_msgs`.

Decisions are read from `<event>.decisions` by the durable pull consumer
`clearance-<event>_decisions` (explicit acks; every process hosting the agent pulls
from it, so each decision goes to one of them). A message not acknowledged within
`ack_wait` seconds (its consumer died) is delivered again; one the store could not
take is nak'ed with a delay. JetStream keeps both the stream and the consumer on
disk, so they outlive a restart of the server.

URL parameters of ours, removed before nats-py sees the URL: `ack_wait` (seconds,
default 30) and `max_msgs` (messages kept per stream made here, default 100000).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType

from clearance.core.json_text import dumps
from clearance.core.rows import broker_channel
from clearance.ports.broker import (
    ANSWERS,
    PUBLISHES_AT_ONCE,
    SIGNATURE,
    Signer,
    event_of,
    our_options,
    signed_message,
)
from clearance.ports.channel import DELIVERED, FAILED, RETRY, Sent
from clearance.ports.store import Delivery

FETCH_COUNT = 16
FETCH_WAIT = 1.0  # seconds a pull waits for messages before asking again
CHECK_EVERY = 5.0  # seconds between checks, while idle, that the consumer is there
CONNECT_WAIT = 3.0  # seconds for the first connection
TIMEOUT = 5.0  # seconds to wait for JetStream's answer to a publish or a request


def _safe(text: str) -> str:
    """`text` as a stream or consumer name, which take no '.', '*', '>' or spaces."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


@attrs.define(eq=False)
class NatsMessage:
    data: bytes
    message_id: str
    _msg: Msg

    async def ack(self) -> None:
        await self._msg.ack()

    async def retry(self, delay: float) -> None:
        await self._msg.nak(delay=delay)


class NatsBroker:
    per_target: int | None = PUBLISHES_AT_ONCE

    def __init__(self, broker: str, url: str, *, sign: Signer | None = None) -> None:
        self.name = broker_channel(broker)
        options, self.url = our_options(url, {"ack_wait", "max_msgs"})
        try:
            self.ack_wait = float(options.get("ack_wait", 30))
            self.max_msgs = int(options.get("max_msgs", 100_000))
        except ValueError:
            raise ValueError(
                f"ack_wait must be seconds and max_msgs a whole number, got {options}"
            ) from None
        if not self.ack_wait > 0 or self.max_msgs < 1:  # `not >`: NaN is refused too
            raise ValueError(f"ack_wait and max_msgs must be above 0, got {options}")
        self._sign = sign
        self._client: Client | None = None
        self._connecting = asyncio.Lock()
        self._streams: dict[str, str] = {}  # event -> the stream that takes its subjects

    async def _js(self) -> JetStreamContext:
        # Connected on first use: a broker that is down at start is not fatal. Once
        # connected, nats-py reconnects by itself (without end) after an outage; the
        # first connection, which it would also try for ever, is given CONNECT_WAIT.
        async with self._connecting:
            if self._client is None or self._client.is_closed:
                client = Client()
                try:
                    await asyncio.wait_for(
                        client.connect(
                            self.url,
                            connect_timeout=2,
                            reconnect_time_wait=1,
                            max_reconnect_attempts=-1,
                            error_cb=_quiet,
                        ),
                        CONNECT_WAIT,
                    )
                except BaseException:
                    await client.close()
                    raise
                self._client = client
            return self._client.jetstream(timeout=TIMEOUT)

    async def _stream(self, js: JetStreamContext, event: str) -> str:
        """The stream that takes `event`'s subjects, made if there is none."""
        if event not in self._streams:
            try:
                name = await js.find_stream_name_by_subject(event)
            except nats.js.errors.NotFoundError:
                name = "clearance-" + _safe(event)
                await js.add_stream(
                    name=name,
                    subjects=[event, *(event + suffix for suffix in ANSWERS)],
                    storage=StorageType.FILE,
                    max_msgs=self.max_msgs,
                )
            self._streams[event] = name
        return self._streams[event]

    async def send(self, delivery: Delivery, body: dict[str, Any]) -> Sent:
        message = signed_message(delivery, body, self._sign)
        if message is None:
            return Sent(FAILED, error="no webhook_secret configured to sign it")
        text, signature = message
        headers = {k: v for k, v in signature.items() if k in SIGNATURE}
        headers["Nats-Msg-Id"] = delivery.webhook_id
        try:
            js = await self._js()
            await self._stream(js, delivery.url)
            await js.publish(delivery.url, text.encode(), headers=headers)
        except (nats.errors.Error, OSError, TimeoutError) as err:
            self._streams.pop(delivery.url, None)  # look again: it may have been deleted
            return Sent(RETRY, error=f"{type(err).__name__}: {err or 'no answer in time'}")
        return Sent(DELIVERED)

    async def publish(self, subject: str, body: dict[str, Any]) -> None:
        js = await self._js()
        await self._stream(js, event_of(subject))
        try:
            await js.publish(subject, dumps(body, compact=True).encode())
        except nats.errors.Error:
            self._streams.pop(event_of(subject), None)  # look again: it may have been deleted
            raise

    async def decisions(
        self, subject: str, group: str, consumer: str
    ) -> AsyncIterator[NatsMessage]:
        js = await self._js()
        stream = await self._stream(js, event_of(subject))
        durable = _safe(f"{group}-{subject}")
        pull = await js.pull_subscribe(
            subject,
            durable=durable,
            stream=stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait,
                deliver_policy=DeliverPolicy.ALL,
            ),
        )
        check_at = time.monotonic() + CHECK_EVERY
        try:
            while True:
                try:
                    got = await pull.fetch(FETCH_COUNT, timeout=FETCH_WAIT)
                except nats.errors.TimeoutError:
                    # Nothing came. A pull from a consumer deleted with its stream
                    # would wait in silence: look that it is there, now and then.
                    if time.monotonic() >= check_at:
                        check_at = time.monotonic() + CHECK_EVERY
                        try:
                            await js.consumer_info(stream, durable)
                        except nats.js.errors.NotFoundError:
                            self._streams.pop(event_of(subject), None)
                            raise ConnectionError(
                                f"consumer {durable} of stream {stream} is gone"
                            ) from None
                    continue
                for msg in got:
                    message_id = (msg.headers or {}).get("Nats-Msg-Id") or (
                        f"{stream}:{msg.metadata.sequence.stream}"
                    )
                    yield NatsMessage(msg.data, message_id, msg)
        finally:
            with contextlib.suppress(nats.errors.Error):  # gone with its connection
                await pull.unsubscribe()

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()


async def _quiet(err: Exception) -> None:
    # nats-py reports every failed reconnect here; the attempts a delivery makes are
    # recorded on it, so the connection's own errors are not repeated.
    pass


def open_url(name: str, url: str, *, sign: Signer | None = None) -> NatsBroker:
    """The `clearance.channels` entry for `nats://` URLs."""
    return NatsBroker(name, url, sign=sign)
