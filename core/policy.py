"""Policies: rules that allow, ask or deny a tool call before a person is asked.

A policy is plain data stored with the agent's spec, so any process (the CLI, a
reviewer's server) can evaluate its CEL rules; a rule may name a Python predicate
instead, which only a process hosting the agent has. `evaluate` is pure: the engine
calls it when a call is proposed (its verdict travels in the model reply's ticket) and
when a reviewer edits one (in the `Approved` event), and `decide()` reads the verdict
from the event. Replay never evaluates again, so neither a new CEL library nor a
changed policy can change what already happened.

Precedence: any matching `deny` wins, then `ask`, then `allow`; no match leaves the
tool as its definition gates it. A condition that cannot be evaluated (an error, a
missing argument, a result that is not a boolean) denies the call and names its rule:
a policy fails closed.

Conditions are CEL (Common Expression Language, as in Kubernetes admission policies
and Google IAM conditions), run by Google's cel-cpp through `cel-expr-python`: it
type-checks an expression against the declared variables when the policy is
defined (so a typo is a definition error, not a denial at 3 a.m.), bounds loops
(comprehensions stop at 10,000 iterations), and follows the CEL spec on int/double
comparison. Variables: `args` (the call's arguments, defaults filled in), `tool`
and `agent` (their tags).
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import hashlib
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import attrs
from cel_expr_python import cel

from clearance.core.json_text import dumps

DENY = "deny"
ASK = "ask"
ALLOW = "allow"
EFFECTS = (DENY, ASK, ALLOW)  # in order of precedence
NO_MATCH = "none"  # no rule matched: the tool's own gating applies

# A predicate: a pure function of the call's arguments (and tool and agent tags).
Predicate = Callable[[dict[str, Any]], Any]

_T = cel.Type
_CEL = cel.NewEnv(
    variables={"args": _T.Map(_T.STRING, _T.DYN), "tool": _T.STRING, "agent": _T.STRING}
)
MAX_CONDITION = 4_000  # characters: a condition is a line or two, not a program


class PolicyError(ValueError):
    """A rule that cannot be compiled: what is wrong, with its position."""


class HostRequired(Exception):
    """A matching rule's Python predicate is not here (this process does not host the agent)."""


@attrs.frozen
class RuleSpec:
    id: str
    effect: str  # deny | ask | allow
    tools: tuple[str, ...]  # tool tags or globs ("refund-*", "*")
    when: str | None = None  # a CEL condition; None: always
    # A Python predicate hosted with the agent (found by the rule's id), named for people.
    predicate: str | None = None
    reason: str = ""
    # An ask rule's quorum: None leaves the tool's.
    approvals_required: int | None = None
    groups: tuple[str, ...] = ()

    def covers(self, tool: str) -> bool:
        return any(fnmatch.fnmatchcase(tool, pattern) for pattern in self.tools)


@attrs.frozen(cache_hash=True)
class PolicySpec:
    rules: tuple[RuleSpec, ...]
    # False: shadow mode, verdicts are recorded as what would have happened, and the
    # tools' own gating applies.
    enforce: bool = True
    version: str = ""  # the content hash (`version_of`)


@attrs.frozen
class Verdict:
    """What a policy said about one call. `effect` is deny, ask, allow or none."""

    effect: str
    version: str
    enforced: bool = True
    rule_id: str | None = None
    reason: str | None = None
    # Why a condition could not be evaluated (then effect is deny and rule_id the rule).
    failed: str | None = None
    # The Python predicates' answers, by rule id, in the order they were asked.
    answers: tuple[tuple[str, bool], ...] = ()
    # The quorum the ask rule asks for (None: the tool's).
    approvals_required: int | None = None
    groups: tuple[str, ...] = ()

    @property
    def applied(self) -> str:
        """The effect that governs the call: none in shadow mode."""
        return self.effect if self.enforced else NO_MATCH


EXECUTION = "execution"  # the one scope of a session grant: the rest of one execution


@attrs.frozen
class SessionGrant:
    """A reviewer's "allow this tool (within `when`) for the rest of this execution",
    given with an approval (`remember="execution"`). Later calls it covers run without
    a request, audited as allowed_by_grant; a policy's deny still wins."""

    tool: str
    request_id: str  # the approval it came with
    at: datetime
    by: str | None
    by_kind: str | None
    when: str | None = None  # a CEL bound on the arguments; None: any

    def covers(self, agent: str, tool: str, args: dict[str, Any]) -> bool:
        """Whether a call of `tool` with `args` is within the grant; a bound that
        cannot be evaluated covers nothing (a person is asked, as without it)."""
        if tool != self.tool:
            return False
        if self.when is None:
            return True
        try:
            return condition_holds(self.when, args=args, tool=tool, agent=agent)
        except Exception:
            return False


def version_of(rules: tuple[RuleSpec, ...], enforce: bool) -> str:
    """The policy's content hash: the same rules, in the same order, the same version."""
    # A quorum left at its default is not written, so a policy's version stayed what it
    # was before rules could ask for one.
    body = {
        "enforce": enforce,
        "rules": [attrs.asdict(r, filter=_not_default_quorum) for r in rules],
    }
    return "sha256:" + hashlib.sha256(dumps(body, compact=True).encode()).hexdigest()[:32]


