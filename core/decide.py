"""`decide(execution, event) -> (execution', commands)`: the whole behaviour, pure.

No clock, no ids, no I/O: everything arrives in the event, everything to do
leaves as a command. An event that does not fit raises `Refusal` and changes
nothing; the engine turns it into a `ClearanceError` for whoever sent it.
`decide()` raises nothing else, whatever the event holds.

Only plain JSON reaches the state (json_value.strict), so a live state equals
the one replaying its log gives. What people send (a start's input, a
decision's `by`, `reason` and `modified_params`, a stop's) is refused when JSON
or UTF-8 cannot carry it. What already happened is recorded: a model's tool
input JSON cannot carry becomes an is_error tool result (as invalid parameters
do), text UTF-8 cannot encode in a tool's outcome or a model failure is spelled
out as escapes. A model reply that is not content blocks at all, or carries
what JSON cannot outside tool input, is refused as `invalid_reply`, which the
engine turns into a failed execution.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypedDict

import attrs

from clearance.core.agent import APPROVE, PARALLEL, TIMEOUT_ACTIONS, AgentSpec, ToolSpec
from clearance.core.call_digest import call_digest
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
from clearance.core.deadlines import latest_deadline
from clearance.core.errors import InvalidParameters, Refusal, RefusalCode
from clearance.core.escalation import REMINDER, due, schedule, stage_purpose
from clearance.core.events import (
    Approved,
    Event,
    Extended,
    ModelFailed,
    ModelReplied,
    Reassessment,
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
    ALLOWED_BY_GRANT,
    ALLOWED_BY_POLICY,
    ANSWERED,
    APPROVED,
    APPROVED_BY_TIMEOUT,
    APPROVED_MODIFIED,
    AWAITING,
    AWAITING_APPROVAL,
    CANCELLED,
    COMPLETED,
    DENIED_BY_POLICY,
    DONE,
    EXECUTING,
    EXTENDED,
    FAILED,
    INVALIDATED,
    PENDING,
    QUEUED,
    REJECTED,
    RUNNING,
    STOPPED,
    TERMINAL,
    TIMED_OUT,
    VOTE,
    ApprovalRequest,
    Execution,
    ToolCall,
    ToolResult,
    Usage,
    iso,
)
from clearance.core.json_value import NotJSON, check_text, strict
from clearance.core.machine import CALL_MOVES, EXECUTION_ACCEPTS, EXECUTION_MOVES, REQUEST_MOVES
from clearance.core.policy import ALLOW, ASK, DENY, EFFECTS, NO_MATCH, SessionGrant, Verdict
from clearance.core.quorum import MAX_APPROVALS, MAX_GROUPS, Vote, met
from clearance.core.reviewers import APP, BY_KINDS, REVIEWER
from clearance.core.schema import check, declared_parameters, problems, with_defaults

# The version of decide()'s behaviour, recorded with the logs it folds. Version 1 logs are
# those written before version 2 (which gave a tool call its own table: "running" became
# "executing", a rejected / timed-out / cancelled call keeps that status instead of
# "done", a stop cancels queued and awaiting calls, and a stopped execution records the
# outcome of a tool it was running; core.wire reads a version 1 state as version 2 would
# have made it). Replaying a log stored by any version must give the state it had when
# it was written: a change to decide() that would fold a stored log differently bumps
# this version and keeps the old behaviour for the old logs.
DECIDE_VERSION = 2


class Changes(TypedDict, total=False):
    """The fields of an execution one step changes, by name, as `attrs.evolve` takes them.

    Steps collect these rather than copy the frozen Execution at each sub-step, which
    made about four copies a step at ~3 µs each: `decide()` makes the one copy.
    """

    agent: AgentSpec
    id: str
    input: str
    session_id: str | None
    requested_by: str | None
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
    grants: tuple[SessionGrant, ...]


Step = tuple[Changes, list[Command]]

# Stop reasons that end a turn without a finished answer, and what to tell people.
UNFINISHED = {
    "max_tokens": "the model reached its max_tokens limit before finishing its answer "
    "(stop_reason 'max_tokens'); raise Model(max_tokens=...) and run it again",
    "refusal": "the model declined to continue (stop_reason 'refusal'); its partial text "
    "is in output",
}


def decide(execution: Execution, event: Event) -> tuple[Execution, tuple[Command, ...]]:
    step = _STEPS.get(type(event))
    if step is None:
        raise Refusal(
            RefusalCode.INVALID_EVENT,
            f"not an event: {type(event).__name__}; accepted: "
            + ", ".join(t.__name__ for t in _STEPS),
        )
    _check_at(event)
    source = execution.status
    if isinstance(event, Approved | Rejected | TimerFired | Extended):
        _check_request_open(execution, event.request_id)
    if (event.TAG, source) not in EXECUTION_ACCEPTS:
        raise Refusal(RefusalCode.WRONG_STATE, _wrong_state(execution, event))
    changes, commands = step(execution, event)
    dest = changes.get("status", source)
    if (event.TAG, source, dest) not in EXECUTION_MOVES:
        raise RuntimeError(
            f"bug: decide() moved execution {execution.id} from {source} to {dest} on "
            f"'{event.TAG}', which the state table does not allow"
        )
    new = attrs.evolve(execution, **changes, seq=execution.seq + 1, updated_at=event.at)
    return new, tuple(commands)


def _check_at(event: Event) -> None:
    at = event.at
    if not isinstance(at, datetime) or at.utcoffset() is None:
        raise Refusal(
            RefusalCode.INVALID_EVENT,
            f"a '{event.TAG}' event needs 'at', a timezone-aware datetime; got {at!r}",
        )


# -- the text and data events carry ------------------------------------------------------------


def _sent_text(value: Any, what: str, *, optional: bool = True) -> Any:
    """Text people sent (an input, a `by`, a reason): valid Unicode, or Refusal."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        accepted = "text or null" if optional else "text"
        raise Refusal(
            RefusalCode.INVALID_EVENT, f"{what} must be {accepted}, got {type(value).__name__}"
        )
    try:
        return check_text(value, what)
    except NotJSON as err:
        raise Refusal(RefusalCode.INVALID_EVENT, str(err)) from None


def _by_kind(kind: Any, by: str | None, what: str) -> str | None:
    """How a decider is known: one of BY_KINDS, and only with a name to qualify."""
    if kind is None:
        return None
    if kind not in BY_KINDS:
        raise Refusal(
            RefusalCode.INVALID_EVENT, f"{what}.by_kind is one of {list(BY_KINDS)}, got {kind!r}"
        )
    if by is None:
        raise Refusal(RefusalCode.INVALID_EVENT, f"{what}.by_kind {kind!r} qualifies no `by`")
    return str(kind)


def _known(by: str | None, by_kind: str | None) -> bool:
    """Whether a decider is a person Clearance knows: a reviewer (by their key) or the
    app's `by=`; not a claimed name (a callback URL, a broker message, the CLI's --by),
    nor nobody."""
    return by is not None and by_kind in (REVIEWER, APP)


def _visible(text: str) -> str:
    """Text that happened (a tool's output, an error): what UTF-8 cannot encode (lone
    surrogates) is spelled out as a backslash escape, as `ascii()` would."""
    try:
        text.encode("utf-8")
        return str(text)
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _outcome_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise Refusal(RefusalCode.INVALID_EVENT, f"{what} must be text, got {type(value).__name__}")
    return _visible(value)


# What each event is, for people: refusals name the signal or result, not its tag.
_SAID = {
    "started": "a start",
    "model_replied": "a model reply",
    "model_failed": "a model failure",
    "approved": "an approval",
    "rejected": "a rejection",
    "timer_fired": "an approval timeout",
    "extended": "a deadline extension",
    "tool_finished": "a tool result",
    "tool_failed": "a tool failure",
    "stop_requested": "a stop",
    "redefined": "a redefinition of the agent",
}


