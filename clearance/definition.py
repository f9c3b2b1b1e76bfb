"""How users define agents: `Tool`, `Model`, `HumanInLoop`, mirroring the spec in Python.

`compile_agent` checks a definition once, at `define()` time, and splits it into
the plain `AgentSpec` the core decides with (stored with every execution) and
the live parts only this process has: handlers, callables and the model port.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs

from clearance.core.agent import (
    APPROVAL_ORDERS,
    APPROVE,
    DEFAULT_TIMEOUT_MS,
    SEQUENTIAL,
    TIMEOUT_ACTIONS,
    AgentSpec,
    BrokerTarget,
    ToolSpec,
)
from clearance.core.agent import Stage as StageSpec
from clearance.core.durations import BadDuration, parse_duration
from clearance.core.errors import DefinitionError
from clearance.core.policy import (
    ASK,
    EFFECTS,
    PolicyError,
    PolicySpec,
    Predicate,
    RuleSpec,
    compile_condition,
    version_of,
)
from clearance.core.quorum import MAX_APPROVALS, MAX_GROUPS
from clearance.core.schema import to_json_schema
from clearance.ports.model import ModelPort
from clearance.ports.tools import Handler

# The longest approval timeout: 366 days. A deadline must be a date (the core adds it to
# the time a request opens), and a human who has not answered in a year will not.
MAX_TIMEOUT_MS = 366 * 24 * 3_600_000
DEFAULT_MAX_ITERATIONS = 20
# What the Anthropic and OpenAI tool APIs accept as a tool name.
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class ClearanceWarning(UserWarning):
    """A definition that works but probably does not do what was meant."""


ConfirmationMessage = str | Callable[[dict[str, Any]], str]
RULE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# An argument a CEL condition names: `args.amount`, `args["amount"]` (string literals
# are blanked out first, so "args.x" inside a string does not count).
_ARG_NAMED = re.compile(
    r"""\bargs\s*(?:\.\s*([A-Za-z_][A-Za-z0-9_]*)|\[\s*(?:"([^"]*)"|'([^']*)')\s*\])"""
)
_CEL_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'""")


def _unknown_arguments(rule: RuleSpec, tools: Sequence[ToolSpec]) -> str | None:
    """Why `rule`'s condition names an argument no tool it covers takes (a typo, which
    would otherwise deny every call at run time), or None."""
    if rule.when is None:
        return None
    covered = [t for t in tools if rule.covers(t.tag)]
    known: set[str] = set()
    for tool in covered:
        properties = tool.input_schema.get("properties")
        if not isinstance(properties, dict):
            return None  # a tool whose parameters are not listed: anything may be there
        known |= set(properties)
    if not covered:
        return None
    blanked = _CEL_STRING.sub(lambda m: m.group(0)[0] * 2, rule.when)
    named = [a or b or c for a, b, c in _ARG_NAMED.findall(blanked)]
    # A string key is read from the source itself: blanking emptied it.
    named += [b or c for _, b, c in _ARG_NAMED.findall(rule.when) if b or c]
    unknown = sorted({n for n in named if n and n not in known})
    if not unknown:
        return None
    return (
        f"policy rule '{rule.id}': its condition names {', '.join('args.' + n for n in unknown)},"
        f" which {', '.join(t.tag for t in covered)} does not take (parameters:"
        f" {', '.join(sorted(known)) or 'none'})"
    )


