"""Policies: allow / ask / deny rules before a person is asked, CEL conditions that fail
closed, edits checked again, shadow mode, and replay that never evaluates again."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import attrs
import pytest
from conftest import Recorder
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant
from test_http_api import conforms

from clearance import (
    Clearance,
    ClearanceWarning,
    DefinitionError,
    HumanInLoop,
    Policy,
    Refusal,
    Rule,
    Tool,
    ToolContext,
)
from clearance.core.decide import decide
from clearance.core.events import ModelReplied
from clearance.core.execution import ApprovalRequest, Execution
from clearance.core.policy import (
    ALLOW,
    ASK,
    DENY,
    NO_MATCH,
    PolicySpec,
    RuleSpec,
    evaluate,
    version_of,
)
from clearance.core.replay import replay
from clearance.testing import FakeClock, ScriptedModel, SequentialIds, text, tool_use
from clearance.testing.machine import AgentMachine
from clearance.views import approval, webhook_body

REFUND_SCHEMA = {
    "type": "object",
    "properties": {
        "orderId": {"type": "string"},
        "amount": {"type": "number"},
        "currency": {"type": "string", "default": "EUR"},
        "note": {"type": "string"},
    },
    "required": ["orderId", "amount"],
    "additionalProperties": False,
}

# Refunds up to 20 run; above 1,000 never; the rest need a person.
REFUND_RULES = [
    Rule.deny(
        "process-refund",
        when="args.amount > 1000.0",
        id="no-large-refunds",
        reason="Refunds above 1,000 are made by finance, not by the agent.",
    ),
    Rule.ask("process-refund", when="args.amount > 20.0", id="review-refunds"),
    Rule.allow("process-refund", when="args.amount <= 20.0", id="small-refunds"),
    Rule.deny("delete-*", id="no-deletes", reason="Accounts are closed by support."),
]


def define(
    app: Clearance,
    recorder: Recorder,
    turns: list[Any],
    policy: Policy | list[Rule] | None = None,
    *,
    gated: bool = True,
    tool_policy: tuple[Rule, ...] = (),
) -> ScriptedModel:
    model = ScriptedModel(turns)

    async def delete_account(ctx: ToolContext, params: dict[str, Any]) -> dict[str, Any]:
        recorder.calls.append(("delete-account", ctx, params))
        return {"deleted": params["customerId"]}

    app.define(
        tag="refunds",
        model=model,
        tools=[
            Tool(
                tag="process-refund",
                description="Refund an order",
                parameters=REFUND_SCHEMA,
                handler=recorder.process_refund,
                requires_confirmation=gated,
                policy=tool_policy,
            ),
            Tool(
                tag="delete-account",
                parameters={"customerId": {"type": "string", "required": True}},
                handler=delete_account,
            ),
        ],
        human_in_loop=HumanInLoop(enabled=True, policy=policy),
    )
    return model


def refund(amount: Any, **more: Any) -> dict[str, Any]:
    return {"orderId": "ORD-1", "amount": amount, **more}


def results(model: ScriptedModel) -> list[dict[str, Any]]:
    return list(model.requests[-1].messages[-1]["content"])


@pytest.fixture
async def app(tmp_path: Any) -> Any:
    async with Clearance.open(
        f"sqlite:///{tmp_path / 'policy.db'}", clock=FakeClock(), ids=SequentialIds()
    ) as instance:
        yield instance


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


async def replays(app: Clearance, ex: Execution) -> None:
    """The stored log folds to the stored state, reading the verdicts it holds."""
    stored = await app.store.load(ex.id)
    assert stored is not None
    events = await app.store.events(ex.id)
    assert replay(stored.agent, None, events) == stored


# -- the three outcomes ------------------------------------------------------------------


async def test_a_denied_call_never_runs_and_the_model_is_told_why(
    app: Clearance, recorder: Recorder, tmp_path: Any
) -> None:
    model = define(
        app,
        recorder,
        [[tool_use("process-refund", refund(5000))], [text("Understood.")]],
        REFUND_RULES,
    )
    ex = await app.run("refunds", input="Refund 5000")
    assert ex.status == "completed" and recorder.calls == []
    assert await app.pending() == [] and ex.requests == ()
    [result] = results(model)
    assert result["is_error"] is True
    content = json.loads(result["content"])
    assert content["error"] == "denied_by_policy" and content["rule"] == "no-large-refunds"
    assert "made by finance" in content["message"] and "did not run" in content["message"]
    [record] = await app.audit(execution_id=ex.id)
    assert (record.decision, record.request_id, record.rule_id, record.by) == (
        "denied_by_policy",
        None,
        "no-large-refunds",
        None,
    )
    assert record.tool_use_id == results(model)[0]["tool_use_id"]
    assert record.parameters == {**refund(5000), "currency": "EUR"}
    assert record.policy_version == app._agents["refunds"].spec.policy.version  # type: ignore[union-attr]
    await replays(app, ex)
    from test_cli import acli

    code, out, err = await acli(tmp_path, "--db", str(tmp_path / "policy.db"), "show", ex.id)
    assert code == 0, err
    assert "(deny by rule no-large-refunds)" in out and "denied_by_policy" in out


async def test_an_allowed_call_of_a_gated_tool_runs_without_a_request(
    app: Clearance, recorder: Recorder
) -> None:
    define(
        app, recorder, [[tool_use("process-refund", refund(12.5))], [text("Done.")]], REFUND_RULES
    )
    ex = await app.run("refunds", input="Refund 12.50")
    assert ex.status == "completed" and ex.requests == ()
    [(tool, ctx, params)] = recorder.calls
    assert (tool, params, ctx.request_id) == ("process-refund", refund(12.5, currency="EUR"), None)
    [record] = await app.audit(execution_id=ex.id)
    assert (record.decision, record.rule_id, record.request_id) == (
        "allowed_by_policy",
        "small-refunds",
        None,
    )
    await replays(app, ex)


async def test_an_ask_rule_gates_an_ungated_tool_and_the_request_names_the_rule(
    app: Clearance, recorder: Recorder
) -> None:
    define(
        app,
        recorder,
        [[tool_use("process-refund", refund(300))], [text("Done.")]],
        REFUND_RULES,
        gated=False,
    )
    ex = await app.run("refunds", input="Refund 300")
    [request] = ex.pending_approvals
    assert recorder.calls == []
    rule = {
        "ruleId": "review-refunds",
        "reason": "",
        "version": app._agents["refunds"].spec.policy.version,  # type: ignore[union-attr]
    }
    assert webhook_body(request, None)["policy"] == rule
    assert approval(request)["policy"] == rule
    conforms(approval(request), "ApprovalRequest")
    ex = await app.signal(ex.id, "approve", request_id=request.request_id, by="ops")
    assert ex.status == "completed" and len(recorder.calls) == 1
    assert [r.decision for r in await app.audit(execution_id=ex.id)] == ["approved"]


async def test_no_matching_rule_leaves_the_tool_as_defined(
    app: Clearance, recorder: Recorder
) -> None:
    # Only a rule for another tool: the gated refund asks, as without a policy.
    define(
        app,
        recorder,
        [[tool_use("process-refund", refund(5))], [text("Done.")]],
        [Rule.deny("delete-*", id="no-deletes")],
    )
    ex = await app.run("refunds", input="Refund 5")
    [request] = ex.pending_approvals
    assert request.policy is None and "policy" not in webhook_body(request, None)


async def test_deny_wins_over_an_allow_that_also_matches(
    app: Clearance, recorder: Recorder
) -> None:
    define(
        app,
        recorder,
        [[tool_use("delete-account", {"customerId": "c-1"})], [text("Ok.")]],
        [Rule.allow("*", id="anything"), Rule.deny("delete-account", id="no-deletes")],
    )
    ex = await app.run("refunds", input="Delete c-1")
    assert recorder.calls == [] and ex.status == "completed"
    [record] = await app.audit(execution_id=ex.id)
    assert (record.decision, record.rule_id) == ("denied_by_policy", "no-deletes")


async def test_a_tools_own_rules_cover_that_tool_only(app: Clearance, recorder: Recorder) -> None:
    define(
        app,
        recorder,
        [
            [
                tool_use("process-refund", refund(5), id="t1"),
                tool_use("delete-account", {"customerId": "c"}, id="t2"),
            ],
            [text("Ok.")],
        ],
        gated=False,
        tool_policy=(Rule.deny(when="args.amount < 10.0", id="tiny"),),
    )
    ex = await app.run("refunds", input="x")
    assert [c[0] for c in recorder.calls] == ["delete-account"]
    spec = app._agents["refunds"].spec.policy
    assert spec is not None and spec.rules[0].tools == ("process-refund",)
    assert ex.status == "completed"


# -- fail closed -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "says"),
    [
        (Rule.ask("process-refund", when="args.note.startsWith('x')", id="r"), "note"),
        (Rule.allow("process-refund", when="args.amount / 0 > 1", id="r"), "divide by zero"),
        (
            Rule.allow("process-refund", predicate=lambda args: 1 / 0 > 1, id="r"),
            "ZeroDivisionError",
        ),
        (Rule.allow("process-refund", predicate=lambda args: "yes", id="r"), "str"),
    ],
    ids=["missing-argument", "cel-error", "predicate-raises", "predicate-not-bool"],
)
async def test_a_condition_that_cannot_be_evaluated_denies_and_names_its_rule(
    app: Clearance, recorder: Recorder, rule: Rule, says: str
) -> None:
    model = define(app, recorder, [[tool_use("process-refund", refund(5))], [text("Ok.")]], [rule])
    ex = await app.run("refunds", input="x")
    assert recorder.calls == [] and ex.status == "completed"
    content = json.loads(results(model)[0]["content"])
    assert content["error"] == "denied_by_policy" and content["rule"] == "r"
    assert "Rule 'r' could not be evaluated" in content["message"] and says in content["message"]


@pytest.mark.parametrize(
    ("rule", "says"),
    [
        (Rule.allow(when="args.amount <=", id="typo"), "policy rule 'typo': at 1:15: Syntax"),
        (Rule.allow(when="argz.amount < 1.0", id="r"), "undeclared reference to 'argz.amount'"),
        (Rule.allow(when="tool + 1", id="r"), "no matching overload"),
        (Rule.allow(when="args.amount", id="r"), "must be a boolean"),
        (Rule("maybe", id="r"), "effect must be one of allow, ask, deny"),
        (Rule.allow(when="true", predicate=lambda a: True, id="r"), "not both"),
        (Rule.allow(tools=[], id="r"), "tools is a tool tag or glob"),
        (Rule.allow(id="bad id!"), "use 1-64 letters"),
        (
            Rule.deny("process-refund", when="args.amont > 1000.0", id="typo"),
            "policy rule 'typo': its condition names args.amont, which process-refund does not"
            " take (parameters: amount, currency, note, orderId)",
        ),
        (Rule.deny("*", when='args["nope"] == "x"', id="r"), "names args.nope"),
    ],
)
def test_a_rule_that_cannot_work_is_refused_at_define_naming_it(
    app: Clearance, rule: Rule, says: str
) -> None:
    with pytest.raises(DefinitionError) as caught:
        define(app, Recorder(), [], [rule])
    assert says in str(caught.value)
    assert "\n" not in str(caught.value), "one line"


def test_ids_are_unique_and_ask_needs_a_human_in_the_loop(app: Clearance) -> None:
    with pytest.raises(DefinitionError, match="'same' is used twice"):
        define(app, Recorder(), [], [Rule.allow(id="same"), Rule.deny(id="same")])
    with pytest.raises(DefinitionError, match="human_in_loop is not enabled"):
        app.define(
            tag="a",
            model=ScriptedModel([]),
            tools=[Tool(tag="t", handler=lambda c, p: None)],
            human_in_loop=HumanInLoop(policy=[Rule.ask("t")]),
        )
    with pytest.warns(ClearanceWarning, match="names tools it does not define: refund"):
        define(app, Recorder(), [], [Rule.deny("refund", id="typo-in-tool")])


# -- edits are checked again -------------------------------------------------------------


async def test_an_edit_into_a_denied_region_is_refused_and_the_request_stays_pending(
    app: Clearance, recorder: Recorder
) -> None:
    define(
        app, recorder, [[tool_use("process-refund", refund(300))], [text("Done.")]], REFUND_RULES
    )
    ex = await app.run("refunds", input="Refund 300")
    [request] = ex.pending_approvals
    with pytest.raises(Refusal) as caught:
        await app.signal(
            ex.id, "approve", request_id=request.request_id, modified_params={"amount": 5000}
        )
    assert caught.value.code == "denied_by_policy"
    assert "no-large-refunds" in str(caught.value) and "still pending" in str(caught.value)
    assert [r.request_id for r in await app.pending()] == [request.request_id]
    assert recorder.calls == [] and await app.audit(execution_id=ex.id) == []
    # An edit the rules take, then: it runs with the edited amount, once.
    ex = await app.signal(
        ex.id, "approve", request_id=request.request_id, modified_params={"amount": 250}
    )
    assert [c[2]["amount"] for c in recorder.calls] == [250]
    await replays(app, ex)


async def test_an_edit_a_predicate_must_judge_needs_the_hosting_process(
    app: Clearance, recorder: Recorder, tmp_path: Any
) -> None:
    define(
        app,
        recorder,
        [[tool_use("process-refund", refund(300))], [text("Done.")]],
        [Rule.deny("process-refund", predicate=lambda a: a["amount"] > 400, id="py-limit")],
    )
    ex = await app.run("refunds", input="Refund 300")
    [request] = ex.pending_approvals
    async with Clearance.open(f"sqlite:///{tmp_path / 'policy.db'}", clock=app.clock) as elsewhere:
        with pytest.raises(Refusal) as caught:
            await elsewhere.signal(
                ex.id, "approve", request_id=request.request_id, modified_params={"amount": 350}
            )
        assert caught.value.code == "host_required" and "py-limit" in str(caught.value)
        assert [r.request_id for r in await elsewhere.pending()] == [request.request_id]
    # The hosting process judges it: an edit to 450 is over the predicate's limit.
    with pytest.raises(Refusal, match="py-limit"):
        await app.signal(
            ex.id, "approve", request_id=request.request_id, modified_params={"amount": 450}
        )


# -- shadow mode -------------------------------------------------------------------------


async def test_shadow_mode_changes_nothing_but_the_records(
    app: Clearance, recorder: Recorder
) -> None:
    model = define(
        app,
        recorder,
        [
            [
                tool_use("process-refund", refund(5000), id="t1"),
                tool_use("delete-account", {"customerId": "c"}, id="t2"),
            ],
            [text("Done.")],
        ],
        Policy(REFUND_RULES, enforce=False),
    )
    ex = await app.run("refunds", input="x")
    # As without a policy: the gated refund waits for a person (and, in sequential
    # order, the delete after it waits too).
    [request] = ex.pending_approvals
    assert request.tool == "process-refund" and request.policy is None
    assert recorder.calls == []
    records = await app.audit(execution_id=ex.id)
    assert [(r.decision, r.rule_id) for r in records] == [
        ("would_deny", "no-large-refunds"),
        ("would_deny", "no-deletes"),
    ]
    ex = await app.signal(ex.id, "approve", request_id=request.request_id)
    assert ex.status == "completed" and len(model.requests) == 2
    assert [c[0] for c in recorder.calls] == ["process-refund", "delete-account"]
    assert [r.decision for r in await app.audit(execution_id=ex.id)][2:] == ["approved"]
    await replays(app, ex)


# -- the core: verdicts travel in events, replay reads them -------------------------------


def test_a_reply_without_the_policys_verdict_is_refused(app: Clearance) -> None:
    define(app, Recorder(), [], REFUND_RULES)
    spec = app._agents["refunds"].spec
    from clearance.core.events import Started, Ticket
    from clearance.testing.contract.store import T0

    ex, _ = decide(Execution(agent=spec), Started("exec-1", "x", T0))
    ex = attrs.evolve(ex, id="exec-1")
    block = {"type": "tool_use", "id": "t1", "name": "process-refund", "input": refund(5)}
    no_verdict = ModelReplied(1, (block,), "tool_use", T0, tickets=(Ticket("t1", "apr-1", "r"),))
    with pytest.raises(Refusal, match="without the verdict of the agent's policy"):
        decide(ex, no_verdict)
    other = PolicySpec((), True, "sha256:other")
    stale = evaluate(other, agent="refunds", tool="process-refund", args=refund(5))
    with pytest.raises(Refusal, match="not of the agent's policy"):
        decide(
            ex,
            attrs.evolve(no_verdict, tickets=(Ticket("t1", "apr-1", "r", stale),)),
        )


async def test_replay_reads_the_recorded_verdicts_after_the_policy_changes(
    app: Clearance, recorder: Recorder
) -> None:
    define(
        app, recorder, [[tool_use("process-refund", refund(12.5))], [text("Done.")]], REFUND_RULES
    )
    ex = await app.run("refunds", input="x")
    events = await app.store.events(ex.id)
    stored = await app.store.load(ex.id)
    assert stored is not None
    # The same log under a spec whose policy now denies everything: replay still reads
    # the verdict the event holds, and reproduces what happened.
    stricter = attrs.evolve(stored.agent.policy, rules=(RuleSpec("all", DENY, ("*",)),))
    assert replay(attrs.evolve(stored.agent, policy=stricter), None, events).calls == stored.calls


# -- the evaluator against a plain reference -----------------------------------------------

# Conditions whose meaning the reference computes without CEL: (CEL, Python).
CONDITIONS: list[tuple[str | None, Any]] = [
    (None, lambda a: True),
    ("args.amount <= 20.0", lambda a: a["amount"] <= 20.0),
    ("args.amount > 1000.0", lambda a: a["amount"] > 1000.0),
    ('args.currency == "EUR"', lambda a: a["currency"] == "EUR"),
    ("has(args.note)", lambda a: "note" in a),
    ("args.note.size() > 3", lambda a: len(a["note"]) > 3),  # raises without a note
    (
        'args.currency.startsWith("U") || args.amount < 1.0',
        lambda a: a["currency"].startswith("U") or a["amount"] < 1.0,
    ),
]
TOOLS = ["process-refund", "delete-account", "get-order"]
PATTERNS = ["process-refund", "delete-*", "*", "get-order", "nothing-matches"]


@st.composite
def rule_lists(draw: st.DrawFn) -> tuple[PolicySpec, list[tuple[RuleSpec, Any]]]:
    picked = draw(
        st.lists(
            st.tuples(
                st.sampled_from([ALLOW, ASK, DENY]),
                st.sampled_from(PATTERNS),
                st.integers(0, len(CONDITIONS) - 1),
            ),
            max_size=8,
        )
    )
    pairs = [
        (RuleSpec(f"r{i}", effect, (pattern,), CONDITIONS[c][0]), CONDITIONS[c][1])
        for i, (effect, pattern, c) in enumerate(picked)
    ]
    rules = tuple(r for r, _ in pairs)
    return PolicySpec(rules, True, version_of(rules, True)), pairs


calls = st.fixed_dictionaries(
    {
        "amount": st.one_of(st.integers(-5, 5000), st.floats(-5, 5000, allow_nan=False)),
        "currency": st.sampled_from(["EUR", "USD", "GBP"]),
    },
    optional={"note": st.text(max_size=6)},
)


def reference(
    pairs: list[tuple[RuleSpec, Any]], tool: str, args: dict[str, Any]
) -> tuple[str, str | None]:
    """Deny, then ask, then allow; in each, the first rule that holds wins; a condition
    that fails (raises) denies at once."""
    for effect in (DENY, ASK, ALLOW):
        for rule, holds in pairs:
            if rule.effect != effect or not rule.covers(tool):
                continue
            try:
                if holds(args):
                    return effect, rule.id
            except (KeyError, TypeError):
                return DENY, rule.id
    return NO_MATCH, None


@settings(max_examples=300, derandomize=True, database=None)
@given(rule_lists(), st.sampled_from(TOOLS), calls)
def test_the_evaluator_agrees_with_a_plain_reference(
    drawn: tuple[PolicySpec, list[tuple[RuleSpec, Any]]], tool: str, args: dict[str, Any]
) -> None:
    policy, pairs = drawn
    verdict = evaluate(policy, agent="a", tool=tool, args=args)
    assert (verdict.effect, verdict.rule_id) == reference(pairs, tool, args)
    assert verdict.version == policy.version
    denies = [r for r, holds in pairs if r.effect == DENY and r.covers(tool) and _true(holds, args)]
    if denies:
        assert verdict.effect == DENY, "a matching deny always wins"


def _true(holds: Any, args: dict[str, Any]) -> bool:
    try:
        return bool(holds(args))
    except (KeyError, TypeError):
        return False


@settings(max_examples=100, derandomize=True, database=None)
@given(rule_lists(), st.sampled_from(TOOLS), calls)
def test_shadow_verdicts_are_the_same_but_apply_nothing(
    drawn: tuple[PolicySpec, list[tuple[RuleSpec, Any]]], tool: str, args: dict[str, Any]
) -> None:
    policy, _ = drawn
    shadow = PolicySpec(policy.rules, False, version_of(policy.rules, False))
    enforced = evaluate(policy, agent="a", tool=tool, args=args)
    seen = evaluate(shadow, agent="a", tool=tool, args=args)
    assert (seen.effect, seen.rule_id) == (enforced.effect, enforced.rule_id)
    assert seen.applied == NO_MATCH and seen.version != policy.version


# -- any sequence of model turns and human actions ----------------------------------------


class PolicyAgentMachine(AgentMachine):
    """The refund agent under REFUND_RULES, driven by the harness: nothing in the deny
    region runs, nothing in the ask region runs unapproved, whatever the model proposes
    and the reviewers edit."""

    agent: ClassVar[dict[str, Any]] = dict(
        tag="refunds",
        tools=[
            Tool(
                tag="process-refund",
                description="Refund an order",
                parameters=REFUND_SCHEMA,
                handler=Recorder().process_refund,
                requires_confirmation=True,
            ),
            Tool(
                tag="delete-account",
                parameters={"customerId": {"type": "string", "required": True}},
                handler=lambda ctx, params: {"deleted": params["customerId"]},
            ),
        ],
        human_in_loop=HumanInLoop(enabled=True, policy=REFUND_RULES),
    )

    @invariant()
    def nothing_denied_runs(self) -> None:
        for call in self.calls:
            assert call.tool != "delete-account", f"a denied delete ran: {call.params}"
            if call.tool == "process-refund":
                assert call.params["amount"] <= 1000.0, f"a denied refund ran: {call.params}"

    @invariant()
    def nothing_asked_runs_unapproved(self) -> None:
        for call in self.calls:
            if call.tool == "process-refund" and call.params["amount"] > 20.0:
                assert self.approved(call), f"a refund over 20 ran unapproved: {call.params}"


PolicyAgentMachine.TestCase.settings = settings(
    PolicyAgentMachine.TestCase.settings, max_examples=60, derandomize=True, database=None
)
TestPolicyAgent = PolicyAgentMachine.TestCase


# -- policies in a file, `clearance policy check` and `replay` ----------------------------

POLICY_FILE = """\
# What the refund agent may do on its own.
enforce = true