def _wrong_state(ex: Execution, event: Event) -> str:
    name = f"execution {ex.id or '(not started)'}"
    what = _SAID.get(event.TAG, f"'{event.TAG}'")
    if ex.status in TERMINAL:
        return f"{name} is {ex.status}; it takes nothing more ({what} came)"
    if ex.status == "created":
        return f"{name} has not started; start it before sending {what}"
    if isinstance(event, Started):
        return f"{name} has already started"
    return f"{name} is {ex.status}; {what} does not apply now"


# -- starting and model turns -------------------------------------------------


def _started(ex: Execution, ev: Started) -> Step:
    if not isinstance(ev.execution_id, str) or not ev.execution_id:
        raise Refusal(RefusalCode.INVALID_EVENT, "a started event needs a non-empty execution_id")
    execution_id = _sent_text(ev.execution_id, "started.execution_id", optional=False)
    text = _sent_text(ev.input, "started.input", optional=False)
    session_id = _sent_text(ev.session_id, "started.session_id")
    requested_by = _sent_text(ev.requested_by, "started.requested_by")
    changes = Changes(
        id=execution_id,
        input=text,
        session_id=session_id,
        requested_by=requested_by,
        created_at=ev.at,
        status=RUNNING,
        messages=({"role": "user", "content": text},),
        model_turn=1,
        awaiting_model=True,
    )
    return changes, [CallModel(turn=1)]


def _check_turn(ex: Execution, turn: int) -> None:
    if not ex.awaiting_model or turn != ex.model_turn:
        waiting = f"turn {ex.model_turn}" if ex.awaiting_model else "no model call"
        raise Refusal(
            RefusalCode.STALE_MODEL_REPLY,
            f"execution {ex.id} is waiting for {waiting}, not for model turn {turn}; "
            "this reply is stale and was ignored",
        )


def _invalid_reply(message: str) -> Refusal:
    return Refusal(RefusalCode.INVALID_REPLY, f"the model's reply cannot be used: {message}")


def _reply_content(content: Any) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """The reply's content blocks as plain JSON, and for each tool_use block (by index)
    whose input JSON cannot carry, why: that input is stored as {} and the call answered
    with an error, as for invalid parameters."""
    if not isinstance(content, list | tuple):
        raise _invalid_reply(
            f"its content must be a list of content blocks, got {type(content).__name__}"
        )
    blocks: list[dict[str, Any]] = []
    unusable: dict[int, str] = {}
    for i, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            kind = type(block).__name__
            raise _invalid_reply(
                f"content[{i}] is not a content block (a dict with a string 'type'), got "
                + (f"a {kind}" if not isinstance(block, dict) else "a dict without one")
            )
        try:
            if block["type"] == "tool_use" and "input" in block:
                plain = strict({**block, "input": None}, f"content[{i}]")
                try:
                    plain["input"] = strict(block["input"], "input")
                except NotJSON as err:
                    unusable[i] = str(err)
                    plain["input"] = {}
            else:
                plain = strict(block, f"content[{i}]")
        except NotJSON as err:
            raise _invalid_reply(str(err)) from None
        blocks.append(plain)
    return blocks, unusable


def _check_reply(ev: ModelReplied) -> None:
    if not isinstance(ev.stop_reason, str):
        raise _invalid_reply(f"its stop_reason must be text, got {type(ev.stop_reason).__name__}")
    try:
        check_text(ev.stop_reason, "its stop_reason")
    except NotJSON as err:
        raise _invalid_reply(str(err)) from None
    usage = ev.usage
    if not (
        isinstance(usage, Usage)
        and type(usage.input_tokens) is int
        and type(usage.output_tokens) is int
    ):
        raise _invalid_reply("its usage must be whole numbers of input and output tokens")
    if not isinstance(ev.tickets, tuple | list) or not all(
        isinstance(t, Ticket) for t in ev.tickets
    ):
        raise Refusal(
            RefusalCode.INVALID_EVENT, "a model_replied event's tickets must be Ticket objects"
        )


def _model_replied(ex: Execution, ev: ModelReplied) -> Step:
    _check_turn(ex, ev.turn)
    content, unusable = _reply_content(ev.content)
    _check_reply(ev)
    changes = Changes(
        messages=(*ex.messages, {"role": "assistant", "content": content}),
        usage=ex.usage + ev.usage,
        stop_reason=ev.stop_reason,
        awaiting_model=False,
    )
    uses = [(i, b) for i, b in enumerate(content) if b["type"] == "tool_use"]
    if not uses:
        output = "".join(str(b.get("text", "")) for b in content if b["type"] == "text")
        changes["output"] = output
        unfinished = UNFINISHED.get(ev.stop_reason)
        if unfinished is not None:
            # A cut-off or refused answer must not pass for a finished one.
            changes["status"], changes["error"] = FAILED, unfinished
            return changes, [Finish(FAILED, output, unfinished)]
        changes["status"] = COMPLETED
        return changes, [Finish(COMPLETED, output)]
    ids = [str(b.get("id", "")) for _, b in uses]
    if len(set(ids)) != len(ids) or "" in ids:
        raise Refusal(
            RefusalCode.INVALID_REPLY, f"model reply has missing or repeated tool_use ids: {ids}"
        )
    tickets = {t.tool_use_id: t for t in ev.tickets if isinstance(t.tool_use_id, str)}
    calls = [_new_call(ex, str(b["id"]), b, unusable.get(i), tickets) for i, b in uses]
    return _advance(ex, ev, calls, changes, _policy_records(ex, ev, calls))


def _new_call(
    ex: Execution,
    tool_use_id: str,
    block: dict[str, Any],
    unusable: str | None,
    tickets: dict[str, Ticket],
) -> ToolCall:
    """The call for one tool_use: queued, or answered at once when it cannot be carried
    out (queued -> done, in this same step)."""
    name, params = str(block.get("name", "")), block.get("input")
    call = ToolCall(tool_use_id=tool_use_id, tool=name, parameters={}, status=QUEUED)
    tool = ex.agent.tool(name)
    if tool is None:
        return _answer(
            call,
            params,
            _error(
                "unknown_tool",
                f"No tool named '{name}'. Available tools: {ex.agent.tool_names()}.",
            ),
        )
    if unusable is not None:
        return _answer(call, {}, _invalid_parameters(name, [unusable]))
    try:
        params = with_defaults(tool.input_schema, params) if isinstance(params, dict) else params
        found = problems(tool.input_schema, params)
    except Exception as err:  # the schema, not the parameters: e.g. a $ref that does not resolve
        return _answer(call, params, _schema_error(name, err))
    if found:
        return _answer(call, params, _invalid_parameters(name, found))
    assert isinstance(params, dict)  # the schema's "type": "object" held
    ticket = tickets.get(tool_use_id)
    verdict = _verdict(ex, ticket.verdict if ticket else None, f"tool_use {tool_use_id}")
    effect = verdict.applied if verdict is not None else NO_MATCH
    if effect == DENY:
        assert verdict is not None
        call = attrs.evolve(call, verdict=verdict)
        return _answer(call, params, _denied(name, verdict))
    gated = effect == ASK or (effect == NO_MATCH and tool.gated)
    granted = _grant(ex, ticket, name) if gated else None
    if granted is not None and _quorum(tool, verdict) != (1, ()):
        granted = None  # a session grant stands for one person: never for a quorum
    if granted is not None:
        gated = False
        call = attrs.evolve(call, granted=granted)
    if gated and ticket is None:
        raise Refusal(
            RefusalCode.INVALID_EVENT, f"gated tool_use {tool_use_id} arrived without a ticket"
        )
    request_id = reason = ""
    if ticket is not None:  # the engine makes one for every tool_use, gated or not
        request_id = _ticket_text(ticket.request_id, tool_use_id, "request_id")
        reason = _ticket_text(ticket.reason, tool_use_id, "reason")
    if gated and not request_id:
        raise Refusal(
            RefusalCode.INVALID_EVENT,
            f"the ticket for tool_use {tool_use_id} has no request_id",
        )
    return attrs.evolve(
        call,
        parameters=params,
        gated=gated,
        request_id=request_id,
        reason=reason,
        verdict=verdict,
    )


