"""What an HTTP request may say: the body's media type, size and strict JSON, the fields
of the callback and signal bodies, and the listing's query.

Each reader turns a request into exactly one call on `Clearance` (a `CallbackDecision`,
a `SignalCall`, a `Listing`) or raises `ApiError` before anything is looked up or
changed. Bad input is 400 (not UTF-8 JSON: syntax, NaN, Infinity, numbers out of
range), 413 (too large), 415 (not application/json) or 422 (JSON that is not a valid
body: the wrong shape, lone surrogates, nesting past MAX_DEPTH); never a 5xx.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NoReturn

import attrs
from starlette.requests import ClientDisconnect, Request

from clearance.core import json_value
from clearance.core.deadlines import ACCEPTED, BadDeadline, parse_deadline
from clearance.core.errors import RefusalCode
from clearance.core.execution import PENDING, REQUEST_STATUSES
from clearance.engine import SIGNALS
from clearance.http_errors import fail

MAX_BODY = 64 * 1024  # bytes; a decision is a few hundred
MAX_DEPTH = 32  # nesting of JSON arrays/objects in a body
DEFAULT_LIMIT = 100  # GET /approvals page size
MAX_LIMIT = 1000

CALLBACK_FIELDS = ("approved", "reason", "modifiedParams", "by", "callDigest")
SIGNAL_FIELDS = ("signal", "payload")
PAYLOAD_FIELDS = (
    "requestId",
    "reason",
    "modifiedParams",
    "by",
    "remember",
    "rememberWhen",
    "callDigest",
    "until",
)
LISTING_QUERY = ("status", "agentTag", "limit", "after")


# -- the body as JSON --------------------------------------------------------------------


async def read_json(request: Request, max_body: int) -> Any:
    """The body as strict JSON (`core.json_value.loads`): UTF-8, at most `max_body` bytes."""
    content_type = request.headers.get("content-type", "")
    media, *params = (part.strip().lower() for part in content_type.split(";"))
    charsets = [p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")]
    if media != "application/json" or any(c not in ("utf-8", "utf8") for c in charsets):
        shown = content_type or "none"
        fail(
            415,
            "unsupported_media_type",
            f"send the body as Content-Type: application/json (UTF-8), not {shown}",
        )
    too_large = f"the body is larger than {max_body} bytes"
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_body:
        fail(413, "body_too_large", too_large)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:  # a lying or absent Content-Length
                fail(413, "body_too_large", too_large)
    except ClientDisconnect:
        fail(400, "incomplete_body", "the client went away before the body was complete")
    try:
        text = bytes(body).decode("utf-8")  # UTF-8 only: loads() would also take UTF-16
    except UnicodeDecodeError as err:
        fail(400, "invalid_json", f"the body is not valid UTF-8 JSON: {err}")
    try:
        value = json_value.loads(text, "the body")
    except RecursionError:
        _too_deep()
    except json_value.NotJSON as err:
        if _well_formed(text):  # it is JSON, with text UTF-8 cannot carry
            fail(422, "invalid_body", str(err))
        fail(400, "invalid_json", str(err))
    _check_depth(value)
    return value


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _well_formed(text: str) -> bool:
    """Whether `text` is JSON with finite numbers: when strict loading refused such text,
    what it refused was a string (a lone surrogate), which is 422, not 400."""
    try:
        json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return False
    return True


def _too_deep() -> NoReturn:
    fail(422, "invalid_body", f"the body is nested deeper than {MAX_DEPTH} levels")


def _check_depth(value: Any) -> None:
    """No nesting deeper than MAX_DEPTH. Iterative, so depth never costs recursion."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                _too_deep()
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


# -- field rules ---------------------------------------------------------------------------


def json_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        kind = "null" if value is None else type(value).__name__
        fail(422, "invalid_body", f"{what} must be a JSON object, got {kind}")
    return value


