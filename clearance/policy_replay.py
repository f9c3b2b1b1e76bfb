"""What a candidate policy would have done: every call recorded in the store, judged
again by the candidate and compared with what happened (`clearance policy replay`).

A recorded call's outcome is read from its events, never recomputed: `allow` (it ran
with nobody asked: an ungated tool, or a policy's allow), `ask` (a person was asked),
`deny` (a policy denied it). The candidate's outcome is its verdict on the same call
(the arguments as the model sent them, defaults filled in), falling back to the tool's
own gating where no rule matches. Calls the agent could not take (an unknown tool,
parameters its schema refuses) are not counted: no policy decides them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import attrs

from clearance.core.agent import AgentSpec
from clearance.core.events import ModelReplied
from clearance.core.policy import ALLOW, ASK, DENY, NO_MATCH, HostRequired, PolicySpec, evaluate
from clearance.core.schema import problems, with_defaults
from clearance.ports.store import Store

OUTCOMES = (ALLOW, ASK, DENY)
PAGE = 500  # executions read per page


@attrs.frozen
class ReplayedCall:
    execution_id: str
    turn: int
    tool_use_id: str
    tool: str
    at: datetime
    before: str  # allow | ask | deny
    after: str  # allow | ask | deny, or host_required (a rule's Python predicate)
    rule_before: str | None
    rule_after: str | None


@attrs.frozen
class ReplayReport:
    executions: int
    calls: int
    before: dict[str, int]
    after: dict[str, int]
    changed: tuple[ReplayedCall, ...]
    seconds: float


def _gated(spec: AgentSpec, tool: str) -> str:
    found = spec.tool(tool)
    return ASK if found is not None and found.gated else ALLOW


@attrs.frozen
class Recorded:
    """A call the store recorded: the reply that proposed it, its tool_use block, what
    happened (allow, ask or deny) and the rule that decided it, if one did."""

    execution_id: str
    spec: AgentSpec
    reply: ModelReplied
    block: dict[str, Any]
    args: dict[str, Any]  # the block's input with the tool's defaults: what would run
    happened: str
    rule: str | None


async def recorded_calls(
    store: Store, *, agent_tag: str | None = None, since: datetime | None = None
) -> AsyncIterator[Recorded]:
    """Each call the store recorded that its agent could take, execution by execution."""
    after: str | None = None
    while ids := await store.execution_ids(agent_tag, after=after, limit=PAGE):
        after = ids[-1]
        for execution_id in ids:
            ex = await store.load(execution_id)
            if ex is None:
                continue
            for event in await store.events(execution_id):
                if not isinstance(event, ModelReplied) or (since and event.at < since):
                    continue
                tickets = {t.tool_use_id: t for t in event.tickets}
                for block in event.content:
                    if not isinstance(block, dict) or block.get("type") != "tool_use":
                        continue
                    tool = ex.agent.tool(str(block.get("name")))
                    params = block.get("input")
                    if tool is None or not isinstance(params, dict):
                        continue
                    try:
                        args = with_defaults(tool.input_schema, params)
                        if problems(tool.input_schema, args):
                            continue
                    except Exception:  # a schema that cannot be evaluated: not the policy's
                        continue
                    ticket = tickets.get(str(block.get("id")))
                    verdict = ticket.verdict if ticket is not None else None
                    applied = verdict.applied if verdict is not None else NO_MATCH
                    happened = applied if applied != NO_MATCH else _gated(ex.agent, tool.tag)
                    rule = verdict.rule_id if verdict is not None and applied != NO_MATCH else None
                    if happened == ASK and ticket is not None and ticket.grant is not None:
                        happened = ALLOW  # a reviewer's session grant let it run unasked
                    yield Recorded(execution_id, ex.agent, event, block, args, happened, rule)


async def replay_policy(
    store: Store,
    candidate: PolicySpec,
    *,
    agent_tag: str | None = None,
    since: datetime | None = None,
) -> ReplayReport:
    """Judge every recorded call (of `agent_tag`'s agent, proposed at or after `since`)
    by `candidate`, and count what changes."""
    started = time.perf_counter()
    before: Counter[str] = Counter()
    after: Counter[str] = Counter()
    changed: list[ReplayedCall] = []
    executions: set[str] = set()
    async for call in recorded_calls(store, agent_tag=agent_tag, since=since):
        spec = call.spec
        tool = spec.tool(str(call.block["name"]))
        assert tool is not None
        try:
            verdict = evaluate(candidate, agent=spec.tag, tool=tool.tag, args=call.args)
            effect = verdict.effect if verdict.effect != NO_MATCH else _gated(spec, tool.tag)
            rule_after = verdict.rule_id
        except HostRequired:
            effect, rule_after = "host_required", None
        executions.add(call.execution_id)
        before[call.happened] += 1
        after[effect] += 1
        if effect != call.happened:
            changed.append(
                ReplayedCall(
                    call.execution_id,
                    call.reply.turn,
                    str(call.block.get("id")),
                    tool.tag,
                    call.reply.at,
                    call.happened,
                    effect,
                    call.rule,
                    rule_after,
                )
            )
    return ReplayReport(
        executions=len(executions),
        calls=sum(before.values()),
        before=dict(before),
        after=dict(after),
        changed=tuple(changed),
        seconds=time.perf_counter() - started,
    )
