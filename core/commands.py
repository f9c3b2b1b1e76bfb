"""Commands: what `decide()` asks the world to do, as small frozen classes.

Some are effects on the store itself (timers, the audit log, the pending
list) and are applied in the same transaction as the state change; the rest
(`CallModel`, `RunTool`) go through the transactional outbox and their results
come back as events.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

import attrs

from clearance.core.execution import ApprovalRequest


@attrs.frozen
class Pruned:
    """Where a record's payload was dropped (`clearance prune`): when, and the hashes
    of the parameters, modified parameters and reason it held, which its link in the
    audit chain covers (None where the value was None)."""

    at: datetime
    parameters_hash: str | None
    modified_params_hash: str | None
    reason_hash: str | None


@attrs.frozen
class AuditRecord:
    """One decision on one approval request: who, when, what, and why."""

    request_id: str | None  # None: a call a policy decided, with no request
    execution_id: str
    agent_tag: str
    tool: str
    # approved | rejected | timed_out | cancelled | allowed_by_policy | denied_by_policy,
    # and in shadow mode would_allow | would_ask | would_deny.
    decision: str
    at: datetime
    parameters: dict[str, Any]
    by: str | None = None
    modified_params: dict[str, Any] | None = None
    reason: str | None = None
    by_kind: str | None = None  # how `by` is known: reviewer | app | claimed
    tool_use_id: str | None = None  # the call's, where a policy decided it
    rule_id: str | None = None  # the policy rule that decided (or asked for) it
    policy_version: str | None = None
    on_behalf_of: str | None = None  # the reviewer whose delegated grants `by` used
    # Set where the payload (parameters, modified parameters, reason) was dropped: those
    # then read {} / None / None, and only their hashes are left.
    pruned: Pruned | None = None


@attrs.frozen
class CallModel:
    TAG: ClassVar[str] = "call_model"
    turn: int


@attrs.frozen
class RunTool:
    TAG: ClassVar[str] = "run_tool"
    tool_use_id: str
    tool: str
    parameters: dict[str, Any]
    idempotency_key: str
    request_id: str | None = None
    approved_by: str | None = None


@attrs.frozen
class PublishApprovalRequest:
    TAG: ClassVar[str] = "publish_approval_request"
    request: ApprovalRequest


@attrs.frozen
class ReviseApprovalRequest:
    """A pending request judged again (its agent was redefined): the inbox's copy changes
    (its call digest, the rule that asks), nothing is sent again."""

    TAG: ClassVar[str] = "revise_approval_request"
    request: ApprovalRequest


@attrs.frozen
class DeliverAgain:
    """A pending request sent out again: its reminder (`purpose` "reminder", on the
    agent's channels), an escalation stage ("stage:N", on that stage's channels), or the
    call it asks about as a redefinition changed it ("revised:<digest prefix>")."""

    TAG: ClassVar[str] = "deliver_again"
    request: ApprovalRequest
    purpose: str


@attrs.frozen
class StartTimer:
    TAG: ClassVar[str] = "start_timer"
    request_id: str
    due_at: datetime


@attrs.frozen
class CancelTimer:
    TAG: ClassVar[str] = "cancel_timer"
    request_id: str
    # When the timer was due; None: every timer of the request (its deadline, and its
    # reminder and escalation stages still to come, as the state after the step has them).
    due_at: datetime | None = None


@attrs.frozen
class RecordDecision:
    TAG: ClassVar[str] = "record_decision"
    record: AuditRecord


@attrs.frozen
class Finish:
    TAG: ClassVar[str] = "finish"
    status: str
    output: str | None = None
    error: str | None = None


Command = (
    CallModel
    | RunTool
    | PublishApprovalRequest
    | ReviseApprovalRequest
    | DeliverAgain
    | StartTimer
    | CancelTimer
    | RecordDecision
    | Finish
)
COMMAND_TYPES: tuple[type[Command], ...] = (
    CallModel,
    RunTool,
    PublishApprovalRequest,
    ReviseApprovalRequest,
    DeliverAgain,
    StartTimer,
    CancelTimer,
    RecordDecision,
    Finish,
)
# Commands that leave the store: carried out by the engine, results fed back as events.
OUTBOX_TYPES: tuple[type[Command], ...] = (CallModel, RunTool)
