"""An execution's state: frozen data, changed only by `decide()`.

Statuses are plain strings so the state reads the same in Python, in the
store and on the wire. The transitions between them are in `machine.py`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import attrs

from clearance.core.agent import AgentSpec
from clearance.core.policy import SessionGrant, Verdict
from clearance.core.quorum import Vote, still_needed

# Execution statuses.
CREATED = "created"
RUNNING = "running"
AWAITING_APPROVAL = "awaiting_approval"
COMPLETED = "completed"
FAILED = "failed"
STOPPED = "stopped"
EXECUTION_STATUSES = (CREATED, RUNNING, AWAITING_APPROVAL, COMPLETED, FAILED, STOPPED)
TERMINAL = frozenset({COMPLETED, FAILED, STOPPED})
RESTING = frozenset({AWAITING_APPROVAL, COMPLETED, FAILED, STOPPED})

# Approval request statuses: pending, then exactly one outcome, ever.
PENDING = "pending"
APPROVED = "approved"
REJECTED = "rejected"
TIMED_OUT = "timed_out"
CANCELLED = "cancelled"
# Withdrawn: the agent was defined again (a redeploy) and the call no longer exists as
# asked (its tool is gone, or its parameters no longer fit the tool's schema).
INVALIDATED = "invalidated"
REQUEST_STATUSES = (PENDING, APPROVED, REJECTED, TIMED_OUT, CANCELLED, INVALIDATED)

# What became of a call, one vocabulary in events, audit, HTTP, bodies and CLI. A
# request's status says whether its tool runs; its outcome says who or what decided.
APPROVED_MODIFIED = "approved_modified"  # approved with changed parameters
ALLOWED_BY_POLICY = "allowed_by_policy"  # no person asked: a rule (or the definition) let it
DENIED_BY_POLICY = "denied_by_policy"
ALLOWED_BY_GRANT = "allowed_by_grant"  # a reviewer's session grant let it run unasked
# Nobody answered in time and the definition says an unanswered request is approved.
APPROVED_BY_TIMEOUT = "approved_by_timeout"
APPROVALS = frozenset({APPROVED, APPROVED_MODIFIED})  # a person's approval, as audited
OUTCOMES = (
    APPROVED,
    APPROVED_MODIFIED,
    REJECTED,
    DENIED_BY_POLICY,
    ALLOWED_BY_POLICY,
    ALLOWED_BY_GRANT,
    TIMED_OUT,
    APPROVED_BY_TIMEOUT,
    INVALIDATED,
    CANCELLED,
)

# Audit records that are not a request's outcome: one approver's vote towards a quorum
# that is not met yet, and a reviewer's extension of a deadline.
VOTE = "vote"
EXTENDED = "extended"

# A tool call's progress within one model turn (its table is CALL_TABLE in machine.py).
# A call that is decided keeps its outcome: rejected, timed_out, cancelled or
# invalidated, like its approval request; `done` is a call that ran (or was answered
# at once with an error).
QUEUED = "queued"
AWAITING = "awaiting_approval"
EXECUTING = "executing"  # "running" before DECIDE_VERSION 2, as an execution's status is
DONE = "done"
CALL_STATUSES = (QUEUED, AWAITING, EXECUTING, DONE, REJECTED, TIMED_OUT, CANCELLED, INVALIDATED)
# Calls whose tool_result is known: the model gets it with the turn's others.
ANSWERED = frozenset({DONE, REJECTED, TIMED_OUT, INVALIDATED})
# Calls that will never change again (a cancelled call has no result: its execution
# stopped, so no model turn follows).
SETTLED = ANSWERED | {CANCELLED}


def iso(at: datetime) -> str:
    """The spec's ISO-8601 UTC spelling: '2024-01-15T10:30:00Z' (milliseconds when present)."""
    at = at.astimezone(UTC)
    spec = "milliseconds" if at.microsecond else "seconds"
    return at.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


@attrs.frozen
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens
        )


# A tool_result's content: a string, or content blocks.
ToolContent = str | list[dict[str, Any]]


@attrs.frozen
class ToolResult:
    """What the model gets back for one tool_use: `content` as a tool_result carries it."""

    content: ToolContent
    is_error: bool = False


