"""The RabbitMQ broker (`amqp://` and `amqps://` in `Clearance.open(brokers=...)`).

Every message goes through one durable topic exchange named after the broker (the
name in `brokers={name: url}`; `?exchange=` names another). An approval request is
published with the event as its routing key: the JSON body, the request id as
`message_id`, the Standard Webhooks signature as the headers `webhook-id`,
`webhook-timestamp`, `webhook-signature` when a secret signs it, persistent, and
`mandatory` with publisher confirms, so it counts as delivered only once RabbitMQ
has routed it to a queue and taken responsibility for it. Clearance declares the
durable queues that keep the three kinds of message until someone reads them:
`<exchange>.<event>` (bound to `<event>`, where reviewer services read requests),
`<exchange>.<event>.decisions` (where Clearance reads decisions; every process
hosting the agent consumes from it, so each decision goes to one of them) and
`<exchange>.<event>.errors`.

Decisions are read with manual acknowledgements and a prefetch of `prefetch`
messages. A message whose consumer dies (its channel closes) goes back to the queue;
one the store could not take is requeued after a pause. After an outage, or with a
queue deleted under it, everything is connected and declared again: the next
attempt to publish does it, and the decisions consumer starts over.

URL parameters of ours, removed before aio-pika sees the URL: `exchange` and
`prefetch` (default 16).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import attrs
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

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

CONNECT_WAIT = 3.0  # seconds for the first connection
TIMEOUT = 5.0  # seconds to wait for a publisher confirm or a declaration


@attrs.define(eq=False)
class RabbitMessage:
    data: bytes
    message_id: str
    _message: AbstractIncomingMessage

    async def ack(self) -> None:
        await self._message.ack()

    async def retry(self, delay: float) -> None:
        # RabbitMQ has no delayed requeue: hold on to it for `delay`, then hand it back.
        await asyncio.sleep(delay)
        await self._message.nack(requeue=True)


class RabbitBroker:
    per_target: int | None = PUBLISHES_AT_ONCE

    def __init__(self, broker: str, url: str, *, sign: Signer | None = None) -> None:
        self.name = broker_channel(broker)
        options, self.url = our_options(url, {"exchange", "prefetch"})
        self.exchange = options.get("exchange", broker)
        try:
            self.prefetch = int(options.get("prefetch", 16))
        except ValueError:
            raise ValueError(f"prefetch must be a whole number, got {options}") from None
        if self.prefetch < 1 or not self.exchange:
            raise ValueError(f"prefetch must be above 0 and exchange named, got {options}")
        self._sign = sign
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None  # the one requests are published on
        self._exchange: AbstractExchange | None = None  # declared on that channel
        self._connecting = asyncio.Lock()
        self._declared: set[str] = set()  # events whose exchange and queues are declared

    async def _connected(self) -> AbstractConnection:
        # Connected on first use, and again after the connection is lost: a broker that
        # is down is not fatal (an attempt that fails is retried by its caller).
        async with self._connecting:
            connection = self._connection
            # `is_closed` stays False on a connection the server dropped: look at
            # `connected` too.
            if connection is None or connection.is_closed or not connection.connected.is_set():
                if connection is not None:
                    with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                        await connection.close()
                connection = await asyncio.wait_for(
                    aio_pika.connect(self.url, timeout=CONNECT_WAIT), CONNECT_WAIT
                )
                self._connection, self._channel = connection, None
            return connection

    async def _publishing(self, event: str) -> AbstractExchange:
        """The exchange, on the publishing channel, with `event`'s queues declared."""
        connection = await self._connected()
        if self._channel is None or self._channel.is_closed or self._exchange is None:
            self._channel = await connection.channel(on_return_raises=True)
            self._exchange = await self._declare(self._channel)
            self._declared.clear()
        if event not in self._declared:
            await self._bind(self._channel, self._exchange, event)
            self._declared.add(event)
        return self._exchange

    async def _declare(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.TOPIC, durable=True, timeout=TIMEOUT
        )

    async def _bind(
        self, channel: AbstractChannel, exchange: AbstractExchange, event: str
    ) -> dict[str, AbstractQueue]:
        """Declare `event`'s three queues, bound to their routing keys."""
        queues = {}
        for key in (event, *(event + suffix for suffix in ANSWERS)):
            queue = await channel.declare_queue(
                f"{self.exchange}.{key}", durable=True, timeout=TIMEOUT
            )
            await queue.bind(exchange, routing_key=key, timeout=TIMEOUT)
            queues[key] = queue
        return queues

    async def _publish(
        self, key: str, text: str, message_id: str | None, headers: dict[str, str]
    ) -> None:
        exchange = await self._publishing(event_of(key))
        message = aio_pika.Message(
            text.encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            headers=dict(headers),
        )
        await exchange.publish(message, routing_key=key, mandatory=True, timeout=TIMEOUT)

    async def send(self, delivery: Delivery, body: dict[str, Any]) -> Sent:
        message = signed_message(delivery, body, self._sign)
        if message is None:
            return Sent(FAILED, error="no webhook_secret configured to sign it")
        text, signature = message
        headers = {k: v for k, v in signature.items() if k in SIGNATURE}
        try:
            await self._publish(delivery.url, text, delivery.webhook_id, headers)
        except (*CONNECTION_EXCEPTIONS, TimeoutError) as err:
            # Includes PublishError: not routed (a queue deleted meanwhile), so not kept;
            # the next attempt declares the queues again.
            self._declared.discard(delivery.url)
            return Sent(RETRY, error=f"{type(err).__name__}: {err or 'no answer in time'}")
        return Sent(DELIVERED)

    async def publish(self, subject: str, body: dict[str, Any]) -> None:
        await self._publish(subject, dumps(body, compact=True), None, {})

    async def decisions(
        self, subject: str, group: str, consumer: str
    ) -> AsyncIterator[RabbitMessage]:
        # Every consumer of the queue takes a share of it: `group` is the queue itself.
        connection = await self._connected()
        channel = await connection.channel()
        # What the consumer took, or why it stopped: the channel closed (the connection
        # went away) or the broker cancelled the consumer (its queue was deleted).
        got: asyncio.Queue[AbstractIncomingMessage | BaseException] = asyncio.Queue()

        def stopped(_: Any, why: BaseException | None = None) -> None:
            got.put_nowait(ConnectionError(f"the channel closed: {why}"))

        def cancelled(_: Any) -> None:
            got.put_nowait(ConnectionError(f"the broker cancelled the consumer of {subject}"))

        try:
            channel.close_callbacks.add(stopped)
            (await channel.get_underlay_channel()).on_consumer_cancel_callbacks.add(cancelled)
            await channel.set_qos(prefetch_count=self.prefetch)
            queues = await self._bind(channel, await self._declare(channel), event_of(subject))
            await queues[subject].consume(got.put, timeout=TIMEOUT)
            while True:
                incoming = await got.get()
                if isinstance(incoming, BaseException):
                    raise incoming  # read again from the start, declaring what is gone
                message_id = incoming.message_id or f"delivery-{incoming.delivery_tag}"
                yield RabbitMessage(incoming.body, message_id, incoming)
        finally:
            # Closing the channel puts back what it took and did not acknowledge.
            channel.close_callbacks.discard(stopped)
            with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                await channel.close()

    async def aclose(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                await connection.close()


def open_url(name: str, url: str, *, sign: Signer | None = None) -> RabbitBroker:
    """The `clearance.channels` entry for `amqp://` and `amqps://` URLs."""
    return RabbitBroker(name, url, sign=sign)
