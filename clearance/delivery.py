"""Webhook delivery of approval requests, from the store: durable, retried, never blocking.

Each approval request of an agent with `approval_webhook` gets a `deliveries`
row in the same transaction that opens it, so a request committed before a
crash is delivered after the restart, with the same `webhook-id`. Attempts run
as their own tasks, bounded in number, so a slow or dead receiver delays only
its own deliveries. Retry policy: 2xx delivered; 408, 429, 5xx, timeouts and
connection errors retried with exponential backoff and full jitter, never past
the request's expiry; 410 disables the endpoint; any other answer fails the
delivery for good; a request decided meanwhile is skipped. Every attempt is
recorded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from datetime import datetime, timedelta

from clearance.adapters.webhook_sender import Answer, WebhookSender
from clearance.callback import callback_url
from clearance.core.execution import PENDING, ApprovalRequest, iso
from clearance.definition import HostedAgent
from clearance.ports.clock import Clock
from clearance.ports.store import Delivery, DeliveryAttempt, Store

log = logging.getLogger("clearance")

RETRYABLE = frozenset({408, 429})


def is_retryable(answer: Answer) -> bool:
    code = answer.status_code
    return code is None or code in RETRYABLE or code >= 500


class WebhookDelivery:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        worker: str,
        agents: dict[str, HostedAgent],
        *,
        public_url: Callable[[], str | None],
        secret: Callable[[], str | None],
        timeout: float = 10.0,
        retry_base: float = 1.0,
        retry_cap: float = 300.0,
        max_attempts: int = 12,
        concurrency: int = 64,
        per_endpoint: int = 4,
    ) -> None:
        self.store = store
        self.clock = clock
        self.worker = worker
        self.agents = agents
        self._public_url = public_url
        self._secret = secret
        self.timeout = timeout
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.max_attempts = max_attempts
        self._sender = WebhookSender(timeout)
        self.concurrency = concurrency
        self.per_endpoint = per_endpoint
        self._in_flight: dict[str, int] = {}  # attempts running, by URL
        self._running: set[asyncio.Task[None]] = set()

    async def start_due(self) -> int:
        """Start an attempt for every delivery that is due; returns how many started."""
        free = self.concurrency - len(self._running)  # claim only what can start now
        if free <= 0:
            return 0
        now = self.clock.now()
        # The lease outlives one attempt, so a live worker is never raced for it.
        lease = now + timedelta(seconds=self.timeout * 2 + 5)
        # One hanging receiver may hold at most `per_endpoint` slots: the rest stay free
        # for healthy endpoints.
        busy = [u for u, n in self._in_flight.items() if n >= self.per_endpoint]
        due = await self.store.claim_deliveries(
            list(self.agents), self.worker, now, lease, free, exclude_urls=busy
        )
        started = 0
        for delivery in due:
            if self._in_flight.get(delivery.url, 0) >= self.per_endpoint:
                await self.store.release_delivery(delivery.id, self.worker)
                continue
            self._in_flight[delivery.url] = self._in_flight.get(delivery.url, 0) + 1
            task = asyncio.create_task(self._attempt(delivery))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            started += 1
        return started

    async def deliver_due(self) -> int:
        """Start what is due and wait for those attempts to finish (tests, CLI)."""
        started = await self.start_due()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        return started

    async def _attempt(self, delivery: Delivery) -> None:
        try:
            await self._try(delivery)
        except asyncio.CancelledError:
            # Closing mid-attempt: hand the delivery back at once rather than make the
            # next process wait for the lease to lapse.
            await self.store.release_delivery(delivery.id, self.worker)
            raise
        except Exception:  # one broken delivery must not stop the others
            log.exception("webhook delivery %s failed unexpectedly", delivery.webhook_id)
        finally:
            self._in_flight[delivery.url] -= 1
            if not self._in_flight[delivery.url]:
                del self._in_flight[delivery.url]

    async def _try(self, delivery: Delivery) -> None:
        now = self.clock.now()
        if await self.store.endpoint_disabled(delivery.url):
            await self._record(
                delivery, None, "endpoint disabled after an earlier 410", "disabled", "disabled"
            )
            return
        if now >= delivery.expires_at:
            await self._record(delivery, None, "the approval request expired", "expired", "expired")
            return
        ex = await self.store.load(delivery.execution_id)
        request = ex.request(delivery.request_id) if ex else None
        if request is None:
            await self._record(
                delivery, None, "the approval request no longer exists", "failed", "failed"
            )
            return
        if request.status != PENDING:
            # Decided elsewhere first (CLI, signal, timeout): nobody needs asking any more.
            await self._record(
                delivery, None, f"the request was already {request.status}", "skipped", "skipped"
            )
            return
        body = self._body(request)
        agent = self.agents.get(delivery.agent_tag)
        secret = (agent.webhook_secret if agent else None) or self._secret()
        if secret is None:
            await self._record(delivery, None, "no webhook_secret configured", "failed", "failed")
            return
        answer = await self._sender.post(
            delivery.url, secret=secret, webhook_id=delivery.webhook_id, at=now, body=body
        )
        code = answer.status_code
        if code is not None and 200 <= code < 300:
            await self._record(delivery, code, None, "delivered", "delivered")
        elif code == 410:
            await self.store.disable_endpoint(delivery.url, now, "answered 410 Gone")
            await self._record(delivery, code, answer.error, "disabled", "disabled")
        elif not is_retryable(answer):
            await self._record(delivery, code, answer.error, "failed", "failed")
        else:
            attempts = len(delivery.attempts) + 1
            backoff = min(self.retry_cap, self.retry_base * 2 ** (attempts - 1))
            next_at = self.clock.now() + timedelta(seconds=random.uniform(0, backoff))
            if attempts >= self.max_attempts:
                await self._record(delivery, code, answer.error, "failed", "failed")
            elif next_at >= delivery.expires_at:
                await self._record(delivery, code, answer.error, "expired", "expired")
            else:
                await self._record(delivery, code, answer.error, "retry", "pending", next_at)

    async def _record(
        self,
        delivery: Delivery,
        code: int | None,
        error: str | None,
        outcome: str,
        status: str,
        next_at: datetime | None = None,
    ) -> None:
        attempt = DeliveryAttempt(self.clock.now(), code, error, outcome)
        await self.store.record_attempt(delivery.id, attempt, status, next_at)

    def _body(self, request: ApprovalRequest) -> str:
        public_url, secret = self._public_url(), self._secret()
        body = {
            "type": "approval_request",
            "requestId": request.request_id,
            "executionId": request.execution_id,
            "agentTag": request.agent_tag,
            "tool": request.tool,
            "parameters": request.parameters,
            "timestamp": iso(request.timestamp),
            "expiresAt": iso(request.timeout),
            "callbackUrl": callback_url(public_url, secret, request)
            if public_url and secret
            else None,
        }
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False)

    async def aclose(self) -> None:
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        await self._sender.aclose()