def _grant(ex: Execution, ticket: Ticket | None, tool: str) -> SessionGrant | None:
    """The session grant the ticket says covers this call: it must be one of this
    execution's, for this tool (whether its bound holds the engine judged)."""
    index = ticket.grant if ticket is not None else None
    if index is None:
        return None
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(ex.grants):
        raise Refusal(RefusalCode.INVALID_EVENT, f"a ticket names no session grant {index!r}")
    grant = ex.grants[index]
    if grant.tool != tool:
        raise Refusal(
            RefusalCode.INVALID_EVENT,
            f"session grant {index} is for '{grant.tool}', not for a call of '{tool}'",
        )
    return grant


def _verdict(ex: Execution, verdict: Any, what: str) -> Verdict | None:
    """The verdict an event carries for `what`, checked: the agent's policy must have
    judged the call (an event without one would slip past its rules), and that policy
    only (not another version of it)."""
    policy = ex.agent.policy
    if policy is None:
        return None
    if not isinstance(verdict, Verdict):
        raise Refusal(
            RefusalCode.INVALID_EVENT, f"{what} arrived without the verdict of the agent's policy"
        )
    if verdict.version != policy.version or verdict.effect not in (*EFFECTS, NO_MATCH):
        raise Refusal(
            RefusalCode.INVALID_EVENT,
            f"{what}: a verdict of policy {verdict.version!r} ({verdict.effect!r}), not of the"
            f" agent's policy {policy.version!r}",
        )
    return verdict


def _denied(name: str, verdict: Verdict) -> ToolResult:
    reason = verdict.reason or f"Calling '{name}' is not allowed by the agent's policy."
    return _error(
        "denied_by_policy",
        f"{reason} The tool did not run; no one was asked.",
        rule=verdict.rule_id,
    )


# What the audit log calls a policy's verdict on a call it decided (or, in shadow mode,
# would have decided).
_POLICY_DECISIONS = {ALLOW: ALLOWED_BY_POLICY, DENY: DENIED_BY_POLICY}
_SHADOW_DECISIONS = {ALLOW: "would_allow", ASK: "would_ask", DENY: "would_deny"}


def _policy_records(ex: Execution, ev: ModelReplied, calls: list[ToolCall]) -> list[Command]:
    """An audit record for each call a policy allowed or denied or a session grant let
    run (no person was asked, and an auditor must see why), and for each a shadow
    policy would have decided. Each names the call, not a request: such a verdict is
    no decision on one (in shadow mode the request, if any, gets its own record)."""
    records: list[Command] = []

    def record(call: ToolCall, decision: str, **more: Any) -> None:
        records.append(
            RecordDecision(
                AuditRecord(
                    request_id=None,
                    execution_id=ex.id,
                    agent_tag=ex.agent_tag,
                    tool=call.tool,
                    decision=decision,
                    at=ev.at,
                    parameters=call.parameters,
                    tool_use_id=call.tool_use_id,
                    **more,
                )
            )
        )

    for call in calls:
        grant = call.granted
        if grant is not None:
            record(
                call,
                ALLOWED_BY_GRANT,
                by=grant.by,
                by_kind=grant.by_kind,
                reason=f"allowed in this execution by the approval of {grant.request_id}",
            )
        verdict = call.verdict
        if verdict is None:
            continue
        table = _POLICY_DECISIONS if verdict.enforced else _SHADOW_DECISIONS
        decision = table.get(verdict.effect)
        if decision is not None:
            record(
                call,
                decision,
                reason=verdict.reason,
                rule_id=verdict.rule_id,
                policy_version=verdict.version,
            )
    return records


def _ticket_text(value: Any, tool_use_id: str, what: str) -> str:
    if not isinstance(value, str):
        raise Refusal(
            RefusalCode.INVALID_EVENT,
            f"the ticket for tool_use {tool_use_id} has a {what} of type {type(value).__name__}",
        )
    return _visible(value)


def _invalid_parameters(name: str, found: list[str]) -> ToolResult:
    return _error(
        "invalid_parameters",
        f"Invalid parameters for '{name}': {'; '.join(found)}. Fix them and call the tool again.",
        problems=found,
    )


def _schema_error(name: str, err: Exception) -> ToolResult:
    detail = _visible(f"{type(err).__name__}: {err}")
    if len(detail) > 300:
        detail = detail[:300] + "..."
    return _error(
        "invalid_tool_schema",
        f"Tool '{name}' cannot be called: its parameter schema could not be evaluated "
        f"({detail}). The tool did not run.",
    )


def _model_failed(ex: Execution, ev: ModelFailed) -> Step:
    _check_turn(ex, ev.turn)
    error = _outcome_text(ev.error, "model_failed.error")
    changes = Changes(status=FAILED, error=error, awaiting_model=False)
    return changes, [Finish(FAILED, error=error)]


def _move(call: ToolCall, action: str, status: str, **changes: Any) -> ToolCall:
    """`call` moved to `status` by `action`, which CALL_TABLE must allow."""
    if (action, call.status, status) not in CALL_MOVES:
        raise RuntimeError(
            f"bug: tool call {call.tool_use_id} cannot {action} from {call.status} to {status}"
        )
    return attrs.evolve(call, status=status, **changes)


def _answer(call: ToolCall, params: Any, result: ToolResult) -> ToolCall:
    parameters = params if isinstance(params, dict) else {"input": params}
    return _move(call, "answer", DONE, parameters=parameters, result=result)


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
        if call.status in ANSWERED:
            continue
        if call.status == QUEUED:
            tool = _tool(ex, call.tool)
            if call.gated:
                timeout = _deadline(ev.at, tool.approval_timeout_ms)
                if timeout is None:
                    calls[i] = _answer(call, call.parameters, _deadline_error(ev, tool))
                    continue
                request = ApprovalRequest(
                    request_id=call.request_id,
                    execution_id=ex.id,
                    agent_tag=ex.agent_tag,
                    tool=call.tool,
                    tool_use_id=call.tool_use_id,
                    parameters=call.parameters,
                    reason=call.reason,
                    timestamp=ev.at,
                    timeout=timeout,
                    timeout_ms=tool.approval_timeout_ms,
                    policy=call.verdict if call.verdict and call.verdict.applied == ASK else None,
                    digest=call_digest(
                        ex.agent_tag,
                        call.tool,
                        call.parameters,
                        tool.input_schema,
                        ex.agent.policy.version if ex.agent.policy else None,
                    ),
                    requested_by=ex.requested_by,
                    timeout_action=tool.timeout_action,
                )
                needed, groups = _quorum(tool, call.verdict)
                if (needed, groups) != (1, ()):
                    request = attrs.evolve(request, approvals_required=needed, groups=groups)
                requests.append(request)
                calls[i] = _move(call, "gate", AWAITING)
                commands += [
                    PublishApprovalRequest(request),
                    StartTimer(request.request_id, request.timeout),
                    *(StartTimer(request.request_id, t) for t in schedule(request, tool)),
                ]
            else:
                calls[i] = _move(call, "run", EXECUTING)
                commands.append(
                    RunTool(
                        tool_use_id=call.tool_use_id,
                        tool=call.tool,
                        parameters=call.parameters,
                        # The turn too: a model may use a tool_use id again in a later
                        # turn, and two calls must never share a key.
                        idempotency_key=f"{ex.id}:{ex.model_turn}:{call.tool_use_id}",
                    )
                )
        if not parallel:
            break
    changes["requests"] = tuple(requests)
    if all(c.status in ANSWERED for c in calls):
        return _next_turn(ex, calls, changes, commands)
    busy = any(c.status == EXECUTING for c in calls)
    changes["calls"], changes["status"] = tuple(calls), RUNNING if busy else AWAITING_APPROVAL
    return changes, commands


