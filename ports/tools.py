"""The tools port: what an in-process tool handler is given and must look like."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs


@attrs.frozen
class ToolContext:
    """Passed to every handler. `idempotency_key` is stable for one approval (its request
    id), so a handler that talks to a payment API can pass it along and never pay twice;
    an ungated call's is `<execution id>:<model turn>:<tool_use id>`, one per call."""

    execution_id: str
    agent_tag: str
    product: str
    session_id: str | None
    tool: str
    tool_use_id: str
    idempotency_key: str
    request_id: str | None = None
    approved_by: str | None = None


Handler = Callable[[ToolContext, dict[str, Any]], Any | Awaitable[Any]]
