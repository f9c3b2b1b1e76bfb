"""Several approvers: quorum, groups, no self-approval, votes audited; approval by
timeout where the definition says so; deadlines a reviewer extends.

A refund over 10,000 needs two people, one from finance and one from risk, and never
the person who asked for the run. Each vote is audited; the tool runs once, when the
quorum is met; any one rejection rejects at once; an edit makes a new call, so the
count starts again with the editor's vote.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from itertools import permutations
from typing import Any

import pytest
from conftest import Recorder
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from postgres_server import postgres_url
from test_policy import REFUND_SCHEMA, refund, results
from test_postgres_store import url
from test_redeploy import first_spec

from clearance import Clearance, Grant, HumanInLoop, Policy, Refusal, Reviewer, Rule, Tool
from clearance.adapters.sqlite_store import SQLiteStore
from clearance.core.agent import AgentSpec, ToolSpec
from clearance.core.agent import Stage as StageSpec
from clearance.core.commands import DeliverAgain, RecordDecision, RunTool
from clearance.core.decide import decide
from clearance.core.escalation import due
from clearance.core.events import (
    Approved,
    Event,
    Extended,
    ModelReplied,
    Rejected,
    Started,
    StopRequested,
    Ticket,
    TimerFired,
)
from clearance.core.execution import Execution
from clearance.core.policy import ALLOW, ASK, evaluate
from clearance.core.replay import replay
from clearance.core.schema import with_defaults
from clearance.testing import FakeClock, ScriptedModel, SequentialIds, text, tool_use

__all__ = ["postgres_url", "url"]  # the fixtures, for pytest

EVERYTHING = [Grant(agents="*", tools="*", actions={"decide", "extend"})]
DECIDE_ONLY = [Grant(agents="*", tools="*", actions={"decide"})]
PEOPLE = {
    "alice": ("finance",),
    "bob": ("finance",),
    "rita": ("risk",),
    "carol": ("finance", "risk"),  # asks for the refunds, so never approves them
}
# Above 10,000: two people, one of finance and one of risk; above 100: one person.
QUORUM_RULES = [
    Rule.ask(
        "process-refund",
        when="args.amount > 10000.0",
        id="large-refunds",
        approvals_required=2,
        groups=["finance", "risk"],
        reason="Large refunds need finance and risk.",
    ),
    Rule.ask("process-refund", when="args.amount > 100.0", id="refunds"),
    Rule.allow("process-refund", id="small-refunds"),
]


def define(
    app: Clearance,
    recorder: Recorder,
    turns: list[Any],
    *,
    policy: list[Rule] | None = None,
    **tool_options: Any,
) -> ScriptedModel:
    model = ScriptedModel(turns)
    app.define(
        tag="refunds",
        model=model,
        tools=[
            Tool(
                tag="process-refund",
                description="Refund an order",
                parameters=REFUND_SCHEMA,
                handler=recorder.process_refund,
                requires_confirmation=True,
                **tool_options,
            )
        ],
        human_in_loop=HumanInLoop(enabled=True, policy=policy),
    )
    return model


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def app(tmp_path: Any, clock: FakeClock) -> Any:
    async with Clearance.open(
        f"sqlite:///{tmp_path / 'quorum.db'}", clock=clock, ids=SequentialIds()
    ) as instance:
        for name, groups in PEOPLE.items():
            await instance.save_reviewer(Reviewer(name, EVERYTHING, groups))
        await instance.save_reviewer(Reviewer("dora", DECIDE_ONLY, ("finance",)))
        yield instance


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


async def large_refund(app: Clearance, recorder: Recorder, amount: float = 20_000) -> Execution:
    define(
        app,
        recorder,
        [[tool_use("process-refund", refund(amount))], [text("Done.")]],
        policy=QUORUM_RULES,
    )
    ex = await app.run("refunds", input="Refund it", requested_by="carol")
    assert ex.status == "awaiting_approval"
    return ex


async def vote(app: Clearance, ex: Execution, name: str, **more: Any) -> Execution:
    """`name` approves as a reviewer (their key's identity)."""
    who = await app.reviewer_identity(name)
    assert who is not None
    [request] = ex.pending_approvals
    return await app.signal(ex.id, "approve", request_id=request.request_id, by=who, **more)


async def refused(code: str, decision: Any) -> Refusal:
    with pytest.raises(Refusal) as caught:
        await decision
    assert caught.value.code == code, str(caught.value)
    return caught.value


async def replays(app: Clearance, ex: Execution) -> None:
    stored = await app.store.load(ex.id)
    assert stored is not None
    assert replay(stored.agent, None, await app.store.events(ex.id)) == stored


# -- the quorum -----------------------------------------------------------------------------


async def test_two_people_from_finance_and_risk_and_never_the_requester(
    app: Clearance, recorder: Recorder
) -> None:
    ex = await large_refund(app, recorder)
    [request] = ex.pending_approvals
    assert (request.approvals_required, request.groups) == (2, ("finance", "risk"))
    assert request.requested_by == "carol"
    assert request.still_needed() == (2, ("finance", "risk"))
    # The requester, whatever their groups and grants.
    message = await refused("self_approval", vote(app, ex, "carol"))
    assert "carol" in str(message) and request.request_id in str(message)
    ex = await vote(app, ex, "alice")
    [request] = ex.pending_approvals
    assert ex.status == "awaiting_approval" and recorder.calls == []
    assert [(v.by, v.by_kind, v.groups) for v in request.votes] == [
        ("alice", "reviewer", ("finance",))
    ]
    assert request.still_needed() == (1, ("risk",))
    await refused("already_voted", vote(app, ex, "alice"))
    # A second finance vote makes two votes, but nobody from risk: still pending.
    ex = await vote(app, ex, "bob")
    [request] = ex.pending_approvals
    assert len(request.votes) == 2 and request.still_needed() == (1, ("risk",))
    assert recorder.calls == []
    ex = await vote(app, ex, "rita")
    assert ex.status == "completed" and ex.pending_approvals == []
    assert [params["amount"] for _, _, params in recorder.calls] == [20_000]
    decided = ex.request(request.request_id)
    assert decided is not None and decided.outcome == "approved"
    assert decided.decided_by == "rita"
    assert [v.by for v in decided.votes] == ["alice", "bob", "rita"]
    audit = await app.audit(request_id=request.request_id)
    assert [(r.decision, r.by) for r in audit] == [
        ("vote", "alice"),
        ("vote", "bob"),
        ("approved", "rita"),
    ]
    assert (await app.verify_audit()).intact
    await replays(app, ex)


async def test_one_person_stands_for_one_group(app: Clearance, recorder: Recorder) -> None:
    """Someone in finance and risk cannot cover both groups alone: a second person must
    come, and either group will do for them."""
    await app.save_reviewer(Reviewer("fay", EVERYTHING, ("finance", "risk")))
    ex = await large_refund(app, recorder)
    ex = await vote(app, ex, "fay")
    [request] = ex.pending_approvals
    assert request.still_needed() == (1, ())  # fay covers either group, one more person
    ex = await vote(app, ex, "bob")
    assert ex.status == "completed" and len(recorder.calls) == 1


async def test_claimed_and_anonymous_names_never_count(app: Clearance, recorder: Recorder) -> None:
    from clearance import Identity

    ex = await large_refund(app, recorder)
    [request] = ex.pending_approvals
    claimed = Identity("rita", "claimed")
    for by in (claimed, None):
        for approved in (True, False):
            await refused("not_granted", app.decide(request.request_id, approved=approved, by=by))
    ex = await vote(app, ex, "alice")
    assert len(ex.pending_approvals[0].votes) == 1


async def test_a_vote_by_name_from_the_app_counts_the_registered_reviewers_groups(
    app: Clearance, recorder: Recorder
) -> None:
    ex = await large_refund(app, recorder)
    [request] = ex.pending_approvals
    ex = await app.signal(ex.id, "approve", request_id=request.request_id, by="rita")
    assert ex.pending_approvals[0].votes[0].groups == ("risk",)
    assert ex.pending_approvals[0].votes[0].by_kind == "app"
    # A name nobody registered belongs to no group: it counts, but covers none.
    ex = await app.signal(ex.id, "approve", request_id=request.request_id, by="zed")
    assert ex.pending_approvals[0].still_needed() == (1, ("finance",))
    ex = await vote(app, ex, "alice")
    assert ex.status == "completed"


async def test_any_rejection_rejects_at_once(app: Clearance, recorder: Recorder) -> None:
    ex = await large_refund(app, recorder)
    ex = await vote(app, ex, "alice")
    [request] = ex.pending_approvals
    who = await app.reviewer_identity("rita")
    ex = await app.signal(
        ex.id, "reject", request_id=request.request_id, by=who, reason="not this one"
    )
    assert ex.status == "completed" and recorder.calls == []
    decided = ex.request(request.request_id)
    assert decided is not None and decided.status == "rejected" and decided.decided_by == "rita"
    await refused(
        "already_decided", app.signal(ex.id, "approve", request_id=request.request_id, by="bob")
    )


async def test_an_edit_starts_the_count_again_for_the_new_call(
    app: Clearance, recorder: Recorder
) -> None:
    ex = await large_refund(app, recorder)
    [request] = ex.pending_approvals
    first_digest = request.digest
    ex = await vote(app, ex, "alice")
    ex = await vote(app, ex, "rita", modified_params={"amount": 15_000})
    [request] = ex.pending_approvals
    assert [v.by for v in request.votes] == ["rita"]
    assert request.effective_parameters()["amount"] == 15_000
    assert request.digest != first_digest
    # Alice's earlier approval was of the other call: a decision bound to its digest is
    # stale, and she must approve the new call to count.
    await refused("stale_decision", vote(app, ex, "alice", digest=first_digest))
    ex = await vote(app, ex, "alice", digest=request.digest)
    assert ex.status == "completed"
    assert [params["amount"] for _, _, params in recorder.calls] == [15_000]
    decided = ex.request(request.request_id)
    assert decided is not None and decided.outcome == "approved_modified"
    audit = await app.audit(request_id=request.request_id)
    assert [(r.decision, r.by, r.modified_params) for r in audit] == [
        ("vote", "alice", None),
        ("vote", "rita", {"amount": 15_000}),
        ("approved_modified", "alice", {"amount": 15_000}),
    ]
    await replays(app, ex)


async def test_an_edit_into_a_smaller_rule_needs_only_that_rules_quorum(
    app: Clearance, recorder: Recorder
) -> None:
    """The edit is judged by the policy like a proposal: 500 is one person's to approve,
    and the editor is that person."""
    ex = await large_refund(app, recorder)
    ex = await vote(app, ex, "alice", modified_params={"amount": 500})
    assert ex.status == "completed"
    assert [params["amount"] for _, _, params in recorder.calls] == [500]


async def test_an_edit_into_a_larger_rule_asks_for_its_quorum(
    app: Clearance, recorder: Recorder
) -> None:
    """The peers' bug: an edit that slips past a rule. 500 needs one person; raised to
    50,000 it needs finance and risk, so the editor's approval alone does not run it."""
    define(
        app,
        recorder,
        [[tool_use("process-refund", refund(500))], [text("Done.")]],
        policy=QUORUM_RULES,
    )
    ex = await app.run("refunds", input="Refund it")
    [request] = ex.pending_approvals
    assert request.approvals_required == 1
    ex = await vote(app, ex, "alice", modified_params={"amount": 50_000})
    [request] = ex.pending_approvals
    assert (request.approvals_required, request.groups) == (2, ("finance", "risk"))
    assert recorder.calls == []
    ex = await vote(app, ex, "rita")
    assert [params["amount"] for _, _, params in recorder.calls] == [50_000]


async def test_a_claimed_or_anonymous_edit_into_a_larger_rule_is_refused(
    app: Clearance, recorder: Recorder
) -> None:
    """Where the edit makes the call one that needs a quorum, its editor must be someone
    who can count towards it: a claimed or anonymous approval that raises 500 to 20,000
    would otherwise stand as finance's vote, and one more person would run it."""
    from clearance import Identity

    define(
        app,
        recorder,
        [[tool_use("process-refund", refund(500))], [text("Done.")]],
        policy=QUORUM_RULES,
    )
    ex = await app.run("refunds", input="Refund it")
    [request] = ex.pending_approvals
    for by in (Identity("mallory", "claimed"), None):
        await refused(
            "not_granted",
            app.decide(
                request.request_id, approved=True, by=by, modified_params={"amount": 20_000}
            ),
        )
    ex = await app.get_execution(ex.id)
    [request] = ex.execution.pending_approvals
    assert (request.votes, request.modified_params, request.approvals_required) == ((), None, 1)
    ex = await vote(app, ex.execution, "rita")  # one known person, the call as proposed
    assert [params["amount"] for _, _, params in recorder.calls] == [500]


async def test_remember_is_refused_where_more_than_one_approval_is_needed(
    app: Clearance, recorder: Recorder
) -> None:
    ex = await large_refund(app, recorder)
    await refused("invalid_remember", vote(app, ex, "alice", remember="execution"))
    assert (await app.store.load(ex.id)) == ex  # nothing changed


async def test_a_quorum_from_the_tool_and_votes_that_survive_a_restart(
    tmp_path: Any, recorder: Recorder, clock: FakeClock
) -> None:
    url = f"sqlite:///{tmp_path / 'restart.db'}"
    turns = [[tool_use("process-refund", refund(30))], [text("Done.")]]
    async with Clearance.open(url, clock=clock, ids=SequentialIds()) as first:
        define(first, recorder, turns, approvals_required=2)
        ex = await first.run("refunds", input="Refund it")
        [request] = ex.pending_approvals
        ex = await first.signal(ex.id, "approve", request_id=request.request_id, by="alice")
        assert len(ex.pending_approvals[0].votes) == 1
    async with Clearance.open(url, clock=clock, ids=SequentialIds(prefix="b")) as second:
        define(second, recorder, turns, approvals_required=2)
        pending = await second.pending()
        assert [len(r.votes) for r in pending] == [1]
        await refused(
            "already_voted",
            second.signal(ex.id, "approve", request_id=request.request_id, by="alice"),
        )
        ex = await second.signal(ex.id, "approve", request_id=request.request_id, by="bob")
        assert ex.status == "completed" and len(recorder.calls) == 1


async def test_two_processes_voting_at_once_run_the_tool_once(
    tmp_path: Any, recorder: Recorder, clock: FakeClock
) -> None:
    """Two hosts take the last two votes of a 2-of-3 at the same moment: one commit
    wins each race, the loser retries on the new state, and the tool runs once."""
    url = f"sqlite:///{tmp_path / 'race.db'}"
    turns = [[tool_use("process-refund", refund(30))], [text("Done.")], [text("Done.")]]
    async with (
        Clearance.open(url, clock=clock, ids=SequentialIds()) as one,
        Clearance.open(url, clock=clock, ids=SequentialIds(prefix="b")) as two,
    ):
        define(one, recorder, turns, approvals_required=3)
        define(two, recorder, turns, approvals_required=3)
        ex = await one.run("refunds", input="Refund it")
        [request] = ex.pending_approvals
        await one.signal(ex.id, "approve", request_id=request.request_id, by="alice")
        outcomes = await asyncio.gather(
            one.signal(ex.id, "approve", request_id=request.request_id, by="bob"),
            two.signal(ex.id, "approve", request_id=request.request_id, by="rita"),
            return_exceptions=True,
        )
        assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
        await one.engine.drain()
        await two.engine.drain()
        assert len(recorder.calls) == 1
        audit = await one.audit(request_id=request.request_id)
        assert sorted(r.decision for r in audit) == ["approved", "vote", "vote"]
        assert (await one.verify_audit()).intact


# -- approval by timeout --------------------------------------------------------------------


async def test_timeout_approve_runs_the_tool_recorded_as_approved_by_timeout(
    app: Clearance, recorder: Recorder, clock: FakeClock
) -> None:
    define(
        app,
        recorder,
        [[tool_use("process-refund", refund(30))], [text("Done.")]],
        timeout_action="approve",
        approval_timeout=60_000,
    )
    ex = await app.run("refunds", input="Refund it")
    [request] = ex.pending_approvals
    clock.advance(seconds=60)
    assert await app.fire_due_timers() == 1
    await app.engine.drain()
    ex = await app.engine.settle(await app.store.load(ex.id))  # type: ignore[arg-type]
    assert ex.status == "completed" and len(recorder.calls) == 1
    decided = ex.request(request.request_id)
    assert decided is not None
    assert (decided.status, decided.outcome, decided.decided_by) == (
        "approved",
        "approved_by_timeout",
        None,
    )
    [record] = await app.audit(request_id=request.request_id)
    assert (record.decision, record.by, record.by_kind) == ("approved_by_timeout", None, None)


async def test_a_quorum_request_times_out_even_where_timeout_approves(
    app: Clearance, recorder: Recorder, clock: FakeClock
) -> None:
    """Approval by timeout never stands for more than one person: where a rule asks
    for two, the request times out (rejected) as without the option."""
    define(
        app,
        recorder,
        [[tool_use("process-refund", refund(20_000))], [text("Not done.")]],
        policy=QUORUM_RULES,
        timeout_action="approve",
        approval_timeout=60_000,
    )
    ex = await app.run("refunds", input="Refund it")
    ex = await vote(app, ex, "alice")
    [request] = ex.pending_approvals
    clock.advance(seconds=60)
    assert await app.fire_due_timers() == 1
    decided = (await app.store.load(ex.id)).request(request.request_id)  # type: ignore[union-attr]
    assert decided is not None and decided.outcome == "timed_out" and recorder.calls == []


def test_timeout_approve_with_a_quorum_is_refused_at_define(
    app: Clearance, recorder: Recorder
) -> None:
    from clearance import DefinitionError

    with pytest.raises(DefinitionError, match="approval by timeout never stands"):
        define(app, recorder, [], timeout_action="approve", approvals_required=2)
    with pytest.raises(DefinitionError, match="timeout_action is 'reject'"):
        define(app, recorder, [], timeout_action="allow")
    with pytest.raises(DefinitionError, match="approvals_required is a whole number"):
        define(app, recorder, [], approvals_required=0)
    with pytest.raises(DefinitionError, match="2 groups need at least 2 approvals"):
        define(app, recorder, [], groups=["finance", "risk"])


# -- extending a deadline -------------------------------------------------------------------


async def test_a_reviewer_with_the_grant_extends_a_deadline_within_the_maximum(
    app: Clearance, recorder: Recorder, clock: FakeClock
) -> None:
    model = define(
        app,
        recorder,
        [[tool_use("process-refund", refund(30))], [text("Done.")]],
        approval_timeout=600_000,
        max_approval_timeout="1h",
    )
    ex = await app.run("refunds", input="Refund it")
    [request] = ex.pending_approvals
    opened = request.timestamp
    alice = await app.reviewer_identity("alice")
    dora = await app.reviewer_identity("dora")
    later = opened + timedelta(minutes=30)
    await refused(
        "not_granted",
        app.signal(ex.id, "extend", request_id=request.request_id, until=later, by=dora),
    )
    await refused(
        "extension_too_long",
        app.signal(
            ex.id,
            "extend",
            request_id=request.request_id,
            until=opened + timedelta(minutes=61),
            by=alice,
        ),
    )
    ex = await app.signal(ex.id, "extend", request_id=request.request_id, until=later, by=alice)
    [extended] = ex.pending_approvals
    assert extended.timeout == later and extended.expires_at == later
    # The old deadline passes: nothing fires; a decision is still accepted.
    clock.advance(minutes=11)
    assert await app.fire_due_timers() == 0
    assert ex.pending_approvals
    [record] = await app.audit(request_id=request.request_id)
    assert (record.decision, record.by) == ("extended", "alice")
    # The new deadline passes: it times out then.
    clock.advance(minutes=20)
    assert await app.fire_due_timers() == 1
    decided = (await app.store.load(ex.id)).request(request.request_id)  # type: ignore[union-attr]
    assert decided is not None and decided.outcome == "timed_out"
    await app.engine.drain()
    await app.engine.settle(await app.store.load(ex.id))  # type: ignore[arg-type]
    # The model is told how long it was open: the extension included.
    [result] = results(model)
    assert "Approval request timed out after 30 minutes" in result["content"]
    await replays(app, ex)


async def test_a_tool_without_a_maximum_cannot_be_extended(
    app: Clearance, recorder: Recorder
) -> None:
    define(app, recorder, [[tool_use("process-refund", refund(30))]])
    ex = await app.run("refunds", input="Refund it")
    [request] = ex.pending_approvals
    error = await refused(
        "extension_too_long",
        app.signal(
            ex.id,
            "extend",
            request_id=request.request_id,
            until=request.timeout + timedelta(minutes=1),
            by="alice",
        ),
    )
    assert "max_approval_timeout" in str(error)
    await refused(
        "invalid_deadline",
        app.signal(ex.id, "extend", request_id=request.request_id, until="tomorrow", by="alice"),
    )


async def test_votes_and_extensions_fold_the_same_from_a_fresh_store(
    app: Clearance, recorder: Recorder, tmp_path: Any
) -> None:
    ex = await large_refund(app, recorder)
    ex = await vote(app, ex, "alice")
    ex = await vote(app, ex, "rita", modified_params={"amount": 12_000})
    fresh = SQLiteStore(str(tmp_path / "quorum.db"))
    try:
        assert await fresh.load(ex.id) == await app.store.load(ex.id)
    finally:
        await fresh.close()
    await replays(app, ex)


# -- random votes, rejections, edits, stops, extensions and clock moves ----------------------

T0 = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
# name -> (groups, how they are known); carol starts every run.
VOTERS = {
    "alice": (("finance",), "reviewer"),
    "bob": (("finance",), "app"),
    "rita": (("risk",), "reviewer"),
    "fay": (("finance", "risk"), "reviewer"),
    "carol": (("finance", "risk"), "reviewer"),
    "mallory": ((), "claimed"),
}
AMOUNTS = (50, 500, 20_000, 60_000)
MACHINE_POLICY = Policy(
    [
        Rule.ask(
            "process-refund",
            when="args.amount > 50000.0",
            id="huge",
            approvals_required=3,
            groups=["finance", "risk"],
        ),
        Rule.ask("process-refund", when="args.amount > 10000.0", id="large", groups=["risk"]),
        Rule.allow("process-refund", when="args.amount < 100.0", id="small"),
    ]
).spec()


def covered(voters: list[str], groups: tuple[str, ...]) -> bool:
    """Brute force: distinct voters for the groups, one group each."""
    if not groups:
        return True
    return any(
        all(g in VOTERS[v][0] for v, g in zip(chosen, groups, strict=True))
        for chosen in permutations(voters, len(groups))
    )


class QuorumMachine(RuleBasedStateMachine):
    """One gated refund, decided by a crowd, through decide() alone. The test keeps its
    own account of who approved which exact call, and holds decide() to it."""

    # One approval and no groups, and 500 (which no rule matches), drawn more often: an
    # edit out of a one-person call into a quorum's is where an editor must count.
    @initialize(
        needed=st.sampled_from([1, 1, 2, 3]),
        groups=st.sampled_from([(), (), ("finance",), ("risk",), ("finance", "risk")]),
        amount=st.sampled_from([500, 500, 20_000, 60_000]),
        on_timeout=st.sampled_from(["reject", "approve"]),
        with_policy=st.booleans(),
    )
    def start(
        self, needed: int, groups: tuple[str, ...], amount: int, on_timeout: str, with_policy: bool
    ) -> None:
        needed = max(needed, len(groups))
        if (needed, groups) != (1, ()):
            on_timeout = "reject"  # refused at define otherwise
        self.tool = ToolSpec(
            tag="process-refund",
            description="",
            input_schema=REFUND_SCHEMA,
            gated=True,
            approval_timeout_ms=600_000,
            approvals_required=needed,
            groups=groups,
            timeout_action=on_timeout,
            max_timeout_ms=3_600_000,
            # A reminder 2 minutes before the deadline, and two escalation stages.
            remind_before_ms=120_000,
            escalation=(
                StageSpec(120_000, reviewers=("lead",)),
                StageSpec(300_000, groups=("risk",)),
            ),
        )
        self.spec = AgentSpec(
            tag="refunds",
            name="refunds",
            product="",
            model="scripted",
            system_prompt="",
            tools=(self.tool,),
            policy=MACHINE_POLICY if with_policy else None,
        )
        self.at = T0
        self.events: list[Event] = []
        self.ex = Execution(agent=self.spec)
        # The call as it stands now (with its defaults, as the tool gets it).
        params = with_defaults(REFUND_SCHEMA, refund(amount))
        self.params = params
        self.approvals: list[tuple[str, dict[str, Any]]] = []  # (who, the call they approved)
        self.runs: list[RunTool] = []
        self.sent_again: list[str] = []  # the reminder and the stages, as they fired
        self.closed = False  # rejected, timed out or stopped: nothing may run after
        assert self.apply(Started("exec-1", "refund", self.at, requested_by="carol"))
        verdict = self.verdict(params)
        self.apply(
            ModelReplied(
                1,
                ({"type": "tool_use", "id": "tu1", "name": "process-refund", "input": params},),
                "tool_use",
                self.at,
                tickets=(Ticket("tu1", "apr-1", "why", verdict),),
            )
        )
        assert self.pending() is not None or verdict is not None

    def verdict(self, params: dict[str, Any]) -> Any:
        if self.spec.policy is None:
            return None
        return evaluate(self.spec.policy, agent="refunds", tool="process-refund", args=params)

    def required(self, params: dict[str, Any]) -> tuple[int, tuple[str, ...]]:
        """What the definition asks for this exact call, said independently of decide()."""
        verdict = self.verdict(params)
        if verdict is not None and verdict.effect == ALLOW:
            return 1, ()
        needed, groups = self.tool.approvals_required, self.tool.groups
        if verdict is not None and verdict.effect == ASK:
            rule = next(r for r in MACHINE_POLICY.rules if r.id == verdict.rule_id)
            needed = rule.approvals_required or needed
            groups = rule.groups or groups
        return needed, groups

    def apply(self, event: Event) -> bool:
        before = self.ex
        try:
            self.ex, commands = decide(self.ex, event)
        except Refusal:
            assert self.ex is before
            return False
        self.events.append(event)
        self.runs += [c for c in commands if isinstance(c, RunTool)]
        again = [c for c in commands if isinstance(c, DeliverAgain)]
        if again:
            # Only a timer sends a request again, and only while nobody has decided it.
            assert isinstance(event, TimerFired) and before.request("apr-1").status == "pending"  # type: ignore[union-attr]
            assert all(c.request.status == "pending" for c in again)
        self.sent_again += [c.purpose for c in again]
        self.records = [c.record for c in commands if isinstance(c, RecordDecision)]
        return True

    def tick(self, seconds: int = 1) -> datetime:
        self.at += timedelta(seconds=seconds)
        return self.at

    def pending(self) -> Any:
        request = self.ex.request("apr-1")
        assert request is not None
        return request if request.status == "pending" else None

    @rule(
        who=st.sampled_from(sorted(VOTERS)),
        amount=st.none() | st.sampled_from(AMOUNTS),
        bind=st.booleans(),
    )
    def approve(self, who: str, amount: int | None, bind: bool) -> None:
        request = self.pending()
        groups, kind = VOTERS[who]
        edit = None if amount is None else {"amount": amount}
        proposed = self.params if edit is None else {**self.params, **edit}
        event = Approved(
            "apr-1",
            self.tick(),
            by=who,
            modified_params=edit,
            by_kind=kind,
            verdict=self.verdict(proposed) if edit is not None else None,
            digest=request.digest if request is not None and bind else None,
            groups=groups if kind != "claimed" else (),
        )
        if self.apply(event):
            assert who != "carol"
            if kind == "claimed":
                assert self.required(proposed) == (1, ()) == self.required(self.params)
            if proposed != self.params:
                self.params = proposed
            self.approvals.append((who, proposed))

    @rule(anonymous=st.booleans(), amount=st.none() | st.sampled_from(AMOUNTS))
    def approve_unknown(self, anonymous: bool, amount: int | None) -> None:
        """A callback URL's or a broker message's approval: a claimed name, or none.
        It decides a call only where one approval of anyone is enough, before and after
        its edit; it never counts towards a quorum, nor opens one by editing."""
        edit = None if amount is None else {"amount": amount}
        proposed = self.params if edit is None else {**self.params, **edit}
        event = Approved(
            "apr-1",
            self.tick(),
            by=None if anonymous else "mallory",
            modified_params=edit,
            by_kind=None if anonymous else "claimed",
            verdict=self.verdict(proposed) if edit is not None else None,
        )
        if self.apply(event):
            assert self.required(proposed) == (1, ()) == self.required(self.params)
            self.params = proposed
            self.approvals.append(("mallory", proposed))

    # Rejections, stops and long waits end a run: drawn rarely (`now` is 0 one time in
    # four), so that most runs get far enough to meet a quorum or miss one.
    @rule(who=st.sampled_from(sorted(VOTERS)), now=st.integers(0, 3))
    def reject(self, who: str, now: int) -> None:
        if now:
            return
        _, kind = VOTERS[who]
        if self.apply(Rejected("apr-1", self.tick(), by=who, reason="no", by_kind=kind)):
            self.closed = True

    @rule(seconds=st.sampled_from([30, 30, 30, 300, 599, 601, 1800]))
    def clock_moves(self, seconds: int) -> None:
        self.tick(seconds)
        request = self.pending()
        if request is not None and self.at < request.timeout:
            if due(request, self.tool, self.at):
                assert self.apply(TimerFired("apr-1", self.at))
            else:  # a timer that fires early changes nothing
                assert not self.apply(TimerFired("apr-1", self.at))
        elif request is not None:
            assert self.apply(TimerFired("apr-1", self.at))
            decided = self.ex.request("apr-1")
            assert decided is not None
            if decided.outcome == "approved_by_timeout":
                assert self.required(self.params) == (1, ())
                assert self.tool.timeout_action == "approve"
            else:
                assert decided.outcome == "timed_out"
                self.closed = True

    @rule(who=st.sampled_from(sorted(VOTERS)), minutes=st.integers(1, 70))
    def extend(self, who: str, minutes: int) -> None:
        _, kind = VOTERS[who]
        request = self.pending()
        before = request.timeout if request is not None else None
        until = T0 + timedelta(minutes=minutes)
        if self.apply(Extended("apr-1", until, self.tick(), by=who, by_kind=kind)):
            assert request is not None and before is not None
            assert before < until <= request.timestamp + timedelta(hours=1)
            assert kind != "claimed"

    @precondition(lambda self: self.ex.status not in ("stopped", "completed", "failed"))
    @rule(now=st.integers(0, 3))
    def stop(self, now: int) -> None:
        if not now and self.apply(StopRequested(self.tick(), by="ops")):
            self.closed = not self.runs

    @invariant()
    def the_tool_runs_only_with_a_quorum_of_the_exact_call(self) -> None:
        assert len(self.runs) <= 1
        if not self.runs:
            return
        [run] = self.runs
        decided = self.ex.request("apr-1")
        assert decided is not None and decided.status == "approved"
        assert run.parameters == self.params
        if decided.outcome == "approved_by_timeout":
            return
        needed, groups = self.required(run.parameters)
        approvers = sorted({w for w, p in self.approvals if p == run.parameters})
        assert "carol" not in approvers
        assert "mallory" not in approvers or needed == 1
        assert len(approvers) >= needed
        assert covered(approvers, groups)

    @invariant()
    def the_reminder_and_each_stage_go_out_at_most_once_in_order(self) -> None:
        assert len(self.sent_again) == len(set(self.sent_again))
        stages = [p for p in self.sent_again if p.startswith("stage:")]
        assert stages == [f"stage:{n}" for n in range(1, len(stages) + 1)]

    @invariant()
    def nothing_runs_after_a_rejection_a_timeout_or_a_stop(self) -> None:
        if self.closed:
            assert not self.runs

    @invariant()
    def replay_is_identical(self) -> None:
        folded = Execution(agent=self.spec)
        for event in self.events:
            folded, _ = decide(folded, event)
        assert folded == self.ex


QuorumMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,  # the same examples every run: a red here is a defect, not luck
    database=None,
)
TestQuorum = QuorumMachine.TestCase