def _deadline(at: datetime, ms: Any) -> datetime | None:
    """When an approval opened at `at` expires; None when no datetime can say it."""
    if isinstance(ms, bool) or not isinstance(ms, int):
        return None
    try:
        return at + timedelta(milliseconds=ms)
    except OverflowError:
        return None


def _deadline_error(ev: Event, tool: ToolSpec) -> ToolResult:
    return _error(
        "invalid_approval_timeout",
        f"Tool '{tool.tag}' cannot be called: its approval deadline cannot be computed "
        f"(approval_timeout_ms={tool.approval_timeout_ms!r} from {iso(ev.at)}). "
        "The tool did not run.",
    )


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


def _settle_call(
    ex: Execution, tool_use_id: str, action: str, status: str, result: ToolResult
) -> list[ToolCall]:
    return [
        _move(c, action, status, result=result) if c.tool_use_id == tool_use_id else c
        for c in ex.calls
    ]


def _tool_done(ex: Execution, ev: ToolFinished | ToolFailed) -> Step:
    call = ex.call(ev.tool_use_id)
    if call is None or call.status != EXECUTING:
        state = "unknown" if call is None else call.status
        raise Refusal(
            RefusalCode.STALE_TOOL_RESULT,
            f"execution {ex.id} is not running tool_use {ev.tool_use_id} (it is {state}); "
            "this result was ignored",
        )
    if isinstance(ev, ToolFailed):
        error = _outcome_text(ev.error, "tool_failed.error")
        result = _error("tool_failed", f"Tool '{call.tool}' failed: {error}")
    else:
        result = _tool_result(ex, call, ev.output)
    calls = _settle_call(ex, ev.tool_use_id, "finish", DONE, result)
    if ex.status == STOPPED:
        # The tool was running when the execution stopped: its outcome is kept, and
        # nothing follows (no model turn, no other call starts).
        return Changes(calls=tuple(calls)), []
    return _advance(ex, ev, calls, Changes(), [])


def _tool_result(ex: Execution, call: ToolCall, output: Any) -> ToolResult:
    try:
        text = _visible(output) if isinstance(output, str) else _dumps(output)
    except Exception as err:  # a handler's result that no JSON spells: tell the model
        return _error(
            "unreadable_tool_result",
            f"Tool '{call.tool}' ran, but its result cannot be sent as JSON "
            f"({type(err).__name__}: {_visible(str(err))}).",
        )
    request = ex.request(call.request_id) if call.request_id else None
    if request is not None and request.modified_params is not None:
        # The model must know it did not get exactly what it asked for.
        note = (
            "A human approved this call with modified parameters: "
            f"{json.dumps(request.modified_params)}. It ran with "
            f"{json.dumps(call.parameters)}."
        )
        return ToolResult([{"type": "text", "text": note}, {"type": "text", "text": text}])
    return ToolResult(text)


def _dumps(output: Any) -> str:
    """A tool's output as JSON text (ASCII: any escape is spelled out); a value of another
    type by its text, as the engine makes it (a datetime becomes its isoformat)."""
    try:
        return json.dumps(output)
    except TypeError:
        return json.dumps(output, default=str)


# -- decisions ---------------------------------------------------------------------


def _check_request_open(ex: Execution, request_id: str) -> ApprovalRequest:
    request = ex.request(request_id)
    if request is None:
        known = ", ".join(r.request_id for r in ex.requests) or "none"
        raise Refusal(
            RefusalCode.UNKNOWN_REQUEST,
            f"execution {ex.id} has no approval request '{request_id}' (its requests: {known})",
        )
    if request.status != PENDING:
        raise Refusal(RefusalCode.ALREADY_DECIDED, standing_decision(request))
    return request


def standing_decision(request: ApprovalRequest) -> str:
    by = f" by {request.decided_by}" if request.decided_by else ""
    when = f" at {iso(request.decided_at)}" if request.decided_at else ""
    what = {TIMED_OUT: "timed out", CANCELLED: "cancelled"}.get(request.status, request.status)
    if request.outcome in (ALLOWED_BY_POLICY, DENIED_BY_POLICY):
        # Decided by the policy of the agent's new definition: no person to name.
        what = request.outcome.replace("_", " ") + " when the agent was defined again"
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
    by_kind: str | None = None,
    on_behalf_of: str | None = None,
    verdict: Verdict | None = None,  # the policy rule that decided it, if one did
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
            by_kind=by_kind,
            on_behalf_of=on_behalf_of,
            rule_id=verdict.rule_id if verdict is not None else None,
            policy_version=verdict.version if verdict is not None else None,
        )
    )


def _on_behalf_of(value: Any, by_kind: str | None, what: str) -> str | None:
    """A delegator's name, where a reviewer decides with grants delegated to them."""
    name: str | None = _sent_text(value, f"{what}.on_behalf_of")
    if name is not None and by_kind != REVIEWER:
        raise Refusal(
            RefusalCode.INVALID_EVENT,
            f"{what}.on_behalf_of names a delegator: only a reviewer acts for one",
        )
    return name


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
            RefusalCode.EXPIRED,
            f"approval request {request.request_id} expired at {iso(request.timeout)}; "
            "it is auto-rejected as timed out and can no longer be decided",
        )


def _modified_params(ex: Execution, request: ApprovalRequest, modified: Any) -> dict[str, Any]:
    """A reviewer's changes as plain JSON, to parameters the tool takes: they may change
    what the model proposed, or set a parameter the tool declares that the model left
    out, never add an argument (even where the tool's schema would let one through)."""
    if not isinstance(modified, dict):
        raise Refusal(
            RefusalCode.INVALID_PARAMETERS,
            f"modified_params must be a dict of parameter -> value, got {type(modified).__name__}",
        )
    try:
        plain: dict[str, Any] = strict(modified, "modified_params")
    except NotJSON as err:
        raise InvalidParameters(request.tool, [str(err)]) from None
    tool = _tool(ex, request.tool)
    declared = declared_parameters(tool.input_schema)
    known = [*declared, *(k for k in request.parameters if k not in declared)]
    added = [k for k in plain if k not in known]
    if added:
        raise InvalidParameters(
            request.tool,
            [
                f"{', '.join(map(repr, added))} {'is' if len(added) == 1 else 'are'} not "
                f"among the tool's parameters ({', '.join(known) or 'none'}); a reviewer may "
                "change what the model proposed, not add new arguments"
            ],
        )
    return plain


def _check_digest(request: ApprovalRequest, digest: Any) -> None:
    """A decision that names the call it was made for applies to that call only."""
    if digest is not None and digest != request.digest:
        raise Refusal(
            RefusalCode.STALE_DECISION,
            f"this decision was made for call {digest!r}, but {request.request_id} asks about"
            f" call {request.digest!r}: look at the request again and decide what it asks",
        )


