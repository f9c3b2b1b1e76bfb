"""A fake Chat Completions server that keeps the real API's rules.

`POST /v1/chat/completions` answers from a script (replies, errors, or callables
that see the request) and records every request. Like the real API it answers
400 to a conversation it would not accept — above all an assistant `tool_calls`
id without exactly one `role: "tool"` answer before the next turn, or a tool
message that answers no call — and 401 without a Bearer key, so an adapter bug
shows up as the failure a user would get, and in `rejections`.

    fake = FakeOpenAI()
    with serving(fake.app) as url:
        fake.script(reply(tool_calls=[call("get-order", {"orderId": "A"})]), reply("Done."))
        Model(provider="openai", model="gpt-4o", api_key="k", base_url=f"{url}/v1")
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
RETRYABLE = (408, 409, 429)


@attrs.frozen
class Reply:
    message: dict[str, Any]
    finish_reason: str
    usage: tuple[int, int]


@attrs.frozen
class Error:
    status: int
    message: str
    type: str
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = attrs.field(factory=dict)


Scripted = Reply | Error | Callable[[dict[str, Any]], "Reply | Error"]


def call(name: str, arguments: dict[str, Any] | str, *, id: str | None = None) -> dict[str, Any]:
    """One tool call; `arguments` as a dict is sent as JSON, as a str exactly as given."""
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    tool_call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": raw}}
    if id is not None:
        tool_call["id"] = id
    return tool_call


def reply(
    content: str | None = None,
    *,
    tool_calls: list[dict[str, Any]] | None = None,
    finish_reason: str | None = None,
    usage: tuple[int, int] = (10, 5),
    refusal: str | None = None,
) -> Reply:
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": refusal}
    if tool_calls:
        message["tool_calls"] = tool_calls
    reason = finish_reason or ("tool_calls" if tool_calls else "stop")
    return Reply(message, reason, usage)


def error(
    status: int,
    message: str,
    type: str | None = None,
    *,
    code: str | None = None,
    param: str | None = None,
    retry_after_ms: int | None = 1,
) -> Error:
    """An API error. Retryable ones carry `retry-after-ms` (1 ms by default): the SDK
    honours it, where `retry-after: 0` would fall back to its 0.5 s+ backoff."""
    kind = type or {
        400: "invalid_request_error",
        401: "invalid_request_error",
        403: "permission_denied",
        404: "invalid_request_error",
        429: "rate_limit_exceeded",
    }.get(status, "server_error")
    headers = {}
    if retry_after_ms is not None and (status in RETRYABLE or status >= 500):
        headers["retry-after-ms"] = str(retry_after_ms)
    return Error(status, message, kind, code, param, headers)


class Invalid(Exception):
    """The request breaks one of the API's rules: a 400 like the real one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@attrs.define
class Seen:
    body: Any
    headers: dict[str, str]
    accepted: bool = False  # passed the rules and was answered from the script


