"""Id sources: unguessable ids in production, counters in tests."""

from __future__ import annotations

import itertools
import secrets


class RandomIds:
    def execution_id(self) -> str:
        return "exec-" + secrets.token_hex(8)

    def request_id(self) -> str:
        return "apr-" + secrets.token_hex(8)


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