def _quorum(tool: ToolSpec, verdict: Verdict | None) -> tuple[int, tuple[str, ...]]:
    """(approvals required, groups) for a call of `tool` the policy judged `verdict`:
    an ask rule's quorum where it names one, else the tool's; a call the policy allows
    needs no quorum (it needs no one)."""
    needed, groups = tool.approvals_required, tool.groups
    if verdict is not None and verdict.applied == ALLOW:
        return 1, ()
    asks_more = (
        verdict is not None
        and verdict.applied == ASK
        and (verdict.approvals_required is not None or bool(verdict.groups))
    )
    if (needed, groups) == (1, ()) and not asks_more:
        return 1, ()  # the common case, first
    if verdict is not None and verdict.applied == ASK:
        if verdict.approvals_required is not None:
            needed = verdict.approvals_required
        if verdict.groups:
            groups = verdict.groups
    if (
        isinstance(needed, bool)
        or not isinstance(needed, int)
        or not 1 <= needed <= MAX_APPROVALS
        or not isinstance(groups, tuple)
        or len(groups) > MAX_GROUPS
        or not all(isinstance(g, str) and g for g in groups)
    ):
        raise Refusal(
            RefusalCode.INVALID_EVENT,
            f"a quorum is 1-{MAX_APPROVALS} approvals and up to {MAX_GROUPS} group names;"
            f" got {needed!r} approvals and groups {groups!r}",
        )
    return needed, groups


def _check_voter(
    ex: Execution, request: ApprovalRequest, by: str | None, by_kind: str | None, behalf: str | None
) -> None:
    """Whether `by` may approve `request` at all: never the person who asked for the
    run (nor someone acting with their grants); towards a quorum of more than one, or
    one that names groups, only a known person (a reviewer or the app's by=)."""
    requester = ex.requested_by
    if requester is not None and requester in (by, behalf):
        who = requester if by == requester else f"{by}, acting for {requester},"
        raise Refusal(
            RefusalCode.SELF_APPROVAL,
            f"{requester} asked for execution {ex.id} (requested_by={requester!r}), so {who}"
            " may not"
            f" approve its request {request.request_id}; another person must",
        )
    if request.needs_quorum:
        what = f"approval request {request.request_id}"
        _check_known(what, (request.approvals_required, request.groups), by, by_kind)


def _check_known(
    what: str, quorum: tuple[int, tuple[str, ...]], by: str | None, by_kind: str | None
) -> None:
    """Towards a quorum, only a known person's approval counts."""
    if not _known(by, by_kind):
        needed, groups = quorum
        among = f" from {', '.join(groups)}" if groups else ""
        raise Refusal(
            RefusalCode.NOT_GRANTED,
            f"{what} needs {needed} approval(s){among} by known people: a claimed or"
            " anonymous name (a callback URL, a broker message, the CLI's --by) cannot"
            " count towards it; approve with a reviewer key, the inbox, or signal(by=...)",
        )


def _voter_groups(value: Any) -> tuple[str, ...]:
    if not isinstance(value, tuple) or not all(isinstance(g, str) for g in value):
        raise Refusal(RefusalCode.INVALID_EVENT, "approved.groups must be a tuple of group names")
    return value


def _approved(ex: Execution, ev: Approved) -> Step:
    request = _check_request_open(ex, ev.request_id)
    _check_not_expired(request, ev)
    _check_digest(request, ev.digest)
    by = _sent_text(ev.by, "approved.by")
    by_kind = _by_kind(ev.by_kind, by, "approved")
    behalf = _on_behalf_of(ev.on_behalf_of, by_kind, "approved")
    groups = _voter_groups(ev.groups)
    _check_voter(ex, request, by, by_kind, behalf)
    tool = _tool(ex, request.tool)
    # The call as it stands (an earlier vote may have changed it), and as this one has it.
    current = request.effective_parameters()
    params, changes = current, None
    verdict = None
    if ev.modified_params is not None:
        changes = _modified_params(ex, request, ev.modified_params)
        params = {**current, **changes}
        try:
            check(request.tool, tool.input_schema, params)
        except InvalidParameters:
            raise
        except Exception as err:  # the schema, not the parameters
            raise InvalidParameters(
                request.tool,
                [f"the tool's parameter schema could not be evaluated ({type(err).__name__})"],
            ) from None
        # An edit goes through the same rules as the call: it may not move the call
        # into a region the policy denies (the request stays pending).
        verdict = _verdict(ex, ev.verdict, f"the edit of {request.request_id}")
        if verdict is not None and verdict.applied == DENY:
            raise Refusal(
                RefusalCode.DENIED_BY_POLICY,
                f"the modified parameters of {request.request_id} are denied by rule"
                f" '{verdict.rule_id}': {verdict.reason or 'no reason given'}; the request"
                " is still pending: approve it as it is, with other changes, or reject it",
            )
    modified = request.modified_params
    if changes is not None:
        # Kept as sent, also where it changes nothing: the decision says what was sent.
        modified = {**(modified or {}), **changes}
    edited = params != current
    # An edit is a new call: the policy's verdict on it says how many must approve it.
    quorum = _quorum(tool, verdict) if edited else (request.approvals_required, request.groups)
    votes: tuple[Vote, ...] = ()  # one approval: its decision says it all
    if quorum != (1, ()):
        if edited:  # the edit made it a call that needs a quorum: its editor must count
            _check_known(f"the edited call of {request.request_id}", quorum, by, by_kind)
        if ev.remember is not None:
            raise Refusal(
                RefusalCode.INVALID_REMEMBER,
                f"remember= cannot be given where {quorum[0]} approval(s) are needed: a"
                " session grant would let one person stand for a quorum",
            )
        vote = Vote(by or "", ev.at, by_kind or "", groups, behalf)
        if edited:
            # Everyone approves the same call, so the count starts again with this vote.
            votes = (vote,)
        else:
            _check_one_vote(request, by, behalf)
            votes = (*request.votes, vote)
        if not met(votes, *quorum):
            digest = (
                call_digest(
                    ex.agent_tag,
                    request.tool,
                    params,
                    tool.input_schema,
                    ex.agent.policy.version if ex.agent.policy else None,
                )
                if edited
                else request.digest
            )
            return _voted(ex, ev, request, modified, votes, quorum, digest)
    grants = ex.grants
    if ev.remember is not None:
        grants = (*grants, _remembered(request, ev, by, by_kind))
    # An edit that changes nothing is an approval of the call as proposed. Decided, the
    # request keeps the digest of the call it asked about when the deciding vote came.
    outcome = APPROVED if params == request.parameters else APPROVED_MODIFIED
    requests = _decide_request(
        ex.requests,
        request,
        "approve",
        status=APPROVED,
        decided_by=by,
        decided_by_kind=by_kind,
        decided_at=ev.at,
        modified_params=modified,
        outcome=outcome,
        votes=votes,
        approvals_required=quorum[0],
        groups=quorum[1],
    )
    calls = [
        _move(c, "approve", EXECUTING, parameters=params, approved_by=by)
        if c.tool_use_id == request.tool_use_id
        else c
        for c in ex.calls
    ]
    commands: list[Command] = [
        CancelTimer(request.request_id),
        _decision_record(
            ex,
            request,
            outcome,
            ev.at,
            by=by,
            modified=modified,
            by_kind=by_kind,
            on_behalf_of=behalf,
        ),
        _approved_run(request, params, by),
    ]
    return _advance(ex, ev, calls, Changes(requests=requests, grants=grants), commands)


def _check_one_vote(request: ApprovalRequest, by: str | None, behalf: str | None) -> None:
    """One person, one vote: also through a delegation (acting for someone who voted, or
    voting for oneself after a delegate did)."""
    people = {by, behalf} - {None}
    voted = next((v for v in request.votes if people & {v.by, v.on_behalf_of}), None)
    if voted is not None:
        for_whom = f" on behalf of {voted.on_behalf_of}" if voted.on_behalf_of else ""
        raise Refusal(
            RefusalCode.ALREADY_VOTED,
            f"{voted.by}{for_whom} already approved {request.request_id}; it needs"
            f" {_needed_text(request)} from someone else",
        )