@attrs.frozen
class Rule:
    """One policy rule: `effect` ("allow", "ask" or "deny") for the tools `tools` names
    (a tag or a glob such as "refund-*", or a list of them), when `when` holds (a CEL
    condition on `args`, `tool` and `agent`, e.g. 'args.amount <= 20.0'), or
    `predicate` (a pure Python function of the arguments, for what CEL cannot say);
    always, with neither. `reason` is what the model (deny), the reviewer (ask) and the
    audit log are told. An ask rule may ask for a quorum: `approvals_required` distinct
    people, one from each of `groups`. Build them with `Rule.allow(...)`,
    `Rule.ask(...)`, `Rule.deny(...)`."""

    effect: str
    tools: str | Sequence[str] = "*"
    when: str | None = None
    predicate: Predicate | None = attrs.field(default=None, eq=False)
    id: str | None = None  # default: "<effect>-<position>"
    reason: str = ""
    approvals_required: int | None = None  # None: the tool's
    groups: Sequence[str] = ()

    @classmethod
    def allow(
        cls,
        tools: str | Sequence[str] = "*",
        *,
        when: str | None = None,
        predicate: Predicate | None = None,
        id: str | None = None,
        reason: str = "",
    ) -> Rule:
        return cls("allow", tools, when, predicate, id, reason)

    @classmethod
    def ask(
        cls,
        tools: str | Sequence[str] = "*",
        *,
        when: str | None = None,
        predicate: Predicate | None = None,
        id: str | None = None,
        reason: str = "",
        approvals_required: int | None = None,
        groups: Sequence[str] = (),
    ) -> Rule:
        return cls("ask", tools, when, predicate, id, reason, approvals_required, groups)

    @classmethod
    def deny(
        cls,
        tools: str | Sequence[str] = "*",
        *,
        when: str | None = None,
        predicate: Predicate | None = None,
        id: str | None = None,
        reason: str = "",
    ) -> Rule:
        return cls("deny", tools, when, predicate, id, reason)


@attrs.frozen
class Policy:
    """An agent's rules, on `HumanInLoop(policy=...)`: any matching deny wins, then ask,
    then allow; a call no rule matches is gated as its tool says. `enforce=False` is
    shadow mode: verdicts are recorded (the audit log's would_allow / would_ask /
    would_deny) and nothing else changes."""

    rules: Sequence[Rule] = ()
    enforce: bool = True

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        """The policy in a TOML file (`clearance.policy_file` documents the schema);
        a DefinitionError names the file, line and rule of anything wrong."""
        from clearance.policy_file import load_policy_file

        policy: Policy = load_policy_file(path)
        return policy

    def spec(self) -> PolicySpec:
        """The stored form and version (content hash) of these rules, alone (a tool's
        own rules are added where an agent is defined)."""
        spec, _ = compile_policy(self, (), True)
        empty = PolicySpec((), self.enforce, version_of((), self.enforce))
        return spec if spec is not None else empty


@attrs.frozen
class Tool:
    """A tool the model may call. `parameters` is the spec's mini-schema or a JSON Schema."""

    tag: str
    description: str = ""
    parameters: dict[str, Any] = attrs.field(factory=dict)
    handler: Handler | None = None
    requires_confirmation: bool = False
    confirmation_message: ConfirmationMessage | None = None
    # Milliseconds (as in the spec), a timedelta or "10m"; overrides HumanInLoop's.
    approval_timeout: int | timedelta | str | None = None
    # Rules for this tool alone (their `tools` is this tool), after the agent's rules.
    policy: Sequence[Rule] = ()
    # A quorum: this many distinct people approve each call (an ask rule may ask for
    # more), one of them from each of `groups`; never the one who started the run.
    approvals_required: int = 1
    groups: Sequence[str] = ()
    # "reject" (the spec's): an unanswered request times out and the model is told.
    # "approve": it runs, audited as approved_by_timeout (one approval only).
    timeout_action: str = "reject"
    # The longest a request may stay open with the extensions reviewers grant
    # (signal(..., "extend", until=...)): ms, a timedelta or "2h". None: no extensions.
    max_approval_timeout: int | timedelta | str | None = None
    # A reminder on the request's channels this long before it expires ("5m"); and
    # escalation stages. None / (): HumanInLoop's.
    remind_before: int | timedelta | str | None = None
    escalation: Sequence[Stage] = ()


@attrs.frozen
class Stage:
    """An escalation stage: when `after` ("10m") has passed since a request opened and
    nobody decided it, it is delivered again on `channel` (a webhook URL, or an
    ApprovalBroker) and opened to `reviewers` (names) and members of `groups`, besides
    everyone granted. Stages come in the order of their `after`."""

    after: int | timedelta | str
    channel: str | ApprovalBroker | dict[str, Any] | None = None
    reviewers: Sequence[str] = ()
    groups: Sequence[str] = ()


