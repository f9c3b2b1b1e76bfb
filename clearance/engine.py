"""The engine: load, decide, commit, carry out, feed back.

Each event is one store commit holding the new state, the event and its
commands (the transactional outbox). The engine then carries out the outbox
commands it claimed (model calls, tool runs) and feeds their results back as
events. Races between processes are settled by the store's version check:
on `Conflict` the engine reloads and decides again, so a second decision for
one request is refused by `decide()` itself, never by luck of timing.

The engine lives here, not in `core`, because it awaits ports; `core` stays
pure and is all the engine decides with.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Sequence
from typing import Any

import attrs

from clearance.core.commands import CallModel, RunTool
from clearance.core.decide import decide
from clearance.core.errors import ClearanceError, Refusal
from clearance.core.events import (
    Approved,
    Event,
    ModelFailed,
    ModelReplied,
    Rejected,
    Started,
    StopRequested,
    Ticket,
    TimerFired,
    ToolFailed,
    ToolFinished,
)
from clearance.core.execution import EXECUTING, PENDING, Execution
from clearance.definition import HostedAgent
from clearance.ports.clock import Clock
from clearance.ports.ids import IdSource
from clearance.ports.model import ModelCallError, ModelRequest
from clearance.ports.store import Conflict, OutboxEntry, Store
from clearance.ports.tools import ToolContext
from clearance.worker import is_orphaned

log = logging.getLogger("clearance")

SIGNALS = ("approve", "reject", "stop")
_MAX_CONFLICTS = 100


class Engine:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        ids: IdSource,
        worker: str,
        agents: dict[str, HostedAgent],
    ) -> None:
        self.store = store
        self.clock = clock
        self.ids = ids
        self.worker = worker
        self.agents = agents

    # -- entry points ---------------------------------------------------------------

    async def start(self, tag: str, input: str, session_id: str | None) -> Execution:
        agent = self.agents.get(tag)
        if agent is None:
            known = ", ".join(sorted(self.agents)) or "none"
            raise ClearanceError(f"no agent '{tag}' is defined here (defined: {known})")
        if not isinstance(input, str):
            raise ClearanceError(f"input must be a string, got {type(input).__name__}")
        event = Started(self.ids.execution_id(), input, self.clock.now(), session_id)
        new, entries = await self._feed(Execution(agent=agent.spec), event)
        return await self._drive(new, entries)

    async def signal(
        self,
        execution_id: str,
        signal: str,
        *,
        request_id: str | None = None,
        modified_params: dict[str, Any] | None = None,
        reason: str | None = None,
        by: str | None = None,
    ) -> Execution:
        if signal not in SIGNALS:
            raise Refusal(
                "unknown_signal", f"unknown signal {signal!r}; accepted: {', '.join(SIGNALS)}"
            )
        ex = await self._load(execution_id)
        if signal == "stop":
            event: Event = StopRequested(self.clock.now(), by, reason)
        else:
            if not request_id:
                raise Refusal(
                    "missing_request_id", f"signal '{signal}' needs request_id (the 'apr-…' id)"
                )
            ex = await self._expire(ex, request_id)
            if signal == "approve":
                event = Approved(request_id, self.clock.now(), by, modified_params)
            else:
                event = Rejected(request_id, self.clock.now(), by, reason)
        new, entries = await self._feed(ex, event)
        return await self._drive(new, entries)

    async def fire_due_timers(self, limit: int = 1000) -> int:
        """Fire every approval timer due at the clock's now; how many timed a request out."""
        fired = 0
        now = self.clock.now()
        while True:
            due = await self.store.due_timers(now, limit)
            for timer in due:
                ex = await self.store.load(timer.execution_id)
                if ex is None:
                    await self.store.drop_timer(timer)
                    continue
                try:
                    new, entries = await self._feed(ex, TimerFired(timer.request_id, now))
                except Refusal:
                    # Decided or cancelled in the meantime: the decision stands.
                    await self.store.drop_timer(timer)
                    continue
                fired += 1
                await self._drive(new, entries)
            if len(due) < limit:
                return fired

    async def pickup(self, limit: int = 100) -> int:
        """Carry out commands queued by processes that do not host the agent (e.g. the CLI)."""
        entries = await self.store.claim_queued(list(self.agents), self.worker, limit)
        await self._drive_entries(entries)
        return len(entries)

    async def recover(self) -> int:
        """Take over commands claimed by workers that died on this host.

        A model call is re-issued. A tool run is not: the handler may have run
        before the crash, so the model is told the outcome is unknown (at most
        once beats at least once for refunds and deletions).
        """
        taken = 0
        for entry in await self.store.claimed_by_others(list(self.agents), self.worker):
            assert entry.claimed_by is not None
            if not is_orphaned(entry.claimed_by, self.worker):
                continue
            if not await self.store.reclaim(entry.id, entry.claimed_by, self.worker):
                continue
            taken += 1
            ex = await self.store.load(entry.execution_id)
            if ex is None:
                await self.store.discard(entry.id)
                continue
            command = entry.command
            if isinstance(command, RunTool):
                event = ToolFailed(
                    command.tool_use_id,
                    f"the process running this tool stopped before it reported a result; "
                    f"it was not run again, so it may or may not have taken effect "
                    f"(idempotency key {command.idempotency_key})",
                    self.clock.now(),
                )
                try:
                    ex, more = await self._feed(ex, event, done=entry.id)
                except Refusal:
                    continue
                await self._drive(ex, more)
            else:
                await self._drive(ex, [attrs.evolve(entry, claimed_by=self.worker)])
        return taken

    # -- the loop ---------------------------------------------------------------------

    async def _load(self, execution_id: str) -> Execution:
        ex = await self.store.load(execution_id)
        if ex is None:
            raise Refusal("unknown_execution", f"no execution '{execution_id}'")
        return ex

    async def _expire(self, ex: Execution, request_id: str) -> Execution:
        """A decision that arrives after the deadline finds the request timed out, even if
        no timer sweep has run yet: time out first, then let decide() refuse it."""
        request = ex.request(request_id)
        now = self.clock.now()
        if request is None or request.status != PENDING or now < request.timeout:
            return ex
        try:
            new, entries = await self._feed(ex, TimerFired(request_id, now))
        except Refusal:
            return await self._load(ex.id)
        return await self._drive(new, entries)

    def _hosts(self, ex: Execution) -> bool:
        return ex.agent_tag in self.agents

    async def _feed(
        self, ex: Execution, event: Event, done: int | None = None
    ) -> tuple[Execution, list[OutboxEntry]]:
        for _ in range(_MAX_CONFLICTS):
            try:
                new, commands = decide(ex, event)
            except Refusal:
                if done is not None:
                    await self.store.discard(done)
                raise
            claim = self.worker if self._hosts(ex) else None
            try:
                entries = await self.store.commit(
                    new, event, commands, expected_seq=ex.seq, claimed_by=claim, done=done
                )
            except Conflict:
                if isinstance(event, Started):
                    raise
                ex = await self._load(ex.id)
                continue
            return new, entries
        raise ClearanceError(f"execution {ex.id} kept changing under {_MAX_CONFLICTS} attempts")

    async def _drive_entries(self, entries: Sequence[OutboxEntry]) -> None:
        by_execution: dict[str, list[OutboxEntry]] = {}
        for entry in entries:
            by_execution.setdefault(entry.execution_id, []).append(entry)
        for execution_id, mine in by_execution.items():
            ex = await self.store.load(execution_id)
            if ex is None:
                for entry in mine:
                    await self.store.discard(entry.id)
                continue
            await self._drive(ex, mine)

    async def _drive(self, ex: Execution, entries: Sequence[OutboxEntry]) -> Execution:
        """Carry out our claimed commands until the execution rests or waits on others."""
        queue = [e for e in entries if e.claimed_by == self.worker]
        while queue:
            entry = queue.pop(0)
            event = await self._carry_out(ex, entry.command)
            if event is None:
                await self.store.discard(entry.id)
                continue
            try:
                ex, more = await self._feed(ex, event, done=entry.id)
            except Refusal as refusal:
                if not (isinstance(event, ModelReplied) and refusal.code == "invalid_reply"):
                    log.info("execution %s: result dropped: %s", ex.id, refusal)
                    ex = await self._load(ex.id)
                    continue
                # A reply no tool_result can answer must fail the run, not strand it.
                failed = ModelFailed(
                    event.turn, f"the model's reply could not be used: {refusal}", event.at
                )
                ex, more = await self._feed(await self._load(ex.id), failed)
            queue.extend(e for e in more if e.claimed_by == self.worker)
        return ex

    async def _carry_out(self, ex: Execution, command: Any) -> Event | None:
        agent = self.agents.get(ex.agent_tag)
        if agent is None:
            return None
        if isinstance(command, CallModel):
            if not ex.awaiting_model or command.turn != ex.model_turn:
                return None
            return await self._call_model(agent, ex, command.turn)
        if isinstance(command, RunTool):
            call = ex.call(command.tool_use_id)
            if call is None or call.status != EXECUTING:
                return None
            return await self._run_tool(agent, ex, command)
        raise TypeError(f"not an outbox command: {command!r}")

    async def _call_model(self, agent: HostedAgent, ex: Execution, turn: int) -> Event:
        request = ModelRequest(
            model=ex.agent.model,
            system=ex.agent.system_prompt,
            messages=[dict(m) for m in ex.messages],
            tools=[
                {"name": t.tag, "description": t.description, "input_schema": t.input_schema}
                for t in ex.agent.tools
            ],
            execution_id=ex.id,
            turn=turn,
        )
        try:
            reply = await agent.model.reply(request)
        except Exception as err:  # the model port's failure is the execution's, not ours
            log.warning("execution %s: model call failed: %s", ex.id, err)
            cause = str(err) if isinstance(err, ModelCallError) else f"{type(err).__name__}: {err}"
            return ModelFailed(turn, f"model call failed: {cause}", self.clock.now())
        tickets = []
        for block in reply.content:
            if block.get("type") == "tool_use":
                params = block.get("input")
                name = str(block.get("name", ""))
                try:
                    reason = agent.reason(name, params if isinstance(params, dict) else {})
                except Exception as err:
                    reason = (
                        f"Calling '{name}' requires approval ({type(err).__name__} in "
                        "confirmation_message)"
                    )
                tickets.append(Ticket(str(block.get("id", "")), self.ids.request_id(), reason))
        return ModelReplied(
            turn=turn,
            content=tuple(reply.content),
            stop_reason=reply.stop_reason,
            at=self.clock.now(),
            usage=reply.usage,
            tickets=tuple(tickets),
        )

    async def _run_tool(self, agent: HostedAgent, ex: Execution, command: RunTool) -> Event:
        handler = agent.handlers.get(command.tool)
        if handler is None:
            return ToolFailed(
                command.tool_use_id,
                f"no handler for tool '{command.tool}' in this process",
                self.clock.now(),
            )
        ctx = ToolContext(
            execution_id=ex.id,
            agent_tag=ex.agent_tag,
            product=ex.agent.product,
            session_id=ex.session_id,
            tool=command.tool,
            tool_use_id=command.tool_use_id,
            idempotency_key=command.idempotency_key,
            request_id=command.request_id,
            approved_by=command.approved_by,
        )
        params = dict(command.parameters)
        try:
            if inspect.iscoroutinefunction(handler):
                result = await handler(ctx, params)
            else:
                result = await asyncio.to_thread(handler, ctx, params)
                if inspect.isawaitable(result):
                    result = await result
        except Exception as err:
            return ToolFailed(command.tool_use_id, f"{type(err).__name__}: {err}", self.clock.now())
        return ToolFinished(command.tool_use_id, _json_ready(result), self.clock.now())


def _json_ready(value: Any) -> Any:
    """Tool results are stored and sent to the model as JSON; anything else becomes text."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return json.loads(json.dumps(value, default=str))
