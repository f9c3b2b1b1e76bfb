"""Id sources: unguessable ids in production, counters in tests."""

from __future__ import annotations

import itertools
import secrets
import time


def _time_ordered() -> str:
    """Milliseconds since the epoch (fixed width) then 64 random bits.

    New ids sort after older ones, so rows keyed by them are appended at the
    right edge of their B-trees: pages fill up instead of splitting at random,
    and consecutive commits rewrite the same few pages (the UUIDv7 argument).
    """
    return f"{time.time_ns() // 1_000_000:011x}{secrets.token_hex(8)}"


class RandomIds:
    def execution_id(self) -> str:
        return "exec-" + _time_ordered()

    def request_id(self) -> str:
        return "apr-" + _time_ordered()


class SequentialIds:
    """exec-1, apr-1, ...: readable ids for tests. Not unique across processes."""

    def __init__(self, prefix: str = "") -> None:
        self._executions = itertools.count(1)
        self._requests = itertools.count(1)
        self._prefix = prefix

    def execution_id(self) -> str:
        return f"exec-{self._prefix}{next(self._executions)}"

    def request_id(self) -> str:
        return f"apr-{self._prefix}{next(self._requests)}"
