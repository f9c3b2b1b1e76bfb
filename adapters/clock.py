"""Clocks: the system's, and a fake one that tests move by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class SystemClock:
    drives_timers = True

    def now(self) -> datetime:
        return datetime.now(UTC)


class FakeClock:
    """Time stands still until `advance()`; timers fire only through `fire_due_timers()`."""

    drives_timers = False

    def __init__(self, start: datetime | None = None) -> None:
        start = start or datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
        if start.tzinfo is None:
            raise ValueError("FakeClock(start=...) needs an aware datetime, e.g. tzinfo=UTC")
        self._now = start.astimezone(UTC)

    def now(self) -> datetime:
        return self._now

    def advance(
        self, *, seconds: float = 0, minutes: float = 0, milliseconds: float = 0
    ) -> datetime:
        step = timedelta(seconds=seconds, minutes=minutes, milliseconds=milliseconds)
        if step < timedelta(0):
            raise ValueError("FakeClock.advance() moves forward only")
        self._now += step
        return self._now
