"""The HTTP API: the spec's callback URL, its signal API, and reads, as one Starlette app.

    POST /approvals/{requestId}/respond?token=…   the callbackUrl; the token is the credential
    POST /executions/{executionId}/signal         Authorization: Bearer <api_key>
    GET  /approvals?status=pending&agentTag=…&limit=…    (bearer)
    GET  /executions/{executionId}                (bearer)
    GET  /openapi.json                            this API, described as OpenAPI 3.1

Theory of operation. Every write goes through `Clearance.decide()` or
`Clearance.signal()`, so the guarantees of the library hold over HTTP too:
one decision per request (settled by the store's version check, not by this
module), validated modified parameters, an audit record per decision. This
module only translates: it checks credentials before it looks anything up
(a wrong token learns nothing about which requests exist), bounds and parses
the body, turns the body into exactly one call, and maps each refusal to a
status code. Every error answer is `{"error": {"code", "message"}}` and is
given before anything changed; bad input never gets a 5xx.

Status codes: 400 malformed JSON; 401 missing credential; 403 wrong credential;
404 unknown request, execution or path; 405 wrong method; 409 already decided
(the error names the decision that stands) or the execution is in the wrong
state; 410 expired or timed out; 413 body over `max_body` bytes; 415 not
`application/json`; 422 a body or query that parses but is not valid (with
`problems` for modified parameters that fail the tool's schema); 503 the
route's secret is not configured (`webhook_secret` for callbacks, `api_key`
for the rest): a deployment problem, not a client's.

Mounted in your own app (`app.mount("/clearance", clearance.asgi())`), the
callback URL must include the mount point: `public_url="https://host/clearance"`.
"""

from __future__ import annotations

import hmac
import json
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clearance.callback import TokenError, check_token
from clearance.core.decide import standing_decision
from clearance.core.errors import ClearanceError, InvalidParameters, Refusal
from clearance.core.execution import PENDING, REQUEST_STATUSES, TIMED_OUT, ApprovalRequest, iso
from clearance.core.wire import event_to_data
from clearance.ports.store import UnreadableExecution

if TYPE_CHECKING:
    from clearance.app import Clearance

MAX_BODY = 64 * 1024  # bytes; a decision is a few hundred
MAX_DEPTH = 32  # nesting of JSON arrays/objects in a body
DEFAULT_LIMIT = 100  # GET /approvals page size
MAX_LIMIT = 1000

Endpoint = Callable[[Request], Awaitable[Response]]


class ApiError(Exception):
    """An HTTP error answer: `{"error": {"code", "message", **extra}}` with `status`."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra
        self.headers: dict[str, str] = {}


def _fail(status: int, code: str, message: str, **extra: Any) -> NoReturn:
    raise ApiError(status, code, message, **extra)


def _error_response(err: ApiError) -> JSONResponse:
    body = {"error": {"code": err.code, "message": err.message, **err.extra}}
    return JSONResponse(body, status_code=err.status, headers=err.headers or None)


# -- reading requests --------------------------------------------------------------------


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _check_shape(value: Any) -> None:
    """No nesting deeper than MAX_DEPTH and no unpaired surrogates ("\\ud800"), which
    JSON can spell but UTF-8 cannot store. Iterative, so depth never costs recursion."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                _fail(422, "invalid_body", "strings must be valid Unicode (no lone surrogates)")
        elif isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                _fail(422, "invalid_body", f"the body is nested deeper than {MAX_DEPTH} levels")
            children = list(item.items()) if isinstance(item, dict) else [("", v) for v in item]
            for key, child in children:
                stack.append((key, depth + 1))
                stack.append((child, depth + 1))


