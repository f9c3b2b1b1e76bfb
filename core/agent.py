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
