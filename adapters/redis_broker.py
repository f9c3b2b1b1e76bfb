"""The Redis Streams broker (`redis://` and `rediss://` in `Clearance.open(brokers=...)`).

An approval request is one stream entry on the event's stream key: the JSON body in
the field `data`, the request id in `id` (what consumers dedupe on), and the Standard
Webhooks signature in `webhook-id`, `webhook-timestamp`, `webhook-signature` when a
secret signs it (XADD with an approximate MAXLEN, so a stream nobody trims stays
bounded). Decisions are read with XREADGROUP as the consumer group `clearance` from
`<event>.decisions`, created with MKSTREAM from the stream's start; an entry a
consumer took and never acknowledged (it died) is taken over with XAUTOCLAIM once it
has been idle `claim_after` seconds. Redis here keeps nothing on disk: a group lost
with a restart (NOGROUP) is made again.

URL parameters of ours, removed before redis-py sees the URL: `maxlen` (entries kept
per stream, default 100000) and `claim_after` (seconds, default 30).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import attrs
import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

from clearance.core.json_text import dumps
from clearance.core.rows import broker_channel
from clearance.ports.broker import (
    PUBLISHES_AT_ONCE,
    SIGNATURE,
    Signer,
    our_options,
    signed_message,
)
from clearance.ports.channel import DELIVERED, FAILED, RETRY, Sent
from clearance.ports.store import Delivery

READ_COUNT = 16
BLOCK_MS = 1000
POOL_SIZE = 100  # connections: publishes (64 at once per event) and decision readers
POOL_WAIT = 10.0  # seconds a caller waits for a free connection
T = TypeVar("T")


async def _cancellable(call: Awaitable[T]) -> T:
    """`call`, in a task of its own, so that cancelling the caller works: redis-py
    (5.x with a socket timeout, 8.x always) swallows a cancellation that lands while
    a command waits for its answer, and a reader told to stop read on. The command
    itself finishes on its own (at most BLOCK_MS), and its connection goes back."""
    task = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # Nobody waits for it now: take its outcome so that it is not reported as lost.
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        raise


@attrs.define(eq=False)
class RedisMessage:
    data: bytes
    message_id: str
    _client: redis.Redis
    _stream: str
    _group: str

    async def ack(self) -> None:
        await self._client.xack(self._stream, self._group, self.message_id)

    async def retry(self, delay: float) -> None:
        pass  # it stays pending: XAUTOCLAIM takes it back once idle claim_after


class RedisBroker:
    per_target: int | None = PUBLISHES_AT_ONCE

    def __init__(self, broker: str, url: str, *, sign: Signer | None = None) -> None:
        self.name = broker_channel(broker)
        options, self.url = our_options(url, {"maxlen", "claim_after"})
        try:
            self.maxlen = int(options.get("maxlen", 100_000))
            self.claim_after_ms = int(float(options.get("claim_after", 30)) * 1000)
        except ValueError:
            raise ValueError(
                f"maxlen must be a whole number and claim_after seconds, got {options}"
            ) from None
        if self.maxlen < 1 or self.claim_after_ms < 1:
            raise ValueError(f"maxlen and claim_after must be above 0, got {options}")
        self._sign = sign
        self._client: redis.Redis | None = None

    def _redis(self) -> redis.Redis:
        # Made on first use: a broker that is down at start is not fatal.
        # A pool that makes callers wait for a free connection (up to POOL_WAIT) rather
        # than fail, as redis-py's default pool does past its size.
        if self._client is None:
            pool = redis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=POOL_SIZE,
                timeout=POOL_WAIT,
                socket_connect_timeout=5,
                socket_timeout=10,
                health_check_interval=30,
            )
            self._client = redis.Redis.from_pool(pool)  # closed with the client
        return self._client

    async def send(self, delivery: Delivery, body: dict[str, Any]) -> Sent:
        message = signed_message(delivery, body, self._sign)
        if message is None:
            return Sent(FAILED, error="no webhook_secret configured to sign it")
        text, headers = message
        fields = {"data": text, "id": delivery.webhook_id}
        fields.update({k: v for k, v in headers.items() if k in SIGNATURE})
        try:
            await self._redis().xadd(delivery.url, fields, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
        except (RedisError, OSError) as err:
            return Sent(RETRY, error=f"{type(err).__name__}: {err}")
        return Sent(DELIVERED)

    async def publish(self, subject: str, body: dict[str, Any]) -> None:
        await self._redis().xadd(
            subject, {"data": dumps(body, compact=True)}, maxlen=self.maxlen, approximate=True
        )

    async def _make_group(self, stream: str, group: str) -> None:
        try:
            await self._redis().xgroup_create(stream, group, id="0", mkstream=True)
        except ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    async def decisions(
        self, subject: str, group: str, consumer: str
    ) -> AsyncIterator[RedisMessage]:
        client = self._redis()
        await self._make_group(subject, group)
        while True:
            try:
                # Entries another consumer took and never acknowledged, first.
                _, entries, *_ = await _cancellable(
                    client.xautoclaim(
                        subject, group, consumer, self.claim_after_ms, "0-0", count=READ_COUNT
                    )
                )
                if not entries:
                    read: Any = await _cancellable(
                        client.xreadgroup(
                            group, consumer, {subject: ">"}, count=READ_COUNT, block=BLOCK_MS
                        )
                    )
                    # RESP2: [[stream, entries]]; RESP3: {stream: [entries]}.
                    if isinstance(read, dict):
                        entries = [e for got in read.values() for e in got[0]] if read else []
                    else:
                        entries = read[0][1] if read else []
            except ResponseError as err:
                if "NOGROUP" in str(err):  # lost with a restart of a Redis that keeps no disk
                    await self._make_group(subject, group)
                    continue
                raise
            for entry_id, fields in entries:
                if fields is None:  # trimmed away meanwhile
                    continue
                message_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                yield RedisMessage(fields.get(b"data", b""), message_id, client, subject, group)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def open_url(name: str, url: str, *, sign: Signer | None = None) -> RedisBroker:
    """The `clearance.channels` entry for `redis://` and `rediss://` URLs."""
    return RedisBroker(name, url, sign=sign)