# An event is a Redis stream key, a NATS subject and a RabbitMQ routing key at once:
# dot-separated tokens of letters, digits, '_', '-' and ':' (no wildcards, no spaces).
EVENT_NAME = re.compile(r"^[A-Za-z0-9_:-]+(\.[A-Za-z0-9_:-]+)*$")
BROKER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@attrs.frozen
class ApprovalBroker:
    """The spec's `approvalBroker: {broker, event}`: publish each approval request on
    the broker named `broker` in `Clearance.open(brokers={...})`, as `event` (the Redis
    stream key, NATS subject or RabbitMQ routing key). Decisions come back on
    `<event>.decisions`; a decision that cannot be applied is answered on
    `<event>.errors`."""

    broker: str
    event: str


@attrs.frozen
class HumanInLoop:
    """The spec's `humanInLoop` block. `approval_timeout` is in milliseconds, as in the
    spec, or any duration: a timedelta, "10m", "2h"."""

    enabled: bool = False
    always_require_approval: Sequence[str] = ()
    approval_timeout: int | timedelta | str = DEFAULT_TIMEOUT_MS
    approval_webhook: str | None = None
    approval_broker: ApprovalBroker | dict[str, Any] | None = None
    # Signs this agent's webhooks instead of the instance's secret ('whsec_…'). Callback
    # tokens always use the instance's secret, so any process sharing it can check them.
    webhook_secret: str | None = attrs.field(default=None, repr=False)
    approval_order: str = SEQUENTIAL
    policy: Policy | Sequence[Rule] | None = None
    # Defaults for every gated tool that does not set its own (see Tool).
    remind_before: int | timedelta | str | None = None
    escalation: Sequence[Stage] = ()


@attrs.frozen
class Model:
    """Which model runs the agent: the spec's `model: {provider, model}`, plus call options."""

    provider: str
    model: str
    api_key: str | None = attrs.field(default=None, repr=False)
    base_url: str | None = None
    temperature: float | None = None
    max_tokens: int = 4096
    top_p: float | None = None
    stop_sequences: Sequence[str] = ()
    timeout: float | None = None  # seconds per model call
    max_retries: int = 4  # for 429 / 529 / 5xx / connection errors, with backoff
    client: Any = attrs.field(default=None, repr=False, eq=False)  # an injected SDK client


@attrs.frozen
class HostedAgent:
    """An agent as this process runs it: the spec, plus what cannot be stored."""

    spec: AgentSpec
    model: ModelPort
    handlers: dict[str, Handler]
    confirmation_messages: dict[str, ConfirmationMessage | None]
    webhook_secret: str | None = None
    predicates: dict[str, Predicate] = attrs.field(factory=dict)  # by rule id

    def reason(self, tool: str, params: dict[str, Any]) -> str:
        message = self.confirmation_messages.get(tool)
        if callable(message):
            return str(message(params))
        return message or f"Calling '{tool}' requires approval"


def _positive_ms(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_TIMEOUT_MS:
        raise DefinitionError(
            f"{what} must be a positive whole number of milliseconds, at most "
            f"{MAX_TIMEOUT_MS} (366 days), e.g. 300000 or '5m' for 5 minutes; got {value!r}"
        )
    return value


GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,63}$")


def _quorum(what: str, approvals: Any, groups: Any) -> tuple[int, tuple[str, ...]]:
    """A quorum as given, checked: 1-10 approvals, up to 10 distinct group names, and no
    more groups than approvals (one person stands for one group)."""
    if (
        isinstance(approvals, bool)
        or not isinstance(approvals, int)
        or not 1 <= approvals <= MAX_APPROVALS
    ):
        raise DefinitionError(
            f"{what}: approvals_required is a whole number from 1 to {MAX_APPROVALS}, got"
            f" {approvals!r}"
        )
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise DefinitionError(
            f"{what}: groups is a list of reviewer group names, e.g. ['finance', 'risk'],"
            f" got {groups!r}"
        )
    names = tuple(groups)
    bad = [g for g in names if not isinstance(g, str) or not GROUP_NAME.match(g)]
    if bad or len(set(names)) != len(names) or len(names) > MAX_GROUPS:
        raise DefinitionError(
            f"{what}: groups are up to {MAX_GROUPS} distinct names of 1-64 letters, digits,"
            f" '.', '_', '@', ':' or '-'; got {list(names)!r}"
        )
    if len(names) > approvals:
        raise DefinitionError(
            f"{what}: {len(names)} groups need at least {len(names)} approvals (one person"
            f" stands for one group); approvals_required is {approvals}"
        )
    return approvals, names


