"""What the core knows of an agent: plain data, enough to decide without user code.

An execution carries its agent's spec so that any process, even one where the
agent is not defined (the CLI, a reviewer's web server), can validate modified
parameters and apply a decision. Handlers and callables stay outside the core.
"""

from __future__ import annotations

from typing import Any

import attrs

from clearance.core.policy import PolicySpec

# The spec's default approval timeout, in milliseconds: 5 minutes.
DEFAULT_TIMEOUT_MS = 300_000

REJECT = "reject"
APPROVE = "approve"
TIMEOUT_ACTIONS = (REJECT, APPROVE)

SEQUENTIAL = "sequential"
PARALLEL = "parallel"
APPROVAL_ORDERS = (SEQUENTIAL, PARALLEL)


@attrs.frozen
class ToolSpec:
    tag: str
    description: str
    input_schema: dict[str, Any]
    gated: bool
    approval_timeout_ms: int
    # Distinct people who must approve a call (an ask rule may ask for more), and the
    # groups of which one approver each must be.
    approvals_required: int = 1
    groups: tuple[str, ...] = ()
    # What a request that nobody answers in time becomes: rejected (the spec's default),
    # or approved, only where the definition says so and one approval suffices.
    timeout_action: str = REJECT
    # How long a request may stay open at most, counting extensions a reviewer grants
    # ("extend"); None: its approval timeout, so it cannot be extended.
    max_timeout_ms: int | None = None
    # A reminder on the request's channels this long before it expires (None: none).
    remind_before_ms: int | None = None
    # Escalation stages, in the order their times come.
    escalation: tuple[Stage, ...] = ()


@attrs.frozen
class BrokerTarget:
    """Where an agent's approval requests are published: a broker the runtime names
    (`Clearance.open(brokers={name: url})`) and the event: a Redis stream key, a
    NATS subject or a RabbitMQ routing key. Decisions come back on
    `<event>.decisions`, refusals of them go out on `<event>.errors`."""

    broker: str
    event: str

    @property
    def decisions(self) -> str:
        return f"{self.event}.decisions"

    @property
    def errors(self) -> str:
        return f"{self.event}.errors"


@attrs.frozen
class Stage:
    """An escalation stage: when `after_ms` have passed since a request opened with no
    decision, it is delivered again on this stage's channels (a webhook URL, a broker
    event) and opened to its reviewers (by name or group), besides everyone granted."""

    after_ms: int
    webhook: str | None = None
    broker: BrokerTarget | None = None
    reviewers: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    def opens_to(self, name: str, groups: tuple[str, ...]) -> bool:
        return name in self.reviewers or any(g in self.groups for g in groups)


@attrs.frozen
class AgentSpec:
    tag: str
    name: str
    product: str
    model: str
    system_prompt: str
    tools: tuple[ToolSpec, ...]
    approval_order: str = SEQUENTIAL
    max_iterations: int = 20
    approval_webhook: str | None = None  # where approval requests are POSTed
    # Signed with the agent's own secret, which only processes hosting it know; else
    # any process with the instance's secret (e.g. `clearance serve`) may deliver.
    own_webhook_secret: bool = False
    approval_broker: BrokerTarget | None = None  # where approval requests are published
    # Rules that allow, ask or deny a call before a person is asked (core.policy).
    policy: PolicySpec | None = None

    def tool(self, tag: str) -> ToolSpec | None:
        for tool in self.tools:
            if tool.tag == tag:
                return tool
        return None

    def tool_names(self) -> str:
        return ", ".join(t.tag for t in self.tools) or "(none)"
