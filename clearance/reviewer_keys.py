"""Reviewer keys: made here, shown once, stored only as a digest.

A key is `clr_<key id>_<secret>`: the id finds the key's row (`ReviewerKey`), the
secret is checked against its SHA-256 digest. A key is 32 random bytes, so a slow
password hash would buy nothing: nobody guesses 256 bits.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import datetime

from clearance.core.reviewers import ReviewerKey, valid_name

KEY = re.compile(r"clr_([a-z0-9]{12})_([A-Za-z0-9_-]{43})")
ID_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"


def new_key(
    reviewer: str, now: datetime, expires_at: datetime | None = None
) -> tuple[str, ReviewerKey]:
    """A fresh key for `reviewer`: the text to hand over once, and the row to store."""
    key_id = "".join(secrets.choice(ID_LETTERS) for _ in range(12))
    secret = secrets.token_urlsafe(32)
    text = f"clr_{key_id}_{secret}"
    return text, ReviewerKey(key_id, valid_name(reviewer), _digest(secret), now, expires_at)


def key_id_of(text: str) -> str | None:
    """The id part of a key's text, or None when it is not shaped as a key."""
    match = KEY.fullmatch(text.strip())
    return match.group(1) if match else None


def key_matches(text: str, key: ReviewerKey) -> bool:
    match = KEY.fullmatch(text.strip())
    if match is None or match.group(1) != key.key_id:
        return False
    return hmac.compare_digest(_digest(match.group(2)), key.digest)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()