def _broker_target(given: ApprovalBroker | dict[str, Any] | None) -> BrokerTarget | None:
    if given is None:
        return None
    example = "ApprovalBroker(broker='approval-events', event='approval-requested')"
    if isinstance(given, dict):
        if set(given) != {"broker", "event"}:
            raise DefinitionError(
                f"approval_broker takes the keys 'broker' and 'event', got {sorted(given)};"
                f" e.g. {example}"
            )
        given = ApprovalBroker(broker=given["broker"], event=given["event"])
    if not isinstance(given, ApprovalBroker):
        raise DefinitionError(
            f"approval_broker must be an ApprovalBroker or a dict, got {type(given).__name__};"
            f" e.g. {example}"
        )
    if not isinstance(given.broker, str) or not BROKER_NAME.match(given.broker):
        raise DefinitionError(
            f"approval_broker's broker must be the name of a broker given to"
            f" Clearance.open(brokers=...) (1-64 letters, digits, '.', '_', '-'), got"
            f" {given.broker!r}"
        )
    if (
        not isinstance(given.event, str)
        or not EVENT_NAME.match(given.event)
        or len(given.event) > 200
        or given.event.endswith((".decisions", ".errors"))
    ):
        raise DefinitionError(
            "approval_broker's event is the stream key, subject or routing key requests are"
            " published as: dot-separated words of letters, digits, '_', '-', ':' (at most"
            " 200 characters, not ending in .decisions or .errors, which Clearance uses),"
            f" e.g. 'approval-requested'; got {given.event!r}"
        )
    return BrokerTarget(given.broker, given.event)


def _patterns(rule_id: str, tools: Any) -> tuple[str, ...]:
    patterns = (tools,) if isinstance(tools, str) else tools
    if (
        not isinstance(patterns, Sequence)
        or not patterns
        or not all(isinstance(p, str) and p.strip() for p in patterns)
    ):
        raise DefinitionError(
            f"policy rule '{rule_id}': tools is a tool tag or glob, or a list of them"
            f" (e.g. 'process-refund', 'refund-*', ['a', 'b']), got {tools!r}"
        )
    return tuple(patterns)


def _rule(rule: Any, rule_id: str, tools: tuple[str, ...] | None) -> RuleSpec:
    """The stored form of one rule; `tools` overrides its tools (a tool's own rules)."""
    if not isinstance(rule, Rule):
        raise DefinitionError(
            f"a policy holds Rule(...) objects (Rule.allow/ask/deny), got {type(rule).__name__}"
        )
    if rule.effect not in EFFECTS:
        raise DefinitionError(
            f"policy rule '{rule_id}': effect must be one of allow, ask, deny; got {rule.effect!r}"
        )
    if rule.when is not None and rule.predicate is not None:
        raise DefinitionError(
            f"policy rule '{rule_id}': give a CEL condition (when=) or a predicate, not both"
        )
    if rule.when is not None:
        try:
            compile_condition(rule.when)
        except PolicyError as err:
            raise DefinitionError(f"policy rule '{rule_id}': {err}") from None
    if rule.predicate is not None and not callable(rule.predicate):
        raise DefinitionError(
            f"policy rule '{rule_id}': predicate must be a function of the arguments"
        )
    if not isinstance(rule.reason, str):
        raise DefinitionError(f"policy rule '{rule_id}': reason must be a string")
    predicate = rule.predicate
    approvals, groups = rule.approvals_required, tuple(rule.groups)
    if approvals is not None or groups:
        if rule.effect != ASK:
            raise DefinitionError(
                f"policy rule '{rule_id}': approvals_required and groups belong to an ask"
                f" rule (a {rule.effect} rule asks nobody)"
            )
        approvals, groups = _quorum(
            f"policy rule '{rule_id}'",
            approvals if approvals is not None else len(groups) or 1,
            groups,
        )
        if rule.approvals_required is None:
            approvals = None  # the tool's count, these groups
    return RuleSpec(
        id=rule_id,
        effect=rule.effect,
        tools=tools if tools is not None else _patterns(rule_id, rule.tools),
        when=rule.when,
        predicate=(
            f"{getattr(predicate, '__module__', '?')}.{getattr(predicate, '__qualname__', '?')}"
            if predicate is not None
            else None
        ),
        reason=rule.reason,
        approvals_required=approvals,
        groups=groups,
    )


