"""Rebuilding an execution from what a store kept: a snapshot and the events after it.

`decide()` is pure, so folding the log through it gives back the state the live
steps made (tests/test_properties.py checks it on every run it generates, and a
corpus of logs written by earlier releases checks it across versions). A store
calls this; it never folds by itself.

Replay across versions: each log records the `DECIDE_VERSION` that wrote it. A
change to `decide()` that would fold an old log differently must keep the old
behaviour for logs of the old version (branch on `version` here), never
silently give an execution in flight another state.
"""

from __future__ import annotations

from collections.abc import Iterable

from clearance.core.agent import AgentSpec
from clearance.core.decide import DECIDE_VERSION, decide
from clearance.core.events import Event
from clearance.core.execution import Execution

# Logs written before versions were recorded read as version 1.
OLDEST_VERSION = 1
__all__ = ["DECIDE_VERSION", "OLDEST_VERSION", "ReplayFailed", "UnknownVersion", "replay"]


class UnknownVersion(ValueError):
    """A log written by a newer Clearance: folding it with this one could differ."""


class ReplayFailed(ValueError):
    """Event `index` (0-based, after the snapshot) does not fold onto the state before it."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.index = index
        self.error = error


def replay(
    spec: AgentSpec,
    snapshot: Execution | None,
    events: Iterable[Event],
    version: int = DECIDE_VERSION,
) -> Execution:
    """The state after `events`, which follow `snapshot` (or start from nothing)."""
    if not OLDEST_VERSION <= version <= DECIDE_VERSION:
        raise UnknownVersion(
            f"this log was written by decide() version {version}; this Clearance replays "
            f"versions {OLDEST_VERSION} to {DECIDE_VERSION}: upgrade Clearance to read it"
        )
    # Versions 1 and 2 fold alike: version 2 only renamed a tool call's "running" to
    # "executing", which the snapshot reader maps.
    execution = snapshot if snapshot is not None else Execution(agent=spec)
    for index, event in enumerate(events):
        try:
            execution, _ = decide(execution, event)
        except Exception as err:
            raise ReplayFailed(index, err) from err
    return execution
