"""The store contract: one pytest suite that every `Store` adapter must pass.

Written once against the ports (`clearance.ports.store`), it drives real
executions through `decide()` and commits each step's `writes()`, as the engine
does, then reads back through the ports only. A plugin author subclasses it::

    import pytest

    pytest.register_assert_rewrite("clearance.testing.contract")  # in conftest.py

    from clearance.testing.contract import StoreContract

    class TestMyStore(StoreContract):
        def make_store(self, path):
            return MyStore(f"mystore://{path.name}")  # or an awaitable of one

`make_store(path)` opens a store on an empty database of its own for this test
(`path` is the test's fresh `tmp_path`: a file store puts its file there, a
server store derives a fresh database or schema from it). `reopen(path)` opens a
second instance on that same database, as a second worker process would; it
defaults to `make_store(path)`, and returns None for a store that cannot share
(SQLite's `:memory:`), which skips the tests that race two instances.

Needs pytest and pytest-asyncio; import this module explicitly (the
`clearance.testing` package does not load it). Leases are judged only by the
`now` and `until` datetimes passed in, so no test sleeps past a lease.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import attrs
import pytest

from clearance.core import audit_chain
from clearance.core.agent import PARALLEL, SEQUENTIAL, AgentSpec, ToolSpec
from clearance.core.commands import CallModel, RunTool
from clearance.core.decide import decide
from clearance.core.events import (
    Approved,
    Event,
    ModelFailed,
    ModelReplied,
    Redefined,
    Rejected,
    Started,
    StopRequested,
    Ticket,
    TimerFired,
    ToolFinished,
)
from clearance.core.execution import ApprovalRequest, Execution
from clearance.core.reviewers import DECIDE, EXTEND, BadReviewer, Grant, Reviewer, ReviewerKey
from clearance.core.rows import AGENT_SIGNER, INSTANCE_SIGNER, REQUEST, WEBHOOK, Writes, writes
from clearance.ports.store import (
    Claim,
    ClaimRequest,
    Conflict,
    Delivery,
    DeliveryAttempt,
    DueTimer,
    LeaseLost,
    Store,
    UnknownRequest,
    UnknownReviewer,
    Work,
)
from clearance.reviewer_keys import key_id_of, key_matches, new_key

__all__ = ["StoreContract"]

# Event times: fixed, so requests, timers and deliveries are easy to reason about.
T0 = datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
FAR = T0 + timedelta(days=3650)
TIMEOUT_MS = 60_000
LEASE = timedelta(seconds=30)
HOOK = "https://hooks.example/approvals"

_REFUND = ToolSpec(
    tag="refund",
    description="Refund an order",
    input_schema={
        "type": "object",
        "properties": {"order": {"type": "string"}, "amount": {"type": "number"}},
        "required": ["order", "amount"],
    },
    gated=True,
    approval_timeout_ms=TIMEOUT_MS,
)
_LOOKUP = ToolSpec(
    tag="lookup",
    description="Look up an order",
    input_schema={
        "type": "object",
        "properties": {"order": {"type": "string"}},
        "required": ["order"],
    },
    gated=False,
    approval_timeout_ms=TIMEOUT_MS,
)


def agent(
    tag: str = "contract-agent",
    *,
    parallel: bool = False,
    webhook: str | None = None,
    own_secret: bool = False,
) -> AgentSpec:
    return AgentSpec(
        tag=tag,
        name="Contract agent",
        product="clearance-contract",
        model="scripted",
        system_prompt="You refund orders.",
        tools=(_REFUND, _LOOKUP),
        approval_order=PARALLEL if parallel else SEQUENTIAL,
        approval_webhook=webhook,
        own_webhook_secret=own_secret,
    )


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class Run:
    """One execution driven through `decide()`, each step's rows committed to a store."""

    def __init__(self, spec: AgentSpec, execution_id: str) -> None:
        self.id = execution_id
        self.ex = Execution(agent=spec)
        self.log: list[Event] = []

    @property
    def tag(self) -> str:
        return self.ex.agent_tag

    def step(self, event: Event) -> Writes:
        """The rows `event` writes from the current state (nothing is committed)."""
        new, commands = decide(self.ex, event)
        return writes(new, event, commands)

    async def commit(
        self,
        store: Store,
        event: Event,
        *,
        claim: ClaimRequest | None = None,
        done: Claim | None = None,
    ) -> list[Work]:
        step = self.step(event)
        queued = await store.commit(step, expected_seq=self.ex.seq, claim=claim, done=done)
        self.ex = step.execution
        self.log.append(event)
        return queued

    # -- events that fit the current state ----------------------------------------------

    def started(self, seconds: float = 0) -> Started:
        return Started(self.id, f"input of {self.id}", at(seconds))

    def asks(self, seconds: float, *uses: tuple[str, str, str | None]) -> ModelReplied:
        """The model's reply calling tools: (tool_use id, tool, request id if gated)."""
        content = tuple(
            {
                "type": "tool_use",
                "id": use_id,
                "name": tool,
                "input": {"order": use_id, "amount": 5},
            }
            if tool == "refund"
            else {"type": "tool_use", "id": use_id, "name": tool, "input": {"order": use_id}}
            for use_id, tool, _ in uses
        )
        tickets = tuple(Ticket(use_id, rid, "needs approval") for use_id, _, rid in uses if rid)
        text = ({"type": "text", "text": "Let me do that."},)
        return ModelReplied(
            self.ex.model_turn, text + content, "tool_use", at(seconds), tickets=tickets
        )

    def answers(self, seconds: float) -> ModelReplied:
        return ModelReplied(
            self.ex.model_turn, ({"type": "text", "text": "Done."},), "end_turn", at(seconds)
        )

    def request(self, request_id: str) -> ApprovalRequest:
        request = self.ex.request(request_id)
        assert request is not None, request_id
        return request


async def _resolve(made: Store | Awaitable[Store]) -> Store:
    if inspect.isawaitable(made):
        return await made
    return made