class FakeOpenAI:
    def __init__(self, api_key: str | None = None) -> None:
        """`api_key`: the one key accepted; None accepts any non-empty Bearer key."""
        self.api_key = api_key
        self._lock = threading.Lock()
        self._queue: list[Scripted] = []
        self.seen: list[Seen] = []  # every request, also refused ones
        self.rejections: list[tuple[int, str]] = []  # (status, message) of rule breaks
        self._ids = 0
        self.app = Starlette(routes=[Route("/v1/chat/completions", self._serve, methods=["POST"])])

    # -- the script ------------------------------------------------------------------

    def script(self, *responses: Scripted) -> None:
        with self._lock:
            self._queue.extend(responses)

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self.seen.clear()
            self.rejections.clear()

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Bodies of the requests that passed the rules and were answered from the script."""
        with self._lock:
            return [s.body for s in self.seen if s.accepted]

    @property
    def left(self) -> int:
        with self._lock:
            return len(self._queue)

    # -- serving ---------------------------------------------------------------------

    async def _serve(self, request: Request) -> JSONResponse:
        raw = await request.body()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        seen = Seen(body, dict(request.headers))
        with self._lock:
            self.seen.append(seen)
        auth = request.headers.get("authorization", "")
        key = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        if not key:
            return self._refuse(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        if self.api_key is not None and key != self.api_key:
            return self._refuse(
                401,
                f"Incorrect API key provided: {key}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )
        try:
            check_request(body)
        except Invalid as err:
            return self._refuse(400, err.message, param=err.param)
        with self._lock:
            seen.accepted = True
            scripted = self._queue.pop(0) if self._queue else None
        if scripted is None:
            return self._refuse(
                418, "fake OpenAI: the script has no response left", kind="fake_script_exhausted"
            )
        answer = scripted(body) if callable(scripted) else scripted
        if isinstance(answer, Error):
            return _error_response(answer)
        return JSONResponse(self._completion(body, answer))

    def _refuse(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> JSONResponse:
        with self._lock:
            self.rejections.append((status, message))
        return _error_response(Error(status, message, kind, code, param))

    def _completion(self, body: dict[str, Any], answer: Reply) -> dict[str, Any]:
        with self._lock:
            self._ids += 1
            n = self._ids
        message = dict(answer.message)
        if "tool_calls" in message:
            message["tool_calls"] = [
                {"id": f"call_{n:04d}_{i}", **c} if "id" not in c else c
                for i, c in enumerate(message["tool_calls"])
            ]
        prompt, completion = answer.usage
        return {
            "id": f"chatcmpl-fake{n:06d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": answer.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }


def _error_response(err: Error) -> JSONResponse:
    body = {
        "error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}
    }
    return JSONResponse(body, status_code=err.status, headers=err.headers)


# -- the API's rules -------------------------------------------------------------------


def check_request(body: Any) -> None:
    if not isinstance(body, dict):
        raise Invalid("We could not parse the JSON body of your request.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Invalid("you must provide a model parameter", "model")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise Invalid("Missing required parameter: 'messages'.", "messages")
    if not messages:
        raise Invalid("[] is too short - 'messages'", "messages")
    _check_conversation(messages)
    _check_tools(body.get("tools"))
    for name in ("max_tokens", "max_completion_tokens"):
        if name in body and (not isinstance(body[name], int) or body[name] < 1):
            raise Invalid(f"Invalid '{name}': integer below minimum value.", name)
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise Invalid("max_tokens and max_completion_tokens cannot both be set", "max_tokens")
    for name, top in (("temperature", 2), ("top_p", 1)):
        if name in body and not (isinstance(body[name], int | float) and 0 <= body[name] <= top):
            raise Invalid(f"Invalid '{name}': expected a number between 0 and {top}.", name)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise Invalid("Invalid 'stop': expected a string or an array of strings.", "stop")
        if len(stop) > 4:
            raise Invalid(f"{stop!r} is too long - 'stop'", "stop")


def _check_conversation(messages: list[Any]) -> None:
    pending: list[str] = []  # tool_call ids of the last assistant message, not yet answered
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise Invalid(f"Invalid type for '{where}': expected an object.", where)
        role = message.get("role")
        if role not in ROLES:
            raise Invalid(
                f"Invalid value: {role!r}. Supported values are: 'system', 'assistant', 'user', "
                "'function', 'tool', and 'developer'.",
                f"{where}.role",
            )
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in pending:
                raise Invalid(
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'.",
                    f"{where}.role",
                )
            pending.remove(call_id)
            _check_text(message.get("content"), f"{where}.content")
            continue
        if pending:
            raise _unanswered(pending)
        if role == "assistant":
            pending = _check_assistant(message, where)
        else:
            _check_text(message.get("content"), f"{where}.content")
    if pending:
        raise _unanswered(pending)


def _unanswered(ids: list[str]) -> Invalid:
    return Invalid(
        "An assistant message with 'tool_calls' must be followed by tool messages responding "
        "to each 'tool_call_id'. The following tool_call_ids did not have response messages: "
        + ", ".join(ids),
        "messages",
    )


def _check_assistant(message: dict[str, Any], where: str) -> list[str]:
    calls = message.get("tool_calls")
    content = message.get("content")
    if calls is None:
        if content is None:
            raise Invalid(
                f"Invalid value for '{where}.content': expected a string, got null.",
                f"{where}.content",
            )
        _check_text(content, f"{where}.content")
        return []
    if content is not None:
        _check_text(content, f"{where}.content")
    if not isinstance(calls, list) or not calls:
        raise Invalid(f"Invalid '{where}.tool_calls': empty array.", f"{where}.tool_calls")
    ids: list[str] = []
    for j, tool_call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(tool_call, dict) or tool_call.get("type") != "function":
            raise Invalid(f"Invalid value for '{at}.type': expected 'function'.", f"{at}.type")
        call_id = tool_call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise Invalid(f"Missing required parameter: '{at}.id'.", f"{at}.id")
        if call_id in ids:
            raise Invalid(f"Duplicate value for 'tool_call_id' of {call_id}.", f"{at}.id")
        function = tool_call.get("function")
        if not isinstance(function, dict):
            raise Invalid(f"Missing required parameter: '{at}.function'.", f"{at}.function")
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise Invalid(
                f"Invalid '{at}.function.name': string does not match pattern. Expected a "
                "string that matches the pattern '^[a-zA-Z0-9_-]+$'.",
                f"{at}.function.name",
            )
        if not isinstance(function.get("arguments"), str):
            raise Invalid(
                f"Invalid type for '{at}.function.arguments': expected a string, but got "
                f"{type(function.get('arguments')).__name__} instead.",
                f"{at}.function.arguments",
            )
        ids.append(call_id)
    return ids


def _check_text(content: Any, where: str) -> None:
    if isinstance(content, str):
        return
    if isinstance(content, list) and content:
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise Invalid(f"Invalid value for '{where}[{k}].type'.", f"{where}[{k}].type")
            if not isinstance(part.get("text"), str):
                raise Invalid(f"Missing required parameter: '{where}[{k}].text'.", where)
        return
    raise Invalid(
        f"Invalid type for '{where}': expected one of a string or array of objects, but got "
        f"{'null' if content is None else type(content).__name__} instead.",
        where,
    )


def _check_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list) or not tools:
        raise Invalid("Invalid 'tools': empty array. Expected an array with minimum length 1.")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise Invalid(f"Invalid value for '{where}.type'.", f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise Invalid(f"Missing required parameter: '{where}.function'.", f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise Invalid(
                f"Invalid '{where}.function.name': string does not match pattern. Expected a "
                "string that matches the pattern '^[a-zA-Z0-9_-]+$'.",
                f"{where}.function.name",
            )
        if name in names:
            raise Invalid(f"Duplicate function name: {name!r}.", f"{where}.function.name")
        names.add(name)
        parameters = function.get("parameters")
        if parameters is not None and (
            not isinstance(parameters, dict) or parameters.get("type") != "object"
        ):
            raise Invalid(
                f"Invalid schema for function '{name}': schema must be a JSON Schema of "
                "'type: \"object\"'.",
                f"{where}.function.parameters",
            )
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise Invalid(f"Invalid type for '{where}.function.description'.", where)