def _needed_text(request: ApprovalRequest) -> str:
    count, groups = request.still_needed()
    text = f"{count} more approval{'s' if count != 1 else ''}"
    return text + (f" (from {', '.join(groups)})" if groups else "")


def _voted(
    ex: Execution,
    ev: Approved,
    request: ApprovalRequest,
    modified: dict[str, Any] | None,
    votes: tuple[Vote, ...],
    quorum: tuple[int, tuple[str, ...]],
    digest: str | None,
) -> Step:
    """A vote towards a quorum not met yet: recorded (audited as a vote), the request
    stays pending, about the call as this vote left it, and its inbox copy shows the
    votes so far."""
    requests = _decide_request(
        ex.requests,
        request,
        "vote",
        modified_params=modified,
        votes=votes,
        approvals_required=quorum[0],
        groups=quorum[1],
        digest=digest,
    )
    counted = next(r for r in requests if r.request_id == request.request_id)
    vote = votes[-1]
    record = _decision_record(
        ex,
        counted,
        VOTE,
        ev.at,
        by=vote.by,
        modified=modified if len(votes) == 1 else None,
        by_kind=vote.by_kind,
        on_behalf_of=vote.on_behalf_of,
        reason=f"{len(votes)} of {quorum[0]}; {_needed_text(counted)}",
    )
    return Changes(requests=requests), [record, ReviseApprovalRequest(counted)]


def _approved_run(request: ApprovalRequest, params: dict[str, Any], by: str | None) -> RunTool:
    """The run an approved request starts: keyed by the request, so any retry of it is
    known for the same run."""
    return RunTool(
        tool_use_id=request.tool_use_id,
        tool=request.tool,
        parameters=params,
        idempotency_key=request.request_id,
        request_id=request.request_id,
        approved_by=by,
    )


def _remembered(
    request: ApprovalRequest, ev: Approved, by: str | None, by_kind: str | None
) -> SessionGrant:
    """The session grant an approval asks for, checked: for the request's own tool, by
    someone known (a reviewer or the embedding app, never a claimed name)."""
    grant = ev.remember
    assert grant is not None
    if not isinstance(grant, SessionGrant) or grant.tool != request.tool:
        raise Refusal(
            RefusalCode.INVALID_EVENT, f"remember= must grant '{request.tool}', the request's tool"
        )
    if not _known(by, by_kind):
        raise Refusal(
            RefusalCode.NOT_GRANTED,
            "remember= needs a known decider (a reviewer's key or the app's by=): a claimed"
            " or anonymous approval cannot allow later calls",
        )
    if grant.when is not None and not isinstance(grant.when, str):
        raise Refusal(RefusalCode.INVALID_EVENT, "remember's bound must be a CEL condition")
    return SessionGrant(grant.tool, request.request_id, ev.at, by, by_kind, grant.when)


def _rejected(ex: Execution, ev: Rejected) -> Step:
    request = _check_request_open(ex, ev.request_id)
    _check_not_expired(request, ev)
    _check_digest(request, ev.digest)
    by = _sent_text(ev.by, "rejected.by")
    by_kind = _by_kind(ev.by_kind, by, "rejected")
    behalf = _on_behalf_of(ev.on_behalf_of, by_kind, "rejected")
    reason = _sent_text(ev.reason, "rejected.reason")
    if request.needs_quorum and not _known(by, by_kind):
        # Any one person's rejection rejects a quorum's request at once: so it must be a
        # person Clearance knows, or a forged callback could veto what others approve.
        raise Refusal(
            RefusalCode.NOT_GRANTED,
            f"approval request {request.request_id} needs a quorum; only a reviewer or the"
            " app's by= may reject it, not a claimed or anonymous name",
        )
    requests = _decide_request(
        ex.requests,
        request,
        "reject",
        status=REJECTED,
        decided_by=by,
        decided_by_kind=by_kind,
        decided_at=ev.at,
        rejection_reason=reason,
        outcome=REJECTED,
    )
    because = f": {reason.rstrip('.')}" if reason else ""
    result = _error(
        "approval_rejected",
        f"A human rejected the call to '{request.tool}'{because}. The tool did not run.",
        reason=reason,
        tool=request.tool,
        parameters=request.parameters,
    )
    commands: list[Command] = [
        CancelTimer(request.request_id),
        _decision_record(
            ex,
            request,
            REJECTED,
            ev.at,
            by=by,
            reason=reason,
            by_kind=by_kind,
            on_behalf_of=behalf,
        ),
    ]
    calls = _settle_call(ex, request.tool_use_id, "reject", REJECTED, result)
    return _advance(ex, ev, calls, Changes(requests=requests), commands)


def duration(ms: int) -> str:
    """300000 -> '5 minutes', as the spec's timeout message spells it."""
    for unit, size in (("hour", 3_600_000), ("minute", 60_000), ("second", 1000)):
        if ms >= size and ms % size == 0:
            n = ms // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{ms} milliseconds"


def _open_ms(request: ApprovalRequest) -> int:
    """How long a request was open by its deadline: its timeout, and any extension."""
    return (request.timeout - request.timestamp) // timedelta(milliseconds=1)


def _timer_fired(ex: Execution, ev: TimerFired) -> Step:
    request = _check_request_open(ex, ev.request_id)
    if ev.at < request.timeout and (found := due(request, ex.agent.tool(request.tool), ev.at)):
        return _remind_or_escalate(ex, ev, request, found.reminder, found.stages)
    if ev.at < request.timeout:
        raise Refusal(
            RefusalCode.NOT_DUE,
            f"approval request {request.request_id} is not due until "
            f"{iso(request.timeout)} (timer fired at {iso(ev.at)})",
        )
    if request.timeout_action not in TIMEOUT_ACTIONS:
        raise Refusal(
            RefusalCode.INVALID_EVENT,
            f"request {request.request_id} has timeout_action {request.timeout_action!r};"
            f" known: {', '.join(TIMEOUT_ACTIONS)}",
        )
    if request.timeout_action == APPROVE and not request.needs_quorum:
        return _approved_by_timeout(ex, ev, request)
    requests = _decide_request(
        ex.requests, request, "time_out", status=TIMED_OUT, decided_at=ev.at, outcome=TIMED_OUT
    )
    message = f"Approval request timed out after {duration(_open_ms(request))}"
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
    calls = _settle_call(ex, request.tool_use_id, "time_out", TIMED_OUT, result)
    return _advance(ex, ev, calls, Changes(requests=requests), commands)


def _remind_or_escalate(
    ex: Execution, ev: TimerFired, request: ApprovalRequest, remind: bool, stages: tuple[int, ...]
) -> Step:
    """Before the deadline: the reminder goes out, and escalation stages whose time has
    come deliver the request again on their channels and open it to their reviewers.
    Each fires once (the request remembers), never after a decision."""
    tool = _tool(ex, request.tool)
    before = set(schedule(request, tool))
    requests = _decide_request(
        ex.requests,
        request,
        "escalate",
        reminded=request.reminded or remind,
        stages_fired=max(stages, default=request.stages_fired),
    )
    fired = next(r for r in requests if r.request_id == request.request_id)
    commands: list[Command] = [
        CancelTimer(request.request_id, t) for t in sorted(before - set(schedule(fired, tool)))
    ]
    if remind:
        commands.append(DeliverAgain(fired, REMINDER))
    commands += [DeliverAgain(fired, stage_purpose(n)) for n in stages]
    commands.append(ReviseApprovalRequest(fired))
    return Changes(requests=requests), commands


