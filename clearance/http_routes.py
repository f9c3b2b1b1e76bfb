"""The HTTP API's routes: credentials first, then the body (`http_bodies`), then exactly one
call on the `Clearance` facade, then the answer (`views`), or an error (`http_errors`).

The routes talk to the facade only: `decide`, `signal`, `pending`, `get_execution`
and its reads (`request`, `execution`); never to its store.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from clearance import page_session, views
from clearance.callback import Admitted, TokenError, check_token
from clearance.core.decide import standing_decision
from clearance.core.errors import ClearanceError, InvalidParameters, Refusal, RefusalCode
from clearance.core.execution import PENDING, TIMED_OUT, ApprovalRequest
from clearance.core.reviewers import CLAIMED, Identity, admin
from clearance.http_bodies import (
    batch_decision,
    callback_decision,
    listing,
    read_json,
    signal_call,
)
from clearance.http_errors import REFUSAL_STATUS, ApiError, fail
from clearance.openapi import openapi_document
from clearance.ports.store import UnknownRequest, UnreadableExecution
from clearance.reviewer_keys import key_id_of

if TYPE_CHECKING:
    from clearance.app import Clearance

Endpoint = Callable[[Request], Awaitable[Response]]


class JSONView(Response):
    """A JSON answer, encoded by `views.encode`: strict JSON that no value can break."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return views.encode(content)


def error_response(err: ApiError) -> Response:
    return JSONView(err.body(), status_code=err.status, headers=err.headers or None)


# -- credentials -------------------------------------------------------------------------


async def authenticate(app: Clearance, request: Request) -> Identity:
    """Who is asking: the reviewer a trusted header names (only where the operator
    enabled that header), else the bearer key's owner (the instance API key is
    `admin`), else the inbox page's session cookie's. Page sessions' state-changing
    requests must carry their CSRF token (`page_session`). Refused before anything
    is looked up or changed."""
    found = page_session.credential(request, app.trust_header)
    if found is None:
        if not app.api_key:
            _not_configured()
        err = ApiError(401, "unauthorized", "send Authorization: Bearer <api key>")
        err.headers["WWW-Authenticate"] = "Bearer"
        raise err
    kind, given = found
    page_session.check_csrf(request, kind, given)
    if kind == "header":
        who = await app.reviewer_identity(given)
        if who is None:
            fail(403, "forbidden", f"{app.trust_header} names {given!r}, who is not a reviewer")
        return who
    return await key_identity(app, given)


async def key_identity(app: Clearance, given: str) -> Identity:
    """The owner of a key: a reviewer's key, or the instance API key (`admin`)."""
    if key_id_of(given) is not None:
        who = await app.identify(given)
        if who is None:
            fail(403, "forbidden", "the reviewer key is not valid (unknown, revoked or expired)")
        return who
    if not app.api_key:
        _not_configured()
    if not hmac.compare_digest(given.encode("utf-8", "replace"), app.api_key.encode("utf-8")):
        fail(403, "forbidden", "the API key is not valid")
    return admin()


def _not_configured() -> NoReturn:
    fail(
        503,
        "not_configured",
        "this route needs an API key: Clearance.open(..., api_key=...), or "
        "$CLEARANCE_API_KEY for `clearance serve`; or a reviewer's key "
        "(clearance reviewer add NAME)",
    )


async def require_token(app: Clearance, request: Request, request_id: str) -> Admitted:
    """What the callback URL's token admits (the call digest it was sent for), or the
    HTTP error that says why it admits nothing."""
    if not app.webhook_secret:
        fail(
            503,
            "not_configured",
            "callbacks need a webhook secret: Clearance.open(..., webhook_secret='whsec_…'), "
            "or $CLEARANCE_WEBHOOK_SECRET for `clearance serve`",
        )
    token = request.query_params.get("token")
    now = app.clock.now()
    try:
        admitted = check_token(app.webhook_secrets, request_id, token, now)
        if admitted.digest is not None:
            # Bound to the call, not a time: the deadline is the request's, as it is now.
            current = await app.request(request_id)
            if current is not None and current.status == PENDING and now >= current.timeout:
                raise TokenError(
                    410, "this approval request has expired; it can no longer be decided"
                )
        return admitted
    except TokenError as err:
        # A token of the first form (bound to the deadline it was made with, its MAC
        # checked): a reviewer may have extended the request since, which extends the
        # URLs already handed out for it.
        if err.status == 410:
            current = await app.request(request_id)
            if current is not None and current.status == PENDING and now < current.timeout:
                return Admitted()
        fail(err.status, err.code, str(err))


# -- refusals ----------------------------------------------------------------------------


async def refused(app: Clearance, refusal: Refusal, request_id: str | None) -> NoReturn:
    """The HTTP answer for a refusal; nothing was changed when `decide()` refused. A second
    decision names the one that stands (410 when that is a timeout)."""
    code, message = refusal.code, str(refusal)
    if isinstance(refusal, InvalidParameters):
        fail(REFUSAL_STATUS[code], code, message, problems=list(refusal.problems))
    if code == RefusalCode.ALREADY_DECIDED and request_id:
        request = await app.request(request_id)
        if request is not None:
            if request.status == TIMED_OUT:
                code = RefusalCode.EXPIRED
            standing = views.decision_summary(request)
            fail(REFUSAL_STATUS[code], code, standing_decision(request), decision=standing)
    fail(REFUSAL_STATUS[code], code, message)


# -- routes ------------------------------------------------------------------------------


