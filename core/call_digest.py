"""The digest of one exact call: what a decision is bound to.

A request records the digest of the call it asks about: the agent, the tool, the
arguments (canonical JSON), the hash of the tool's parameter schema and the policy
version that judged it. A reviewer's tool sends back the digest it showed; a decision
made for another digest (another call, or this one under another schema or policy) is
refused rather than applied to what the reviewer never saw.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical(data: Any) -> str:
    """Sorted keys, no spaces, strict JSON: the same data, the same text."""
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _sha256(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def call_digest(
    agent: str, tool: str, args: dict[str, Any], schema: dict[str, Any], policy: str | None
) -> str:
    body = {
        "agent": agent,
        "tool": tool,
        "args": args,
        "schema": _sha256(canonical(schema)),
        "policy": policy,
    }
    return _sha256(canonical(body))