def _approved_by_timeout(ex: Execution, ev: TimerFired, request: ApprovalRequest) -> Step:
    """Nobody answered, and the definition says an unanswered call runs: approved by
    the clock, never recorded as a person's approval (approval by timeout never
    completes a quorum of more than one: such a request times out)."""
    params = request.effective_parameters()
    requests = _decide_request(
        ex.requests,
        request,
        "approve_by_timeout",
        status=APPROVED,
        decided_at=ev.at,
        outcome=APPROVED_BY_TIMEOUT,
    )
    calls = [
        _move(c, "approve", EXECUTING, parameters=params)
        if c.tool_use_id == request.tool_use_id
        else c
        for c in ex.calls
    ]
    why = (
        f"nobody decided within {duration(_open_ms(request))}, and '{request.tool}' is"
        " defined with timeout_action='approve'"
    )
    commands: list[Command] = [
        CancelTimer(request.request_id),
        _decision_record(
            ex, request, APPROVED_BY_TIMEOUT, ev.at, modified=request.modified_params, reason=why
        ),
        _approved_run(request, params, None),
    ]
    return _advance(ex, ev, calls, Changes(requests=requests), commands)


def _extended(ex: Execution, ev: Extended) -> Step:
    """A reviewer gives a pending request more time: up to its tool's longest deadline,
    counted from when the request opened; audited, and its timer moves with it."""
    request = _check_request_open(ex, ev.request_id)
    if ev.at >= request.timeout:
        raise Refusal(
            RefusalCode.EXPIRED,
            f"approval request {request.request_id} expired at {iso(request.timeout)}; a"
            " deadline that has passed cannot be extended",
        )
    by = _sent_text(ev.by, "extended.by")
    by_kind = _by_kind(ev.by_kind, by, "extended")
    behalf = _on_behalf_of(ev.on_behalf_of, by_kind, "extended")
    if not _known(by, by_kind):
        raise Refusal(
            RefusalCode.NOT_GRANTED,
            f"the deadline of {request.request_id} is extended by a known person (a reviewer"
            " with the 'extend' grant, or the app's by=), never by a claimed or anonymous name",
        )
    until = ev.until
    if not isinstance(until, datetime) or until.tzinfo is None:
        raise Refusal(
            RefusalCode.INVALID_DEADLINE,
            f"the new deadline of {request.request_id} must be an aware datetime, got {until!r}",
        )
    tool = _tool(ex, request.tool)
    longest_ms = tool.max_timeout_ms or request.timeout_ms
    latest = latest_deadline(request, tool)
    if latest is None or until > latest:
        raise Refusal(
            RefusalCode.EXTENSION_TOO_LONG,
            f"'{request.tool}' requests may stay open {duration(longest_ms)} at most"
            f" (until {iso(latest) if latest else 'never'} for {request.request_id});"
            f" {iso(until)} is later"
            + ("" if tool.max_timeout_ms else ": define the tool with max_approval_timeout"),
        )
    if until <= request.timeout:
        raise Refusal(
            RefusalCode.INVALID_DEADLINE,
            f"{iso(until)} is not later than {request.request_id}'s deadline"
            f" {iso(request.timeout)}; an extension moves it later",
        )
    requests = _decide_request(ex.requests, request, "extend", timeout=until)
    moved = attrs.evolve(request, timeout=until)
    # The reminder moves with the deadline; a stage the old deadline cut off may come.
    old, new = set(schedule(request, tool)), set(schedule(moved, tool))
    record = _decision_record(
        ex,
        request,
        EXTENDED,
        ev.at,
        by=by,
        by_kind=by_kind,
        on_behalf_of=behalf,
        reason=f"deadline moved from {iso(request.timeout)} to {iso(until)}",
    )
    return Changes(requests=requests), [
        CancelTimer(request.request_id, request.timeout),
        *(CancelTimer(request.request_id, t) for t in sorted(old - new)),
        StartTimer(request.request_id, until),
        *(StartTimer(request.request_id, t) for t in sorted(new - old)),
        record,
        ReviseApprovalRequest(moved),
    ]


def _stop(ex: Execution, ev: StopRequested) -> Step:
    by = _sent_text(ev.by, "stop_requested.by")
    by_kind = _by_kind(ev.by_kind, by, "stop_requested")
    reason = _sent_text(ev.reason, "stop_requested.reason")
    commands: list[Command] = []
    requests = ex.requests
    for request in ex.pending_approvals:
        requests = _decide_request(
            requests,
            request,
            "cancel",
            status=CANCELLED,
            decided_by=by,
            decided_by_kind=by_kind,
            decided_at=ev.at,
            rejection_reason=reason,
            outcome=CANCELLED,
        )
        commands += [
            CancelTimer(request.request_id),
            _decision_record(
                ex,
                request,
                CANCELLED,
                ev.at,
                by=by,
                reason=reason or "execution stopped",
                by_kind=by_kind,
            ),
        ]
    # Calls not yet running never will; one that is running goes on, and its outcome is
    # recorded when it comes (tool_finished / tool_failed: stopped -> stopped).
    calls = tuple(
        _move(c, "cancel", CANCELLED) if c.status in (QUEUED, AWAITING) else c for c in ex.calls
    )
    changes = Changes(
        requests=requests,
        calls=calls,
        status=STOPPED,
        awaiting_model=False,
        error=reason if reason else ex.error,
    )
    return changes, [*commands, Finish(STOPPED, error=reason)]


# -- a redefinition ---------------------------------------------------------------------


def _redefined(ex: Execution, ev: Redefined) -> Step:
    """Judge the turn's open calls again under the agent as now defined: a pending
    request is kept (the same outcome: a person decides), decided by the new policy
    (allowed or denied, audited as such), or invalidated when its tool is gone or its
    parameters no longer fit (the model is told why); a call not yet opened is gated,
    run or denied by the new definition when its turn comes."""
    agent = ev.agent
    if not isinstance(agent, AgentSpec) or agent.tag != ex.agent_tag:
        raise Refusal(
            RefusalCode.INVALID_EVENT,
            f"a redefinition of agent '{ex.agent_tag}' must carry that agent's spec",
        )
    if not ex.pending_approvals:
        raise Refusal(
            RefusalCode.INVALID_EVENT,
            f"execution {ex.id} has no pending request to judge again",
        )
    new = attrs.evolve(ex, agent=agent)
    verdicts: dict[str, Any] = {}
    for item in ev.verdicts:
        if not isinstance(item, Reassessment) or not isinstance(item.tool_use_id, str):
            raise Refusal(RefusalCode.INVALID_EVENT, "a redefinition's verdicts are Reassessments")
        verdicts[item.tool_use_id] = item.verdict
    requests = ex.requests
    calls: list[ToolCall] = []
    commands: list[Command] = []
    for call in ex.calls:
        if call.status == QUEUED:
            call = _rejudge_queued(new, call, verdicts)
        elif call.status == AWAITING:
            request = ex.request(call.request_id)
            assert request is not None and request.status == PENDING
            call, decided, more = _rejudge_pending(
                new, ev, call, request, verdicts, ex.agent.tool(request.tool)
            )
            requests = tuple(decided if r.request_id == request.request_id else r for r in requests)
            commands += more
        calls.append(call)
    return _advance(new, ev, calls, Changes(agent=agent, requests=requests), commands)


def _unfit(agent: AgentSpec, tool_tag: str, params: dict[str, Any]) -> str | None:
    """Why a call proposed earlier cannot be made of the agent as now defined, if so."""
    tool = agent.tool(tool_tag)
    if tool is None:
        return f"'{tool_tag}' is no longer one of its tools ({agent.tool_names()})"
    try:
        found = problems(tool.input_schema, params)
    except Exception as err:  # the schema, not the parameters
        return (
            f"the new parameter schema of '{tool_tag}' cannot be evaluated ({type(err).__name__})"
        )
    if found:
        return f"the parameters no longer fit '{tool_tag}': {'; '.join(found)}"
    return None


