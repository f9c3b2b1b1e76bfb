"""A fake Anthropic Messages API: real HTTP, the real wire format, the real request rules.

`FakeAnthropic` is a Starlette app for `POST /v1/messages`. It checks every
request the way the API does (auth and version headers, then the body) and
answers a request that breaks a rule with the API's 400 `invalid_request_error`,
so a client that, say, leaves a `tool_use` without its `tool_result` fails here
just as it would against Anthropic. A request that passes gets the next item of
the script: a reply, an error, or whatever a callable makes of the request.

    fake = FakeAnthropic()
    fake.error(529, "overloaded_error", "Overloaded")
    fake.reply(text("Let me look."), tool_use("get-order", {"orderId": "A1"}))
    fake.reply(text("Done."), usage=(30, 4))
    with fake.serving() as url:
        ...  # point the client at `url`
    fake.requests[-1].body["messages"]  # what was sent; fake.rejections: what broke a rule

Authentication: the key may come as `x-api-key` or as `Authorization: Bearer`;
the `anthropic` SDK 2.x sends the latter, the API takes either.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
from servers import serving
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

Block = dict[str, Any]

TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
TOOL_USE_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}
REQUEST_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "tools",
        "tool_choice",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "stream",
        "metadata",
        "thinking",
        "service_tier",
        "container",
        "output_config",
        "inference_geo",
        "speed",
        "cache_control",
        "diagnostics",
        "mcp_servers",
        "context_management",
    }
)
BLOCK_FIELDS = {
    "text": {"type", "text", "citations", "cache_control"},
    "tool_use": {"type", "id", "name", "input", "cache_control", "caller"},
    "tool_result": {"type", "tool_use_id", "content", "is_error", "cache_control"},
    "image": {"type", "source", "cache_control"},
    "document": {"type", "source", "title", "context", "citations", "cache_control"},
}
USER_BLOCKS = {"text", "tool_result", "image", "document"}
ASSISTANT_BLOCKS = {"text", "tool_use"}


def text(value: str) -> Block:
    return {"type": "text", "text": value}


def tool_use(name: str, input: dict[str, Any] | None = None, *, id: str | None = None) -> Block:
    """A tool_use block; the fake gives it a `toolu_…` id when it has none."""
    block: Block = {"type": "tool_use", "name": name, "input": dict(input or {})}
    if id is not None:
        block["id"] = id
    return block


@attrs.frozen
class Reply:
    content: tuple[Block, ...]
    stop_reason: str | None = None  # None: "tool_use" if any tool_use block, else "end_turn"
    usage: tuple[int, int] = (10, 5)  # input_tokens, output_tokens
    stop_sequence: str | None = None


@attrs.frozen
class Error:
    status: int
    type: str
    message: str
    headers: dict[str, str] = attrs.field(factory=dict)


Responder = Callable[[dict[str, Any]], Reply | Error]


@attrs.frozen
class Recorded:
    """One request as the fake received it, and what it answered."""

    headers: dict[str, str]
    body: Any
    status: int
    answer: dict[str, Any]

    @property
    def tool_results(self) -> list[Block]:
        """The tool_result blocks of the last (user) message."""
        content = self.body["messages"][-1]["content"]
        if isinstance(content, str):
            return []
        return [b for b in content if b.get("type") == "tool_result"]


class InvalidRequest(Exception):
    pass


class FakeAnthropic:
    def __init__(
        self,
        *,
        api_key: str = "test-key",
        retry_after_ms: int | None = 1,
        model: str | None = None,
    ) -> None:
        """`api_key`: the only key accepted (401 otherwise). `retry_after_ms`: sent as the
        `retry-after-ms` header on 429/5xx so the SDK retries at once (`None`: no header).
        `model`: the model name replies carry (default: the one requested)."""
        self.api_key = api_key
        self.retry_after_ms = retry_after_ms
        self.model = model
        self.requests: list[Recorded] = []
        self.rejections: list[str] = []  # messages of the 400s/401s the fake's rules produced
        self.url = ""
        self._script: deque[Reply | Error | Responder] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.app = Starlette(routes=[Route("/v1/messages", self._messages, methods=["POST"])])

    # -- scripting -------------------------------------------------------------------

    def reply(
        self,
        *content: Block,
        stop_reason: str | None = None,
        usage: tuple[int, int] = (10, 5),
        stop_sequence: str | None = None,
    ) -> FakeAnthropic:
        self._script.append(Reply(tuple(content), stop_reason, usage, stop_sequence))
        return self

    def error(
        self,
        status: int,
        type: str,
        message: str,
        *,
        times: int = 1,
        headers: dict[str, str] | None = None,
    ) -> FakeAnthropic:
        if ERROR_STATUS.get(type) != status:
            raise ValueError(
                f"the API answers {type!r} with HTTP {ERROR_STATUS.get(type)}, not {status}"
            )
        for _ in range(times):
            self._script.append(Error(status, type, message, dict(headers or {})))
        return self

    def respond(self, responder: Responder) -> FakeAnthropic:
        """Answer the next request with `responder(request_json)`."""
        self._script.append(responder)
        return self

    @property
    def left(self) -> int:
        """Scripted items not yet used."""
        return len(self._script)

    @contextmanager
    def serving(self) -> Iterator[str]:
        with serving(self.app) as url:
            self.url = url
            yield url

    # -- the endpoint ------------------------------------------------------------------

    async def _messages(self, request: Request) -> JSONResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        raw = await request.body()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        with self._lock:
            status, answer, extra = self._answer(headers, body)
            self.requests.append(Recorded(headers, body, status, answer))
        return JSONResponse(answer, status_code=status, headers={"request-id": _req_id(), **extra})

    def _answer(
        self, headers: dict[str, str], body: Any
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        key = headers.get("x-api-key")
        if key is None and headers.get("authorization", "").startswith("Bearer "):
            key = headers["authorization"].removeprefix("Bearer ")
        if not key:
            return self._rejected(401, "authentication_error", "x-api-key header is required")
        if key != self.api_key:
            return self._rejected(401, "authentication_error", "invalid x-api-key")
        if not headers.get("anthropic-version"):
            return self._rejected(
                400, "invalid_request_error", "anthropic-version: header is required"
            )
        if not isinstance(body, dict):
            return self._rejected(
                400, "invalid_request_error", "There was an issue with your request body: not JSON"
            )
        try:
            check_request(body)
        except InvalidRequest as err:
            return self._rejected(400, "invalid_request_error", str(err))
        if not self._script:
            # Not retried by the SDK (x-should-retry: false), so the test fails fast and says why.
            message = "FakeAnthropic: no scripted response left for this request"
            self.rejections.append(message)
            return 500, _error_body("api_error", message), {"x-should-retry": "false"}
        item = self._script.popleft()
        if not isinstance(item, Reply | Error):
            item = item(body)
        if isinstance(item, Error):
            extra = dict(item.headers)
            if self.retry_after_ms is not None and (item.status == 429 or item.status >= 500):
                extra.setdefault("retry-after-ms", str(self.retry_after_ms))
            return item.status, _error_body(item.type, item.message), extra
        return 200, self._message(body, item), {}

    def _rejected(
        self, status: int, kind: str, message: str
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        self.rejections.append(message)
        return status, _error_body(kind, message), {}

    def _message(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        content = []
        for block in reply.content:
            block = dict(block)
            if block.get("type") == "tool_use" and "id" not in block:
                block["id"] = f"toolu_{next(self._ids):024d}"
            content.append(block)
        uses_tools = any(b.get("type") == "tool_use" for b in content)
        stop_reason = reply.stop_reason or ("tool_use" if uses_tools else "end_turn")
        return {
            "id": f"msg_{next(self._ids):024d}",
            "type": "message",
            "role": "assistant",
            "model": self.model or body["model"],
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": reply.stop_sequence,
            "usage": {"input_tokens": reply.usage[0], "output_tokens": reply.usage[1]},
        }


def _error_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": _req_id()}


_req_ids = itertools.count(1)


def _req_id() -> str:
    return f"req_{next(_req_ids):024d}"


# -- the API's request rules ----------------------------------------------------------


def check_request(body: dict[str, Any]) -> None:
    """Raise `InvalidRequest` with the API's wording for the first rule `body` breaks."""
    for field in body:
        if field not in REQUEST_FIELDS:
            raise InvalidRequest(f"{field}: Extra inputs are not permitted")
    for field in ("model", "max_tokens", "messages"):
        if field not in body:
            raise InvalidRequest(f"{field}: Field required")
    if not isinstance(body["model"], str) or not body["model"]:
        raise InvalidRequest("model: Input should be a valid string")
    max_tokens = body["max_tokens"]
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise InvalidRequest("max_tokens: Input should be a valid integer")
    if max_tokens < 1:
        raise InvalidRequest("max_tokens: Input should be greater than or equal to 1")
    if body.get("stream"):
        raise InvalidRequest("stream: FakeAnthropic does not stream; send stream=false")
    for field in ("temperature", "top_p"):
        if field in body:
            value = body[field]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidRequest(f"{field}: Input should be a valid number")
            if not 0 <= value <= 1:
                raise InvalidRequest(f"{field}: Input should be between 0 and 1")
    if "stop_sequences" in body:
        stops = body["stop_sequences"]
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise InvalidRequest("stop_sequences: Input should be a valid list of strings")
        if any(not s.strip() for s in stops):
            raise InvalidRequest("stop_sequences: each stop sequence must contain non-whitespace")
    _check_system(body.get("system"))
    _check_tools(body.get("tools"))
    _check_messages(body["messages"])