# -- a redeploy and delegations meet a quorum ------------------------------------------------


async def test_a_redeploy_that_lowers_the_quorum_approves_what_enough_people_approved(
    app: Clearance, recorder: Recorder
) -> None:
    turns = [[tool_use("process-refund", refund(30))], [text("Done.")]]
    define(app, recorder, turns, approvals_required=2)
    ex = await app.run("refunds", input="Refund it")
    [request] = ex.pending_approvals
    ex = await app.signal(ex.id, "approve", request_id=request.request_id, by="alice")
    define(app, recorder, turns)  # one approval now suffices: alice's is there
    await app.engine.sweep_redefined()
    await app.engine.drain()
    ex = await app.engine.settle(await app.store.load(ex.id))  # type: ignore[arg-type]
    assert ex.status == "completed" and len(recorder.calls) == 1
    decided = ex.request(request.request_id)
    assert decided is not None and (decided.outcome, decided.decided_by) == ("approved", "alice")
    stored = await app.store.load(ex.id)
    events = await app.store.events(ex.id)
    assert replay(await first_spec(app, ex), None, events) == stored


async def test_a_redeploy_takes_timeout_approve_away(
    app: Clearance, recorder: Recorder, clock: FakeClock
) -> None:
    turns = [[tool_use("process-refund", refund(30))], [text("Not done.")]]
    define(app, recorder, turns, timeout_action="approve", approval_timeout=60_000)
    ex = await app.run("refunds", input="Refund it")
    [request] = ex.pending_approvals
    define(app, recorder, turns, approval_timeout=60_000)  # unanswered requests reject again
    clock.advance(seconds=60)
    assert await app.fire_due_timers() == 1
    decided = (await app.store.load(ex.id)).request(request.request_id)  # type: ignore[union-attr]
    assert decided is not None and decided.outcome == "timed_out" and recorder.calls == []


