"""Points in time a person gives: a pending request's new deadline (the CLI's `extend
--until`, the HTTP API's extend `payload.until`, Python's `signal(..., until=)`) and
the end of a delegation (`reviewer delegate --until`), read by one parser everywhere.

The rule: a date, a time of day and its offset from UTC, ISO-8601 (RFC 3339) style:
2026-12-05T18:00Z, 2026-12-05T19:00:00+01:00, 2026-12-05 18:00:00.5z (seconds and
their fraction optional, a space for the T); from Python, an aware `datetime`. A time
without its offset is refused, never assumed to be UTC: a person typing one most
likely means their own local time (Python reads a naive `datetime` so too), and a
deadline silently hours off is worse than being asked again. A date alone is refused
for the same reason (midnight where?).

Also here: the latest deadline an extension may give a request, for the views.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import NoReturn

from clearance.core.agent import ToolSpec
from clearance.core.errors import ClearanceError
from clearance.core.execution import PENDING, ApprovalRequest

ACCEPTED = (
    "give a date, a time and its offset (ISO-8601), such as 2026-12-05T18:00Z (UTC)"
    " or 2026-12-05T19:00+01:00"
)
# ASCII digits only: \d would take other scripts' digits too, which no reader expects.
_FLAGS = re.ASCII | re.IGNORECASE
_DATE = r"(\d{4}-\d{2}-\d{2})"
_TIME = r"[T ](\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)"  # any fraction: kept to the microsecond
_OFFSET = r"(Z|[+-](?:[01]\d|2[0-3]):?[0-5]\d)"  # less than a day either way
TEXT = re.compile(_DATE + _TIME + _OFFSET, _FLAGS)
NO_OFFSET = re.compile(_DATE + _TIME, _FLAGS)
DATE_ONLY = re.compile(_DATE + _OFFSET + "?", _FLAGS)
LONG_YEAR = re.compile(r"[+-]?\d{5,}-", _FLAGS)
SHOWN_MAX = 60  # characters of a refused text quoted back


class BadDeadline(ClearanceError, ValueError):
    """Not a point in time; the message says what was wrong and what is accepted."""


def parse_deadline(value: object, what: str) -> datetime:
    """`value` (text or a `datetime`) as an aware UTC datetime, or BadDeadline whose
    message starts with `what`: where the value came from ('--until', 'payload.until')."""
    if isinstance(value, datetime):
        at = value
        if at.utcoffset() is None:
            _refuse(what, f"{value!r} has no offset (tzinfo), so it could be any time zone's")
    elif isinstance(value, date):
        _refuse(what, f"{value!r} is a date without a time of day")
    elif isinstance(value, str):
        at = _read(value, what)
    elif value is None:
        _refuse(what, "is missing")
    else:
        _refuse(what, f"{value!r} is not a date and time")
    try:
        return at.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:00-05:00 is past the last UTC year
        _refuse(what, f"{_shown(value)} is outside the years 0001 to 9999 in UTC")


def _read(text: str, what: str) -> datetime:
    cleaned = text.strip()
    shown = _shown(text)
    if not cleaned:
        _refuse(what, "is empty")
    if match := TEXT.fullmatch(cleaned):
        day, time, offset = match.groups()
        offset = "+00:00" if offset in ("z", "Z") else offset
        try:
            return datetime.fromisoformat(f"{day}T{time}{offset}")
        except ValueError as err:  # 2026-02-30, 25:00
            _refuse(what, f"{shown} is not a real time ({err})")
    if NO_OFFSET.fullmatch(cleaned):
        _refuse(what, f"{shown} has no offset, so it could be any time zone's")
    if DATE_ONLY.fullmatch(cleaned):
        _refuse(what, f"{shown} is a date without a time of day")
    if LONG_YEAR.match(cleaned):
        _refuse(what, f"{shown} is past the year 9999")
    _refuse(what, f"{shown} is not an ISO-8601 date and time")


def _shown(value: object) -> str:
    """`value` quoted for a message: its repr (a lone surrogate spelt as an escape),
    cut short where it is long (a 64 KiB body has no place in a one-line error)."""
    if isinstance(value, str) and len(value) > SHOWN_MAX:
        return repr(value[:SHOWN_MAX]) + "…"
    return repr(value)


def _refuse(what: str, problem: str) -> NoReturn:
    raise BadDeadline(f"{what} {problem}; {ACCEPTED}")


def latest_deadline(request: ApprovalRequest, tool: ToolSpec) -> datetime | None:
    """The latest deadline `request` may have: its tool's max_approval_timeout from when
    it opened, else its own approval timeout (no extension); None where no datetime
    can hold it."""
    longest = tool.max_timeout_ms or request.timeout_ms
    if isinstance(longest, bool) or not isinstance(longest, int):
        return None
    try:
        return request.timestamp + timedelta(milliseconds=longest)
    except OverflowError:
        return None


def extendable_until(request: ApprovalRequest, tool: ToolSpec | None) -> datetime | None:
    """The latest deadline an extension may give `request`, or None where it cannot be
    extended further: it is decided, its tool sets no max_approval_timeout, or it is
    at it already."""
    if request.status != PENDING or tool is None or tool.max_timeout_ms is None:
        return None
    latest = latest_deadline(request, tool)
    return latest if latest is not None and latest > request.timeout else None
