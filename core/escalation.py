"""When a pending request's reminder and escalation stages come due.

A request's timers are rows in the store, like its timeout: one per time something
is due (core.rows writes them). Which thing a timer stands for is not stored with
it: `due(request, tool, at)` works it out from the request (when it opened, its
deadline, what has fired already) and the time the timer fired, so a timer row is
only ever (request, due time), and replay reads the same answer from the same log.

The reminder is due `remind_before_ms` before the deadline (so it moves when a
reviewer extends the deadline); stage N is due `after_ms` after the request opened.
Nothing is due at or after the deadline: then the request times out instead.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import attrs

from clearance.core.agent import Stage, ToolSpec
from clearance.core.execution import ApprovalRequest

REMINDER = "reminder"


def stage_purpose(number: int) -> str:
    """A delivery's purpose for escalation stage `number` (1-based)."""
    return f"stage:{number}"


def stage_for(tool: ToolSpec | None, purpose: str) -> tuple[int, Stage] | None:
    """(number, stage) of the escalation stage a delivery's `purpose` names, if it names
    one of `tool`'s."""
    if tool is None or not purpose.startswith("stage:"):
        return None
    number = int(purpose.removeprefix("stage:"))
    if not 0 < number <= len(tool.escalation):
        return None
    return number, tool.escalation[number - 1]


@attrs.frozen
class Due:
    """What a timer firing at some time finds due: the reminder, and the stages
    (1-based numbers) not fired yet."""

    reminder: bool = False
    stages: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return self.reminder or bool(self.stages)


def schedule(request: ApprovalRequest, tool: ToolSpec | None) -> list[datetime]:
    """The times the request's reminder and stages that have not fired are due (before
    its deadline), earliest first."""
    if tool is None or not (tool.remind_before_ms or tool.escalation):
        return []
    times = []
    if tool.remind_before_ms and not request.reminded:
        at = request.timeout - timedelta(milliseconds=tool.remind_before_ms)
        if request.timestamp < at:
            times.append(at)
    for stage in tool.escalation[request.stages_fired :]:
        at = request.timestamp + timedelta(milliseconds=stage.after_ms)
        if at < request.timeout:
            times.append(at)
    return sorted(set(times))


def due(request: ApprovalRequest, tool: ToolSpec | None, at: datetime) -> Due:
    """What is due at `at` (before the deadline): everything whose time has come."""
    if tool is None or at >= request.timeout:
        return Due()
    reminder = bool(
        tool.remind_before_ms
        and not request.reminded
        and request.timeout - timedelta(milliseconds=tool.remind_before_ms) <= at
    )
    stages = tuple(
        number
        for number, stage in enumerate(tool.escalation, 1)
        if number > request.stages_fired
        and request.timestamp + timedelta(milliseconds=stage.after_ms) <= at
    )
    return Due(reminder, stages)
