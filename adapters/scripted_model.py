"""A model that plays a script: for tests, the demo and benchmarks.

The turn to play is the number of assistant messages already in the request,
so one script serves any number of executions and picks up where an execution
left off after a restart.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from clearance.core.errors import ClearanceError
from clearance.ports.model import ModelReply, ModelRequest

Block = dict[str, Any]
Script = Callable[[ModelRequest], Sequence[Block] | Awaitable[Sequence[Block]]]


def text(value: str) -> Block:
    return {"type": "text", "text": value}


def tool_use(tag: str, params: dict[str, Any] | None = None, *, id: str | None = None) -> Block:
    block: Block = {"type": "tool_use", "name": tag, "input": dict(params or {})}
    if id is not None:
        block["id"] = id
    return block


class ScriptedModel:
    def __init__(self, script: Sequence[Sequence[Block]] | Script) -> None:
        self._script = script
        self.requests: list[ModelRequest] = []

    async def reply(self, request: ModelRequest) -> ModelReply:
        self.requests.append(request)
        turn = sum(1 for m in request.messages if m["role"] == "assistant")
        if callable(self._script):
            blocks = self._script(request)
            if inspect.isawaitable(blocks):
                blocks = await blocks
        else:
            if turn >= len(self._script):
                raise ClearanceError(
                    f"ScriptedModel has no turn {turn + 1}: the script has {len(self._script)}"
                )
            blocks = self._script[turn]
        content = []
        for i, block in enumerate(blocks):
            block = dict(block)
            if block.get("type") == "tool_use" and "id" not in block:
                block["id"] = f"toolu_{turn + 1:02d}_{i:02d}"
            content.append(block)
        uses_tools = any(b.get("type") == "tool_use" for b in content)
        return ModelReply(content=content, stop_reason="tool_use" if uses_tools else "end_turn")
