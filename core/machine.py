"""The state tables of an execution, of an approval request and of a tool call.

Theory of operation
-------------------
The tables are the specification: every row is a move some run takes (the walk
in tests/test_state_table.py reaches each one through `decide()`), and
`decide()` takes no move that is not a row. A move that is not is a bug in
`decide()`, never a user error.

An execution is `running` while the machine owes it work (a model call or a
tool run is outstanding), `awaiting_approval` while only humans do, and then
`completed`, `failed` or `stopped` for good. Which of those an event leads to
depends on the event's content (a reply with a gated tool_use pauses, one
without tools completes), so `decide()` works out the destination and this
module checks that the move `(event, source -> destination)` is in the table.
A stopped execution still records the outcome of a tool that was executing
when it stopped (it stays stopped, and nothing goes to the model).

An approval request is `pending` until exactly one outcome: `approved`,
`rejected`, `timed_out`, `cancelled` (the execution stopped) or `invalidated`
(the agent was defined again and the call no longer fits it). A second
decision finds no row from its outcome and is refused, naming the one that
stands.

A tool call (one tool_use of the current model turn) is born `queued`. A gated
call then waits for its human (`awaiting_approval`) and an ungated one runs
(`executing`); an approved call runs; a running call ends `done` with the tool's
outcome. A rejected, timed-out or cancelled call keeps that status. A call that
cannot be carried out at all (unknown tool, invalid parameters, a parameter
schema or approval deadline that cannot be evaluated) is answered at once:
`queued -> done` with an is_error result, within the step that made it. Every
`done`, `rejected` and `timed_out` call gives the model exactly one
tool_result; `cancelled` calls give none, as no model turn follows a stop.

Each table is held by ONE module-level `transitions.Machine`, shared by every
execution and triggered on a single scratch model: no Machine and no model
registration per execution, which would be slow and would leak. `transitions`
is used nowhere else.

`decide()` does not trigger them on each step, though: a trigger costs about
as much as the rest of a step (~10 µs against a set lookup's ~0.05 µs), so the
moves each machine allows are read off its transitions once, at import, into
`EXECUTION_MOVES`, `EXECUTION_ACCEPTS`, `REQUEST_MOVES` and `CALL_MOVES`, which
`decide()` looks up. The machines stay the source of those sets, and
tests/test_state_table.py checks that every (event, source, destination) the
sets allow is what a trigger allows, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from transitions import Machine, MachineError

from clearance.core.execution import (
    APPROVED,
    AWAITING,
    AWAITING_APPROVAL,
    CALL_STATUSES,
    CANCELLED,
    COMPLETED,
    CREATED,
    DONE,
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
    TIMED_OUT,
)

# (event, source, destinations): read it as "in <source>, <event> may lead to <destinations>".
Table = tuple[tuple[str, str, tuple[str, ...]], ...]

EXECUTION_TABLE: Table = (
    ("started", CREATED, (RUNNING,)),
    # A reply: run ungated tools or call the model again (running), wait for a human
    # (awaiting_approval), answer (completed), or end cut off or at max_iterations (failed).
    ("model_replied", RUNNING, (RUNNING, AWAITING_APPROVAL, COMPLETED, FAILED)),
    ("model_failed", RUNNING, (FAILED,)),
    # A tool's outcome: the next tool or approval of the turn, or the next model turn.
    ("tool_finished", RUNNING, (RUNNING, AWAITING_APPROVAL, FAILED)),
    ("tool_failed", RUNNING, (RUNNING, AWAITING_APPROVAL, FAILED)),
    # ... also of a tool that was executing when the execution stopped: recorded, and the
    # execution stays stopped.
    ("tool_finished", STOPPED, (STOPPED,)),
    ("tool_failed", STOPPED, (STOPPED,)),
    # An approval runs its tool, so the execution is running after it. A decision lands
    # on a running execution only with parallel approvals, while another call executes,
    # which keeps it running.
    # ... or, a vote towards a quorum not met yet, leaves it waiting.
    ("approved", AWAITING_APPROVAL, (RUNNING, AWAITING_APPROVAL)),
    ("approved", RUNNING, (RUNNING,)),
    ("rejected", AWAITING_APPROVAL, (RUNNING, AWAITING_APPROVAL, FAILED)),
    ("rejected", RUNNING, (RUNNING,)),
    ("timer_fired", AWAITING_APPROVAL, (RUNNING, AWAITING_APPROVAL, FAILED)),
    ("timer_fired", RUNNING, (RUNNING,)),
    # A reviewer gave a request more time: nothing else changes.
    ("extended", AWAITING_APPROVAL, (AWAITING_APPROVAL,)),
    ("extended", RUNNING, (RUNNING,)),
    *(("stop_requested", s, (STOPPED,)) for s in (CREATED, RUNNING, AWAITING_APPROVAL)),
    # The agent was defined again: its pending requests are judged again, and may be
    # decided (allowed, denied, invalidated) as a decision would be.
    ("redefined", AWAITING_APPROVAL, (RUNNING, AWAITING_APPROVAL, FAILED)),
    ("redefined", RUNNING, (RUNNING,)),
)

REQUEST_TABLE: Table = (
    ("approve", PENDING, (APPROVED,)),
    # A vote towards a quorum not met yet (an edit also changes the call it asks about),
    # and a later deadline: still pending.
    ("vote", PENDING, (PENDING,)),
    ("extend", PENDING, (PENDING,)),
    # Its reminder went out, or an escalation stage delivered it again: still pending.
    ("escalate", PENDING, (PENDING,)),
    # Nobody answered, and the definition says an unanswered call runs.
    ("approve_by_timeout", PENDING, (APPROVED,)),
    ("reject", PENDING, (REJECTED,)),
    ("time_out", PENDING, (TIMED_OUT,)),
    ("cancel", PENDING, (CANCELLED,)),
    ("invalidate", PENDING, (INVALIDATED,)),
)

# (action, source, destinations) for one tool call; the actions are decide()'s, not events:
# one event can move several calls (a stop cancels every open one) or none.
CALL_TABLE: Table = (
    ("gate", QUEUED, (AWAITING,)),  # a gated call opens its approval request
    ("run", QUEUED, (EXECUTING,)),  # an ungated call runs
    ("answer", QUEUED, (DONE,)),  # cannot be carried out: an is_error result at once
    ("approve", AWAITING, (EXECUTING,)),
    ("reject", AWAITING, (REJECTED,)),
    ("time_out", AWAITING, (TIMED_OUT,)),
    ("finish", EXECUTING, (DONE,)),  # tool_finished or tool_failed
    ("cancel", QUEUED, (CANCELLED,)),  # the execution stopped
    ("cancel", AWAITING, (CANCELLED,)),
    ("invalidate", AWAITING, (INVALIDATED,)),  # a redefinition withdrew its request
)


class _Scratch:
    """The one model the shared machines are triggered on."""

    state: str

    def is_destination(self, event: Any) -> bool:
        return bool(event.kwargs.get("to") == event.transition.dest)


def _machine(states: tuple[str, ...], table: Table) -> Machine:
    return Machine(
        model=None,
        states=list(states),
        transitions=[
            {"trigger": t, "source": s, "dest": d, "conditions": "is_destination"}
            for t, s, dests in table
            for d in dests
        ],
        initial=states[0],
        auto_transitions=False,
        send_event=True,
    )


_EXECUTION = _machine(EXECUTION_STATUSES, EXECUTION_TABLE)
_REQUEST = _machine(REQUEST_STATUSES, REQUEST_TABLE)
_CALL = _machine(CALL_STATUSES, CALL_TABLE)
_SCRATCH_EXECUTION = _Scratch()
_SCRATCH_REQUEST = _Scratch()
_SCRATCH_CALL = _Scratch()
_EXECUTION.add_model(_SCRATCH_EXECUTION)
_REQUEST.add_model(_SCRATCH_REQUEST)
_CALL.add_model(_SCRATCH_CALL)


def _allowed(machine: Machine, scratch: _Scratch, trigger: str, source: str, dest: str) -> bool:
    machine.set_state(source, model=scratch)
    try:
        return bool(scratch.trigger(trigger, to=dest))  # type: ignore[attr-defined]
    except MachineError:
        return False


def execution_move_allowed(event: str, source: str, dest: str) -> bool:
    """One trigger of the shared machine: what the sets below are tested against, and
    the unit benchmark 3 measures a `decide()` step in."""
    return _allowed(_EXECUTION, _SCRATCH_EXECUTION, event, source, dest)


def request_move_allowed(action: str, source: str, dest: str) -> bool:
    return _allowed(_REQUEST, _SCRATCH_REQUEST, action, source, dest)


def call_move_allowed(action: str, source: str, dest: str) -> bool:
    return _allowed(_CALL, _SCRATCH_CALL, action, source, dest)


def _moves(machine: Machine) -> frozenset[tuple[str, str, str]]:
    # Every transition is guarded by `is_destination` alone, so (trigger, source, dest)
    # is allowed exactly when the machine has that transition. (`dest` is typed optional
    # for internal transitions; the tables have none.)
    return frozenset(
        (trigger, t.source, t.dest)
        for trigger in machine.events
        for t in machine.get_transitions(trigger=trigger)
        if t.dest is not None
    )


# What `decide()` checks each step against: (event, source, destination) moves, and
# the (event, source) pairs an execution takes at all, whatever the event's content.
EXECUTION_MOVES = _moves(_EXECUTION)
EXECUTION_ACCEPTS = frozenset((event, source) for event, source, _ in EXECUTION_MOVES)
REQUEST_MOVES = _moves(_REQUEST)
CALL_MOVES = _moves(_CALL)
