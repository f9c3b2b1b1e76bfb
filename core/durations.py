"""Durations, read by one parser wherever the library takes one: a whole number of
milliseconds, a `timedelta`, or text such as "30s", "10m", "2h", "1d" (also "500ms")."""

from __future__ import annotations

import re
from datetime import timedelta

from clearance.core.errors import ClearanceError

UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
TEXT = re.compile(r"\s*(\d+)\s*(ms|s|m|h|d)\s*")
ACCEPTED = "milliseconds (an int), a timedelta, or text such as '30s', '10m', '2h', '1d'"
# What a command-line option (its `what` starts with "--") takes: text only.
ACCEPTED_TEXT = "a number with a unit: '30s', '10m', '2h', '1d' (or '500ms')"
# Longer than anything a deadline or a retention period needs, and far inside what
# `datetime` arithmetic can hold (a clock plus a longer one overflows).
LONGEST = timedelta(days=36_525)


class BadDuration(ClearanceError, ValueError):
    """Not a duration; the message says what is accepted."""


def parse_duration(value: int | timedelta | str, what: str = "a duration") -> timedelta:
    """`value` as a positive timedelta, or BadDuration saying what was wrong."""
    try:
        if isinstance(value, timedelta):
            length = value
        elif isinstance(value, int) and not isinstance(value, bool):
            length = timedelta(milliseconds=value)
        elif isinstance(value, str) and (match := TEXT.fullmatch(value)):
            length = timedelta(seconds=int(match.group(1)) * UNITS[match.group(2)])
        elif isinstance(value, str) and value.strip().isdigit():
            # "5" on a command line: minutes? days? Guessing could prune everything.
            number = value.strip()
            raise BadDuration(
                f"{what} needs a unit: '{number}s', '{number}m', '{number}h', '{number}d'"
                f" (or '{number}ms'); got {value!r}"
            )
        else:
            accepted = ACCEPTED_TEXT if what.startswith("--") else ACCEPTED
            raise BadDuration(f"{what} is {accepted}; got {value!r}")
    except OverflowError:  # more than a timedelta holds, either way
        length = timedelta.min if isinstance(value, int) and value < 0 else timedelta.max
    if length > LONGEST:
        raise BadDuration(
            f"{what} is too long: at most {LONGEST.days} days (100 years); got {value!r}"
        )
    if length <= timedelta(0):
        raise BadDuration(f"{what} must be above zero; got {value!r}")
    return length
