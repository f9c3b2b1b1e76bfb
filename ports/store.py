"""The store port: executions, their event log, pending approvals, timers, outbox and audit.

`commit` is the one write the engine makes per event: the event and the
event's commands, atomically and only if nobody else moved the execution first
(optimistic version = `Execution.seq`, which must be `expected_seq + 1`). It
also gets the new state, which `decide()` made from the event: a store may
keep it (the SQLite one keeps a snapshot every few events) or rebuild it on
`load` by folding the log. Store effects among the commands (timers, the
pending list, audit records) are applied in the same transaction; `CallModel`
/ `RunTool` go to the outbox.

Methods are async so network databases fit the same port; the SQLite adapter
answers inline (its writes are short and local).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

import attrs

from clearance.core.agent import AgentSpec
from clearance.core.commands import AuditRecord, Command
from clearance.core.errors import ClearanceError
from clearance.core.events import Event
from clearance.core.execution import ApprovalRequest, Execution


class Conflict(ClearanceError):
    """Someone else changed the execution first: reload and decide again."""


class UnreadableExecution(ClearanceError):
    """An execution's stored log or snapshot does not read back (another version of
    Clearance wrote it, or the file was changed): never a silently different state."""


@attrs.frozen
class OutboxEntry:
    id: int
    execution_id: str
    agent_tag: str
    command: Command
    claimed_by: str | None


@attrs.frozen
class DueTimer:
    execution_id: str
    request_id: str
    due_at: datetime


@attrs.frozen
class DeliveryAttempt:
    at: datetime
    status_code: int | None  # None: no HTTP answer (connection error, timeout)
    error: str | None
    outcome: str  # delivered | retry | failed | disabled | expired | skipped


@attrs.frozen
class Delivery:
    """One approval request on its way to one webhook URL, with every attempt so far.
    status: pending (being tried) | delivered | failed (4xx or out of attempts) |
    disabled (the endpoint answered 410) | expired (no retry before the request expires) |
    skipped (the request was decided before it could be delivered)."""

    id: int
    request_id: str
    execution_id: str
    agent_tag: str
    url: str
    webhook_id: str  # the same on every retry (Standard Webhooks `webhook-id`)
    status: str
    attempts: tuple[DeliveryAttempt, ...]
    next_attempt_at: datetime
    expires_at: datetime


class Store(Protocol):
    commits: int  # successful write transactions, for benchmarks and tests

    async def remember_agent(self, spec: AgentSpec) -> str: ...

    async def commit(
        self,
        execution: Execution,
        event: Event,
        commands: Sequence[Command],
        *,
        expected_seq: int,
        claimed_by: str | None,
        done: int | None = None,
    ) -> list[OutboxEntry]: ...

    async def load(self, execution_id: str) -> Execution | None: ...

    async def events(self, execution_id: str) -> list[Event]: ...

    async def spec_of(self, execution_id: str) -> AgentSpec | None: ...

    async def execution_of_request(self, request_id: str) -> str | None: ...

    async def pending(
        self, agent_tag: str | None = None, limit: int | None = None
    ) -> list[ApprovalRequest]: ...

    async def due_timers(self, now: datetime, limit: int) -> list[DueTimer]: ...

    async def drop_timer(self, timer: DueTimer) -> None: ...

    async def claim_queued(
        self, agent_tags: Sequence[str], worker: str, limit: int
    ) -> list[OutboxEntry]: ...

    async def claimed_by_others(
        self, agent_tags: Sequence[str], worker: str
    ) -> list[OutboxEntry]: ...

    async def reclaim(self, entry_id: int, previous: str, worker: str) -> bool: ...

    async def discard(self, entry_id: int) -> None: ...

    async def audit(
        self, execution_id: str | None = None, request_id: str | None = None
    ) -> list[AuditRecord]: ...

    async def claim_deliveries(
        self,
        agent_tags: Sequence[str],
        worker: str,
        now: datetime,
        lease_until: datetime,
        limit: int,
        exclude_urls: Sequence[str] = (),
    ) -> list[Delivery]: ...

    async def release_delivery(self, delivery_id: int, worker: str) -> None: ...

    async def record_attempt(
        self,
        delivery_id: int,
        attempt: DeliveryAttempt,
        status: str,
        next_attempt_at: datetime | None,
    ) -> None: ...

    async def deliveries(self, request_id: str) -> list[Delivery]: ...

    async def disable_endpoint(self, url: str, at: datetime, reason: str) -> None: ...

    async def endpoint_disabled(self, url: str) -> bool: ...

    async def close(self) -> None: ...