def _check_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise InvalidRequest("system: Input should be a valid string or list of text blocks")
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise InvalidRequest(f"system.{i}: Input should be a text block")
        _check_block(f"system.{i}", block)


def _check_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise InvalidRequest("tools: Input should be a valid list")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools.{i}.custom"
        if not isinstance(tool, dict):
            raise InvalidRequest(f"tools.{i}: Input should be a valid dictionary")
        for field in tool:
            if field not in {"type", "name", "description", "input_schema", "cache_control"}:
                raise InvalidRequest(f"{where}.{field}: Extra inputs are not permitted")
        name = tool.get("name")
        if not isinstance(name, str):
            raise InvalidRequest(f"{where}.name: Field required")
        if not TOOL_NAME.match(name):
            raise InvalidRequest(
                f"{where}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
            )
        if name in names:
            raise InvalidRequest("tools: Tool names must be unique.")
        names.add(name)
        if "description" in tool and not isinstance(tool["description"], str):
            raise InvalidRequest(f"{where}.description: Input should be a valid string")
        schema = tool.get("input_schema")
        if schema is None:
            raise InvalidRequest(f"{where}.input_schema: Field required")
        if not isinstance(schema, dict):
            raise InvalidRequest(f"{where}.input_schema: Input should be a valid dictionary")
        if schema.get("type") != "object":
            raise InvalidRequest(f"{where}.input_schema.type: Input should be 'object'")