async def _read_json(request: Request, max_body: int) -> Any:
    content_type = request.headers.get("content-type", "")
    media, *params = (part.strip().lower() for part in content_type.split(";"))
    charsets = [p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")]
    if media != "application/json" or any(c not in ("utf-8", "utf8") for c in charsets):
        shown = content_type or "none"
        _fail(
            415,
            "unsupported_media_type",
            f"send the body as Content-Type: application/json (UTF-8), not {shown}",
        )
    too_large = f"the body is larger than {max_body} bytes"
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_body:
        _fail(413, "body_too_large", too_large)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:  # a lying or absent Content-Length
                _fail(413, "body_too_large", too_large)
    except ClientDisconnect:
        _fail(400, "incomplete_body", "the client went away before the body was complete")
    try:
        value = json.loads(
            bytes(body).decode("utf-8"), parse_float=_finite, parse_constant=_no_constant
        )
    except RecursionError:
        _fail(422, "invalid_body", f"the body is nested deeper than {MAX_DEPTH} levels")
    except ValueError as err:  # includes UnicodeDecodeError and JSONDecodeError
        _fail(400, "invalid_json", f"the body is not valid UTF-8 JSON: {err}")
    _check_shape(value)
    return value


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        kind = "null" if value is None else type(value).__name__
        _fail(422, "invalid_body", f"{what} must be a JSON object, got {kind}")
    return value


def _only(body: dict[str, Any], allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        _fail(
            422,
            "invalid_body",
            f"unknown field(s) in {what}: {', '.join(unknown)}; accepted: {', '.join(allowed)}",
        )


def _optional_text(body: dict[str, Any], key: str, where: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        _fail(422, "invalid_body", f"{where}{key} must be a string, got {type(value).__name__}")
    return value


def _optional_changes(body: dict[str, Any], where: str) -> dict[str, Any] | None:
    value = body.get("modifiedParams")
    if value is None:
        return None
    if not isinstance(value, dict):
        _fail(
            422,
            "invalid_body",
            f"{where}modifiedParams must be an object of parameter -> new value, "
            f"got {type(value).__name__}",
        )
    return value or None  # {} changes nothing: an approval as asked


def _not_with(body: dict[str, Any], key: str, reason: str) -> None:
    if body.get(key) is not None:
        _fail(422, "invalid_body", reason)


# -- credentials -------------------------------------------------------------------------


def _require_api_key(app: Clearance, request: Request) -> None:
    if not app.api_key:
        _fail(
            503,
            "not_configured",
            "this route needs an API key: Clearance.open(..., api_key=...), or "
            "$CLEARANCE_API_KEY for `clearance serve`",
        )
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        err = ApiError(401, "unauthorized", "send Authorization: Bearer <api key>")
        err.headers["WWW-Authenticate"] = "Bearer"
        raise err
    if not hmac.compare_digest(given.strip().encode("latin-1"), app.api_key.encode("utf-8")):
        _fail(403, "forbidden", "the API key is not valid")


def _require_token(app: Clearance, request: Request, request_id: str) -> None:
    if not app.webhook_secret:
        _fail(
            503,
            "not_configured",
            "callbacks need a webhook secret: Clearance.open(..., webhook_secret='whsec_…'), "
            "or $CLEARANCE_WEBHOOK_SECRET for `clearance serve`",
        )
    token = request.query_params.get("token")
    try:
        check_token(app.webhook_secret, request_id, token, app.clock.now())
    except TokenError as err:
        code = {401: "missing_token", 410: "expired"}.get(err.status, "invalid_token")
        _fail(err.status, code, str(err))
    except (ValueError, OverflowError):  # digits int() will not read, e.g. '²'
        _fail(403, "invalid_token", "malformed callback token")


# -- answers -----------------------------------------------------------------------------


def _approval(app: Clearance, request: ApprovalRequest) -> dict[str, Any]:
    data = request.to_dict()
    data["status"] = request.status
    data["expiresAt"] = iso(request.expires_at)
    if request.status != PENDING:
        data["decidedBy"] = request.decided_by
        data["decidedAt"] = iso(request.decided_at) if request.decided_at else None
        data["modifiedParams"] = request.modified_params
        data["rejectionReason"] = request.rejection_reason
    elif app.public_url and app.webhook_secret:
        data["callbackUrl"] = app.callback_url(request)
    return data


def _decision(request: ApprovalRequest, execution_status: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "requestId": request.request_id,
        "executionId": request.execution_id,
        "decision": request.status,
        "tool": request.tool,
        "parameters": request.effective_parameters(),
    }
    if request.modified_params is not None:
        data["modifiedParams"] = request.modified_params
    if request.rejection_reason is not None:
        data["reason"] = request.rejection_reason
    if request.decided_by is not None:
        data["by"] = request.decided_by
    if request.decided_at is not None:
        data["decidedAt"] = iso(request.decided_at)
    data["executionStatus"] = execution_status
    return data


async def _standing(app: Clearance, request_id: str) -> ApprovalRequest | None:
    execution_id = await app.store.execution_of_request(request_id)
    ex = await app.store.load(execution_id) if execution_id else None
    return ex.request(request_id) if ex else None


async def _refused(app: Clearance, refusal: Refusal, request_id: str | None) -> NoReturn:
    """The HTTP answer for a refusal; nothing was changed when `decide()` refused."""
    code, message = refusal.code, str(refusal)
    if isinstance(refusal, InvalidParameters):
        _fail(422, code, message, problems=list(refusal.problems))
    if code in ("unknown_request", "unknown_execution"):
        _fail(404, code, message)
    if code == "expired":
        _fail(410, code, message)
    if code in ("invalid_parameters", "missing_request_id", "unknown_signal"):
        _fail(422, code, message)
    if code == "already_decided" and request_id:
        request = await _standing(app, request_id)
        if request is not None:
            standing = {
                "status": request.status,
                "by": request.decided_by,
                "at": iso(request.decided_at) if request.decided_at else None,
            }
            if request.status == TIMED_OUT:
                _fail(410, "expired", standing_decision(request), decision=standing)
            _fail(409, code, standing_decision(request), decision=standing)
    _fail(409, code, message)


# -- routes ------------------------------------------------------------------------------

CALLBACK_FIELDS = ("approved", "reason", "modifiedParams", "by")
SIGNALS = ("approve", "reject", "stop")
PAYLOAD_FIELDS = ("requestId", "reason", "modifiedParams", "by")


def _routes(app: Clearance, max_body: int) -> list[Route]:
    async def respond(request: Request) -> Response:
        request_id = request.path_params["requestId"]
        _require_token(app, request, request_id)
        body = _object(await _read_json(request, max_body), "the body")
        _only(body, CALLBACK_FIELDS, "the body")
        approved = body.get("approved")
        if type(approved) is not bool:
            _fail(
                422,
                "invalid_body",
                'approved is required and must be true or false, e.g. {"approved": true}',
            )
        reason = _optional_text(body, "reason", "")
        by = _optional_text(body, "by", "")
        changes = _optional_changes(body, "")
        if approved:
            _not_with(body, "reason", "reason goes with approved: false (a rejection)")
        else:
            _not_with(body, "modifiedParams", "modifiedParams goes with approved: true")
        try:
            ex = await app.decide(
                request_id, approved=approved, reason=reason, modified_params=changes, by=by
            )
        except Refusal as refusal:
            await _refused(app, refusal, request_id)
        except UnreadableExecution:
            raise  # not "busy": trying again cannot help (see _unreadable)
        except ClearanceError as err:
            _fail(503, "busy", f"{err}; try again")
        decided = ex.request(request_id)
        assert decided is not None  # decide() just decided it
        return JSONResponse(_decision(decided, ex.status))

    async def signal(request: Request) -> Response:
        _require_api_key(app, request)
        execution_id = request.path_params["executionId"]
        body = _object(await _read_json(request, max_body), "the body")
        _only(body, ("signal", "payload"), "the body")
        name = body.get("signal")
        if name not in SIGNALS:
            _fail(422, "unknown_signal", f"signal must be one of {', '.join(SIGNALS)}")
        payload = _object(body.get("payload", {}), "payload")
        _only(payload, PAYLOAD_FIELDS, "payload")
        request_id = _optional_text(payload, "requestId", "payload.")
        reason = _optional_text(payload, "reason", "payload.")
        by = _optional_text(payload, "by", "payload.")
        changes = _optional_changes(payload, "payload.")
        if name == "stop":
            _not_with(payload, "requestId", "stop ends the whole execution: send no requestId")
            _not_with(payload, "modifiedParams", "modifiedParams goes with signal approve")
        elif not request_id:
            _fail(
                422,
                "missing_request_id",
                f"signal {name} needs payload.requestId (the 'apr-…' id)",
            )
        elif name == "approve":
            _not_with(payload, "reason", "reason goes with signal reject or stop")
        else:
            _not_with(payload, "modifiedParams", "modifiedParams goes with signal approve")
        if request_id:
            await _refuse_if_past_deadline(app, execution_id, request_id)
        try:
            ex = await app.signal(
                execution_id,
                name,
                request_id=request_id,
                modified_params=changes,
                reason=reason,
                by=by,
            )
        except Refusal as refusal:
            await _refused(app, refusal, request_id)
        except UnreadableExecution:
            raise  # not "busy": trying again cannot help (see _unreadable)
        except ClearanceError as err:
            _fail(503, "busy", f"{err}; try again")
        decided = ex.request(request_id) if request_id else None
        answer = {"signal": name, "executionId": ex.id, "executionStatus": ex.status}
        if decided is not None:
            answer = {"signal": name, **_decision(decided, ex.status)}
        return JSONResponse(answer)

    async def approvals(request: Request) -> Response:
        _require_api_key(app, request)
        query = request.query_params
        unknown = sorted(set(query) - {"status", "agentTag", "limit"})
        if unknown:
            _fail(
                422,
                "invalid_query",
                f"unknown query parameter(s): {', '.join(unknown)}; accepted: status, "
                "agentTag, limit",
            )
        status = query.get("status", PENDING)
        if status != PENDING:
            known = status in REQUEST_STATUSES
            _fail(
                422,
                "invalid_query",
                (
                    f"status={status} is not listed here yet: only status=pending is "
                    "supported; decided requests are in GET /executions/{executionId}"
                    if known
                    else f"status must be pending (one of {', '.join(REQUEST_STATUSES)})"
                ),
            )
        limit_text = query.get("limit", str(DEFAULT_LIMIT))
        if not (limit_text.isascii() and limit_text.isdigit()) or not (
            1 <= int(limit_text) <= MAX_LIMIT
        ):
            _fail(422, "invalid_query", f"limit must be a whole number from 1 to {MAX_LIMIT}")
        tag = query.get("agentTag") or None
        pending = await app.pending(tag, limit=int(limit_text))
        return JSONResponse({"approvals": [_approval(app, r) for r in pending]})

    async def execution(request: Request) -> Response:
        _require_api_key(app, request)
        try:
            history = await app.get_execution(request.path_params["executionId"])
        except Refusal as refusal:
            await _refused(app, refusal, None)
        ex = history.execution
        return JSONResponse(
            {
                "executionId": ex.id,
                "agentTag": ex.agent_tag,
                "status": ex.status,
                "input": ex.input,
                "sessionId": ex.session_id,
                "output": ex.output,
                "error": ex.error,
                "createdAt": iso(ex.created_at) if ex.created_at else None,
                "updatedAt": iso(ex.updated_at) if ex.updated_at else None,
                "usage": {
                    "inputTokens": ex.usage.input_tokens,
                    "outputTokens": ex.usage.output_tokens,
                },
                "pendingApprovals": [_approval(app, r) for r in ex.pending_approvals],
                "approvals": [_approval(app, r) for r in ex.requests],
                "events": [event_to_data(e) for e in history.events],
            }
        )

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document(request.scope.get("root_path", "")))

    return [
        Route("/approvals/{requestId}/respond", _guarded(respond), methods=["POST"]),
        Route("/executions/{executionId}/signal", _guarded(signal), methods=["POST"]),
        Route("/approvals", _guarded(approvals), methods=["GET"]),
        Route("/executions/{executionId}", _guarded(execution), methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]


async def _refuse_if_past_deadline(app: Clearance, execution_id: str, request_id: str) -> None:
    """A decision after the deadline is a 410 that changes nothing here; the timer sweep
    records the timeout (the engine would record it first and then refuse)."""
    ex = await app.store.load(execution_id)
    request = ex.request(request_id) if ex else None
    if request is not None and request.status == PENDING and app.clock.now() >= request.timeout:
        _fail(
            410,
            "expired",
            f"approval request {request_id} expired at {iso(request.timeout)}; it is "
            "auto-rejected as timed out and can no longer be decided",
        )


def _guarded(endpoint: Endpoint) -> Endpoint:
    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ApiError as err:
            return _error_response(err)

    return guarded


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = {
        404: f"no route {request.url.path}; see /openapi.json",
        405: f"{request.method} is not allowed on {request.url.path}; see /openapi.json",
    }.get(exc.status_code, str(exc.detail))
    err = ApiError(exc.status_code, code, message)
    err.headers.update(exc.headers or {})
    return _error_response(err)


async def _unreadable(request: Request, exc: Exception) -> Response:
    return _error_response(ApiError(500, "unreadable_execution", str(exc)))


async def _server_error(request: Request, exc: Exception) -> Response:
    return _error_response(ApiError(500, "internal_error", "internal error; see the server log"))


def build_asgi(app: Clearance, *, max_body: int = MAX_BODY) -> Starlette:
    """The HTTP API over `app` as a Starlette app: serve it, or mount it in your own."""
    api = Starlette(
        routes=_routes(app, max_body),
        exception_handlers={
            HTTPException: _http_error,
            UnreadableExecution: _unreadable,
            500: _server_error,
        },
    )
    api.state.clearance = app
    return api


# -- the OpenAPI document ----------------------------------------------------------------


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    described = {
        400: "The body is not valid UTF-8 JSON.",
        401: "The credential is missing.",
        403: "The credential is not valid.",
        404: "No such approval request, execution or route.",
        409: "Already decided (error.decision names the decision that stands), "
        "or the execution is in a state that takes no such signal.",
        410: "The approval request expired or timed out; it can no longer be decided.",
        413: "The body is larger than the limit (64 KiB by default).",
        415: "The body is not Content-Type: application/json.",
        422: "The body or query is not valid; error.problems names each invalid "
        "modified parameter and why.",
        500: "The execution's stored log no longer reads back (error.code "
        "unreadable_execution names the row; trying again cannot help).",
        503: "The route's secret (webhook_secret or api_key) is not configured.",
    }
    return {str(s): _json(_ref("Error"), described[s]) for s in statuses}


_TEXT_OR_NULL = {"type": ["string", "null"]}
_OBJECT_OR_NULL = {"type": ["object", "null"]}
_BY = {"type": ["string", "null"], "description": "Who decides; recorded in the audit log."}


def _signal_variant(signal: str, fields: dict[str, Any], required: list[str]) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": fields,
    }
    if required:
        payload["required"] = required
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["signal", "payload"] if required else ["signal"],
        "properties": {"signal": {"const": signal}, "payload": payload},
    }


_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "problems": {"type": "array", "items": {"type": "string"}},
                    "decision": {
                        "type": "object",
                        "properties": {
                            "status": {"type": "string"},
                            "by": _TEXT_OR_NULL,
                            "at": _TEXT_OR_NULL,
                        },
                    },
                },
            }
        },
    },
    "CallbackBody": {
        "description": "The spec's callback body: approve, approve with modified "
        "parameters, or reject with a reason.",
        "oneOf": [
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["approved"],
                "properties": {
                    "approved": {"const": True},
                    "modifiedParams": _OBJECT_OR_NULL,
                    "by": _BY,
                },
            },
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["approved"],
                "properties": {
                    "approved": {"const": False},
                    "reason": _TEXT_OR_NULL,
                    "by": _BY,
                },
            },
        ],
    },
    "SignalBody": {
        "description": "The spec's signal: approve or reject one request, or stop the execution.",
        "oneOf": [
            _signal_variant(
                "approve",
                {"requestId": {"type": "string"}, "modifiedParams": _OBJECT_OR_NULL, "by": _BY},
                ["requestId"],
            ),
            _signal_variant(
                "reject",
                {"requestId": {"type": "string"}, "reason": _TEXT_OR_NULL, "by": _BY},
                ["requestId"],
            ),
            _signal_variant("stop", {"reason": _TEXT_OR_NULL, "by": _BY}, []),
        ],
    },
    "Decision": {
        "type": "object",
        "required": [
            "requestId",
            "executionId",
            "decision",
            "tool",
            "parameters",
            "executionStatus",
        ],
        "properties": {
            "requestId": {"type": "string"},
            "executionId": {"type": "string"},
            "decision": {"enum": ["approved", "rejected"]},
            "tool": {"type": "string"},
            "parameters": {
                "type": "object",
                "description": "What the tool runs with (modified parameters merged in).",
            },
            "modifiedParams": {"type": "object"},
            "reason": {"type": "string"},
            "by": {"type": "string"},
            "decidedAt": {"type": "string", "format": "date-time"},
            "executionStatus": {"type": "string"},
        },
    },
    "SignalResult": {
        "type": "object",
        "required": ["signal", "executionId", "executionStatus"],
        "properties": {
            "signal": {"enum": list(SIGNALS)},
            "executionId": {"type": "string"},
            "executionStatus": {"type": "string"},
            "requestId": {"type": "string"},
            "decision": {"enum": ["approved", "rejected"]},
        },
    },
    "ApprovalRequest": {
        "type": "object",
        "required": [
            "requestId",
            "executionId",
            "agentTag",
            "tool",
            "parameters",
            "reason",
            "timestamp",
            "timeout",
            "status",
            "expiresAt",
        ],
        "properties": {
            "requestId": {"type": "string"},
            "executionId": {"type": "string"},
            "agentTag": {"type": "string"},
            "tool": {"type": "string"},
            "parameters": {"type": "object"},
            "reason": {"type": "string"},
            "timestamp": {"type": "string", "format": "date-time"},
            "timeout": {"type": "string", "format": "date-time"},
            "status": {"enum": list(REQUEST_STATUSES)},
            "expiresAt": {"type": "string", "format": "date-time"},
            "callbackUrl": {"type": "string"},
            "decidedBy": _TEXT_OR_NULL,
            "decidedAt": _TEXT_OR_NULL,
            "modifiedParams": _OBJECT_OR_NULL,
            "rejectionReason": _TEXT_OR_NULL,
        },
    },
    "Execution": {
        "type": "object",
        "required": ["executionId", "agentTag", "status", "pendingApprovals", "events"],
        "properties": {
            "executionId": {"type": "string"},
            "agentTag": {"type": "string"},
            "status": {"type": "string"},
            "input": {"type": "string"},
            "sessionId": _TEXT_OR_NULL,
            "output": _TEXT_OR_NULL,
            "error": _TEXT_OR_NULL,
            "createdAt": _TEXT_OR_NULL,
            "updatedAt": _TEXT_OR_NULL,
            "usage": {
                "type": "object",
                "properties": {
                    "inputTokens": {"type": "integer"},
                    "outputTokens": {"type": "integer"},
                },
            },
            "pendingApprovals": {"type": "array", "items": _ref("ApprovalRequest")},
            "approvals": {"type": "array", "items": _ref("ApprovalRequest")},
            "events": {
                "type": "array",
                "items": {"type": "object", "required": ["type"]},
                "description": "Every event of the execution, oldest first, as stored.",
            },
        },
    },
}