def only(body: Mapping[str, Any], allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        fail(
            422,
            "invalid_body",
            f"unknown field(s) in {what}: {', '.join(unknown)}; accepted: {', '.join(allowed)}",
        )


def optional_text(body: Mapping[str, Any], key: str, where: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        fail(422, "invalid_body", f"{where}{key} must be a string, got {type(value).__name__}")
    return value


def optional_changes(body: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    value = body.get("modifiedParams")
    if value is None:
        return None
    if not isinstance(value, dict):
        fail(
            422,
            "invalid_body",
            f"{where}modifiedParams must be an object of parameter -> new value, "
            f"got {type(value).__name__}",
        )
    return value or None  # {} changes nothing: an approval as asked


def not_with(body: Mapping[str, Any], key: str, reason: str) -> None:
    if body.get(key) is not None:
        fail(422, "invalid_body", reason)


# -- the bodies ------------------------------------------------------------------------------


@attrs.frozen
class CallbackDecision:
    """The spec's callback body: `Clearance.decide(request_id, **this)`."""

    approved: bool
    reason: str | None
    modified_params: dict[str, Any] | None
    by: str | None
    digest: str | None = None  # callDigest: the call the decider saw


def callback_decision(value: Any) -> CallbackDecision:
    body = json_object(value, "the body")
    only(body, CALLBACK_FIELDS, "the body")
    approved = body.get("approved")
    if type(approved) is not bool:
        fail(
            422,
            "invalid_body",
            'approved is required and must be true or false, e.g. {"approved": true}',
        )
    reason = optional_text(body, "reason", "")
    by = optional_text(body, "by", "")
    changes = optional_changes(body, "")
    if approved:
        not_with(body, "reason", "reason goes with approved: false (a rejection)")
    else:
        not_with(body, "modifiedParams", "modifiedParams goes with approved: true")
    digest = optional_text(body, "callDigest", "")
    return CallbackDecision(approved, reason, changes, by, digest)


@attrs.frozen
class SignalCall:
    """The spec's signal body: `Clearance.signal(execution_id, name, **the rest)`."""

    name: str
    request_id: str | None
    reason: str | None
    modified_params: dict[str, Any] | None
    by: str | None
    remember: str | None = None  # "execution": a session grant (see Clearance.signal)
    remember_when: str | None = None
    digest: str | None = None  # callDigest: the call the decider saw
    until: datetime | None = None  # extend: the request's new deadline


def deadline(text: str, where: str) -> datetime:
    """An extension's new deadline (`core.deadlines`: the CLI and Python read theirs the
    same), or 422 invalid_deadline, as the engine refuses one."""
    try:
        return parse_deadline(text, f"{where}until")
    except BadDeadline as err:
        fail(422, RefusalCode.INVALID_DEADLINE, str(err))


def signal_call(value: Any) -> SignalCall:
    body = json_object(value, "the body")
    only(body, SIGNAL_FIELDS, "the body")
    name = body.get("signal")
    if name not in SIGNALS:
        fail(422, "unknown_signal", f"signal must be one of {', '.join(SIGNALS)}")
    payload = json_object(body.get("payload", {}), "payload")
    only(payload, PAYLOAD_FIELDS, "payload")
    request_id = optional_text(payload, "requestId", "payload.")
    reason = optional_text(payload, "reason", "payload.")
    by = optional_text(payload, "by", "payload.")
    changes = optional_changes(payload, "payload.")
    remember = optional_text(payload, "remember", "payload.")
    remember_when = optional_text(payload, "rememberWhen", "payload.")
    if name != "approve":
        not_with(payload, "remember", "remember goes with signal approve")
        not_with(payload, "rememberWhen", "rememberWhen goes with signal approve")
    until_text = optional_text(payload, "until", "payload.")
    until = None
    if name != "extend":
        not_with(payload, "until", "until goes with signal extend (the new deadline)")
    if name == "stop":
        not_with(payload, "requestId", "stop ends the whole execution: send no requestId")
        not_with(payload, "modifiedParams", "modifiedParams goes with signal approve")
    elif not request_id:
        fail(
            422,
            "missing_request_id",
            f"signal {name} needs payload.requestId (the 'apr-…' id)",
        )
    elif name == "approve":
        not_with(payload, "reason", "reason goes with signal reject or stop")
    elif name == "extend":
        not_with(payload, "reason", "reason goes with signal reject or stop")
        not_with(payload, "modifiedParams", "modifiedParams goes with signal approve")
        if until_text is None:
            fail(
                422,
                "invalid_body",
                f"signal extend needs payload.until, the new deadline: {ACCEPTED}",
            )
        until = deadline(until_text, "payload.")
    else:
        not_with(payload, "modifiedParams", "modifiedParams goes with signal approve")
    digest = optional_text(payload, "callDigest", "payload.")
    if name in ("stop", "extend"):
        not_with(payload, "callDigest", "callDigest goes with signal approve or reject")
    return SignalCall(name, request_id, reason, changes, by, remember, remember_when, digest, until)


BATCH_FIELDS = ("requestIds", "approved", "reason")
MAX_BATCH = 100  # request ids in one batch


@attrs.frozen
class BatchDecision:
    """`POST /approvals/batch`: `Clearance.decide_many(request_ids, **the rest)`."""

    request_ids: tuple[str, ...]
    approved: bool
    reason: str | None


def batch_decision(value: Any) -> BatchDecision:
    body = json_object(value, "the body")
    only(body, BATCH_FIELDS, "the body")
    ids = body.get("requestIds")
    if (
        not isinstance(ids, list)
        or not 1 <= len(ids) <= MAX_BATCH
        or not all(isinstance(i, str) and i for i in ids)
    ):
        fail(
            422,
            "invalid_body",
            f"requestIds is a list of 1 to {MAX_BATCH} 'apr-…' ids, e.g."
            ' {"requestIds": ["apr-1", "apr-2"], "approved": true}',
        )
    if len(set(ids)) != len(ids):
        fail(422, "invalid_body", "requestIds names a request more than once")
    approved = body.get("approved")
    if type(approved) is not bool:
        fail(422, "invalid_body", "approved is required and must be true or false")
    reason = optional_text(body, "reason", "")
    if approved:
        not_with(body, "reason", "reason goes with approved: false (a rejection)")
    return BatchDecision(tuple(ids), approved, reason)


# -- the listing's query -------------------------------------------------------------------


@attrs.frozen
class Listing:
    """`GET /approvals`: `Clearance.pending(agent_tag, limit=limit, after=after)`."""

    agent_tag: str | None
    limit: int
    after: str | None = None


def listing(query: Mapping[str, str]) -> Listing:
    unknown = sorted(set(query) - set(LISTING_QUERY))
    if unknown:
        fail(
            422,
            "invalid_query",
            f"unknown query parameter(s): {', '.join(unknown)}; accepted: "
            f"{', '.join(LISTING_QUERY)}",
        )
    status = query.get("status", PENDING)
    if status != PENDING:
        known = status in REQUEST_STATUSES
        fail(
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
        fail(422, "invalid_query", f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return Listing(query.get("agentTag") or None, int(limit_text), query.get("after") or None)
