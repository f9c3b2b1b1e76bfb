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
from clearance.core.agent import PARALLEL, SEQUENTIAL, AgentSpec, ToolSpec
from clearance.core.commands import COMMAND_TYPES, RecordDecision, RunTool
from clearance.core.decide import decide, standing_decision
from clearance.core.errors import InvalidParameters, Refusal
from clearance.core.events import (
    EVENT_TYPES,
    Approved,
    Event,
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
    Execution,
    iso,
)
from clearance.core.machine import EXECUTION_TABLE, REQUEST_TABLE
from clearance.core.schema import to_json_schema

T0 = datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
TIMEOUT_MS = 60_000

REFUND = ToolSpec(
    tag="refund",
    description="",
    input_schema=to_json_schema(
        "refund", {"amount": {"type": "number", "required": True}, "note": {"type": "string"}}
    ),
    gated=True,
    approval_timeout_ms=TIMEOUT_MS,
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
REFUND_UNGATED = attrs.evolve(REFUND, gated=False)


def redefinitions(spec: AgentSpec) -> dict[str, AgentSpec]:
    """The agent defined again, as a redeploy would: without refunds, with refunds from
    15, with refunds that need no approval."""
    return {
        "no refund": attrs.evolve(spec, tools=(LOOKUP,)),
        "refund from 15": attrs.evolve(spec, tools=(REFUND_FROM_15, LOOKUP)),
        "refund ungated": attrs.evolve(spec, tools=(REFUND_UNGATED, LOOKUP)),
    }


def agent(order: str = SEQUENTIAL, max_iterations: int = 20) -> AgentSpec:
    return AgentSpec(
        tag="support",
        name="support",
        product="",
        model="scripted",
        system_prompt="",
        tools=(REFUND, LOOKUP),
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
        for d in ("approved", "rejected", "timer_fired")
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


def test_request_table_is_pending_then_exactly_one_outcome() -> None:
    assert {
        ("approve", PENDING, APPROVED),
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
    """An execution driven through decide() by real events, one second apart."""

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
        return self.apply(Started("exec-1", "refund order 42", self.now()))

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

    def approve(self, request_id: str, **extra: Any) -> Life:
        return self.apply(Approved(request_id, self.now(), by="alice", **extra))

    def reject(self, request_id: str) -> Life:
        return self.apply(Rejected(request_id, self.now(), by="alice", reason="too much"))

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
            fits = request.status == PENDING
            if event_type is Approved:
                yield Approved(request.request_id, at, by="bob"), fits
                yield Approved(request.request_id, at, "bob", {"amount": 5}), fits
                yield Approved(request.request_id, at, "bob", {"amount": "five"}), False
                yield Approved(request.request_id, at, "bob", {"amout": 5}), False
                yield Approved(request.request_id, request.timeout, "bob"), False
            else:
                yield Rejected(request.request_id, at, by="bob", reason="no"), fits
                yield Rejected(request.request_id, request.timeout, "bob", "late"), False
        yield event_type("apr-unknown", at, "bob"), False
    elif event_type is TimerFired:
        for request in ex.requests:
            yield TimerFired(request.request_id, request.timeout), request.status == PENDING
            early = request.timeout - timedelta(milliseconds=1)
            yield TimerFired(request.request_id, early), False
        yield TimerFired("apr-unknown", at + timedelta(days=1)), False
    elif event_type is StopRequested:
        yield StopRequested(at, by="ops", reason="enough"), True
    elif event_type is Redefined:
        for spec in redefinitions(ex.agent).values():
            yield Redefined(spec, at), bool(ex.pending_approvals)
        yield Redefined(attrs.evolve(ex.agent, tag="other"), at), False
    else:  # pragma: no cover - a new event type needs representatives here
        raise AssertionError(f"no representative events for {event_type.__name__}")


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
        assert isinstance(event, Approved | Rejected | TimerFired)
        request = ex.request(event.request_id)
        assert request is not None and request.status != PENDING
        word = {TIMED_OUT: "timed out"}.get(request.status, request.status)
        return msg == standing_decision(request) and f"already {word}" in msg
    if code == "unknown_request":
        assert isinstance(event, Approved | Rejected | TimerFired)
        known = ", ".join(r.request_id for r in ex.requests) or "none"
        return f"'{event.request_id}'" in msg and f"(its requests: {known})" in msg
    if code in ("expired", "not_due"):
        assert isinstance(event, Approved | Rejected | TimerFired)
        request = ex.request(event.request_id)
        assert request is not None
        return request.request_id in msg and iso(request.timeout) in msg
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
                decision = isinstance(event, Approved | Rejected | TimerFired)
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
            check_call_moves(ex, new)
    assert tried, f"no representative event of {event_type.__name__} for {status}[{variant}]"


def check_request_moves(old: Execution, new: Execution, event: Event) -> None:
    """Every request that changed made a move of REQUEST_TABLE; none disappeared."""
    action = {
        Approved: "approve",
        Rejected: "reject",
        TimerFired: "time_out",
        StopRequested: "cancel",
    }.get(type(event))
    # A redefinition decides a request as the new definition says: any of these.
    actions = {"invalidate", "approve", "reject"} if isinstance(event, Redefined) else {action}
    before = {r.request_id: r for r in old.requests}
    after = {r.request_id: r for r in new.requests}
    assert set(before) <= set(after)
    for request_id, request in before.items():
        changed = after[request_id]
        if changed.status != request.status:
            assert actions != {None}, f"{event.TAG} changed request {request_id}"
            assert any((a, request.status, changed.status) in REQUEST_MOVES for a in actions)
    for request_id in set(after) - set(before):
        assert after[request_id].status == PENDING


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
OUTCOME = {"approve": APPROVED, "reject": REJECTED, "timer": TIMED_OUT, "stop": CANCELLED}
ACTION = {"approve": "approve", "reject": "reject", "timer": "time_out", "stop": "cancel"}


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
            assert [r.decision for r in records] == [decided.status]
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
        yield Approved(request.request_id, at, by="bob")
        yield Rejected(request.request_id, at, by="bob", reason="no")
        yield TimerFired(request.request_id, max(at, request.timeout))
    for spec in redefinitions(ex.agent).values():
        yield Redefined(spec, at)
    yield StopRequested(at, by="ops")


def signature(ex: Execution) -> tuple[Any, ...]:
    return (
        ex.agent.approval_order,
        ex.agent.max_iterations,
        tuple((t.tag, t.gated, t is REFUND_FROM_15) for t in ex.agent.tools),
        ex.status,
        ex.awaiting_model,
        ex.model_turn,
        tuple((c.tool, c.status) for c in ex.calls),
        tuple(r.status for r in ex.requests if r.status == PENDING),
    )


def walk(depth: int = 7) -> tuple[set[tuple[str, str, str]], set[tuple[str, str]]]:
    """Breadth-first over every event sequence (up to `depth` events, states told apart by
    what decides their future): the execution moves and tool-call moves decide() takes."""
    frontier = [
        Execution(agent=agent(order, limit))
        for order in (SEQUENTIAL, PARALLEL)
        for limit in (1, 2, 20)
    ]
    seen = {signature(ex) for ex in frontier}
    taken: set[tuple[str, str, str]] = set()
    call_moves: set[tuple[str, str]] = set()
    for _ in range(depth):
        following = []
        for ex in frontier:
            for event in candidate_events(ex):
                try:
                    new, _ = decide(ex, event)
                except Refusal:
                    continue
                taken.add((event.TAG, ex.status, new.status))
                call_moves |= call_moves_of_a_step(ex, new)
                if signature(new) not in seen:
                    seen.add(signature(new))
                    following.append(new)
        frontier = following
    return taken, call_moves


WALKED = walk()


def test_every_move_of_the_execution_table_is_one_decide_takes() -> None:
    """A row no run can take is a wrong specification: it would let a bug in decide()
    through unnoticed. (decide() refuses to take a move that is not a row.)"""
    taken, _ = WALKED
    never = MOVES - taken
    assert not never, f"moves of EXECUTION_TABLE no event sequence takes: {sorted(never)}"
    assert taken <= MOVES


def test_every_move_of_the_tool_call_table_is_one_decide_takes() -> None:
    _, call_moves = WALKED
    rows = {(s, d) for _, s, dests in machine.CALL_TABLE for d in dests}
    assert call_moves == rows


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