@attrs.frozen
class ApprovalRequest:
    request_id: str
    execution_id: str
    agent_tag: str
    tool: str
    tool_use_id: str
    parameters: dict[str, Any]
    reason: str
    timestamp: datetime
    timeout: datetime  # when it expires; the spec calls the expiry time 'timeout'
    timeout_ms: int
    status: str = PENDING
    decided_by: str | None = None
    decided_at: datetime | None = None
    decided_by_kind: str | None = None  # how decided_by is known: reviewer | app | claimed
    modified_params: dict[str, Any] | None = None
    rejection_reason: str | None = None
    policy: Verdict | None = None  # the ask rule that asked for it, if one did
    digest: str | None = None  # of the exact call (core.call_digest); None: made before
    # Who or what decided it (OUTCOMES); None while pending.
    outcome: str | None = None
    # Its quorum (core.quorum): how many distinct people must approve the call it asks
    # about now, from which groups, and who has so far (an edit starts again).
    approvals_required: int = 1
    groups: tuple[str, ...] = ()
    votes: tuple[Vote, ...] = ()
    requested_by: str | None = None  # who started the execution: never its approver
    timeout_action: str = "reject"  # or "approve", where the definition says so
    # Its reminder went out; how many of its tool's escalation stages have fired.
    reminded: bool = False
    stages_fired: int = 0

    @property
    def needs_quorum(self) -> bool:
        """Whether more than one person's approval, or one from named groups, decides it."""
        return self.approvals_required != 1 or bool(self.groups)

    def still_needed(self) -> tuple[int, tuple[str, ...]]:
        """(approvals still needed, groups still open) while it is pending."""
        if self.status != PENDING:
            return 0, ()
        return still_needed(self.votes, self.approvals_required, self.groups)

    @property
    def expires_at(self) -> datetime:
        return self.timeout

    def effective_parameters(self) -> dict[str, Any]:
        if self.modified_params is None:
            return self.parameters
        return {**self.parameters, **self.modified_params}

    def to_dict(self) -> dict[str, Any]:
        """The spec's approval request, camelCase, times in ISO-8601 UTC."""
        return {
            "requestId": self.request_id,
            "executionId": self.execution_id,
            "agentTag": self.agent_tag,
            "tool": self.tool,
            "parameters": self.parameters,
            "reason": self.reason,
            "timestamp": iso(self.timestamp),
            "timeout": iso(self.timeout),
        }


@attrs.frozen
class ToolCall:
    """One tool_use of the current model turn, until the turn's tool_results go to the model."""

    tool_use_id: str
    tool: str
    parameters: dict[str, Any]
    status: str
    gated: bool = False
    request_id: str = ""
    reason: str = ""
    approved_by: str | None = None
    result: ToolResult | None = None
    verdict: Verdict | None = None  # the agent's policy on the call, if it has one
    granted: SessionGrant | None = None  # the session grant that let it run unasked


@attrs.frozen
class Execution:
    agent: AgentSpec
    id: str = ""
    status: str = CREATED
    seq: int = 0  # events applied; the store's optimistic version
    input: str = ""
    session_id: str | None = None
    requested_by: str | None = None  # who started it, as the embedding code says
    created_at: datetime | None = None
    updated_at: datetime | None = None
    messages: tuple[dict[str, Any], ...] = ()
    calls: tuple[ToolCall, ...] = ()
    requests: tuple[ApprovalRequest, ...] = ()
    model_turn: int = 0  # model calls issued so far
    awaiting_model: bool = False
    output: str | None = None
    error: str | None = None
    stop_reason: str | None = None
    usage: Usage = Usage()
    # Reviewers' "allow this tool for the rest of this execution", oldest first.
    grants: tuple[SessionGrant, ...] = ()

    @property
    def agent_tag(self) -> str:
        return self.agent.tag

    @property
    def pending_approvals(self) -> list[ApprovalRequest]:
        return [r for r in self.requests if r.status == PENDING]

    @property
    def finished_at(self) -> datetime | None:
        """When it last moved, once it is finished (a stopped execution may still
        record a tool's outcome); None while it is live. What `prune` goes by."""
        return (self.updated_at or self.created_at) if self.status in TERMINAL else None

    def request(self, request_id: str) -> ApprovalRequest | None:
        for req in self.requests:
            if req.request_id == request_id:
                return req
        return None

    def call(self, tool_use_id: str) -> ToolCall | None:
        for call in self.calls:
            if call.tool_use_id == tool_use_id:
                return call
        return None