def _not_default_quorum(field: attrs.Attribute[Any], value: Any) -> bool:
    return field.name not in ("approvals_required", "groups") or value != field.default


@functools.lru_cache(maxsize=4096)
def compile_condition(source: str) -> Any:
    """The compiled CEL program for `source` (cached: a policy's rules compile once per
    process). Raises PolicyError for a syntax or type error, or a non-boolean result."""
    if not isinstance(source, str) or not source.strip():
        raise PolicyError("a condition is a non-empty CEL expression, e.g. 'args.amount <= 20.0'")
    if len(source) > MAX_CONDITION:
        raise PolicyError(f"a condition has at most {MAX_CONDITION} characters")
    try:
        program = _CEL.compile(source)
    except RuntimeError as err:
        raise PolicyError(_cel_message(err)) from None
    if program.return_type() != _T.BOOL:
        raise PolicyError(
            f"a condition must be a boolean, this one is {program.return_type().name()}"
            " (compare it: 'args.flag == true', 'args.amount > 0.0')"
        )
    return program


def _cel_message(err: BaseException) -> str:
    """cel-cpp's message on one line: where, and what (its caret drawing dropped)."""
    text = str(err).removeprefix("INVALID_ARGUMENT: ").strip().splitlines()[0]
    return text.replace("ERROR: <input>:", "at ")


def condition_holds(source: str, *, args: dict[str, Any], tool: str, agent: str) -> bool:
    """Whether the CEL condition `source` holds for a call; raises ValueError (what went
    wrong) for one that cannot be evaluated or is not a boolean."""
    value = compile_condition(source).eval(data={"args": args, "tool": tool, "agent": agent})
    if value.type() == _T.ERROR:
        raise ValueError(_cel_message(Exception(value.value())))
    result = value.value()
    if not isinstance(result, bool):
        raise ValueError(f"the condition gave {type(result).__name__}, not a boolean")
    return result


def _holds(rule: RuleSpec, args: dict[str, Any], tool: str, agent: str, asked: Any) -> bool:
    """Whether `rule`'s condition holds; raises for one that cannot be evaluated."""
    if rule.predicate is not None:
        answer = asked(rule)
        if not isinstance(answer, bool):
            raise ValueError(f"predicate {rule.predicate} returned {type(answer).__name__}")
        return answer
    if rule.when is None:
        return True
    return condition_holds(rule.when, args=args, tool=tool, agent=agent)


# Cached: matching every rule's globs on every call cost more than the conditions
# (67 µs of 134 for 100 rules). A PolicySpec caches its hash, so a lookup is cheap.
@functools.lru_cache(maxsize=4096)
def _covering(policy: PolicySpec, tool: str) -> tuple[RuleSpec, ...]:
    """The rules that cover `tool`, in the order they are tried: deny, ask, allow, each
    in the policy's order."""
    return tuple(
        rule
        for effect in EFFECTS
        for rule in policy.rules
        if rule.effect == effect and rule.covers(tool)
    )


def evaluate(
    policy: PolicySpec,
    *,
    agent: str,
    tool: str,
    args: dict[str, Any],
    predicates: Mapping[str, Predicate] | None = None,
) -> Verdict:
    """The verdict of `policy` on a call of `tool` with `args`. `predicates`: the
    hosted agent's Python predicates by rule id; a matching rule whose predicate is
    not among them raises HostRequired (None: none are here)."""
    answers: list[tuple[str, bool]] = []

    def asked(rule: RuleSpec) -> Any:
        predicate = (predicates or {}).get(rule.id)
        if predicate is None:
            raise HostRequired(
                f"rule '{rule.id}' asks the Python predicate {rule.predicate}, which only a"
                " process hosting the agent has"
            )
        # A copy: a predicate that changes what it is given must not change the call.
        answer = predicate(copy.deepcopy(args))
        if isinstance(answer, bool):
            answers.append((rule.id, answer))
        return answer

    def verdict(effect: str, rule: RuleSpec | None, **more: Any) -> Verdict:
        return Verdict(
            effect,
            policy.version,
            policy.enforce,
            rule.id if rule else None,
            more.pop("reason", rule.reason if rule else None),
            answers=tuple(answers),
            **more,
        )

    for rule in _covering(policy, tool):
        try:
            if _holds(rule, args, tool, agent, asked):
                if rule.effect == ASK:
                    return verdict(
                        ASK, rule, approvals_required=rule.approvals_required, groups=rule.groups
                    )
                return verdict(rule.effect, rule)
        except HostRequired:
            raise
        except Exception as err:  # fail closed, whatever the condition did
            why = f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err)
            return verdict(
                DENY,
                rule,
                reason=f"Rule '{rule.id}' could not be evaluated ({why}); denied.",
                failed=why,
            )
    return verdict(NO_MATCH, None)
