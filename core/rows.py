"""What one step writes: the rows a store persists for an event and its commands.

A store moves rows; what a command means for the tables is a domain rule, so it
is decided here, once, for every store (SQLite today, PostgreSQL next): a store
adapter turns a `Writes` into SQL and nothing else. Everything in it is derived
from the execution after the step and the step's commands, so the same step
always writes the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import attrs

from clearance.core.commands import (
    AuditRecord,
    CallModel,
    CancelTimer,
    Command,
    DeliverAgain,
    Finish,
    PublishApprovalRequest,
    RecordDecision,
    ReviseApprovalRequest,
    RunTool,
    StartTimer,
)
from clearance.core.escalation import schedule, stage_for
from clearance.core.events import Event
from clearance.core.execution import PENDING, ApprovalRequest, Execution

# Channels an approval request can be delivered on. A delivery is keyed by
# (request, channel, purpose): one row each, retried on its own.
WEBHOOK = "webhook"
# A broker's channel is named after the broker: "broker:<name>" (see `broker_channel`).
BROKER = "broker"
# Who signs a webhook: the agent's own secret (only processes hosting it have it)
# or the instance's (any process opened with it may deliver).
AGENT_SIGNER = "agent"
INSTANCE_SIGNER = "instance"
REQUEST = "request"  # a delivery's purpose: the request itself


@attrs.frozen
class TimerRow:
    request_id: str
    due_at: datetime


@attrs.frozen
class DeliveryRow:
    """An approval request to send on one channel, from `not_before` until `expires_at`."""

    request_id: str
    channel: str
    target: str  # the webhook URL; a broker's event
    message_id: str  # the same on every attempt: receivers dedupe on it
    signer: str
    not_before: datetime
    expires_at: datetime
    # Why it is sent: the request ("request"), its reminder ("reminder"), or escalation
    # stage N ("stage:N").
    purpose: str = REQUEST


@attrs.frozen
class Writes:
    """Everything one committed step adds, changes or removes, besides the event itself."""

    execution: Execution
    event: Event
    work: tuple[CallModel | RunTool, ...] = ()
    timers_started: tuple[TimerRow, ...] = ()
    timers_cancelled: tuple[TimerRow, ...] = ()
    requests_opened: tuple[ApprovalRequest, ...] = ()
    # Pending requests whose inbox copy changes (judged again after a redefinition).
    requests_revised: tuple[ApprovalRequest, ...] = ()
    # Requests whose inbox row now shows a decision: (request id, status).
    requests_decided: tuple[tuple[str, str], ...] = ()
    audit: tuple[AuditRecord, ...] = ()
    deliveries: tuple[DeliveryRow, ...] = ()
    # The execution finished: work nobody has started yet must never start (a stop
    # after an approval cancels the approved tool run in the same commit, and that
    # run's call is then closed as never run). Work a worker holds goes on, and its
    # outcome is recorded.
    drop_queued_work: bool = False
    # The execution is finished after this step, as of then: when `prune` may forget
    # it (a stopped execution may still record a tool's outcome, which moves this).
    finished_at: datetime | None = None


def writes(execution: Execution, event: Event, commands: Sequence[Command]) -> Writes:
    """The rows for one step: `execution` is the state after `event`, `commands` what
    `decide()` asked for."""
    work: list[CallModel | RunTool] = []
    started: list[TimerRow] = []
    cancelled: list[TimerRow] = []
    opened: list[ApprovalRequest] = []
    revised: list[ApprovalRequest] = []
    decided: list[tuple[str, str]] = []
    audit: list[AuditRecord] = []
    deliveries: list[DeliveryRow] = []
    finished = False
    for command in commands:
        if isinstance(command, CallModel | RunTool):
            work.append(command)
        elif isinstance(command, StartTimer):
            started.append(TimerRow(command.request_id, command.due_at))
        elif isinstance(command, CancelTimer):
            # A request's timer is due at its timeout (decide() starts it so), which
            # keys the row: the sweep then needs no second index.
            timed = execution.request(command.request_id)
            if command.due_at is not None:
                cancelled.append(TimerRow(command.request_id, command.due_at))
            elif timed is not None:
                # Every timer of a decided request: its deadline and what was still to
                # come (a decision leaves the request's schedule as it was).
                tool = execution.agent.tool(timed.tool)
                for due_at in (timed.timeout, *schedule(timed, tool)):
                    cancelled.append(TimerRow(command.request_id, due_at))
        elif isinstance(command, PublishApprovalRequest):
            request = command.request
            opened.append(request)
            deliveries.extend(_deliveries(execution, request))
        elif isinstance(command, ReviseApprovalRequest):
            revised.append(command.request)
        elif isinstance(command, DeliverAgain):
            deliveries.extend(_deliveries(execution, command.request, command.purpose))
        elif isinstance(command, RecordDecision):
            audit.append(command.record)
            rid = command.record.request_id
            now = execution.request(rid) if rid is not None else None
            # A vote short of a quorum and an extension are audited, but the request
            # stays pending.
            if now is not None and now.status != PENDING:
                decided.append((now.request_id, now.status))
        elif isinstance(command, Finish):
            finished = True
    return Writes(
        execution=execution,
        event=event,
        work=tuple(work),
        timers_started=tuple(started),
        timers_cancelled=tuple(cancelled),
        requests_opened=tuple(opened),
        requests_revised=tuple(revised),
        requests_decided=tuple(decided),
        audit=tuple(audit),
        deliveries=tuple(deliveries),
        drop_queued_work=finished,
        finished_at=execution.finished_at,
    )


def broker_channel(broker: str) -> str:
    """The channel name of the deliveries published on broker `broker`."""
    return f"{BROKER}:{broker}"


def _deliveries(
    execution: Execution, request: ApprovalRequest, purpose: str = REQUEST
) -> list[DeliveryRow]:
    """One row per channel the request goes out on for `purpose`: the agent's webhook
    and broker for the request and its reminder, the stage's for an escalation stage."""
    agent = execution.agent
    signer = AGENT_SIGNER if agent.own_webhook_secret else INSTANCE_SIGNER
    webhook, broker = agent.approval_webhook, agent.approval_broker
    if purpose.startswith("stage:"):
        found = stage_for(agent.tool(request.tool), purpose)
        webhook = found[1].webhook if found is not None else None
        broker = found[1].broker if found is not None else None
    # The request's first delivery keeps the ids it always had; a reminder or a stage
    # is another message, with its own id (receivers dedupe on these).
    suffix = "" if purpose == REQUEST else "." + purpose.replace(":", "")
    at = execution.updated_at or request.timestamp
    rows = []
    if webhook:
        rows.append(
            DeliveryRow(
                request_id=request.request_id,
                channel=WEBHOOK,
                target=webhook,
                message_id=f"msg_{request.request_id}{suffix}",
                signer=signer,
                not_before=request.timestamp if purpose == REQUEST else at,
                expires_at=request.timeout,
                purpose=purpose,
            )
        )
    if broker is not None:
        # The request id is the message id: what broker consumers dedupe on.
        rows.append(
            DeliveryRow(
                request_id=request.request_id,
                channel=broker_channel(broker.broker),
                target=broker.event,
                message_id=f"{request.request_id}{suffix}",
                signer=signer,
                not_before=request.timestamp if purpose == REQUEST else at,
                expires_at=request.timeout,
                purpose=purpose,
            )
        )
    return rows