def compile_policy(
    given: Policy | Sequence[Rule] | None, tools: Sequence[Tool], enabled: bool
) -> tuple[PolicySpec | None, dict[str, Predicate]]:
    """The agent's stored policy (its rules, then each tool's own) and its predicates."""
    if given is None:
        policy = Policy()
    elif isinstance(given, Policy):
        policy = given
    elif isinstance(given, Sequence) and not isinstance(given, str):
        policy = Policy(tuple(given))
    else:
        raise DefinitionError(
            f"policy must be a Policy or a list of Rule, got {type(given).__name__}"
        )
    placed: list[tuple[Rule, tuple[str, ...] | None]] = [(r, None) for r in policy.rules]
    for tool in tools:
        if isinstance(tool, Tool):
            placed += [(r, (tool.tag,)) for r in tool.policy]
    if not placed:
        return None, {}
    specs: list[RuleSpec] = []
    predicates: dict[str, Predicate] = {}
    for position, (rule, only) in enumerate(placed, 1):
        rule_id = getattr(rule, "id", None) or f"{getattr(rule, 'effect', 'rule')}-{position}"
        if not isinstance(rule_id, str) or not RULE_ID.match(rule_id):
            raise DefinitionError(
                f"policy rule id {rule_id!r}: use 1-64 letters, digits, '_', '.', ':' or '-'"
            )
        if any(s.id == rule_id for s in specs):
            raise DefinitionError(f"policy rule id '{rule_id}' is used twice")
        spec = _rule(rule, rule_id, only)
        if spec.effect == ASK and not enabled:
            raise DefinitionError(
                f"policy rule '{rule_id}' asks for approval but human_in_loop is not enabled,"
                " so nobody would be asked; pass HumanInLoop(enabled=True, ...)"
            )
        specs.append(spec)
        if rule.predicate is not None:
            predicates[rule_id] = rule.predicate
    if not isinstance(policy.enforce, bool):
        raise DefinitionError(f"Policy.enforce must be True or False, got {policy.enforce!r}")
    rules = tuple(specs)
    return PolicySpec(rules, policy.enforce, version_of(rules, policy.enforce)), predicates


def _ms(what: str, value: int | timedelta | str) -> int:
    if isinstance(value, int):  # already milliseconds, as the spec gives them
        return _positive_ms(what, value)
    try:
        length = parse_duration(value, what)
    except BadDuration as err:
        raise DefinitionError(str(err)) from None
    return _positive_ms(what, int(length.total_seconds() * 1000))


def _stages(what: str, given: Any, longest_ms: int) -> tuple[StageSpec, ...]:
    if isinstance(given, str) or not isinstance(given, Sequence):
        raise DefinitionError(f"{what}: escalation is a list of Stage(after=..., ...)")
    stages: list[StageSpec] = []
    for n, stage in enumerate(given, 1):
        where = f"{what} escalation stage {n}"
        if not isinstance(stage, Stage):
            raise DefinitionError(f"{where}: use Stage(after='10m', channel=..., reviewers=...)")
        after = _ms(f"{where} after", stage.after)
        if stages and after <= stages[-1].after_ms:
            raise DefinitionError(f"{where}: stages come in order: its after must be later")
        if after >= longest_ms:
            raise DefinitionError(
                f"{where}: after ({after} ms) is not before the request can expire"
                f" ({longest_ms} ms), so it would never fire"
            )
        webhook, broker = None, None
        if isinstance(stage.channel, str):
            if not stage.channel.startswith(("http://", "https://")):
                raise DefinitionError(
                    f"{where}: channel is a webhook URL (http(s)://...) or an ApprovalBroker,"
                    f" got {stage.channel!r}"
                )
            webhook = stage.channel
        elif stage.channel is not None:
            broker = _broker_target(stage.channel)
        reviewers = tuple(stage.reviewers)
        if isinstance(stage.reviewers, str) or not all(isinstance(r, str) for r in reviewers):
            raise DefinitionError(f"{where}: reviewers is a list of reviewer names")
        _, groups = _quorum(where, max(1, len(tuple(stage.groups))), stage.groups)
        if not (webhook or broker or reviewers or groups):
            raise DefinitionError(
                f"{where}: give it a channel to deliver on, or reviewers or groups to open"
                " the request to"
            )
        stages.append(StageSpec(after, webhook, broker, reviewers, groups))
    return tuple(stages)


