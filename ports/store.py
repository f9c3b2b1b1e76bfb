"""The store ports: persistence only, split by job.

A store moves rows. What a step writes is decided by the pure core
(`core.rows.writes`), and an execution is rebuilt by the pure core
(`core.replay.replay`); an adapter turns those into its database's statements
and nothing else, so SQLite and PostgreSQL behave alike by construction. The
contract suite in `clearance.testing.contract` holds every adapter to these
Protocols.

- `ExecutionLog`: the event log and the one write per step (`commit`).
- `Inbox`: reads for people and tools (pending requests, audit records).
- `Timers`: approval deadlines, found by due time.
- `WorkQueue`: model calls and tool runs, claimed with a lease that the holder
  renews; an expired lease is taken over by any worker on any host. Liveness is
  never judged by hostname or pid.
- `DeliveryQueue`: approval requests on their way out, one row per (request,
  channel), leased the same way, every attempt recorded.
- `Reviewers`: who may decide what (`core.reviewers`), and the digests of their keys.

Methods are async so network databases fit; the SQLite adapter answers inline.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Protocol

import attrs

from clearance.core.agent import AgentSpec
from clearance.core.audit_chain import ChainRow
from clearance.core.commands import AuditRecord, CallModel, RunTool
from clearance.core.errors import ClearanceError
from clearance.core.events import Event
from clearance.core.execution import ApprovalRequest, Execution
from clearance.core.reviewers import Reviewer, ReviewerKey
from clearance.core.rows import WEBHOOK, Writes


class UnknownRequest(ClearanceError):
    """A request id that names no approval request (a listing's cursor)."""


class Conflict(ClearanceError):
    """Someone else changed the execution first: reload and decide again."""


class LeaseLost(ClearanceError):
    """The work was taken over after its lease ran out: its result is not ours to record."""


class UnknownReviewer(ClearanceError):
    """A key for a reviewer the store does not hold: save the reviewer first."""


class UnreadableExecution(ClearanceError):
    """An execution's stored log or snapshot does not read back (another version of
    Clearance wrote it, or the file was changed): never a silently different state."""


class UnreadableRecord(ClearanceError):
    """A stored audit record no longer reads back: changed outside Clearance."""


@contextmanager
def reading(execution_id: str, what: str) -> Iterator[None]:
    """Around decoding a stored row: one that no longer reads back raises
    UnreadableExecution naming it, never passed off as, say, a refusal of whatever
    signal made a store load the execution."""
    try:
        yield
    except Exception as err:
        raise UnreadableExecution(
            f"execution {execution_id}: its stored {what} cannot be read back"
            f" ({type(err).__name__}: {err}); it was written by another version of"
            " Clearance or the database was changed"
        ) from err


@attrs.frozen
class Claim:
    """Who holds a unit of work: completing or releasing it names both."""

    id: int
    holder: str


@attrs.frozen
class ClaimRequest:
    """Claim the first `limit` units of work a commit queues, as `holder`, until `until`."""

    holder: str
    until: datetime
    limit: int


@attrs.frozen
class Work:
    """A model call or tool run, queued or held. `previous_holder` is set when this
    claim took the work over from a holder whose lease ran out."""

    id: int
    execution_id: str
    agent_tag: str
    command: CallModel | RunTool
    holder: str | None
    previous_holder: str | None = None
    # A tool run cancelled unstarted by a stop: its call is closed as never run, and
    # the tool is never run, by whoever holds it (also after a takeover).
    cancelled: bool = False

    @property
    def claim(self) -> Claim:
        assert self.holder is not None, "only held work has a claim"
        return Claim(self.id, self.holder)


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
    """One approval request on its way out on one channel, with every attempt so far.
    status: pending (being tried) | delivered | failed (refused or out of attempts) |
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
    channel: str = "webhook"
    signer: str = "instance"
    # Why it is sent (core.rows.DeliveryRow.purpose): the request ("request"), its
    # reminder ("reminder"), or escalation stage N ("stage:N").
    purpose: str = "request"


class ExecutionLog(Protocol):
    async def commit(
        self,
        writes: Writes,
        *,
        expected_seq: int,
        claim: ClaimRequest | None = None,
        done: Claim | None = None,
        alone: bool = False,
    ) -> list[Work]:
        """Append `writes.event` as event `expected_seq + 1` and apply the rest, in one
        transaction, or raise Conflict (another event took that slot) and write nothing.
        `claim` takes the first units of work queued here at once; `done` completes
        the work whose result this is, or raises LeaseLost and writes nothing.
        `alone`: the caller expects no other step to commit with this one, so a store
        that groups commits should not wait for company.
        Returns the work queued, claimed or not, and the queued tool runs
        `writes.drop_queued_work` cancelled (`cancelled`; held by `claim`'s holder when
        a claim is given, however many); it drops queued model calls."""
        ...

    async def load(self, execution_id: str) -> Execution | None: ...

    async def events(self, execution_id: str) -> list[Event]: ...

    async def execution_ids(
        self, agent_tag: str | None = None, *, after: str | None = None, limit: int = 1000
    ) -> list[str]:
        """Ids of the stored executions (of `agent_tag`'s agent, if given), in id order,
        from the first above `after`: a page of at most `limit` (for `policy replay`)."""
        ...

    async def define_agent(self, spec: AgentSpec) -> None:
        """Record `spec` as its agent's current definition (the last one wins)."""
        ...

    async def current_agent(self, tag: str) -> AgentSpec | None:
        """The spec agent `tag` was last defined with; None if it never was here."""
        ...


class Inbox(Protocol):
    async def execution_of_request(self, request_id: str) -> str | None: ...

    async def request_ids_starting(self, prefix: str, limit: int) -> list[str]:
        """Up to `limit` ids of requests, pending or decided, that start with `prefix`,
        in id order: how a person's shortened id is completed."""
        ...

    async def pending(
        self, agent_tag: str | None = None, limit: int | None = None, after: str | None = None
    ) -> list[ApprovalRequest]:
        """Pending requests, oldest first; `after`: only those listed after that request
        (a page's last), or UnknownRequest if no request has that id."""
        ...

    async def audit(
        self, execution_id: str | None = None, request_id: str | None = None
    ) -> list[AuditRecord]: ...

    async def audit_chain(self, after: int = 0, limit: int = 10_000) -> list[ChainRow]:
        """Up to `limit` audit rows with ids above `after`, in id order, each with its
        link in the hash chain (None for records older than the chain)."""
        ...

    async def audit_head(self) -> tuple[str, int] | None:
        """The chain's head: its last hash and how many records it holds."""
        ...


def above_prefix(prefix: str) -> str | None:
    """The least string above every string that starts with `prefix`, in code point
    order (SQLite's BINARY, PostgreSQL's "C"): with `>= prefix`, a range of an index.
    None: no such string (empty prefix, or one ending in the last code point)."""
    if not prefix or prefix[-1] == chr(0x10FFFF):
        return None
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def soonest_first(timers: Iterable[DueTimer]) -> list[DueTimer]:
    return sorted(timers, key=lambda timer: (timer.due_at, timer.request_id))


class Timers(Protocol):
    async def claim_timers(self, now: datetime, until: datetime, limit: int) -> list[DueTimer]:
        """Up to `limit` timers due at `now` that no sweep holds, soonest first, held
        until `until`: the sweeps of several processes share the due timers, and those
        of a sweep that died fall due again at `until`. Firing, dropping or postponing
        a timer ends its hold. Cost O(due), not O(pending)."""
        ...

    async def drop_timer(self, timer: DueTimer) -> None: ...

    async def postpone_timer(self, timer: DueTimer, until: datetime) -> None:
        """Try `timer` again at `until`: one that cannot fire now (its execution does
        not read back) must not hold up the timers due after it."""
        ...


class WorkQueue(Protocol):
    async def claim_work(
        self,
        agent_tags: Sequence[str],
        holder: str,
        now: datetime,
        until: datetime,
        limit: int,
        skip: Sequence[int] = (),
    ) -> list[Work]:
        """Queued work, or work whose lease ran out before `now`, of these agents; at
        most `limit`, each held by `holder` until `until`. Of two workers that race
        for one unit, exactly one gets it. `skip`: ids the caller is working on."""
        ...

    async def with_work(self, agent_tags: Sequence[str]) -> list[str]:
        """Executions of these agents that have work queued or held, oldest work first:
        what a process that starts hosting one of them will carry on."""
        ...

    async def renew(self, claims: Sequence[Claim], until: datetime) -> list[Claim]:
        """Extend these leases to `until`; returns the ones still held."""
        ...

    async def complete(self, claim: Claim) -> bool:
        """Drop finished work whose result needs no event; False if not held."""
        ...

    async def release(self, claim: Claim) -> None:
        """Hand held work back to the queue unstarted (closing), for anyone to claim."""
        ...

    async def wait_for_work(self, seconds: float) -> bool:
        """Return when another process may have queued work or decided something (True),
        or after `seconds` (False)."""
        ...


class DeliveryQueue(Protocol):
    async def claim_deliveries(
        self,
        agent_tags: Sequence[str],
        worker: str,
        now: datetime,
        lease_until: datetime,
        limit: int,
        *,
        instance_signed: bool,
        channels: Sequence[str] = (WEBHOOK,),
        exclude_urls: Sequence[str] = (),
    ) -> list[Delivery]:
        """Due deliveries this worker can carry out, at most `limit`, each held by
        `worker` until `lease_until`: only on `channels` (those it has an adapter for;
        the webhook alone unless told); agent-signed ones only of agents it hosts
        (`agent_tags`), instance-signed ones only if it holds the instance's secret
        (`instance_signed`), whatever agent they belong to; none to `exclude_urls`
        (targets already busy here)."""
        ...

    async def release_delivery(self, delivery_id: int, worker: str) -> None: ...

    async def record_attempt(
        self,
        delivery_id: int,
        worker: str,
        attempt: DeliveryAttempt,
        status: str,
        next_attempt_at: datetime | None,
    ) -> bool:
        """Record an attempt of a delivery `worker` holds; False (nothing written) if its
        lease was taken over meanwhile."""
        ...

    async def deliveries(self, request_id: str) -> list[Delivery]: ...

    async def disable_endpoint(self, url: str, at: datetime, reason: str) -> None: ...

    async def endpoint_disabled(self, url: str) -> bool: ...


class Reviewers(Protocol):
    """Reviewers by name, and their keys by key id. A key never outlives its reviewer:
    one saved again later under the same name must not find the old keys still valid."""

    async def save_reviewer(self, reviewer: Reviewer) -> bool:
        """Store `reviewer`, or replace the grants and groups of the one of that name
        (its keys stay). True if it was new."""
        ...

    async def reviewer(self, name: str) -> Reviewer | None: ...

    async def reviewers(self) -> list[Reviewer]:
        """Every reviewer, by name (code point order, whatever the database's collation)."""
        ...

    async def remove_reviewer(self, name: str) -> bool:
        """Remove the reviewer and all its keys; False if there was none."""
        ...

    async def add_key(self, key: ReviewerKey) -> None:
        """Store a key of a stored reviewer, or raise UnknownReviewer. Adding the same key
        again changes nothing (a call repeated after a lost connection); another key
        with a stored key's id raises BadReviewer."""
        ...

    async def reviewer_key(self, key_id: str) -> ReviewerKey | None: ...

    async def reviewer_keys(self, reviewer: str) -> list[ReviewerKey]:
        """The reviewer's keys, revoked and expired ones too, oldest first (then by id)."""
        ...

    async def revoke_key(self, key_id: str, at: datetime) -> bool:
        """Mark the key revoked at `at`; False if there is no such key or it already was
        (the first revocation's time stays: it is when the key stopped counting)."""
        ...


@attrs.frozen
class Forgotten:
    """What one `forget` did: the executions deleted, their chained audit records whose
    payload was dropped, and their records left as they are: older than the chain (its
    genesis hash covers their bodies), or no longer readable as records (changed
    outside Clearance: `verify` names them). `vanished`: executions given that were
    already gone (another prune forgot them first)."""

    executions: tuple[str, ...] = ()
    audit_pruned: int = 0
    audit_kept: int = 0
    audit_unreadable: int = 0
    vanished: int = 0


class Retention(Protocol):
    async def finished_before(
        self, cutoff: datetime, *, after: str | None = None, limit: int = 1000
    ) -> list[str]:
        """Ids of executions that may have finished before `cutoff`, in id order, from
        the first above `after`: a page of at most `limit`, found without folding any
        execution (when each finished is kept as its steps commit: `Writes.finished_at`).
        Every execution whose last step left it finished before `cutoff` is among them;
        so may be others (those stored before the store kept when each finished): the
        caller loads each one and judges it."""
        ...

    async def forget(
        self, executions: Sequence[Execution], at: datetime, *, dry_run: bool = False
    ) -> Forgotten:
        """In one transaction, for each finished execution given (as loaded): delete
        everything kept about it (events, snapshot, its requests' inbox rows,
        deliveries and their attempts; a finished execution has no timers left, and
        a sweep drops a stray one whose execution is gone) and drop the payload of its chained audit
        records (`core.audit_chain.without_payload(record, at)`: their links stay
        valid). One whose log moved past the seq it was loaded at, or that has work
        queued or held, is left as it is: a worker may still be finishing a tool run
        that a stop overtook. One already gone is counted as `vanished`: of two
        forgets of one execution at once, one deletes it and the other finds it gone.
        `dry_run`: the same transaction, rolled back: it says what a real one would do
        and changes nothing."""
        ...


class Store(ExecutionLog, Inbox, Timers, WorkQueue, DeliveryQueue, Reviewers, Retention, Protocol):
    """Every job a store does; the composition root opens one and hands it around."""

    async def close(self) -> None: ...
