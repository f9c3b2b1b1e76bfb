"""The id port: execution and approval request ids come from here, never from the core."""

from __future__ import annotations

from typing import Protocol


class IdSource(Protocol):
    def execution_id(self) -> str: ...

    def request_id(self) -> str: ...
