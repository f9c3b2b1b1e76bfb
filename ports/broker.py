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
  never acknowledged because its consumer died comes again after a while; one
  handed back with `retry` comes again sooner.
- `publish(subject, body)` publishes one message (the answers on `<event>.errors`).
- Broker outages are not fatal: `send` answers RETRY; `publish` raises (the caller
  retries by not acknowledging); `decisions` may wait or raise (the decision consumer
  reads again after a pause). Cancelling the task that reads `decisions` ends it
  promptly, whatever it waits on.
- `clearance.testing.contract.BrokerContract` holds an adapter to all of this.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from clearance.core.json_text import dumps
from clearance.ports.channel import ApprovalChannel
from clearance.ports.store import Delivery

# The Standard Webhooks signature, as message headers or fields beside the body.
SIGNATURE = ("webhook-id", "webhook-timestamp", "webhook-signature")
# The subjects that answer an event: decisions come in on one, refusals go out on the other.
ANSWERS = (".decisions", ".errors")


def our_options(url: str, ours: set[str]) -> tuple[dict[str, str], str]:
    """The URL parameters named in `ours` (an adapter's own, e.g. `claim_after`), and
    the URL without them, for the client library, which would refuse them."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    rest = urlencode([(k, v) for k, v in query if k not in ours])
    return {k: v for k, v in query if k in ours}, urlunsplit(parts._replace(query=rest))


def event_of(subject: str) -> str:
    """The event a subject belongs to: `<event>`, `<event>.decisions`, `<event>.errors`."""
    for suffix in ANSWERS:
        if subject.endswith(suffix):
            return subject.removesuffix(suffix)
    return subject


# Publishes a broker channel takes at once per event (its `per_target`): a broker
# pipelines them on one connection, and the relay runs at most 64 attempts anyway.
PUBLISHES_AT_ONCE = 64

# Standard Webhooks headers (webhook-id, -timestamp, -signature) for a delivery's body
# text, made by the runtime with the secret that signs it; None: no secret here does.
Signer = Callable[[Delivery, str], dict[str, str] | None]


def signed_message(
    delivery: Delivery, body: dict[str, Any], sign: Signer | None
) -> tuple[str, dict[str, str]] | None:
    """The message a broker publishes for `delivery`: the body's compact JSON text and
    its signature headers (none without a signer); None when it cannot be signed."""
    text = dumps(body, compact=True)
    headers = sign(delivery, text) if sign is not None else {}
    return None if headers is None else (text, headers)


class Incoming(Protocol):
    """One message read from a broker."""

    data: bytes  # the message's JSON text
    message_id: str  # the broker's id for it, for logs

    async def ack(self) -> None:
        """Done with it: it is not delivered again."""
        ...

    async def retry(self, delay: float) -> None:
        """Not done (the store could not be reached): hand it out again, to any
        consumer of the group, no sooner than `delay` seconds from now where the
        broker can say so (NATS's nak with a delay; RabbitMQ waits, then requeues;
        Redis takes it back once it has been idle `claim_after`)."""
        ...


class Broker(ApprovalChannel, Protocol):
    def decisions(self, subject: str, group: str, consumer: str) -> AsyncIterator[Incoming]: ...

    async def publish(self, subject: str, body: dict[str, Any]) -> None: ...
