"""The camelCase views: how approval requests, decisions, audit records, executions and
the webhook body look on the wire, for the HTTP API, the CLI's --json output and webhooks.

One place per shape. The spec's approval request (`requestId, executionId, agentTag,
tool, parameters, reason, timestamp, timeout`) is `ApprovalRequest.to_dict()`; every
view that shows a request starts from it. Times are ISO-8601 UTC ('…Z').

`dumps` (from `core.json_text`, so a channel adapter encodes a webhook body the
same way) is the one encoder for these views: strict JSON (no NaN, no Infinity, valid
UTF-8), and it never fails on a value JSON cannot carry: it answers with that value
spelt as text ("NaN", "Infinity", "-Infinity"; U+FFFD for a lone surrogate), so a
listing can never be broken by one odd parameter a model proposed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from clearance.core.agent import REJECT
from clearance.core.audit_chain import ChainRow
from clearance.core.audit_chain import Verdict as AuditVerdict
from clearance.core.commands import AuditRecord
from clearance.core.decide import duration
from clearance.core.events import Event
from clearance.core.execution import PENDING, ApprovalRequest, Execution, iso
from clearance.core.json_text import dumps as dumps  # the views' encoder, re-exported
from clearance.core.json_text import encode as encode
from clearance.core.quorum import Vote
from clearance.core.reviewers import Reviewer, ReviewerKey
from clearance.core.wire import event_to_data, reviewer_to_data

if TYPE_CHECKING:
    from clearance.app import BatchOutcome, Pruning
    from clearance.policy_replay import ReplayReport

CallbackUrl = Callable[[ApprovalRequest], str | None]


# -- approval requests -------------------------------------------------------------------


def approval_request(request: ApprovalRequest) -> dict[str, Any]:
    """The spec's approval request: what `clearance pending --json` prints, and what the
    demo shows; `policy` when a policy rule asked for it."""
    data = request.to_dict()
    if request.policy is not None:
        data["policy"] = asking_rule(request)
    data.update(quorum(request))
    return data


def vote(v: Vote) -> dict[str, Any]:
    """One approval counted towards a quorum: who, how known, when, for which groups."""
    return {
        "by": v.by,
        "byKind": v.by_kind,
        "at": iso(v.at),
        "groups": list(v.groups),
        "onBehalfOf": v.on_behalf_of,
    }


def quorum(request: ApprovalRequest) -> dict[str, Any]:
    """Who must still approve `request`, and who may not: `approvalsRequired`, `groups`,
    `votes` (and, while pending, `stillNeeded` and any changes voted so far) where it
    needs more than one approval or names groups; `requestedBy` where the run names who
    asked for it; `timeoutAction` where an unanswered request is approved. Empty for a
    plain request, so its views are what they always were."""
    data: dict[str, Any] = {}
    if request.needs_quorum:
        data["approvalsRequired"] = request.approvals_required
        data["groups"] = list(request.groups)
        data["votes"] = [vote(v) for v in request.votes]
        if request.status == PENDING:
            count, open_groups = request.still_needed()
            data["stillNeeded"] = {"approvals": count, "groups": list(open_groups)}
            if request.modified_params is not None:
                # A voter approved it with changes: the others are asked about that call.
                data["modifiedParams"] = request.modified_params
    if request.requested_by is not None:
        data["requestedBy"] = request.requested_by
    if request.timeout_action != REJECT:
        data["timeoutAction"] = request.timeout_action
    return data


def asking_rule(request: ApprovalRequest) -> dict[str, Any] | None:
    """The policy rule that asked for the request: `{ruleId, reason, version}`."""
    verdict = request.policy
    if verdict is None:
        return None
    return {"ruleId": verdict.rule_id, "reason": verdict.reason, "version": verdict.version}


def decision_fields(request: ApprovalRequest) -> dict[str, Any]:
    """Who decided a request, when, and with what changes or reason (null while pending)."""
    return {
        "outcome": request.outcome,
        "decidedBy": request.decided_by,
        "decidedByKind": request.decided_by_kind,
        "decidedAt": iso(request.decided_at) if request.decided_at else None,
        "modifiedParams": request.modified_params,
        "rejectionReason": request.rejection_reason,
    }


def approval(
    request: ApprovalRequest,
    callback_url: CallbackUrl | None = None,
    extendable_until: datetime | None = None,
) -> dict[str, Any]:
    """An approval request as the HTTP API lists it: the spec's fields, its status and
    expiry, then who decided it, or, while pending, where to decide it (`callback_url`
    gives it, when this instance can build one) and, where it may be extended, the
    latest deadline an extension may give it (`core.deadlines.extendable_until`)."""
    data = approval_request(request)
    data["status"] = request.status
    data["expiresAt"] = iso(request.expires_at)
    data["callDigest"] = request.digest
    if request.status != PENDING:
        data.update(decision_fields(request))
    elif callback_url is not None and (url := callback_url(request)) is not None:
        data["callbackUrl"] = url
    # Only where an extension is possible: every other request's view is as it was.
    if extendable_until is not None:
        data["extendableUntil"] = iso(extendable_until)
    return data


def approval_with_decision(request: ApprovalRequest) -> dict[str, Any]:
    """An approval request as `clearance show --json` prints it: the decision fields always."""
    return {**approval_request(request), "status": request.status, **decision_fields(request)}


# -- decisions and the audit log -----------------------------------------------------------


def decision(request: ApprovalRequest, execution_status: str) -> dict[str, Any]:
    """A decided request, as the callback and signal routes answer: what the tool runs with
    (`parameters`, modified ones merged in), and only the decision fields that are set."""
    data: dict[str, Any] = {
        "requestId": request.request_id,
        "executionId": request.execution_id,
        "decision": request.status,
        "outcome": request.outcome,
        "tool": request.tool,
        "parameters": request.effective_parameters(),
    }
    if request.modified_params is not None:
        data["modifiedParams"] = request.modified_params
    if request.rejection_reason is not None:
        data["reason"] = request.rejection_reason
    if request.decided_by is not None:
        data["by"] = request.decided_by
        data["byKind"] = request.decided_by_kind
    if request.decided_at is not None:
        data["decidedAt"] = iso(request.decided_at)
    if request.status == PENDING:
        # A vote short of its quorum, or an extended deadline: still open, until when.
        data["expiresAt"] = iso(request.expires_at)
        data["callDigest"] = request.digest
    data.update({k: v for k, v in quorum(request).items() if k != "modifiedParams"})
    data["executionStatus"] = execution_status
    return data


def decision_summary(request: ApprovalRequest) -> dict[str, Any]:
    """The decision that stands on a request, as a refused second decision names it."""
    return {
        "status": request.status,
        "outcome": request.outcome,
        "by": request.decided_by,
        "byKind": request.decided_by_kind,
        "at": iso(request.decided_at) if request.decided_at else None,
    }


def audit_record(record: AuditRecord) -> dict[str, Any]:
    """One decision of the audit log: who decided what, when, and why. A pruned record
    (`clearance prune`) says what it no longer holds (parameters null) and its hashes."""
    said = {
        "requestId": record.request_id,
        "executionId": record.execution_id,
        "agentTag": record.agent_tag,
        "tool": record.tool,
        "decision": record.decision,
        "at": iso(record.at),
        "by": record.by,
        "byKind": record.by_kind,
        "onBehalfOf": record.on_behalf_of,  # a delegator whose grants `by` used
        "parameters": record.parameters,
        "modifiedParams": record.modified_params,
        "reason": record.reason,
        "toolUseId": record.tool_use_id,
        "policy": (
            {"ruleId": record.rule_id, "version": record.policy_version}
            if record.policy_version is not None
            else None
        ),
    }
    if record.pruned is not None:  # only here: every other record reads as it always did
        kept = record.pruned
        said["parameters"] = None
        said["pruned"] = {
            "at": iso(kept.at),
            "parametersHash": kept.parameters_hash,
            "modifiedParamsHash": kept.modified_params_hash,
            "reasonHash": kept.reason_hash,
        }
    return said


def batch_outcome(outcome: BatchOutcome) -> dict[str, Any]:
    """One request's line in a batch answer: its decision, or why it was refused (the
    code and HTTP status a single decision would have had)."""
    if outcome.refusal is not None:
        code = outcome.refusal.code
        return {
            "requestId": outcome.request_id,
            "ok": False,
            "error": {"code": str(code), "message": str(outcome.refusal)},
        }
    ex = outcome.execution
    request = ex.request(outcome.request_id) if ex is not None else None
    assert ex is not None and request is not None  # decided just now
    return {"ok": True, **decision(request, ex.status)}


def reviewer(who: Reviewer, keys: Sequence[ReviewerKey]) -> dict[str, Any]:
    """A reviewer, its grants and its keys' ids and times (never a secret or digest)."""
    return {
        **reviewer_to_data(who),
        "delegations": [
            {"to": d.to, "until": iso(d.until), "at": iso(d.at) if d.at else None}
            for d in who.delegations
        ],
        "keys": [
            {
                "keyId": k.key_id,
                "createdAt": iso(k.created_at),
                "expiresAt": iso(k.expires_at) if k.expires_at else None,
                "revokedAt": iso(k.revoked_at) if k.revoked_at else None,
            }
            for k in keys
        ],
    }


