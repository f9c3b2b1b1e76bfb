"""The model port on Anthropic's Messages API, through the official `anthropic` SDK."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clearance.core.execution import Usage
from clearance.ports.model import ModelReply, ModelRequest

if TYPE_CHECKING:
    from anthropic import AsyncAnthropic

    from clearance.definition import Model


class AnthropicModel:
    """`Model(provider="anthropic", ...)`. The client is made on first use (so defining an
    agent needs no key) unless one is injected, e.g. pointed at a test server."""

    def __init__(self, options: Model, client: AsyncAnthropic | None = None) -> None:
        self.options = options
        self.name = options.model
        self._client = client

    def _get_client(self) -> AsyncAnthropic:
        if self._client is None:
            from anthropic import AsyncAnthropic

            kwargs: dict[str, Any] = {}
            if self.options.api_key is not None:
                kwargs["api_key"] = self.options.api_key
            if self.options.base_url is not None:
                kwargs["base_url"] = self.options.base_url
            if self.options.timeout is not None:
                kwargs["timeout"] = self.options.timeout
            self._client = AsyncAnthropic(**kwargs)
        return self._client

    async def reply(self, request: ModelRequest) -> ModelReply:
        o = self.options
        kwargs: dict[str, Any] = {
            "model": request.model or o.model,
            "max_tokens": o.max_tokens,
            "messages": request.messages,
        }
        if request.system:
            kwargs["system"] = request.system
        if request.tools:
            kwargs["tools"] = request.tools
        for key in ("temperature", "top_p"):
            if getattr(o, key) is not None:
                kwargs[key] = getattr(o, key)
        if o.stop_sequences:
            kwargs["stop_sequences"] = list(o.stop_sequences)
        message = await self._get_client().messages.create(**kwargs)
        content = [block.model_dump(exclude_none=True) for block in message.content]
        usage = Usage(message.usage.input_tokens, message.usage.output_tokens)
        return ModelReply(content=content, stop_reason=str(message.stop_reason), usage=usage)
