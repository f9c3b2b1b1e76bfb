"""JSON bodies as small blobs: compact JSON, raw deflate, primed with a preset dictionary.

A stored event or approval request is a few hundred bytes of JSON, mostly key
names and fixed phrases that repeat in every row; plain zlib gains little on
so little text, but deflate primed with those phrases (a preset dictionary,
RFC 1951/1950's `zdict`) shrinks a model reply to about a third. This is
what keeps a paused execution at about a quarter of the bytes LangGraph
stores for an interrupted thread (BENCHMARKS.md).

The first byte names the dictionary (0: none, the JSON as it is). A blob
written with one can only be read with that same dictionary, byte for byte:
never edit `_DICTIONARIES[1]`, add a version and point `_CURRENT` at it.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

# Most frequent phrases last: deflate reaches the end of a dictionary most cheaply.
_V1 = (
    b'{"type":"stop_requested","by":null,"reason":null}'
    b'{"type":"model_failed","error":"model call failed: "}'
    b'{"type":"tool_failed","error":"'
    b'{"type":"rejected","reason":"","by":"'
    b'{"type":"timer_fired","request_id":"apr-'
    b'{"type":"approved","modified_params":null,"by":"'
    b'{"type":"tool_finished","output":{"'
    b'"status":"pending","decided_by":null,"decided_at":null,"modified_params":null,'
    b'"rejection_reason":null}'
    b'"timeout_ms":300000,"timeout":"2026-'
    b'{"request_id":"apr-","execution_id":"exec-","agent_tag":"","tool":"",'
    b'"tool_use_id":"toolu_","parameters":{"'
    b'"input_tokens":0,"output_tokens":0}'
    b'"stop_reason":"end_turn"'
    b'{"type":"started","execution_id":"exec-","input":"","session_id":null,"at":"2026-'
    b'{"type":"model_replied","turn":1,"content":[{"type":"text","text":"'
    b'{"type":"tool_use","name":"","input":{"'
    b'"id":"toolu_01'
    b'"stop_reason":"tool_use","at":"2026-11-26T00:00:00.000000Z",'
    b'"usage":{"input_tokens":0,"output_tokens":0},'
    b'"tickets":[{"tool_use_id":"toolu_01","request_id":"apr-",'
    b'"reason":"Calling \'\' requires approval"}]'
)
_DICTIONARIES = {1: _V1}
_CURRENT = 1
# A 2 KB window holds the dictionary and a typical body; a larger one only costs
# allocation time on every call and buys nothing at these sizes.
_WBITS = -11
_LEVEL = 6
_MEMLEVEL = 4


# Below this, deflate saves a few dozen bytes at the price of priming the dictionary
# (most of a pack's time): short bodies (decisions, small tool results) stay plain.
_PLAIN_BELOW = 200
_PLAIN = 0
# Compact JSON text, also for the store's plain-text columns. One encoder, not one
# per call (what json.dumps makes for non-default options).
compact_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


# For the rare body holding a lone surrogate (a model's garbage, kept faithfully in
# the log so its refusal can be replayed): escaped, it is plain ASCII JSON.
_ascii_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def pack(data: Any) -> bytes:
    try:
        text = compact_json(data).encode()
    except UnicodeEncodeError:
        text = _ascii_json(data).encode()
    if len(text) < _PLAIN_BELOW:
        return bytes((_PLAIN,)) + text
    deflate = zlib.compressobj(
        _LEVEL, zlib.DEFLATED, _WBITS, _MEMLEVEL, zlib.Z_DEFAULT_STRATEGY, _DICTIONARIES[_CURRENT]
    )
    return bytes((_CURRENT,)) + deflate.compress(text) + deflate.flush()


def unpack(blob: bytes) -> Any:
    if blob[:1] == bytes((_PLAIN,)):
        return json.loads(blob[1:])
    zdict = _DICTIONARIES.get(blob[0]) if blob else None
    if zdict is None:
        head = blob[:1].hex() or "nothing"
        raise ValueError(
            f"not a packed JSON body (first byte {head}; known: 0 for plain JSON,"
            f" dictionaries {', '.join(map(str, _DICTIONARIES))})"
        )
    inflate = zlib.decompressobj(_WBITS, zdict)
    return json.loads(inflate.decompress(blob[1:]) + inflate.flush())