[[rules]]
id = "no-large-refunds"
effect = "deny"
tools = "process-refund"
when = "args.amount > 1000.0"
reason = "Refunds above 1,000 are made by finance, not by the agent."

[[rules]]
id = "review-refunds"
effect = "ask"
tools = ["process-refund"]
when = "args.amount > 20.0"

[[rules]]
id = "small-refunds"
effect = "allow"
tools = "process-refund"
when = "args.amount <= 20.0"
"""


def test_a_policy_file_reads_as_the_same_policy_as_in_python(tmp_path: Any) -> None:
    path = tmp_path / "refunds.policy.toml"
    path.write_text(POLICY_FILE)
    from_file = Policy.from_file(path)
    in_python = Policy(REFUND_RULES[:3])
    assert from_file.spec() == in_python.spec()
    assert from_file.spec().version.startswith("sha256:")
    assert Policy(REFUND_RULES[:2]).spec().version != in_python.spec().version


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (('effect = "allow"', 'effect = "alow"'), ":17: rule 'small-refunds': effect: 'alow' is"),
        (('when = "args.amount > 20.0"', 'when = "args.amont > 20.0 &&"'), ":11: rule 'review-"),
        (('id = "small-refunds"', 'id = "review-refunds"'), ":17: rule 'review-refunds': the id"),
        (('reason = "Refunds', 'reasn = "Refunds'), ":4: rule 'no-large-refunds': the rule:"),
        (
            (
                'tools = "process-refund"\nwhen = "args.amount <=',
                'tools = 7\nwhen = "args.amount <=',
            ),
            ":17: rule 'small-refunds': tools:",
        ),
        (("enforce = true", "enforce = yes"), "not valid TOML"),
    ],
)
def test_a_policy_file_with_a_mistake_is_one_line_naming_file_line_and_rule(
    tmp_path: Any, change: tuple[str, str], says: str
) -> None:
    path = tmp_path / "refunds.policy.toml"
    assert change[0] in POLICY_FILE
    path.write_text(POLICY_FILE.replace(change[0], change[1]))
    with pytest.raises(DefinitionError) as caught:
        Policy.from_file(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and says in message, message
    assert "\n" not in message


async def test_policy_check_and_replay_from_the_command_line(
    app: Clearance, recorder: Recorder, tmp_path: Any
) -> None:
    from test_cli import acli

    # What happened: no policy; refunds of 5, 300 and 5,000 all waited for a person,
    # and one went out as an unknown tool (not counted: no policy decides it).
    def script(request: Any) -> list[Any]:
        if len(request.messages) > 1:
            return [text("Ok.")]
        word, _, amount = request.messages[0]["content"].partition(" ")
        return [tool_use("process-refund", refund(int(amount)))] if amount else [tool_use(word)]

    define(app, recorder, script)  # type: ignore[arg-type]
    for amount in (5, 300, 5000):
        ex = await app.run("refunds", input=f"refund {amount}")
        [request] = ex.pending_approvals
        await app.signal(ex.id, "reject", request_id=request.request_id, reason="later")
    assert (await app.run("refunds", input="nope")).status == "completed"
    path = tmp_path / "refunds.policy.toml"
    path.write_text(POLICY_FILE)
    db = str(tmp_path / "policy.db")

    code, out, err = await acli(tmp_path, "policy", "check", str(path), columns=200)
    assert code == 0, err
    assert "3 rules, enforced" in out and "no-large-refunds  deny" in out

    code, out, err = await acli(tmp_path, "--db", db, "policy", "replay", str(path), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["calls"], report["before"], report["after"]) == (
        3,
        {"ask": 3},
        {"allow": 1, "ask": 1, "deny": 1},
    )
    assert sorted((c["before"], c["after"], c["ruleAfter"]) for c in report["changed"]) == [
        ("ask", "allow", "small-refunds"),
        ("ask", "deny", "no-large-refunds"),
    ]
    code, out, err = await acli(tmp_path, "--db", db, "policy", "replay", str(path))
    assert code == 0, err
    assert "3 recorded calls in 3 executions" in out and "2 calls would change" in out
    code, out, err = await acli(
        tmp_path, "--db", db, "policy", "replay", str(path), "--agent", "other"
    )
    assert code == 0 and "0 recorded calls" in out and "No call's outcome would change" in out

    path.write_text(POLICY_FILE.replace('effect = "allow"', 'effect = "alow"'))
    code, out, err = await acli(tmp_path, "policy", "check", str(path))
    assert code == 2 and "rule 'small-refunds': effect: 'alow'" in err
    assert "Traceback" not in err


async def test_a_predicate_that_changes_its_arguments_changes_nothing(
    app: Clearance, recorder: Recorder
) -> None:
    def sly(args: dict[str, Any]) -> bool:
        args["amount"] = 1  # what runs must be what the model asked for
        args.setdefault("note", "x")
        return True

    define(
        app,
        recorder,
        [[tool_use("process-refund", refund(700))], [text("Done.")]],
        [Rule.allow("process-refund", predicate=sly, id="sly")],
    )
    await app.run("refunds", input="x")
    [(_, _, params)] = recorder.calls
    assert params == refund(700, currency="EUR")


# -- session grants ------------------------------------------------------------------------


def three_refunds(request: Any) -> list[Any]:
    """The model refunds 300, then 80, then 5000, one turn each, then answers."""
    turn = sum(1 for m in request.messages if m["role"] == "assistant")
    amounts = [300, 80, 5000]
    if turn < len(amounts):
        return [tool_use("process-refund", refund(amounts[turn]))]
    return [text("Done.")]


async def granted(
    app: Clearance, recorder: Recorder, when: str
) -> tuple[Execution, ApprovalRequest]:
    """The three refunds' first (300) approved by rita, remembering the tool within `when`."""
    define(app, recorder, three_refunds, REFUND_RULES)  # type: ignore[arg-type]
    ex = await app.run("refunds", input="x")
    [first] = ex.pending_approvals
    ex = await app.signal(
        ex.id,
        "approve",
        request_id=first.request_id,
        by="rita",
        remember="execution",
        remember_when=when,
    )
    return ex, first


