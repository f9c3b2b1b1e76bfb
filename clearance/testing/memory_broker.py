"""A message broker in this process's memory, for tests of code that answers approval
requests over a broker (`memory://NAME` in `Clearance.open(brokers=...)`).

    async with Clearance.open(url, brokers={"events": "memory://events"}) as app:
        ...  # define an agent with approval_broker=ApprovalBroker("events", "approval-requested")
        hub = MemoryBroker.named("events")
        [request] = hub.messages("approval-requested")
        hub.publish("approval-requested.decisions",
                    {"requestId": request["requestId"], "approved": True, "by": "ops"})

It keeps the semantics the real adapters share: every message has a message id
(the request id for approval requests), consumers of one group share a subject's
messages, and a message that is not acknowledged comes again (after
`redeliver_after` seconds, as Redis's XAUTOCLAIM or a JetStream ack wait does).
Messages stay in memory until `clear()`: a test sees everything published.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import attrs

from clearance.core.json_text import dumps
from clearance.core.rows import broker_channel
from clearance.ports.broker import PUBLISHES_AT_ONCE, Signer, signed_message
from clearance.ports.channel import DELIVERED, FAILED, RETRY, Sent
from clearance.ports.store import Delivery


@attrs.define
class _Entry:
    message_id: str
    data: bytes
    headers: dict[str, str]


@attrs.define
class _Group:
    next: int = 0  # the index of the first entry not yet handed to a consumer
    # Entries handed out and not acknowledged: entry index -> when it comes again.
    unacked: dict[int, float] = attrs.field(factory=dict)


@attrs.define(eq=False)
class MemoryMessage:
    data: bytes
    message_id: str
    _group: _Group
    _index: int

    async def ack(self) -> None:
        self._group.unacked.pop(self._index, None)

    async def retry(self, delay: float) -> None:
        if self._index in self._group.unacked:
            self._group.unacked[self._index] = time.monotonic() + delay


class MemoryBroker:
    """Subjects (streams) of messages, with consumer groups; one per name per process."""

    _hubs: ClassVar[dict[str, MemoryBroker]] = {}

    def __init__(self, redeliver_after: float = 1.0) -> None:
        self.redeliver_after = redeliver_after
        self._subjects: dict[str, list[_Entry]] = {}
        self._groups: dict[tuple[str, str], _Group] = {}
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self.down = False  # True: publishing fails, as with a broker that went away

    @classmethod
    def named(cls, name: str) -> MemoryBroker:
        """The broker `memory://NAME` names in this process (made on first use)."""
        if name not in cls._hubs:
            cls._hubs[name] = cls()
        return cls._hubs[name]

    def clear(self) -> None:
        self._subjects.clear()
        self._groups.clear()

    def messages(self, subject: str) -> list[dict[str, Any]]:
        """Every message published on `subject`, oldest first, as JSON objects."""
        return [json.loads(e.data) for e in self._subjects.get(subject, [])]

    def message_ids(self, subject: str) -> list[str]:
        return [e.message_id for e in self._subjects.get(subject, [])]

    def raw(self, subject: str) -> list[tuple[bytes, dict[str, str]]]:
        """Every message on `subject` as published: its bytes and headers (for a
        signature check: Standard Webhooks `webhook-id`, `-timestamp`, `-signature`)."""
        return [(e.data, dict(e.headers)) for e in self._subjects.get(subject, [])]

    def publish(
        self,
        subject: str,
        body: dict[str, Any] | str,
        message_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        """Publish `body` (a JSON object, or text as it is) on `subject`."""
        if self.down:
            raise ConnectionError("the memory broker is down (MemoryBroker.down = True)")
        message_id = message_id or f"mem-{next(self._ids)}"
        text = body if isinstance(body, str) else dumps(body, compact=True)
        self._subjects.setdefault(subject, []).append(
            _Entry(message_id, text.encode(), dict(headers or {}))
        )
        self._changed.set()
        return message_id

    async def read(self, subject: str, group: str) -> MemoryMessage:
        """The next message of `subject` for `group`: one not yet handed out, or one
        handed out `redeliver_after` seconds ago and still not acknowledged."""
        state = self._groups.setdefault((subject, group), _Group())
        while True:
            entries = self._subjects.get(subject, [])
            now = time.monotonic()
            for index, due in sorted(state.unacked.items()):
                if due <= now:
                    state.unacked[index] = now + self.redeliver_after
                    entry = entries[index]
                    return MemoryMessage(entry.data, entry.message_id, state, index)
            if state.next < len(entries):
                index, state.next = state.next, state.next + 1
                state.unacked[index] = now + self.redeliver_after
                entry = entries[index]
                return MemoryMessage(entry.data, entry.message_id, state, index)
            self._changed.clear()
            wait = max(0.0, min(state.unacked.values()) - now) if state.unacked else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)


class MemoryChannel:
    """The `Broker` port on a `MemoryBroker`, under the name the runtime gave it."""

    per_target: int | None = PUBLISHES_AT_ONCE

    def __init__(self, broker: str, hub: MemoryBroker, sign: Signer | None = None) -> None:
        self.name = broker_channel(broker)
        self.hub = hub
        self._sign = sign

    async def send(self, delivery: Delivery, body: dict[str, Any]) -> Sent:
        message = signed_message(delivery, body, self._sign)
        if message is None:
            return Sent(FAILED, error="no webhook_secret configured to sign it")
        text, headers = message
        try:
            self.hub.publish(delivery.url, text, message_id=delivery.webhook_id, headers=headers)
        except ConnectionError as err:
            return Sent(RETRY, error=str(err))
        return Sent(DELIVERED)

    async def decisions(
        self, subject: str, group: str, consumer: str
    ) -> AsyncIterator[MemoryMessage]:
        while True:
            yield await self.hub.read(subject, group)

    async def publish(self, subject: str, body: dict[str, Any]) -> None:
        self.hub.publish(subject, body)

    async def aclose(self) -> None:
        pass


def open_url(name: str, url: str, *, sign: Signer | None = None) -> MemoryChannel:
    """The `clearance.channels` entry for `memory://NAME` URLs."""
    key = url.removeprefix("memory://").strip("/")
    if not key:
        raise ValueError(f"a memory broker URL names its broker: memory://NAME, got {url!r}")
    return MemoryChannel(name, MemoryBroker.named(key), sign)
