"""Stateful property tests: random runs of the real engine on a real SQLite file.

Hypothesis drives a `Clearance` app (FakeClock, SequentialIds, a ScriptedModel
whose turns follow a plan drawn per execution: text, gated and ungated tools,
unknown tools, invalid parameters, now and then a malformed reply) through
starts, approvals (plain, with valid and invalid modified parameters, from this
process, from another one while this one runs or while it is down), rejections,
second and stale decisions, two processes racing to decide one request, clock
moves and timer sweeps, stops, restarts and crashes inside a tool handler; stops
racing an approval made elsewhere (before the host picks the tool up, and while the
tool runs); slow tools, so several units of work are in flight at once; store commits
that fail as a locked database's do; and a process that stalls holding work, whose
leases lapse and are taken over.

The test keeps its own record of every decision it made and, after each step,
checks the guarantees of the README (G1-G7 below) against the store, the audit
log, the handlers' calls and every request the model was sent; that every
execution rests (nothing half-driven); and that replaying each execution's
stored events through `decide` reproduces it, and its audit records, exactly; that
the work queue is empty once everything is drained (and, in the middle of the rules
that leave work held, that a `running` execution always has work or a pending
request); and that every gated tool run has exactly one approval.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast
from unittest import mock

import attrs
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import clearance.engine
from clearance import Clearance, ClearanceError, HumanInLoop, Tool, ToolContext
from clearance.adapters.sqlite_store import SQLiteStore
from clearance.core.commands import AuditRecord, CallModel, RecordDecision, RunTool
from clearance.core.decide import decide
from clearance.core.events import (
    Event,
    ModelReplied,
    StopRequested,
    ToolFailed,
    ToolFinished,
)
from clearance.core.execution import (
    APPROVALS,
    APPROVED,
    APPROVED_MODIFIED,
    CANCELLED,
    PENDING,
    REJECTED,
    RESTING,
    RUNNING,
    STOPPED,
    TERMINAL,
    TIMED_OUT,
    ApprovalRequest,
    Execution,
)
from clearance.core.machine import EXECUTION_TABLE
from clearance.core.rows import writes
from clearance.ports.model import ModelRequest
from clearance.ports.store import Claim, LeaseLost, Store, Work
from clearance.testing import FakeClock, ScriptedModel, SequentialIds, text, tool_use

T = TypeVar("T")

GATED_TIMEOUT_S = {"refund": 60, "delete": 30}
UNGATED = ("lookup", "flaky")
AGENTS = {"seq": ("sequential", 20), "par": ("parallel", 3)}  # tag: (order, max_iterations)
MOVES = {(t, s, d) for t, s, dests in EXECUTION_TABLE for d in dests}

# What the model may ask for in one tool_use block; gated tools twice as often.
KINDS = ("refund", "refund", "delete", "delete", "lookup", "flaky", "unknown", "invalid")
# A turn's style: tool_use blocks alone, after some text, or (rarely) a malformed reply
# in which two tool_use blocks share one id.
STYLES = ("plain", "text") * 4 + ("twin",)
TURN = st.tuples(st.sampled_from(STYLES), st.lists(st.sampled_from(KINDS), min_size=1, max_size=3))
PLAN = st.lists(TURN, max_size=4)  # after the plan's turns the model answers in text
# A first turn that asks for at least one gated tool, so there is something to decide.
GATED_TURN = st.tuples(
    st.sampled_from(["plain", "text"]),
    st.lists(st.sampled_from(KINDS), max_size=2).flatmap(
        lambda rest: st.permutations([*rest, "refund"])
    ),
)
GATED_PLAN = st.tuples(GATED_TURN, PLAN).map(lambda p: [p[0], *p[1]])

VALID_CHANGES = {
    "refund": st.sampled_from([{"amount": 1}, {"amount": 2.5}, {"note": "partial"}, {}]),
    "delete": st.sampled_from([{"path": "/tmp/safe"}, {}]),
}
INVALID_CHANGES = {
    "refund": st.sampled_from(
        [{"amount": "lots"}, {"amount": None}, {"amout": 5}, {"path": "/x"}, ["amount", 5]]
    ),
    "delete": st.sampled_from([{"path": 3}, {"amount": 1}, {"path": None}, "rm -rf /"]),
}
DECIDERS = st.sampled_from(["alice", "bob", None])
# How a decision arrives: this process's signal() or decide(request_id), another process
# while this one runs, or another process while this one is down.
ROUTES = st.sampled_from(["signal", "request_id", "elsewhere", "while_down"])
CLOCK_STEPS = st.sampled_from([1, 15, 29, 30, 31, 59, 60, 61, 120, 301])
# Milliseconds a slow tool takes (0: at once).
DELAYS_MS = st.sampled_from([2, 5, 0])
APPROVE_MOSTLY = st.sampled_from([True, True, False])
# Attempts the engine makes to record a result before it leaves the work to lapse.
RECORD_TRIES = clearance.engine._RECORD_TRIES
UNKNOWN_OUTCOME = "may or may not have taken effect"
STALE = "w-stale"  # the holder id of a process that stalls while holding work
STANDING_WORDS = {
    APPROVED: "already approved",
    REJECTED: "already rejected",
    TIMED_OUT: "already timed out",
    CANCELLED: "already cancelled",
}


class Crash(BaseException):
    """The process dies inside a tool handler, after the handler took effect."""


class _Ahead:
    """Real time, `shift` later: the lease clock of a process started after others'
    leases ran out."""

    drives_timers = False

    def __init__(self, shift: timedelta) -> None:
        self.shift = shift

    def now(self) -> datetime:
        return datetime.now(UTC) + self.shift


class LockedCommits:
    """The engine's store, whose next `failures` commits fail as a locked database's
    do, before touching the file; everything else goes straight through."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.failures = 0
        self.failed = 0

    async def commit(self, *args: Any, **kwargs: Any) -> list[Work]:
        if self.failures > 0:
            self.failures -= 1
            self.failed += 1
            raise sqlite3.OperationalError("database is locked")
        return await self.store.commit(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@attrs.frozen
class HandlerCall:
    tool: str
    ctx: ToolContext
    params: dict[str, Any]


@attrs.frozen
class Decision:
    status: str
    by: str | None = None
    modified: Any = None
    reason: str | None = None


def route_flags(route: str) -> dict[str, bool]:
    return {
        "elsewhere": route == "elsewhere",
        "while_down": route == "while_down",
        "by_request_id": route == "request_id",
    }


def block(kind: str, turn: int, i: int) -> dict[str, Any]:
    if kind == "refund":
        return tool_use("refund", {"amount": 10 * turn + i + 1})
    if kind == "delete":
        return tool_use("delete", {"path": f"/data/{turn}-{i}"})
    if kind == "lookup":
        return tool_use("lookup", {"q": f"order {turn}-{i}"})
    if kind == "flaky":
        return tool_use("flaky", {})
    if kind == "unknown":
        return tool_use("teleport", {"to": "mars"})
    return tool_use("refund", {"amount": "lots"})  # invalid: never becomes a request


class ClearanceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.mkdtemp(prefix="clearance-props-")
        self.path = Path(self.dir) / "approvals.db"
        self.url = f"sqlite:///{self.path}"
        self.clock = FakeClock()
        self.ids = SequentialIds()
        self.plans: dict[str, list[tuple[str, list[str]]]] = {}
        self.calls: list[HandlerCall] = []
        self.crash_on: str | None = None
        self.lease_shift = timedelta(0)
        self.models: list[ScriptedModel] = []
        self.checked: dict[int, int] = {}  # id(model) -> requests already checked
        self.decided: dict[str, Decision] = {}
        # Approved requests whose tool never ran (a stop dropped the queued run, or a
        # stalled process held it), and those whose outcome the model was told is
        # unknown (the worker running it died or could not record its result).
        self.never_ran: set[str] = set()
        self.unknown_outcome: set[str] = set()
        # A handler that waits, for one request, until the test lets it finish.
        self.block_on: str | None = None
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        # Slow tools: milliseconds per request id, and for every ungated call.
        self.delays: dict[str, int] = {}
        self.ungated_delay = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.flight_lock = threading.Lock()
        # Store errors: once the handler of request `locks_after[0]` has run, the next
        # `locks_after[1]` commits of `locked` fail.
        self.locked: LockedCommits | None = None
        self.locks_after: tuple[str, int] | None = None
        self.exec_ids: list[str] = []
        self.seen_seq: dict[str, int] = {}
        self.audit_seen: list[AuditRecord] = []
        self.executions: dict[str, Execution] = {}
        self.pending: list[ApprovalRequest] = []
        self.app = self._open()

    # -- plumbing ---------------------------------------------------------------------------

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(work)

    def _script(self, request: ModelRequest) -> list[dict[str, Any]]:
        plan = self.plans[request.messages[0]["content"]]
        turn = sum(1 for m in request.messages if m["role"] == "assistant")
        if turn >= len(plan):
            return [text(f"done after {turn} tool turns")]
        style, kinds = plan[turn]
        blocks = [block(kind, turn, i) for i, kind in enumerate(kinds)]
        if style == "twin":
            twin = tool_use("lookup", {"q": "twin"}, id=f"twin-{turn}")
            return [*blocks, twin, twin]
        return [text("working on it"), *blocks] if style == "text" else blocks

    def _flying(self, change: int) -> None:
        with self.flight_lock:
            self.in_flight += change
            self.most_in_flight = max(self.most_in_flight, self.in_flight)

    def _delay(self, ctx: ToolContext) -> float:
        if ctx.request_id is None:
            return self.ungated_delay / 1000
        return self.delays.get(ctx.request_id, 0) / 1000

    async def _handler(self, ctx: ToolContext, params: dict[str, Any]) -> Any:
        self.calls.append(HandlerCall(ctx.tool, ctx, dict(params)))
        self._flying(+1)
        try:
            if self._delay(ctx):
                await asyncio.sleep(self._delay(ctx))
            if ctx.tool == "flaky":
                raise RuntimeError("the lookup service is down")
            if self.crash_on is not None and ctx.request_id == self.crash_on:
                self.crash_on = None
                raise Crash(ctx.request_id)
            if self.block_on is not None and ctx.request_id == self.block_on:
                self.entered.set()
                await self.release.wait()
            if self.locks_after is not None and ctx.request_id == self.locks_after[0]:
                # The tool took effect; recording its result is what fails.
                assert self.locked is not None
                self.locked.failures = self.locks_after[1]
            return {"ok": ctx.tool, "params": params}
        finally:
            self._flying(-1)

    def _sync_handler(self, ctx: ToolContext, params: dict[str, Any]) -> Any:
        """Plain functions run in a worker thread; they are held to the same rules."""
        self.calls.append(HandlerCall(ctx.tool, ctx, dict(params)))
        self._flying(+1)
        try:
            if self._delay(ctx):
                time.sleep(self._delay(ctx))
            return f"order {params['q']}: delivered"
        finally:
            self._flying(-1)

    def _tools(self) -> list[Tool]:
        return [
            Tool(
                tag="refund",
                parameters={
                    "amount": {"type": "number", "required": True},
                    "note": {"type": "string", "default": "none"},
                },
                handler=self._handler,
                requires_confirmation=True,
            ),
            Tool(
                tag="delete",
                parameters={"path": {"type": "string", "required": True}},
                handler=self._handler,
                requires_confirmation=True,
                approval_timeout=GATED_TIMEOUT_S["delete"] * 1000,
            ),
            Tool(
                tag="lookup",
                parameters={"q": {"type": "string", "required": True}},
                handler=self._sync_handler,
            ),
            Tool(tag="flaky", handler=self._handler),
        ]

    def _open(self) -> Clearance:
        # One unit of work at a time: which request gets which id must not depend on the
        # timing of concurrent tasks, or Hypothesis's draws (made from those ids) would
        # differ when it replays an example. Concurrency is tested in test_runtime.py,
        # test_crash.py and the store's group-commit tests.
        app = Clearance.open(
            self.url, clock=self.clock, ids=self.ids, synchronous="NORMAL", max_concurrency=1
        )
        # Each process opened here starts after every lease of the ones before it ran out
        # (leases run on real time, which a test cannot wait out): its clock for leases
        # runs an hour ahead of the previous process's.
        self.lease_shift += timedelta(hours=1)
        app.engine.lease_clock = _Ahead(self.lease_shift)
        # A snapshot every 3 events, not 16: runs here are short, and loads must mix a
        # snapshot with a replayed tail (other processes keep the default).
        assert isinstance(app.store, SQLiteStore)
        app.store.snapshot_every = 3
        for tag, (order, max_iterations) in AGENTS.items():
            model = ScriptedModel(self._script)
            self.models.append(model)
            app.define(
                tag=tag,
                model=model,
                tools=self._tools(),
                max_iterations=max_iterations,
                human_in_loop=HumanInLoop(
                    enabled=True,
                    approval_timeout=GATED_TIMEOUT_S["refund"] * 1000,
                    approval_order=order,
                ),
            )
        return app

    async def _reopen(self, while_down: Coroutine[Any, Any, Any] | None = None) -> None:
        """A new process on the same file: close this one, (let `while_down` happen,) open
        another and do what its background watch does: claim work whose lease ran out
        (orphaned by a dead worker) and work queued by processes that do not host the
        agent, and carry it out."""
        await self.app.close()
        try:
            if while_down is not None:
                await while_down
        finally:
            self.app = self._open()
            await self.app.engine.drain()

    def teardown(self) -> None:
        try:
            self.run(self.app.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    async def _state(self) -> tuple[dict[str, int], int, int]:
        seqs = {}
        for execution_id in self.exec_ids:
            ex = await self.app.store.load(execution_id)
            assert ex is not None
            seqs[execution_id] = ex.seq
        return seqs, len(await self.app.audit()), len(self.calls)

    def _refused(self, work: Coroutine[Any, Any, Any], *words: str) -> ClearanceError:
        """`work` must raise ClearanceError naming `words`, and change nothing at all."""
        before = self.run(self._state())
        try:
            self.run(work)
        except ClearanceError as err:
            for word in words:
                assert word in str(err), f"{word!r} not in {str(err)!r}"
            after = self.run(self._state())
            assert after == before, f"a refused signal changed something: {err}"
            return err
        raise AssertionError(f"expected a ClearanceError naming {words}")

    def _mark_expired(self, request: ApprovalRequest) -> bool:
        """A decision after the deadline finds the request timed out (the engine expires it
        first); returns whether that is what happens to this one."""
        if self.clock.now() >= request.timeout:
            self.decided[request.request_id] = Decision(TIMED_OUT)
            return True
        return False

    def _decide(
        self,
        request: ApprovalRequest,
        approved: bool,
        *,
        by: str | None,
        modified: Any = None,
        reason: str | None = None,
        elsewhere: bool = False,
        while_down: bool = False,
        by_request_id: bool = False,
    ) -> Any:
        if elsewhere or while_down:
            return self._decide_elsewhere(request, approved, by, modified, reason, while_down)
        if by_request_id:
            return self.app.decide(
                request.request_id,
                approved=approved,
                by=by,
                modified_params=modified,
                reason=reason,
            )
        return self.app.signal(
            request.execution_id,
            "approve" if approved else "reject",
            request_id=request.request_id,
            by=by,
            modified_params=modified,
            reason=reason,
        )

    async def _elsewhere(self, act: Callable[[Clearance], Awaitable[Any]]) -> None:
        """`act` in another process on the same file, one that does not host the agents
        (a reviewer's web server, the CLI): what it queues waits for the host."""
        other = Clearance.open(
            self.url, clock=self.clock, ids=SequentialIds("other-"), synchronous="NORMAL"
        )
        try:
            await act(other)
        finally:
            await other.close()

    def _live(self) -> list[ApprovalRequest]:
        """Pending requests a decision can still reach (before their deadline)."""
        return [r for r in self.pending if r.timeout > self.clock.now()]

    def _work_rows(self) -> list[tuple[int, str, str | None]]:
        """The work queue, read from the file itself: (id, execution, holder)."""
        db = sqlite3.connect(self.path)
        try:
            return db.execute("SELECT id, execution_id, holder FROM work ORDER BY id").fetchall()
        finally:
            db.close()

    def _check_not_stranded(self, executions: Iterable[Execution] | None = None) -> None:
        """A `running` execution has queued or held work, or a pending request."""
        owed = {execution_id for _, execution_id, _ in self._work_rows()}
        if executions is None:
            loaded = [self.run(self.app.store.load(i)) for i in self.exec_ids]
            executions = [ex for ex in loaded if ex is not None]
        for ex in executions:
            if ex.status == RUNNING:
                assert ex.id in owed or ex.pending_approvals, (
                    f"{ex.id} is running, but no work is queued or held for it and no "
                    "request of it is pending"
                )

    def _tool_outcomes(self, execution_id: str, tool_use_id: str) -> list[tuple[int, Event]]:
        """(position in the history, event) of each outcome recorded for one tool call."""
        events = self.run(self.app.store.events(execution_id))
        return [
            (i, e)
            for i, e in enumerate(events)
            if isinstance(e, ToolFinished | ToolFailed) and e.tool_use_id == tool_use_id
        ]

    def _asked(self, execution_id: str) -> int:
        """How many times the model was called for one execution, by any process."""
        return sum(r.execution_id == execution_id for m in self.models for r in m.requests)

    async def _decide_elsewhere(
        self,
        request: ApprovalRequest,
        approved: bool,
        by: Any,
        modified: Any,
        reason: Any,
        while_down: bool,
    ) -> None:
        """A process that does not host the agent (a reviewer's web server) decides; the
        hosting process picks up the work the decision queued, at once or, if it was down
        (G3), when it comes back."""

        async def elsewhere() -> None:
            await self._elsewhere(
                lambda other: other.decide(
                    request.request_id,
                    approved=approved,
                    by=by,
                    modified_params=modified,
                    reason=reason,
                )
            )

        if while_down:
            await self._reopen(while_down=elsewhere())
            return
        try:
            await elsewhere()
        finally:
            await self.app.engine.drain()

    # -- rules ----------------------------------------------------------------------------------

    @initialize(seq=GATED_PLAN, par=GATED_PLAN)
    def start_one_of_each(
        self, seq: list[tuple[str, list[str]]], par: list[tuple[str, list[str]]]
    ) -> None:
        self.start("seq", seq)
        self.start("par", par)

    @rule(tag=st.sampled_from(sorted(AGENTS)), plan=st.one_of(PLAN, GATED_PLAN))
    def start(self, tag: str, plan: list[tuple[str, list[str]]]) -> None:
        key = f"plan-{len(self.plans)}"
        self.plans[key] = plan
        ex = self.run(self.app.run(tag, input=key))
        assert ex.id not in self.exec_ids
        self.exec_ids.append(ex.id)
        assert ex.status in ("awaiting_approval", "completed", "failed"), ex.status
        event(f"start: {ex.status}")

    @precondition(lambda self: self.pending)
    @rule(
        data=st.data(),
        by=DECIDERS,
        change=st.sampled_from(["none", "valid", "invalid"]),
        route=ROUTES,
    )
    def approve(self, data: st.DataObject, by: str | None, change: str, route: str) -> None:
        request = data.draw(st.sampled_from(self.pending), label="request")
        rid = request.request_id
        modified = None
        if change != "none":
            pool = VALID_CHANGES if change == "valid" else INVALID_CHANGES
            modified = data.draw(pool[request.tool], label="modified_params")
        how = route_flags(route)
        if self._mark_expired(request):
            # The deadline passed without a sweep: the request times out, the approval
            # is refused, and the model goes on without the tool.
            with_error = self._decide(request, True, by=by, modified=modified, **how)
            try:
                self.run(with_error)
            except ClearanceError as err:
                assert "timed out" in str(err) or "expired" in str(err), str(err)
            else:
                raise AssertionError(f"approved {rid} after its deadline")
            assert not any(c.ctx.request_id == rid for c in self.calls)
            event("approve: after the deadline")
            return
        event(f"approve: {change} modified params, via {route}")
        if change == "invalid":
            # G6: refused before anything runs; the request stays pending.
            self._refused(self._decide(request, True, by=by, modified=modified, **how))
            ex = self.run(self.app.store.load(request.execution_id))
            assert ex is not None
            still = ex.request(rid)
            assert still is not None and still.status == PENDING
            return
        self.run(self._decide(request, True, by=by, modified=modified, **how))
        self.decided[rid] = Decision(APPROVED, by=by, modified=modified)
        # The approved call ran, right away, exactly once, with the approved parameters.
        ran = [c for c in self.calls if c.ctx.request_id == rid]
        assert len(ran) == 1, f"{rid} ran {len(ran)} times"
        assert ran[0].params == {**request.parameters, **(modified or {})}

    @precondition(lambda self: self.pending)
    @rule(
        data=st.data(),
        by=DECIDERS,
        reason=st.sampled_from([None, "too much", "wrong order"]),
        route=ROUTES,
    )
    def reject(self, data: st.DataObject, by: str | None, reason: str | None, route: str) -> None:
        request = data.draw(st.sampled_from(self.pending), label="request")
        how = route_flags(route)
        if self._mark_expired(request):
            try:
                self.run(self._decide(request, False, by=by, reason=reason, **how))
            except ClearanceError as err:
                assert "timed out" in str(err) or "expired" in str(err), str(err)
            else:
                raise AssertionError(f"rejected {request.request_id} after its deadline")
            event("reject: after the deadline")
            return
        event(f"reject: via {route}")
        self.run(self._decide(request, False, by=by, reason=reason, **how))
        self.decided[request.request_id] = Decision(REJECTED, by=by, reason=reason)

    @precondition(lambda self: self.decided)
    @rule(
        data=st.data(),
        approved=st.booleans(),
        change=st.sampled_from(["none", "valid", "invalid"]),
        route=ROUTES,
    )
    def decide_again(self, data: st.DataObject, approved: bool, change: str, route: str) -> None:
        """G4: a second decision is refused, names the one that stands, and
        changes nothing."""
        rid = data.draw(st.sampled_from(sorted(self.decided)), label="request")
        request = self._request(rid)
        modified = None
        if approved and change != "none":
            pool = VALID_CHANGES if change == "valid" else INVALID_CHANGES
            modified = data.draw(pool[request.tool], label="modified_params")
        how = route_flags(route)
        work = self._decide(request, approved, by="mallory", modified=modified, **how)
        self._refused(work, rid, STANDING_WORDS[self.decided[rid].status])
        event(f"second decision on a {self.decided[rid].status} request")

    @precondition(lambda self: self.exec_ids)
    @rule(
        data=st.data(),
        kind=st.sampled_from(
            ["unknown request", "other execution's request", "no request id", "bad signal"]
        ),
        signal=st.sampled_from(["approve", "reject"]),
    )
    def stale_signal(self, data: st.DataObject, kind: str, signal: str) -> None:
        execution_id = data.draw(st.sampled_from(self.exec_ids), label="execution")
        words: tuple[str, ...] = ()
        if kind == "unknown request":
            request_id: str | None = "apr-999999"
            words = ("apr-999999",)
        elif kind == "other execution's request":
            others = [r for r in self._all_requests() if r.execution_id != execution_id]
            if not others:
                return
            request_id = data.draw(st.sampled_from(others), label="request").request_id
            words = (request_id, execution_id)
        elif kind == "no request id":
            request_id = None
        else:
            signal, request_id = "pause", None
        self._refused(self.app.signal(execution_id, signal, request_id=request_id), *words)

    @rule(
        what=st.sampled_from(["execution", "request"]),
        signal=st.sampled_from(["approve", "reject", "stop"]),
    )
    def unknown_target(self, what: str, signal: str) -> None:
        if what == "execution":
            work: Any = self.app.signal("exec-nope", signal, request_id="apr-1")
            self._refused(work, "exec-nope")
        else:
            self._refused(self.app.decide("apr-nope", approved=signal == "approve"), "apr-nope")

    @rule(seconds=CLOCK_STEPS)
    def advance_clock(self, seconds: int) -> None:
        self.clock.advance(seconds=seconds)

    @rule()
    def fire_due_timers(self) -> None:
        now = self.clock.now()
        due = [r for r in self.pending if r.timeout <= now]
        fired = self.run(self.app.fire_due_timers())
        assert fired == len(due), f"fired {fired}, due {[r.request_id for r in due]}"
        for request in due:
            self.decided[request.request_id] = Decision(TIMED_OUT)
        event(f"fire_due_timers: {min(fired, 2)}{'+' if fired >= 2 else ''} fired")

    @precondition(lambda self: self.exec_ids)
    @rule(data=st.data(), by=DECIDERS)
    def stop(self, data: st.DataObject, by: str | None) -> None:
        execution_id = data.draw(st.sampled_from(self.exec_ids), label="execution")
        ex = self.executions[execution_id]
        if ex.status in TERMINAL:
            self._refused(self.app.signal(execution_id, "stop", by=by), f"is {ex.status}")
            event(f"stop: refused, {ex.status}")
            return
        event(f"stop: {len(ex.pending_approvals)} pending cancelled")
        stopped = self.run(self.app.signal(execution_id, "stop", by=by, reason="enough"))
        assert stopped.status == "stopped"
        for request in ex.pending_approvals:
            self.decided[request.request_id] = Decision(CANCELLED, by=by, reason="enough")

    @rule()
    def restart(self) -> None:
        """G3: everything pending, and every execution, survives a restart."""
        pending = self.run(self.app.pending())
        executions = {i: self.run(self.app.store.load(i)) for i in self.exec_ids}
        self.run(self._reopen())
        assert self.run(self.app.pending()) == pending
        assert {i: self.run(self.app.store.load(i)) for i in self.exec_ids} == executions

    @precondition(lambda self: any(r.timeout > self.clock.now() for r in self.pending))
    @rule(data=st.data())
    def crash_inside_handler(self, data: st.DataObject) -> None:
        """G2 after a crash: the process dies inside an approved handler; the next
        process does not run it again (at most once), it tells the model instead."""
        live = [r for r in self.pending if r.timeout > self.clock.now()]
        request = data.draw(st.sampled_from(live), label="request")
        self.crash_on = request.request_id
        if not self.run(self._approve_until_crash(request)):
            raise AssertionError("the handler did not run")
        self.decided[request.request_id] = Decision(APPROVED)
        self.unknown_outcome.add(request.request_id)
        self.run(self._reopen())
        event("crash inside an approved handler")

    async def _approve_until_crash(self, request: ApprovalRequest) -> bool:
        """Approve; the handler runs in its own task and "dies" there (Crash). The caller
        stops waiting, as a process that died would; the work keeps its lease."""
        deciding = asyncio.ensure_future(
            self.app.signal(request.execution_id, "approve", request_id=request.request_id)
        )
        for _ in range(2000):
            if self.crash_on is None or deciding.done():
                break
            await asyncio.sleep(0.005)
        deciding.cancel()
        await asyncio.gather(deciding, return_exceptions=True)
        return self.crash_on is None

    @precondition(lambda self: any(r.timeout > self.clock.now() for r in self.pending))
    @rule(data=st.data(), first=st.booleans(), second=st.booleans())
    def race_two_decisions(self, data: st.DataObject, first: bool, second: bool) -> None:
        """G2 and G4 under a real race: two processes decide the same request at
        once (threads, each with its own connection and loop). The store's version check
        lets exactly one win; the other is refused naming the winner's decision."""
        live = [r for r in self.pending if r.timeout > self.clock.now()]
        request = data.draw(st.sampled_from(live), label="request")
        rid = request.request_id
        barrier = threading.Barrier(2)

        def decide_in_thread(approved: bool, by: str) -> ClearanceError | None:
            async def go() -> ClearanceError | None:
                other = Clearance.open(
                    self.url, clock=self.clock, ids=SequentialIds(by), synchronous="NORMAL"
                )
                try:
                    barrier.wait(timeout=10)
                    await other.decide(rid, approved=approved, by=by)
                except ClearanceError as err:
                    return err
                finally:
                    await other.close()
                return None

            return asyncio.run(go())

        with ThreadPoolExecutor(2) as pool:
            racers = [("racer-1", first), ("racer-2", second)]
            futures = [pool.submit(decide_in_thread, approved, by) for by, approved in racers]
            outcomes = [f.result(timeout=30) for f in futures]
        winners = [racer for racer, outcome in zip(racers, outcomes, strict=True) if not outcome]
        assert len(winners) == 1, f"{len(winners)} of two racing decisions won: {outcomes}"
        (by, approved), loser = winners[0], next(o for o in outcomes if o)
        status = APPROVED if approved else REJECTED
        assert STANDING_WORDS[status] in str(loser) and f"by {by}" in str(loser), str(loser)
        self.decided[rid] = Decision(status, by=by)
        self.run(self.app.engine.drain())
        event(f"race: {'approve' if first else 'reject'} vs {'approve' if second else 'reject'}")

    # -- stops racing work, slow tools, store errors, stalled holders ------------------------

    def _cancel_others(self, ex: Execution, rid: str, by: str, reason: str) -> None:
        """The stop of `ex` cancels its pending requests other than `rid`."""
        for other in ex.pending_approvals:
            if other.request_id != rid:
                self.decided[other.request_id] = Decision(CANCELLED, by=by, reason=reason)

    @precondition(lambda self: self._live())
    @rule(data=st.data(), by=DECIDERS, stopper=st.sampled_from(["elsewhere", "host"]))
    def stop_after_approval_elsewhere(
        self, data: st.DataObject, by: str | None, stopper: str
    ) -> None:
        """A stop racing an approval: a process that does not host the agent approves,
        and a stop of that execution follows at once (from that process or the host),
        before the host picks the tool run up. The stop's commit drops the queued run:
        the approved tool never runs (the history closes its call as not run), the
        execution ends stopped, and the audit keeps the approval (and the cancellation
        of the execution's other pending requests)."""
        request = data.draw(st.sampled_from(self._live()), label="request")
        rid, eid = request.request_id, request.execution_id

        async def approve(other: Clearance) -> None:
            await other.decide(rid, approved=True, by=by)
            if stopper == "elsewhere":
                await other.signal(eid, "stop", by="ops", reason="halt")

        async def race() -> None:
            await self._elsewhere(approve)
            if stopper == "host":
                await self.app.signal(eid, "stop", by="ops", reason="halt")
            await self.app.engine.drain()

        self.run(race())
        self.decided[rid] = Decision(APPROVED, by=by)
        self._cancel_others(self.executions[eid], rid, "ops", "halt")
        self.never_ran.add(rid)
        assert not any(c.ctx.request_id == rid for c in self.calls), f"{rid} ran after a stop"
        ex = self.run(self.app.store.load(eid))
        assert ex is not None and ex.status == STOPPED, ex
        # The history closes the call as never run, after the stop.
        events = self.run(self.app.store.events(eid))
        stops = [i for i, e in enumerate(events) if isinstance(e, StopRequested)]
        outcomes = self._tool_outcomes(eid, request.tool_use_id)
        assert len(stops) == 1 and len(outcomes) == 1, [e.TAG for e in events]
        (at, outcome) = outcomes[0]
        assert at > stops[0] and isinstance(outcome, ToolFailed), outcome
        assert "not run" in outcome.error, outcome.error
        assert [r.decision for r in self.run(self.app.audit(request_id=rid))] == [APPROVED]
        event(f"stop after an approval elsewhere, from {stopper}")

    @precondition(lambda self: self._live())
    @rule(data=st.data(), by=DECIDERS, stopper=st.sampled_from(["elsewhere", "host"]))
    def stop_while_tool_runs(self, data: st.DataObject, by: str | None, stopper: str) -> None:
        """The stop arrives when the host has already started the approved tool (its
        handler waits until the test lets it go): the tool finishes, and its outcome is
        recorded after the stop (`tool_finished` after `stop_requested`); the execution
        stays stopped, the model is not called again, the tool ran exactly once."""
        request = data.draw(st.sampled_from(self._live()), label="request")
        rid, eid = request.request_id, request.execution_id
        asked = self._asked(eid)
        self.run(self._stop_while_running(request, by, stopper))
        self.decided[rid] = Decision(APPROVED, by=by)
        self._cancel_others(self.executions[eid], rid, "ops", "halt")
        assert len([c for c in self.calls if c.ctx.request_id == rid]) == 1
        events = self.run(self.app.store.events(eid))
        stops = [i for i, e in enumerate(events) if isinstance(e, StopRequested)]
        outcomes = self._tool_outcomes(eid, request.tool_use_id)
        assert len(stops) == 1 and len(outcomes) == 1, [e.TAG for e in events]
        (at, outcome) = outcomes[0]
        assert isinstance(outcome, ToolFinished) and at > stops[0], [e.TAG for e in events]
        ex = self.run(self.app.store.load(eid))
        assert ex is not None and ex.status == STOPPED
        assert self._asked(eid) == asked, "the model was called after the stop"
        event(f"stop while the approved tool runs, from {stopper}")

    async def _stop_while_running(
        self, request: ApprovalRequest, by: str | None, stopper: str
    ) -> None:
        rid, eid = request.request_id, request.execution_id
        self.block_on, self.entered, self.release = rid, asyncio.Event(), asyncio.Event()
        await self._elsewhere(lambda other: other.decide(rid, approved=True, by=by))
        draining = asyncio.ensure_future(self.app.engine.drain())
        try:
            await asyncio.wait_for(self.entered.wait(), 60)  # a hang guard, not a timing

            def stop(app: Clearance) -> Awaitable[Any]:
                return app.signal(eid, "stop", by="ops", reason="halt")

            if stopper == "host":
                await stop(self.app)
            else:
                await self._elsewhere(stop)
            ex = await self.app.store.load(eid)
            assert ex is not None and ex.status == STOPPED
            # The tool goes on: its work is still held, so nothing is stranded.
            assert any(e == eid and holder for _, e, holder in self._work_rows())
        finally:
            self.block_on = None
            self.release.set()
            await draining

    @rule(data=st.data(), ungated_ms=DELAYS_MS, more=st.integers(0, 2))
    def decide_many_with_slow_tools(self, data: st.DataObject, ungated_ms: int, more: int) -> None:
        """Slow tools, several units in flight at once: (after `more` new executions,)
        another process decides a batch of requests across executions (approvals, and
        some rejections), then the host drains: the approved tools, and the model calls
        and ungated tools that follow, run concurrently, most taking a few ms."""
        for _ in range(more):
            self.start(data.draw(st.sampled_from(sorted(AGENTS))), data.draw(GATED_PLAN))
        self.pending = self.run(self.app.pending())
        live = data.draw(st.permutations(self._live()), label="order")
        if not live:
            return
        size = data.draw(st.integers(min(2, len(live)), min(6, len(live))), label="size")
        batch = [
            (request, data.draw(APPROVE_MOSTLY, label="approved"), data.draw(DELAYS_MS))
            for request in live[:size]
        ]
        for request, approved, ms in batch:
            if approved:
                self.delays[request.request_id] = ms

        async def decide_all(other: Clearance) -> None:
            for request, approved, _ in batch:
                reason = None if approved else "batch"
                await other.decide(request.request_id, approved=approved, by="bob", reason=reason)

        self.ungated_delay, self.most_in_flight = ungated_ms, 0
        try:
            self.run(self._elsewhere(decide_all))
            self.run(self.app.engine.drain())
        finally:
            self.ungated_delay = 0
        for request, approved, _ in batch:
            rid = request.request_id
            if approved:
                self.decided[rid] = Decision(APPROVED, by="bob")
                assert len([c for c in self.calls if c.ctx.request_id == rid]) == 1
            else:
                self.decided[rid] = Decision(REJECTED, by="bob", reason="batch")
        most = self.most_in_flight
        event(f"slow tools: at most {min(most, 3)}{'+' if most >= 3 else ''} in flight")

    @precondition(lambda self: self._live())
    @rule(data=st.data(), by=DECIDERS, failures=st.integers(1, 8))
    def store_locked_while_recording(
        self, data: st.DataObject, by: str | None, failures: int
    ) -> None:
        """Store errors: another process approves, the host drains; the tool takes
        effect, then the host's next `failures` commits fail with "database is locked".

        The failures are armed inside the handler, after the approval's commit. (An
        approval whose own commit fails raises to its caller and records nothing: the
        request stays pending, which is what a refused signal already checks.) So it is
        exactly the commits of the tool's result that fail. Below the engine's
        RECORD_TRIES attempts it retries and the result is recorded once. From there
        it gives up and leaves the work held: the execution stays `running` with work
        in the queue (not stranded), the lease lapses, and the next process (`_reopen`)
        reports the outcome unknown (`tool_failed`, "may or may not have taken
        effect"), never running the tool again."""
        request = data.draw(st.sampled_from(self._live()), label="request")
        rid, eid = request.request_id, request.execution_id
        locked = self.locked = LockedCommits(self.app.engine.store)
        self.locks_after = (rid, failures)
        self.app.engine.store = cast(Store, locked)
        try:
            # The engine's backoff between attempts, shortened: the test waits on nothing.
            with mock.patch.object(clearance.engine, "_RECORD_BACKOFF", 0.001):
                self.run(self._elsewhere(lambda other: other.decide(rid, approved=True, by=by)))
                self.run(self.app.engine.drain())
        finally:
            self.app.engine.store = locked.store
            self.locked = self.locks_after = None
            locked.failures = 0
        self.decided[rid] = Decision(APPROVED, by=by)
        assert locked.failed == min(failures, RECORD_TRIES), locked.failed
        gave_up = failures >= RECORD_TRIES
        if gave_up:
            ex = self.run(self.app.store.load(eid))
            assert ex is not None and ex.status == RUNNING, ex.status
            held = [holder for _, e, holder in self._work_rows() if e == eid]
            assert held == [self.app.engine.worker], held
            self._check_not_stranded()
            self.run(self._reopen())
            self.unknown_outcome.add(rid)
        assert len([c for c in self.calls if c.ctx.request_id == rid]) == 1
        outcomes = [e for _, e in self._tool_outcomes(eid, request.tool_use_id)]
        assert len(outcomes) == 1, outcomes
        if gave_up:
            assert isinstance(outcomes[0], ToolFailed) and UNKNOWN_OUTCOME in outcomes[0].error
        else:
            assert isinstance(outcomes[0], ToolFinished), outcomes
        event(f"store locked: {'gave up' if gave_up else 'recorded after retries'}")

    @precondition(lambda self: self._live())
    @rule(data=st.data(), approved=st.booleans(), by=DECIDERS)
    def stall_holding_work(self, data: st.DataObject, approved: bool, by: str | None) -> None:
        """Lease expiry: another process decides a request, and the work that queues (the
        approved tool's run; after a rejection, the model call or the turn's next tool
        run, if any) is claimed by a process that then stalls: it neither carries it
        out nor renews its lease (`claim_work` as "w-stale", with a lease that has run
        out by the next process's lease clock). The next process takes it over: a model
        call is made again, a tool run is not run but reported as of unknown outcome.
        The stalled holder's late result then raises LeaseLost and writes nothing."""
        request = data.draw(st.sampled_from(self._live()), label="request")
        rid, eid = request.request_id, request.execution_id
        reason = None if approved else "stalled"
        self.run(
            self._elsewhere(
                lambda other: other.decide(rid, approved=approved, by=by, reason=reason)
            )
        )
        self.decided[rid] = Decision(APPROVED if approved else REJECTED, by=by, reason=reason)
        now = self.app.engine.lease_clock.now()
        until = now + timedelta(seconds=30)
        stalled = self.run(self.app.store.claim_work(sorted(AGENTS), STALE, now, until, 100))
        assert all(w.execution_id == eid and w.previous_holder is None for w in stalled)
        assert [w.id for w in stalled] == [i for i, _, _ in self._work_rows()]
        self._check_not_stranded()
        models = len(self.models)
        self.run(self._reopen())
        # Only the new process's models: the stalled holder never called one.
        asked = [r for m in self.models[models:] for r in m.requests if r.execution_id == eid]
        for work in stalled:
            command = work.command
            if isinstance(command, CallModel):
                assert any(r.turn == command.turn for r in asked), "the model call was lost"
            else:
                key = command.idempotency_key
                assert not any(c.ctx.idempotency_key == key for c in self.calls)
                outcomes = [e for _, e in self._tool_outcomes(eid, command.tool_use_id)]
                assert len(outcomes) == 1 and isinstance(outcomes[0], ToolFailed), outcomes
                assert UNKNOWN_OUTCOME in outcomes[0].error
                if command.request_id is not None:
                    self.never_ran.add(command.request_id)
                    self.unknown_outcome.add(command.request_id)
            self._late_result(work)
        kinds = sorted(type(w.command).__name__ for w in stalled)
        event(f"stalled holding {', '.join(kinds) or 'nothing'}")

    def _late_result(self, work: Work) -> None:
        """The stalled holder wakes and records its result at the execution's current
        version (as the engine does after a Conflict): LeaseLost, nothing written."""
        ex = self.run(self.app.store.load(work.execution_id))
        assert ex is not None
        command, at = work.command, self.clock.now()
        late: Event
        if isinstance(command, RunTool):
            late = ToolFinished(command.tool_use_id, {"ok": "late"}, at)
        else:
            late = ModelReplied(command.turn, (text("late"),), "end_turn", at)
        step = writes(attrs.evolve(ex, seq=ex.seq + 1), late, ())
        before = self.run(self._state()), self._work_rows(), ex
        try:
            self.run(self.app.store.commit(step, expected_seq=ex.seq, done=Claim(work.id, STALE)))
        except LeaseLost:
            pass
        else:
            raise AssertionError(f"a stalled holder recorded a late {late.TAG}")
        after = self.run(self._state()), self._work_rows(), self.run(self.app.store.load(ex.id))
        assert after == before, "a refused late result wrote something"

    # -- what must hold after every step ------------------------------------------------------

    def _all_requests(self) -> list[ApprovalRequest]:
        return [r for ex in self.executions.values() for r in ex.requests]

    def _request(self, request_id: str) -> ApprovalRequest:
        for request in self._all_requests():
            if request.request_id == request_id:
                return request
        raise AssertionError(f"no request {request_id}")

    @invariant()
    def guarantees_hold(self) -> None:
        self.executions = {}
        for execution_id in self.exec_ids:
            ex = self.run(self.app.store.load(execution_id))
            assert ex is not None
            self.executions[execution_id] = ex
        self.pending = self.run(self.app.pending())
        for ex in self.executions.values():
            # Nothing is left half-done: the engine drives every execution until it rests.
            assert ex.status in RESTING, f"{ex.id} was left {ex.status}"
        # Everything was drained: no work is left, queued or held, and nothing stranded.
        rows = self._work_rows()
        assert not rows, f"work left in the queue after a drain: {rows}"
        self._check_not_stranded(self.executions.values())
        audit = self.run(self.app.audit())
        self._check_requests_and_audit(audit)
        self._check_handler_calls(audit)
        self._check_model_requests()
        for execution_id, ex in self.executions.items():
            if self.seen_seq.get(execution_id) != ex.seq:
                self._check_replay(ex)
                self.seen_seq[execution_id] = ex.seq

    def _check_requests_and_audit(self, audit: list[AuditRecord]) -> None:
        requests = {r.request_id: r for r in self._all_requests()}
        # Every request is exactly where our decisions (and only ours) put it.
        for rid, request in requests.items():
            expected = self.decided.get(rid, Decision(PENDING)).status
            assert request.status == expected, f"{rid} is {request.status}, expected {expected}"
        assert set(self.decided) <= set(requests)
        pending_ids = [r.request_id for r in self.pending]
        assert Counter(pending_ids) == Counter(
            rid for rid, r in requests.items() if r.status == PENDING
        )
        stamps = [r.timestamp for r in self.pending]
        assert stamps == sorted(stamps), "pending() is oldest first"
        for request in self.pending:
            assert request == requests[request.request_id]
        # G7: append-only, one record per decided request, saying what we did.
        assert audit[: len(self.audit_seen)] == self.audit_seen, "the audit log was rewritten"
        self.audit_seen = audit
        per_request = Counter(r.request_id for r in audit)
        assert set(per_request) == set(self.decided), "audit records vs decisions"
        assert max(per_request.values(), default=1) == 1, per_request
        for record in audit:
            request, decision = requests[record.request_id], self.decided[record.request_id]
            assert record.decision == request.outcome
            assert request.outcome == (
                APPROVED_MODIFIED
                if request.effective_parameters() != request.parameters
                else decision.status
            )
            assert record.execution_id == request.execution_id
            assert record.tool == request.tool
            assert record.parameters == request.parameters
            assert record.at == request.decided_at
            if decision.status in (APPROVED, REJECTED, CANCELLED):
                assert record.by == decision.by == request.decided_by
            if decision.status == APPROVED:
                assert record.modified_params == decision.modified == request.modified_params
            if decision.status == REJECTED:
                assert record.reason == decision.reason == request.rejection_reason
            if decision.status == TIMED_OUT:
                assert record.reason and "timed out" in record.reason

    def _check_handler_calls(self, audit: list[AuditRecord]) -> None:
        approvals = {r.request_id: r for r in audit if r.decision in APPROVALS}
        approved = Counter(r.request_id for r in audit if r.decision in APPROVALS)
        keys = Counter(c.ctx.idempotency_key for c in self.calls)
        assert max(keys.values(), default=1) == 1, f"a call ran twice: {keys.most_common(3)}"
        for call in self.calls:
            ctx = call.ctx
            if call.tool in UNGATED:
                assert ctx.request_id is None
                execution_id, turn, tool_use_id = ctx.idempotency_key.split(":", 2)
                assert (execution_id, tool_use_id) == (ctx.execution_id, ctx.tool_use_id)
                assert turn.isdigit()  # the model turn that asked for the call
                continue
            # G1: a gated tool runs only for a recorded approval of that request.
            assert call.tool in GATED_TIMEOUT_S, f"handler ran for {call.tool}"
            assert ctx.request_id is not None, f"gated {call.tool} ran without a request"
            record = approvals.get(ctx.request_id)
            assert record is not None, f"{ctx.request_id} ran without an approval record"
            assert approved[ctx.request_id] == 1, f"{ctx.request_id} has {approved} approvals"
            request = self._request(ctx.request_id)
            assert request.status == APPROVED
            assert ctx.idempotency_key == ctx.request_id
            assert (ctx.execution_id, ctx.tool_use_id, ctx.tool) == (
                request.execution_id,
                request.tool_use_id,
                request.tool,
            )
            assert ctx.approved_by == record.by
            assert call.params == request.effective_parameters()
        # G2, and that an approval does not get lost: each ran exactly once, but for those
        # a stop dropped before they started or a stalled process held.
        ran = Counter(c.ctx.request_id for c in self.calls if c.ctx.request_id)
        assert self.never_ran <= set(approvals), self.never_ran - set(approvals)
        assert ran == Counter(set(approvals) - self.never_ran), "approved requests vs runs"

    def _check_model_requests(self) -> None:
        """G5, on every request the model was ever sent."""
        for model in self.models:
            start = self.checked.get(id(model), 0)
            for request in model.requests[start:]:
                self._check_model_request(request)
            self.checked[id(model)] = len(model.requests)

    def _check_model_request(self, request: ModelRequest) -> None:
        messages = request.messages
        ex = self.executions[request.execution_id]
        by_tool_use = {r.tool_use_id: r for r in ex.requests}
        assert messages[0] == {"role": "user", "content": ex.input}
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2) + [
            "user"
        ], "roles must alternate, ending with the user"
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            uses = [b["id"] for b in message["content"] if b.get("type") == "tool_use"]
            assert uses, "an assistant turn without tool_use ends the execution"
            answer = messages[i + 1]["content"]
            assert isinstance(answer, list)
            results = [b for b in answer if b.get("type") == "tool_result"]
            assert answer[: len(results)] == results, "tool_result blocks must come first"
            assert Counter(b["tool_use_id"] for b in results) == Counter(uses)
            for result in results:
                gate = by_tool_use.get(result["tool_use_id"])
                if gate is None:
                    continue
                content = json.dumps(result["content"])
                if gate.status == REJECTED:
                    assert result["is_error"] and "approval_rejected" in content
                elif gate.status == TIMED_OUT:
                    assert result["is_error"] and "approval_timeout" in content
                elif gate.status == APPROVED:
                    unknown = gate.request_id in self.unknown_outcome
                    assert result["is_error"] == unknown, content
                    assert (UNKNOWN_OUTCOME in content) == unknown, content
                else:
                    raise AssertionError(f"model saw a result for {gate.status} {gate.request_id}")

    def _check_replay(self, stored: Execution) -> None:
        events = self.run(self.app.store.events(stored.id))
        assert len(events) == stored.seq
        ex = Execution(agent=stored.agent)
        records = []
        for logged in events:
            source = ex.status
            ex, commands = decide(ex, logged)
            assert (logged.TAG, source, ex.status) in MOVES
            records += [c.record for c in commands if isinstance(c, RecordDecision)]
        assert ex == stored, f"replaying {stored.id} does not reproduce it"
        assert records == self.run(self.app.audit(execution_id=stored.id))


ClearanceMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestClearance = ClearanceMachine.TestCase


async def test_a_malformed_model_reply_does_not_strand_the_execution(tmp_path: Path) -> None:
    async def lookup(ctx: ToolContext, params: dict[str, Any]) -> str:
        return "found"

    twice = [tool_use("lookup", {"q": "a"}, id="tu1"), tool_use("lookup", {"q": "b"}, id="tu1")]
    model = ScriptedModel([twice, [text("done")]])
    app = Clearance.open(f"sqlite:///{tmp_path / 'a.db'}", clock=FakeClock(), ids=SequentialIds())
    try:
        app.define(
            tag="a",
            model=model,
            tools=[Tool(tag="lookup", parameters={"q": {"type": "string"}}, handler=lookup)],
        )
        ex = await app.run("a", input="look twice")
        # Regression: the refused reply used to be dropped, and run() returned the execution
        # 'running', awaiting a model reply that nothing would ever ask for again.
        assert ex.status in RESTING, f"run() returned a {ex.status} execution"
        assert (await app.get_execution(ex.id)).status == "failed"
    finally:
        await app.close()
