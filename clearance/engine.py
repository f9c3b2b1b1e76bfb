"""The engine: load, decide, commit, carry out, feed back — concurrently, under leases.

Theory of operation
-------------------
Each event is one store commit: the event, and the rows the pure core says its
commands write (`core.rows.writes`), among them the units of work it queues (a
model call, a tool run). A process that hosts the agent and has a free slot
claims that work in the same commit, with a lease; the rest waits in the queue
for any hosting process's pickup. Each claimed unit is carried out apart from
every other execution's, at most `max_concurrency` at a time, so a slow tool or
model call delays nothing but its own execution: timers and pickups never wait
behind it. The caller who fed the event (`run`, `signal`) waits for its
execution to rest anyway, so it carries the first unit out itself, and the unit
each commit queues next; other units run in tasks, each also going on to the
unit its own commit queues.

A holder renews its leases while it works (`renew_every`). A unit whose lease
runs out is taken over by whoever claims it next, on any host: a model call is
made again; a tool run is not (the handler may have run), the model is told its
outcome is unknown, with the idempotency key. The result of a unit is recorded
in the commit that completes it, guarded by (id, holder), so a holder that lost
its lease cannot record over its successor.

Every failure while carrying out claimed work becomes an event (`tool_failed`,
`model_failed`) or a bounded retry with backoff; when even that cannot be
recorded, the lease lapses and another worker, or a restart, takes over. So a
live execution always has queued or leased work, a pending request, or rests.

Races between processes are settled by the store's version check: on `Conflict`
the engine reloads and decides again, so a second decision for one request is
refused by `decide()` itself, never by luck of timing.

The engine lives here, not in `core`, because it awaits ports; `core` stays
pure and is all the engine decides with.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import inspect
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

from clearance.adapters.clock import SystemClock
from clearance.core.agent import AgentSpec
from clearance.core.commands import CallModel, RunTool
from clearance.core.deadlines import BadDeadline, parse_deadline
from clearance.core.decide import decide
from clearance.core.errors import ClearanceError, Refusal, RefusalCode
from clearance.core.escalation import schedule
from clearance.core.events import (
    Approved,
    Event,
    Extended,
    ModelFailed,
    ModelReplied,
    Reassessment,
    Redefined,
    Rejected,
    Started,
    StopRequested,
    Ticket,
    TimerFired,
    ToolFailed,
    ToolFinished,
)
from clearance.core.execution import (
    AWAITING,
    EXECUTING,
    PENDING,
    QUEUED,
    RESTING,
    STOPPED,
    ApprovalRequest,
    Execution,
    Usage,
)
from clearance.core.json_value import NotJSON, check_text, strict
from clearance.core.policy import (
    DENY,
    EXECUTION,
    HostRequired,
    PolicyError,
    SessionGrant,
    Verdict,
    compile_condition,
    evaluate,
)
from clearance.core.reviewers import APP, DECIDE, EXTEND, REVIEWER, Identity
from clearance.core.rows import writes
from clearance.core.schema import with_defaults
from clearance.definition import HostedAgent
from clearance.ports.clock import Clock
from clearance.ports.ids import IdSource
from clearance.ports.model import ModelCallError, ModelRequest
from clearance.ports.store import Claim, ClaimRequest, Conflict, LeaseLost, Store, Work
from clearance.ports.tools import ToolContext

log = logging.getLogger("clearance")

SIGNALS = ("approve", "reject", "stop", "extend")
DEFAULT_MAX_CONCURRENCY = 32
DEFAULT_LEASE = 30.0  # seconds a claim lasts unless renewed
DEFAULT_RENEW_EVERY = 10.0  # seconds between renewals while working
_MAX_CONFLICTS = 100
# Recording a result: attempts before the work is left to lapse, and the backoff.
_RECORD_TRIES = 6
_RECORD_BACKOFF = 0.05
# A timer whose execution cannot be loaded is tried again this much later, so it
# never holds up the timers due after it.
TIMER_RETRY = timedelta(seconds=60)
# Units of work begun here and waiting to be carried out, each with the state the
# commit that queued it made (None: load it).
Carried = list[tuple[Work, Execution | None]]
# Refusals that mean the result is simply no longer wanted (the execution moved on).
_STALE = frozenset({"stale_model_reply", "stale_tool_result", "wrong_state"})
# How often a caller waiting for an execution to rest looks at the store, in case
# the work was done by another process.
_SETTLE_LOOK = 0.2


def new_worker_id() -> str:
    """A random name per process and instance: nothing about liveness is read from it."""
    return f"w-{secrets.token_hex(8)}"


class BrokenStep(ClearanceError):
    """decide() raised something other than a refusal: a bug, or input it cannot hold."""


class Engine:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        ids: IdSource,
        worker: str,
        agents: Mapping[str, HostedAgent],
        *,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        lease: float = DEFAULT_LEASE,
        renew_every: float = DEFAULT_RENEW_EVERY,
        lease_clock: Clock | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ClearanceError(f"max_concurrency must be 1 or more, got {max_concurrency}")
        if not 0 < renew_every < lease:
            raise ClearanceError(
                f"renew_every ({renew_every} s) must be above 0 and below lease ({lease} s), "
                "so a lease is renewed before it runs out"
            )
        self.store = store
        self.clock = clock
        self.ids = ids
        self.worker = worker
        self.agents = agents
        self.max_concurrency = max_concurrency
        self.lease = timedelta(seconds=lease)
        self.renew_every = renew_every
        # Leases are about processes being alive, so they run on real time even when
        # tests move the approval clock by hand.
        self.lease_clock: Clock = lease_clock or SystemClock()
        # Called when a step committed deliveries (approval requests to send out): the
        # runtime wakes its delivery relay rather than leave them to its next poll.
        self.on_deliveries: Callable[[], None] = lambda: None
        self._carrying: dict[int, Work] = {}  # work carried out here now, by id
        self._tasks: set[asyncio.Task[Execution | None]] = set()  # those carrying work
        self._held: dict[int, Claim] = {}  # leases to renew
        # Work cut short by a cancellation before its tool started: close() hands it back.
        self._cut_short: dict[int, Claim] = {}
        # Work ids whose completing commit is on its way: a renewal that misses one of
        # them has raced that commit, not lost the lease.
        self._completing: set[int] = set()
        self._started_tools: set[int] = set()  # work ids whose handler was called
        self._reserved = 0  # slots promised to a commit in flight
        # Units whose outcome is done and waiting for its commit: their slots are free for
        # the work that commit (or another in its group) queues.
        self._recording = 0
        self._committing = 0  # steps waiting for their commit
        # Calls (run, signal, ...) under way, counted by the app from when each is
        # scheduled: a caller carries its execution's work without a task of its own,
        # so this is how a commit knows other executions' steps may come this turn.
        self.callers = 0
        self._heart: asyncio.Task[None] | None = None
        self._waiters: dict[str, set[asyncio.Future[Execution | None]]] = {}
        self._working: dict[str, int] = {}  # execution id -> units carried out here now
        self._wake = asyncio.Event()
        self._starved = False  # work of ours was left queued for want of a free slot
        # Sync handlers run here, no more at once than the concurrency bound.
        self._executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="clearance-tool")
        # The specs this process recorded as its agents' current definitions, by tag.
        self._defined: dict[str, AgentSpec] = {}
        # Agents this process redefined: their pending requests are judged again, a
        # page at a time (the last request id judged; None: from the first).
        self._sweeps: dict[str, str | None] = {}

    @property
    def free(self) -> int:
        """Slots for work this process could start now."""
        return self.max_concurrency - len(self._carrying) + self._recording - self._reserved

    # -- entry points ---------------------------------------------------------------

    async def start(
        self, tag: str, input: str, session_id: str | None, requested_by: str | None = None
    ) -> Execution:
        await self.define_agents()
        agent = self.agents.get(tag)
        if agent is None:
            known = ", ".join(sorted(self.agents)) or "none"
            raise ClearanceError(f"no agent '{tag}' is defined here (defined: {known})")
        if not isinstance(input, str):
            raise ClearanceError(f"input must be a string, got {type(input).__name__}")
        if requested_by is not None and not isinstance(requested_by, str):
            raise ClearanceError(
                "requested_by must be a person's name (a string), got"
                f" {type(requested_by).__name__}"
            )
        event = Started(self.ids.execution_id(), input, self.clock.now(), session_id, requested_by)
        return await self._drive(Execution(agent=agent.spec), event)

    async def signal(
        self,
        execution_id: str,
        signal: str,
        *,
        request_id: str | None = None,
        modified_params: dict[str, Any] | None = None,
        reason: str | None = None,
        by: str | Identity | None = None,
        settle: bool = True,
        remember: str | None = None,
        remember_when: str | None = None,
        digest: str | None = None,
        until: datetime | str | None = None,
    ) -> Execution:
        """`by`: who decides; a plain name is the embedding code's word for it (`app`),
        an `Identity` says how it is known, and a `reviewer` must be granted the
        request's agent and tool (for a stop, those of every pending request).
        `settle=False`: return once the signal is recorded; the work it queues runs in
        tasks of this process (or another's)."""
        if signal not in SIGNALS:
            raise Refusal(
                "unknown_signal", f"unknown signal {signal!r}; accepted: {', '.join(SIGNALS)}"
            )
        # Read before anything is loaded, as the HTTP API reads the body: a bad deadline
        # is refused the same wherever it comes from, whatever the request.
        deadline = _deadline(until) if signal == "extend" else None
        who = Identity(by, APP) if isinstance(by, str) else by
        name, kind = (who.name, who.kind) if who is not None else (None, None)
        await self.define_agents()
        ex = await self._load(execution_id)
        if signal == "stop":
            for pending in ex.pending_approvals:
                _check_granted(who, ex, pending)
            event: Event = StopRequested(self.clock.now(), name, reason, kind)
        else:
            if not request_id:
                raise Refusal(
                    "missing_request_id", f"signal '{signal}' needs request_id (the 'apr-…' id)"
                )
            request = ex.request(request_id)
            action = EXTEND if signal == "extend" else DECIDE
            if request is not None:
                _check_granted(who, ex, request, action)
            ex = await self._expire(ex, request_id)
            # Decided under the agent as now defined: a request its new policy decides,
            # or that no longer fits it, is not a person's to decide any more.
            ex = await self.rejudge(ex)
            request = ex.request(request_id)
            # A reviewer deciding with grants delegated to them: the audit says for whom.
            behalf = (
                who.acting_for(ex.agent_tag, request.tool, action)
                if who is not None and request is not None
                else None
            )
            if deadline is not None:
                event = Extended(request_id, deadline, self.clock.now(), name, kind, behalf)
            elif until is not None:
                raise Refusal(RefusalCode.INVALID_EVENT, "until= goes with the 'extend' signal")
            elif signal == "approve":
                verdict = self._edit_verdict(ex, request, modified_params)
                grant = _session_grant(request, remember, remember_when)
                event = Approved(
                    request_id,
                    self.clock.now(),
                    name,
                    modified_params,
                    kind,
                    verdict,
                    grant,
                    digest,
                    behalf,
                    # A voter's groups count only towards a quorum: the request's, or
                    # one an edit may ask for (an app name's costs a registry read).
                    await self._groups(who, behalf)
                    if request is not None and (request.needs_quorum or modified_params)
                    else (),
                )
            elif remember is not None or remember_when is not None:
                raise Refusal(RefusalCode.INVALID_REMEMBER, "remember= goes with an approval")
            else:
                event = Rejected(request_id, self.clock.now(), name, reason, kind, digest, behalf)
        if not settle:
            return await self._feed(ex, event)
        return await self._drive(ex, event)

    def _edit_verdict(
        self, ex: Execution, request: ApprovalRequest | None, modified: Any
    ) -> Verdict | None:
        """The agent's policy on an edited call (the request's parameters with the
        changes merged in, as the tool would get them); None without a policy or an
        edit, or for an edit decide() refuses anyway."""
        policy = ex.agent.policy
        if policy is None or request is None or not isinstance(modified, dict):
            return None
        hosted = self.agents.get(ex.agent_tag)
        try:
            return evaluate(
                policy,
                agent=ex.agent_tag,
                tool=request.tool,
                args={**request.effective_parameters(), **modified},
                predicates=hosted.predicates if hosted is not None else None,
            )
        except HostRequired as err:
            raise Refusal(
                RefusalCode.HOST_REQUIRED,
                f"{err}; decide this edit where agent '{ex.agent_tag}' runs, or approve"
                " the request unchanged",
            ) from None

    async def define_agents(self) -> None:
        """Record the agents defined here as their current definitions (once per
        definition). Redefining one starts a sweep that judges its pending requests again."""
        for tag, hosted in list(self.agents.items()):
            if self._defined.get(tag) is hosted.spec:
                continue
            previous = await self.store.current_agent(tag)
            await self.store.define_agent(hosted.spec)
            self._defined[tag] = hosted.spec
            if previous is not None and previous != hosted.spec:
                self._sweeps[tag] = None

    async def rejudge(
        self, ex: Execution, currents: dict[str, AgentSpec | None] | None = None
    ) -> Execution:
        """`ex` with its pending requests judged under its agent's current definition,
        if the agent was defined again since they were made (a redeploy): kept, decided
        by the new policy, or invalidated (the `redefined` event). Raises Refusal
        (host_required) where the new policy needs a Python predicate this process does
        not have. `currents`: definitions a sweep already read, by tag (filled here), so
        one pass over many requests reads each agent's once."""
        if not ex.pending_approvals:
            return ex
        # Otherwise read each time, never cached: a decision a moment after another
        # process's redeploy must not be applied under the rules it replaced.
        if currents is None:
            current = await self.store.current_agent(ex.agent_tag)
        elif ex.agent_tag in currents:
            current = currents[ex.agent_tag]
        else:
            current = currents[ex.agent_tag] = await self.store.current_agent(ex.agent_tag)
        if current is None or current is ex.agent or current == ex.agent:
            return ex
        event = Redefined(current, self.clock.now(), self._reassess(ex, current))
        try:
            # Recorded, not carried out here and now: the work it queues (a tool the new
            # policy allows, the model told of an invalidated call) runs in tasks, so a
            # timer sweep or a decision never waits behind it.
            return await self._feed(ex, event)
        except Refusal as refusal:
            if refusal.code == RefusalCode.HOST_REQUIRED:
                raise
            return await self._load(ex.id)  # judged by another process in the meantime

    async def _groups(self, who: Identity | None, behalf: str | None) -> tuple[str, ...]:
        """The groups a voter stands for: a reviewer's own (and, acting for a delegator,
        the delegator's); the app's by= name, those of the registered reviewer of that
        name, if there is one. What a quorum's groups count."""
        if who is None or who.kind not in (REVIEWER, APP):
            return ()
        reviewer = who.reviewer if who.kind == REVIEWER else await self.store.reviewer(who.name)
        groups = list(reviewer.groups) if reviewer is not None else []
        for delegator in who.delegators:
            if delegator.name == behalf:
                groups += [g for g in delegator.groups if g not in groups]
        return tuple(groups)

    def _reassess(self, ex: Execution, current: AgentSpec) -> tuple[Reassessment, ...]:
        policy = current.policy
        if policy is None:
            return ()
        hosted = self.agents.get(ex.agent_tag)
        # A predicate is the hosted agent's: it judges only for the definition it came with.
        predicates = hosted.predicates if hosted is not None and hosted.spec == current else None
        judged = []
        for call in ex.calls:
            if call.status not in (QUEUED, AWAITING) or current.tool(call.tool) is None:
                continue
            # A request's call as it stands: a vote towards a quorum may have changed it.
            request = ex.request(call.request_id) if call.status == AWAITING else None
            try:
                verdict = evaluate(
                    policy,
                    agent=ex.agent_tag,
                    tool=call.tool,
                    args=request.effective_parameters() if request else call.parameters,
                    predicates=predicates,
                )
            except HostRequired as err:
                raise Refusal(
                    RefusalCode.HOST_REQUIRED,
                    f"{err}; agent '{ex.agent_tag}' was defined again, and its requests can"
                    " be judged under the new definition only where it runs",
                ) from None
            judged.append(Reassessment(call.tool_use_id, verdict))
        return tuple(judged)

    async def sweep_redefined(self, limit: int = 50) -> int:
        """Judge again up to `limit` pending requests of each agent this process
        redefined; returns how many it looked at. A request is also judged again when
        it is next decided or times out, wherever that happens, so a sweep cut short
        loses nothing."""
        await self.define_agents()
        looked = 0
        for tag, after in list(self._sweeps.items()):
            page = await self.store.pending(agent_tag=tag, limit=limit, after=after)
            currents: dict[str, AgentSpec | None] = {}
            for request in page:
                looked += 1
                try:
                    ex = await self.store.load(request.execution_id)
                    if ex is not None:
                        await self.rejudge(ex, currents)
                except Refusal as refusal:
                    log.warning("request %s was not judged again: %s", request.request_id, refusal)
                except Exception:
                    # One execution that cannot be moved must not hold up the sweep; its
                    # request is judged when it is next decided or times out.
                    log.exception("request %s could not be judged again", request.request_id)
            if len(page) < limit:
                del self._sweeps[tag]
            else:
                self._sweeps[tag] = page[-1].request_id
        return looked

    async def _drive(self, ex: Execution, event: Event) -> Execution:
        """Feed `event`, carry the work it queues for this execution here, in the
        caller's task (unit after unit, as each commit queues the next), and settle:
        the caller waits for that work anyway, and a task per unit costs more."""
        carried: Carried = []
        new = await self._feed(ex, event, carry=carried)
        last = await self._chain(carried)
        return await self.settle(last if last is not None and last.seq > new.seq else new)

    async def settle(self, ex: Execution) -> Execution:
        """`ex` once it rests (awaiting approval, or finished). Where this process does
        not host the agent, `ex` as it is: the hosting process carries on."""
        loop = asyncio.get_running_loop()
        while ex.status not in RESTING and self._hosts(ex):
            # Set to the resting state by the commit that makes it rest (no load), or
            # to None when it is time to look in the store.
            rested: asyncio.Future[Execution | None] = loop.create_future()
            self._waiters.setdefault(ex.id, set()).add(rested)
            look = loop.call_later(_SETTLE_LOOK, _look, rested)
            try:
                if not self._working.get(ex.id):
                    # Nothing of it runs here: it was queued while every slot was busy,
                    # or no background loop runs. Carry it out from here.
                    ex = await self._load(ex.id)
                    if ex.status in RESTING:
                        break
                    await self.pickup()
                got = await rested
            finally:
                look.cancel()
                waiting = self._waiters.get(ex.id)
                if waiting is not None:
                    waiting.discard(rested)
                    if not waiting:
                        del self._waiters[ex.id]
            # None: another process may have done the work; look. An older state: a
            # commit of an earlier step that returned late (its caller was slow to resume).
            ex = got if got is not None and got.seq >= ex.seq else await self._load(ex.id)
        return ex

    async def fire_due_timers(self, limit: int = 1000) -> list[Execution]:
        """Fire every approval timer due at the clock's now; returns the executions that
        timed a request out, as the firing left them (their work goes on in tasks)."""
        await self.define_agents()
        fired: list[Execution] = []
        now = self.clock.now()
        while True:
            due = await self.store.claim_timers(now, now + self.lease, limit)
            currents: dict[str, AgentSpec | None] = {}  # read once per agent per batch
            for timer in due:
                try:
                    ex = await self.store.load(timer.execution_id)
                    if ex is None:
                        await self.store.drop_timer(timer)
                        continue
                    with contextlib.suppress(Refusal):  # host_required: it times out as it is
                        ex = await self.rejudge(ex, currents)
                    at = max(now, timer.due_at)
                    fired.append(await self._feed(ex, TimerFired(timer.request_id, at)))
                except Refusal as refusal:
                    request = ex.request(timer.request_id) if ex is not None else None
                    if refusal.code == "not_due" and request is not None:
                        # Early (another clock, a redefinition moved things): to the next
                        # thing due, a reminder or stage, else the deadline.
                        later = schedule(request, ex.agent.tool(request.tool))  # type: ignore[union-attr]
                        coming = [t for t in later if t > now] + [request.timeout]
                        await self.store.postpone_timer(timer, min(coming))
                    else:  # decided or cancelled in the meantime: that decision stands
                        await self.store.drop_timer(timer)
                except Exception:
                    # One execution that cannot be loaded or moved must not hold up the
                    # timers due after it.
                    log.exception(
                        "approval timer of request %s (execution %s) could not fire; "
                        "trying again in %s",
                        timer.request_id,
                        timer.execution_id,
                        TIMER_RETRY,
                    )
                    with contextlib.suppress(Exception):
                        await self.store.postpone_timer(timer, now + TIMER_RETRY)
            if len(due) < limit:
                return fired

    async def pickup(self) -> int:
        """Claim what this process can start now: work queued by processes that do not
        host the agent (the CLI, a reviewer's app), work queued while every slot was
        busy, and work whose holder stopped renewing its lease."""
        await self.define_agents()
        free = self.free
        if free <= 0 or not self.agents:
            return 0
        now = self.lease_clock.now()
        taken = await self.store.claim_work(
            list(self.agents), self.worker, now, now + self.lease, free, skip=list(self._carrying)
        )
        for work in taken:
            self._begin(work)
            self._in_task(work, None)
        return len(taken)

    async def drain(self) -> int:
        """Carry out everything this process can claim now, and the work that follows
        from it, until it holds nothing: how many units it claimed by pickup. For
        processes without a background loop (scripts, tests)."""
        claimed = 0
        while True:
            claimed += await self.pickup()
            if not self._tasks:
                return claimed
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def wait_for_work(self, seconds: float) -> None:
        """Until another process may have queued work, a slot frees up, or `seconds`."""
        if self._wake.is_set():
            self._wake.clear()
            return
        woken = asyncio.ensure_future(self._wake.wait())
        looked = asyncio.ensure_future(self.store.wait_for_work(seconds))
        try:
            await asyncio.wait({woken, looked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in (woken, looked):
                waiting.cancel()
            await asyncio.gather(woken, looked, return_exceptions=True)
        self._wake.clear()

    async def close(self) -> None:
        """Stop carrying out work. Work not yet started goes back to the queue; a tool
        that had started keeps its lease, which lapses, and its successor reports the
        outcome unknown rather than run it again."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._heart is not None:
            self._heart.cancel()
            await asyncio.gather(self._heart, return_exceptions=True)
        # Work cut short (here, or in callers' tasks the app cancelled first), and work
        # held by callers still at it: none of it started a tool.
        back = self._cut_short | {
            i: c for i, c in self._held.items() if i not in self._started_tools
        }
        for claim in back.values():
            with contextlib.suppress(Exception):
                await self.store.release(claim)
        self._cut_short.clear()
        self._held.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the loop ---------------------------------------------------------------------

    async def _load(self, execution_id: str) -> Execution:
        ex = await self.store.load(execution_id)
        if ex is None:
            raise Refusal("unknown_execution", f"no execution '{execution_id}'")
        return ex

    async def _expire(self, ex: Execution, request_id: str) -> Execution:
        """A decision that arrives after the deadline finds the request timed out, even if
        no timer sweep has run yet: time out first, then let decide() refuse it."""
        request = ex.request(request_id)
        now = self.clock.now()
        if request is None or request.status != PENDING or now < request.timeout:
            return ex
        try:
            # Rest first, so whoever sent the late decision finds the model told.
            return await self._drive(ex, TimerFired(request_id, now))
        except Refusal:
            return await self._load(ex.id)

    def _hosts(self, ex: Execution) -> bool:
        return ex.agent_tag in self.agents

    async def _feed(
        self,
        ex: Execution,
        event: Event,
        done: Claim | None = None,
        carry: Carried | None = None,
    ) -> Execution:
        """Decide `event` and commit it; start the work it queues that we can claim.
        `done`: the work whose result `event` is. `carry`: an empty list takes the
        first unit we claimed, for the caller to carry out; the rest start in tasks."""
        for _ in range(_MAX_CONFLICTS):
            try:
                new, commands = decide(ex, event)
            except Refusal:
                raise
            except Exception as err:
                raise BrokenStep(
                    f"execution {ex.id}: decide() failed on '{event.TAG}': "
                    f"{type(err).__name__}: {err}"
                ) from err
            step = writes(new, event, commands)
            n = 0
            if step.work and self._hosts(ex):
                n = max(0, min(len(step.work), self.free))
            # A stop's cancelled tool runs are claimed too, by any process: closing one
            # needs no handler, and must not wait for the host.
            wanted = n or step.drop_queued_work
            claim = ClaimRequest(self.worker, self._lease_until(), n) if wanted else None
            # No other caller, no task at work here, nobody waiting, no other step
            # committing: no company to wait for to share a transaction with.
            busy = max(self.callers, 1) + len(self._tasks) + len(self._waiters)
            alone = busy <= 1 and not self._committing
            self._reserved += n
            self._committing += 1
            try:
                with self._finishing(done):
                    queued = await self.store.commit(
                        step, expected_seq=ex.seq, claim=claim, done=done, alone=alone
                    )
            except Conflict:
                if isinstance(event, Started):
                    raise
                ex = await self._load(ex.id)
                continue
            finally:
                self._reserved -= n
                self._committing -= 1
            if step.deliveries:
                self.on_deliveries()
            for work in queued:
                if work.holder == self.worker and not work.cancelled:
                    self._begin(work)
                    if carry is not None and not carry:
                        carry.append((work, new))
                    else:
                        self._in_task(work, new)
            if self._hosts(ex) and sum(not w.cancelled for w in queued) > n:
                self._starved = True  # queued for want of a slot: pick it up when one frees
                self._wake.set()
            for work in queued:
                if work.cancelled and work.holder == self.worker:
                    # Close the call in the history: approved, and never run. If that
                    # cannot be recorded, the lease lapses and a taker closes it.
                    new = await self._carry(work, new, in_slot=False) or new
            if new.status in RESTING:
                for rested in self._waiters.get(new.id, ()):
                    if not rested.done():
                        rested.set_result(new)
            return new
        raise ClearanceError(f"execution {ex.id} kept changing under {_MAX_CONFLICTS} attempts")

    def _lease_until(self) -> datetime:
        return self.lease_clock.now() + self.lease

    def _begin(self, work: Work) -> None:
        """`work`, claimed by us, is carried out here from now: it takes a slot, and its
        lease is renewed until `_finished`."""
        self._carrying[work.id] = work
        self._held[work.id] = work.claim
        self._working[work.execution_id] = self._working.get(work.execution_id, 0) + 1
        if self._heart is None or self._heart.done():
            self._heart = asyncio.create_task(self._renew_leases(), name="clearance-leases")

    def _in_task(self, work: Work, ex: Execution | None) -> None:
        """Carry `work` (begun) out in a task of its own, and the work that follows it;
        `ex`: the state the commit that queued it made, when this process made it."""
        task = asyncio.create_task(self._chain([(work, ex)]), name=f"clearance-work-{work.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _chain(self, carried: Carried) -> Execution | None:
        """Carry out the begun units in `carried`, and each unit that a commit of theirs
        queues and we claim, one after another; the last state recorded here."""
        last = None
        try:
            while carried:
                work, ex = carried.pop()
                try:
                    got = await self._carry(work, ex, carry=carried)
                except asyncio.CancelledError:
                    if work.id not in self._started_tools and work.id in self._held:
                        self._cut_short[work.id] = work.claim
                    raise
                finally:
                    self._finished(work)
                last = got or last
        finally:
            for work, _ in carried:  # cancelled before they started
                self._cut_short[work.id] = work.claim
                self._finished(work)
        return last

    def _finished(self, work: Work) -> None:
        self._carrying.pop(work.id, None)
        self._held.pop(work.id, None)
        self._started_tools.discard(work.id)
        left = self._working.get(work.execution_id, 1) - 1
        if left:
            self._working[work.execution_id] = left
        else:
            self._working.pop(work.execution_id, None)
        if self._starved:  # a slot is free, and work waits for one
            self._starved = False
            self._wake.set()

    async def _renew_leases(self) -> None:
        while self._held:
            await asyncio.sleep(self.renew_every)
            claims = list(self._held.values())
            try:
                kept = set(await self.store.renew(claims, self._lease_until()))
            except Exception:
                log.exception("could not renew %d work leases; will try again", len(claims))
                continue
            for claim in claims:
                # One that finished while we renewed is not lost, just done.
                if claim in kept or claim.id not in self._held or claim.id in self._completing:
                    continue
                del self._held[claim.id]  # renewing it again cannot bring it back
                log.warning(
                    "work %s: lease lost (taken over after it ran out); its result "
                    "will not be recorded by this worker",
                    claim.id,
                )

    @contextlib.contextmanager
    def _finishing(self, claim: Claim | None) -> Iterator[None]:
        """Around a commit that completes `claim`'s work: done, it needs no renewal."""
        if claim is None:
            yield
            return
        self._completing.add(claim.id)
        try:
            yield
            self._held.pop(claim.id, None)
        finally:
            self._completing.discard(claim.id)

    async def _carry(
        self,
        work: Work,
        ex: Execution | None,
        *,
        in_slot: bool = True,
        carry: Carried | None = None,
    ) -> Execution | None:
        """Carry out one unit of work and record its outcome; the state that left, if
        this worker recorded one. `in_slot`: it runs in one of our slots. `carry`: as
        `_feed` takes it, for the work the outcome's commit queues."""
        try:
            if ex is None or isinstance(work.command, RunTool):
                # A tool run looks at the stored state last thing before it starts, so a
                # stop committed elsewhere a moment ago is honoured.
                ex = await self.store.load(work.execution_id)
            event = None if ex is None else await self._outcome(ex, work)
            if ex is None or event is None:
                with self._finishing(work.claim):
                    await self.store.complete(work.claim)
                return None
            return await self._record(ex, event, work.claim, in_slot, carry)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "work %s of execution %s could not be carried out; its lease will lapse "
                "and another worker will take it over",
                work.id,
                work.execution_id,
            )
            return None

    async def _outcome(self, ex: Execution, work: Work) -> Event | None:
        command = work.command
        agent = self.agents.get(ex.agent_tag)  # None: redefined away since it was claimed
        if isinstance(command, CallModel):
            if agent is None or not ex.awaiting_model or command.turn != ex.model_turn:
                return None
            return await self._call_model(agent, ex, command.turn)
        call = ex.call(command.tool_use_id)
        if call is None or call.status != EXECUTING:
            return None
        if work.cancelled or (ex.status == STOPPED and work.previous_holder is None):
            return ToolFailed(
                command.tool_use_id,
                "not run: the execution was stopped before the tool started",
                self.clock.now(),
            )
        if work.previous_holder is not None:
            # At most once beats at least once for refunds and deletions.
            return ToolFailed(
                command.tool_use_id,
                "the worker running this tool stopped before it reported a result; it "
                "was not run again, so it may or may not have taken effect "
                f"(idempotency key {command.idempotency_key})",
                self.clock.now(),
            )
        if agent is None:
            return None
        self._started_tools.add(work.id)
        return await self._run_tool(agent, ex, command)

    async def _record(
        self,
        ex: Execution,
        event: Event,
        claim: Claim,
        in_slot: bool,
        carry: Carried | None = None,
    ) -> Execution | None:
        """Commit `event` as the result of the work `claim` holds: a refusal ends the
        work, a broken step becomes a failure event, a store error is retried with
        backoff; past that the lease lapses and another worker takes over."""
        delay = _RECORD_BACKOFF
        for attempt in range(_RECORD_TRIES):
            try:
                return await self._feed_result(ex, event, claim, in_slot, carry)
            except Refusal as refusal:
                failed = _failure(event, f"the result could not be used: {refusal}")
                if refusal.code not in _STALE and failed is not event:
                    # A reply no tool_result can answer, a result decide() will not take:
                    # the run fails (or the model hears of it) rather than strand.
                    event = failed
                    continue
                log.info("execution %s: result dropped: %s", ex.id, refusal)
                with self._finishing(claim):
                    await self.store.complete(claim)
                return None
            except LeaseLost as lost:
                log.warning("execution %s: result not recorded: %s", ex.id, lost)
                return None
            except BrokenStep as broken:
                failed = _failure(event, str(broken))
                if failed is event:
                    raise
                log.error("%s; recorded as a failure instead", broken)
                event = failed
                continue
            except Exception as err:
                if attempt == _RECORD_TRIES - 1:
                    raise
                log.warning(
                    "execution %s: could not record '%s' (%s: %s); trying again in %.2f s",
                    ex.id,
                    event.TAG,
                    type(err).__name__,
                    err,
                    delay,
                )
                await asyncio.sleep(delay)
                delay *= 2
                with contextlib.suppress(Exception):  # the next attempt says what is wrong
                    ex = await self._load(ex.id)
        log.error(
            "execution %s: '%s' could not be recorded in %d tries; the lease will lapse and "
            "another worker will take the work over",
            ex.id,
            event.TAG,
            _RECORD_TRIES,
        )
        return None

    async def _feed_result(
        self,
        ex: Execution,
        event: Event,
        claim: Claim,
        in_slot: bool,
        carry: Carried | None,
    ) -> Execution:
        """`_feed` a unit's result. The unit's slot is free meanwhile: its work is done,
        so the work this commit, or another in its group, queues may take the slot."""
        freed = 1 if in_slot else 0
        self._recording += freed
        try:
            return await self._feed(ex, event, done=claim, carry=carry)
        finally:
            self._recording -= freed

    async def _call_model(self, agent: HostedAgent, ex: Execution, turn: int) -> Event:
        request = ModelRequest(
            model=ex.agent.model,
            system=ex.agent.system_prompt,
            messages=[dict(m) for m in ex.messages],
            tools=[
                {"name": t.tag, "description": t.description, "input_schema": t.input_schema}
                for t in ex.agent.tools
            ],
            execution_id=ex.id,
            turn=turn,
        )
        try:
            reply = await agent.model.reply(request)
        except Exception as err:  # the model port's failure is the execution's, not ours
            log.warning("execution %s: model call failed: %s", ex.id, err)
            cause = str(err) if isinstance(err, ModelCallError) else f"{type(err).__name__}: {err}"
            return ModelFailed(turn, f"model call failed: {cause}", self.clock.now())
        # decide() checks the reply (content blocks, strict JSON, stop_reason) and refuses
        # what it cannot hold; _record then fails the run with its reason.
        content: Any = getattr(reply, "content", None)
        stop_reason: Any = getattr(reply, "stop_reason", None)
        blocks = tuple(content) if isinstance(content, list | tuple) else ()
        usage = getattr(reply, "usage", None)
        tickets = []
        for block in blocks:
            if isinstance(block, dict) and block.get("type") == "tool_use":
                params = block.get("input")
                name = str(block.get("name", ""))
                try:
                    reason = str(agent.reason(name, params if isinstance(params, dict) else {}))
                    check_text(reason, "confirmation_message")
                except Exception as err:
                    reason = (
                        f"Calling '{name}' requires approval ({type(err).__name__} in "
                        "confirmation_message)"
                    )
                args = _proposed_args(ex, name, params)
                verdict = self._proposal_verdict(agent, ex, name, args)
                tickets.append(
                    Ticket(
                        str(block.get("id", "")),
                        self.ids.request_id(),
                        reason,
                        verdict,
                        _covering_grant(ex, name, args, verdict),
                    )
                )
        return ModelReplied(
            turn=turn,
            content=blocks if isinstance(content, list | tuple) else content,
            stop_reason=stop_reason,
            at=self.clock.now(),
            usage=usage if isinstance(usage, Usage) else Usage(),
            tickets=tuple(tickets),
        )

    @staticmethod
    def _proposal_verdict(
        agent: HostedAgent, ex: Execution, tool: str, args: dict[str, Any] | None
    ) -> Verdict | None:
        """The execution's policy on a proposed call (`_proposed_args`); None without a
        policy, or where decide() answers the call before any policy matters."""
        policy = ex.agent.policy
        if policy is None or args is None:
            return None
        try:
            return evaluate(
                policy, agent=ex.agent_tag, tool=tool, args=args, predicates=agent.predicates
            )
        except HostRequired as err:  # redefined without the predicate since it started
            return Verdict(DENY, policy.version, policy.enforce, reason=str(err), failed=str(err))

    async def _run_tool(self, agent: HostedAgent, ex: Execution, command: RunTool) -> Event:
        handler = agent.handlers.get(command.tool)
        if handler is None:
            return ToolFailed(
                command.tool_use_id,
                f"no handler for tool '{command.tool}' in this process",
                self.clock.now(),
            )
        ctx = ToolContext(
            execution_id=ex.id,
            agent_tag=ex.agent_tag,
            product=ex.agent.product,
            session_id=ex.session_id,
            tool=command.tool,
            tool_use_id=command.tool_use_id,
            idempotency_key=command.idempotency_key,
            request_id=command.request_id,
            approved_by=command.approved_by,
        )
        # A copy: a handler that changes its parameters must not change the stored state.
        params = copy.deepcopy(dict(command.parameters))
        try:
            if inspect.iscoroutinefunction(handler):
                result = await handler(ctx, params)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(
                    self._executor, functools.partial(handler, ctx, params)
                )
                if inspect.isawaitable(result):
                    result = await result
        except Exception as err:
            log.warning(
                "execution %s: tool '%s' (tool_use %s, request %s) raised %s: %s",
                ex.id,
                command.tool,
                command.tool_use_id,
                command.request_id,
                type(err).__name__,
                err,
            )
            return ToolFailed(command.tool_use_id, f"{type(err).__name__}: {err}", self.clock.now())
        try:
            # Anything without a JSON spelling (a datetime, a Decimal) becomes its text.
            output = strict(result, f"the result of tool '{command.tool}'", default=str)
        except NotJSON as err:
            log.warning("execution %s: %s", ex.id, err)
            return ToolFailed(
                command.tool_use_id,
                f"it ran, but its result cannot be recorded ({err}); do not assume it "
                "had no effect",
                self.clock.now(),
            )
        return ToolFinished(command.tool_use_id, output, self.clock.now())


def _look(rested: asyncio.Future[Execution | None]) -> None:
    if not rested.done():
        rested.set_result(None)


def _failure(event: Event, error: str) -> Event:
    """The failure event standing for a result that cannot be recorded as it is."""
    if isinstance(event, ModelReplied):
        return ModelFailed(event.turn, error, event.at)
    if isinstance(event, ToolFinished):
        return ToolFailed(event.tool_use_id, error, event.at)
    return event


def _proposed_args(ex: Execution, tool: str, params: Any) -> dict[str, Any] | None:
    """A proposed call's arguments with its tool's defaults filled in (what would run),
    as policies and grants judge it; None for a call decide() answers before either
    matters (an unknown tool, no object, a schema that cannot be evaluated)."""
    spec = ex.agent.tool(tool)
    if spec is None or not isinstance(params, dict):
        return None
    try:
        return with_defaults(spec.input_schema, params)
    except Exception:  # decide() answers the schema's error
        return None


def _covering_grant(
    ex: Execution, tool: str, args: dict[str, Any] | None, verdict: Verdict | None
) -> int | None:
    """The first of the execution's session grants that covers a proposed call (its
    index), unless the policy denies the call; None where none does."""
    if not ex.grants or args is None:
        return None
    if verdict is not None and verdict.applied == DENY:
        return None  # a deny rule wins over a grant
    for index, grant in enumerate(ex.grants):
        if grant.covers(ex.agent_tag, tool, args):
            return index
    return None


def _session_grant(
    request: ApprovalRequest | None, remember: Any, when: Any
) -> SessionGrant | None:
    """What `remember=` asks for, checked; decide() fills in who and when."""
    if remember is None and when is None:
        return None
    if remember != EXECUTION:
        raise Refusal(
            RefusalCode.INVALID_REMEMBER,
            f"remember takes 'execution' (allow this tool for the rest of this execution),"
            f" got {remember!r}",
        )
    if when is not None:
        try:
            compile_condition(when)
        except PolicyError as err:
            raise Refusal(RefusalCode.INVALID_REMEMBER, f"remember_when: {err}") from None
    if request is None:
        return None  # decide() refuses the unknown request
    return SessionGrant(request.tool, request.request_id, request.timestamp, None, None, when)


def _check_granted(
    who: Identity | None, ex: Execution, request: ApprovalRequest, action: str = DECIDE
) -> None:
    """A reviewer decides (or extends) only what a grant covers; refused before anything
    changes."""
    if (
        who is not None
        and who.kind == REVIEWER
        and not who.may(ex.agent_tag, request.tool, action)
        and not (action == DECIDE and _escalated_to(who, ex, request))
    ):
        granted = "granted" if action == DECIDE else f"granted '{action}' on"
        raise Refusal(
            RefusalCode.NOT_GRANTED,
            f"reviewer {who.name!r} is not {granted} '{request.tool}' of agent"
            f" '{ex.agent_tag}' (request {request.request_id})",
        )


def _escalated_to(who: Identity, ex: Execution, request: ApprovalRequest) -> bool:
    """Whether an escalation stage that has fired opened the request to `who`."""
    tool = ex.agent.tool(request.tool)
    if tool is None or request.status != PENDING:
        return False
    groups = who.reviewer.groups if who.reviewer is not None else ()
    return any(s.opens_to(who.name, groups) for s in tool.escalation[: request.stages_fired])


def _deadline(until: object) -> datetime:
    """An extension's new deadline, read as the CLI and the HTTP API read theirs."""
    try:
        return parse_deadline(until, "until=")
    except BadDeadline as err:
        raise Refusal(RefusalCode.INVALID_DEADLINE, str(err)) from None