@pytest.mark.asyncio
class StoreContract(abc.ABC):
    """Subclass as `Test...` and implement `make_store` (and `reopen` if needed)."""

    # -- what an adapter provides ------------------------------------------------------

    @abc.abstractmethod
    def make_store(self, path: Path) -> Store | Awaitable[Store]:
        """A store on an empty database of its own for this test."""

    def reopen(self, path: Path) -> Store | Awaitable[Store] | None:
        """A second instance on the database `make_store(path)` opened (another worker);
        None if this store cannot share one, which skips the tests that need two."""
        return self.make_store(path)

    # -- opening and closing -------------------------------------------------------------

    @asynccontextmanager
    async def opened(self, path: Path) -> AsyncIterator[Store]:
        store = await _resolve(self.make_store(path))
        try:
            yield store
        finally:
            await store.close()

    @asynccontextmanager
    async def opened_twice(self, path: Path) -> AsyncIterator[tuple[Store, Store]]:
        async with self.opened(path) as first:
            again = self.reopen(path)
            if again is None:
                pytest.skip("this store cannot open a second instance on one database")
            second = await _resolve(again)
            try:
                yield first, second
            finally:
                await second.close()

    @staticmethod
    def now() -> datetime:
        """Lease times are real times; a lease running out is a later `now` passed in."""
        return datetime.now(UTC)

    # -- the execution log ---------------------------------------------------------------

    async def test_commit_appends_the_next_event_and_a_racer_gets_conflict_writing_nothing(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            now = self.now()
            # A racer whose step would open a request, a timer, a delivery and a tool run.
            x = Run(agent("agent-x", parallel=True, webhook=HOOK), "exec-x")
            (call,) = await x.commit(store, x.started(), claim=ClaimRequest("w1", now + LEASE, 1))
            assert (await store.load(x.id)) == x.ex and x.ex.seq == 1
            loser = x.step(x.asks(1, ("tu-1", "refund", "apr-lost"), ("tu-2", "lookup", None)))
            assert loser.requests_opened and loser.timers_started and loser.deliveries
            assert loser.work
            await x.commit(store, ModelFailed(1, "overloaded", at(1)), done=call.claim)
            assert x.ex.seq == 2 and x.ex.status == "failed"
            with pytest.raises(Conflict):
                await store.commit(loser, expected_seq=1)
            assert await store.events(x.id) == x.log
            assert await store.load(x.id) == x.ex
            assert await store.pending() == []
            assert await store.execution_of_request("apr-lost") is None
            assert await store.claim_timers(FAR, FAR, 100) == []
            assert await store.deliveries("apr-lost") == []
            assert await store.claim_work([x.tag], "w2", now, now + LEASE, 100) == []

            # A racer whose step would record a decision and queue the approved tool run.
            y = Run(agent("agent-y"), "exec-y")
            (call,) = await y.commit(store, y.started(), claim=ClaimRequest("w1", now + LEASE, 1))
            await y.commit(store, y.asks(1, ("tu-1", "refund", "apr-y")), done=call.claim)
            loser = y.step(Approved("apr-y", at(2), "ops"))
            assert loser.audit and loser.work and loser.timers_cancelled
            stop = y.step(StopRequested(at(2), "ops", "changed my mind"))
            await y.commit(store, StopRequested(at(2), "ops", "changed my mind"))
            with pytest.raises(Conflict):
                await store.commit(loser, expected_seq=2)
            assert await store.events(y.id) == y.log and len(y.log) == 3
            assert await store.load(y.id) == y.ex
            assert await store.audit(execution_id=y.id) == list(stop.audit)
            assert await store.claim_work([y.tag], "w2", now, now + LEASE, 100) == []
            assert await store.claim_timers(FAR, FAR, 100) == []

    async def test_a_second_start_of_one_execution_id_is_a_conflict(self, tmp_path: Path) -> None:
        async with self.opened(tmp_path) as store:
            first = Run(agent(), "exec-1")
            await first.commit(store, first.started())
            again = Run(agent(), "exec-1")
            with pytest.raises(Conflict):
                await again.commit(store, again.started(5))
            assert await store.events("exec-1") == first.log
            (work,) = await store.claim_work([first.tag], "w", self.now(), self.now() + LEASE, 9)
            assert work.execution_id == "exec-1" and work.command == CallModel(1)

    async def test_of_two_instances_committing_one_version_exactly_one_wins(
        self, tmp_path: Path
    ) -> None:
        async with self.opened_twice(tmp_path) as (a, b):
            run = Run(agent(), "exec-1")
            await run.commit(a, run.started())
            one = run.step(run.answers(1))
            other = run.step(ModelFailed(1, "timeout", at(1)))
            outcomes = await asyncio.gather(
                a.commit(one, expected_seq=1),
                b.commit(other, expected_seq=1),
                return_exceptions=True,
            )
            lost = [o for o in outcomes if isinstance(o, BaseException)]
            assert len(lost) == 1 and isinstance(lost[0], Conflict), outcomes
            winner = other if isinstance(outcomes[0], BaseException) else one
            for store in (a, b):
                assert await store.events(run.id) == [*run.log, winner.event]
                assert await store.load(run.id) == winner.execution

    async def _approval_cycle(self, store: Store, check: Callable[[Run], Awaitable[None]]) -> Run:
        """Start, a reply calling a gated tool, its approval (with a change), the tool's
        result, the answer: each step committed as the engine does, then `check`ed."""
        run = Run(agent(webhook=HOOK), "exec-1")
        now = self.now()
        hold = ClaimRequest("w1", now + LEASE, 1)
        (call,) = await run.commit(store, run.started(), claim=hold)
        await check(run)
        await run.commit(store, run.asks(1, ("tu-1", "refund", "apr-1")), done=call.claim)
        await check(run)
        approval = Approved("apr-1", at(2), "ops", {"amount": 4})
        (tool,) = await run.commit(store, approval, claim=hold)
        await check(run)
        (call,) = await run.commit(
            store, ToolFinished("tu-1", {"refunded": 4}, at(3)), claim=hold, done=tool.claim
        )
        await check(run)
        await run.commit(store, run.answers(4), done=call.claim)
        await check(run)
        assert run.ex.status == "completed" and run.ex.seq == 5
        return run

    async def test_an_agent_first_seen_in_a_conflicting_commit_still_reads_back_later(
        self, tmp_path: Path
    ) -> None:
        """A store that keeps agent specs apart from the log must not take a spec as
        stored when the commit that stored it was rolled back."""
        async with self.opened_twice(tmp_path) as (store, other):
            first = Run(agent("agent-a"), "exec-1")
            await first.commit(store, first.started())
            spec = agent("agent-b")  # not yet in the store
            clash = Run(spec, "exec-1")
            with pytest.raises(Conflict):
                await clash.commit(store, clash.started())
            later = Run(spec, "exec-2")
            await later.commit(store, later.started())
            assert await other.load("exec-2") == later.ex

    async def test_load_after_each_commit_equals_the_state_decide_made(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            assert await store.load("exec-1") is None

            async def loads_back(run: Run) -> None:
                assert await store.load(run.id) == run.ex

            await self._approval_cycle(store, loads_back)

    async def _long_run(self, store: Store, check: Callable[[Run], Awaitable[None]]) -> Run:
        """Fifteen ungated lookups, one a turn, then an answer: 32 events, past any
        snapshot interval a store may keep (SQLite's is 16), each step `check`ed."""
        run = Run(agent(), "exec-long")
        await run.commit(store, run.started())
        for i in range(15):  # the agent's max_iterations is 20
            await run.commit(store, run.asks(2 * i + 1, (f"tu-{i}", "lookup", None)))
            await check(run)
            await run.commit(store, ToolFinished(f"tu-{i}", {"n": i}, at(2 * i + 2)))
            await check(run)
        await run.commit(store, run.answers(100))
        await check(run)
        assert run.ex.seq == 32 and run.ex.status == "completed"
        return run

    async def test_a_long_run_loads_back_at_every_step(self, tmp_path: Path) -> None:
        async with self.opened(tmp_path) as store:

            async def loads_back(run: Run) -> None:
                assert await store.load(run.id) == run.ex

            run = await self._long_run(store, loads_back)
            assert await store.events(run.id) == run.log

    async def test_another_instance_loads_the_same_state(self, tmp_path: Path) -> None:
        async with self.opened_twice(tmp_path) as (store, other):

            async def loads_back(run: Run) -> None:
                # `other` never saw this execution's agent spec or events being written.
                assert await other.load(run.id) == run.ex
                assert await other.events(run.id) == run.log

            await self._approval_cycle(store, loads_back)
            await self._long_run(store, loads_back)

    async def test_an_agents_current_definition_is_the_last_one_defined(
        self, tmp_path: Path
    ) -> None:
        first = agent()
        second = attrs.evolve(first, system_prompt="You refund orders, politely.")
        async with self.opened_twice(tmp_path) as (store, other):
            assert await store.current_agent(first.tag) is None
            await store.define_agent(first)
            assert await store.current_agent(first.tag) == first
            await other.define_agent(second)
            assert await store.current_agent(first.tag) == second
            assert await other.current_agent(first.tag) == second
            await store.define_agent(agent("other"))
            assert await store.current_agent(first.tag) == second
            assert await store.current_agent("unknown") is None

    async def test_a_redefined_execution_loads_back_with_its_new_spec_at_every_step(
        self, tmp_path: Path
    ) -> None:
        """A redefinition changes an execution's spec after its first event: every
        later state (and any snapshot of one) folds with the new spec."""
        async with self.opened_twice(tmp_path) as (store, other):
            run = Run(agent(), "exec-redefined")
            await run.commit(store, run.started())
            await run.commit(store, run.asks(1, ("tu-0", "refund", "apr-0")))
            tools = tuple(attrs.evolve(t, gated=False) for t in run.ex.agent.tools)
            redefined = attrs.evolve(run.ex.agent, tools=tools, system_prompt="Redefined.")
            await run.commit(store, Redefined(redefined, at(2)))
            assert run.request("apr-0").outcome == "allowed_by_policy"
            await run.commit(store, ToolFinished("tu-0", {"ok": True}, at(3)))
            for i in range(1, 16):  # past any snapshot interval
                await run.commit(store, run.asks(2 * i + 2, (f"tu-{i}", "lookup", None)))
                await run.commit(store, ToolFinished(f"tu-{i}", {"n": i}, at(2 * i + 3)))
                assert await other.load(run.id) == run.ex
                assert (await store.load(run.id) or run.ex).agent == redefined
            assert await other.events(run.id) == run.log

    async def test_events_returns_the_log_in_order(self, tmp_path: Path) -> None:
        async with self.opened(tmp_path) as store:
            assert await store.events("exec-1") == []
            one, two = Run(agent(), "exec-1"), Run(agent("other"), "exec-2")
            await one.commit(store, one.started())
            await two.commit(store, two.started())
            await one.commit(store, one.asks(1, ("tu-1", "refund", "apr-1")))
            await two.commit(store, two.answers(1))
            await one.commit(store, Rejected("apr-1", at(2), "ops", "no"))
            assert await store.events("exec-1") == one.log and len(one.log) == 3
            assert await store.events("exec-2") == two.log and len(two.log) == 2

    async def test_execution_ids_page_through_every_execution_of_an_agent(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            assert await store.execution_ids() == []
            for n in range(7):
                run = Run(agent("contract-agent" if n % 3 else "other"), f"exec-{n}")
                await run.commit(store, run.started(n))
                await run.commit(store, run.answers(n + 1))
            every = [f"exec-{n}" for n in range(7)]
            assert await store.execution_ids() == every
            assert await store.execution_ids("other") == ["exec-0", "exec-3", "exec-6"]
            assert await store.execution_ids("nobody") == []
            # Pages of two, each from the last id of the one before.
            pages, after = [], None
            while page := await store.execution_ids("contract-agent", after=after, limit=2):
                pages.append(page)
                after = page[-1]
            assert pages == [["exec-1", "exec-2"], ["exec-4", "exec-5"]]

    # -- the inbox -------------------------------------------------------------------------

    async def _awaiting(
        self, store: Store, spec: AgentSpec, execution_id: str, request_id: str, seconds: float
    ) -> Run:
        """An execution paused on one approval request, opened at `seconds`."""
        run = Run(spec, execution_id)
        await run.commit(store, run.started())
        await run.commit(store, run.asks(seconds, (f"tu-{request_id}", "refund", request_id)))
        assert run.ex.status == "awaiting_approval"
        return run

    async def test_request_ids_are_completed_from_a_prefix_pending_or_decided(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            ids = ["apr-1", "apr-10", "apr-2", "apr%3", "apr_4"]
            runs = [
                await self._awaiting(store, agent(), f"exec-{i}", r, 1) for i, r in enumerate(ids)
            ]
            await runs[0].commit(store, Approved("apr-1", at(2), "ops"))
            assert await store.request_ids_starting("apr-1", 9) == ["apr-1", "apr-10"]
            assert await store.request_ids_starting("apr-", 9) == ["apr-1", "apr-10", "apr-2"]
            # Not LIKE patterns: % and _ are themselves.
            assert await store.request_ids_starting("apr%", 9) == ["apr%3"]
            assert await store.request_ids_starting("apr_", 9) == ["apr_4"]
            assert await store.request_ids_starting("apr", 2) == ["apr%3", "apr-1"]  # code points
            assert await store.request_ids_starting("apr-10x", 9) == []
            assert await store.request_ids_starting("", 9) == sorted(ids)

    async def test_pending_lists_open_requests_oldest_first_and_drops_decided_ones(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            a, b = agent("agent-a"), agent("agent-b")
            # Committed out of age order: `pending` orders by when a request opened.
            one = await self._awaiting(store, a, "exec-1", "apr-1", 2)
            two = await self._awaiting(store, b, "exec-2", "apr-2", 1)
            three = await self._awaiting(store, a, "exec-3", "apr-3", 3)
            r1, r2, r3 = one.request("apr-1"), two.request("apr-2"), three.request("apr-3")
            assert await store.pending() == [r2, r1, r3]
            assert await store.pending("agent-a") == [r1, r3]
            assert await store.pending("agent-b") == [r2]
            assert await store.pending("agent-c") == []
            assert await store.pending(limit=2) == [r2, r1]
            assert await store.pending("agent-a", limit=1) == [r1]
            assert await store.execution_of_request("apr-2") == "exec-2"
            assert await store.execution_of_request("apr-9") is None
            await one.commit(store, Approved("apr-1", at(10), "ops"))
            assert await store.pending() == [r2, r3]
            await two.commit(store, Rejected("apr-2", at(10), "ops", "no"))
            assert await store.pending() == [r3]
            assert await store.pending("agent-b") == []
            # Decided requests still lead to their execution.
            assert await store.execution_of_request("apr-1") == "exec-1"

    async def test_pending_pages_after_a_request_in_the_same_order(self, tmp_path: Path) -> None:
        async with self.opened(tmp_path) as store:
            runs = [
                await self._awaiting(store, agent(), f"exec-{i}", f"apr-{i}", 10 - i)
                for i in range(5)
            ]
            everything = await store.pending()
            assert [r.request_id for r in everything] == [f"apr-{i}" for i in (4, 3, 2, 1, 0)]
            pages, after = [], None
            while True:
                page = await store.pending(limit=2, after=after)
                pages.append([r.request_id for r in page])
                if len(page) < 2:
                    break
                after = page[-1].request_id
            assert pages == [["apr-4", "apr-3"], ["apr-2", "apr-1"], ["apr-0"]]
            # A cursor whose request was decided meanwhile still marks its place.
            await runs[2].commit(store, Approved("apr-2", at(20), "ops"))
            assert [r.request_id for r in await store.pending(after="apr-2")] == ["apr-1", "apr-0"]
            with pytest.raises(UnknownRequest):
                await store.pending(after="apr-nope")

    async def test_audit_records_read_back_by_execution_and_by_request(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            assert await store.audit() == []
            one = await self._awaiting(store, agent("agent-a"), "exec-1", "apr-1", 1)
            two = await self._awaiting(store, agent("agent-b"), "exec-2", "apr-2", 2)
            approve = one.step(Approved("apr-1", at(5), "alice", {"amount": 3}))
            await one.commit(store, Approved("apr-1", at(5), "alice", {"amount": 3}))
            reject = two.step(Rejected("apr-2", at(6), "bob", "too much"))
            await two.commit(store, Rejected("apr-2", at(6), "bob", "too much"))
            (approved,), (rejected,) = approve.audit, reject.audit
            assert (approved.decision, approved.modified_params) == (
                "approved_modified",
                {"amount": 3},
            )
            assert await store.audit() == [approved, rejected]
            assert await store.audit(execution_id="exec-1") == [approved]
            assert await store.audit(execution_id="exec-2") == [rejected]
            assert await store.audit(request_id="apr-2") == [rejected]
            assert await store.audit(execution_id="exec-2", request_id="apr-2") == [rejected]
            assert await store.audit(execution_id="exec-1", request_id="apr-2") == []
            assert await store.audit(request_id="apr-9") == []
            assert await store.audit(execution_id="exec-9") == []

    async def test_audit_records_are_chained_in_order_and_the_head_follows(
        self, tmp_path: Path
    ) -> None:
        """Each record links to the one before it (core.audit_chain), from the genesis
        hash of an empty log; the head is the last link. Two instances deciding at once
        still extend one chain."""
        async with self.opened_twice(tmp_path) as (store, other):
            assert await store.audit_chain() == []
            assert await store.audit_head() == (audit_chain.genesis([]), 0)
            runs = [
                await self._awaiting(store, agent(), f"exec-{n}", f"apr-{n}", n)
                for n in (1, 2, 3, 4)
            ]
            await asyncio.gather(
                *(
                    run.commit(
                        store if n % 2 else other, Rejected(f"apr-{n}", at(9), "bob", f"no {n}")
                    )
                    for n, run in enumerate(runs, 1)
                )
            )
            rows = await other.audit_chain()
            assert sorted(str(r.record.request_id) for r in rows if r.record) == [
                "apr-1",
                "apr-2",
                "apr-3",
                "apr-4",
            ]
            assert [r.id for r in rows] == sorted(r.id for r in rows)
            assert await store.audit_chain(rows[1].id, 1) == [rows[2]]
            head = await store.audit_head()
            assert head == (rows[-1].link.hash if rows[-1].link else None, 4)
            verdict = audit_chain.verify(rows, *head)
            assert verdict.intact, verdict.problem

    # -- retention -------------------------------------------------------------------------

    async def test_forget_deletes_a_finished_execution_and_prunes_its_audit_payloads(
        self, tmp_path: Path
    ) -> None:
        """Everything kept about the execution goes but its audit records, which lose
        their parameters and reason and keep their links; an execution whose log moved
        on since it was loaded, or that still has work, stays as it is."""
        async with self.opened(tmp_path) as store:
            now = self.now()
            done = await self._awaiting(store, agent(webhook=HOOK), "exec-1", "apr-1", 1)
            (call,) = await done.commit(
                store,
                Rejected("apr-1", at(2), "bob", "too much"),
                claim=ClaimRequest("w", now + LEASE, 1),
            )
            await done.commit(store, done.answers(3), done=call.claim)
            assert done.ex.status == "completed" and await store.deliveries("apr-1")
            moved = await self._awaiting(store, agent(), "exec-2", "apr-2", 1)
            loaded = moved.ex
            await moved.commit(store, Approved("apr-2", at(2), "ops"))
            busy = await self._awaiting(store, agent(), "exec-3", "apr-3", 1)
            await busy.commit(store, Rejected("apr-3", at(2), "ops", "no"))  # queues a call
            before = {run.id: await store.audit(execution_id=run.id) for run in (moved, busy)}

            # A dry run says the same and changes nothing.
            dry = await store.forget([done.ex, loaded, busy.ex], at(100), dry_run=True)
            assert (dry.executions, dry.audit_pruned) == (("exec-1",), 1)
            assert await store.load("exec-1") == done.ex
            assert (await store.audit(execution_id="exec-1"))[0].pruned is None
            gone = await store.forget([done.ex, loaded, busy.ex], at(100))
            assert (gone.executions, gone.audit_pruned, gone.audit_kept) == (("exec-1",), 1, 0)
            assert await store.events("exec-1") == []
            assert await store.load("exec-1") is None
            assert await store.execution_of_request("apr-1") is None
            assert await store.deliveries("apr-1") == []
            assert "exec-1" not in await store.execution_ids()
            (record,) = await store.audit(execution_id="exec-1")
            assert record.pruned is not None and record.pruned.at == at(100)
            assert (record.parameters, record.reason, record.by) == ({}, None, "bob")
            for run in (moved, busy):
                assert await store.load(run.id) == run.ex
                assert await store.audit(execution_id=run.id) == before[run.id]
            rows = await store.audit_chain()
            head = await store.audit_head()
            assert head is not None
            verdict = audit_chain.verify(rows, *head)
            assert verdict.intact and verdict.records == 3, verdict.problem
            again = await store.forget([done.ex], at(200))  # nothing left to forget
            assert (again.executions, again.vanished) == ((), 1)
            assert await store.audit(execution_id="exec-1") == [record]

    async def test_finished_executions_are_listed_by_when_they_last_moved(
        self, tmp_path: Path
    ) -> None:
        """What prune looks through, found without folding: each execution whose last
        step left it finished before the cutoff (a stopped one that then records its
        tool's outcome, by that later step), in id order and in pages; never one still
        awaiting approval or running; and no longer one that was forgotten."""
        async with self.opened(tmp_path) as store:
            now = self.now()
            rejected = await self._awaiting(store, agent(), "exec-1", "apr-1", 1)
            (call,) = await rejected.commit(
                store,
                Rejected("apr-1", at(2), "bob", "no"),
                claim=ClaimRequest("w", now + LEASE, 1),
            )
            await rejected.commit(store, rejected.answers(10), done=call.claim)
            waiting = await self._awaiting(store, agent(), "exec-2", "apr-2", 1)
            stopped = await self._awaiting(store, agent(), "exec-3", "apr-3", 1)
            (tool,) = await stopped.commit(
                store, Approved("apr-3", at(2), "ops"), claim=ClaimRequest("w", now + LEASE, 1)
            )
            await stopped.commit(store, StopRequested(at(20), "ops"))
            assert stopped.ex.status == "stopped" and await store.with_work([stopped.tag])
            early = await self._awaiting(store, agent(), "exec-0", "apr-0", 1)
            await early.commit(store, StopRequested(at(5), "ops"))
            assert [r.ex.status for r in (rejected, waiting, early)] == [
                "completed",
                "awaiting_approval",
                "stopped",
            ]

            assert await store.finished_before(at(5)) == []
            assert await store.finished_before(at(10)) == ["exec-0"]
            assert await store.finished_before(at(20.5)) == ["exec-0", "exec-1", "exec-3"]
            # The stopped execution's running tool reports: it last moved at 30.
            await stopped.commit(
                store, ToolFinished("tu-apr-3", {"ok": True}, at(30)), done=tool.claim
            )
            assert await store.finished_before(at(25)) == ["exec-0", "exec-1"]
            assert await store.finished_before(at(31)) == ["exec-0", "exec-1", "exec-3"]
            assert await store.finished_before(at(31), limit=2) == ["exec-0", "exec-1"]
            assert await store.finished_before(at(31), after="exec-1", limit=2) == ["exec-3"]
            assert await store.finished_before(at(31), after="exec-3") == []

            dry = await store.forget([early.ex], at(40), dry_run=True)
            assert dry.executions == ("exec-0",)
            assert await store.finished_before(at(31)) == ["exec-0", "exec-1", "exec-3"]
            await store.forget([early.ex, rejected.ex], at(40))
            assert await store.finished_before(at(31)) == ["exec-3"]

    async def test_two_forgets_of_one_execution_at_once_delete_it_once(
        self, tmp_path: Path
    ) -> None:
        """Two prunes (two instances) forgetting the same executions at the same time:
        each execution is deleted by one of them, and the other finds it gone; each
        audit record's payload is dropped once."""
        async with self.opened_twice(tmp_path) as (store, other):
            runs = [
                await self._awaiting(store, agent(), f"exec-{n}", f"apr-{n}", n) for n in range(6)
            ]
            for run in runs:
                await run.commit(store, StopRequested(at(10), "ops"))
            loaded = [run.ex for run in runs]
            one, two = await asyncio.gather(
                store.forget(loaded, at(100)), other.forget(loaded, at(101))
            )
            assert sorted(one.executions + two.executions) == [run.id for run in runs]
            assert one.vanished + two.vanished == len(runs)
            assert one.audit_pruned + two.audit_pruned == len(runs)  # one cancellation each
            for run in runs:
                assert await other.load(run.id) is None
            rows = await store.audit_chain()
            head = await store.audit_head()
            assert head is not None
            verdict = audit_chain.verify(rows, *head)
            assert verdict.intact and verdict.records == len(runs), verdict.problem

    # -- timers ----------------------------------------------------------------------------

    async def _three_timers(self, store: Store) -> tuple[list[Run], list[DueTimer]]:
        runs = [await self._awaiting(store, agent(), f"exec-{n}", f"apr-{n}", n) for n in (1, 2, 3)]
        timers = [
            DueTimer(run.id, f"apr-{n}", at(n + TIMEOUT_MS / 1000)) for n, run in enumerate(runs, 1)
        ]
        for run, timer in zip(runs, timers, strict=True):
            assert run.request(timer.request_id).timeout == timer.due_at
        return runs, timers

    async def test_due_timers_are_claimed_soonest_first_and_held(self, tmp_path: Path) -> None:
        async with self.opened(tmp_path) as store:
            _, (t1, t2, t3) = await self._three_timers(store)
            hold = FAR - timedelta(days=1)
            assert await store.claim_timers(t1.due_at - timedelta(microseconds=1), hold, 9) == []
            assert await store.claim_timers(t1.due_at, hold, 9) == [t1]
            # A held timer is not handed out again; the next ones are.
            assert await store.claim_timers(t2.due_at + timedelta(seconds=0.5), hold, 9) == [t2]
            assert await store.claim_timers(t3.due_at, hold, 9) == [t3]
            assert await store.claim_timers(t3.due_at + timedelta(hours=1), hold, 9) == []

    async def test_a_claim_takes_at_most_limit_timers_the_soonest(self, tmp_path: Path) -> None:
        async with self.opened(tmp_path) as store:
            _, (t1, t2, t3) = await self._three_timers(store)
            assert await store.claim_timers(FAR, FAR + LEASE, 2) == [t1, t2]
            assert await store.claim_timers(FAR, FAR + LEASE, 2) == [t3]

    async def test_a_timer_whose_sweep_died_falls_due_again_when_its_hold_ends(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            _, (t1, t2, t3) = await self._three_timers(store)
            now = t3.due_at
            until = now + LEASE
            assert await store.claim_timers(now, until, 9) == [t1, t2, t3]
            assert await store.claim_timers(until - timedelta(microseconds=1), FAR, 9) == []
            assert await store.claim_timers(until, until + LEASE, 9) == [t1, t2, t3]

    async def test_two_sweeps_racing_share_the_due_timers(self, tmp_path: Path) -> None:
        async with self.opened_twice(tmp_path) as (a, b):
            runs = [await self._awaiting(a, agent(), f"exec-{n}", f"apr-{n}", n) for n in range(24)]
            due = {run.ex.pending_approvals[0].request_id for run in runs}
            claims = await asyncio.gather(
                *(store.claim_timers(FAR, FAR + LEASE, 1) for _ in range(24) for store in (a, b))
            )
            taken = [timer.request_id for claim in claims for timer in claim]
            assert sorted(taken) == sorted(due)  # each exactly once

    async def test_a_dropped_timer_is_gone_and_a_postponed_one_moves_later(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            _, (t1, t2, t3) = await self._three_timers(store)
            assert await store.claim_timers(t2.due_at, FAR, 9) == [t1, t2]
            await store.drop_timer(t1)
            later = t3.due_at + timedelta(minutes=5)
            await store.postpone_timer(t2, later)
            moved = DueTimer(t2.execution_id, t2.request_id, later)
            assert await store.claim_timers(t3.due_at, t3.due_at, 9) == [t3]
            # Postponing ends the hold: the moved timer is due at its new time.
            assert await store.claim_timers(later, FAR, 9) == [t3, moved]
            # Dropping or postponing a timer that is not there changes nothing.
            await store.drop_timer(t1)
            await store.postpone_timer(t2, FAR)
            assert await store.claim_timers(FAR + LEASE, FAR + LEASE, 9) == [t3, moved]

    async def test_a_decision_cancels_its_requests_timer_held_or_not(self, tmp_path: Path) -> None:
        async with self.opened(tmp_path) as store:
            (r1, r2, r3), (_, t2, t3) = await self._three_timers(store)
            assert await store.claim_timers(t3.due_at, t3.due_at, 9) != []  # held till then
            await r1.commit(store, Approved("apr-1", at(10), "ops"))
            assert await store.claim_timers(FAR, t3.due_at, 9) == [t2, t3]
            await r2.commit(store, Rejected("apr-2", at(10), "ops"))
            assert await store.claim_timers(FAR, FAR, 9) == [t3]
            await r3.commit(store, TimerFired("apr-3", t3.due_at))
            assert await store.claim_timers(FAR + LEASE, FAR + LEASE, 9) == []

    # -- the work queue --------------------------------------------------------------------

    async def test_queued_work_goes_to_exactly_one_of_two_racing_workers(
        self, tmp_path: Path
    ) -> None:
        async with self.opened_twice(tmp_path) as (a, b):
            queued: list[Work] = []
            for n in range(6):
                run = Run(agent(), f"exec-{n}")
                queued += await run.commit(a if n % 2 else b, run.started())
            assert [w.holder for w in queued] == [None] * 6
            now = self.now()
            for _ in range(3):  # each round races for whatever is left
                one, two = await asyncio.gather(
                    a.claim_work(["contract-agent"], "w1", now, now + LEASE, 4),
                    b.claim_work(["contract-agent"], "w2", now, now + LEASE, 4),
                )
                assert {w.holder for w in one} <= {"w1"} and {w.holder for w in two} <= {"w2"}
                assert not {w.id for w in one} & {w.id for w in two}
                queued = [w for w in queued if w.id not in {x.id for x in one + two}]
            assert queued == []
            assert await a.claim_work(["contract-agent"], "w3", now, now + LEASE, 99) == []

    async def test_claimed_work_comes_back_whole(self, tmp_path: Path) -> None:
        async with self.opened(tmp_path) as store:
            run = Run(agent(), "exec-1")
            (queued,) = await run.commit(store, run.started())
            assert queued == Work(queued.id, "exec-1", "contract-agent", CallModel(1), None)
            now = self.now()
            assert await store.claim_work(["another-agent"], "w1", now, now + LEASE, 9) == []
            assert await store.claim_work([], "w1", now, now + LEASE, 9) == []
            (work,) = await store.claim_work(["contract-agent"], "w1", now, now + LEASE, 9)
            assert work == Work(queued.id, "exec-1", "contract-agent", CallModel(1), "w1", None)

    async def test_a_claim_in_commit_holds_the_first_n_units_it_queues(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            now = self.now()
            run = Run(agent(parallel=True), "exec-1")
            uses = [(f"tu-{i}", "lookup", None) for i in range(3)]
            hold = ClaimRequest("w1", now + LEASE, 2)
            (call,) = await run.commit(store, run.started(), claim=hold)
            queued = await run.commit(store, run.asks(1, *uses), claim=hold, done=call.claim)
            assert [w.holder for w in queued] == ["w1", "w1", None]
            assert [w.command.tool_use_id for w in queued if isinstance(w.command, RunTool)] == [
                "tu-0",
                "tu-1",
                "tu-2",
            ]
            assert all(w.execution_id == "exec-1" for w in queued)
            # Only the unit left unclaimed is there for another worker.
            taken = await store.claim_work([run.tag], "w2", now, now + LEASE, 9)
            assert [(w.id, w.holder, w.previous_holder) for w in taken] == [
                (queued[2].id, "w2", None)
            ]
            held = [w.claim for w in queued[:2]]
            assert await store.renew(held, now + LEASE) == held

    async def test_held_work_is_taken_over_only_after_its_lease_runs_out(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            now = self.now()
            run = Run(agent(), "exec-1")
            (work,) = await run.commit(
                store, run.started(), claim=ClaimRequest("w1", now + LEASE, 1)
            )
            assert work.holder == "w1" and work.previous_holder is None
            tags = [run.tag]
            assert await store.claim_work(tags, "w2", now, now + LEASE, 9) == []
            soon = now + LEASE / 2
            assert await store.claim_work(tags, "w2", soon, soon + LEASE, 9) == []
            late = now + LEASE + timedelta(seconds=1)
            (taken,) = await store.claim_work(tags, "w2", late, late + LEASE, 9)
            assert (taken.id, taken.holder, taken.previous_holder) == (work.id, "w2", "w1")
            assert taken.command == work.command
            # The old holder's lease is gone: it can neither renew nor complete.
            assert await store.renew([work.claim], late + 2 * LEASE) == []
            assert await store.complete(work.claim) is False
            assert await store.claim_work(tags, "w3", late, late + LEASE, 9) == []
            assert await store.complete(taken.claim) is True

    async def test_renew_extends_only_leases_still_held(self, tmp_path: Path) -> None:
        async with self.opened(tmp_path) as store:
            now = self.now()
            one, two = Run(agent(), "exec-1"), Run(agent(), "exec-2")
            hold = ClaimRequest("w1", now + LEASE, 1)
            (w1,) = await one.commit(store, one.started(), claim=hold)
            (w2,) = await two.commit(store, two.started(), claim=hold)
            late = now + LEASE + timedelta(seconds=1)
            # Renewed in time, w1 stays held past its first lease; w2 is not renewed.
            assert await store.renew([w1.claim], now + 10 * LEASE) == [w1.claim]
            (taken,) = await store.claim_work([one.tag], "w2", late, late + LEASE, 9)
            assert taken.id == w2.id and taken.previous_holder == "w1"
            renewed = await store.renew(
                [w1.claim, w2.claim, Claim(w1.id, "w9"), Claim(10**9, "w1")], late + LEASE
            )
            assert renewed == [w1.claim]
            assert await store.renew([], late) == []

    async def test_only_the_holder_completes_work(self, tmp_path: Path) -> None:
        async with self.opened(tmp_path) as store:
            now = self.now()
            run = Run(agent(), "exec-1")
            (work,) = await run.commit(
                store, run.started(), claim=ClaimRequest("w1", now + LEASE, 1)
            )
            assert await store.complete(Claim(work.id, "w2")) is False
            assert await store.complete(work.claim) is True
            assert await store.complete(work.claim) is False
            late = now + 10 * LEASE
            assert await store.claim_work([run.tag], "w2", late, late + LEASE, 9) == []

    async def test_a_result_committed_by_a_worker_that_lost_its_lease_writes_nothing(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            now = self.now()
            run = Run(agent(webhook=HOOK), "exec-1")
            (work,) = await run.commit(
                store, run.started(), claim=ClaimRequest("w1", now + LEASE, 1)
            )
            late = now + LEASE + timedelta(seconds=1)
            (taken,) = await store.claim_work([run.tag], "w2", late, late + LEASE, 9)
            reply = run.asks(1, ("tu-1", "refund", "apr-1"))
            stale = run.step(reply)
            with pytest.raises(LeaseLost):
                await store.commit(stale, expected_seq=1, done=work.claim)
            assert await store.events(run.id) == run.log
            assert await store.load(run.id) == run.ex
            assert await store.pending() == []
            assert await store.claim_timers(FAR, FAR, 9) == []
            assert await store.deliveries("apr-1") == []
            # The new holder's result is the one recorded, and completes the work.
            await run.commit(store, reply, done=taken.claim)
            assert await store.load(run.id) == run.ex and run.ex.seq == 2
            assert await store.complete(taken.claim) is False
            later = late + 10 * LEASE
            assert await store.claim_work([run.tag], "w3", later, later + LEASE, 9) == []

    async def test_released_work_can_be_claimed_again_at_once(self, tmp_path: Path) -> None:
        async with self.opened(tmp_path) as store:
            now = self.now()
            run = Run(agent(), "exec-1")
            (work,) = await run.commit(
                store, run.started(), claim=ClaimRequest("w1", now + LEASE, 1)
            )
            await store.release(Claim(work.id, "w2"))  # not w2's to release
            assert await store.claim_work([run.tag], "w2", now, now + LEASE, 9) == []
            await store.release(work.claim)
            (again,) = await store.claim_work([run.tag], "w2", now, now + LEASE, 9)
            assert (again.id, again.holder, again.previous_holder) == (work.id, "w2", None)
            assert await store.complete(work.claim) is False

    async def test_work_ids_are_never_reused(self, tmp_path: Path) -> None:
        async with self.opened(tmp_path) as store:
            now = self.now()
            seen: list[int] = []
            for n in range(4):
                run = Run(agent(), f"exec-{n}")
                (work,) = await run.commit(
                    store, run.started(), claim=ClaimRequest("w1", now + LEASE, 1)
                )
                assert work.id not in seen, (work.id, seen)
                seen.append(work.id)
                # Completing the newest unit empties the queue: its id must stay used.
                assert await store.complete(work.claim) is True

    async def _stopped_with_queued_tool_runs(
        self, store: Store, now: datetime, claim: ClaimRequest | None
    ) -> tuple[Run, list[Work], list[Work]]:
        """An execution whose first tool run is held by w1 and two more are queued, then
        stopped (its stop committed with `claim`): the runs and what the stop returned."""
        run = Run(agent(parallel=True), "exec-1")
        (call,) = await run.commit(store, run.started(), claim=ClaimRequest("w1", now + LEASE, 1))
        uses = [(f"tu-{i}", "lookup", None) for i in range(3)]
        tools = await run.commit(
            store, run.asks(1, *uses), claim=ClaimRequest("w1", now + LEASE, 1), done=call.claim
        )
        assert [w.holder for w in tools] == ["w1", None, None]
        stop = run.step(StopRequested(at(2), "ops"))
        assert stop.drop_queued_work
        cancelled = await run.commit(store, StopRequested(at(2), "ops"), claim=claim)
        return run, tools, cancelled

    async def test_a_stop_marks_queued_tool_runs_cancelled_and_they_stay_claimable(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            now = self.now()
            bystander = Run(agent(), "exec-2")
            (waiting,) = await bystander.commit(store, bystander.started())
            run, tools, cancelled = await self._stopped_with_queued_tool_runs(store, now, None)
            # The commit names the runs it cancelled, so the runtime can close their calls.
            assert sorted((w.id, w.cancelled, w.holder) for w in cancelled) == [
                (tools[1].id, True, None),
                (tools[2].id, True, None),
            ]
            # They stay queued, marked: whoever claims them closes the calls, never runs.
            taken = await store.claim_work([run.tag], "w2", now, now + LEASE, 9)
            assert sorted((w.id, w.cancelled) for w in taken) == sorted(
                [(tools[1].id, True), (tools[2].id, True), (waiting.id, False)]
            )
            # The tool already running goes on, and its outcome is recorded.
            await run.commit(store, ToolFinished("tu-0", "ok", at(3)), done=tools[0].claim)
            assert await store.load(run.id) == run.ex and run.ex.status == "stopped"

    async def test_a_stop_committed_with_a_claim_holds_every_run_it_cancels(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            now = self.now()
            claim = ClaimRequest("w9", now + LEASE, 0)  # a limit of 0: new work only
            run, tools, cancelled = await self._stopped_with_queued_tool_runs(store, now, claim)
            assert sorted((w.id, w.holder) for w in cancelled) == [
                (tools[1].id, "w9"),
                (tools[2].id, "w9"),
            ]
            assert await store.claim_work([run.tag], "w2", now, now + LEASE, 9) == []
            # Its holder died: the taker still knows the run never started.
            late = now + 10 * LEASE
            taken = await store.claim_work([run.tag], "w3", late, late + LEASE, 9)
            assert sorted((w.id, w.cancelled, w.previous_holder) for w in taken) == [
                (tools[0].id, False, "w1"),
                (tools[1].id, True, "w9"),
                (tools[2].id, True, "w9"),
            ]

    async def test_a_finished_execution_drops_its_queued_model_call(self, tmp_path: Path) -> None:
        async with self.opened(tmp_path) as store:
            now = self.now()
            run = Run(agent(), "exec-1")
            await run.commit(store, run.started())  # its first model call, queued
            assert await run.commit(store, StopRequested(at(1), "ops")) == []
            assert await store.claim_work([run.tag], "w1", now, now + LEASE, 9) == []

    async def test_with_work_names_executions_whose_work_waits_or_runs(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            now = self.now()
            mine, theirs = Run(agent(), "exec-a"), Run(agent("other-agent"), "exec-b")
            await mine.commit(store, mine.started())
            await theirs.commit(store, theirs.started())
            assert await store.with_work([mine.tag]) == ["exec-a"]
            assert await store.with_work([mine.tag, theirs.tag]) == ["exec-a", "exec-b"]
            [held] = await store.claim_work([mine.tag], "w1", now, now + LEASE, 1)
            assert await store.with_work([mine.tag]) == ["exec-a"]  # held work counts too
            assert await store.complete(held.claim) is True
            assert await store.with_work([mine.tag]) == []
            assert await store.with_work([]) == []

    async def test_skip_leaves_out_the_work_named(self, tmp_path: Path) -> None:
        async with self.opened(tmp_path) as store:
            now = self.now()
            ids = []
            for n in range(3):
                run = Run(agent(), f"exec-{n}")
                (work,) = await run.commit(store, run.started())
                ids.append(work.id)
            taken = await store.claim_work(["contract-agent"], "w1", now, now + LEASE, 9, ids[:2])
            assert [w.id for w in taken] == [ids[2]]
            taken = await store.claim_work(["contract-agent"], "w1", now, now + LEASE, 1)
            assert len(taken) == 1 and taken[0].id in ids[:2]

    async def test_wait_for_work_wakes_on_another_instances_commit_or_times_out(
        self, tmp_path: Path
    ) -> None:
        async with self.opened_twice(tmp_path) as (a, b):
            assert await b.wait_for_work(0.05) is False
            waiting = asyncio.ensure_future(b.wait_for_work(30))
            await asyncio.sleep(0)
            run = Run(agent(), "exec-1")
            await run.commit(a, run.started())
            assert await asyncio.wait_for(waiting, 30) is True
            assert await b.wait_for_work(0.05) is False

    # -- deliveries ------------------------------------------------------------------------

    @staticmethod
    async def _claim(
        store: Store,
        tags: Sequence[str],
        worker: str,
        now: datetime,
        *,
        instance_signed: bool = True,
        channels: Sequence[str] = (WEBHOOK,),
        exclude_urls: Sequence[str] = (),
    ) -> list[Delivery]:
        return await store.claim_deliveries(
            tags,
            worker,
            now,
            now + LEASE,
            9,
            instance_signed=instance_signed,
            channels=channels,
            exclude_urls=exclude_urls,
        )

    async def _delivering(self, store: Store, spec: AgentSpec) -> tuple[Run, datetime]:
        """An execution whose approval request awaits delivery, and a time it is due."""
        run = await self._awaiting(store, spec, "exec-1", "apr-1", 1)
        return run, run.request("apr-1").timestamp + timedelta(seconds=1)

    async def test_a_delivery_a_commit_writes_is_claimed_once_and_its_attempts_read_back(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            run, now = await self._delivering(store, agent(webhook=HOOK))
            request = run.request("apr-1")
            (fresh,) = await store.deliveries("apr-1")
            assert fresh == Delivery(
                id=fresh.id,
                request_id="apr-1",
                execution_id="exec-1",
                agent_tag=run.tag,
                url=HOOK,
                webhook_id=fresh.webhook_id,
                status="pending",
                attempts=(),
                next_attempt_at=request.timestamp,
                expires_at=request.timeout,
                channel=WEBHOOK,
                signer=INSTANCE_SIGNER,
                purpose=REQUEST,
            )
            assert await store.deliveries("apr-9") == []
            assert await self._claim(store, [], "d1", request.timestamp - LEASE) == []
            (claimed,) = await self._claim(store, [], "d1", now)
            assert claimed == fresh
            assert await self._claim(store, [run.tag], "d2", now) == []
            retry = DeliveryAttempt(now, 503, "unavailable", "retry")
            again = now + timedelta(seconds=10)
            assert await store.record_attempt(claimed.id, "d1", retry, "pending", again) is True
            assert await self._claim(store, [], "d2", now) == []
            (second,) = await self._claim(store, [], "d2", again)
            assert (second.attempts, second.next_attempt_at) == ((retry,), again)
            ok = DeliveryAttempt(again, 200, None, "delivered")
            assert await store.record_attempt(second.id, "d2", ok, "delivered", None) is True
            (done,) = await store.deliveries("apr-1")
            assert (done.status, done.attempts, done.webhook_id, done.next_attempt_at) == (
                "delivered",
                (retry, ok),
                fresh.webhook_id,
                again,
            )
            assert await self._claim(store, [run.tag], "d3", FAR) == []

    async def test_each_delivery_of_a_request_keeps_its_purpose_and_message_id(
        self, tmp_path: Path
    ) -> None:
        # A request goes out more than once on a channel over its life (the request, its
        # reminder, each escalation stage): one row each, with its own message id.
        stage_hook = "https://hooks.example/stage-1"
        async with self.opened(tmp_path) as store:
            run = Run(agent(webhook=HOOK), "exec-1")
            await run.commit(store, run.started())
            step = run.step(run.asks(1, ("tu-apr-1", "refund", "apr-1")))
            (first,) = step.deliveries
            assert (first.message_id, first.purpose) == ("msg_apr-1", REQUEST)
            reminder = attrs.evolve(
                first,
                message_id="msg_apr-1.reminder",
                purpose="reminder",
                not_before=first.not_before + timedelta(seconds=5),
            )
            stage = attrs.evolve(
                first,
                target=stage_hook,
                message_id="msg_apr-1.stage1",
                purpose="stage:1",
                not_before=first.not_before + timedelta(seconds=10),
            )
            step = attrs.evolve(step, deliveries=(first, reminder, stage))
            await store.commit(step, expected_seq=run.ex.seq)
            run.ex = step.execution
            read = await store.deliveries("apr-1")
            assert [(d.url, d.webhook_id, d.purpose, d.next_attempt_at) for d in read] == [
                (HOOK, "msg_apr-1", REQUEST, first.not_before),
                (HOOK, "msg_apr-1.reminder", "reminder", reminder.not_before),
                (stage_hook, "msg_apr-1.stage1", "stage:1", stage.not_before),
            ]
            assert len({d.id for d in read}) == 3
            assert {(d.request_id, d.status, d.channel) for d in read} == {
                ("apr-1", "pending", WEBHOOK)
            }
            # Claimed as they fall due, each with its purpose.
            (due,) = await self._claim(store, [], "d1", first.not_before)
            assert due == read[0]
            later = await self._claim(store, [], "d1", stage.not_before)
            assert later == read[1:]
            assert [(d.webhook_id, d.purpose) for d in later] == [
                ("msg_apr-1.reminder", "reminder"),
                ("msg_apr-1.stage1", "stage:1"),
            ]

    async def test_a_claimed_delivery_is_taken_over_after_its_lease_or_once_released(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            _, now = await self._delivering(store, agent(webhook=HOOK))
            (mine,) = await self._claim(store, [], "d1", now)
            assert await self._claim(store, [], "d2", now + LEASE / 2) == []
            late = now + LEASE + timedelta(seconds=1)
            (theirs,) = await self._claim(store, [], "d2", late)
            assert theirs.id == mine.id
            await store.release_delivery(mine.id, "d1")  # no longer d1's: changes nothing
            assert await self._claim(store, [], "d3", late) == []
            await store.release_delivery(mine.id, "d2")
            (again,) = await self._claim(store, [], "d3", late)
            assert again.id == mine.id

    async def test_a_worker_without_the_instance_secret_never_claims_instance_signed_rows(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            run, now = await self._delivering(store, agent(webhook=HOOK))
            assert (await store.deliveries("apr-1"))[0].signer == INSTANCE_SIGNER
            for tags in ([], [run.tag]):
                assert await self._claim(store, tags, "d1", now, instance_signed=False) == []
            # With the secret, whatever agents the worker hosts.
            (claimed,) = await self._claim(store, ["another-agent"], "d1", now)
            assert claimed.request_id == "apr-1"

    async def test_agent_signed_rows_go_only_to_workers_hosting_the_agent(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            spec = agent("own-secret", webhook=HOOK, own_secret=True)
            _, now = await self._delivering(store, spec)
            assert (await store.deliveries("apr-1"))[0].signer == AGENT_SIGNER
            for signed in (True, False):
                for tags in ([], ["another-agent"]):
                    assert await self._claim(store, tags, "d1", now, instance_signed=signed) == []
            hosts = ["another-agent", "own-secret"]
            (claimed,) = await self._claim(store, hosts, "d1", now, instance_signed=False)
            assert claimed.request_id == "apr-1" and claimed.signer == AGENT_SIGNER

    async def test_only_deliveries_on_the_workers_channels_are_claimed(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            run, now = await self._delivering(store, agent(webhook=HOOK))
            for channels in ((), ("slack",)):
                assert await self._claim(store, [run.tag], "d1", now, channels=channels) == []
            (claimed,) = await self._claim(store, [], "d1", now, channels=("slack", WEBHOOK))
            assert claimed.channel == WEBHOOK

    async def test_exclude_urls_leaves_out_their_deliveries(self, tmp_path: Path) -> None:
        async with self.opened(tmp_path) as store:
            _, now = await self._delivering(store, agent(webhook=HOOK))
            assert await self._claim(store, [], "d1", now, exclude_urls=[HOOK]) == []
            elsewhere = ["https://elsewhere.example/"]
            (claimed,) = await self._claim(store, [], "d1", now, exclude_urls=elsewhere)
            assert claimed.url == HOOK

    async def test_an_attempt_by_a_worker_not_holding_the_delivery_writes_nothing(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            _, now = await self._delivering(store, agent(webhook=HOOK))
            (before,) = await store.deliveries("apr-1")
            attempt = DeliveryAttempt(now, 200, None, "delivered")
            # Never claimed, then claimed by someone else.
            assert await store.record_attempt(before.id, "d2", attempt, "delivered", None) is False
            (claimed,) = await self._claim(store, [], "d1", now)
            assert await store.record_attempt(claimed.id, "d2", attempt, "delivered", FAR) is False
            assert await store.deliveries("apr-1") == [before]
            # d1 still holds it: its attempt is recorded.
            assert await store.record_attempt(claimed.id, "d1", attempt, "delivered", None) is True
            (after,) = await store.deliveries("apr-1")
            assert (after.status, after.attempts) == ("delivered", (attempt,))
            # A delivery taken over after its lease ran out is no longer the first holder's.
            run = await self._awaiting(store, agent(webhook=HOOK), "exec-2", "apr-2", 1)
            (first,) = await self._claim(store, [], "d1", now)
            late = now + LEASE + timedelta(seconds=1)
            (taken,) = await self._claim(store, [], "d2", late)
            assert await store.record_attempt(first.id, "d1", attempt, "delivered", None) is False
            (unchanged,) = await store.deliveries(run.request("apr-2").request_id)
            assert (unchanged.status, unchanged.attempts) == ("pending", ())
            assert await store.record_attempt(taken.id, "d2", attempt, "delivered", None) is True

    async def test_a_disabled_endpoint_reads_back_disabled(self, tmp_path: Path) -> None:
        async with self.opened(tmp_path) as store:
            assert await store.endpoint_disabled(HOOK) is False
            await store.disable_endpoint(HOOK, T0, "410 Gone")
            await store.disable_endpoint(HOOK, at(5), "410 Gone again")  # no error
            assert await store.endpoint_disabled(HOOK) is True
            assert await store.endpoint_disabled("https://elsewhere.example/") is False

    # -- reviewers and their keys ----------------------------------------------------------

    async def test_reviewers_are_saved_replaced_listed_by_name_and_removed(
        self, tmp_path: Path
    ) -> None:
        async with self.opened(tmp_path) as store:
            assert await store.reviewers() == []
            assert await store.reviewer("lee") is None
            lee = Reviewer("lee", (Grant(("refunds",), ("process-refund",)),), ("finance",))
            assert await store.save_reviewer(lee) is True
            assert await store.reviewer("lee") == lee
            # Saved again: its grants and groups replaced, whatever they were.
            again = Reviewer("lee", (Grant(("*",), ("lookup",), {EXTEND}),))
            assert await store.save_reviewer(again) is False
            assert await store.reviewer("lee") == again
            # By name in code point order (capitals first), as the two stores agree.
            others = [Reviewer(n) for n in ("zoe", "Zed", "ana.ops@example.com", "a-b_c", "9")]
            for other in others:
                assert await store.save_reviewer(other) is True
            names = [r.name for r in await store.reviewers()]
            assert names == ["9", "Zed", "a-b_c", "ana.ops@example.com", "lee", "zoe"]
            assert await store.reviewers() == sorted([again, *others], key=lambda r: r.name)
            assert await store.remove_reviewer("lee") is True
            assert await store.remove_reviewer("lee") is False
            assert await store.remove_reviewer("nobody") is False
            assert await store.reviewer("lee") is None
            assert "lee" not in [r.name for r in await store.reviewers()]
            assert await store.reviewer("Zed") == Reviewer("Zed")
            assert await store.reviewer("zed") is None  # names are told apart by case

    async def test_a_reviewers_grants_and_groups_read_back_exactly(self, tmp_path: Path) -> None:
        ops = Reviewer(
            "ops.lead@example.com",
            (
                Grant(("billing-*", "support"), ("*-refund", "process-?", "[ab]*"), {DECIDE}),
                Grant(("*",), ("lookup",), {DECIDE, EXTEND}),
                Grant(("équipe-*",), ("*",), {EXTEND}),
            ),
            ("finance", "on-call"),
        )
        async with self.opened(tmp_path) as store:
            await store.save_reviewer(ops)
            await store.save_reviewer(Reviewer("nobody.granted"))
            (read,) = [r for r in await store.reviewers() if r.name == ops.name]
            for found in (read, await store.reviewer(ops.name)):
                assert found == ops
                assert found is not None and found.grants == ops.grants  # in their order
                assert found.may("billing-eu", "process-x")
                assert not found.may("billing-eu", "process-x", EXTEND)
                assert found.may("anyone", "lookup", EXTEND)
            assert await store.reviewer("nobody.granted") == Reviewer("nobody.granted", (), ())

    async def test_a_key_of_a_reviewer_not_stored_is_refused(self, tmp_path: Path) -> None:
        async with self.opened(tmp_path) as store:
            _, key = new_key("ghost@example.com", T0)
            with pytest.raises(UnknownReviewer, match=r"ghost@example\.com"):
                await store.add_key(key)
            assert await store.reviewer_key(key.key_id) is None
            assert await store.reviewer_keys("ghost@example.com") == []

    async def test_keys_read_back_oldest_first_and_are_revoked_once(self, tmp_path: Path) -> None:
        async with self.opened(tmp_path) as store:
            await store.save_reviewer(Reviewer("lee"))
            await store.save_reviewer(Reviewer("kim"))
            micro = timedelta(microseconds=123_457)
            texts: dict[str, str] = {}
            keys: list[ReviewerKey] = []
            for seconds, expires in ((10, None), (0, at(3600) + micro), (5, None)):
                text, key = new_key("lee", at(seconds) + micro, expires)
                await store.add_key(key)
                texts[key.key_id] = text
                keys.append(key)
            _, kims = new_key("kim", at(1))
            await store.add_key(kims)
            oldest_first = sorted(keys, key=lambda k: k.created_at)
            assert await store.reviewer_keys("lee") == oldest_first
            assert await store.reviewer_keys("kim") == [kims]
            assert await store.reviewer_keys("nobody") == []
            for key in keys:
                found = await store.reviewer_key(key.key_id)
                assert found == key  # times to the microsecond, in UTC
                assert found is not None and found.created_at.utcoffset() == timedelta(0)
                text = texts[key.key_id]
                assert key_id_of(text) == key.key_id and key_matches(text, found)
            assert await store.reviewer_key("nosuchkey000") is None
            # Adding a key again changes nothing; another key under its id is refused.
            await store.add_key(keys[0])
            assert await store.reviewer_keys("lee") == oldest_first
            with pytest.raises(BadReviewer, match=keys[0].key_id):
                await store.add_key(ReviewerKey(keys[0].key_id, "kim", "0" * 64, at(2)))
            assert await store.reviewer_key(keys[0].key_id) == keys[0]

            revoked = keys[1]
            assert await store.revoke_key(revoked.key_id, at(60) + micro) is True
            found = await store.reviewer_key(revoked.key_id)
            assert found is not None and found.revoked_at == at(60) + micro
            assert not found.valid_at(at(61))
            # The first revocation's time stays.
            assert await store.revoke_key(revoked.key_id, at(120)) is False
            assert await store.reviewer_key(revoked.key_id) == found
            assert await store.revoke_key("nosuchkey000", at(60)) is False
            assert [k.revoked_at for k in await store.reviewer_keys("lee")] == [
                at(60) + micro if k.key_id == revoked.key_id else None for k in oldest_first
            ]
            # Saving the reviewer again keeps its keys.
            await store.save_reviewer(Reviewer("lee", (Grant(("*",), ("*",)),)))
            assert len(await store.reviewer_keys("lee")) == 3

    async def test_removing_a_reviewer_removes_its_keys(self, tmp_path: Path) -> None:
        async with self.opened(tmp_path) as store:
            await store.save_reviewer(Reviewer("lee@example.com"))
            await store.save_reviewer(Reviewer("kim"))
            _, first = new_key("lee@example.com", at(0))
            _, second = new_key("lee@example.com", at(1))
            _, kims = new_key("kim", at(2))
            for key in (first, second, kims):
                await store.add_key(key)
            assert await store.revoke_key(second.key_id, at(3))
            assert await store.remove_reviewer("lee@example.com") is True
            assert await store.reviewer_keys("lee@example.com") == []
            assert await store.reviewer_key(first.key_id) is None
            assert await store.reviewer_key(second.key_id) is None
            assert await store.revoke_key(first.key_id, at(4)) is False
            # A new reviewer of that name starts without the old keys.
            await store.save_reviewer(Reviewer("lee@example.com"))
            assert await store.reviewer_keys("lee@example.com") == []
            with pytest.raises(UnknownReviewer):
                await store.add_key(ReviewerKey("k" * 12, "gone", "0" * 64, at(5)))
            assert await store.reviewer_keys("kim") == [kims]
