"""The model port on Anthropic's Messages API, through the official `anthropic` SDK.

Transient failures (429, 529 overloaded, other 5xx, timeouts, connection errors)
are retried by the SDK with exponential backoff, `Model(max_retries=...)` times.
What is left after that, and every 4xx, becomes a `ModelCallError` naming the
HTTP status, the API's error type and its message, and fails the execution.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from clearance.core.execution import Usage
from clearance.ports.model import ModelCallError, ModelReply, ModelRequest

if TYPE_CHECKING:
    from anthropic import AsyncAnthropic

    from clearance.definition import Model


class AnthropicModel:
    """`Model(provider="anthropic", ...)`. The client is made on first use (so defining an
    agent needs no key) unless one is injected with `Model(client=AsyncAnthropic(...))`."""

    def __init__(self, options: Model, client: AsyncAnthropic | None = None) -> None:
        self.options = options
        self.name = options.model
        self._client = client if client is not None else options.client
        self._owns_client = self._client is None

    def _get_client(self) -> AsyncAnthropic:
        if self._client is None:
            from anthropic import AsyncAnthropic

            o = self.options
            api_key = o.api_key or os.environ.get("ANTHROPIC_API_KEY")
            if not api_key:
                raise ModelCallError(
                    "no Anthropic API key: set ANTHROPIC_API_KEY or pass "
                    "Model(provider='anthropic', api_key=...)"
                )
            kwargs: dict[str, Any] = {"api_key": api_key, "max_retries": o.max_retries}
            if o.base_url is not None:
                kwargs["base_url"] = o.base_url
            if o.timeout is not None:
                kwargs["timeout"] = o.timeout
            self._client = AsyncAnthropic(**kwargs)
        return self._client

    async def aclose(self) -> None:
        """Close the client this adapter made; an injected one is its owner's to close."""
        if self._owns_client and self._client is not None:
            await self._client.close()
            self._client = None

    def _params(self, request: ModelRequest) -> dict[str, Any]:
        o = self.options
        params: dict[str, Any] = {
            "model": request.model or o.model,
            "max_tokens": o.max_tokens,
            "messages": request.messages,
        }
        if request.system:
            params["system"] = request.system
        if request.tools:
            params["tools"] = request.tools
        # SDK 2.x's create() has no temperature/top_p keywords; the API still takes them.
        sampling = {"temperature": o.temperature, "top_p": o.top_p}
        if any(v is not None for v in sampling.values()):
            params["extra_body"] = {k: v for k, v in sampling.items() if v is not None}
        if o.stop_sequences:
            params["stop_sequences"] = list(o.stop_sequences)
        return params

    async def reply(self, request: ModelRequest) -> ModelReply:
        import anthropic

        try:
            message = await self._get_client().messages.create(**self._params(request))
        except anthropic.APIStatusError as err:
            raise ModelCallError(_describe(err), status=err.status_code) from err
        except anthropic.APIConnectionError as err:
            raise ModelCallError(
                f"could not reach the Anthropic API after {self.options.max_retries} retries: "
                f"{type(err).__name__}: {err}"
            ) from err
        content = [block.model_dump(mode="json", exclude_none=True) for block in message.content]
        usage = Usage(message.usage.input_tokens, message.usage.output_tokens)
        return ModelReply(content=content, stop_reason=str(message.stop_reason), usage=usage)


def _describe(err: Any) -> str:
    """'Anthropic API answered 401 authentication_error: invalid x-api-key'."""
    kind, message = "error", str(err)
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        detail = body.get("error", body)
        if isinstance(detail, dict):
            kind = str(detail.get("type", kind))
            message = str(detail.get("message", message))
    hint = {
        401: " (check ANTHROPIC_API_KEY or Model(api_key=...))",
        403: " (the key may lack access to this model or feature)",
        404: " (check the model name and base_url)",
    }.get(err.status_code, "")
    return f"Anthropic API answered {err.status_code} {kind}: {message}{hint}"