def routes(app: Clearance, max_body: int) -> list[Route]:
    def callback_url(request: ApprovalRequest) -> str | None:
        return app.callback_url(request) if app.public_url and app.webhook_secret else None

    async def respond(request: Request) -> Response:
        request_id = request.path_params["requestId"]
        admitted = await require_token(app, request, request_id)
        call = callback_decision(await read_json(request, max_body))
        digest = call.digest or admitted.digest
        if admitted.digest is not None and digest != admitted.digest:
            fail(
                409,
                RefusalCode.STALE_DECISION,
                f"callDigest {call.digest!r} is not the call this callback URL was sent for"
                f" ({admitted.digest!r}): look at the request again and decide what it asks",
            )
        try:
            ex = await app.decide(
                request_id,
                approved=call.approved,
                reason=call.reason,
                modified_params=call.modified_params,
                # The token proves the URL was ours to hand out, not who holds it.
                by=Identity(call.by, CLAIMED) if call.by else None,
                # Bound to the call the URL was sent for: a decision through a URL of an
                # earlier call (the agent was redefined since) is refused as stale.
                digest=digest,
            )
        except Refusal as refusal:
            await refused(app, refusal, request_id)
        except UnreadableExecution:
            raise  # not "busy": trying again cannot help (see unreadable)
        except ClearanceError as err:
            fail(503, "busy", f"{err}; try again")
        decided = ex.request(request_id)
        assert decided is not None  # decide() just decided it
        return JSONView(views.decision(decided, ex.status))

    async def signal(request: Request) -> Response:
        who = await authenticate(app, request)
        execution_id = request.path_params["executionId"]
        call = signal_call(await read_json(request, max_body))
        if call.by is not None and call.by != who.name:
            fail(
                422,
                "invalid_body",
                f"payload.by is {call.by!r}, but the credential is {who.name!r}'s: `by` comes"
                " from the credential (leave it out)",
            )
        try:
            ex = await app.signal(
                execution_id,
                call.name,
                request_id=call.request_id,
                modified_params=call.modified_params,
                reason=call.reason,
                by=who,
                remember=call.remember,
                remember_when=call.remember_when,
                digest=call.digest,
                until=call.until,
            )
        except Refusal as refusal:
            await refused(app, refusal, call.request_id)
        except UnreadableExecution:
            raise  # not "busy": trying again cannot help (see unreadable)
        except ClearanceError as err:
            fail(503, "busy", f"{err}; try again")
        decided = ex.request(call.request_id) if call.request_id else None
        if decided is None:
            answer = {"signal": call.name, "executionId": ex.id, "executionStatus": ex.status}
        else:
            answer = {"signal": call.name, **views.decision(decided, ex.status)}
        return JSONView(answer)

    async def batch(request: Request) -> Response:
        who = await authenticate(app, request)
        call = batch_decision(await read_json(request, max_body))
        try:
            outcomes = await app.decide_many(
                call.request_ids, approved=call.approved, reason=call.reason, by=who
            )
        except UnreadableExecution:
            raise
        except ClearanceError as err:
            fail(503, "busy", f"{err}; try again")
        return JSONView({"results": [views.batch_outcome(o) for o in outcomes]})

    async def approvals(request: Request) -> Response:
        await authenticate(app, request)
        query = listing(request.query_params)
        try:
            pending = await app.pending(query.agent_tag, limit=query.limit, after=query.after)
        except UnknownRequest as err:
            fail(422, "invalid_query", f"after: {err}")
        # A full page may have a next one: ask for it with after=<its last requestId>.
        after = pending[-1].request_id if len(pending) == query.limit else None
        latest = await app.extendable(pending)
        listed = [views.approval(r, callback_url, latest.get(r.request_id)) for r in pending]
        return JSONView({"approvals": listed, "next": after})

    async def execution(request: Request) -> Response:
        await authenticate(app, request)
        try:
            history = await app.get_execution(request.path_params["executionId"])
        except Refusal as refusal:
            await refused(app, refusal, None)
        ex = history.execution
        latest = await app.extendable(ex.pending_approvals)
        return JSONView(views.execution(ex, history.events, callback_url, latest))

    async def openapi(request: Request) -> Response:
        return JSONView(openapi_document(request.scope.get("root_path", "")))

    return [
        Route("/approvals/{requestId}/respond", guarded(respond), methods=["POST"]),
        Route("/executions/{executionId}/signal", guarded(signal), methods=["POST"]),
        Route("/approvals/batch", guarded(batch), methods=["POST"]),
        Route("/approvals", guarded(approvals), methods=["GET"]),
        Route("/executions/{executionId}", guarded(execution), methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]


def guarded(endpoint: Endpoint) -> Endpoint:
    async def answer(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ApiError as err:
            return error_response(err)

    return answer


# -- errors outside the routes ------------------------------------------------------------


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = {
        404: f"no route {request.url.path}; see /openapi.json",
        405: f"{request.method} is not allowed on {request.url.path}; see /openapi.json",
    }.get(exc.status_code, str(exc.detail))
    err = ApiError(exc.status_code, code, message)
    err.headers.update(exc.headers or {})
    return error_response(err)


async def unreadable(request: Request, exc: Exception) -> Response:
    return error_response(ApiError(500, "unreadable_execution", str(exc)))


async def server_error(request: Request, exc: Exception) -> Response:
    return error_response(ApiError(500, "internal_error", "internal error; see the server log"))


EXCEPTION_HANDLERS: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    HTTPException: http_error,
    UnreadableExecution: unreadable,
    500: server_error,
}
