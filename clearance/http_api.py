"""The HTTP API: the spec's callback URL, its signal API, and reads, as one Starlette app.

    POST /approvals/{requestId}/respond?token=…   the callbackUrl; the token is the credential
    POST /executions/{executionId}/signal         Authorization: Bearer <api_key>
    GET  /approvals?status=pending&agentTag=…&limit=…    (bearer)
    GET  /executions/{executionId}                (bearer)
    GET  /openapi.json                            this API, described as OpenAPI 3.1
    GET  /inbox                                   the reviewers' page (`inbox`)

Theory of operation. Every write goes through `Clearance.decide()` or
`Clearance.signal()`, so the guarantees of the library hold over HTTP too:
one decision per request (settled by the store's version check, not by this
module), validated modified parameters, an audit record per decision. This
module only translates: it checks credentials before it looks anything up
(a wrong token learns nothing about which requests exist), bounds and parses
the body, turns the body into exactly one call, and maps each refusal to a
status code. Every error answer is `{"error": {"code", "message"}}` and is
given before anything changed; bad input never gets a 5xx.

Status codes: 400 not UTF-8 JSON (strict: NaN, Infinity and numbers out of range
such as 1e999 are not JSON); 401 missing credential; 403 wrong credential; 404
unknown request, execution or path; 405 wrong method; 409 already decided (the
error names the decision that stands) or the execution is in the wrong state;
410 expired or timed out; 413 body over `max_body` bytes; 415 not
`application/json`; 422 a body or query that parses but is not valid (with
`problems` for modified parameters that fail the tool's schema; also lone
surrogates and nesting deeper than 32 levels); 503 the route's secret is not
configured (`webhook_secret` for callbacks, `api_key` for the rest): a
deployment problem, not a client's. The refusal-code -> status map is
`http_errors.REFUSAL_STATUS`.

The pieces: `http_bodies` (what a request may say), `http_routes` (credentials, the
calls on the facade, the answers), `http_errors` (the error answer and the one map from
refusal codes to statuses), `views` (the camelCase answers), `openapi` (the document).

Mounted in your own app (`app.mount("/clearance", clearance.asgi())`), the
callback URL must include the mount point: `public_url="https://host/clearance"`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.middleware import Middleware

from clearance.http_bodies import MAX_BODY
from clearance.http_errors import ApiError
from clearance.http_routes import EXCEPTION_HANDLERS, routes
from clearance.inbox import SecurityHeaders
from clearance.inbox import mount as inbox
from clearance.openapi import openapi_document

if TYPE_CHECKING:
    from clearance.app import Clearance

__all__ = ["MAX_BODY", "ApiError", "build_asgi", "openapi_document"]


def build_asgi(app: Clearance, *, max_body: int = MAX_BODY) -> Starlette:
    """The HTTP API over `app` as a Starlette app: serve it, or mount it in your own."""
    api = Starlette(
        routes=[*routes(app, max_body), inbox(app, max_body)],
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[Middleware(SecurityHeaders)],
    )
    api.state.clearance = app
    return api