async def test_a_session_grant_allows_later_calls_within_its_bound_and_deny_still_wins(
    app: Clearance, recorder: Recorder
) -> None:
    ex, first = await granted(app, recorder, "args.amount <= 100.0")
    # 300 approved; 80 within the grant ran unasked; 5000 is denied by the policy.
    assert ex.status == "completed", ex.pending_approvals
    assert [c[2]["amount"] for c in recorder.calls] == [300, 80]
    records = [(r.decision, r.by, r.request_id) for r in await app.audit(execution_id=ex.id)]
    assert records == [
        ("approved", "rita", first.request_id),
        ("allowed_by_grant", "rita", None),
        ("denied_by_policy", None, None),
    ]
    [grant] = ex.grants
    assert (grant.tool, grant.by, grant.request_id) == ("process-refund", "rita", first.request_id)
    await replays(app, ex)


async def test_a_grants_bound_sees_the_agent_and_the_tool(
    app: Clearance, recorder: Recorder
) -> None:
    await granted(
        app, recorder, 'agent == "refunds" && tool == "process-refund" && args.amount < 100.0'
    )
    # With the agent seen as "", the bound would not hold and 80 would wait for a person.
    assert [c[2]["amount"] for c in recorder.calls] == [300, 80]


async def test_a_call_outside_the_grants_bound_still_asks(
    app: Clearance, recorder: Recorder
) -> None:
    ex, _ = await granted(app, recorder, "args.amount <= 50.0")
    [second] = ex.pending_approvals
    assert second.parameters["amount"] == 80 and len(recorder.calls) == 1


