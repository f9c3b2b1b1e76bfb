"""Every execution status x every event type, and every request status x every decision.

In the wsproto / h2 style: build an execution in each status from real events
(through `decide`, several ways per status where the way matters), hand it a
representative event of each type (ones that fit, and ones whose content does
not), and check the outcome is one of exactly two things:

- accepted, and the move `(event, source, destination)` is a row of
  `EXECUTION_TABLE` (and of `REQUEST_TABLE` for the request it decides);
- refused with `Refusal`, whose message names the execution's state or the
  standing decision (or, for an event whose content does not fit an accepting
  state, the sub-state it does not fit), and nothing changed.

Never any other exception. Acceptance is checked both ways: an event that fits
a state the table says takes it must be accepted, not refused.

`decide()` looks moves up in sets read off the machines rather than triggering
them each step; one test triggers the machines for every state x event x
destination and checks the sets say the same.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import pytest

from clearance.core import machine
from clearance.core.agent import APPROVE, PARALLEL, SEQUENTIAL, AgentSpec, Stage, ToolSpec
from clearance.core.commands import (
    COMMAND_TYPES,
    CancelTimer,
    DeliverAgain,
    RecordDecision,
    ReviseApprovalRequest,
    RunTool,
    StartTimer,
)
from clearance.core.decide import decide, standing_decision
from clearance.core.errors import InvalidParameters, Refusal
from clearance.core.events import (
    EVENT_TYPES,
    Approved,
    Event,
    Extended,
    ModelFailed,
    ModelReplied,
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
    APPROVED,
    APPROVED_BY_TIMEOUT,
    AWAITING_APPROVAL,
    CANCELLED,
    COMPLETED,
    CREATED,
    EXECUTING,
    EXECUTION_STATUSES,
    FAILED,
    INVALIDATED,
    PENDING,
    QUEUED,
    REJECTED,
    REQUEST_STATUSES,
    RUNNING,
    STOPPED,
    TERMINAL,
    TIMED_OUT,
    ApprovalRequest,
    Execution,
    iso,
)
from clearance.core.machine import EXECUTION_TABLE, REQUEST_TABLE
from clearance.core.rows import writes
from clearance.core.schema import to_json_schema

T0 = datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
TIMEOUT_MS = 60_000
# How long a refund request may stay open at most, extensions included.
MAX_TIMEOUT_MS = 10 * TIMEOUT_MS

REFUND = ToolSpec(
    tag="refund",
    description="",
    input_schema=to_json_schema(
        "refund", {"amount": {"type": "number", "required": True}, "note": {"type": "string"}}
    ),
    gated=True,
    approval_timeout_ms=TIMEOUT_MS,
    max_timeout_ms=MAX_TIMEOUT_MS,
)
LOOKUP = ToolSpec(
    tag="lookup",
    description="",
    input_schema=to_json_schema("lookup", {"q": {"type": "string", "required": True}}),
    gated=False,
    approval_timeout_ms=TIMEOUT_MS,
)
# The refund tool as a redeploy may change it: refunds below 15 no longer fit it, or it
# needs no approval any more.
REFUND_FROM_15 = attrs.evolve(
    REFUND,
    input_schema={
        **REFUND.input_schema,
        "properties": {
            **REFUND.input_schema["properties"],
            "amount": {"type": "number", "minimum": 15},
        },
    },
)
# Refunds two distinct people must approve; refunds nobody answering approves.
REFUND_BY_TWO = attrs.evolve(REFUND, approvals_required=2)
REFUND_ON_TIMEOUT = attrs.evolve(REFUND, timeout_action=APPROVE)
# Refunds escalated while nobody answers: stage 1 after 10 s (on its own webhook, to a
# lead), the reminder 40 s before the deadline (at 20 s), stage 2 after 30 s (to the
# managers); the deadline at 60 s.
STAGE_1_MS, REMINDER_MS, STAGE_2_MS = 10_000, 20_000, 30_000
LEAD_HOOK = "https://lead.example/hook"
REFUND_ESCALATING = attrs.evolve(
    REFUND,
    remind_before_ms=TIMEOUT_MS - REMINDER_MS,
    escalation=(
        Stage(after_ms=STAGE_1_MS, webhook=LEAD_HOOK, reviewers=("lead",)),
        Stage(after_ms=STAGE_2_MS, groups=("managers",)),
    ),
)


def redefinitions(spec: AgentSpec) -> dict[str, AgentSpec]:
    """The agent defined again, as a redeploy would: without refunds, with refunds from
    15, with refunds that need no approval (its refund tool's quorum, timeout action and
    longest deadline kept)."""
    own = spec.tool("refund") or REFUND
    from_15 = attrs.evolve(own, input_schema=REFUND_FROM_15.input_schema)
    return {
        "no refund": attrs.evolve(spec, tools=(LOOKUP,)),
        "refund from 15": attrs.evolve(spec, tools=(from_15, LOOKUP)),
        "refund ungated": attrs.evolve(spec, tools=(attrs.evolve(own, gated=False), LOOKUP)),
    }


def agent(
    order: str = SEQUENTIAL, max_iterations: int = 20, refund_tool: ToolSpec = REFUND
) -> AgentSpec:
    return AgentSpec(
        tag="support",
        name="support",
        product="",
        model="scripted",
        system_prompt="",
        tools=(refund_tool, LOOKUP),
        approval_order=order,
        max_iterations=max_iterations,
    )


# -- the tables as reviewed against docs/architecture.md ------------------------------------

# Which (event, status) pairs an execution takes at all. Pinned here so that a
# widened table (say, a decision accepted by a completed execution) fails loudly.
REVIEWED_ACCEPTS = {
    ("started", CREATED),
    ("model_replied", RUNNING),
    ("model_failed", RUNNING),
    ("tool_finished", RUNNING),
    ("tool_failed", RUNNING),
    *(
        (d, s)
        for d in ("approved", "rejected", "timer_fired", "extended")
        for s in (RUNNING, AWAITING_APPROVAL)
    ),
    *(("stop_requested", s) for s in (CREATED, RUNNING, AWAITING_APPROVAL)),
    # A redeploy judges pending requests again (in parallel order, while a tool runs).
    ("redefined", RUNNING),
    ("redefined", AWAITING_APPROVAL),
    # The outcome of a tool that was executing when the execution stopped.
    ("tool_finished", STOPPED),
    ("tool_failed", STOPPED),
}
MOVES = {(t, s, d) for t, s, dests in EXECUTION_TABLE for d in dests}
ACCEPTS = {(t, s) for t, s, _ in EXECUTION_TABLE}
REQUEST_MOVES = {(t, s, d) for t, s, dests in REQUEST_TABLE for d in dests}

# The refusal codes decide() may use; anything else is a new, unreviewed outcome.
KNOWN_CODES = {
    "wrong_state",
    "already_decided",
    "unknown_request",
    "expired",
    "not_due",
    "stale_model_reply",
    "stale_tool_result",
    "invalid_parameters",
    "invalid_reply",
    "invalid_event",
    # Quorums and extensions.
    "not_granted",
    "already_voted",
    "self_approval",
    "extension_too_long",
    "invalid_deadline",
}


def test_execution_table_is_the_reviewed_one() -> None:
    assert ACCEPTS == REVIEWED_ACCEPTS
    for _, source, dests in EXECUTION_TABLE:
        assert source in EXECUTION_STATUSES
        assert set(dests) <= set(EXECUTION_STATUSES)
    # Nothing ever leaves a terminal status (a stopped one only records the late outcome
    # of a tool it was running), and nothing goes back to 'created'.
    for event, source, dests in EXECUTION_TABLE:
        if source in TERMINAL:
            assert (event, source, dests) in (
                ("tool_finished", STOPPED, (STOPPED,)),
                ("tool_failed", STOPPED, (STOPPED,)),
            )
    assert not any(CREATED in dests for _, _, dests in EXECUTION_TABLE)
    # An extension only moves a deadline: the execution stays where it is.
    for event, source, dests in EXECUTION_TABLE:
        if event == "extended":
            assert dests == (source,)


def test_request_table_is_pending_then_exactly_one_outcome() -> None:
    assert {
        ("approve", PENDING, APPROVED),
        # A vote towards a quorum not met yet, and a later deadline: still pending.
        ("vote", PENDING, PENDING),
        ("extend", PENDING, PENDING),
        # Its reminder went out, or an escalation stage delivered it again: still pending.
        ("escalate", PENDING, PENDING),
        # Nobody answered, and the tool says an unanswered call runs.
        ("approve_by_timeout", PENDING, APPROVED),
        ("reject", PENDING, REJECTED),
        ("time_out", PENDING, TIMED_OUT),
        ("cancel", PENDING, CANCELLED),
        ("invalidate", PENDING, INVALIDATED),
    } == REQUEST_MOVES
    assert set(REQUEST_STATUSES) == {
        PENDING,
        APPROVED,
        REJECTED,
        TIMED_OUT,
        CANCELLED,
        INVALIDATED,
    }


def test_the_sets_decide_looks_up_are_what_the_machines_allow() -> None:
    """decide() checks moves in sets read off the machines at import, not by triggering
    them; for every state x event x destination a trigger must say the same."""
    events = {t for t, _, _ in EXECUTION_TABLE} | {e.TAG for e in EVENT_TYPES}
    for event in sorted(events):
        for source in EXECUTION_STATUSES:
            allowed = {
                d for d in EXECUTION_STATUSES if machine.execution_move_allowed(event, source, d)
            }
            looked_up = {d for e, s, d in machine.EXECUTION_MOVES if (e, s) == (event, source)}
            assert looked_up == allowed, (event, source)
            assert ((event, source) in machine.EXECUTION_ACCEPTS) == bool(allowed), (event, source)
    actions = {t for t, _, _ in REQUEST_TABLE}
    for action in sorted(actions):
        for source in REQUEST_STATUSES:
            for dest in REQUEST_STATUSES:
                allowed = machine.request_move_allowed(action, source, dest)
                assert ((action, source, dest) in machine.REQUEST_MOVES) == allowed, action
    # And the machines hold exactly the reviewed tables, nothing more.
    assert machine.EXECUTION_MOVES == MOVES
    assert machine.EXECUTION_ACCEPTS == ACCEPTS
    assert machine.REQUEST_MOVES == REQUEST_MOVES


# -- building executions from real events ----------------------------------------------------


def use(tool_use_id: str, name: str, params: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": tool_use_id, "name": name, "input": params}


def say(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


class Life:
    """An execution driven through decide() by real events, one second apart, started by
    carol (who may therefore approve none of its calls)."""

    def __init__(self, spec: AgentSpec | None = None) -> None:
        self.ex = Execution(agent=spec or agent())
        self.at = T0
        self._requests = 0

    def apply(self, event: Event) -> Life:
        self.ex, _ = decide(self.ex, event)
        return self

    def now(self) -> datetime:
        self.at += timedelta(seconds=1)
        return self.at

    def start(self) -> Life:
        return self.apply(Started("exec-1", "refund order 42", self.now(), requested_by="carol"))

    def reply(self, *blocks: dict[str, Any]) -> Life:
        tickets = []
        for block in blocks:
            if block["type"] == "tool_use":
                self._requests += 1
                tickets.append(Ticket(block["id"], f"apr-{self._requests}", "needs a human"))
        uses = any(b["type"] == "tool_use" for b in blocks)
        return self.apply(
            ModelReplied(
                turn=self.ex.model_turn,
                content=tuple(blocks),
                stop_reason="tool_use" if uses else "end_turn",
                at=self.now(),
                tickets=tuple(tickets),
            )
        )

    def approve(self, request_id: str, by: str = "alice", **extra: Any) -> Life:
        return self.apply(Approved(request_id, self.now(), by=by, **extra))

    def vote(self, request_id: str, by: str = "alice", **extra: Any) -> Life:
        """An approval by a person Clearance knows (the app's by=): one that counts
        towards a quorum."""
        return self.approve(request_id, by=by, by_kind="app", **extra)

    def extend(self, request_id: str) -> Life:
        """The request's deadline moved as late as its tool allows."""
        request = self.ex.request(request_id)
        assert request is not None
        until = latest_deadline(self.ex, request)
        return self.apply(Extended(request_id, until, self.now(), by="alice", by_kind="app"))

    def reject(self, request_id: str) -> Life:
        return self.apply(Rejected(request_id, self.now(), by="alice", reason="too much"))

    def fire(self, request_id: str, after_ms: int) -> Life:
        """A timer of the request fires `after_ms` after the request opened."""
        request = self.ex.request(request_id)
        assert request is not None
        self.at = request.timestamp + timedelta(milliseconds=after_ms)
        return self.apply(TimerFired(request_id, self.at))

    def time_out(self, request_id: str) -> Life:
        request = self.ex.request(request_id)
        assert request is not None
        self.at = request.timeout
        return self.apply(TimerFired(request_id, self.at))

    def finish(self, tool_use_id: str) -> Life:
        return self.apply(ToolFinished(tool_use_id, {"ok": True}, self.now()))

    def fail_tool(self, tool_use_id: str) -> Life:
        return self.apply(ToolFailed(tool_use_id, "boom", self.now()))

    def model_fails(self) -> Life:
        return self.apply(ModelFailed(self.ex.model_turn, "overloaded", self.now()))

    def stop(self) -> Life:
        return self.apply(StopRequested(self.now(), by="ops", reason="enough"))

    def redefine(self, how: str) -> Life:
        return self.apply(Redefined(redefinitions(self.ex.agent)[how], self.now()))


def refund(tool_use_id: str, amount: float = 10) -> dict[str, Any]:
    return use(tool_use_id, "refund", {"amount": amount})


def lookup(tool_use_id: str) -> dict[str, Any]:
    return use(tool_use_id, "lookup", {"q": "order 42"})


def by_two(order: str = SEQUENTIAL) -> Life:
    """One refund, which two distinct people must approve, pending."""
    return Life(agent(order, refund_tool=REFUND_BY_TWO)).start().reply(refund("tu1"))


def latest_deadline(ex: Execution, request: ApprovalRequest) -> datetime:
    """The latest a request may be extended to: its tool's longest deadline from when it
    opened (its own deadline where the tool sets none)."""
    tool = ex.agent.tool(request.tool)
    assert tool is not None
    if tool.max_timeout_ms is None:
        return request.timeout
    return request.timestamp + timedelta(milliseconds=tool.max_timeout_ms)


def single(request: ApprovalRequest) -> bool:
    """Whether one approval decides the request (no quorum of more, no groups)."""
    return (request.approvals_required, request.groups) == (1, ())


def escalating(order: str = SEQUENTIAL) -> Life:
    """One refund pending, with a reminder and two escalation stages to come."""
    return Life(agent(order, refund_tool=REFUND_ESCALATING)).start().reply(refund("tu1"))


def timer_times(ex: Execution, request: ApprovalRequest) -> dict[str, datetime]:
    """When the request's reminder ("reminder") and each escalation stage ("stage:N") are
    due, fired or not, by its tool as `ex` defines it: the reminder `remind_before_ms`
    before the deadline, a stage `after_ms` after the request opened."""
    tool = ex.agent.tool(request.tool)
    times: dict[str, datetime] = {}
    if tool is None:
        return times
    if tool.remind_before_ms:
        times["reminder"] = request.timeout - timedelta(milliseconds=tool.remind_before_ms)
    for number, stage in enumerate(tool.escalation, 1):
        times[f"stage:{number}"] = request.timestamp + timedelta(milliseconds=stage.after_ms)
    return times


def has_fired(request: ApprovalRequest, purpose: str) -> bool:
    if purpose == "reminder":
        return request.reminded
    return int(purpose.removeprefix("stage:")) <= request.stages_fired


def still_to_come(ex: Execution, request: ApprovalRequest) -> set[datetime]:
    """The times of the request's timers for its reminder and stages that have not fired:
    after it opened and before its deadline (at the deadline it times out instead)."""
    return {
        t
        for purpose, t in timer_times(ex, request).items()
        if not has_fired(request, purpose) and request.timestamp < t < request.timeout
    }


def due_at(ex: Execution, request: ApprovalRequest, at: datetime) -> list[str]:
    """What a timer of the request firing at `at` (before its deadline) finds due, as it
    is delivered again: the reminder first, then the stages in order."""
    if request.status != PENDING or at >= request.timeout:
        return []
    return [
        purpose
        for purpose, t in timer_times(ex, request).items()
        if not has_fired(request, purpose) and t <= at
    ]


# Several ways into each status: what an event finds depends on more than the status
# (is a model call outstanding, is a tool running, which requests are open).
VARIANTS: dict[str, dict[str, Callable[[], Life]]] = {
    CREATED: {"fresh": lambda: Life()},
    RUNNING: {
        "awaiting model": lambda: Life().start(),
        "ungated tool running": lambda: Life().start().reply(lookup("tu1")),
        "approved tool running": lambda: Life().start().reply(refund("tu1")).approve("apr-1"),
        "parallel: tool running, approval open": lambda: (
            Life(agent(PARALLEL)).start().reply(lookup("tu1"), refund("tu2"))
        ),
        "next turn after a rejection": lambda: Life().start().reply(refund("tu1")).reject("apr-1"),
        "parallel: tool running, quorum request with one vote": lambda: (
            Life(agent(PARALLEL, refund_tool=REFUND_BY_TWO))
            .start()
            .reply(lookup("tu1"), refund("tu2"))
            .vote("apr-2")
        ),
        "parallel: tool running, approval reminded and escalated": lambda: (
            Life(agent(PARALLEL, refund_tool=REFUND_ESCALATING))
            .start()
            .reply(lookup("tu1"), refund("tu2"))
            .fire("apr-2", REMINDER_MS)
        ),
        "approved by the clock, tool running": lambda: (
            Life(agent(refund_tool=REFUND_ON_TIMEOUT))
            .start()
            .reply(refund("tu1"), refund("tu2"))
            .time_out("apr-1")
        ),
    },
    AWAITING_APPROVAL: {
        "one request": lambda: Life().start().reply(say("checking"), refund("tu1")),
        "parallel: two requests": lambda: (
            Life(agent(PARALLEL)).start().reply(refund("tu1"), refund("tu2", 20))
        ),
        "sequential: second after first timed out": lambda: (
            Life().start().reply(refund("tu1"), refund("tu2", 20)).time_out("apr-1")
        ),
        "after an ungated tool finished": lambda: (
            Life().start().reply(lookup("tu1"), refund("tu2")).finish("tu1")
        ),
        "quorum of two, no vote yet": lambda: by_two(),
        "quorum of two, one vote in": lambda: by_two().vote("apr-1"),
        "approved if nobody answers": lambda: (
            Life(agent(refund_tool=REFUND_ON_TIMEOUT)).start().reply(refund("tu1"))
        ),
        "deadline extended as far as it goes": lambda: (
            Life().start().reply(refund("tu1")).extend("apr-1")
        ),
        "escalating, nothing due yet": lambda: escalating(),
        "escalating, first stage fired": lambda: escalating().fire("apr-1", STAGE_1_MS),
        "escalating, reminder and both stages fired": lambda: escalating().fire(
            "apr-1", STAGE_2_MS
        ),
        "escalating, deadline extended": lambda: escalating().extend("apr-1"),
    },
    COMPLETED: {
        "plain answer": lambda: Life().start().reply(say("done")),
        "after an approved tool": lambda: (
            Life().start().reply(refund("tu1")).approve("apr-1").finish("tu1").reply(say("ok"))
        ),
    },
    FAILED: {
        "model failed": lambda: Life().start().model_fails(),
        "max_iterations after a rejection": lambda: (
            Life(agent(max_iterations=1)).start().reply(refund("tu1")).reject("apr-1")
        ),
        "model failed after a failed tool": lambda: (
            Life().start().reply(refund("tu1")).approve("apr-1").fail_tool("tu1").model_fails()
        ),
    },
    STOPPED: {
        "before starting": lambda: Life().stop(),
        "while awaiting approval": lambda: Life().start().reply(refund("tu1")).stop(),
        "while a tool runs": lambda: Life().start().reply(lookup("tu1")).stop(),
    },
}


def test_every_status_has_a_variant_reached_through_decide() -> None:
    assert set(VARIANTS) == set(EXECUTION_STATUSES)
    for status, variants in VARIANTS.items():
        for name, build in variants.items():
            assert build().ex.status == status, f"{status}/{name}"


# -- representative events ---------------------------------------------------------------------


def representatives(ex: Execution, event_type: type[Event]) -> Iterator[tuple[Event, bool]]:
    """(event, fits): `fits` says the event's content fits this execution, so an execution
    whose status takes this event type must accept it; one that does not fit must be
    refused whatever the status."""
    at = (ex.updated_at or T0) + timedelta(seconds=1)
    executing = [c for c in ex.calls if c.status == EXECUTING]
    if event_type is Started:
        yield Started("exec-1", "again", at), True
    elif event_type is ModelReplied:
        turn = ex.model_turn
        yield ModelReplied(turn, (say("done"),), "end_turn", at), ex.awaiting_model
        gated = ModelReplied(
            turn,
            (refund("tu9"),),
            "tool_use",
            at,
            tickets=(Ticket("tu9", "apr-9", "why"),),
        )
        yield gated, ex.awaiting_model
        yield ModelReplied(turn + 1, (say("late"),), "end_turn", at), False
        yield ModelReplied(turn, (refund("tu9"),), "tool_use", at), False  # no ticket
        yield ModelReplied(turn, (refund("tu9"), lookup("tu9")), "tool_use", at), False
    elif event_type is ModelFailed:
        yield ModelFailed(ex.model_turn, "overloaded", at), ex.awaiting_model
        yield ModelFailed(ex.model_turn + 1, "late", at), False
    elif event_type in (ToolFinished, ToolFailed):
        make = (
            (lambda t: ToolFinished(t, "ok", at))
            if event_type is ToolFinished
            else (lambda t: ToolFailed(t, "boom", at))
        )
        for call in ex.calls:
            yield make(call.tool_use_id), call.status == EXECUTING
        if not executing:
            yield make("tu-none"), False
    elif event_type in (Approved, Rejected):
        for request in ex.requests:
            rid, fits = request.request_id, request.status == PENDING
            # A claimed or anonymous name decides a request only one approval decides.
            anyone = fits and single(request)
            if event_type is Approved:
                yield Approved(rid, at, by="bob"), anyone
                yield Approved(rid, at, by="bob", by_kind="app"), fits
                yield Approved(rid, at, by="bob", by_kind="claimed"), anyone
                yield Approved(rid, at, "bob", {"amount": 5}), anyone
                yield Approved(rid, at, "bob", {"amount": 5}, by_kind="app"), fits
                yield Approved(rid, at, "bob", {"amount": "five"}, by_kind="app"), False
                yield Approved(rid, at, "bob", {"amout": 5}, by_kind="app"), False
                yield Approved(rid, request.timeout, "bob", by_kind="app"), False
                # The person who started the run, and anyone who approved the call already.
                yield Approved(rid, at, by="carol", by_kind="app"), False
                for vote in request.votes:
                    yield Approved(rid, at, by=vote.by, by_kind="app"), False
            else:
                yield Rejected(rid, at, by="bob", reason="no"), anyone
                yield Rejected(rid, at, by="bob", reason="no", by_kind="app"), fits
                yield Rejected(rid, request.timeout, "bob", "late", by_kind="app"), False
        yield event_type("apr-unknown", at, "bob"), False
    elif event_type is TimerFired:
        for request in ex.requests:
            rid = request.request_id
            yield TimerFired(rid, request.timeout), request.status == PENDING
            # Before the deadline: accepted only where its reminder or a stage is due.
            early = {at, request.timeout - timedelta(milliseconds=1)}
            early |= set(timer_times(ex, request).values())
            for when in sorted(t for t in early if t < request.timeout):
                yield TimerFired(rid, when), bool(due_at(ex, request, when))
        yield TimerFired("apr-unknown", at + timedelta(days=1)), False
    elif event_type is Extended:
        for request in ex.requests:
            rid, latest = request.request_id, latest_deadline(ex, request)
            fits = request.status == PENDING and latest > request.timeout
            if fits:
                halfway = request.timeout + (latest - request.timeout) / 2
                yield Extended(rid, halfway, at, by="bob", by_kind="app"), True
            yield Extended(rid, latest, at, by="bob", by_kind="app"), fits
            yield Extended(rid, latest, at, by="bob", by_kind="reviewer"), fits
            # Later than the tool allows; no later than the deadline as it is.
            beyond = latest + timedelta(milliseconds=1)
            yield Extended(rid, beyond, at, by="bob", by_kind="app"), False
            yield Extended(rid, request.timeout, at, by="bob", by_kind="app"), False
            # Once the deadline has passed.
            yield Extended(rid, latest, request.timeout, by="bob", by_kind="app"), False
            # By a claimed or anonymous name, or nobody.
            yield Extended(rid, latest, at, by="bob", by_kind="claimed"), False
            yield Extended(rid, latest, at, by="bob"), False
            yield Extended(rid, latest, at), False
        yield Extended("apr-unknown", at + timedelta(days=1), at, "bob", "app"), False
    elif event_type is StopRequested:
        yield StopRequested(at, by="ops", reason="enough"), True
    elif event_type is Redefined:
        for spec in redefinitions(ex.agent).values():
            yield Redefined(spec, at), bool(ex.pending_approvals)
        yield Redefined(attrs.evolve(ex.agent, tag="other"), at), False
    else:  # pragma: no cover - a new event type needs representatives here
        raise AssertionError(f"no representative events for {event_type.__name__}")


# The events about one approval request, which name it.
DECISIONS = (Approved, Rejected, TimerFired, Extended)


def names_the_state(refusal: Refusal, ex: Execution, event: Event) -> bool:
    """Whether the message says the state the event ran into."""
    msg = str(refusal)
    code = refusal.code
    if code == "wrong_state":
        if ex.status == CREATED:
            return "not started" in msg
        if isinstance(event, Started):
            return "already started" in msg or re.search(rf"\b{ex.status}\b", msg) is not None
        return re.search(rf"\bis {ex.status}\b", msg) is not None
    if code == "already_decided":
        assert isinstance(event, DECISIONS)
        request = ex.request(event.request_id)
        assert request is not None and request.status != PENDING
        word = {TIMED_OUT: "timed out"}.get(request.status, request.status)
        return msg == standing_decision(request) and f"already {word}" in msg
    if code == "unknown_request":
        assert isinstance(event, DECISIONS)
        known = ", ".join(r.request_id for r in ex.requests) or "none"
        return f"'{event.request_id}'" in msg and f"(its requests: {known})" in msg
    if code in ("expired", "not_due"):
        assert isinstance(event, DECISIONS)
        assert code == "not_due" or not isinstance(event, TimerFired)
        request = ex.request(event.request_id)
        assert request is not None
        return request.request_id in msg and iso(request.timeout) in msg
    # The rest are about a pending request the event names.
    request = ex.request(event.request_id) if isinstance(event, DECISIONS) else None
    if code == "self_approval":
        assert isinstance(event, Approved) and request is not None
        assert ex.requested_by is not None and ex.requested_by in (event.by, event.on_behalf_of)
        return f"requested_by={ex.requested_by!r}" in msg and request.request_id in msg
    if code == "already_voted":
        assert isinstance(event, Approved) and request is not None
        assert any(v.by == event.by for v in request.votes)
        needed, _ = request.still_needed()
        return (
            f"{event.by} already approved {request.request_id}" in msg
            and f"{needed} more approval" in msg
        )
    if code == "not_granted":
        assert isinstance(event, Approved | Rejected | Extended) and request is not None
        assert event.by is None or event.by_kind not in ("reviewer", "app")
        if isinstance(event, Extended):
            return "known person" in msg and "claimed or anonymous" in msg
        assert not single(request)
        return request.request_id in msg and "claimed or anonymous" in msg
    if code == "extension_too_long":
        assert isinstance(event, Extended) and request is not None
        latest = latest_deadline(ex, request)
        assert event.until > latest
        return request.request_id in msg and iso(latest) in msg and iso(event.until) in msg
    if code == "invalid_deadline":
        assert isinstance(event, Extended) and request is not None
        if not isinstance(event.until, datetime) or event.until.tzinfo is None:
            return request.request_id in msg and "aware datetime" in msg
        assert event.until <= request.timeout
        return (
            request.request_id in msg
            and iso(request.timeout) in msg
            and iso(event.until) in msg
            and "not later" in msg
        )
    if code == "stale_model_reply":
        assert isinstance(event, ModelReplied | ModelFailed)
        waiting = f"turn {ex.model_turn}" if ex.awaiting_model else "no model call"
        return f"waiting for {waiting}" in msg and f"model turn {event.turn}" in msg
    if code == "stale_tool_result":
        assert isinstance(event, ToolFinished | ToolFailed)
        call = ex.call(event.tool_use_id)
        state = "unknown" if call is None else call.status
        return event.tool_use_id in msg and f"(it is {state})" in msg
    if code == "invalid_parameters":
        return isinstance(refusal, InvalidParameters) and refusal.tool in msg and refusal.problems
    if code == "invalid_event" and isinstance(event, Redefined):
        if event.agent.tag != ex.agent_tag:
            return f"agent '{ex.agent_tag}'" in msg
        return f"execution {ex.id} has no pending request" in msg
    if code in ("invalid_reply", "invalid_event"):
        return isinstance(event, ModelReplied) and "tool_use" in msg
    return False


STATE_CASES = [
    pytest.param(status, name, event_type, id=f"{status}[{name}]-{event_type.TAG}")
    for status, variants in VARIANTS.items()
    for name in variants
    for event_type in EVENT_TYPES
]


@pytest.mark.parametrize(("status", "variant", "event_type"), STATE_CASES)
def test_status_x_event(status: str, variant: str, event_type: type[Event]) -> None:
    ex = VARIANTS[status][variant]().ex
    assert ex.status == status
    takes = (event_type.TAG, status) in ACCEPTS
    tried = 0
    for event, fits in representatives(ex, event_type):
        tried += 1
        before = copy.deepcopy(ex)
        where = f"{status}[{variant}] x {event!r}"
        try:
            new, commands = decide(ex, event)
        except Refusal as refusal:
            assert ex == before, f"{where}: a refusal changed the execution"
            assert refusal.code in KNOWN_CODES, f"{where}: unreviewed code {refusal.code}"
            assert not (takes and fits), f"{where}: refused an event that fits: {refusal}"
            if not takes:
                decision = isinstance(event, DECISIONS)
                allowed = {"wrong_state"} | (
                    {"already_decided", "unknown_request"} if decision else set()
                )
                assert refusal.code in allowed, f"{where}: {refusal.code}: {refusal}"
            assert names_the_state(refusal, ex, event), f"{where}: message {str(refusal)!r}"
        except Exception as err:
            pytest.fail(f"{where}: raised {type(err).__name__} instead of Refusal: {err}")
        else:
            assert ex == before, f"{where}: decide() mutated its input"
            assert takes and fits, f"{where}: accepted an event that does not fit"
            move = (event.TAG, status, new.status)
            assert move in MOVES, f"{where}: move {move} is not in EXECUTION_TABLE"
            assert new.seq == ex.seq + 1
            assert new.updated_at == event.at
            assert all(isinstance(c, COMMAND_TYPES) for c in commands)
            check_request_moves(ex, new, event)
            check_decision_commands(ex, new, event, commands)
            check_timers(ex, new, event, commands)
            check_call_moves(ex, new)
    assert tried, f"no representative event of {event_type.__name__} for {status}[{variant}]"


# What a redefinition may change of a request it leaves pending: the call as the new
# definition sees it (its digest, the rule that asks, its quorum, and so the votes; and
# what the tool says an unanswered request becomes).
REVISED = ("digest", "policy", "approvals_required", "groups", "votes", "timeout_action")
# What a vote may change: who has approved, and (an edit) the call asked about.
VOTED = ("votes", "modified_params", "digest", "approvals_required", "groups")


def same_but(old: ApprovalRequest, new: ApprovalRequest, fields: tuple[str, ...]) -> bool:
    return attrs.evolve(old, **{f: getattr(new, f) for f in fields}) == new


def request_action(event: Event, old: ApprovalRequest, new: ApprovalRequest) -> str | None:
    """The action of REQUEST_TABLE that took `old` to `new` on `event`; None for a
    redefinition's revision of a request it leaves pending (not a move of the table)."""
    where = f"{event.TAG} changed request {old.request_id}"
    if isinstance(event, DECISIONS):
        assert event.request_id == old.request_id, f"{where}, not the one it names"
    if isinstance(event, Approved):
        if new.status != PENDING:
            return "approve"
        # A vote: the request has one more (or, an edit, only this) voter, short of its quorum.
        assert same_but(old, new, VOTED), where
        assert new.votes and new.votes[-1].by == event.by, where
        assert new.votes[:-1] == old.votes or len(new.votes) == 1, where
        assert new.still_needed()[0] > 0, where
        return "vote"
    if isinstance(event, Rejected):
        return "reject"
    if isinstance(event, TimerFired):
        if event.at < old.timeout:
            # Its reminder or escalation stages fired: it remembers which, nothing else.
            assert same_but(old, new, ("reminded", "stages_fired")), where
            assert (new.reminded, new.stages_fired) != (old.reminded, old.stages_fired), where
            return "escalate"
        by_clock = old.timeout_action == APPROVE and single(old)
        assert (new.outcome == APPROVED_BY_TIMEOUT) == by_clock, where
        if by_clock:
            assert new.decided_by is None, where
        return "approve_by_timeout" if by_clock else "time_out"
    if isinstance(event, Extended):
        assert new == attrs.evolve(old, timeout=event.until), where
        return "extend"
    if isinstance(event, StopRequested):
        return "cancel"
    if isinstance(event, Redefined):
        if new.status == PENDING:
            assert same_but(old, new, REVISED), where
            return None
        return {APPROVED: "approve", REJECTED: "reject", INVALIDATED: "invalidate"}[new.status]
    raise AssertionError(where)


def request_moves_of_a_step(
    old: Execution, new: Execution, event: Event
) -> set[tuple[str, str, str]]:
    """The (action, source, destination) moves the requests made in one step. None
    disappears, a new one is pending with no votes, and an event about one request
    changes that one only."""
    before = {r.request_id: r for r in old.requests}
    after = {r.request_id: r for r in new.requests}
    assert set(before) <= set(after)
    for request_id in set(after) - set(before):
        assert after[request_id].status == PENDING and after[request_id].votes == ()
    moves = set()
    for request_id, request in before.items():
        if after[request_id] != request:
            action = request_action(event, request, after[request_id])
            if action is not None:
                moves.add((action, request.status, after[request_id].status))
    return moves


def check_request_moves(old: Execution, new: Execution, event: Event) -> None:
    """Every request that changed made a move of REQUEST_TABLE."""
    moves = request_moves_of_a_step(old, new, event)
    assert moves <= REQUEST_MOVES, f"request moves {moves - REQUEST_MOVES} are not in REQUEST_TABLE"


def check_decision_commands(
    old: Execution, new: Execution, event: Event, commands: tuple[Any, ...]
) -> None:
    """What a decision tells the world: a vote is audited and shows in the inbox, and runs
    nothing; an approval runs its call once; an extension moves the request's timers; a
    timer before the deadline delivers the request again, once for each thing due."""
    if not isinstance(event, Approved | TimerFired | Extended):
        return
    rid = event.request_id
    before, after = old.request(rid), new.request(rid)
    assert before is not None and after is not None
    runs = [c for c in commands if isinstance(c, RunTool) and c.request_id == rid]
    records = [c.record for c in commands if isinstance(c, RecordDecision)]
    if isinstance(event, Extended):
        # Its deadline's timer moves, and its reminder's with it (stages stay).
        moved = attrs.evolve(before, timeout=event.until)
        was, now = still_to_come(old, before), still_to_come(new, moved)
        timers = [
            CancelTimer(rid, before.timeout),
            *(CancelTimer(rid, t) for t in sorted(was - now)),
            StartTimer(rid, event.until),
            *(StartTimer(rid, t) for t in sorted(now - was)),
        ]
        assert list(commands[: len(timers)]) == timers
        assert [type(c) for c in commands[len(timers) :]] == [
            RecordDecision,
            ReviseApprovalRequest,
        ]
        assert [(r.request_id, r.decision, r.by, r.by_kind) for r in records] == [
            (rid, "extended", event.by, event.by_kind)
        ]
        assert commands[-1] == ReviseApprovalRequest(after)
    elif isinstance(event, TimerFired) and event.at < before.timeout:
        # Its reminder or stages: delivered again, each once, and their timers are done.
        purposes = due_at(old, before, event.at)
        assert purposes, f"a timer at {iso(event.at)} found nothing due, yet was taken"
        stages = [int(p.removeprefix("stage:")) for p in purposes if p != "reminder"]
        assert after == attrs.evolve(
            before,
            reminded=before.reminded or "reminder" in purposes,
            stages_fired=max(stages, default=before.stages_fired),
        )
        times = timer_times(old, before)
        assert commands == (
            *(CancelTimer(rid, t) for t in sorted({times[p] for p in purposes})),
            *(DeliverAgain(after, p) for p in purposes),
            ReviseApprovalRequest(after),
        )
        assert (new.status, new.calls) == (old.status, old.calls)
    elif after.status == PENDING:  # a vote
        assert [type(c) for c in commands] == [RecordDecision, ReviseApprovalRequest]
        assert [(r.request_id, r.decision, r.by, r.by_kind) for r in records] == [
            (rid, "vote", event.by, event.by_kind)
        ]
        assert commands[1] == ReviseApprovalRequest(after)
    elif after.status == APPROVED:
        assert [r.idempotency_key for r in runs] == [rid]
        assert [r.decision for r in records if r.request_id == rid] == [after.outcome]
    else:
        assert runs == []


def timer_rows(rows: Any, request_id: str) -> tuple[set[datetime], set[datetime]]:
    """(started, cancelled): the due times of the request's timer rows a step writes."""
    return (
        {t.due_at for t in rows.timers_started if t.request_id == request_id},
        {t.due_at for t in rows.timers_cancelled if t.request_id == request_id},
    )


def check_timers(old: Execution, new: Execution, event: Event, commands: tuple[Any, ...]) -> None:
    """A request opened starts the timers of its deadline, its reminder and its stages;
    one decided cancels its deadline's and every one still to come (as the store writes
    them: core.rows)."""
    rows = writes(new, event, commands)
    before = {r.request_id: r for r in old.requests}
    for request in new.requests:
        rid = request.request_id
        was = before.get(rid)
        started, cancelled = timer_rows(rows, rid)
        if was is None:
            assert started == {request.timeout, *still_to_come(new, request)}, rid
            assert cancelled == set(), rid
        elif was.status == PENDING and request.status != PENDING:
            assert cancelled == {was.timeout, *still_to_come(old, was)}, rid
            assert started == set(), rid


def call_moves_of_a_step(old: Execution, new: Execution) -> set[tuple[str, str]]:
    """The (source, destination) moves the tool calls made in one step. A call is born
    'queued', so a new call in any other status moved from 'queued'. Calls of a turn
    that ended leave the state with it."""
    before = {c.tool_use_id: c.status for c in old.calls}
    moves = set()
    for call in new.calls:
        source = before.get(call.tool_use_id, QUEUED)
        if call.status != source:
            moves.add((source, call.status))
    return moves


def check_call_moves(old: Execution, new: Execution) -> None:
    allowed = {(s, d) for _, s, dests in machine.CALL_TABLE for d in dests}
    for move in call_moves_of_a_step(old, new):
        assert move in allowed, f"tool call move {move} is not in CALL_TABLE"


# -- every request status x every decision --------------------------------------------------


def two_refunds(order: str = SEQUENTIAL) -> Life:
    return Life(agent(order)).start().reply(refund("tu1"), refund("tu2", 20))


def _cancelled_in_live_execution() -> Life:
    """Unreachable through decide() (stop cancels everything and stops the execution):
    a cancelled request in an execution that still takes decisions."""
    life = two_refunds(PARALLEL)
    first = attrs.evolve(life.ex.requests[0], status=CANCELLED, decided_by="ops")
    life.ex = attrs.evolve(life.ex, requests=(first, *life.ex.requests[1:]))
    return life


# The request under test is always apr-1; where reachable, apr-2 keeps the execution live.
REQUEST_VARIANTS: dict[str, dict[str, Callable[[], Life]]] = {
    PENDING: {
        "sequential": lambda: two_refunds(),
        "parallel": lambda: two_refunds(PARALLEL),
    },
    APPROVED: {
        "tool still running": lambda: two_refunds().approve("apr-1"),
        "tool done, next request open": lambda: two_refunds().approve("apr-1").finish("tu1"),
        "with modified params": lambda: (
            two_refunds().approve("apr-1", modified_params={"amount": 3}).finish("tu1")
        ),
    },
    REJECTED: {"next request open": lambda: two_refunds().reject("apr-1")},
    INVALIDATED: {
        # apr-1 asks for 10, apr-2 for 20: only apr-1 no longer fits refunds from 15.
        "next request open": lambda: two_refunds().redefine("refund from 15"),
        "parallel": lambda: two_refunds(PARALLEL).redefine("refund from 15"),
    },
    TIMED_OUT: {"next request open": lambda: two_refunds().time_out("apr-1")},
    CANCELLED: {
        "execution stopped": lambda: two_refunds().stop(),
        "live execution (evolved)": _cancelled_in_live_execution,
    },
}
OUTCOME = {
    "approve": APPROVED,
    "reject": REJECTED,
    "timer": TIMED_OUT,
    "stop": CANCELLED,
    "extend": PENDING,
}
ACTION = {
    "approve": "approve",
    "reject": "reject",
    "timer": "time_out",
    "stop": "cancel",
    "extend": "extend",
}
# The decision each audits.
RECORDED = {**OUTCOME, "extend": "extended"}


def decision_event(ex: Execution, decision: str) -> Event:
    request = ex.request("apr-1")
    assert request is not None
    at = (ex.updated_at or T0) + timedelta(seconds=1)
    assert request.status != PENDING or at < request.timeout
    if decision == "approve":
        return Approved("apr-1", at, by="bob")
    if decision == "reject":
        return Rejected("apr-1", at, by="bob", reason="no")
    if decision == "timer":
        return TimerFired("apr-1", max(request.timeout, at))
    if decision == "extend":
        until = max(latest_deadline(ex, request), at + timedelta(seconds=1))
        return Extended("apr-1", until, at, by="bob", by_kind="app")
    return StopRequested(at, by="ops")


def test_every_request_status_has_a_variant() -> None:
    assert set(REQUEST_VARIANTS) == set(REQUEST_STATUSES)
    for status, variants in REQUEST_VARIANTS.items():
        for name, build in variants.items():
            request = build().ex.request("apr-1")
            assert request is not None and request.status == status, f"{status}/{name}"


REQUEST_CASES = [
    pytest.param(status, name, decision, id=f"{status}[{name}]-{decision}")
    for status, variants in REQUEST_VARIANTS.items()
    for name in variants
    for decision in OUTCOME
]


@pytest.mark.parametrize(("status", "variant", "decision"), REQUEST_CASES)
def test_request_status_x_decision(status: str, variant: str, decision: str) -> None:
    ex = REQUEST_VARIANTS[status][variant]().ex
    request = ex.request("apr-1")
    assert request is not None
    event = decision_event(ex, decision)
    before = copy.deepcopy(ex)
    where = f"request {status}[{variant}] x {decision}"
    try:
        new, commands = decide(ex, event)
    except Refusal as refusal:
        assert ex == before, f"{where}: a refusal changed the execution"
        if decision == "stop":
            # Stop is about the execution, not the request: only a finished one refuses it.
            assert ex.status in TERMINAL, f"{where}: {refusal}"
            assert refusal.code == "wrong_state"
            assert re.search(rf"\bis {ex.status}\b", str(refusal)), str(refusal)
        else:
            assert status != PENDING, f"{where}: refused a decision on a pending request"
            assert refusal.code == "already_decided", f"{where}: {refusal.code}: {refusal}"
            assert str(refusal) == standing_decision(request)
            word = {TIMED_OUT: "timed out"}.get(status, status)
            assert f"already {word}" in str(refusal)
            if request.decided_by:
                assert f"by {request.decided_by}" in str(refusal)
    except Exception as err:
        pytest.fail(f"{where}: raised {type(err).__name__} instead of Refusal: {err}")
    else:
        assert ex == before, f"{where}: decide() mutated its input"
        assert (event.TAG, ex.status, new.status) in MOVES
        decided = new.request("apr-1")
        assert decided is not None
        records = [
            c.record
            for c in commands
            if isinstance(c, RecordDecision) and c.record.request_id == "apr-1"
        ]
        runs = [c for c in commands if isinstance(c, RunTool) and c.tool_use_id == "tu1"]
        if status == PENDING:
            assert decided.status == OUTCOME[decision]
            assert (ACTION[decision], PENDING, decided.status) in REQUEST_MOVES
            assert [r.decision for r in records] == [RECORDED[decision]]
            if decision == "extend":
                assert isinstance(event, Extended) and decided.timeout == event.until
            if decision == "approve":
                assert [(r.idempotency_key, r.request_id) for r in runs] == [("apr-1", "apr-1")]
            else:
                assert runs == []
        else:
            # Only a stop gets past a decided request, and it leaves the request alone.
            assert decision == "stop", f"{where}: accepted a second decision"
            assert decided == request
            assert records == [] and runs == []
        check_request_moves(ex, new, event)


def test_decision_after_the_deadline_is_refused_as_expired() -> None:
    ex = two_refunds().ex
    request = ex.request("apr-1")
    assert request is not None
    for event in (
        Approved("apr-1", request.timeout, by="bob"),
        Rejected("apr-1", request.timeout + timedelta(hours=1), by="bob"),
    ):
        with pytest.raises(Refusal) as caught:
            decide(ex, event)
        assert caught.value.code == "expired"
        assert iso(request.timeout) in str(caught.value)
    with pytest.raises(Refusal) as early:
        decide(ex, TimerFired("apr-1", request.timeout - timedelta(microseconds=1)))
    assert early.value.code == "not_due"


# -- every move of the tables is one decide() takes --------------------------------------------

# What a model may say in one turn, for the walk below.
REPLIES: dict[str, tuple[Callable[[int], list[dict[str, Any]]], str]] = {
    "answer": (lambda t: [say("done")], "end_turn"),
    "cut off": (lambda t: [say("partial")], "max_tokens"),
    "refund": (lambda t: [refund(f"t{t}a")], "tool_use"),
    "lookup": (lambda t: [lookup(f"t{t}a")], "tool_use"),
    "unknown tool": (lambda t: [use(f"t{t}a", "teleport", {})], "tool_use"),
    "invalid refund": (lambda t: [use(f"t{t}a", "refund", {"amount": "lots"})], "tool_use"),
    "two refunds": (lambda t: [refund(f"t{t}a"), refund(f"t{t}b", 20)], "tool_use"),
    "refund, lookup": (lambda t: [refund(f"t{t}a"), lookup(f"t{t}b")], "tool_use"),
    "lookup, refund": (lambda t: [lookup(f"t{t}a"), refund(f"t{t}b")], "tool_use"),
    # A call answered at once shows in the state only while another one is open.
    "unknown tool, refund": (
        lambda t: [use(f"t{t}a", "teleport", {}), refund(f"t{t}b")],
        "tool_use",
    ),
}


def candidate_events(ex: Execution) -> Iterator[Event]:
    """Every event worth trying on `ex`; decide() refuses those that do not fit."""
    at = (ex.updated_at or T0) + timedelta(seconds=1)
    yield Started("exec-1", "go", at)
    turn = ex.model_turn
    for make, stop_reason in REPLIES.values():
        blocks = make(turn)
        tickets = tuple(
            Ticket(b["id"], f"apr-{b['id']}", "why") for b in blocks if b["type"] == "tool_use"
        )
        yield ModelReplied(turn, tuple(blocks), stop_reason, at, tickets=tickets)
    yield ModelFailed(turn, "overloaded", at)
    for call in ex.calls:
        yield ToolFinished(call.tool_use_id, "ok", at)
        yield ToolFailed(call.tool_use_id, "boom", at)
    for request in ex.pending_approvals:
        # Two people Clearance knows, so a quorum of two can be met.
        yield Approved(request.request_id, at, by="bob", by_kind="app")
        yield Approved(request.request_id, at, by="dana", by_kind="app")
        yield Rejected(request.request_id, at, by="bob", reason="no", by_kind="app")
        yield TimerFired(request.request_id, max(at, request.timeout))
        # The first of its reminder and stages to come (each one a timer of its own).
        coming = sorted(still_to_come(ex, request))
        if coming:
            yield TimerFired(request.request_id, max(at, coming[0]))
        until = request.timestamp + timedelta(milliseconds=MAX_TIMEOUT_MS)
        yield Extended(request.request_id, until, at, by="bob", by_kind="app")
    for spec in redefinitions(ex.agent).values():
        yield Redefined(spec, at)
    yield StopRequested(at, by="ops")


def signature(ex: Execution) -> tuple[Any, ...]:
    return (
        ex.agent.approval_order,
        ex.agent.max_iterations,
        tuple(
            (
                t.tag,
                t.gated,
                t.input_schema == REFUND_FROM_15.input_schema,
                t.approvals_required,
                t.timeout_action,
                t.max_timeout_ms,
                t.remind_before_ms,
                len(t.escalation),
            )
            for t in ex.agent.tools
        ),
        ex.status,
        ex.awaiting_model,
        ex.model_turn,
        tuple((c.tool, c.status) for c in ex.calls),
        # Who has voted for each pending request, whether its deadline was extended, and
        # what of its reminder and stages has fired.
        tuple(
            (
                r.approvals_required,
                tuple(v.by for v in r.votes),
                r.timeout - r.timestamp,
                r.reminded,
                r.stages_fired,
            )
            for r in ex.pending_approvals
        ),
    )


@attrs.frozen
class Walked:
    taken: set[tuple[str, str, str]]  # (event, source, destination) of executions
    call_moves: set[tuple[str, str]]
    request_moves: set[tuple[str, str, str]]  # (action, source, destination)


def walk(depth: int = 7) -> Walked:
    """Breadth-first over every event sequence (up to `depth` events, states told apart by
    what decides their future): the execution, tool-call and request moves decide() takes.
    Agents of every approval order; with room for one, two or many model turns; and with
    refunds two people must approve, that nobody answering approves, or that are
    reminded and escalated while nobody answers."""
    frontier = [
        Execution(agent=agent(order, limit))
        for order in (SEQUENTIAL, PARALLEL)
        for limit in (1, 2, 20)
    ]
    frontier += [
        Execution(agent=agent(order, refund_tool=REFUND_BY_TWO)) for order in (SEQUENTIAL, PARALLEL)
    ]
    frontier.append(Execution(agent=agent(refund_tool=REFUND_ON_TIMEOUT)))
    frontier += [
        Execution(agent=agent(order, refund_tool=REFUND_ESCALATING))
        for order in (SEQUENTIAL, PARALLEL)
    ]
    seen = {signature(ex) for ex in frontier}
    walked = Walked(set(), set(), set())
    for _ in range(depth):
        following = []
        for ex in frontier:
            for event in candidate_events(ex):
                try:
                    new, _ = decide(ex, event)
                except Refusal:
                    continue
                walked.taken.add((event.TAG, ex.status, new.status))
                walked.call_moves.update(call_moves_of_a_step(ex, new))
                walked.request_moves.update(request_moves_of_a_step(ex, new, event))
                if signature(new) not in seen:
                    seen.add(signature(new))
                    following.append(new)
        frontier = following
    return walked


WALKED = walk()


def test_every_move_of_the_execution_table_is_one_decide_takes() -> None:
    """A row no run can take is a wrong specification: it would let a bug in decide()
    through unnoticed. (decide() refuses to take a move that is not a row.)"""
    never = MOVES - WALKED.taken
    assert not never, f"moves of EXECUTION_TABLE no event sequence takes: {sorted(never)}"
    assert WALKED.taken <= MOVES


def test_every_move_of_the_tool_call_table_is_one_decide_takes() -> None:
    rows = {(s, d) for _, s, dests in machine.CALL_TABLE for d in dests}
    assert WALKED.call_moves == rows


def test_every_move_of_the_request_table_is_one_decide_takes() -> None:
    assert WALKED.request_moves == REQUEST_MOVES


# -- the tool call's own table -------------------------------------------------------------------


def test_the_tool_call_table_is_the_reviewed_one() -> None:
    from clearance.core.execution import CALL_STATUSES, DONE

    assert set(CALL_STATUSES) == {
        QUEUED,
        "awaiting_approval",
        EXECUTING,
        DONE,
        REJECTED,
        TIMED_OUT,
        CANCELLED,
        INVALIDATED,
    }
    # A tool call's status never reads like an execution's ("running" was both).
    assert EXECUTING == "executing"
    assert not set(CALL_STATUSES) & {RUNNING, COMPLETED, FAILED, STOPPED, CREATED}
    assert {(t, s, d) for t, s, dests in machine.CALL_TABLE for d in dests} == {
        ("gate", QUEUED, "awaiting_approval"),
        ("run", QUEUED, EXECUTING),
        ("answer", QUEUED, DONE),
        ("approve", "awaiting_approval", EXECUTING),
        ("reject", "awaiting_approval", REJECTED),
        ("time_out", "awaiting_approval", TIMED_OUT),
        ("finish", EXECUTING, DONE),
        ("cancel", QUEUED, CANCELLED),
        ("cancel", "awaiting_approval", CANCELLED),
        ("invalidate", "awaiting_approval", INVALIDATED),
    }
    for action, _, _ in machine.CALL_TABLE:
        for source in CALL_STATUSES:
            allowed = {d for d in CALL_STATUSES if machine.call_move_allowed(action, source, d)}
            looked_up = {d for a, s, d in machine.CALL_MOVES if (a, s) == (action, source)}
            assert allowed == looked_up, (action, source)


def test_a_decided_call_keeps_its_outcome_and_the_model_gets_one_result_each() -> None:
    life = two_refunds()
    life.reject("apr-1")
    assert [c.status for c in life.ex.calls] == [REJECTED, "awaiting_approval"]
    life.time_out("apr-2")
    assert life.ex.calls == () and life.ex.awaiting_model
    results = life.ex.messages[-1]["content"]
    assert [(r["tool_use_id"], r["is_error"]) for r in results] == [("tu1", True), ("tu2", True)]
    assert "approval_rejected" in results[0]["content"]
    assert "approval_timeout" in results[1]["content"]


# -- quorums, approval by timeout, extensions -----------------------------------------------------


def records_of(commands: tuple[Any, ...]) -> list[tuple[str, str | None, str | None]]:
    return [
        (c.record.decision, c.record.by, c.record.by_kind)
        for c in commands
        if isinstance(c, RecordDecision)
    ]


def runs_of(commands: tuple[Any, ...]) -> list[tuple[str, str, dict[str, Any], str | None]]:
    return [
        (c.tool_use_id, c.idempotency_key, c.parameters, c.approved_by)
        for c in commands
        if isinstance(c, RunTool)
    ]


def test_a_quorum_of_two_runs_the_call_once_two_distinct_people_approved() -> None:
    life = by_two()
    request = life.ex.request("apr-1")
    assert request is not None
    assert (request.approvals_required, request.votes, request.requested_by) == (2, (), "carol")
    # The first vote: audited as a vote and shown in the inbox; the request stays open,
    # its deadline stands, and nothing runs.
    voted, commands = decide(life.ex, Approved("apr-1", life.now(), by="alice", by_kind="app"))
    pending = voted.request("apr-1")
    assert pending is not None and pending.status == PENDING
    assert [v.by for v in pending.votes] == ["alice"] and pending.still_needed() == (1, ())
    assert pending.decided_by is None and pending.outcome is None
    assert voted.status == AWAITING_APPROVAL
    assert [c.status for c in voted.calls] == ["awaiting_approval"]
    assert records_of(commands) == [("vote", "alice", "app")]
    assert runs_of(commands) == []
    assert [type(c) for c in commands] == [RecordDecision, ReviseApprovalRequest]
    assert commands[1] == ReviseApprovalRequest(pending)
    # The same person again counts for nothing: refused, and nothing changes.
    before = copy.deepcopy(voted)
    with pytest.raises(Refusal) as again:
        decide(voted, Approved("apr-1", life.now(), by="alice", by_kind="reviewer"))
    assert again.value.code == "already_voted"
    assert "alice already approved apr-1" in str(again.value)
    assert "1 more approval " in str(again.value)
    assert voted == before
    # A second person: the quorum is met, the call runs, once.
    done, commands = decide(voted, Approved("apr-1", life.now(), by="bob", by_kind="reviewer"))
    approved = done.request("apr-1")
    assert approved is not None and approved.status == APPROVED
    assert (approved.outcome, approved.decided_by, approved.decided_by_kind) == (
        APPROVED,
        "bob",
        "reviewer",
    )
    assert [v.by for v in approved.votes] == ["alice", "bob"]
    assert records_of(commands) == [("approved", "bob", "reviewer")]
    assert runs_of(commands) == [("tu1", "apr-1", {"amount": 10}, "bob")]
    assert done.status == RUNNING and [c.status for c in done.calls] == [EXECUTING]
    # A third approval is a second decision.
    with pytest.raises(Refusal) as late:
        decide(done, Approved("apr-1", life.now(), by="dana", by_kind="app"))
    assert late.value.code == "already_decided"


@pytest.mark.parametrize("tool", [REFUND, REFUND_BY_TWO], ids=["one", "two"])
def test_the_person_who_started_the_run_may_not_approve_its_calls(tool: ToolSpec) -> None:
    life = Life(agent(refund_tool=tool)).start().reply(refund("tu1"))
    assert life.ex.requested_by == "carol"
    at = life.now()
    for event in (
        Approved("apr-1", at, by="carol", by_kind="app"),
        Approved("apr-1", at, by="carol", by_kind="reviewer"),
        # Nor someone using carol's delegated grants.
        Approved("apr-1", at, by="dave", by_kind="reviewer", on_behalf_of="carol"),
    ):
        with pytest.raises(Refusal) as caught:
            decide(life.ex, event)
        assert caught.value.code == "self_approval", event
        assert "requested_by='carol'" in str(caught.value) and "apr-1" in str(caught.value)
    new, _ = decide(life.ex, Approved("apr-1", at, by="dave", by_kind="app"))
    request = new.request("apr-1")
    assert request is not None and [v.by for v in request.votes] == (
        ["dave"] if tool is REFUND_BY_TWO else []
    )


def test_a_quorum_counts_only_people_clearance_knows() -> None:
    ex = by_two().ex
    at = (ex.updated_at or T0) + timedelta(seconds=1)
    for event in (
        Approved("apr-1", at),
        Approved("apr-1", at, by="bob"),
        Approved("apr-1", at, by="bob", by_kind="claimed"),
        Rejected("apr-1", at),
        Rejected("apr-1", at, by="bob", reason="no"),
        Rejected("apr-1", at, by="bob", reason="no", by_kind="claimed"),
    ):
        with pytest.raises(Refusal) as caught:
            decide(ex, event)
        assert caught.value.code == "not_granted", event
    # Any one known person's rejection rejects it at once.
    new, commands = decide(ex, Rejected("apr-1", at, by="bob", reason="no", by_kind="app"))
    request = new.request("apr-1")
    assert request is not None and request.status == REJECTED
    assert records_of(commands) == [("rejected", "bob", "app")]


def test_an_edit_starts_the_count_again_with_the_editors_vote() -> None:
    life = by_two().vote("apr-1", by="alice")
    first = life.ex.request("apr-1")
    assert first is not None and first.digest is not None
    edit = Approved("apr-1", life.now(), by="bob", by_kind="app", modified_params={"amount": 5})
    edited_ex, commands = decide(life.ex, edit)
    edited = edited_ex.request("apr-1")
    assert edited is not None and edited.status == PENDING
    assert [v.by for v in edited.votes] == ["bob"]  # alice approved another call
    assert edited.parameters == first.parameters == {"amount": 10}  # as the model proposed
    assert edited.modified_params == {"amount": 5}
    assert edited.effective_parameters() == {"amount": 5}
    assert edited.digest is not None and edited.digest != first.digest
    assert records_of(commands) == [("vote", "bob", "app")]
    records = [c.record for c in commands if isinstance(c, RecordDecision)]
    assert records[0].modified_params == {"amount": 5}
    assert runs_of(commands) == [] and ReviseApprovalRequest(edited) in commands
    # A decision made for the call as it was is stale now.
    with pytest.raises(Refusal) as stale:
        decide(
            edited_ex, Approved("apr-1", life.now(), "alice", by_kind="app", digest=first.digest)
        )
    assert stale.value.code == "stale_decision"
    # bob's edit counts as his approval: alice approving the edited call meets the quorum,
    # and the call runs as edited.
    ok = Approved("apr-1", life.now(), by="alice", by_kind="app", digest=edited.digest)
    done, commands = decide(edited_ex, ok)
    approved = done.request("apr-1")
    assert approved is not None and approved.status == APPROVED
    assert approved.outcome == "approved_modified" and approved.modified_params == {"amount": 5}
    assert runs_of(commands) == [("tu1", "apr-1", {"amount": 5}, "alice")]
    # bob again, for the call he edited: already counted.
    with pytest.raises(Refusal) as again:
        decide(edited_ex, Approved("apr-1", life.now(), by="bob", by_kind="app"))
    assert again.value.code == "already_voted"


def test_a_request_nobody_answers_is_approved_where_the_tool_says_so() -> None:
    life = Life(agent(refund_tool=REFUND_ON_TIMEOUT)).start().reply(refund("tu1"))
    request = life.ex.request("apr-1")
    assert request is not None and request.timeout_action == APPROVE
    ex, commands = decide(life.ex, TimerFired("apr-1", request.timeout))
    decided = ex.request("apr-1")
    assert decided is not None and decided.status == APPROVED
    assert decided.outcome == APPROVED_BY_TIMEOUT
    assert decided.decided_by is None and decided.decided_by_kind is None
    assert decided.decided_at == request.timeout
    assert records_of(commands) == [(APPROVED_BY_TIMEOUT, None, None)]
    assert runs_of(commands) == [("tu1", "apr-1", {"amount": 10}, None)]
    assert CancelTimer("apr-1") in commands
    assert ex.status == RUNNING and [c.status for c in ex.calls] == [EXECUTING]
    assert ex.calls[0].approved_by is None
    # Decided: nobody decides it after the clock did.
    with pytest.raises(Refusal) as late:
        decide(ex, Approved("apr-1", request.timeout, by="bob"))
    assert late.value.code == "already_decided"
    # Before the deadline, a person still decides it as usual.
    rejected, _ = decide(life.ex, Rejected("apr-1", life.now(), by="bob", reason="no"))
    assert [r.status for r in rejected.requests] == [REJECTED]


@pytest.mark.parametrize("votes", [0, 1])
def test_approval_by_timeout_never_completes_a_quorum(votes: int) -> None:
    tool = ToolSpec(
        tag="refund",
        description="",
        input_schema=REFUND.input_schema,
        gated=True,
        approval_timeout_ms=TIMEOUT_MS,
        approvals_required=2,
        timeout_action="approve",
    )
    life = Life(agent(refund_tool=tool)).start().reply(refund("tu1"))
    if votes:
        life.vote("apr-1")
    request = life.ex.request("apr-1")
    assert request is not None and request.approvals_required == 2
    assert request.timeout_action == APPROVE and len(request.votes) == votes
    ex, commands = decide(life.ex, TimerFired("apr-1", request.timeout))
    decided = ex.request("apr-1")
    assert decided is not None and decided.status == TIMED_OUT and decided.outcome == TIMED_OUT
    assert records_of(commands) == [(TIMED_OUT, None, None)]
    assert runs_of(commands) == []
    # The model hears that the call timed out, as for any other.
    assert ex.status == RUNNING and ex.awaiting_model and ex.calls == ()
    results = ex.messages[-1]["content"]
    assert [(r["tool_use_id"], r["is_error"]) for r in results] == [("tu1", True)]
    assert "approval_timeout" in results[0]["content"]


def test_an_extension_moves_the_deadline_and_its_timer() -> None:
    life = Life().start().reply(refund("tu1"))
    request = life.ex.request("apr-1")
    assert request is not None
    latest = request.timestamp + timedelta(milliseconds=MAX_TIMEOUT_MS)
    until = request.timeout + timedelta(minutes=2)
    event = Extended("apr-1", until, life.now(), by="alice", by_kind="reviewer")
    ex, commands = decide(life.ex, event)
    moved = ex.request("apr-1")
    assert moved == attrs.evolve(request, timeout=until)
    assert moved.to_dict()["timeout"] == iso(until)
    assert ex.status == AWAITING_APPROVAL and ex.calls == life.ex.calls
    assert [type(c) for c in commands] == [
        CancelTimer,
        StartTimer,
        RecordDecision,
        ReviseApprovalRequest,
    ]
    assert commands[:2] == (CancelTimer("apr-1", request.timeout), StartTimer("apr-1", until))
    assert records_of(commands) == [("extended", "alice", "reviewer")]
    assert commands[3] == ReviseApprovalRequest(moved)
    # The timer for the old deadline is not due any more; an approval after the old
    # deadline is in time; the new deadline times the request out.
    with pytest.raises(Refusal) as early:
        decide(ex, TimerFired("apr-1", request.timeout))
    assert early.value.code == "not_due" and iso(until) in str(early.value)
    after_old = request.timeout + timedelta(seconds=1)
    approved, _ = decide(ex, Approved("apr-1", after_old, by="bob"))
    assert [r.status for r in approved.requests] == [APPROVED]
    timed_out, _ = decide(ex, TimerFired("apr-1", until))
    assert [r.status for r in timed_out.requests] == [TIMED_OUT]
    # Later again, up to the tool's longest deadline and no further; never earlier.
    at = life.now()
    for refused, code in (
        (
            Extended("apr-1", latest + timedelta(milliseconds=1), at, "alice", "app"),
            "extension_too_long",
        ),
        (Extended("apr-1", until, at, "alice", "app"), "invalid_deadline"),
        (
            Extended("apr-1", request.timeout + timedelta(seconds=1), at, "alice", "app"),
            "invalid_deadline",
        ),
        # No time at all, or one with no timezone.
        (Extended("apr-1", latest.replace(tzinfo=None), at, "alice", "app"), "invalid_deadline"),
        (Extended("apr-1", "tomorrow", at, "alice", "app"), "invalid_deadline"),  # type: ignore[arg-type]
        (Extended("apr-1", latest, until, "alice", "app"), "expired"),
        (Extended("apr-1", latest, at, "alice", "claimed"), "not_granted"),
        (Extended("apr-1", latest, at), "not_granted"),
    ):
        with pytest.raises(Refusal) as caught:
            decide(ex, refused)
        assert caught.value.code == code, refused
    furthest, _ = decide(ex, Extended("apr-1", latest, at, "alice", "app"))
    assert [r.timeout for r in furthest.requests] == [latest]


def test_a_tool_without_a_longest_deadline_cannot_be_extended() -> None:
    tool = attrs.evolve(REFUND, max_timeout_ms=None)
    life = Life(agent(refund_tool=tool)).start().reply(refund("tu1"))
    request = life.ex.request("apr-1")
    assert request is not None
    event = Extended("apr-1", request.timeout + timedelta(seconds=1), life.now(), "alice", "app")
    with pytest.raises(Refusal) as caught:
        decide(life.ex, event)
    assert caught.value.code == "extension_too_long"
    assert iso(request.timeout) in str(caught.value)


# -- reminders and escalation stages -------------------------------------------------------------

APP_HOOK = "https://app.example/approvals"


def since_opened(request: ApprovalRequest, ms: int) -> datetime:
    return request.timestamp + timedelta(milliseconds=ms)


def test_opening_a_request_starts_a_timer_for_its_deadline_reminder_and_each_stage() -> None:
    life = Life(agent(refund_tool=REFUND_ESCALATING)).start()
    event = ModelReplied(
        life.ex.model_turn,
        (refund("tu1"),),
        "tool_use",
        life.now(),
        tickets=(Ticket("tu1", "apr-1", "why"),),
    )
    ex, commands = decide(life.ex, event)
    request = ex.request("apr-1")
    assert request is not None and (request.reminded, request.stages_fired) == (False, 0)
    starts = [c for c in commands if isinstance(c, StartTimer)]
    assert sorted(c.due_at for c in starts) == [
        since_opened(request, STAGE_1_MS),
        since_opened(request, REMINDER_MS),
        since_opened(request, STAGE_2_MS),
        request.timeout,
    ]
    assert {c.request_id for c in starts} == {"apr-1"}
    started, cancelled = timer_rows(writes(ex, event, commands), "apr-1")
    assert started == {c.due_at for c in starts} and cancelled == set()
    # A tool with no reminder and no stages: the deadline's timer only.
    plain = Life().start().reply(refund("tu1"))
    plain_request = plain.ex.request("apr-1")
    assert plain_request is not None
    assert still_to_come(plain.ex, plain_request) == set()


def test_the_reminder_and_each_stage_fire_once_in_their_order() -> None:
    life = escalating()
    request = life.ex.request("apr-1")
    assert request is not None
    ex = life.ex
    for ms, purposes, fired in (
        (STAGE_1_MS, ["stage:1"], (False, 1)),
        (REMINDER_MS, ["reminder"], (True, 1)),
        (STAGE_2_MS, ["stage:2"], (True, 2)),
    ):
        at = since_opened(request, ms)
        # Not before its time: a timer a millisecond early finds nothing due.
        with pytest.raises(Refusal) as early:
            decide(ex, TimerFired("apr-1", at - timedelta(milliseconds=1)))
        assert early.value.code == "not_due"
        event = TimerFired("apr-1", at)
        new, commands = decide(ex, event)
        now = new.request("apr-1")
        assert now is not None and now.status == PENDING
        assert now == attrs.evolve(request, reminded=fired[0], stages_fired=fired[1])
        assert (new.status, new.calls) == (AWAITING_APPROVAL, ex.calls)
        assert commands == (
            CancelTimer("apr-1", at),
            *(DeliverAgain(now, p) for p in purposes),
            ReviseApprovalRequest(now),
        )
        assert timer_rows(writes(new, event, commands), "apr-1") == (set(), {at})
        # Once: the same timer again (another process, a retried sweep) finds nothing due.
        with pytest.raises(Refusal) as again:
            decide(new, TimerFired("apr-1", at))
        assert again.value.code == "not_due", purposes
        assert "apr-1" in str(again.value) and iso(request.timeout) in str(again.value)
        ex = new
    # Nothing is left before the deadline; at it, the request times out.
    with pytest.raises(Refusal) as early:
        decide(ex, TimerFired("apr-1", request.timeout - timedelta(milliseconds=1)))
    assert early.value.code == "not_due"
    timed_out, _ = decide(ex, TimerFired("apr-1", request.timeout))
    assert [r.status for r in timed_out.requests] == [TIMED_OUT]


def test_a_late_timer_fires_the_reminder_and_both_stages_in_one_step() -> None:
    spec = attrs.evolve(agent(refund_tool=REFUND_ESCALATING), approval_webhook=APP_HOOK)
    life = Life(spec).start().reply(refund("tu1"))
    request = life.ex.request("apr-1")
    assert request is not None
    event = TimerFired("apr-1", request.timeout - timedelta(seconds=1))
    ex, commands = decide(life.ex, event)
    fired = ex.request("apr-1")
    assert fired == attrs.evolve(request, reminded=True, stages_fired=2)
    times = [since_opened(request, ms) for ms in (STAGE_1_MS, REMINDER_MS, STAGE_2_MS)]
    assert commands == (
        *(CancelTimer("apr-1", t) for t in times),
        DeliverAgain(fired, "reminder"),
        DeliverAgain(fired, "stage:1"),
        DeliverAgain(fired, "stage:2"),
        ReviseApprovalRequest(fired),
    )
    rows = writes(ex, event, commands)
    assert timer_rows(rows, "apr-1") == (set(), set(times))
    # The reminder on the agent's channels, a stage on its own (stage 2 has none).
    assert [(d.purpose, d.target, d.expires_at) for d in rows.deliveries] == [
        ("reminder", APP_HOOK, request.timeout),
        ("stage:1", LEAD_HOOK, request.timeout),
    ]
    assert len({d.message_id for d in rows.deliveries}) == 2
    # Each once: their own timers, should they still fire, find nothing due.
    for at in times:
        with pytest.raises(Refusal) as again:
            decide(ex, TimerFired("apr-1", at))
        assert again.value.code == "not_due"


def _decide_escalated(how: str) -> tuple[Execution, Event, tuple[Any, ...], ApprovalRequest]:
    """apr-1 with its first stage fired, then decided `how`: (state, event, commands,
    the request as it was)."""
    life = escalating().fire("apr-1", STAGE_1_MS)
    request = life.ex.request("apr-1")
    assert request is not None and request.stages_fired == 1
    at = life.now()
    events: dict[str, Event] = {
        "approve": Approved("apr-1", at, by="bob"),
        "reject": Rejected("apr-1", at, by="bob", reason="no"),
        "time_out": TimerFired("apr-1", request.timeout),
        "stop": StopRequested(at, by="ops"),
        "redefined ungated": Redefined(redefinitions(life.ex.agent)["refund ungated"], at),
    }
    event = events[how]
    ex, commands = decide(life.ex, event)
    return ex, event, commands, request


DECIDED_HOW = ["approve", "reject", "time_out", "stop", "redefined ungated"]


@pytest.mark.parametrize("how", DECIDED_HOW)
def test_a_decision_cancels_every_timer_the_request_still_has(how: str) -> None:
    ex, event, commands, request = _decide_escalated(how)
    decided = ex.request("apr-1")
    assert decided is not None and decided.status != PENDING
    # Every timer, as CancelTimer("apr-1") or (a redefinition, whose new definition may
    # not have the tool) one by one.
    assert any(isinstance(c, CancelTimer) and c.request_id == "apr-1" for c in commands)
    assert DeliverAgain not in {type(c) for c in commands}
    # Its deadline, its reminder and stage 2; stage 1's timer went when it fired.
    assert timer_rows(writes(ex, event, commands), "apr-1") == (
        set(),
        {
            request.timeout,
            since_opened(request, REMINDER_MS),
            since_opened(request, STAGE_2_MS),
        },
    )


@pytest.mark.parametrize("how", DECIDED_HOW)
def test_nothing_fires_after_a_decision(how: str) -> None:
    ex, _, _, request = _decide_escalated(how)
    for ms in (STAGE_1_MS, REMINDER_MS, STAGE_2_MS, TIMEOUT_MS - 1):
        with pytest.raises(Refusal) as caught:
            decide(ex, TimerFired("apr-1", since_opened(request, ms)))
        assert caught.value.code == "already_decided", ms
        decided = ex.request("apr-1")
        assert decided is not None and str(caught.value) == standing_decision(decided)


def test_a_redefinition_that_drops_the_tool_cancels_every_timer_of_its_request() -> None:
    life = escalating()
    request = life.ex.request("apr-1")
    assert request is not None
    event = Redefined(redefinitions(life.ex.agent)["no refund"], life.now())
    ex, commands = decide(life.ex, event)
    assert [r.status for r in ex.requests] == [INVALIDATED]
    assert timer_rows(writes(ex, event, commands), "apr-1") == (
        set(),
        {request.timeout, *still_to_come(life.ex, request)},
    )


def test_an_extension_moves_the_reminder_timer_and_the_stages_stay() -> None:
    life = escalating()
    request = life.ex.request("apr-1")
    assert request is not None
    old_reminder = since_opened(request, REMINDER_MS)
    until = request.timeout + timedelta(minutes=2)
    new_reminder = until - timedelta(milliseconds=TIMEOUT_MS - REMINDER_MS)
    event = Extended("apr-1", until, life.now(), by="alice", by_kind="app")
    ex, commands = decide(life.ex, event)
    moved = ex.request("apr-1")
    assert moved == attrs.evolve(request, timeout=until)
    assert commands[:4] == (
        CancelTimer("apr-1", request.timeout),
        CancelTimer("apr-1", old_reminder),
        StartTimer("apr-1", until),
        StartTimer("apr-1", new_reminder),
    )
    assert [type(c) for c in commands[4:]] == [RecordDecision, ReviseApprovalRequest]
    assert timer_rows(writes(ex, event, commands), "apr-1") == (
        {until, new_reminder},
        {request.timeout, old_reminder},
    )
    # At the reminder's old time only stage 1 is due (it counts from when it opened).
    at_old, commands = decide(ex, TimerFired("apr-1", old_reminder))
    fired = at_old.request("apr-1")
    assert fired is not None and (fired.reminded, fired.stages_fired) == (False, 1)
    assert [c.purpose for c in commands if isinstance(c, DeliverAgain)] == ["stage:1"]
    assert CancelTimer("apr-1", old_reminder) not in commands
    # The reminder comes at its new time (with stage 2, due since).
    reminded, commands = decide(at_old, TimerFired("apr-1", new_reminder))
    assert [c.purpose for c in commands if isinstance(c, DeliverAgain)] == [
        "reminder",
        "stage:2",
    ]
    assert CancelTimer("apr-1", new_reminder) in commands
    # A reminder that went out does not move again: only the deadline's timer does.
    latest = latest_deadline(reminded, request)
    again = Extended("apr-1", latest, new_reminder + timedelta(seconds=1), "alice", "app")
    _, commands = decide(reminded, again)
    assert commands[:2] == (CancelTimer("apr-1", until), StartTimer("apr-1", latest))
    assert [type(c) for c in commands[2:]] == [RecordDecision, ReviseApprovalRequest]


# -- stop ------------------------------------------------------------------------------------------


def test_stop_cancels_queued_and_awaiting_calls_and_leaves_an_executing_one_running() -> None:
    life = Life().start().reply(lookup("tu1"), refund("tu2"), refund("tu3"))
    assert [c.status for c in life.ex.calls] == [EXECUTING, QUEUED, QUEUED]
    assert [c.status for c in life.stop().ex.calls] == [EXECUTING, CANCELLED, CANCELLED]
    stopped = Life().start().reply(refund("tu1"), refund("tu2")).stop().ex
    assert [c.status for c in stopped.calls] == [CANCELLED, CANCELLED]
    assert [r.status for r in stopped.requests] == [CANCELLED]
    parallel = Life(agent(PARALLEL)).start().reply(lookup("tu1"), refund("tu2")).stop().ex
    assert [c.status for c in parallel.calls] == [EXECUTING, CANCELLED]


@pytest.mark.parametrize("outcome", ["finished", "failed"])
def test_a_stopped_execution_records_the_outcome_of_the_tool_it_was_running(outcome: str) -> None:
    life = Life(agent(PARALLEL)).start().reply(lookup("tu1"), refund("tu2")).stop()
    stopped = life.ex
    at = life.now()
    event: Event = (
        ToolFinished("tu1", {"found": 1}, at)
        if outcome == "finished"
        else ToolFailed("tu1", "x", at)
    )
    new, commands = decide(stopped, event)
    assert commands == ()  # nothing for the model, nothing for the audit log
    assert new.status == STOPPED and new.error == stopped.error
    assert new.messages == stopped.messages and new.requests == stopped.requests
    done = new.call("tu1")
    assert done is not None and done.status == "done" and done.result is not None
    assert done.result.is_error == (outcome == "failed")
    # Once: a second outcome, or one for a call that was not executing, is stale.
    for late in (ToolFinished("tu1", "again", at), ToolFinished("tu2", "never ran", at)):
        with pytest.raises(Refusal) as caught:
            decide(new, late)
        assert caught.value.code == "stale_tool_result"
    with pytest.raises(Refusal) as caught:
        decide(stopped, ToolFinished("tu2", "never ran", at))
    assert caught.value.code == "stale_tool_result" and "(it is cancelled)" in str(caught.value)


# -- stored states of earlier versions -------------------------------------------------------------


def test_decide_has_a_version() -> None:
    from clearance.core.decide import DECIDE_VERSION

    assert DECIDE_VERSION == 2


def downgraded(data: dict[str, Any]) -> dict[str, Any]:
    """A state as decide() version 1 wrote it: a tool call that runs is 'running', one
    that was rejected or timed out is 'done', a stopped execution leaves its calls be."""
    old = copy.deepcopy(data)
    for call in old["calls"]:
        status = call["status"]
        if status == EXECUTING:
            call["status"] = "running"
        elif status in (REJECTED, TIMED_OUT):
            call["status"] = "done"
        elif status == CANCELLED:
            call["status"] = "awaiting_approval" if call["request_id"] else QUEUED
    return old


LEGACY_CASES = {
    "approved, running": lambda: two_refunds().approve("apr-1"),
    "rejected, next open": lambda: two_refunds().reject("apr-1"),
    "timed out, next open": lambda: two_refunds().time_out("apr-1"),
    "stopped": lambda: Life().start().reply(refund("tu1"), lookup("tu2")).stop(),
    "stopped, parallel": lambda: (
        Life(agent(PARALLEL)).start().reply(lookup("tu1"), refund("tu2")).stop()
    ),
    "ungated running": lambda: Life().start().reply(lookup("tu1")),
}


@pytest.mark.parametrize("case", sorted(LEGACY_CASES))
def test_a_state_written_by_version_1_reads_as_version_2_made_it(case: str) -> None:
    from clearance.core.wire import execution_from_data, execution_to_data

    ex = LEGACY_CASES[case]().ex
    data = execution_to_data(ex)
    assert execution_from_data(data) == ex
    legacy = downgraded(data)
    assert legacy != data
    assert execution_from_data(legacy) == ex


def test_every_event_has_words_for_refusals() -> None:
    from clearance.core.decide import _SAID, _STEPS

    assert {step.TAG for step in _STEPS} == set(_SAID)
