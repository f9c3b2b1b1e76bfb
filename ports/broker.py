"""The broker port: a message broker that approval requests are published on and
decisions come back over (the spec's `approvalBroker: {broker, event}`).

A broker is an `ApprovalChannel` (the delivery relay publishes each approval
request from the store's outbox, with every attempt recorded) that also reads
decisions. Its channel name is `broker:<name>` (`core.rows.broker_channel`), the
name the runtime was given (`Clearance.open(brokers={name: url})`).

Contract, beyond `ApprovalChannel`'s:

- `send(delivery, body)` publishes `body` (the webhook's JSON body) as one message
  on `delivery.url` (the event: a stream key, subject or routing key), with
  `delivery.webhook_id` (the request id) as its message id, at least once.
- `decisions(subject, group, consumer)` yields the messages published on `subject`
  (`<event>.decisions`), shared by every consumer of `group`: each message goes to
  one of them, and comes again (to any) until acknowledged. A message that is
  never acknowledged because its consumer died comes again after a while.
- `publish(subject, body)` publishes one message (the answers on `<event>.errors`).
- Broker outages are not fatal: `decisions` waits and tries again; `send` answers
  RETRY; `publish` raises (the caller retries by not acknowledging).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from clearance.ports.channel import ApprovalChannel


class Incoming(Protocol):
    """One message read from a broker."""

    data: bytes  # the message's JSON text
    message_id: str  # the broker's id for it, for logs

    async def ack(self) -> None:
        """Done with it: it is not delivered again."""
        ...


class Broker(ApprovalChannel, Protocol):
    def decisions(self, subject: str, group: str, consumer: str) -> AsyncIterator[Incoming]: ...

    async def publish(self, subject: str, body: dict[str, Any]) -> None: ...
