"""The reviewers' inbox: a web page, served by `app.asgi()` (and so `clearance serve`)
under `/inbox`, with no build step: plain HTML, CSS and JavaScript shipped in the
package (`clearance/inbox_static/`).

    GET    /inbox/                     the page (GET /inbox redirects here)
    GET    /inbox/static/{name}        its script, style sheet and icon
    GET    /inbox/api/session          who is signed in, the CSRF token, the server's clock
    POST   /inbox/api/session          sign in: {"key": "clr_…" or the instance API key}
    DELETE /inbox/api/session          sign out: the cookie is cleared
    GET    /inbox/api/executions/{executionId}/tools/{tool}   the tool's input schema

Everything else the page does goes through the HTTP API's own routes, with the
session cookie in place of a bearer key: `GET /approvals`, `GET /executions/{id}`,
`POST /executions/{id}/signal`, `POST /approvals/batch`; so a page decision is held
to the same grants, validation and guarantees as any other. So is an extension: the
page offers one (signal `extend`) only where the execution's view gives a pending
request an `extendableUntil`, and shows the server's refusal or the new deadline.
Sessions and CSRF are `page_session`'s.

The tool schema is read from the execution's own agent spec (what the server checks
modified parameters against), not from the agents this process hosts: `clearance
serve` hosts none, and an agent redefined since the request was made may take other
parameters now.

Every answer of the app (page, assets, API) carries `SECURITY_HEADERS`: a strict
Content-Security-Policy (no inline script or style), nosniff, no referrer, and
`Cache-Control: no-store` unless the route set its own.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clearance import page_session
from clearance.core.execution import iso
from clearance.http_bodies import json_object, only, read_json
from clearance.http_errors import fail
from clearance.http_routes import JSONView, authenticate, guarded, key_identity

if TYPE_CHECKING:
    from clearance.app import Clearance
    from clearance.core.reviewers import Identity

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'"
)
SECURITY_HEADERS = (
    ("content-security-policy", CSP),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("cache-control", "no-store"),
)

MOUNT = "/inbox"  # where the page is, inside the API
STATIC = "inbox_static"
ASSETS = {
    "inbox.js": "text/javascript; charset=utf-8",
    "inbox.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
SIGN_IN_FIELDS = ("key",)


class SecurityHeaders:
    """ASGI middleware: `SECURITY_HEADERS` on every HTTP answer, where not already set."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in SECURITY_HEADERS:
                    if name.encode() not in present:
                        headers.append((name.encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, sending)


def _static(name: str) -> bytes:
    return resources.files("clearance").joinpath(STATIC, name).read_bytes()


def _session(
    app: Clearance, who: Identity, kind: page_session.CredentialKind, value: str
) -> JSONView:
    token = page_session.session_token(kind, value)
    return JSONView(
        {
            "name": who.name,
            "byKind": who.kind,
            "via": kind,
            "csrfToken": token,
            "now": iso(app.clock.now()),
            "trustHeader": app.trust_header,
        }
    )


def mount(app: Clearance, max_body: int) -> Mount:
    """The inbox's routes, to mount at `/inbox` beside the API's."""

    async def page(request: Request) -> Response:
        return Response(_static("index.html"), media_type="text/html; charset=utf-8")

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            fail(404, "not_found", f"no inbox asset {name!r}")
        return Response(
            _static(name), media_type=ASSETS[name], headers={"Cache-Control": "no-cache"}
        )

    async def session(request: Request) -> Response:
        who = await authenticate(app, request)
        found = page_session.credential(request, app.trust_header)
        assert found is not None  # authenticate() refused a request without one
        return _session(app, who, *found)

    async def sign_in(request: Request) -> Response:
        page_session.refuse_cross_site(request)
        found = page_session.credential(request, app.trust_header)
        if found is not None and found[0] == "header":
            # The header would still win over the cookie (see `authenticate`).
            fail(
                409,
                "signed_in_by_proxy",
                f"{app.trust_header} already says who you are ({found[1]!r}); a key"
                " cannot sign in over it",
            )
        body = json_object(await read_json(request, max_body), "the body")
        only(body, SIGN_IN_FIELDS, "the body")
        key = body.get("key")
        if not isinstance(key, str) or not key.strip():
            fail(422, "invalid_body", 'key is required: {"key": "clr_…"} or the API key')
        key = key.strip()
        who = await key_identity(app, key)
        answer = _session(app, who, "cookie", key)
        answer.set_cookie(
            page_session.SESSION_COOKIE, page_session.cookie_value(key), **_cookie(request)
        )
        return answer

    async def sign_out(request: Request) -> Response:
        page_session.refuse_cross_site(request)
        answer = JSONView({"signedOut": True})
        answer.delete_cookie(page_session.SESSION_COOKIE, **_cookie(request))
        return answer

    async def tool_schema(request: Request) -> Response:
        await authenticate(app, request)
        execution_id, tool = request.path_params["executionId"], request.path_params["tool"]
        ex = await app.execution(execution_id)
        if ex is None:
            fail(404, "unknown_execution", f"no execution '{execution_id}'")
        spec = ex.agent.tool(tool)
        if spec is None:
            fail(
                404,
                "unknown_tool",
                f"agent '{ex.agent_tag}' of execution '{execution_id}' has no tool '{tool}'",
            )
        return JSONView(
            {
                "agentTag": ex.agent_tag,
                "tool": spec.tag,
                "description": spec.description,
                "inputSchema": spec.input_schema,
            }
        )

    return Mount(
        MOUNT,
        routes=[
            Route("/", guarded(page), methods=["GET"]),
            Route("/static/{name}", guarded(asset), methods=["GET"]),
            Route("/api/session", guarded(session), methods=["GET"]),
            Route("/api/session", guarded(sign_in), methods=["POST"]),
            Route("/api/session", guarded(sign_out), methods=["DELETE"]),
            Route(
                "/api/executions/{executionId}/tools/{tool}", guarded(tool_schema), methods=["GET"]
            ),
        ],
    )


def _cookie(request: Request) -> dict[str, Any]:
    """The session cookie's attributes, the same to set it and to clear it: scoped to
    where the API is mounted (`root_path`, e.g. /clearance), so the browser sends the key
    to this API only, not to the app around it."""
    root: str = request.scope.get("root_path", "")
    return {
        "path": root.removesuffix(MOUNT).rstrip("/") + "/",
        "secure": request.url.scheme == "https",
        "httponly": True,
        "samesite": "strict",
    }
