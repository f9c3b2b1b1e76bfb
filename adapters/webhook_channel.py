"""The webhook channel: an approval request POSTed, signed per Standard Webhooks.

Sends and classifies only (the `ApprovalChannel` contract): 2xx delivered;
410 disabled; 408, 429, 5xx and no answer at all (timeout, connection error)
retry; any other answer failed. Which secret signs a delivery is the
composition root's to say (`secret_for`): a delivery nobody here can sign
fails at once, unsent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clearance.adapters.webhook_sender import WebhookSender
from clearance.core.json_text import dumps
from clearance.core.rows import WEBHOOK
from clearance.ports.channel import DELIVERED, DISABLED, FAILED, RETRY, Sent
from clearance.ports.clock import Clock
from clearance.ports.store import Delivery

RETRYABLE = frozenset({408, 429})


def classify(status_code: int | None) -> str:
    """The outcome of one POST, from its HTTP status (None: no answer)."""
    if status_code is None or status_code in RETRYABLE or status_code >= 500:
        return RETRY
    if 200 <= status_code < 300:
        return DELIVERED
    if status_code == 410:
        return DISABLED
    return FAILED


class WebhookChannel:
    name = WEBHOOK
    per_target: int | None = None  # the relay's per_endpoint

    def __init__(
        self,
        sender: WebhookSender,
        secret_for: Callable[[Delivery], str | None],
        clock: Clock,
    ) -> None:
        self._sender = sender
        self._secret_for = secret_for
        self._clock = clock

    async def send(self, delivery: Delivery, body: dict[str, Any]) -> Sent:
        secret = self._secret_for(delivery)
        if secret is None:
            return Sent(FAILED, error="no webhook_secret configured")
        answer = await self._sender.post(
            delivery.url,
            secret=secret,
            webhook_id=delivery.webhook_id,
            at=self._clock.now(),  # signed afresh on every attempt
            body=dumps(body, compact=True),
        )
        return Sent(classify(answer.status_code), answer.status_code, answer.error)

    async def aclose(self) -> None:
        await self._sender.aclose()
