"""JSON text for the wire and for people: strict, and never failing on a value.

`dumps` and `encode` are the one encoder of everything Clearance shows or sends
(the HTTP API's answers, the CLI's --json output, the webhook body), kept in the
core so that an adapter (a channel that sends an approval request) encodes the
body exactly as the views do. The text is strict JSON (no NaN, no Infinity,
valid UTF-8), and a value JSON cannot carry never breaks it: that value is
spelt as text ("NaN", "Infinity", "-Infinity"; U+FFFD for a lone surrogate),
so one odd parameter a model proposed cannot break a listing or a delivery.
"""

from __future__ import annotations

import json
from typing import Any

_INFINITY = float("inf")
_WIRE = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def dumps(data: Any, *, indent: int | None = None, compact: bool = False) -> str:
    """`data` as strict JSON text that always encodes as UTF-8: `compact` for the wire (no
    spaces, as webhooks send it), `indent` for people, else one line with the usual spaces."""
    separators = (",", ":") if compact else None
    try:
        text = json.dumps(
            data, ensure_ascii=False, allow_nan=False, indent=indent, separators=separators
        )
        text.encode("utf-8")
    except (ValueError, TypeError):  # NaN, Infinity, a lone surrogate, a non-JSON type
        text = json.dumps(
            _plain(data), ensure_ascii=False, allow_nan=False, indent=indent, separators=separators
        )
    return text


def encode(data: Any) -> bytes:
    """`data` as compact strict JSON in UTF-8: an HTTP answer's body."""
    try:
        return _WIRE.encode(data).encode("utf-8")
    except (ValueError, TypeError):
        return _WIRE.encode(_plain(data)).encode("utf-8")


def _plain(value: Any) -> Any:
    """`value` with what JSON cannot carry spelt as text."""
    if isinstance(value, str):
        return _valid_text(value)
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        if value != value:
            return "NaN"
        if value in (_INFINITY, -_INFINITY):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, dict):
        return {_valid_text(str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return _valid_text(str(value))


def _valid_text(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    return text
