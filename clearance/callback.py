"""Callback URLs: whoever holds one may decide that one approval request, about the call
it was sent for, until the request's deadline.

`{public_url}/approvals/{requestId}/respond?token=v2.{purpose}.{digest}.{mac}` where
`mac` is an HMAC-SHA256 over the request id, the call digest the request had when it
was sent and the delivery's purpose (request, reminder, stageN), keyed from the
instance's webhook secret. Unforgeable without the secret, checkable by any process
that shares it (no lookup), and bound to the call, not to a time: the deadline is
the request's current one (a reviewer may extend it), checked when the decision is
applied, and a decision through a URL sent for another call (the agent was redefined
since) is refused as stale.

Tokens of the first form, `{exp}.{mac}` over the request id and its expiry, which
URLs sent by earlier releases carry, are still accepted until that expiry (or the
request's later deadline). Several secrets may be given (rotation): the first signs,
any of them is accepted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import ClassVar
from urllib.parse import quote

import attrs

from clearance.core.errors import ClearanceError
from clearance.core.execution import ApprovalRequest

SECRET_PREFIX = "whsec_"


class TokenError(ClearanceError):
    """A callback token that does not admit this request: `status` is the HTTP answer and
    `code` the error code it carries (missing_token, invalid_token, expired)."""

    CODES: ClassVar[dict[int, str]] = {401: "missing_token", 403: "invalid_token", 410: "expired"}

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = self.CODES[status]


def secret_bytes(secret: str) -> bytes:
    """The key of a Standard Webhooks secret: `whsec_` + base64."""
    if not secret.startswith(SECRET_PREFIX):
        raise ClearanceError("webhook_secret must look like 'whsec_<base64>' (Standard Webhooks)")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except ValueError:
        raise ClearanceError("webhook_secret after 'whsec_' must be base64") from None
    if len(key) < 16:
        raise ClearanceError("webhook_secret must carry at least 16 random bytes")
    return key


def _key(secret: str) -> bytes:
    # Its own key, so a callback token can never double as a webhook signature.
    return hmac.new(secret_bytes(secret), b"clearance callback token v1", hashlib.sha256).digest()


def _mac(secret: str, request_id: str, expires: int) -> str:
    digest = hmac.new(_key(secret), f"{request_id}.{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _bound_mac(secret: str, request_id: str, digest: str, purpose: str) -> str:
    text = f"v2.{request_id}.{digest}.{purpose}".encode("utf-8", "surrogatepass")
    digest_bytes = hmac.new(_key(secret), text, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest_bytes).rstrip(b"=").decode()


# The digest's hex as it goes in a token (without "sha256:"), and a purpose's spelling.
_BOUND = re.compile(r"^v2\.([a-z0-9]{1,20})\.([0-9a-f]{64})\.([A-Za-z0-9_-]{43})$")


def token_for(secret: str, request: ApprovalRequest, purpose: str = "request") -> str:
    """The token of a callback URL for `request` as it is now, sent for `purpose`."""
    spelled = purpose.replace(":", "")
    digest = (request.digest or "").removeprefix("sha256:")
    return f"v2.{spelled}.{digest}.{_bound_mac(secret, request.request_id, digest, spelled)}"


def callback_url(
    public_url: str, secret: str, request: ApprovalRequest, purpose: str = "request"
) -> str:
    rid = quote(request.request_id, safe="")
    token = token_for(secret, request, purpose)
    return f"{public_url.rstrip('/')}/approvals/{rid}/respond?token={token}"


@attrs.frozen
class Admitted:
    """What a valid token says: the call digest it was sent for (None: a token of the
    first form, bound to a time instead), and that time, for such a token."""

    digest: str | None = None
    expires: datetime | None = None


def check_token(
    secrets: str | Sequence[str], request_id: str, token: str | None, now: datetime
) -> Admitted:
    """What `token` admits for `request_id`; raises TokenError: 401 missing, 403 forged or
    for another request, 410 expired (a first-form token past its expiry: the caller may
    still admit it where the request's deadline was extended)."""
    keys = [secrets] if isinstance(secrets, str) else list(secrets)
    if not token:
        raise TokenError(401, "missing callback token: use the callbackUrl exactly as sent")
    bound = _BOUND.match(token)
    if bound is not None:
        purpose, digest, mac = bound.groups()
        for secret in keys:
            expected = _bound_mac(secret, request_id, digest, purpose)
            if hmac.compare_digest(expected.encode(), mac.encode()):
                return Admitted(digest=f"sha256:{digest}")
        raise TokenError(403, "callback token is not valid for this approval request")
    if token.startswith("v2."):
        raise TokenError(403, "malformed callback token")
    return _check_first_form(keys, request_id, token, now)


def _check_first_form(keys: list[str], request_id: str, token: str, now: datetime) -> Admitted:
    expires_text, _, mac = token.partition(".")
    # isdecimal() alone admits non-ASCII digits that int() may still refuse.
    if not (expires_text.isascii() and expires_text.isdecimal()) or not mac:
        raise TokenError(403, "malformed callback token")
    try:
        expires = int(expires_text)
    except ValueError:  # more digits than int() reads
        raise TokenError(403, "malformed callback token") from None
    if not any(
        hmac.compare_digest(_mac(secret, request_id, expires).encode(), mac.encode())
        for secret in keys
    ):
        raise TokenError(403, "callback token is not valid for this approval request")
    if now.astimezone(UTC).timestamp() >= expires:
        raise TokenError(410, "this approval request has expired; it can no longer be decided")
    return Admitted(expires=datetime.fromtimestamp(expires, UTC))