# -- executions ----------------------------------------------------------------------------

# Fields whose values are someone else's data, kept exactly as they were: the model's
# content blocks, a tool's output, parameters, a person's text.
_AS_IS = frozenset({"content", "output", "modified_params", "input", "reason", "error"})


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _camel_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {_camel(k): _camel_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_camel_keys(v) for v in value]
    return value


def event(e: Event) -> dict[str, Any]:
    """One event of an execution's history, in the API's vocabulary: camelCase names,
    times to the millisecond; `type` is the event's name as stored (`model_replied`)."""
    out: dict[str, Any] = {"type": e.TAG}
    for key, value in event_to_data(e).items():
        if key == "type":
            continue
        if key == "at":
            value = iso(e.at)
        elif key not in _AS_IS:
            value = _camel_keys(value)
        out[_camel(key)] = value
    return out


def execution(
    ex: Execution,
    events: Sequence[Event],
    callback_url: CallbackUrl | None = None,
    extendable: Mapping[str, datetime] | None = None,
) -> dict[str, Any]:
    """An execution as `GET /executions/{id}` answers: state, usage, approvals, events.
    `callback_url` gives a pending request's callbackUrl, when there is one;
    `extendable` how far a pending request may be extended, by request id
    (`Clearance.extendable`)."""

    def shown(request: ApprovalRequest) -> dict[str, Any]:
        return approval(request, callback_url, (extendable or {}).get(request.request_id))

    return {
        "executionId": ex.id,
        "agentTag": ex.agent_tag,
        "status": ex.status,
        "input": ex.input,
        "sessionId": ex.session_id,
        "requestedBy": ex.requested_by,
        "output": ex.output,
        "error": ex.error,
        "createdAt": iso(ex.created_at) if ex.created_at else None,
        "updatedAt": iso(ex.updated_at) if ex.updated_at else None,
        "usage": {
            "inputTokens": ex.usage.input_tokens,
            "outputTokens": ex.usage.output_tokens,
        },
        "pendingApprovals": [shown(r) for r in ex.pending_approvals],
        "approvals": [shown(r) for r in ex.requests],
        "events": [event(e) for e in events],
    }


