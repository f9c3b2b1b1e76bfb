"""The state tables of an execution and of an approval request.

Theory of operation
-------------------
An execution is `running` while the machine owes it work (a model call or a
tool run is outstanding), `awaiting_approval` while only humans do, and then
`completed`, `failed` or `stopped` for good. Which of those an event leads to
depends on the event's content (a reply with a gated tool_use pauses, one
without tools completes), so `decide()` works out the destination and this
module checks that the move `(event, source -> destination)` is in the table.
A move that is not is a bug in `decide()`, never a user error.

An approval request is `pending` until exactly one outcome: `approved`,
`rejected`, `timed_out` or `cancelled` (the execution stopped). A second
decision finds no row from its outcome and is refused, naming the one that
stands.

Both tables are held by ONE module-level `transitions.Machine` each, shared by
every execution and triggered on a single scratch model: no Machine and no
model registration per execution, which would be slow and would leak.
`transitions` is used nowhere else.

`decide()` does not trigger them on each step, though: a trigger costs about
as much as the rest of a step (~10 µs against a set lookup's ~0.05 µs), so the
moves each machine allows are read off its transitions once, at import, into
`EXECUTION_MOVES`, `EXECUTION_ACCEPTS` and `REQUEST_MOVES`, which `decide()`
looks up. The machines stay the source of those sets, and
tests/test_state_table.py checks that every (event, source, destination) the
sets allow is what a trigger allows, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from transitions import Machine, MachineError

from clearance.core.execution import (
    APPROVED,
    AWAITING_APPROVAL,
    CANCELLED,
    COMPLETED,
    CREATED,
    EXECUTION_STATUSES,
    FAILED,
    PENDING,
    REJECTED,
    REQUEST_STATUSES,
    RUNNING,
    STOPPED,
    TIMED_OUT,
)

_LIVE = (RUNNING, AWAITING_APPROVAL)

# (event, source, destinations): read it as "in <source>, <event> may lead to <destinations>".
Table = tuple[tuple[str, str, tuple[str, ...]], ...]

EXECUTION_TABLE: Table = (
    ("started", CREATED, (RUNNING,)),
    # A reply: run ungated tools or call the model again (running), wait for a human
    # (awaiting_approval), answer (completed), or hit max_iterations (failed).
    ("model_replied", RUNNING, (RUNNING, AWAITING_APPROVAL, COMPLETED, FAILED)),
    ("model_failed", RUNNING, (FAILED,)),
    ("tool_finished", RUNNING, (RUNNING, AWAITING_APPROVAL, FAILED)),
    ("tool_failed", RUNNING, (RUNNING, AWAITING_APPROVAL, FAILED)),
    # With parallel approvals a decision can land while another tool is running.
    *(
        (d, s, (RUNNING, AWAITING_APPROVAL, FAILED))
        for d in ("approved", "rejected", "timer_fired")
        for s in _LIVE
    ),
    *(("stop_requested", s, (STOPPED,)) for s in (CREATED, *_LIVE)),
)

REQUEST_TABLE: Table = (
    ("approve", PENDING, (APPROVED,)),
    ("reject", PENDING, (REJECTED,)),
    ("time_out", PENDING, (TIMED_OUT,)),
    ("cancel", PENDING, (CANCELLED,)),
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
_SCRATCH_EXECUTION = _Scratch()
_SCRATCH_REQUEST = _Scratch()
_EXECUTION.add_model(_SCRATCH_EXECUTION)
_REQUEST.add_model(_SCRATCH_REQUEST)


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
