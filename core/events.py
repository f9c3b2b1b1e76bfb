"""Events: everything that can happen to an execution, as small frozen classes.

Time (`at`), ids and anything user code computed (a request's `reason`) arrive
inside the events, stamped by the ports, so `decide()` never asks for them and
replaying the log reproduces the same state. `TAG` is the stable wire name.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

import attrs

from clearance.core.agent import AgentSpec
from clearance.core.execution import Usage
from clearance.core.policy import SessionGrant, Verdict


@attrs.frozen
class Started:
    TAG: ClassVar[str] = "started"
    execution_id: str
    input: str
    at: datetime
    session_id: str | None = None
    requested_by: str | None = None  # who asked for the run: may not approve its calls


@attrs.frozen
class Ticket:
    """Prepared outside the core for one tool_use: the request id it would get, and why."""

    tool_use_id: str
    request_id: str
    reason: str
    # The agent's policy on this call (its parameters with defaults): None where the
    # agent has no policy, or the call is not one its tools can take.
    verdict: Verdict | None = None
    # The session grant (its index in `Execution.grants`) that lets this call run
    # without a request, where a person would otherwise be asked.
    grant: int | None = None


@attrs.frozen
class ModelReplied:
    TAG: ClassVar[str] = "model_replied"
    turn: int
    content: tuple[dict[str, Any], ...]
    stop_reason: str
    at: datetime
    usage: Usage = Usage()
    tickets: tuple[Ticket, ...] = ()


@attrs.frozen
class ModelFailed:
    TAG: ClassVar[str] = "model_failed"
    turn: int
    error: str
    at: datetime


@attrs.frozen
class ToolFinished:
    TAG: ClassVar[str] = "tool_finished"
    tool_use_id: str
    output: Any
    at: datetime


@attrs.frozen
class ToolFailed:
    TAG: ClassVar[str] = "tool_failed"
    tool_use_id: str
    error: str
    at: datetime


@attrs.frozen
class Approved:
    TAG: ClassVar[str] = "approved"
    request_id: str
    at: datetime
    by: str | None = None
    modified_params: dict[str, Any] | None = None
    by_kind: str | None = None  # how `by` is known: reviewer | app | claimed
    # The agent's policy on the modified call: an edit is checked like a proposal.
    verdict: Verdict | None = None
    # "Allow this tool for the rest of this execution" (its tool, request, by: this
    # approval's).
    remember: SessionGrant | None = None
    digest: str | None = None  # the call digest the decision was made for, if it says
    # The reviewer whose grants `by` used, delegated to them (None: their own).
    on_behalf_of: str | None = None
    # The groups `by` belongs to (and, acting for a delegator, theirs), as the registry
    # of reviewers said when the decision was made: what a quorum's groups count.
    groups: tuple[str, ...] = ()


@attrs.frozen
class Rejected:
    TAG: ClassVar[str] = "rejected"
    request_id: str
    at: datetime
    by: str | None = None
    reason: str | None = None
    by_kind: str | None = None  # how `by` is known: reviewer | app | claimed
    digest: str | None = None  # the call digest the decision was made for, if it says
    # The reviewer whose grants `by` used, delegated to them (None: their own).
    on_behalf_of: str | None = None


@attrs.frozen
class TimerFired:
    TAG: ClassVar[str] = "timer_fired"
    request_id: str
    at: datetime


@attrs.frozen
class Extended:
    """A reviewer moved a pending request's deadline to `until` (within the longest its
    tool allows), before it passed."""

    TAG: ClassVar[str] = "extended"
    request_id: str
    until: datetime
    at: datetime
    by: str | None = None
    by_kind: str | None = None  # how `by` is known: reviewer | app (never claimed)
    # The reviewer whose grants `by` used, delegated to them (None: their own).
    on_behalf_of: str | None = None


@attrs.frozen
class StopRequested:
    TAG: ClassVar[str] = "stop_requested"
    at: datetime
    by: str | None = None
    reason: str | None = None
    by_kind: str | None = None  # how `by` is known: reviewer | app | claimed


@attrs.frozen
class Reassessment:
    """The current policy on one call that was proposed under an earlier definition."""

    tool_use_id: str
    verdict: Verdict | None = None  # None where the new definition has no policy


@attrs.frozen
class Redefined:
    """The agent was defined again (a redeploy) since the execution's calls were
    proposed: its pending requests and not yet opened calls are judged again under
    `agent`, whose policy's verdicts (evaluated outside, like a ticket's) it carries."""

    TAG: ClassVar[str] = "redefined"
    agent: AgentSpec
    at: datetime
    verdicts: tuple[Reassessment, ...] = ()


Event = (
    Started
    | ModelReplied
    | ModelFailed
    | ToolFinished
    | ToolFailed
    | Approved
    | Rejected
    | TimerFired
    | Extended
    | StopRequested
    | Redefined
)
EVENT_TYPES: tuple[type[Event], ...] = (
    Started,
    ModelReplied,
    ModelFailed,
    ToolFinished,
    ToolFailed,
    Approved,
    Rejected,
    TimerFired,
    Extended,
    StopRequested,
    Redefined,
)
