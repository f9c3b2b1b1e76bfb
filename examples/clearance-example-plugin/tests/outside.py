"""What a program outside Clearance (a reviewer service) does with a spool, knowing
only the file format of `clearance_example_plugin.spool_broker`: read a subject's
messages in order, and add one."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any


def read(spool: Path, subject: str) -> list[tuple[bytes, dict[str, str]]]:
    """Each message on `subject`, in order: its body bytes and its headers."""
    messages = spool / subject / "messages"
    if not messages.is_dir():
        return []
    found = []
    for name in sorted(n for n in os.listdir(messages) if n.endswith(".msg")):
        envelope = json.loads((messages / name).read_bytes())
        found.append((envelope["body"].encode(), envelope.get("headers", {})))
    return found


def write(spool: Path, subject: str, body: dict[str, Any]) -> None:
    """Add a message to `subject`: whole (a temporary file linked into place) and under
    the number after the highest (the link fails if another writer took it)."""
    messages = spool / subject / "messages"
    messages.mkdir(parents=True, exist_ok=True)
    tmp = messages / f".tmp-{secrets.token_hex(8)}"
    tmp.write_text(json.dumps({"body": json.dumps(body)}))
    try:
        while True:
            numbers = [int(n[:16]) for n in os.listdir(messages) if n.endswith(".msg")]
            try:
                os.link(tmp, messages / f"{max(numbers, default=0) + 1:016d}.msg")
                return
            except FileExistsError:
                continue
    finally:
        tmp.unlink()