def _new_effect(agent: AgentSpec, call: ToolCall, verdict: Verdict | None) -> str:
    """ask, allow or deny: what the new definition does with the call."""
    effect = verdict.applied if verdict is not None else NO_MATCH
    if effect != NO_MATCH:
        return effect
    tool = agent.tool(call.tool)
    assert tool is not None
    return ASK if tool.gated else ALLOW


def _rejudge_queued(new: Execution, call: ToolCall, verdicts: dict[str, Any]) -> ToolCall:
    unfit = _unfit(new.agent, call.tool, call.parameters)
    if unfit is not None:
        return _answer(call, call.parameters, _invalidated(call.tool, unfit))
    verdict = _verdict(new, verdicts.get(call.tool_use_id), f"tool_use {call.tool_use_id}")
    effect = _new_effect(new.agent, call, verdict)
    if effect == DENY:
        assert verdict is not None
        denied = attrs.evolve(call, verdict=verdict)
        return _answer(denied, call.parameters, _denied(call.tool, verdict))
    # A session grant given in this execution still covers the call.
    gated = effect == ASK and call.granted is None
    if gated and not call.request_id:
        # Proposed ungated, so it has no request id to open a request with: a person
        # cannot be asked about it now; it does not run.
        return _answer(
            call,
            call.parameters,
            _invalidated(call.tool, f"'{call.tool}' now needs an approval it was not proposed for"),
        )
    return attrs.evolve(call, gated=gated, verdict=verdict)


def _rejudge_pending(
    new: Execution,
    ev: Redefined,
    call: ToolCall,
    request: ApprovalRequest,
    verdicts: dict[str, Any],
    old_tool: ToolSpec | None,
) -> tuple[ToolCall, ApprovalRequest, list[Command]]:
    agent = new.agent
    # The call as it stands: a vote towards a quorum may have changed it.
    params = request.effective_parameters()
    # Decided now, its timers are the ones the old definition set (the new one may not
    # even have its tool): each by its time.
    stopped = [
        CancelTimer(request.request_id, t) for t in (request.timeout, *schedule(request, old_tool))
    ]
    unfit = _unfit(agent, request.tool, params)
    if unfit is not None:
        decided = _decided(
            request, "invalidate", INVALIDATED, ev.at, INVALIDATED, rejection_reason=unfit
        )
        record = _decision_record(new, request, INVALIDATED, ev.at, reason=unfit)
        call = _move(call, "invalidate", INVALIDATED, result=_invalidated(request.tool, unfit))
        return call, decided, [*stopped, record]
    what = f"the re-evaluation of {request.request_id}"
    verdict = _verdict(new, verdicts.get(call.tool_use_id), what)
    effect = _new_effect(agent, call, verdict)
    if effect == DENY:
        assert verdict is not None
        decided = _decided(
            request, "reject", REJECTED, ev.at, DENIED_BY_POLICY, rejection_reason=verdict.reason
        )
        record = _policy_decision(new, request, DENIED_BY_POLICY, ev.at, verdict)
        call = _move(call, "reject", REJECTED, verdict=verdict, result=_denied(call.tool, verdict))
        return call, decided, [*stopped, record]
    if effect == ALLOW:
        decided = _decided(request, "approve", APPROVED, ev.at, ALLOWED_BY_POLICY)
        record = _policy_decision(new, request, ALLOWED_BY_POLICY, ev.at, verdict)
        call = _move(call, "approve", EXECUTING, verdict=verdict, parameters=params)
        run = _approved_run(request, params, None)
        return call, decided, [*stopped, record, run]
    # Still a person's to decide, now about the call as the new definition sees it: a
    # decision made for the old digest is stale.
    tool = agent.tool(request.tool)
    assert tool is not None
    digest = call_digest(
        agent.tag,
        request.tool,
        params,
        tool.input_schema,
        agent.policy.version if agent.policy else None,
    )
    needed, groups = _quorum(tool, verdict)
    kept = attrs.evolve(
        request,
        policy=verdict if verdict is not None and verdict.applied == ASK else None,
        digest=digest,
        approvals_required=needed,
        groups=groups,
        # Votes were for the call under the old definition: they count no more.
        votes=request.votes if digest == request.digest else (),
        timeout_action=tool.timeout_action,
    )
    if kept.votes and met(kept.votes, needed, groups):
        # The new definition asks for fewer people than have approved already.
        last = kept.votes[-1]
        decided = _decided(
            kept,
            "approve",
            APPROVED,
            ev.at,
            APPROVED if params == request.parameters else APPROVED_MODIFIED,
            decided_by=last.by,
            decided_by_kind=last.by_kind,
        )
        record = _decision_record(
            new,
            kept,
            decided.outcome or APPROVED,
            ev.at,
            by=last.by,
            modified=kept.modified_params,
            by_kind=last.by_kind,
            on_behalf_of=last.on_behalf_of,
            reason=f"the agent was defined again and {len(kept.votes)} approval(s) now suffice",
        )
        call = _move(
            call, "approve", EXECUTING, verdict=verdict, parameters=params, approved_by=last.by
        )
        run = _approved_run(kept, params, last.by)
        return call, decided, [*stopped, record, run]
    revised: list[Command] = [ReviseApprovalRequest(kept)] if kept != request else []
    if kept.digest != request.digest and kept.digest:
        # A new call to decide: sent again (callback URLs of the old one are stale now),
        # as its own message.
        revised.append(DeliverAgain(kept, f"revised:{kept.digest.removeprefix('sha256:')[:8]}"))
    # Its reminder and stages are the new definition's from now on.
    old = set(schedule(request, old_tool))
    later = set(schedule(kept, tool))
    revised += [CancelTimer(request.request_id, t) for t in sorted(old - later)]
    revised += [StartTimer(request.request_id, t) for t in sorted(later - old)]
    return attrs.evolve(call, verdict=verdict), kept, revised


def _decided(
    request: ApprovalRequest, action: str, status: str, at: datetime, outcome: str, **more: Any
) -> ApprovalRequest:
    (decided,) = _decide_request(
        (request,), request, action, status=status, decided_at=at, outcome=outcome, **more
    )
    return decided


def _policy_decision(
    ex: Execution, request: ApprovalRequest, decision: str, at: datetime, verdict: Verdict | None
) -> RecordDecision:
    """The audit record of a request the new definition decided: by its rule, if one."""
    why = "the agent was defined again and "
    if verdict is not None and verdict.rule_id is not None:
        why += f"rule '{verdict.rule_id}' decides this call now"
        if verdict.reason:
            why += f": {verdict.reason}"
    else:
        why += f"'{request.tool}' no longer needs an approval"
    return _decision_record(ex, request, decision, at, reason=why, verdict=verdict)


def _invalidated(tool: str, why: str) -> ToolResult:
    return _error(
        "approval_invalidated",
        f"The call to '{tool}' was withdrawn before anyone decided it: the agent was"
        f" redefined and {why}. The tool did not run.",
        tool=tool,
    )


_STEPS: dict[type[Any], Callable[[Execution, Any], Step]] = {
    Started: _started,
    ModelReplied: _model_replied,
    ModelFailed: _model_failed,
    ToolFinished: _tool_done,
    ToolFailed: _tool_done,
    Approved: _approved,
    Rejected: _rejected,
    TimerFired: _timer_fired,
    Extended: _extended,
    StopRequested: _stop,
    Redefined: _redefined,
}