_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


def openapi_document(root_path: str = "") -> dict[str, Any]:
    """The API as OpenAPI 3.1: what /openapi.json serves."""
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Clearance",
            "version": "1",
            "description": "Human approval gates for AI agents' tool calls: decide approval "
            "requests by callback URL or signal, and read pending requests and executions.",
        },
        "paths": {
            "/approvals/{requestId}/respond": {
                "post": {
                    "operationId": "respond",
                    "summary": "Decide one approval request (the webhook's callbackUrl).",
                    "description": "The token from the callbackUrl is the credential; no API "
                    "key. Exactly one decision per request ever wins.",
                    "parameters": [
                        _path_param("requestId"),
                        {
                            "name": "token",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string"},
                            "description": "From the callbackUrl, as sent.",
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("CallbackBody")}},
                    },
                    "responses": {
                        "200": _json(_ref("Decision"), "Decided."),
                        **_errors(400, 401, 403, 404, 409, 410, 413, 415, 422, 500, 503),
                    },
                }
            },
            "/executions/{executionId}/signal": {
                "post": {
                    "operationId": "signal",
                    "summary": "Approve or reject a request of an execution, or stop it.",
                    "security": _BEARER,
                    "parameters": [_path_param("executionId")],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("SignalBody")}},
                    },
                    "responses": {
                        "200": _json(_ref("SignalResult"), "Signalled."),
                        **_errors(400, 401, 403, 404, 409, 410, 413, 415, 422, 500, 503),
                    },
                }
            },
            "/approvals": {
                "get": {
                    "operationId": "listApprovals",
                    "summary": "Pending approval requests, oldest first.",
                    "security": _BEARER,
                    "parameters": [
                        {
                            "name": "status",
                            "in": "query",
                            "schema": {"enum": [PENDING], "default": PENDING},
                            "description": "Only pending is supported.",
                        },
                        {"name": "agentTag", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": MAX_LIMIT,
                                "default": DEFAULT_LIMIT,
                            },
                        },
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["approvals"],
                                "properties": {
                                    "approvals": {
                                        "type": "array",
                                        "items": _ref("ApprovalRequest"),
                                    }
                                },
                            },
                            "Pending requests.",
                        ),
                        **_errors(401, 403, 422, 503),
                    },
                }
            },
            "/executions/{executionId}": {
                "get": {
                    "operationId": "getExecution",
                    "summary": "An execution: status, output, approvals, usage and events.",
                    "security": _BEARER,
                    "parameters": [_path_param("executionId")],
                    "responses": {
                        "200": _json(_ref("Execution"), "The execution."),
                        **_errors(401, 403, 404, 500, 503),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")},
                }
            },
        },
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The instance's api_key ($CLEARANCE_API_KEY).",
                }
            },
        },
    }
    if root_path:
        doc["servers"] = [{"url": root_path}]
    return doc