def _check_block(where: str, block: Any) -> None:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise InvalidRequest(f"{where}: Input should be a content block with a 'type'")
    kind = block["type"]
    allowed = BLOCK_FIELDS.get(kind)
    if allowed is None:
        raise InvalidRequest(f"{where}.type: Input tag '{kind}' found using 'type' does not match")
    for field in block:
        if field not in allowed:
            raise InvalidRequest(f"{where}.{kind}.{field}: Extra inputs are not permitted")
    if kind == "text":
        if not isinstance(block.get("text"), str):
            raise InvalidRequest(f"{where}.text.text: Field required")
        if not block["text"]:
            raise InvalidRequest("messages: text content blocks must be non-empty")
    elif kind == "tool_use":
        if not isinstance(block.get("id"), str) or not TOOL_USE_ID.match(block["id"]):
            raise InvalidRequest(
                f"{where}.tool_use.id: String should match pattern '^[a-zA-Z0-9_-]+$'"
            )
        if not isinstance(block.get("name"), str) or not block["name"]:
            raise InvalidRequest(f"{where}.tool_use.name: Field required")
        if not isinstance(block.get("input"), dict):
            raise InvalidRequest(f"{where}.tool_use.input: Input should be a valid dictionary")
    elif kind == "tool_result":
        if not isinstance(block.get("tool_use_id"), str):
            raise InvalidRequest(f"{where}.tool_result.tool_use_id: Field required")
        if "is_error" in block and not isinstance(block["is_error"], bool):
            raise InvalidRequest(f"{where}.tool_result.is_error: Input should be a valid boolean")
        content = block.get("content", "")
        if isinstance(content, list):
            for j, inner in enumerate(content):
                inner_where = f"{where}.tool_result.content.{j}"
                if not isinstance(inner, dict) or inner.get("type") not in {"text", "image"}:
                    raise InvalidRequest(f"{inner_where}: Input should be a text or image block")
                _check_block(inner_where, inner)
        elif not isinstance(content, str):
            raise InvalidRequest(
                f"{where}.tool_result.content: Input should be a valid string or list of blocks"
            )


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise InvalidRequest("messages: Input should be a valid list")
    if not messages:
        raise InvalidRequest("messages: at least one message is required")
    seen_ids: set[str] = set()
    open_uses: list[str] = []  # tool_use ids of the previous assistant message
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages.{i}: Input should be a valid dictionary")
        for field in message:
            if field not in {"role", "content"}:
                raise InvalidRequest(f"messages.{i}.{field}: Extra inputs are not permitted")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise InvalidRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if i == 0 and role != "user":
            raise InvalidRequest('messages: first message must use the "user" role')
        if i > 0 and role == messages[i - 1].get("role"):
            raise InvalidRequest(
                'messages: roles must alternate between "user" and "assistant", but found '
                f'multiple "{role}" roles in a row'
            )
        content = message.get("content")
        if "content" not in message:
            raise InvalidRequest(f"messages.{i}.content: Field required")
        last = i == len(messages) - 1
        if (content == "" or content == []) and not (last and role == "assistant"):
            raise InvalidRequest(
                f"messages.{i}: all messages must have non-empty content except for the "
                "optional final assistant message"
            )
        blocks: list[Any]
        if isinstance(content, str):
            blocks = []
        elif isinstance(content, list):
            blocks = content
        else:
            raise InvalidRequest(
                f"messages.{i}.content: Input should be a valid string or list of blocks"
            )
        allowed = USER_BLOCKS if role == "user" else ASSISTANT_BLOCKS
        for j, block in enumerate(blocks):
            _check_block(f"messages.{i}.content.{j}", block)
            if block["type"] not in allowed:
                raise InvalidRequest(
                    f"messages.{i}.content.{j}: `{block['type']}` blocks are not allowed in "
                    f"{role} messages"
                )
        if role == "user":
            _check_results(i, blocks, open_uses)
            open_uses = []
        else:
            open_uses = []
            for j, block in enumerate(blocks):
                if block["type"] != "tool_use":
                    continue
                if block["id"] in seen_ids:
                    raise InvalidRequest(f"messages.{i}.content.{j}: `tool_use` ids must be unique")
                seen_ids.add(block["id"])
                open_uses.append(block["id"])