async def test_a_grant_needs_a_known_decider_and_a_valid_bound(
    app: Clearance, recorder: Recorder
) -> None:
    define(app, recorder, three_refunds, REFUND_RULES)  # type: ignore[arg-type]
    ex = await app.run("refunds", input="x")
    [first] = ex.pending_approvals
    for kwargs, code in [
        ({"remember": "forever", "by": "rita"}, "invalid_remember"),
        (
            {"remember": "execution", "remember_when": "args.amount <=", "by": "rita"},
            "invalid_remember",
        ),
        ({"remember": "execution"}, "not_granted"),  # nobody said who
    ]:
        with pytest.raises(Refusal) as caught:
            await app.signal(ex.id, "approve", request_id=first.request_id, **kwargs)
        assert caught.value.code == code, (kwargs, caught.value)
    with pytest.raises(Refusal, match="goes with an approval"):
        await app.signal(ex.id, "reject", request_id=first.request_id, remember="execution")
    assert [r.request_id for r in await app.pending()] == [first.request_id]
    assert recorder.calls == []


# -- decisions bound to the exact call -----------------------------------------------------


async def test_a_decision_made_for_another_call_is_refused(
    app: Clearance, recorder: Recorder
) -> None:
    from clearance.core.call_digest import call_digest

    define(
        app, recorder, [[tool_use("process-refund", refund(300))], [text("Done.")]], REFUND_RULES
    )
    ex = await app.run("refunds", input="x")
    [request] = ex.pending_approvals
    spec = app._agents["refunds"].spec
    assert request.digest == call_digest(
        "refunds",
        "process-refund",
        refund(300, currency="EUR"),
        REFUND_SCHEMA,
        spec.policy.version if spec.policy else None,
    )
    assert webhook_body(request, None)["callDigest"] == request.digest
    # What a reviewer saw for another call (another amount) is not this call.
    other = call_digest("refunds", "process-refund", refund(30), REFUND_SCHEMA, None)
    for signal in ("approve", "reject"):
        with pytest.raises(Refusal) as caught:
            await app.signal(ex.id, signal, request_id=request.request_id, digest=other)
        assert caught.value.code == "stale_decision" and request.digest in str(caught.value)
    assert [r.request_id for r in await app.pending()] == [request.request_id]
    ex = await app.signal(ex.id, "approve", request_id=request.request_id, digest=request.digest)
    assert ex.status == "completed" and len(recorder.calls) == 1


async def test_policy_replay_counts_a_call_a_grant_let_run_as_allowed(
    app: Clearance, recorder: Recorder
) -> None:
    ex, _ = await granted(app, recorder, "args.amount <= 100.0")
    assert ex.status == "completed"
    # What happened: 300 asked, 80 ran under the grant, 5000 denied.
    report = await app.replay_policy(Policy(REFUND_RULES))
    assert report.before == {"ask": 1, "allow": 1, "deny": 1}