async def test_a_delegate_and_the_delegator_are_one_vote(
    app: Clearance, recorder: Recorder, clock: FakeClock
) -> None:
    """Alice delegates to Dora: Dora acting for Alice and Alice herself are one person's
    say, never two votes of a quorum; the delegator's groups count for the delegate."""
    await app.save_reviewer(Reviewer("dora", [], ()))
    await app.delegate("alice", to="dora", until=clock.now() + timedelta(days=1))
    turns = [[tool_use("process-refund", refund(30))], [text("Done.")]]
    define(app, recorder, turns, approvals_required=2, groups=["finance"])
    ex = await app.run("refunds", input="Refund it")
    ex = await vote(app, ex, "dora")
    [request] = ex.pending_approvals
    [first] = request.votes
    assert (first.by, first.on_behalf_of, first.groups) == ("dora", "alice", ("finance",))
    assert request.still_needed() == (1, ())
    await refused("already_voted", vote(app, ex, "alice"))
    ex = await vote(app, ex, "rita")
    assert ex.status == "completed" and len(recorder.calls) == 1
    audit = await app.audit(request_id=request.request_id)
    assert [(r.decision, r.by, r.on_behalf_of) for r in audit] == [
        ("vote", "dora", "alice"),
        ("approved", "rita", None),
    ]


