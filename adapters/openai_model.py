"""The model port on the Chat Completions API, through the official `openai` SDK.

One adapter serves OpenAI itself and every server that speaks the same wire
format (vLLM, Ollama, LiteLLM proxies, llama.cpp, ...):
`Model(provider="openai", model=..., base_url="http://host:port/v1")`.

The conversation arrives in the Anthropic Messages format the core keeps, and
goes out translated:

    user text                    -> {"role": "user", "content": text}
    assistant text + tool_use    -> {"role": "assistant", "content": text | None,
                                     "tool_calls": [{id, type: "function",
                                                     function: {name, arguments: JSON}}]}
    user tool_result blocks      -> one {"role": "tool", "tool_call_id", "content"} each,
                                    in order, right after that assistant message

Chat Completions has no `is_error`; an error result's content is already a JSON
payload that says so ({"error": "approval_rejected", ...}), and goes as is.

The reply comes back as text and `tool_use` blocks. A tool call is never
dropped (every tool_use needs a tool_result next turn): when its `arguments`
are not a JSON object, the block's `input` is the raw text, which no tool's
object schema accepts, so the core answers it with an `invalid_parameters`
error result and the model can try again; nothing is asked of a human.

Output length is sent as `max_completion_tokens` to OpenAI's own API (its
reasoning models refuse `max_tokens`) and as `max_tokens` everywhere else
(what every compatible server understands).

Transient failures (408, 409, 429, 5xx, timeouts, connection errors) are
retried by the SDK with exponential backoff, `Model(max_retries=...)` times,
sooner when the server sends `retry-after-ms` / `retry-after`. What is left
after that, and every other 4xx, becomes a `ModelCallError` naming the HTTP
status, the API's error type or code and its message, and fails the execution.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from clearance.core.execution import Usage
from clearance.ports.model import ModelCallError, ModelReply, ModelRequest

if TYPE_CHECKING:
    from types import ModuleType

    from openai import AsyncOpenAI
    from openai.types.chat import ChatCompletion

    from clearance.definition import Model

# Sent as the key to servers at a base_url that need none (vLLM, Ollama, a local proxy):
# the SDK refuses to send a request without one.
NO_KEY = "not-needed"

# What the API accepts as a function name, in tools and in an assistant's tool_calls.
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

# Where `max_completion_tokens` is the name for the output limit; elsewhere `max_tokens`.
OPENAI_HOSTS = frozenset({"api.openai.com"})

STOP_REASONS = {
    "stop": "end_turn",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "length": "max_tokens",
    "content_filter": "refusal",
}


def _sdk() -> ModuleType:
    try:
        import openai
    except ImportError as err:
        raise ModelCallError(
            "Model(provider='openai') needs the openai package: pip install 'clearance[openai]'"
        ) from err
    return openai


class OpenAIModel:
    """`Model(provider="openai", ...)`. The client is made on first use (so defining an
    agent needs no key) unless one is injected with `Model(client=AsyncOpenAI(...))`;
    an injected client keeps its own base_url, key, timeout and retries."""

    def __init__(self, options: Model, client: AsyncOpenAI | None = None) -> None:
        _sdk()  # fail at define() time, not at the first model call
        self.options = options
        self.name = options.model
        self._client = client if client is not None else options.client
        self._owns_client = False

    def _get_client(self) -> AsyncOpenAI:
        if self._client is None:
            from openai import AsyncOpenAI

            o = self.options
            base_url = o.base_url or os.environ.get("OPENAI_BASE_URL") or None
            api_key = o.api_key or os.environ.get("OPENAI_API_KEY")
            if not api_key:
                if base_url is None:
                    raise ModelCallError(
                        "no OpenAI API key: set OPENAI_API_KEY or pass "
                        "Model(provider='openai', api_key=...); for a local server without "
                        "auth (vLLM, Ollama) pass its base_url, e.g. "
                        "Model(provider='openai', base_url='http://localhost:11434/v1')"
                    )
                api_key = NO_KEY
            kwargs: dict[str, Any] = {"api_key": api_key, "max_retries": o.max_retries}
            if base_url is not None:
                kwargs["base_url"] = base_url
            if o.timeout is not None:
                kwargs["timeout"] = o.timeout
            self._client = AsyncOpenAI(**kwargs)
            self._owns_client = True
        return self._client

    async def aclose(self) -> None:
        """Close the client this adapter made (its pooled connections); an injected
        client belongs to whoever made it and stays open."""
        if self._owns_client and self._client is not None:
            client, self._client, self._owns_client = self._client, None, False
            await client.close()

    def _params(self, request: ModelRequest, client: AsyncOpenAI) -> dict[str, Any]:
        o = self.options
        params: dict[str, Any] = {
            "model": request.model or o.model,
            "messages": to_chat_messages(request.system, request.messages),
            token_limit_name(str(client.base_url)): o.max_tokens,
        }
        if request.tools:
            params["tools"] = to_chat_tools(request.tools)
        if o.temperature is not None:
            params["temperature"] = o.temperature
        if o.top_p is not None:
            params["top_p"] = o.top_p
        if o.stop_sequences:
            params["stop"] = list(o.stop_sequences)
        return params

    async def reply(self, request: ModelRequest) -> ModelReply:
        openai = _sdk()
        client = self._get_client()
        params = self._params(request, client)
        try:
            completion = await client.chat.completions.create(**params)
        except openai.APIStatusError as err:
            raise ModelCallError(_describe(err), status=err.status_code) from err
        except openai.APIConnectionError as err:
            raise ModelCallError(
                f"could not reach the OpenAI-compatible API at {client.base_url} after "
                f"{client.max_retries} retries: {type(err).__name__}: {err}"
            ) from err
        return from_chat_completion(completion, turn=request.turn)


def token_limit_name(base_url: str) -> str:
    """`max_completion_tokens` for OpenAI's own API, `max_tokens` for compatible servers."""
    host = (urlsplit(base_url).hostname or "").lower()
    return "max_completion_tokens" if host in OPENAI_HOSTS else "max_tokens"


