"""The clock port: the only source of 'now' the runtime has."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol


class Clock(Protocol):
    # Whether timers should fire by themselves as wall time passes. A fake clock
    # says no: tests move time and call fire_due_timers() when they choose.
    drives_timers: bool

    def now(self) -> datetime: ...
