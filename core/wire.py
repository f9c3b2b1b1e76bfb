"""One cattrs converter, built once: state, events and commands to JSON-ready data and back.

Events and commands are tagged unions: `{"type": "<TAG>", ...}`, with the
class's stable `TAG`, so renaming a class never breaks a stored log.
Datetimes travel as ISO-8601 UTC strings with microseconds (sortable as text).

States written by decide() version 1 (see `DECIDE_VERSION`) read as version 2
would have made them from the same events: a tool call's "running" is
"executing", a gated call whose result is its rejection or timeout has that
status rather than "done", and a stopped execution's queued and awaiting calls
are cancelled. A snapshot of either version and the events after it then fold
to the state the whole log folds to.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import attrs
import cattrs
from cattrs.gen import make_dict_unstructure_fn, override
from cattrs.strategies import configure_tagged_union

from clearance.core.agent import AgentSpec
from clearance.core.call_digest import call_digest
from clearance.core.commands import AuditRecord, Command
from clearance.core.events import Event
from clearance.core.execution import (
    APPROVED,
    APPROVED_MODIFIED,
    AWAITING,
    CANCELLED,
    DONE,
    EXECUTING,
    PENDING,
    QUEUED,
    REJECTED,
    STOPPED,
    TIMED_OUT,
    ApprovalRequest,
    Execution,
    ToolCall,
    ToolContent,
)
from clearance.core.reviewers import Delegation, Grant, Reviewer


def stamp(at: datetime) -> str:
    """`2026-11-26T05:49:04.230957Z`: fixed width, so text order is time order.

    isoformat, not strftime: a few times faster (every commit stamps several
    times), and it zero-pads years before 1000 where glibc's `%Y` does not.
    """
    if at.tzinfo is not UTC:
        at = at.astimezone(UTC)
    text = at.isoformat()[:-6]  # without "+00:00"; its default form is the fastest
    return (text if at.microsecond else text + ".000000") + "Z"


def parse_stamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def _tag(cls: type) -> str:
    return str(vars(cls)["TAG"])


# decide() version 1 wrote a call that ran as "running"; a rejection or a timeout left it
# "done" with a result that begins like this (the JSON text of decide's error result).
_LEGACY_RUNNING = "running"
_LEGACY_OUTCOMES = (
    ('{"error": "approval_rejected"', REJECTED),
    ('{"error": "approval_timeout"', TIMED_OUT),
)


def _call_status(data: dict[str, Any]) -> str:
    status = data.get("status")
    if status == _LEGACY_RUNNING:
        return EXECUTING
    if status == DONE and data.get("gated"):
        result = data.get("result") or {}
        content = result.get("content")
        if result.get("is_error") and isinstance(content, str):
            for prefix, outcome in _LEGACY_OUTCOMES:
                if content.startswith(prefix):
                    return outcome
    return str(status)


def _cancel_open_calls(ex: Execution) -> Execution:
    """A version 1 stop left queued and awaiting calls as they were; version 2 cancels them."""
    if ex.status != STOPPED or not any(c.status in (QUEUED, AWAITING) for c in ex.calls):
        return ex
    calls = tuple(
        attrs.evolve(c, status=CANCELLED) if c.status in (QUEUED, AWAITING) else c for c in ex.calls
    )
    return attrs.evolve(ex, calls=calls)


def _with_digests(ex: Execution) -> Execution:
    """Requests made before decide() recorded call digests get the digest it would have
    recorded (their policy version was none), so that an old state and its log replayed
    today agree."""
    if all(r.digest for r in ex.requests):
        return ex
    requests = []
    for request in ex.requests:
        tool = ex.agent.tool(request.tool)
        if not request.digest and tool is not None:
            digest = call_digest(
                ex.agent_tag, request.tool, request.parameters, tool.input_schema, None
            )
            request = attrs.evolve(request, digest=digest)
        requests.append(request)
    return attrs.evolve(ex, requests=tuple(requests))


def _with_outcome(request: ApprovalRequest) -> ApprovalRequest:
    """A request decided before decide() recorded outcomes gets the one it would have
    recorded: until then only people, clocks and stops decided requests."""
    if request.outcome is not None or request.status == PENDING:
        return request
    outcome = request.status
    if request.status == APPROVED and request.effective_parameters() != request.parameters:
        outcome = APPROVED_MODIFIED
    return attrs.evolve(request, outcome=outcome)


def _build() -> cattrs.Converter:
    conv = cattrs.Converter()
    conv.register_unstructure_hook(datetime, stamp)
    conv.register_structure_hook(datetime, lambda v, _: parse_stamp(v))
    conv.register_structure_hook(Any, lambda v, _: v)
    conv.register_structure_hook(ToolContent, lambda v, _: v)
    # A store holds each agent spec once and hands the object in: take it as it is.
    build_agent = conv.get_structure_hook(AgentSpec)
    conv.register_structure_hook(
        AgentSpec, lambda v, t: v if isinstance(v, AgentSpec) else build_agent(v, t)
    )
    build_call = conv.get_structure_hook(ToolCall)

    def structure_call(data: Any, cls: type) -> ToolCall:
        status = _call_status(data)
        if status != data.get("status"):
            data = {**data, "status": status}
        call: ToolCall = build_call(data, cls)
        return call

    conv.register_structure_hook(ToolCall, structure_call)
    build_request = conv.get_structure_hook(ApprovalRequest)
    conv.register_structure_hook(ApprovalRequest, lambda v, t: _with_outcome(build_request(v, t)))
    # Built after the ToolCall hook, so that it structures its calls with it.
    build_execution = conv.get_structure_hook(Execution)
    conv.register_structure_hook(
        Execution,
        lambda v, t: _with_digests(_cancel_open_calls(build_execution(v, t))),
    )
    # A record keeps the form it always had unless its payload was pruned.
    conv.register_unstructure_hook(
        AuditRecord,
        make_dict_unstructure_fn(AuditRecord, conv, pruned=override(omit_if_default=True)),
    )
    for union in (Event, Command):
        configure_tagged_union(union, conv, tag_generator=_tag, tag_name="type")
    return conv


converter = _build()


def event_to_data(event: Event) -> dict[str, Any]:
    data: dict[str, Any] = converter.unstructure(event, Event)
    return data


def event_from_data(data: dict[str, Any]) -> Event:
    event: Event = converter.structure(data, Event)  # type: ignore[arg-type]
    return event


def command_to_data(command: Command) -> dict[str, Any]:
    data: dict[str, Any] = converter.unstructure(command, Command)
    return data


def command_from_data(data: dict[str, Any]) -> Command:
    command: Command = converter.structure(data, Command)  # type: ignore[arg-type]
    return command


def execution_to_data(execution: Execution) -> dict[str, Any]:
    data: dict[str, Any] = converter.unstructure(execution)
    return data


def execution_from_data(data: dict[str, Any]) -> Execution:
    return converter.structure(data, Execution)


def request_from_data(data: dict[str, Any]) -> ApprovalRequest:
    return converter.structure(data, ApprovalRequest)


def audit_from_data(data: dict[str, Any]) -> AuditRecord:
    return converter.structure(data, AuditRecord)


def reviewer_to_data(reviewer: Reviewer) -> dict[str, Any]:
    """`{"name", "grants": [{"agents", "tools", "actions"}], "groups", "delegations": [{"to",
    "until", "at"}]}` (actions sorted)."""
    return {
        "name": reviewer.name,
        "grants": [
            {"agents": list(g.agents), "tools": list(g.tools), "actions": sorted(g.actions)}
            for g in reviewer.grants
        ],
        "groups": list(reviewer.groups),
        "delegations": [
            {
                "to": d.to,
                "until": stamp(d.until),
                "at": stamp(d.at) if d.at is not None else None,
            }
            for d in reviewer.delegations
        ],
    }


def reviewer_from_data(data: dict[str, Any]) -> Reviewer:
    return Reviewer(
        data["name"],
        tuple(Grant(g["agents"], g["tools"], g["actions"]) for g in data.get("grants", ())),
        tuple(data.get("groups", ())),
        tuple(
            Delegation(
                d["to"], parse_stamp(d["until"]), parse_stamp(d["at"]) if d.get("at") else None
            )
            for d in data.get("delegations", ())
        ),
    )
