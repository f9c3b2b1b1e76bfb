"""The inbox page's sessions: which credential a request carries, and the CSRF check
the page's state-changing requests must pass.

A request is authenticated by exactly one credential, looked for in this order:

- `header`: the trusted identity header (`Clearance(trust_header=...)`), only where
  the operator enabled it: an SSO proxy in front of the API sets it.
- `bearer`: `Authorization: Bearer <key>`, a reviewer's key or the instance API key.
- `cookie`: the page's session cookie, set at sign-in. It holds the key itself
  (percent-encoded), so a stolen cookie is a stolen key, and any process of the
  instance checks it the way it checks a bearer key: no server-side session, no
  shared session secret. HttpOnly, SameSite=Strict, Path = where the API is mounted,
  Secure over https.

CSRF. A browser attaches a cookie (or, behind an SSO proxy, the proxy attaches the
identity header) to requests another site makes it send; a bearer key it never
attaches by itself, so bearer requests need no check. Every state-changing request
of a cookie or (from a browser) a header session must carry `X-CSRF-Token`:

- cookie sessions: HMAC-SHA256(key, "clearance-csrf") in hex, which only someone
  holding the key (the page, told at sign-in) can compute;
- header sessions: HMAC-SHA256("trusted-header\\n" + name, "clearance-csrf"), which is
  no secret: there is no secret every process of an instance shares (a per-process
  one would break behind a load balancer). What protects these is that another
  origin cannot send a custom header (nor an application/json body) without a CORS
  preflight, which this app never grants, and that a browser request marked
  cross-site or same-site by `Sec-Fetch-Site` is refused outright. A header session
  is "from a browser" when the request has `Origin` or `Sec-Fetch-Site`, which every
  current browser sends with a POST; API clients behind the proxy send neither and
  keep working without a token.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal
from urllib.parse import quote, unquote

from starlette.requests import Request

from clearance.http_errors import fail

SESSION_COOKIE = "clearance_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

CredentialKind = Literal["header", "bearer", "cookie"]


def credential(request: Request, trust_header: str | None) -> tuple[CredentialKind, str] | None:
    """The one credential `request` is authenticated by, and its value (a reviewer's
    name for `header`, a key otherwise), or None when it carries none."""
    if trust_header and request.headers.get(trust_header):
        return "header", request.headers[trust_header].strip()
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and given.strip():
        return "bearer", given.strip()
    if scheme:  # another scheme (Basic, …): refused as a missing bearer key, not a cookie
        return None
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        return "cookie", unquote(cookie)
    return None


def csrf_token(secret: str) -> str:
    """The token a session's state-changing requests carry in `X-CSRF-Token`."""
    return hmac.new(secret.encode("utf-8"), b"clearance-csrf", hashlib.sha256).hexdigest()


def header_secret(name: str) -> str:
    """What a header session's token is derived from (no secret: see the module)."""
    return f"trusted-header\n{name}"


def session_token(kind: CredentialKind, value: str) -> str | None:
    """The CSRF token of a page session (None for a bearer key, which needs none)."""
    if kind == "cookie":
        return csrf_token(value)
    if kind == "header":
        return csrf_token(header_secret(value))
    return None


def from_browser(request: Request) -> bool:
    return "origin" in request.headers or "sec-fetch-site" in request.headers


def refuse_cross_site(request: Request) -> None:
    """A browser's request that another site (or a sibling subdomain) made it send."""
    site = request.headers.get("sec-fetch-site", "same-origin").lower()
    if site not in ("same-origin", "none"):
        fail(403, "csrf", f"a {site} request cannot use a page session (Sec-Fetch-Site)")


def check_csrf(request: Request, kind: CredentialKind, value: str) -> None:
    """Refuse (403 `csrf`, before anything is looked up or changed) a state-changing
    request of a page session without its token."""
    if request.method in SAFE_METHODS or kind == "bearer":
        return
    if kind == "header" and not from_browser(request):
        return
    refuse_cross_site(request)
    expected = session_token(kind, value)
    given = request.headers.get(CSRF_HEADER, "")
    if expected is None or not hmac.compare_digest(
        given.encode("utf-8", "replace"), expected.encode()
    ):
        fail(
            403,
            "csrf",
            "this page session's request needs the X-CSRF-Token header the page got when "
            "it signed in; reload the page",
        )


def cookie_value(key: str) -> str:
    return quote(key, safe="")
