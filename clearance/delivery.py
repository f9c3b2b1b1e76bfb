"""The delivery relay: approval requests from the store out through their channels,
durable, retried, never blocking.

Each approval request of an agent with `approval_webhook` gets a `deliveries`
row per channel in the same transaction that opens it, so a request committed
before a crash is delivered after the restart, with the same message id
(`webhook-id`). The relay claims due rows with a lease, and only rows it can
carry out: of a channel it has an adapter for (`ApprovalChannel`), signed with
a secret it holds. Attempts run as their own tasks, bounded in number and per
target, so a slow or dead receiver delays only its own deliveries.

What every channel shares is here, once; a channel only sends and classifies
(`clearance.ports.channel`). Before each attempt: a disabled target, an expired
request or one decided meanwhile (skipped) ends the delivery unsent. After it:
delivered; disabled (the target is disabled for every later delivery); failed
for good; or retried with exponential backoff and full jitter, never past the
request's expiry nor `max_attempts`. Every attempt is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from clearance import views
from clearance.callback import callback_url
from clearance.core.escalation import REMINDER, stage_for
from clearance.core.execution import PENDING, ApprovalRequest, Execution
from clearance.definition import HostedAgent
from clearance.ports.channel import DELIVERED, DISABLED, FAILED, RETRY, ApprovalChannel, Sent
from clearance.ports.clock import Clock
from clearance.ports.store import Delivery, DeliveryAttempt, Store

log = logging.getLogger("clearance")


class DeliveryRelay:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        worker: str,
        agents: dict[str, HostedAgent],
        channels: Iterable[ApprovalChannel],
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
        """`agents`: the agents this process hosts (it may sign with their own secrets);
        `secret`: the instance's webhook secret, if this process has it; `timeout`: how
        long one send may take (a channel's own timeout; the lease outlives twice it)."""
        self.store = store
        self.clock = clock
        self.worker = worker
        self.agents = agents
        self.channels: dict[str, ApprovalChannel] = {}
        for channel in channels:
            if channel.name in self.channels:
                raise ValueError(f"two approval channels are named {channel.name!r}")
            self.channels[channel.name] = channel
        self._public_url = public_url
        self._secret = secret
        self.timeout = timeout
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.max_attempts = max_attempts
        self.concurrency = concurrency
        self.per_endpoint = per_endpoint
        # Attempts running, by target: (channel name, url).
        self._in_flight: dict[tuple[str, str], int] = {}
        self._due = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()

    def _limit(self, channel: ApprovalChannel) -> int:
        return channel.per_target or self.per_endpoint

    async def start_due(self) -> int:
        """Start an attempt for every delivery that is due; returns how many started."""
        free = self.concurrency - len(self._running)  # claim only what can start now
        if free <= 0 or not self.channels:
            return 0
        now = self.clock.now()
        # The lease outlives one attempt (`_send` cuts a send off before it runs out),
        # so a live worker is never raced for it.
        lease = now + timedelta(seconds=self.timeout * 2 + 5)
        # One hanging receiver may hold at most its channel's limit of slots: the rest
        # stay free for healthy targets.
        busy = [
            url
            for (name, url), n in self._in_flight.items()
            if n >= self._limit(self.channels[name])
        ]
        # Claimed rows beyond a target's limit go back unsent (a wasted write each):
        # claim no more than the most one target may take.
        most = max(self._limit(channel) for channel in self.channels.values())
        due = await self.store.claim_deliveries(
            list(self.agents),
            self.worker,
            now,
            lease,
            min(free, most),
            instance_signed=self._secret() is not None,
            channels=list(self.channels),
            exclude_urls=busy,
        )
        started = 0
        for delivery in due:
            channel = self.channels.get(delivery.channel)
            if channel is None:  # a store that ignored `channels`
                log.warning(
                    "delivery %s: no %r channel in this process; handed back",
                    delivery.webhook_id,
                    delivery.channel,
                )
                await self.store.release_delivery(delivery.id, self.worker)
                continue
            target = (delivery.channel, delivery.url)
            if self._in_flight.get(target, 0) >= self._limit(channel):
                await self.store.release_delivery(delivery.id, self.worker)
                continue
            self._in_flight[target] = self._in_flight.get(target, 0) + 1
            task = asyncio.create_task(self._attempt(delivery))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            started += 1
        return started

    def wake(self) -> None:
        """Something may be due now: a delivery was committed, or an attempt ended."""
        self._due.set()

    async def wait(self, at_most: float) -> None:
        """Until `wake()`, or `at_most` seconds (for deliveries of other processes and
        retries coming due)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._due.wait(), at_most)
        self._due.clear()

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
            log.exception("delivery %s failed unexpectedly", delivery.webhook_id)
        finally:
            target = (delivery.channel, delivery.url)
            self._in_flight[target] -= 1
            if not self._in_flight[target]:
                del self._in_flight[target]
            self.wake()  # a slot is free: the next due delivery need not wait a poll

    async def _try(self, delivery: Delivery) -> None:
        now = self.clock.now()
        if await self.store.endpoint_disabled(delivery.url):
            await self._record(
                delivery, None, "endpoint disabled after an earlier 410", "disabled", "disabled"
            )
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
        # Its deadline as it is now (a reviewer may have extended it since this was queued).
        if now >= request.timeout:
            await self._record(delivery, None, "the approval request expired", "expired", "expired")
            return
        body = views.webhook_body(
            request,
            self._callback_url(request, delivery.purpose),
            reminder=delivery.purpose == REMINDER,
            stage=_stage(ex, request, delivery.purpose),
        )
        if self.clock.now() >= request.timeout:  # it expired while the request was read
            await self._record(delivery, None, "the approval request expired", "expired", "expired")
            return
        sent = await self._send(self.channels[delivery.channel], delivery, body)
        code, error = sent.status_code, sent.error
        if sent.outcome == DELIVERED:
            await self._record(delivery, code, error, "delivered", "delivered")
        elif sent.outcome == DISABLED:
            reason = "answered 410 Gone" if code == 410 else error or "the target refused"
            await self.store.disable_endpoint(delivery.url, now, reason)
            await self._record(delivery, code, error, "disabled", "disabled")
        elif sent.outcome == FAILED:
            await self._record(delivery, code, error, "failed", "failed")
        else:  # RETRY
            attempts = len(delivery.attempts) + 1
            backoff = min(self.retry_cap, self.retry_base * 2 ** (attempts - 1))
            next_at = self.clock.now() + timedelta(seconds=random.uniform(0, backoff))
            if attempts >= self.max_attempts:
                await self._record(delivery, code, error, "failed", "failed")
            elif next_at >= request.timeout:
                await self._record(delivery, code, error, "expired", "expired")
            else:
                await self._record(delivery, code, error, "retry", "pending", next_at)

    async def _send(
        self, channel: ApprovalChannel, delivery: Delivery, body: dict[str, Any]
    ) -> Sent:
        """One send, cut off before the claim's lease can run out; a channel that raises
        or hangs counts as worth another try."""
        try:
            return await asyncio.wait_for(channel.send(delivery, body), self.timeout * 2)
        except TimeoutError:
            return Sent(RETRY, None, f"{channel.name} send timed out after {self.timeout * 2:g}s")
        except Exception as err:
            log.exception("%s channel failed on delivery %s", channel.name, delivery.webhook_id)
            return Sent(RETRY, None, f"{type(err).__name__}: {err}")

    def _callback_url(self, request: ApprovalRequest, purpose: str) -> str | None:
        public_url, secret = self._public_url(), self._secret()
        if not public_url or not secret:
            return None
        return callback_url(public_url, secret, request, purpose)

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
        if not await self.store.record_attempt(delivery.id, self.worker, attempt, status, next_at):
            log.warning(
                "delivery %s: taken over by another worker after its lease ran out;"
                " this attempt (%s) is not recorded",
                delivery.webhook_id,
                outcome,
            )

    async def aclose(self) -> None:
        """Cancel the attempts running (each hands its delivery back), then close the
        channels this relay was handed."""
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        for channel in self.channels.values():
            try:
                await channel.aclose()
            except Exception:
                log.exception("closing the %s channel failed", channel.name)


def _stage(ex: Execution | None, request: ApprovalRequest, purpose: str) -> tuple[int, int] | None:
    """(number, after in ms) of the escalation stage a delivery is for, if it is."""
    found = stage_for(ex.agent.tool(request.tool), purpose) if ex is not None else None
    return (found[0], found[1].after_ms) if found is not None else None