def execution_report(
    ex: Execution, events: Sequence[Event], records: Sequence[AuditRecord]
) -> dict[str, Any]:
    """An execution as `clearance show --json` prints it, with its audit records."""
    return {
        "executionId": ex.id,
        "agentTag": ex.agent_tag,
        "status": ex.status,
        "input": ex.input,
        "requestedBy": ex.requested_by,
        "output": ex.output,
        "error": ex.error,
        "approvals": [approval_with_decision(r) for r in ex.requests],
        "events": [event(e) for e in events],
        "audit": [audit_record(r) for r in records],
    }


# -- the webhook -------------------------------------------------------------------------


def webhook_body(
    request: ApprovalRequest,
    callback_url: str | None,
    *,
    reminder: bool = False,
    stage: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The one body every channel sends for an approval request: the spec's webhook
    body, plus `reason` (the tool's confirmation message) and, when a policy rule asked
    for it, `policy` ({ruleId, reason, version}). `callbackUrl` is null when this
    instance has no public URL and secret to build one, and for a request that needs
    a quorum (a callback URL's decision is a claimed name's, which never counts).

    `reminder`: the request's reminder (`type: "approval_reminder"`); `stage`: (number,
    after in ms) of the escalation stage that delivers it again (`escalation: {stage,
    after}`)."""
    if request.needs_quorum:
        callback_url = None
    body = {
        "type": "approval_reminder" if reminder else "approval_request",
        "requestId": request.request_id,
        "executionId": request.execution_id,
        "agentTag": request.agent_tag,
        "tool": request.tool,
        "parameters": request.parameters,
        "reason": request.reason,  # the confirmation message: why it needs approval
        "timestamp": iso(request.timestamp),
        "expiresAt": iso(request.timeout),
        "callbackUrl": callback_url,
        # What the call is, exactly: send it back with the decision to have it refused
        # if the request asks about another call (callDigest).
        "callDigest": request.digest,
    }
    if request.policy is not None:
        body["policy"] = asking_rule(request)
    # Only where there is more to say (a quorum, a requester): a plain request's body is
    # what it always was.
    body.update(quorum(request))
    if stage is not None:
        body["escalation"] = {"stage": stage[0], "after": duration(stage[1])}
    return body


# -- policies ----------------------------------------------------------------------------


def policy_replay(report: ReplayReport) -> dict[str, Any]:
    """What `clearance policy replay --json` prints: the counts before and after, and
    every call whose outcome would change."""
    return {
        "executions": report.executions,
        "calls": report.calls,
        "before": report.before,
        "after": report.after,
        "seconds": round(report.seconds, 3),
        "changed": [
            {
                "executionId": c.execution_id,
                "turn": c.turn,
                "toolUseId": c.tool_use_id,
                "tool": c.tool,
                "at": iso(c.at),
                "before": c.before,
                "after": c.after,
                "ruleBefore": c.rule_before,
                "ruleAfter": c.rule_after,
            }
            for c in report.changed
        ],
    }


def audit_verdict(verdict: AuditVerdict) -> dict[str, Any]:
    """What `clearance audit verify --json` says of the chain."""
    return {
        "intact": verdict.intact,
        "records": verdict.records,
        "head": verdict.head,
        "problem": verdict.problem,
        "row": verdict.row,
    }


def pruning(done: Pruning) -> dict[str, Any]:
    """What `clearance prune --json` says it did (or would do, with --dry-run)."""
    return {
        "dryRun": done.dry_run,
        "executions": done.executions,
        "auditPruned": done.audit_pruned,
        "auditKept": done.audit_kept,
        "auditUnreadable": done.audit_unreadable,
        "busy": done.busy,
        "unreadable": done.unreadable,
    }


def audit_chain_row(row: ChainRow) -> dict[str, Any]:
    """One audit row as `clearance audit export` writes it: the record, and its link in
    the chain (`entry` is the text hashed; null links: older than the chain)."""
    link = row.link
    return {
        "id": row.id,
        "record": audit_record(row.record) if row.record is not None else None,
        "body": None if row.record is not None else row.body,
        "entry": link.entry if link else None,
        "prevHash": link.prev_hash if link else None,
        "hash": link.hash if link else None,
    }
