"""The state of an execution is its events folded through `decide()`.

Stores keep the log, not a copy of the state after every step: `decide()` is
pure and deterministic, so folding the log always rebuilds the same state
(tests/test_properties.py checks it on every run it generates).
"""

from __future__ import annotations

from collections.abc import Iterable

from clearance.core.decide import decide
from clearance.core.events import Event
from clearance.core.execution import Execution


def replay(start: Execution, events: Iterable[Event]) -> Execution:
    """`start` moved through `events`, which must follow it in order with no gap."""
    ex = start
    for event in events:
        ex, _ = decide(ex, event)
    return ex