def _check_results(i: int, blocks: list[Any], open_uses: list[str]) -> None:
    """The user message after an assistant turn with tool_use blocks: one tool_result for
    each, first in the content; and no tool_result for anything else."""
    answered: list[str] = []
    results_over = False
    for j, block in enumerate(blocks):
        if block["type"] != "tool_result":
            results_over = True
            continue
        if results_over:
            raise InvalidRequest(
                f"messages.{i}.content.{j}: tool_result blocks must come first in the user "
                "message content, before any other content"
            )
        tool_use_id = block["tool_use_id"]
        if tool_use_id not in open_uses:
            raise InvalidRequest(
                f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` "
                f"blocks: {tool_use_id}. Each `tool_result` block must have a corresponding "
                "`tool_use` block in the previous message."
            )
        if tool_use_id in answered:
            raise InvalidRequest(
                f"messages.{i}.content.{j}: each tool_use must have a single result. Found "
                f"multiple `tool_result` blocks with id: {tool_use_id}"
            )
        answered.append(tool_use_id)
    missing = [u for u in open_uses if u not in answered]
    if missing:
        raise InvalidRequest(
            f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately "
            f"after: {', '.join(missing)}. Each `tool_use` block must have a corresponding "
            "`tool_result` block in the next message."
        )
