"""Benchmark 9: what a policy costs, per evaluation and on the pause/resume cycle.

Part 1 times `clearance.core.policy.evaluate` (what the engine calls when the model
proposes a call, and again when a reviewer edits one) on one realistic call,
`process-refund` with `{"orderId": "ORD-1", "amount": 250.0, "currency": "EUR"}`, for
policies of 1, 10 and 100 rules. The rules are what a policy shared by many agents
and tools looks like: deny, ask and allow rules with CEL conditions on `args`, most of
them for other tools (`delete-*`, `issue-credit`, `export-*`, ...), some for the refund
tool by its tag or a glob (`*-refund`, `process-*`, `*`). Two policies per size:

- verdict found early: a deny that holds for this call is the second rule (the only
  rule, at size 1). Deny wins over ask and allow, so `evaluate` looks at the deny rules
  first and stops at it.
- worst case: the same rules without it (and one more at the end, for the size). No
  rule holds, so every rule's tool globs are
  matched and every condition of a rule covering the tool is evaluated.

Conditions are compiled (and the evaluator's per-source cache filled) before any timing.
Each call is timed on its own (`perf_counter_ns`; the clock costs about 0.1 µs), in
rounds that interleave the sizes and cases.

Part 2 runs benchmark 1's Clearance cycle (run -> the model asks for the gated refund
-> durable pause -> approve -> the tool runs -> final answer, a fresh SQLite file per
run) for the same agent three ways: no policy; a policy no rule of which covers the
tool (`Rule.deny("delete-*")`: the engine fills in the call's defaults, evaluates and
records a "none" verdict); and ten rules of which an `ask` holds (the call still pauses
for a person, and the request names the rule). Rounds interleave the three (FULL and
NORMAL for each, the order rotating from round to round), as benchmarks 1 and 5 do.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench import cycle
from bench.agents import AGENT, INPUT, define_refund_agent
from bench.common import (
    Section,
    Sizes,
    Target,
    fmt,
    load_average,
    median,
    percentile,
    ratio,
    scratch_dir,
    table,
)
from clearance import Clearance, Rule
from clearance.core.policy import (
    EFFECTS,
    PolicySpec,
    RuleSpec,
    compile_condition,
    evaluate,
    version_of,
)

# -- part 1: one evaluation ---------------------------------------------------------------

CALL_TOOL = "process-refund"
CALL_ARGS: dict[str, Any] = {"orderId": "ORD-1", "amount": 250.0, "currency": "EUR"}
AGENT_TAG = "support-agent"
RULE_COUNTS = (1, 10, 100)
# How many of a policy's rules cover the refund tool (the rest are for other tools).
COVERING = {1: 1, 10: 3, 100: 12}
EARLY = "verdict found early"
WORST = "worst case (no rule holds)"

# The deny that holds for the call (250 EUR): the early verdict.
MATCH = ("deny", ("process-refund",), 'args.currency == "EUR" && args.amount > 200.0')

# Rules covering the refund tool, none of which holds for the call.
REFUND_RULES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("deny", ("process-refund",), "args.amount > 1000.0"),
    ("ask", ("*-refund",), 'args.currency == "USD" && args.amount > 100.0'),
    ("allow", ("process-refund",), "args.amount <= 20.0"),
    ("deny", ("process-refund",), 'args.currency != "EUR" && args.currency != "USD"'),
    ("deny", ("*",), '"orderId" in args && args.orderId.startsWith("TEST-")'),
    ("ask", ("process-*",), "args.amount > 500.0"),
    ("deny", ("process-refund",), 'args.orderId in ["ORD-666", "ORD-667"]'),
    ("allow", ("*-refund",), 'args.currency == "EUR" && args.amount <= 50.0'),
    ("deny", ("process-refund",), '"note" in args && args.note.contains("chargeback")'),
    ("ask", ("*refund*",), 'args.currency == "GBP" && args.amount >= 300.0'),
    ("allow", ("process-refund",), 'args.orderId.startsWith("INT-")'),
    ("deny", ("*",), '"amount" in args && args.amount < 0.0'),
)

# Rules for other tools: (effect, tools, condition with {n}, base threshold). A policy
# needing more rules than these takes them again with higher thresholds (tiers).
OTHER_RULES: tuple[tuple[str, tuple[str, ...], str, int], ...] = (
    ("deny", ("delete-*",), "args.count > {n}", 1),
    ("ask", ("issue-credit",), "args.amount > {n}.0", 100),
    ("deny", ("transfer-funds",), "args.amount > {n}.0", 10_000),
    ("ask", ("send-email", "send-sms"), "size(args.recipients) > {n}", 10),
    ("allow", ("get-order", "search-orders"), "args.limit <= {n}", 100),
    ("deny", ("export-*",), "args.rows > {n}", 50_000),
    ("ask", ("cancel-subscription",), "args.monthsLeft > {n}", 6),
    ("deny", ("change-plan",), "args.seats > {n}", 500),
    ("allow", ("add-note", "escalate-ticket"), "size(args.text) <= {n}", 2_000),
    ("ask", ("apply-discount",), "args.percent > {n}.0", 15),
    ("deny", ("apply-discount",), "args.percent > {n}.0", 50),
    ("ask", ("void-invoice",), "args.total > {n}.0", 500),
    ("deny", ("merge-accounts",), "args.accounts > {n}", 2),
    ("ask", ("reset-password", "update-email"), "args.admin == true || args.attempts > {n}", 3),
    ("allow", ("ship-order", "reship-order"), "args.weightKg <= {n}.0", 30),
    ("deny", ("charge-card",), "args.amount > {n}.0", 5_000),
    ("ask", ("charge-card",), 'args.currency == "USD" && args.amount > {n}.0', 1_000),
    ("deny", ("update-inventory",), "args.quantity < -{n}", 100),
    ("ask", ("create-coupon",), "args.value > {n}.0", 25),
    ("deny", ("*-customer", "*-customers"), "args.gdprHold == true && args.days < {n}", 30),
    ("allow", ("close-ticket",), "args.ageDays >= {n}", 7),
    ("ask", ("refund-shipping",), "args.amount > {n}.0", 20),
    ("deny", ("wire-*",), "args.amount > {n}.0", 25_000),
    ("ask", ("create-invoice",), "args.total > {n}.0", 10_000),
    ("allow", ("send-email",), 'args.template == "receipt" && size(args.recipients) <= {n}', 1),
    ("deny", ("cancel-order",), "args.shipped == true && args.hoursSinceShipping > {n}", 48),
    ("ask", ("update-order",), "args.total > {n}.0", 1_000),
    ("deny", ("grant-role",), 'args.role == "admin" || args.durationDays > {n}', 90),
    ("ask", ("schedule-payout",), "args.amount > {n}.0", 2_000),
    ("allow", ("get-customer",), "args.fields <= {n}", 20),
)


def _spec(effect: str, tools: tuple[str, ...], when: str, number: int) -> RuleSpec:
    return RuleSpec(
        id=f"{effect}-{number}", effect=effect, tools=tools, when=when, reason=f"rule {number}"
    )


def worst_rules(count: int) -> list[RuleSpec]:
    """`count` rules, `COVERING[count]` of them (spread evenly) for the refund tool."""
    covering = COVERING[count]
    at = {round(i * count / covering) for i in range(covering)}
    refund = iter(REFUND_RULES)
    rules: list[RuleSpec] = []
    for position in range(count):
        if position in at:
            effect, tools, when = next(refund)
        else:
            other = len(rules) - sum(1 for p in at if p < position)
            effect, tools, template, base = OTHER_RULES[other % len(OTHER_RULES)]
            when = template.format(n=base * (1 + other // len(OTHER_RULES)))
        rules.append(_spec(effect, tools, when, position + 1))
    return rules


def early_rules(count: int) -> list[RuleSpec]:
    """The worst case's rules with the holding deny second (the only rule at size 1),
    the last one dropped to keep the size."""
    rules = worst_rules(count)
    effect, tools, when = MATCH
    match = RuleSpec(
        id="eur-refunds-over-200",
        effect=effect,
        tools=tools,
        when=when,
        reason="EUR refunds above 200 go through the EU payments desk.",
    )
    return [match] if count == 1 else [rules[0], match, *rules[1:-1]]


def policy_of(rules: Sequence[RuleSpec]) -> PolicySpec:
    for rule in rules:
        if rule.when is not None:
            compile_condition(rule.when)  # compiled here, once: never inside the timing
    return PolicySpec(tuple(rules), True, version_of(tuple(rules), True))


def conditions_evaluated(policy: PolicySpec) -> int:
    """How many conditions `evaluate` runs for the call (deny rules first, then ask, then
    allow; it stops at the first that holds): counted, not timed."""
    evaluated = 0
    for effect in EFFECTS:
        for rule in policy.rules:
            if rule.effect != effect or not rule.covers(CALL_TOOL) or rule.when is None:
                continue
            evaluated += 1
            data = {"args": CALL_ARGS, "tool": CALL_TOOL, "agent": AGENT_TAG}
            if compile_condition(rule.when).eval(data=data).value() is True:
                return evaluated
    return evaluated


def time_calls(policy: PolicySpec, calls: int) -> list[float]:
    """Microseconds per call, each call timed on its own."""
    clock = time.perf_counter_ns
    samples = []
    gc.collect()
    for _ in range(calls):
        start = clock()
        evaluate(policy, agent=AGENT_TAG, tool=CALL_TOOL, args=CALL_ARGS)
        samples.append((clock() - start) / 1_000)
    return samples


@dataclass
class Measured:
    """One policy's timings: every sample, and each round's median."""

    samples: list[float]
    round_medians: list[float]


def evaluation(sizes: Sizes) -> tuple[list[list[Any]], str]:
    policies = {
        (count, case): policy_of(rules(count))
        for count in RULE_COUNTS
        for case, rules in ((EARLY, early_rules), (WORST, worst_rules))
    }
    verdicts = {
        key: evaluate(policy, agent=AGENT_TAG, tool=CALL_TOOL, args=CALL_ARGS)
        for key, policy in policies.items()
    }
    for (_, case), verdict in verdicts.items():  # the cases are what they claim to be
        assert verdict.effect == ("deny" if case == EARLY else "none"), verdict
    measured = {key: Measured([], []) for key in policies}
    for _ in range(sizes.rounds):
        for key, policy in policies.items():
            time_calls(policy, max(1, sizes.policy_calls // 20))  # warm-up, not kept
            samples = time_calls(policy, sizes.policy_calls)
            measured[key].samples += samples
            measured[key].round_medians.append(median(samples))
    rows = []
    for (count, case), policy in policies.items():
        result = measured[(count, case)]
        verdict = verdicts[(count, case)]
        spread = (
            f"{min(result.round_medians):.1f}-{max(result.round_medians):.1f}"
            if len(result.round_medians) > 1
            else "1 round"
        )
        rows.append(
            [
                count,
                case,
                sum(rule.covers(CALL_TOOL) for rule in policy.rules),
                conditions_evaluated(policy),
                f"{verdict.effect} ({verdict.rule_id})" if verdict.rule_id else verdict.effect,
                f"{median(result.samples):.1f}",
                f"{percentile(result.samples, 95):.1f}",
                spread,
                fmt(1e6 / median(result.samples)),
            ]
        )
    note = (
        f"{sizes.policy_calls:,} calls per policy per round, {sizes.rounds} rounds "
        "interleaving the six policies (each after an untimed warm-up)."
    )
    return rows, note


# -- part 2: the cycle with and without a policy --------------------------------------------

NONE = "no policy"
EMPTY = 'a rule that covers no tool of the agent: `Rule.deny("delete-*")`'
ASKS = "10 rules, an `ask` holds (the call pauses)"

# The cycle's agent has one tool, process-refund (orderId, amount, reason), called with
# amount 50: the deny rules covering it do not hold, the 7th rule asks for a person.
ASK_POLICY: tuple[Rule, ...] = (
    Rule.deny("process-refund", when="args.amount > 1000.0", reason="Finance makes these."),
    Rule.deny("delete-*", reason="Accounts are closed by support."),
    Rule.deny("*-refund", when='args.reason.contains("chargeback")', reason="Disputed."),
    Rule.ask("issue-credit", when="args.amount > 100.0"),
    Rule.deny("transfer-funds", when="args.amount > 10000.0"),
    Rule.deny("process-refund", when='args.orderId.startsWith("TEST-")', reason="Test order."),
    Rule.ask("process-refund", when="args.amount > 20.0", reason="Refunds above 20 are read."),
    Rule.allow("process-refund", when="args.amount <= 20.0"),
    Rule.allow("get-order"),
    Rule.ask("export-*", when="args.rows > 50000"),
)
VARIANTS: dict[str, tuple[Rule, ...] | None] = {
    NONE: None,
    EMPTY: (Rule.deny("delete-*"),),
    ASKS: ASK_POLICY,
}


async def _asking_rules() -> dict[str, str | None]:
    """Each agent's first request, on an in-memory store: which policy rule asked for it."""
    asked = {}
    for name, policy in VARIANTS.items():
        async with Clearance.open("memory://") as app:
            define_refund_agent(app, policy=policy)
            ex = await app.run(AGENT, input=INPUT)
            verdict = ex.pending_approvals[0].policy
            asked[name] = None if verdict is None else f"{verdict.effect} {verdict.rule_id}"
    return asked