def _approval_rules(tool: Tool, timeout_ms: int, hitl: HumanInLoop) -> dict[str, Any]:
    """A tool's quorum, timeout action, longest deadline, reminder and escalation,
    checked (defaults left out)."""
    enabled = hitl.enabled
    what = f"tool '{tool.tag}'"
    approvals, groups = _quorum(what, tool.approvals_required, tool.groups)
    rules: dict[str, Any] = {}
    if (approvals, groups) != (1, ()):
        if not enabled:
            raise DefinitionError(
                f"{what} asks for {approvals} approvals but human_in_loop is not enabled, so"
                " nobody would be asked; pass HumanInLoop(enabled=True, ...)"
            )
        rules.update(approvals_required=approvals, groups=groups)
    if tool.timeout_action not in TIMEOUT_ACTIONS:
        raise DefinitionError(
            f"{what}: timeout_action is 'reject' (the default) or 'approve', got"
            f" {tool.timeout_action!r}"
        )
    if tool.timeout_action == APPROVE:
        if (approvals, groups) != (1, ()):
            raise DefinitionError(
                f"{what}: timeout_action='approve' with a quorum of {approvals}: approval by"
                " timeout never stands for more than one person; drop one or the other"
            )
        rules["timeout_action"] = APPROVE
    if tool.max_approval_timeout is not None:
        try:
            longest = parse_duration(tool.max_approval_timeout, f"{what} max_approval_timeout")
        except BadDuration as err:
            raise DefinitionError(str(err)) from None
        longest_ms = _positive_ms(
            f"{what} max_approval_timeout", int(longest.total_seconds() * 1000)
        )
        if longest_ms < timeout_ms:
            raise DefinitionError(
                f"{what}: max_approval_timeout ({longest_ms} ms) is shorter than its"
                f" approval_timeout ({timeout_ms} ms); it is the longest a request may stay"
                " open, extensions included"
            )
        rules["max_timeout_ms"] = longest_ms
    longest_ms = rules.get("max_timeout_ms", timeout_ms)
    remind = tool.remind_before if tool.remind_before is not None else hitl.remind_before
    if remind is not None:
        rules["remind_before_ms"] = _ms(f"{what} remind_before", remind)
        if rules["remind_before_ms"] >= timeout_ms:
            raise DefinitionError(
                f"{what}: remind_before ({rules['remind_before_ms']} ms) must be shorter than"
                f" its approval_timeout ({timeout_ms} ms), or the reminder would come first"
            )
    stages = _stages(what, tool.escalation or hitl.escalation, longest_ms)
    if stages:
        rules["escalation"] = stages
    return rules


