"""The approval channel port: one way an approval request reaches the people who decide it.

A delivery row names its channel (`Delivery.channel`: "webhook" today; a message
broker such as Redis Streams, NATS or RabbitMQ later). The relay
(`clearance.delivery.DeliveryRelay`) does everything channels share, once:
it claims due deliveries with a lease, records every attempt, retries with
exponential backoff and full jitter (never past the request's expiry, at most
`max_attempts`), bounds the attempts in flight per target, and disables a
target that asked for it. A channel only sends and says how it went.

Contract of `send(delivery, body)`:

- The relay has already checked, just before the call, that the delivery's
  target (`delivery.url`) is not disabled, that the request has not expired,
  and that it is still pending; the channel checks none of it again.
- `body` is the spec's webhook body (`clearance.views.webhook_body`); the
  channel encodes it as its transport wants (the webhook channel:
  `core.json_text.dumps(body, compact=True)`).
- Receivers dedupe on `delivery.webhook_id`, the same on every attempt: a
  channel passes it on as its message id.
- `send` answers with a `Sent`; it should not raise. One that raises anyway,
  or takes longer than the relay allows (the claim's lease must outlive the
  attempt), counts as a `retry`.
- DELIVERED: the target accepted it. RETRY: worth trying again later (no
  answer, a timeout, a busy or failing target). FAILED: refused, never worth
  trying again (includes "cannot sign": no secret for this delivery).
  DISABLED: the target asked never to be sent to again (a webhook's 410); the
  relay disables it for every later delivery.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs

from clearance.ports.store import Delivery

DELIVERED = "delivered"
RETRY = "retry"
FAILED = "failed"
DISABLED = "disabled"
OUTCOMES = frozenset({DELIVERED, RETRY, FAILED, DISABLED})


@attrs.frozen
class Sent:
    """How one attempt went: `outcome` is one of OUTCOMES; `status_code` the target's
    answer where it has one (an HTTP status), `error` what went wrong, if anything."""

    outcome: str = attrs.field(validator=attrs.validators.in_(OUTCOMES))
    status_code: int | None = None
    error: str | None = None


class ApprovalChannel(Protocol):
    # The `Delivery.channel` value of the deliveries this channel carries ("webhook").
    name: str
    # At most this many attempts at once per target (`Delivery.url`); None: the relay's
    # `per_endpoint` (webhooks: someone's HTTP server, asked politely). A broker takes
    # many publishes at once.
    per_target: int | None

    async def send(self, delivery: Delivery, body: dict[str, Any]) -> Sent:
        """Send `body` for `delivery` once, and classify the answer (see the module)."""
        ...

    async def aclose(self) -> None:
        """Release connections; the relay closes the channels it was handed."""
        ...