# -- on PostgreSQL -------------------------------------------------------------------------


async def test_votes_an_edit_and_the_quorum_on_postgresql(url: str, recorder: Recorder) -> None:
    from clearance.adapters.postgres_store import PostgresStore

    store = PostgresStore(url, snapshot_every=1)
    async with Clearance(store, clock=FakeClock(), ids=SequentialIds()) as app:
        for name, groups in PEOPLE.items():
            await app.save_reviewer(Reviewer(name, EVERYTHING, groups))
        ex = await large_refund(app, recorder)
        [request] = ex.pending_approvals
        await refused("self_approval", vote(app, ex, "carol"))
        ex = await vote(app, ex, "alice")
        [listed] = await app.pending()
        assert [v.by for v in listed.votes] == ["alice"]  # the inbox copy shows the vote
        ex = await vote(app, ex, "bob", modified_params={"amount": 12_000})
        [listed] = await app.pending()
        assert [v.by for v in listed.votes] == ["bob"]
        assert listed.effective_parameters()["amount"] == 12_000
        await refused("already_voted", vote(app, ex, "bob"))
        ex = await vote(app, ex, "rita")
        assert ex.status == "completed"
        assert [params["amount"] for _, _, params in recorder.calls] == [12_000]
        audit = await app.audit(request_id=request.request_id)
        assert [(r.decision, r.by) for r in audit] == [
            ("vote", "alice"),
            ("vote", "bob"),
            ("approved_modified", "rita"),
        ]
        assert (await app.verify_audit()).intact
        await replays(app, ex)
        fresh = PostgresStore(url)
        try:
            assert await fresh.load(ex.id) == await app.store.load(ex.id)
        finally:
            await fresh.close()