def compile_agent(
    *,
    tag: str,
    name: str,
    product: str,
    model: ModelPort,
    model_name: str,
    system_prompt: str,
    tools: Sequence[Tool],
    human_in_loop: HumanInLoop,
    max_iterations: int,
) -> HostedAgent:
    if not tag or not isinstance(tag, str):
        raise DefinitionError("an agent needs a non-empty string tag, e.g. 'safe-agent'")
    if (
        isinstance(max_iterations, bool)
        or not isinstance(max_iterations, int)
        or max_iterations < 1
    ):
        raise DefinitionError(f"max_iterations must be a whole number >= 1, got {max_iterations!r}")
    hitl = human_in_loop
    if hitl.approval_order not in APPROVAL_ORDERS:
        raise DefinitionError(
            f"approval_order must be one of {', '.join(APPROVAL_ORDERS)}, got "
            f"{hitl.approval_order!r}"
        )
    broker = _broker_target(hitl.approval_broker)
    webhook = hitl.approval_webhook
    if webhook is not None and not (
        isinstance(webhook, str) and webhook.startswith(("http://", "https://"))
    ):
        raise DefinitionError(
            f"approval_webhook must be an http(s) URL, e.g. 'https://your-app.com/api/approvals', "
            f"got {webhook!r}"
        )
    default_timeout = _ms("HumanInLoop.approval_timeout", hitl.approval_timeout)
    if isinstance(hitl.always_require_approval, str):
        raise DefinitionError("always_require_approval must be a list of tool tags, not a string")
    if hitl.always_require_approval and not hitl.enabled:
        # As with requires_confirmation: a safety list that silently gates nothing.
        listed = ", ".join(repr(t) for t in hitl.always_require_approval)
        raise DefinitionError(
            f"always_require_approval names {listed} but human_in_loop is not enabled, so "
            "they would run without approval; pass HumanInLoop(enabled=True, ...) or drop "
            "always_require_approval"
        )
    seen: set[str] = set()
    specs = []
    for tool in tools:
        if not isinstance(tool, Tool):
            raise DefinitionError(f"tools must be Tool(...) objects, got {type(tool).__name__}")
        if not TOOL_NAME.match(tool.tag):
            raise DefinitionError(
                f"tool tag {tool.tag!r} is not a valid tool name: use 1-64 letters, digits, "
                "'_' or '-'"
            )
        if tool.tag in seen:
            raise DefinitionError(f"tool tag '{tool.tag}' is defined twice")
        seen.add(tool.tag)
        if not callable(tool.handler):
            raise DefinitionError(f"tool '{tool.tag}' needs a handler: (ctx, params) -> result")
        if tool.requires_confirmation and not hitl.enabled:
            # A safety marker that silently does nothing is the worst outcome here.
            raise DefinitionError(
                f"tool '{tool.tag}' has requires_confirmation=True but human_in_loop is not "
                "enabled, so it would run without approval; pass "
                "human_in_loop=HumanInLoop(enabled=True) or drop requires_confirmation"
            )
        timeout = (
            default_timeout
            if tool.approval_timeout is None
            else _ms(f"tool '{tool.tag}' approval_timeout", tool.approval_timeout)
        )
        gated = hitl.enabled and (
            tool.requires_confirmation or tool.tag in hitl.always_require_approval
        )
        specs.append(
            ToolSpec(
                tag=tool.tag,
                description=tool.description,
                input_schema=to_json_schema(tool.tag, tool.parameters),
                gated=gated,
                approval_timeout_ms=timeout,
                **_approval_rules(tool, timeout, hitl),
            )
        )
    unknown = [t for t in hitl.always_require_approval if t not in seen]
    if unknown:
        warnings.warn(
            f"agent '{tag}': always_require_approval names tools it does not define: "
            f"{', '.join(unknown)} (defined: {', '.join(sorted(seen)) or 'none'})",
            ClearanceWarning,
            stacklevel=3,
        )
    policy, predicates = compile_policy(hitl.policy, tools, hitl.enabled)
    if policy is not None:
        defined = [s.tag for s in specs]
        for rule in policy.rules:
            problem = _unknown_arguments(rule, specs)
            if problem is not None:
                raise DefinitionError(problem)
            if not any(rule.covers(t) for t in defined):
                warnings.warn(
                    f"agent '{tag}': policy rule '{rule.id}' names tools it does not define:"
                    f" {', '.join(rule.tools)} (defined: {', '.join(defined) or 'none'})",
                    ClearanceWarning,
                    stacklevel=3,
                )
    spec = AgentSpec(
        tag=tag,
        name=name or tag,
        product=product,
        model=model_name,
        system_prompt=system_prompt,
        tools=tuple(specs),
        approval_order=hitl.approval_order,
        max_iterations=max_iterations,
        approval_webhook=webhook,
        own_webhook_secret=hitl.webhook_secret is not None,
        approval_broker=broker,
        policy=policy,
    )
    return HostedAgent(
        spec=spec,
        model=model,
        handlers={t.tag: t.handler for t in tools if t.handler is not None},
        confirmation_messages={t.tag: t.confirmation_message for t in tools},
        webhook_secret=hitl.webhook_secret,
        predicates=predicates,
    )
