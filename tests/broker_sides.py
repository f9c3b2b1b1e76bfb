"""The test's side of each message broker the broker tests run on: it reads what
Clearance published (bodies, message ids, signature headers) and publishes decisions
as an outside service would. Each side uses names of its own and removes them in
`close()`."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import threading
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import pytest

from clearance.testing import MemoryBroker

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
T = TypeVar("T")
NATS = os.environ.get("CLEARANCE_TEST_NATS", "nats://127.0.0.1:4222")
AMQP = os.environ.get("CLEARANCE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
REDIS = os.environ.get("CLEARANCE_TEST_REDIS", "redis://127.0.0.1:6379/0")
SIGNATURE = ("webhook-id", "webhook-timestamp", "webhook-signature")


def _address(url: str, port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return (parts.hostname or "127.0.0.1", parts.port or port)


class Memory:
    """The test's side of a memory broker."""

    kind = "memory"
    server = None  # in this process: no server to stop or reach through a proxy

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
    server = _address(REDIS, 6379)

    def __init__(self) -> None:
        import redis

        self.client = redis.Redis.from_url(REDIS, socket_connect_timeout=3)
        try:
            self.client.ping()
        except redis.RedisError as err:
            _unreachable(f"no Redis answers at {REDIS} ({err})")
        self.event = f"clearance-test-{secrets.token_hex(4)}.approval-requested"
        # Entries a consumer took and did not acknowledge come again after 0.2 s.
        self.url = f"{REDIS}?claim_after=0.2"

    def url_for(self, host: str, port: int) -> str:
        """This side's URL, pointed at another address (a proxy in front of the server)."""
        return f"redis://{host}:{port}/0?claim_after=0.2"

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

    def forget(self) -> None:
        """Lose the streams and the group, as a restart of a Redis without disk does."""
        keys = list(self.client.scan_iter(match=f"{self.event}*"))
        if keys:
            self.client.delete(*keys)

    def close(self) -> None:
        self.forget()
        self.client.close()