def cycles(sizes: Sizes) -> tuple[dict[tuple[str, str], list[cycle.Run]], str, str]:
    # The ask agent pauses because its rule asks, the others because the tool is gated.
    asked = asyncio.run(_asking_rules())
    assert asked == {NONE: None, EMPTY: None, ASKS: "ask ask-7"}, asked
    load_before = load_average()
    runs: dict[tuple[str, str], list[cycle.Run]] = {}
    names = list(VARIANTS)
    for round_no in range(sizes.policy_rounds):
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        for synchronous in cycle.SYNCS:
            for name in order:
                with scratch_dir(f"policy{round_no}") as where:
                    result = cycle.clearance(
                        where / "bench.db", synchronous, sizes.cycles, policy=VARIANTS[name]
                    )
                runs.setdefault((name, synchronous), []).append(result)
    return runs, load_before, load_average()


# -- the benchmark ----------------------------------------------------------------------------


def run(sizes: Sizes) -> Section:
    load_start = load_average()
    rows, note = evaluation(sizes)
    runs, load_before, load_after = cycles(sizes)

    section = Section("9. Policy evaluation, and the cycle with a policy (SQLite)")
    section.add(
        "`clearance.core.policy.evaluate` on one call, `process-refund` with "
        f"`{json.dumps(CALL_ARGS)}`, one thread. Rules: deny, ask and allow with CEL conditions on "
        "`args`; most name other tools (`delete-*`, `issue-credit`, `export-*`, ...), "
        f"{', '.join(f'{COVERING[n]} of {n}' for n in RULE_COUNTS)} cover the refund tool "
        "(by its tag or a glob). Verdict found early: a deny that holds is the second "
        "rule (the only one at size 1). Worst case: no rule holds, so every glob is "
        "matched and every condition of a rule covering the tool is evaluated. Conditions "
        "compiled before timing; each call timed on its own; "
        f"{note} Load average (1, 5, 15 min) as it began: {load_start}.",
        "",
        *table(
            [
                "rules",
                "case",
                "rules covering the tool",
                "conditions evaluated",
                "verdict",
                "µs/call median",
                "µs/call p95",
                "round medians µs",
                "calls/s",
            ],
            rows,
        ),
        "",
        f"The pause/resume cycle (benchmark 1's, {sizes.cycles} cycles per agent per "
        f"round, {cycle.WARMUP} untimed warm-up cycles, a fresh WAL database each time), "
        f"{sizes.policy_rounds} rounds interleaving the three agents (FULL and NORMAL for "
        "each, the order rotating by round), median (min-max) reported; 'vs no policy' "
        "compares medians (cycles/s); the per-round ratios beside it show the noise. "
        f"Load average before: {load_before}; after: {load_after} (2 shared CPUs: other "
        "jobs may run at the same time).",
        "",
    )
    cycle_rows = []
    for synchronous in cycle.SYNCS:
        base = runs[(NONE, synchronous)]
        base_rate = median([r.rate for r in base])
        for name in VARIANTS:
            results = runs[(name, synchronous)]
            rate = median([r.rate for r in results])
            # Per round, the three agents ran side by side: these paired ratios show the noise.
            paired = [results[i].rate / base[i].rate for i in range(len(results))]
            rounds = (
                f"{ratio(median(paired))} ({min(paired):.2f}-{max(paired):.2f}x)"
                if len(paired) > 1
                else "1 round"
            )
            cycle_rows.append(
                [
                    synchronous,
                    name,
                    f"{fmt(rate)} ({fmt(min(r.rate for r in results))}-"
                    f"{fmt(max(r.rate for r in results))})",
                    f"{1e6 / rate:,.0f}",
                    "-" if name == NONE else f"{1e6 / rate - 1e6 / base_rate:+,.0f}",
                    fmt(median([r.commits_per for r in results])),
                    "-" if name == NONE else ratio(rate / base_rate),
                    "-" if name == NONE else rounds,
                ]
            )
            if name == EMPTY:
                section.targets.append(
                    Target(
                        f"9. policy, {synchronous}",
                        "cycle with a policy no rule of which covers the tool >= 0.95x "
                        "without a policy",
                        f"{ratio(rate / base_rate)} ("
                        + (f"per round: median {rounds}" if len(paired) > 1 else rounds)
                        + ")",
                        rate / base_rate >= 0.95,
                    )
                )
    section.add(
        *table(
            [
                "synchronous",
                "agent",
                "cycles/s",
                "µs/cycle",
                "µs/cycle vs no policy",
                "commits/cycle",
                "vs no policy",
                "per-round ratios: median (min-max)",
            ],
            cycle_rows,
        )
    )
    return section
