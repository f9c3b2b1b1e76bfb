"""A redeploy: an agent defined again while approvals are pending.

A pending request made under an earlier definition is never decided under the old
rules: the next time it is touched (a decision, its timer, the redefining process's
sweep) it is judged under the agent as now defined and either kept (a person still
decides, about the call as the new definition sees it), decided by the new policy
(recorded as such, never as a person), or invalidated (the model is told why).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from typing import Any

import attrs
import pytest
from conftest import Recorder
from hypothesis import given, settings
from hypothesis import strategies as st
from postgres_server import postgres_url
from test_policy import REFUND_SCHEMA, define, refund, results
from test_postgres_store import url

from clearance import Clearance, HumanInLoop, Policy, Refusal, Rule, Tool, ToolContext
from clearance.adapters.postgres_store import PostgresStore
from clearance.adapters.sqlite_store import SQLiteStore
from clearance.core.execution import Execution
from clearance.core.replay import replay
from clearance.ports.model import ModelReply, ModelRequest
from clearance.testing import FakeClock, ScriptedModel, SequentialIds, text, tool_use

__all__ = ["postgres_url", "url"]  # the fixtures, for pytest


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def app(tmp_path: Any) -> Any:
    # Every event snapshotted: a load then starts from a snapshot, which must name the
    # spec the execution had then, not the one it started with.
    store = SQLiteStore(str(tmp_path / "redeploy.db"), snapshot_every=1)
    async with Clearance(store, clock=FakeClock(), ids=SequentialIds()) as instance:
        yield instance


async def paused(app: Clearance, recorder: Recorder, amount: float = 300) -> Execution:
    """An execution of the refunds agent (no policy: every refund asks) waiting for a
    person to decide a refund of `amount`."""
    define(app, recorder, [[tool_use("process-refund", refund(amount))]])
    ex = await app.run("refunds", input=f"Refund {amount}")
    assert ex.status == "awaiting_approval" and recorder.calls == []
    return ex


def then(*turns: Any) -> list[Any]:
    """A script for the redefined agent's model: turn 1 was the first definition's."""
    return [[tool_use("process-refund", refund(300))], *turns]


async def rested(app: Clearance, ex: Execution) -> Execution:
    """`ex` once the work the redefinition queued has been carried out."""
    await app.engine.drain()
    loaded = await app.store.load(ex.id)
    assert loaded is not None
    return await app.engine.settle(loaded)


async def folds_the_same(app: Clearance, tmp_path: Any, ex: Execution) -> None:
    """Read by a store that never saw it (from snapshots naming their spec), and
    replayed from its first definition, the execution is what the live one is."""
    live = await app.store.load(ex.id)
    assert live is not None
    fresh = SQLiteStore(str(tmp_path / "redeploy.db"))
    try:
        assert await fresh.load(ex.id) == live
        events = await fresh.events(ex.id)
    finally:
        await fresh.close()
    first = events[0]
    assert first.TAG == "started"
    started = await first_spec(app, ex)
    assert replay(started, None, events) == live


async def first_spec(app: Clearance, ex: Execution) -> Any:
    store = app.store
    assert isinstance(store, SQLiteStore)
    (spec_id,) = store._db.execute(
        "SELECT spec_id FROM events WHERE execution_id = ? AND seq = 1", (ex.id,)
    ).fetchone()
    return store._spec(spec_id)


# -- decided by the new policy -------------------------------------------------------------


async def test_a_request_the_new_policy_allows_runs_once_recorded_as_allowed_by_policy(
    app: Clearance, recorder: Recorder, tmp_path: Any
) -> None:
    ex = await paused(app, recorder)
    [request] = ex.pending_approvals
    model = define(
        app,
        recorder,
        then([text("Refunded.")]),
        [Rule.allow("process-refund", when="args.amount <= 500.0", id="raised-limit")],
    )
    # The redefining process sweeps its agent's pending requests: nobody has to touch it.
    await app.engine.sweep_redefined()
    ex = await rested(app, ex)
    assert ex.status == "completed" and ex.output == "Refunded."
    assert [(name, params["amount"]) for name, _, params in recorder.calls] == [
        ("process-refund", 300)
    ]
    decided = ex.request(request.request_id)
    assert decided is not None
    assert (decided.status, decided.outcome, decided.decided_by) == (
        "approved",
        "allowed_by_policy",
        None,
    )
    [record] = await app.audit(execution_id=ex.id)
    assert (record.decision, record.request_id, record.rule_id, record.by) == (
        "allowed_by_policy",
        request.request_id,
        "raised-limit",
        None,
    )
    assert "defined again" in (record.reason or "")
    [result] = results(model)
    assert result["is_error"] is False and json.loads(result["content"])["refunded"] == 300
    # A person's late decision is refused, naming what decided it.
    with pytest.raises(Refusal) as late:
        await app.signal(ex.id, "reject", request_id=request.request_id, by="alice")
    assert late.value.code == "already_decided"
    assert "allowed by policy when the agent was defined again" in str(late.value)
    await folds_the_same(app, tmp_path, ex)


async def test_a_request_the_new_policy_denies_never_runs_and_the_model_is_told(
    app: Clearance, recorder: Recorder, tmp_path: Any
) -> None:
    ex = await paused(app, recorder)
    [request] = ex.pending_approvals
    model = define(
        app,
        recorder,
        then([text("I cannot refund that.")]),
        [Rule.deny("process-refund", when="args.amount > 200.0", id="cap", reason="Over 200.")],
    )
    # A reviewer's approval is what touches it: it is judged first, and refused.
    with pytest.raises(Refusal) as caught:
        await app.signal(ex.id, "approve", request_id=request.request_id, by="alice")
    assert caught.value.code == "already_decided"
    assert "denied by policy" in str(caught.value)
    ex = await rested(app, ex)
    assert recorder.calls == [] and ex.status == "completed"
    decided = ex.request(request.request_id)
    assert decided is not None
    assert (decided.status, decided.outcome, decided.decided_by) == (
        "rejected",
        "denied_by_policy",
        None,
    )
    [result] = results(model)
    content = json.loads(result["content"])
    assert result["is_error"] is True
    assert (content["error"], content["rule"]) == ("denied_by_policy", "cap")
    [record] = await app.audit(execution_id=ex.id)
    assert (record.decision, record.rule_id, record.by) == ("denied_by_policy", "cap", None)
    await folds_the_same(app, tmp_path, ex)


# -- invalidated -----------------------------------------------------------------------------


async def test_a_request_whose_tool_is_gone_is_invalidated_and_the_model_is_told(
    app: Clearance, recorder: Recorder, tmp_path: Any
) -> None:
    ex = await paused(app, recorder)
    [request] = ex.pending_approvals
    model = ScriptedModel(then([text("That tool is gone.")]))
    app.define(tag="refunds", model=model, tools=recorder.tools()[1:])  # get-order only
    await app.engine.sweep_redefined()
    ex = await rested(app, ex)
    assert recorder.calls == [] and ex.status == "completed"
    decided = ex.request(request.request_id)
    assert decided is not None
    assert (decided.status, decided.outcome) == ("invalidated", "invalidated")
    assert "no longer one of its tools" in (decided.rejection_reason or "")
    [result] = results(model)
    content = json.loads(result["content"])
    assert result["is_error"] is True and content["error"] == "approval_invalidated"
    assert "redefined" in content["message"] and "did not run" in content["message"]
    [record] = await app.audit(execution_id=ex.id)
    assert (record.decision, record.by) == ("invalidated", None)
    await folds_the_same(app, tmp_path, ex)


async def test_a_request_whose_parameters_no_longer_fit_is_invalidated(
    app: Clearance, recorder: Recorder
) -> None:
    ex = await paused(app, recorder)
    [request] = ex.pending_approvals
    stricter = {
        **REFUND_SCHEMA,
        "properties": {**REFUND_SCHEMA["properties"], "amount": {"type": "number", "maximum": 100}},
    }
    app.define(
        tag="refunds",
        model=ScriptedModel(then([text("Too much.")])),
        tools=[
            Tool(
                tag="process-refund",
                parameters=stricter,
                handler=recorder.process_refund,
                requires_confirmation=True,
            )
        ],
        human_in_loop=HumanInLoop(enabled=True),
    )
    with pytest.raises(Refusal) as caught:
        await app.signal(ex.id, "approve", request_id=request.request_id, by="alice")
    assert caught.value.code == "already_decided" and "invalidated" in str(caught.value)
    ex = await rested(app, ex)
    decided = ex.request(request.request_id)
    assert decided is not None and decided.status == "invalidated" and recorder.calls == []
    assert "no longer fit" in (decided.rejection_reason or "")


# -- kept ------------------------------------------------------------------------------------


async def test_a_request_still_asked_is_kept_and_a_decision_for_the_old_call_is_stale(
    app: Clearance, recorder: Recorder, tmp_path: Any
) -> None:
    ex = await paused(app, recorder)
    [request] = ex.pending_approvals
    model = define(
        app,
        recorder,
        then([text("Refunded.")]),
        Policy([Rule.ask("process-refund", id="every-refund", reason="Refunds need a reviewer.")]),
    )
    await app.engine.sweep_redefined()
    [kept] = await app.pending()
    assert kept.request_id == request.request_id and kept.status == "pending"
    assert kept.digest != request.digest  # the policy version is part of the call's digest
    assert kept.policy is not None and kept.policy.rule_id == "every-refund"
    assert kept.timeout == request.timeout  # the deadline stands
    # A reviewer who looked before the redeploy decided about the old call: refused.
    with pytest.raises(Refusal) as stale:
        await app.signal(
            ex.id, "approve", request_id=request.request_id, by="alice", digest=request.digest
        )
    assert stale.value.code == "stale_decision"
    ex = await app.signal(
        ex.id, "approve", request_id=request.request_id, by="alice", digest=kept.digest
    )
    assert ex.status == "completed" and len(recorder.calls) == 1
    assert [r.decision for r in await app.audit(execution_id=ex.id)] == ["approved"]
    assert results(model)[0]["is_error"] is False
    await folds_the_same(app, tmp_path, ex)


async def test_a_kept_request_times_out_as_a_timeout_never_as_a_person(
    app: Clearance, recorder: Recorder
) -> None:
    ex = await paused(app, recorder)
    [request] = ex.pending_approvals
    define(app, recorder, then([text("Timed out.")]), [Rule.ask("process-refund", id="all")])
    clock = app.clock
    assert isinstance(clock, FakeClock)
    clock.advance(minutes=10)
    assert await app.fire_due_timers() == 1
    ex = await rested(app, ex)
    decided = ex.request(request.request_id)
    assert decided is not None
    assert (decided.status, decided.outcome, decided.decided_by) == ("timed_out", "timed_out", None)
    assert recorder.calls == []
    # Judged under the new definition first (still a person's), then timed out.
    events = [e.TAG for e in await app.store.events(ex.id)]
    assert events[2:4] == ["redefined", "timer_fired"], events


# -- elsewhere -------------------------------------------------------------------------------


async def test_a_process_without_the_agent_judges_by_the_stored_definition(
    app: Clearance, recorder: Recorder, tmp_path: Any
) -> None:
    ex = await paused(app, recorder)
    [request] = ex.pending_approvals
    define(app, recorder, then([text("No.")]), [Rule.deny("process-refund", id="frozen")])
    await app.engine.define_agents()  # the redeployed process has started
    # A reviewer's tool (the CLI, `serve`) hosts no agent: the store says what is current.
    async with Clearance.open(f"sqlite:///{tmp_path / 'redeploy.db'}", clock=app.clock) as cli:
        with pytest.raises(Refusal) as caught:
            await cli.signal(ex.id, "approve", request_id=request.request_id, by="alice")
        assert caught.value.code == "already_decided" and "denied by policy" in str(caught.value)
    ex = await rested(app, ex)  # the hosting process tells the model
    assert ex.status == "completed" and recorder.calls == []


async def test_a_new_predicate_is_judged_only_where_the_agent_runs(
    app: Clearance, recorder: Recorder, tmp_path: Any
) -> None:
    ex = await paused(app, recorder)
    [request] = ex.pending_approvals
    url = f"sqlite:///{tmp_path / 'redeploy.db'}"
    # The new release runs in another process (no background loop here: it sweeps
    # nothing by itself), with a rule only Python can say.
    deployed = Clearance.open(url, clock=app.clock, ids=SequentialIds(prefix="new-"))
    try:
        define(
            deployed,
            recorder,
            then([text("Done.")]),
            [Rule.deny("process-refund", predicate=lambda a: a["amount"] > 400, id="py-limit")],
        )
        await deployed.engine.define_agents()
        before = await app.store.load(ex.id)
        assert before is not None
        # Neither a reviewer's tool nor the old release can judge it: nothing changes.
        async with Clearance.open(url, clock=app.clock) as cli:
            for elsewhere in (cli, app):
                with pytest.raises(Refusal) as caught:
                    await elsewhere.signal(
                        ex.id, "approve", request_id=request.request_id, by="alice"
                    )
                assert caught.value.code == "host_required" and "py-limit" in str(caught.value)
        after = await app.store.load(ex.id)
        assert after is not None and after.seq == before.seq and after.pending_approvals
        # Where the new release runs, the predicate judges: 300 is under its limit, so
        # the request is kept and a person decides.
        ex = await deployed.signal(ex.id, "approve", request_id=request.request_id, by="alice")
        assert ex.status == "completed" and len(recorder.calls) == 1
        tags = [e.TAG for e in await deployed.store.events(ex.id)]
        assert tags[2:4] == ["redefined", "approved"], tags
    finally:
        await deployed.close()


async def test_an_unchanged_definition_changes_nothing(app: Clearance, recorder: Recorder) -> None:
    ex = await paused(app, recorder)
    define(app, recorder, then([text("Refunded.")]))  # the same spec, a new model object
    assert await app.engine.sweep_redefined() == 0
    loaded = await app.store.load(ex.id)
    assert loaded is not None and loaded.seq == ex.seq


async def test_an_execution_that_cannot_be_read_does_not_hold_up_the_sweep(
    app: Clearance, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await paused(app, recorder)
    second = await app.run("refunds", input="Refund 300 again")
    define(app, recorder, then([text("No.")]), [Rule.deny("process-refund", id="frozen")])
    load = app.store.load

    async def broken(execution_id: str) -> Execution | None:
        if execution_id == first.id:
            raise OSError("disk I/O error")
        return await load(execution_id)

    monkeypatch.setattr(app.store, "load", broken)
    await app.engine.sweep_redefined()
    monkeypatch.setattr(app.store, "load", load)
    second = await rested(app, second)
    assert [r.outcome for r in second.requests] == ["denied_by_policy"]
    assert [r.request_id for r in await app.pending()] == [first.pending_approvals[0].request_id]


# -- on PostgreSQL ---------------------------------------------------------------------------


async def test_a_redeploy_on_postgresql_decides_invalidates_and_folds_from_snapshots(
    url: str, recorder: Recorder
) -> None:
    clock = FakeClock()
    store = PostgresStore(url, snapshot_every=1)
    async with Clearance(store, clock=clock, ids=SequentialIds()) as app:
        first = await paused(app, recorder)
        define(
            app,
            recorder,
            [[tool_use("process-refund", refund(50))], [text("Refunded.")]],
        )
        second = await app.run("refunds", input="Refund 50")
        assert [r.request_id for r in await app.pending()] == ["apr-1", "apr-2"]
        # The new release: refunds up to 100 run; 300 no longer fits the tool at all.
        model = ScriptedModel(then([text("Done.")]))
        stricter = {
            **REFUND_SCHEMA,
            "properties": {
                **REFUND_SCHEMA["properties"],
                "amount": {"type": "number", "maximum": 100},
            },
        }
        app.define(
            tag="refunds",
            model=model,
            tools=[
                Tool(
                    tag="process-refund",
                    parameters=stricter,
                    handler=recorder.process_refund,
                    requires_confirmation=True,
                )
            ],
            human_in_loop=HumanInLoop(
                enabled=True,
                policy=[Rule.allow("process-refund", when="args.amount <= 100.0", id="small")],
            ),
        )
        await app.engine.sweep_redefined()
        first, second = await rested(app, first), await rested(app, second)
        assert await app.pending() == []
        assert [(r.status, r.outcome) for r in (*first.requests, *second.requests)] == [
            ("invalidated", "invalidated"),
            ("approved", "allowed_by_policy"),
        ]
        assert [params["amount"] for _, _, params in recorder.calls] == [50]
        assert first.status == second.status == "completed"
        fresh = PostgresStore(url)
        try:
            for ex in (first, second):
                assert await fresh.load(ex.id) == await app.store.load(ex.id)
        finally:
            await fresh.close()


# -- any sequence of redeploys and decisions -------------------------------------------------


@attrs.frozen
class Release:
    """One definition of the refund agent: where its rules deny and allow, whether the
    tool is there and gated, and the largest refund its schema takes."""

    deny_above: float | None
    allow_upto: float | None
    gated: bool
    has_tool: bool
    max_amount: float | None

    def effect(self, amount: float) -> str:
        """What this release does with a refund of `amount`: deny, allow, ask or gone."""
        if not self.has_tool or (self.max_amount is not None and amount > self.max_amount):
            return "gone"
        if self.deny_above is not None and amount > self.deny_above:
            return "deny"
        if self.allow_upto is not None and amount <= self.allow_upto:
            return "allow"
        return "ask" if self.gated else "allow"


releases = st.builds(
    Release,
    deny_above=st.sampled_from([None, 100.0, 250.0]),
    allow_upto=st.sampled_from([None, 50.0, 150.0]),
    gated=st.booleans(),
    has_tool=st.sampled_from([True, True, True, False]),
    max_amount=st.sampled_from([None, None, 200.0]),
)
FIRST = Release(None, None, True, True, None)


class RefundOnRequest:
    """A model that asks for the refund its input names, then answers."""

    async def reply(self, request: ModelRequest) -> ModelReply:
        if len(request.messages) > 1:
            return ModelReply([{"type": "text", "text": "Done."}])
        amount = float(request.messages[0]["content"].split()[-1])
        block = {
            "type": "tool_use",
            "id": "toolu_1",
            "name": "process-refund",
            "input": {"orderId": "ORD-1", "amount": amount},
        }
        return ModelReply([block], stop_reason="tool_use")


class Redeploys:
    """Refunds asked for, releases deployed, people deciding (some with what they saw
    before a redeploy), timers and the redefining process's sweep, in any order, on a
    real SQLite file (see `test_any_sequence_of_redeploys_and_decisions`)."""

    def __init__(self, folder: str) -> None:
        self.path = f"{folder}/redeploy.db"
        self.ran: list[tuple[float, Release, bool]] = []  # amount, release, by a person
        self.release = FIRST
        self.person_approving = False
        self.app = Clearance.open(f"sqlite:///{self.path}", clock=FakeClock(), ids=SequentialIds())
        self.ids: list[str] = []

    def deploy(self, release: Release) -> None:
        async def process_refund(ctx: ToolContext, params: dict[str, Any]) -> dict[str, Any]:
            self.ran.append((params["amount"], self.release, self.person_approving))
            return {"refunded": params["amount"]}

        schema: dict[str, Any] = {
            "type": "object",
            "properties": {"orderId": {"type": "string"}, "amount": {"type": "number"}},
            "required": ["orderId", "amount"],
        }
        if release.max_amount is not None:
            schema["properties"]["amount"]["maximum"] = release.max_amount
        rules = []
        if release.has_tool and release.deny_above is not None:
            rules.append(Rule.deny("process-refund", when=f"args.amount > {release.deny_above}"))
        if release.has_tool and release.allow_upto is not None:
            rules.append(Rule.allow("process-refund", when=f"args.amount <= {release.allow_upto}"))
        tools = [Tool(tag="lookup", handler=lambda ctx, params: {})]
        if release.has_tool:
            tools.append(
                Tool(
                    tag="process-refund",
                    parameters=schema,
                    handler=process_refund,
                    requires_confirmation=release.gated,
                )
            )
        self.app.define(
            tag="refunds",
            model=RefundOnRequest(),
            tools=tools,
            human_in_loop=HumanInLoop(enabled=True, policy=rules),
        )
        self.release = release

    async def step(self, action: tuple[Any, ...]) -> None:
        kind = action[0]
        if kind == "ask" and self.release.has_tool:
            ex = await self.app.run("refunds", input=f"Refund {action[1]}")
            self.ids.append(ex.id)
        elif kind == "redeploy":
            self.deploy(action[1])
            await self.app.engine.define_agents()  # the new release has started
        elif kind == "sweep":
            await self.app.engine.sweep_redefined()
        elif kind == "decide":
            await self.decide(*action[1:])
        elif kind == "time":
            clock = self.app.clock
            assert isinstance(clock, FakeClock)
            clock.advance(minutes=6)
            await self.app.fire_due_timers()
        await self.app.engine.drain()

    async def decide(self, which: int, approve: bool, seen_before: bool) -> None:
        pending = await self.app.pending()
        if not pending:
            return
        request = pending[which % len(pending)]
        # A reviewer who decides what the inbox showed: the digest it had then.
        digest = request.digest if seen_before else None
        self.person_approving = approve
        try:
            await self.app.signal(
                request.execution_id,
                "approve" if approve else "reject",
                request_id=request.request_id,
                by="rita",
                digest=digest,
            )
        except Refusal as refusal:
            assert refusal.code in ("already_decided", "stale_decision"), refusal
        finally:
            self.person_approving = False

    async def check(self) -> None:
        # A refund ran only where the release current when it was authorised allowed
        # it, or asked and a person approved; never where it denies or lacks it.
        for amount, release, by_person in self.ran:
            effect = release.effect(amount)
            assert effect in ("allow", "ask"), f"{amount} ran under {release}: {effect}"
            if effect == "ask":
                assert by_person, f"{amount} ran unapproved under {release}"
        # A request judged under the current release is one it asks a person about.
        current = await self.app.store.current_agent("refunds")
        for request in await self.app.pending():
            ex = await self.app.store.load(request.execution_id)
            assert ex is not None
            if ex.agent == current:
                assert self.release.effect(request.parameters["amount"]) == "ask", request
        # Decided requests have their outcome, and a store that never saw them reads
        # each execution back as it is.
        fresh = SQLiteStore(self.path)
        try:
            for execution_id in self.ids:
                ex = await self.app.store.load(execution_id)
                assert ex is not None
                for request in ex.requests:
                    assert (request.status == "pending") == (request.outcome is None), request
                assert await fresh.load(execution_id) == ex
        finally:
            await fresh.close()


actions = st.one_of(
    st.tuples(st.just("ask"), st.sampled_from([10.0, 80.0, 120.0, 300.0])),
    st.tuples(st.just("redeploy"), releases),
    st.tuples(st.just("sweep")),
    st.tuples(st.just("decide"), st.integers(0, 3), st.booleans(), st.booleans()),
    st.tuples(st.just("time")),
)


@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(st.lists(actions, min_size=3, max_size=14))
def test_any_sequence_of_redeploys_and_decisions(steps: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        world = Redeploys(folder)

        async def play() -> None:
            try:
                world.deploy(FIRST)
                for action in steps:
                    await world.step(action)
                    await world.check()
            finally:
                await world.app.close()

        asyncio.run(play())
