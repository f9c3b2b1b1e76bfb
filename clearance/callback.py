"""Callback URLs: whoever holds one may decide that one approval request, until it expires.

`{public_url}/approvals/{requestId}/respond?token={exp}.{mac}` where `mac` is an
HMAC-SHA256 over the request id and its expiry, keyed from the instance's
webhook secret. Unforgeable without the secret, bound to one request and its
expiry, and checkable by any process that shares the secret (no lookup).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime
from typing import ClassVar
from urllib.parse import quote

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


def token_for(secret: str, request: ApprovalRequest) -> str:
    expires = int(request.timeout.timestamp())
    return f"{expires}.{_mac(secret, request.request_id, expires)}"


def callback_url(public_url: str, secret: str, request: ApprovalRequest) -> str:
    rid = quote(request.request_id, safe="")
    return f"{public_url.rstrip('/')}/approvals/{rid}/respond?token={token_for(secret, request)}"


def check_token(secret: str, request_id: str, token: str | None, now: datetime) -> None:
    """Raises TokenError: 401 missing, 403 forged or for another request, 410 expired."""
    if not token:
        raise TokenError(401, "missing callback token: use the callbackUrl exactly as sent")
    expires_text, _, mac = token.partition(".")
    # isdecimal() alone admits non-ASCII digits that int() may still refuse.
    if not (expires_text.isascii() and expires_text.isdecimal()) or not mac:
        raise TokenError(403, "malformed callback token")
    try:
        expires = int(expires_text)
    except ValueError:  # more digits than int() reads
        raise TokenError(403, "malformed callback token") from None
    expected = _mac(secret, request_id, expires)
    if not hmac.compare_digest(expected.encode(), mac.encode()):
        raise TokenError(403, "callback token is not valid for this approval request")
    if now.astimezone(UTC).timestamp() >= expires:
        raise TokenError(410, "this approval request has expired; it can no longer be decided")
