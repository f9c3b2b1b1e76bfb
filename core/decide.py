"""`decide(execution, event) -> (execution', commands)`: the whole behaviour, pure.

No clock, no ids, no I/O: everything arrives in the event, everything to do
leaves as a command. An event that does not fit raises `Refusal` and changes
nothing; the engine turns it into a `ClearanceError` for whoever sent it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypedDict

import attrs

from clearance.core.agent import PARALLEL, ToolSpec
from clearance.core.commands import (
    AuditRecord,
    CallModel,
    CancelTimer,
    Command,
    Finish,
    PublishApprovalRequest,
    RecordDecision,
    RunTool,
    StartTimer,
)
from clearance.core.errors import Refusal
from clearance.core.events import (
    Approved,
    Event,
    ModelFailed,
    ModelReplied,
    Rejected,
    Started,
    StopRequested,
    TimerFired,
    ToolFailed,
    ToolFinished,
)
from clearance.core.execution import (
    APPROVED,
    AWAITING,
    AWAITING_APPROVAL,
    CANCELLED,
    COMPLETED,
    DONE,
    EXECUTING,
    FAILED,
    PENDING,
    QUEUED,
    REJECTED,
    RUNNING,
    STOPPED,
    TERMINAL,
    TIMED_OUT,
    ApprovalRequest,
    Execution,
    ToolCall,
    ToolResult,
    Usage,
    iso,
)
from clearance.core.machine import EXECUTION_ACCEPTS, EXECUTION_MOVES, REQUEST_MOVES
from clearance.core.schema import check, problems, with_defaults


class Changes(TypedDict, total=False):
    """The fields of an execution one step changes, by name, as `attrs.evolve` takes them.

    Steps collect these rather than copy the frozen Execution at each sub-step, which
    made about four copies a step at ~3 µs each: `decide()` makes the one copy.
    """

    id: str
    input: str
    session_id: str | None
    created_at: datetime | None
    status: str
    messages: tuple[dict[str, Any], ...]
    calls: tuple[ToolCall, ...]
    requests: tuple[ApprovalRequest, ...]
    model_turn: int
    awaiting_model: bool
    output: str | None
    error: str | None
    stop_reason: str | None
    usage: Usage


Step = tuple[Changes, list[Command]]

# Stop reasons that end a turn without a finished answer, and what to tell people.
UNFINISHED = {
    "max_tokens": "the model reached its max_tokens limit before finishing its answer "
    "(stop_reason 'max_tokens'); raise Model(max_tokens=...) and run it again",
    "refusal": "the model declined to continue (stop_reason 'refusal'); its partial text "
    "is in output",
}


def decide(execution: Execution, event: Event) -> tuple[Execution, tuple[Command, ...]]:
    source = execution.status
    if isinstance(event, Approved | Rejected | TimerFired):
        _check_request_open(execution, event.request_id)
    if (event.TAG, source) not in EXECUTION_ACCEPTS:
        raise Refusal("wrong_state", _wrong_state(execution, event))
    changes, commands = _STEPS[type(event)](execution, event)
    dest = changes.get("status", source)
    if (event.TAG, source, dest) not in EXECUTION_MOVES:
        raise RuntimeError(
            f"bug: decide() moved execution {execution.id} from {source} to {dest} on "
            f"'{event.TAG}', which the state table does not allow"
        )
    new = attrs.evolve(execution, **changes, seq=execution.seq + 1, updated_at=event.at)
    return new, tuple(commands)


def _wrong_state(ex: Execution, event: Event) -> str:
    name = f"execution {ex.id or '(not started)'}"
    if ex.status in TERMINAL:
        return f"{name} is {ex.status}; it takes no more events (got '{event.TAG}')"
    if ex.status == "created":
        return f"{name} has not started; start it before sending '{event.TAG}'"
    if isinstance(event, Started):
        return f"{name} has already started"
    return f"{name} is {ex.status}; '{event.TAG}' does not apply now"


# -- starting and model turns -------------------------------------------------


def _started(ex: Execution, ev: Started) -> Step:
    if not ev.execution_id:
        raise Refusal("invalid_event", "a started event needs a non-empty execution_id")
    changes = Changes(
        id=ev.execution_id,
        input=ev.input,
        session_id=ev.session_id,
        created_at=ev.at,
        status=RUNNING,
        messages=({"role": "user", "content": ev.input},),
        model_turn=1,
        awaiting_model=True,
    )
    return changes, [CallModel(turn=1)]


def _check_turn(ex: Execution, turn: int) -> None:
    if not ex.awaiting_model or turn != ex.model_turn:
        waiting = f"turn {ex.model_turn}" if ex.awaiting_model else "no model call"
        raise Refusal(
            "stale_model_reply",
            f"execution {ex.id} is waiting for {waiting}, not for model turn {turn}; "
            "this reply is stale and was ignored",
        )


def _model_replied(ex: Execution, ev: ModelReplied) -> Step:
    _check_turn(ex, ev.turn)
    content = [dict(block) for block in ev.content]
    changes = Changes(
        messages=(*ex.messages, {"role": "assistant", "content": content}),
        usage=ex.usage + ev.usage,
        stop_reason=ev.stop_reason,
        awaiting_model=False,
    )
    uses = [b for b in content if b.get("type") == "tool_use"]
    if not uses:
        output = "".join(str(b.get("text", "")) for b in content if b.get("type") == "text")
        changes["output"] = output
        unfinished = UNFINISHED.get(ev.stop_reason)
        if unfinished is not None:
            # A cut-off or refused answer must not pass for a finished one.
            changes["status"], changes["error"] = FAILED, unfinished
            return changes, [Finish(FAILED, output, unfinished)]
        changes["status"] = COMPLETED
        return changes, [Finish(COMPLETED, output)]
    ids = [str(b.get("id", "")) for b in uses]
    if len(set(ids)) != len(ids) or "" in ids:
        raise Refusal("invalid_reply", f"model reply has missing or repeated tool_use ids: {ids}")
    tickets = {t.tool_use_id: t for t in ev.tickets}
    calls: list[ToolCall] = []
    for block in uses:
        tool_use_id, name, params = str(block["id"]), str(block.get("name", "")), block.get("input")
        tool = ex.agent.tool(name)
        if tool is None:
            calls.append(
                _done_call(
                    tool_use_id,
                    name,
                    params,
                    _error(
                        "unknown_tool",
                        f"No tool named '{name}'. Available tools: {ex.agent.tool_names()}.",
                    ),
                )
            )
            continue
        params = with_defaults(tool.input_schema, params) if isinstance(params, dict) else params
        found = problems(tool.input_schema, params)
        if found:
            calls.append(
                _done_call(
                    tool_use_id,
                    name,
                    params,
                    _error(
                        "invalid_parameters",
                        f"Invalid parameters for '{name}': {'; '.join(found)}. "
                        "Fix them and call the tool again.",
                        problems=found,
                    ),
                )
            )
            continue
        assert isinstance(params, dict)  # the schema's "type": "object" held
        ticket = tickets.get(tool_use_id)
        if tool.gated and ticket is None:
            raise Refusal("invalid_event", f"gated tool_use {tool_use_id} arrived without a ticket")
        calls.append(
            ToolCall(
                tool_use_id=tool_use_id,
                tool=name,
                parameters=params,
                status=QUEUED,
                gated=tool.gated,
                request_id=ticket.request_id if ticket else "",
                reason=ticket.reason if ticket else "",
            )
        )
    return _advance(ex, ev, calls, changes, [])


def _model_failed(ex: Execution, ev: ModelFailed) -> Step:
    _check_turn(ex, ev.turn)
    changes = Changes(status=FAILED, error=ev.error, awaiting_model=False)
    return changes, [Finish(FAILED, error=ev.error)]


def _done_call(tool_use_id: str, name: str, params: Any, result: ToolResult) -> ToolCall:
    return ToolCall(
        tool_use_id=tool_use_id,
        tool=name,
        parameters=params if isinstance(params, dict) else {"input": params},
        status=DONE,
        result=result,
    )


def _error(code: str, message: str, **extra: Any) -> ToolResult:
    return ToolResult(json.dumps({"error": code, "message": message, **extra}), is_error=True)


# -- the tool calls of one turn -------------------------------------------------


def _advance(
    ex: Execution, ev: Event, calls: list[ToolCall], changes: Changes, commands: list[Command]
) -> Step:
    """Start what may start now; once every call has its result, ask the model again.

    `calls` are the turn's calls as this step has left them so far, and `changes`
    what else it changed. Sequential order opens one thing at a time in the model's
    order (the spec's "queue them and process sequentially"); parallel opens every
    approval and runs every ungated tool of the turn at once.
    """
    parallel = ex.agent.approval_order == PARALLEL
    requests = list(changes.get("requests", ex.requests))
    for i, call in enumerate(calls):
        if call.status == DONE:
            continue
        if call.status == QUEUED:
            tool = _tool(ex, call.tool)
            if call.gated:
                request = ApprovalRequest(
                    request_id=call.request_id,
                    execution_id=ex.id,
                    agent_tag=ex.agent_tag,
                    tool=call.tool,
                    tool_use_id=call.tool_use_id,
                    parameters=call.parameters,
                    reason=call.reason,
                    timestamp=ev.at,
                    timeout=ev.at + timedelta(milliseconds=tool.approval_timeout_ms),
                    timeout_ms=tool.approval_timeout_ms,
                )
                requests.append(request)
                calls[i] = attrs.evolve(call, status=AWAITING)
                commands += [
                    PublishApprovalRequest(request),
                    StartTimer(request.request_id, request.timeout),
                ]
            else:
                calls[i] = attrs.evolve(call, status=EXECUTING)
                commands.append(
                    RunTool(
                        tool_use_id=call.tool_use_id,
                        tool=call.tool,
                        parameters=call.parameters,
                        idempotency_key=f"{ex.id}:{call.tool_use_id}",
                    )
                )
        if not parallel:
            break
    changes["requests"] = tuple(requests)
    if all(c.status == DONE for c in calls):
        return _next_turn(ex, calls, changes, commands)
    busy = any(c.status == EXECUTING for c in calls)
    changes["calls"], changes["status"] = tuple(calls), RUNNING if busy else AWAITING_APPROVAL
    return changes, commands


def _next_turn(
    ex: Execution, calls: list[ToolCall], changes: Changes, commands: list[Command]
) -> Step:
    results = []
    for call in calls:
        assert call.result is not None
        results.append(
            {
                "type": "tool_result",
                "tool_use_id": call.tool_use_id,
                "content": call.result.content,
                "is_error": call.result.is_error,
            }
        )
    messages = changes.get("messages", ex.messages)
    changes["calls"], changes["messages"] = (), (*messages, {"role": "user", "content": results})
    if ex.model_turn >= ex.agent.max_iterations:
        error = (
            f"stopped after max_iterations={ex.agent.max_iterations} model turns without "
            "a final answer"
        )
        changes["status"], changes["error"] = FAILED, error
        return changes, [*commands, Finish(FAILED, error=error)]
    turn = ex.model_turn + 1
    changes["status"], changes["model_turn"], changes["awaiting_model"] = RUNNING, turn, True
    return changes, [*commands, CallModel(turn=turn)]


def _tool(ex: Execution, tag: str) -> ToolSpec:
    tool = ex.agent.tool(tag)
    assert tool is not None, f"call for unknown tool {tag} was queued"
    return tool


def _finish_call(ex: Execution, tool_use_id: str, result: ToolResult) -> list[ToolCall]:
    return [
        attrs.evolve(c, status=DONE, result=result) if c.tool_use_id == tool_use_id else c
        for c in ex.calls
    ]


def _tool_done(ex: Execution, ev: ToolFinished | ToolFailed) -> Step:
    call = ex.call(ev.tool_use_id)
    if call is None or call.status != EXECUTING:
        state = "unknown" if call is None else call.status
        raise Refusal(
            "stale_tool_result",
            f"execution {ex.id} is not running tool_use {ev.tool_use_id} (it is {state}); "
            "this result was ignored",
        )
    if isinstance(ev, ToolFailed):
        result = _error("tool_failed", f"Tool '{call.tool}' failed: {ev.error}")
    else:
        output = ev.output if isinstance(ev.output, str) else json.dumps(ev.output)
        request = ex.request(call.request_id) if call.request_id else None
        if request is not None and request.modified_params is not None:
            # The model must know it did not get exactly what it asked for.
            note = (
                "A human approved this call with modified parameters: "
                f"{json.dumps(request.modified_params)}. It ran with "
                f"{json.dumps(call.parameters)}."
            )
            result = ToolResult([{"type": "text", "text": note}, {"type": "text", "text": output}])
        else:
            result = ToolResult(output)
    return _advance(ex, ev, _finish_call(ex, ev.tool_use_id, result), Changes(), [])


# -- decisions ---------------------------------------------------------------------


def _check_request_open(ex: Execution, request_id: str) -> ApprovalRequest:
    request = ex.request(request_id)
    if request is None:
        known = ", ".join(r.request_id for r in ex.requests) or "none"
        raise Refusal(
            "unknown_request",
            f"execution {ex.id} has no approval request '{request_id}' (its requests: {known})",
        )
    if request.status != PENDING:
        raise Refusal("already_decided", standing_decision(request))
    return request


def standing_decision(request: ApprovalRequest) -> str:
    by = f" by {request.decided_by}" if request.decided_by else ""
    when = f" at {iso(request.decided_at)}" if request.decided_at else ""
    what = {TIMED_OUT: "timed out", CANCELLED: "cancelled"}.get(request.status, request.status)
    return (
        f"approval request {request.request_id} was already {what}{by}{when}; "
        "that decision stands and no other can be made"
    )


def _decision_record(
    ex: Execution,
    request: ApprovalRequest,
    decision: str,
    at: Any,
    *,
    by: str | None = None,
    modified: dict[str, Any] | None = None,
    reason: str | None = None,
) -> RecordDecision:
    return RecordDecision(
        AuditRecord(
            request_id=request.request_id,
            execution_id=ex.id,
            agent_tag=ex.agent_tag,
            tool=request.tool,
            decision=decision,
            at=at,
            parameters=request.parameters,
            by=by,
            modified_params=modified,
            reason=reason,
        )
    )


def _decide_request(
    requests: tuple[ApprovalRequest, ...], request: ApprovalRequest, action: str, **outcome: Any
) -> tuple[ApprovalRequest, ...]:
    """`requests` with `request` decided as `outcome` says."""
    decided = attrs.evolve(request, **outcome)
    if (action, request.status, decided.status) not in REQUEST_MOVES:
        raise RuntimeError(
            f"bug: request {request.request_id} cannot {action} from "
            f"{request.status} to {decided.status}"
        )
    return tuple(decided if r.request_id == request.request_id else r for r in requests)


def _check_not_expired(request: ApprovalRequest, ev: Approved | Rejected) -> None:
    if ev.at >= request.timeout:
        raise Refusal(
            "expired",
            f"approval request {request.request_id} expired at {iso(request.timeout)}; "
            "it is auto-rejected as timed out and can no longer be decided",
        )


def _approved(ex: Execution, ev: Approved) -> Step:
    request = _check_request_open(ex, ev.request_id)
    _check_not_expired(request, ev)
    params = request.parameters
    if ev.modified_params is not None:
        if not isinstance(ev.modified_params, dict):
            raise Refusal(
                "invalid_parameters",
                "modified_params must be a dict of "
                f"parameter -> value, got {type(ev.modified_params).__name__}",
            )
        params = {**request.parameters, **ev.modified_params}
        check(request.tool, _tool(ex, request.tool).input_schema, params)
    requests = _decide_request(
        ex.requests,
        request,
        "approve",
        status=APPROVED,
        decided_by=ev.by,
        decided_at=ev.at,
        modified_params=ev.modified_params,
    )
    calls = [
        attrs.evolve(c, status=EXECUTING, parameters=params, approved_by=ev.by)
        if c.tool_use_id == request.tool_use_id
        else c
        for c in ex.calls
    ]
    commands: list[Command] = [
        CancelTimer(request.request_id),
        _decision_record(ex, request, APPROVED, ev.at, by=ev.by, modified=ev.modified_params),
        RunTool(
            tool_use_id=request.tool_use_id,
            tool=request.tool,
            parameters=params,
            idempotency_key=request.request_id,
            request_id=request.request_id,
            approved_by=ev.by,
        ),
    ]
    return _advance(ex, ev, calls, Changes(requests=requests), commands)


def _rejected(ex: Execution, ev: Rejected) -> Step:
    request = _check_request_open(ex, ev.request_id)
    _check_not_expired(request, ev)
    requests = _decide_request(
        ex.requests,
        request,
        "reject",
        status=REJECTED,
        decided_by=ev.by,
        decided_at=ev.at,
        rejection_reason=ev.reason,
    )
    because = f": {ev.reason.rstrip('.')}" if ev.reason else ""
    result = _error(
        "approval_rejected",
        f"A human rejected the call to '{request.tool}'{because}. The tool did not run.",
        reason=ev.reason,
        tool=request.tool,
        parameters=request.parameters,
    )
    commands: list[Command] = [
        CancelTimer(request.request_id),
        _decision_record(ex, request, REJECTED, ev.at, by=ev.by, reason=ev.reason),
    ]
    calls = _finish_call(ex, request.tool_use_id, result)
    return _advance(ex, ev, calls, Changes(requests=requests), commands)


def duration(ms: int) -> str:
    """300000 -> '5 minutes', as the spec's timeout message spells it."""
    for unit, size in (("hour", 3_600_000), ("minute", 60_000), ("second", 1000)):
        if ms >= size and ms % size == 0:
            n = ms // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{ms} milliseconds"


def _timer_fired(ex: Execution, ev: TimerFired) -> Step:
    request = _check_request_open(ex, ev.request_id)
    if ev.at < request.timeout:
        raise Refusal(
            "not_due",
            f"approval request {request.request_id} is not due until "
            f"{iso(request.timeout)} (timer fired at {iso(ev.at)})",
        )
    requests = _decide_request(ex.requests, request, "time_out", status=TIMED_OUT, decided_at=ev.at)
    message = f"Approval request timed out after {duration(request.timeout_ms)}"
    result = ToolResult(
        json.dumps(
            {
                "error": "approval_timeout",
                "message": message,
                "tool": request.tool,
                "parameters": request.parameters,
            }
        ),
        is_error=True,
    )
    commands: list[Command] = [
        CancelTimer(request.request_id),
        _decision_record(ex, request, TIMED_OUT, ev.at, reason=message),
    ]
    calls = _finish_call(ex, request.tool_use_id, result)
    return _advance(ex, ev, calls, Changes(requests=requests), commands)


def _stop(ex: Execution, ev: StopRequested) -> Step:
    commands: list[Command] = []
    requests = ex.requests
    for request in ex.pending_approvals:
        requests = _decide_request(
            requests,
            request,
            "cancel",
            status=CANCELLED,
            decided_by=ev.by,
            decided_at=ev.at,
            rejection_reason=ev.reason,
        )
        commands += [
            CancelTimer(request.request_id),
            _decision_record(
                ex, request, CANCELLED, ev.at, by=ev.by, reason=ev.reason or "execution stopped"
            ),
        ]
    changes = Changes(
        requests=requests,
        status=STOPPED,
        awaiting_model=False,
        error=ev.reason if ev.reason else ex.error,
    )
    return changes, [*commands, Finish(STOPPED, error=ev.reason)]


_STEPS: dict[type[Any], Callable[[Execution, Any], Step]] = {
    Started: _started,
    ModelReplied: _model_replied,
    ModelFailed: _model_failed,
    ToolFinished: _tool_done,
    ToolFailed: _tool_done,
    Approved: _approved,
    Rejected: _rejected,
    TimerFired: _timer_fired,
    StopRequested: _stop,
}
