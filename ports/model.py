"""The model port: one turn of the conversation, in the Anthropic Messages wire format."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import attrs

from clearance.core.errors import ClearanceError
from clearance.core.execution import Usage


@attrs.frozen
class ModelRequest:
    model: str
    system: str
    messages: list[dict[str, Any]]  # Messages API content blocks: text, tool_use, tool_result
    tools: list[dict[str, Any]]  # {name, description, input_schema}
    execution_id: str = ""
    turn: int = 0


@attrs.frozen
class ModelReply:
    content: list[dict[str, Any]]  # text and tool_use blocks
    stop_reason: str = "end_turn"
    usage: Usage = Usage()


class ModelCallError(ClearanceError):
    """A model call that failed for good: the message names the provider's cause
    (HTTP status, error type and message) so whoever reads the failed execution
    knows what to fix. Transient failures are retried by the adapter first."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@runtime_checkable
class ModelPort(Protocol):
    async def reply(self, request: ModelRequest) -> ModelReply: ...
