"""The broker contract on every broker Clearance ships: memory, Redis Streams, NATS
JetStream and RabbitMQ (the machine's servers; subjects, streams and queues named
after the test, removed afterwards)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_sides import Nats, Rabbit, Redis

from clearance.adapters.nats_broker import open_url as nats_broker
from clearance.adapters.rabbitmq_broker import open_url as rabbitmq_broker
from clearance.adapters.redis_broker import open_url as redis_broker
from clearance.ports.broker import Broker, Signer
from clearance.testing import MemoryBroker
from clearance.testing.contract import BrokerContract
from clearance.testing.memory_broker import MemoryChannel


class TestMemoryBroker(BrokerContract):
    redeliver_after = 0.2

    def make_broker(self, path: Path, name: str, sign: Signer | None) -> Broker:
        hub = MemoryBroker.named(name)
        hub.redeliver_after = self.redeliver_after
        return MemoryChannel(name, hub, sign)

    async def published(
        self, path: Path, name: str, subject: str
    ) -> list[tuple[bytes, dict[str, str]]]:
        return MemoryBroker.named(name).raw(subject)

    def unreachable(self, path: Path, name: str, sign: Signer | None) -> Broker:
        hub = MemoryBroker()
        hub.down = True
        return MemoryChannel(name, hub, sign)

    async def forget(self, path: Path, name: str, subjects: list[str]) -> None:
        MemoryBroker._hubs.pop(name, None)


class TestRedisBroker(BrokerContract):
    redeliver_after = 0.2

    @pytest.fixture(autouse=True)
    def _side(self) -> Iterator[None]:
        self.side = Redis()
        yield
        self.side.close()

    def make_broker(self, path: Path, name: str, sign: Signer | None) -> Broker:
        return redis_broker(name, self.side.url, sign=sign)

    async def published(
        self, path: Path, name: str, subject: str
    ) -> list[tuple[bytes, dict[str, str]]]:
        return self.side.raw(subject)

    def unreachable(self, path: Path, name: str, sign: Signer | None) -> Broker:
        return redis_broker(name, "redis://127.0.0.1:1/0", sign=sign)

    async def forget(self, path: Path, name: str, subjects: list[str]) -> None:
        self.side.client.delete(*subjects)


class TestNatsBroker(BrokerContract):
    redeliver_after = 0.3

    @pytest.fixture(autouse=True)
    def _side(self) -> Iterator[None]:
        self.side = Nats()
        yield
        self.side.close()

    def make_broker(self, path: Path, name: str, sign: Signer | None) -> Broker:
        return nats_broker(name, self.side.url, sign=sign)

    async def published(
        self, path: Path, name: str, subject: str
    ) -> list[tuple[bytes, dict[str, str]]]:
        return self.side.raw(subject)

    def unreachable(self, path: Path, name: str, sign: Signer | None) -> Broker:
        return nats_broker(name, "nats://127.0.0.1:1", sign=sign)

    async def forget(self, path: Path, name: str, subjects: list[str]) -> None:
        self.side.event = subjects[0]  # the stream Clearance made takes the event's subjects
        self.side.forget()


class TestRabbitMQBroker(BrokerContract):
    redeliver_after = 0.2  # a consumer's channel that closes puts its messages back at once

    @pytest.fixture(autouse=True)
    def _side(self) -> Iterator[None]:
        self.side = Rabbit()
        yield
        self.side.close()

    def make_broker(self, path: Path, name: str, sign: Signer | None) -> Broker:
        return rabbitmq_broker(name, self.side.url, sign=sign)  # on the side's exchange

    async def published(
        self, path: Path, name: str, subject: str
    ) -> list[tuple[bytes, dict[str, str]]]:
        return self.side.raw(subject)

    def unreachable(self, path: Path, name: str, sign: Signer | None) -> Broker:
        return rabbitmq_broker(name, "amqp://guest:guest@127.0.0.1:1/", sign=sign)

    async def forget(self, path: Path, name: str, subjects: list[str]) -> None:
        self.side.event = subjects[0]
        self.side.forget()