class _Loop:
    """An event loop in a thread of its own, for a side whose client library is async
    only: the tests read the side from synchronous predicates (`wait_for(lambda: ...)`)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 15) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class Nats:
    """The test's side of the machine's NATS JetStream: subjects of its own, and the
    stream Clearance made for them deleted afterwards."""

    kind = "nats"
    server = _address(NATS, 4222)

    def __init__(self) -> None:
        import nats
        from nats.aio.client import Client

        self.event = f"clearance-test-{secrets.token_hex(4)}.approval-requested"
        # Messages a consumer took and did not acknowledge come again after 0.3 s.
        self.url = self.url_for(*self.server)
        self._loop = _Loop()
        try:
            self.client: Client = self._loop.run(
                nats.connect(NATS, connect_timeout=3, max_reconnect_attempts=0)
            )
        except Exception as err:
            self._loop.stop()
            _unreachable(f"no NATS answers at {NATS} ({err})")
        self.js = self.client.jetstream()

    def url_for(self, host: str, port: int) -> str:
        return f"nats://{host}:{port}?ack_wait=0.3"

    def _stored(self, subject: str) -> list[Any]:
        async def read() -> list[Any]:
            import nats.js.errors

            try:
                stream = await self.js.find_stream_name_by_subject(subject)
            except nats.js.errors.NotFoundError:
                return []
            info = await self.js.stream_info(stream)
            got = []
            for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
                try:
                    msg = await self.js.get_msg(stream, seq)
                except nats.js.errors.NotFoundError:
                    continue
                if msg.subject == subject:
                    got.append(msg)
            return got

        return self._loop.run(read())

    def messages(self, subject: str) -> list[dict[str, Any]]:
        return [json.loads(m.data) for m in self._stored(subject)]

    def message_ids(self, subject: str) -> list[str]:
        return [(m.headers or {})["Nats-Msg-Id"] for m in self._stored(subject)]

    def raw(self, subject: str) -> list[tuple[bytes, dict[str, str]]]:
        return [
            (m.data, {k: v for k, v in (m.headers or {}).items() if k in SIGNATURE})
            for m in self._stored(subject)
        ]

    def publish(self, subject: str, body: dict[str, Any] | str) -> None:
        text = body if isinstance(body, str) else json.dumps(body)
        self._loop.run(self.js.publish(subject, text.encode()))

    def redeliver_soon(self) -> None:
        pass  # ack_wait=0.3 in the URL

    def forget(self) -> None:
        """Lose the stream (and its consumer), as an operator deleting it does."""

        async def delete() -> None:
            import nats.js.errors

            try:
                stream = await self.js.find_stream_name_by_subject(self.event)
                await self.js.delete_stream(stream)
            except nats.js.errors.NotFoundError:
                pass

        self._loop.run(delete())

    def close(self) -> None:
        try:
            self.forget()
            self._loop.run(self.client.close())
        finally:
            self._loop.stop()


class Rabbit:
    """The test's side of the machine's RabbitMQ: an exchange of its own; a queue of
    the side's taps every message on it (queues are read destructively, and Clearance
    and reviewers read theirs), and everything is deleted afterwards."""

    kind = "rabbitmq"
    server = _address(AMQP, 5672)

    def __init__(self) -> None:
        import aio_pika

        self.exchange = f"clearance-test-{secrets.token_hex(4)}"
        self.event = "approval-requested"
        self.url = self.url_for(*self.server)
        self._seen: list[Any] = []  # every message on the exchange, as it came
        self._loop = _Loop()
        try:
            self.connection = self._loop.run(aio_pika.connect(AMQP, timeout=3))
        except Exception as err:
            self._loop.stop()
            _unreachable(f"no RabbitMQ answers at {AMQP} ({err})")
        self._loop.run(self._tap())

    async def _tap(self) -> None:
        import aio_pika

        self.channel = await self.connection.channel()
        self.ex = await self.channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        tap = await self.channel.declare_queue(exclusive=True)
        await tap.bind(self.ex, routing_key="#")

        async def seen(message: Any) -> None:
            self._seen.append(message)
            await message.ack()

        await tap.consume(seen)

    def url_for(self, host: str, port: int) -> str:
        parts = urlsplit(AMQP)
        auth = f"{parts.username}:{parts.password}@" if parts.username else ""
        return f"amqp://{auth}{host}:{port}{parts.path or '/'}?exchange={self.exchange}"

    def _stored(self, subject: str) -> list[Any]:
        return [m for m in list(self._seen) if m.routing_key == subject]

    def messages(self, subject: str) -> list[dict[str, Any]]:
        return [json.loads(m.body) for m in self._stored(subject)]

    def message_ids(self, subject: str) -> list[str]:
        return [m.message_id for m in self._stored(subject)]

    def raw(self, subject: str) -> list[tuple[bytes, dict[str, str]]]:
        return [
            (m.body, {k: str(v) for k, v in m.headers.items() if k in SIGNATURE})
            for m in self._stored(subject)
        ]

    def publish(self, subject: str, body: dict[str, Any] | str) -> None:
        import aio_pika

        text = body if isinstance(body, str) else json.dumps(body)
        message = aio_pika.Message(text.encode(), content_type="application/json")
        # mandatory: a decision nobody's queue takes is an error of the test's, not lost.
        self._loop.run(self.ex.publish(message, routing_key=subject, mandatory=True))

    def redeliver_soon(self) -> None:
        pass  # a message Clearance hands back is requeued at once

    def forget(self) -> None:
        """Lose the event's queues, as an operator deleting them does."""

        async def delete() -> None:
            for key in ("", ".decisions", ".errors"):
                await self.channel.queue_delete(f"{self.exchange}.{self.event}{key}")

        self._loop.run(delete())

    def close(self) -> None:
        try:
            self.forget()
            self._loop.run(self.channel.exchange_delete(self.exchange))
            self._loop.run(self.connection.close())
        finally:
            self._loop.stop()


def _unreachable(why: str) -> NoReturn:
    if os.environ.get("CLEARANCE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"CLEARANCE_REQUIRE_SERVICES=1 but {why}")
    pytest.skip(why)


SIDES: dict[str, type[Memory | Redis | Nats | Rabbit]] = {
    "memory": Memory,
    "redis": Redis,
    "nats": Nats,
    "rabbitmq": Rabbit,
}
Side = Memory | Redis | Nats | Rabbit
# The brokers with a server of their own (to stop, to reach through a proxy).
SERVED = sorted(kind for kind, side in SIDES.items() if side.server is not None)