# -- Anthropic Messages format -> Chat Completions ------------------------------------


def to_chat_tools(tools: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": tool["name"],
                "description": tool.get("description", ""),
                "parameters": tool.get("input_schema") or {"type": "object", "properties": {}},
            },
        }
        for tool in tools
    ]


def to_chat_messages(system: str, messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role == "user":
            out.extend(_user(content))
        elif role == "assistant":
            out.append(_assistant(content))
        else:
            raise ModelCallError(f"cannot send a message with role {role!r} to a chat model")
    return out


def _user(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tool_messages: list[dict[str, Any]] = []
    texts: list[str] = []
    for block in _blocks(content):
        kind = block.get("type")
        if kind == "tool_result":
            tool_messages.append(
                {
                    "role": "tool",
                    "tool_call_id": str(block["tool_use_id"]),
                    "content": _result_text(block.get("content")),
                }
            )
        elif kind == "text":
            texts.append(str(block.get("text", "")))
        else:
            raise ModelCallError(f"cannot send a user content block of type {kind!r}")
    # Tool messages must directly follow the assistant message that made the calls.
    if texts:
        tool_messages.append({"role": "user", "content": "\n".join(texts)})
    return tool_messages


def _assistant(content: Any) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in _blocks(content):
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            calls.append(
                {
                    "id": str(block["id"]),
                    "type": "function",
                    "function": {
                        "name": _function_name(str(block.get("name", ""))),
                        "arguments": _arguments(block.get("input")),
                    },
                }
            )
        else:
            raise ModelCallError(f"cannot send an assistant content block of type {kind!r}")
    text = "".join(texts)
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    elif not text:
        message["content"] = ""  # an assistant message needs content or tool_calls
    return message


def _function_name(name: str) -> str:
    """A name the API accepts back. A model may call a tool that does not exist under a
    name the API would refuse ("functions.get-order"); the core already answered that
    call with `unknown_tool`, and the conversation must stay sendable."""
    if FUNCTION_NAME.match(name):
        return name
    return re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:64] or "_"


def _arguments(params: Any) -> str:
    if isinstance(params, dict):
        return json.dumps(params)
    # Arguments we could not read as an object went back to the model as an error; keep
    # the call readable JSON for servers that parse it (vLLM's chat templates do).
    return json.dumps({"_unparseable_arguments": params})


def _result_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for block in _blocks(content):
        if block.get("type") != "text":
            raise ModelCallError(
                f"cannot send a tool_result content block of type {block.get('type')!r}"
            )
        parts.append(str(block.get("text", "")))
    return "\n".join(parts)


def _blocks(content: Any) -> list[dict[str, Any]]:
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise ModelCallError(f"message content must be a string or content blocks: {content!r}")
    return content


# -- Chat Completions -> Anthropic Messages format ------------------------------------


def from_chat_completion(completion: ChatCompletion, *, turn: int = 0) -> ModelReply:
    if not completion.choices:
        raise ModelCallError(f"the model's reply {completion.id!r} has no choices")
    choice = completion.choices[0]
    message = choice.message
    content: list[dict[str, Any]] = []
    if message.content:
        content.append({"type": "text", "text": message.content})
    elif message.refusal:
        content.append({"type": "text", "text": message.refusal})
    seen: set[str] = set()
    for i, call in enumerate(message.tool_calls or ()):
        name, arguments = _call_parts(call)
        call_id = str(getattr(call, "id", "") or "")
        if not call_id or call_id in seen:
            # Some servers omit or repeat ids; every tool_use needs its own.
            call_id = f"call_clearance_{turn}_{i}"
        seen.add(call_id)
        content.append(
            {"type": "tool_use", "id": call_id, "name": name, "input": _input(arguments)}
        )
    stop_reason = STOP_REASONS.get(str(choice.finish_reason), "end_turn")
    if message.tool_calls and stop_reason == "end_turn":
        stop_reason = "tool_use"  # Ollama says "stop" with tool calls
    elif message.refusal and not message.content and not message.tool_calls:
        stop_reason = "refusal"
    usage = completion.usage
    return ModelReply(
        content=content,
        stop_reason=stop_reason,
        usage=Usage(usage.prompt_tokens or 0, usage.completion_tokens or 0) if usage else Usage(),
    )


def _call_parts(call: Any) -> tuple[str, Any]:
    function = getattr(call, "function", None)
    if function is not None:
        return str(function.name), function.arguments
    custom = getattr(call, "custom", None)  # a free-form tool call: its input is raw text
    if custom is not None:
        return str(custom.name), custom.input
    return "", None


def _input(arguments: Any) -> Any:
    """The tool_use input: the arguments' JSON object, or else the raw arguments, which no
    object schema accepts, so the core tells the model instead of dropping the call."""
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}  # a call of a tool without parameters
    if not isinstance(arguments, str):
        return json.dumps(arguments)
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return arguments
    return parsed if isinstance(parsed, dict) else arguments


def _describe(err: Any) -> str:
    """'OpenAI-compatible API answered 401 invalid_request_error (invalid_api_key): ...'."""
    kind, message = "error", str(getattr(err, "message", "") or err)
    body = getattr(err, "body", None)  # the SDK hands over the "error" object itself
    if isinstance(body, dict):
        detail = body.get("error", body)
        if isinstance(detail, dict):
            kind = str(detail.get("type") or kind)
            if detail.get("code"):
                kind += f" ({detail['code']})"
            message = str(detail.get("message") or message)
        elif isinstance(detail, str):
            message = detail
    hint = {
        401: " (check OPENAI_API_KEY or Model(api_key=...))",
        403: " (the key may lack access to this model, project or region)",
        404: " (check the model name and base_url, which usually ends in /v1)",
    }.get(err.status_code, "")
    return f"OpenAI-compatible API answered {err.status_code} {kind}: {message}{hint}"
