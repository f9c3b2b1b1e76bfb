"""The `clearance` command's arguments: what the parser needs, and nothing heavy, so
`clearance --help` and a usage error answer without importing the runtime."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from clearance.core import json_value

DB_ENV = "CLEARANCE_DB"
SECRET_ENV = "CLEARANCE_WEBHOOK_SECRET"  # secrets come from the environment, never argv
API_KEY_ENV = "CLEARANCE_API_KEY"
# A reviewer's key: approve, reject and extend as that reviewer (checked), not as a
# --by name (claimed), which a quorum does not count and an extension does not take.
REVIEWER_KEY_ENV = "CLEARANCE_REVIEWER_KEY"
DEFAULT_DB = "clearance.db"
DEFAULT_REJECTION = "The amount exceeds the refund limit"  # the demo's --auto reject


class UsageError(Exception):
    """Arguments that parse but do not make sense together: exit code 2."""


def split_assignment(text: str) -> tuple[str, str]:
    """`amount=25` -> ('amount', '25'): the shape NAME=VALUE, the value still as typed."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. amount=25), got {text!r}")
    return key, raw


def assignment_value(key: str, raw: str) -> Any:
    """The value of `--set key=raw`: JSON when it parses, else the text as typed. JSON that
    JSON cannot carry (1e999, NaN, Infinity, a lone surrogate escape) is refused with
    NotJSON rather than read as something else."""
    shown = f"--set {key}={raw}".encode("utf-8", "backslashreplace").decode("utf-8")
    try:
        json_value.check_text(key, "the name")
        try:
            value: Any = json.loads(raw)  # reads NaN and 1e999 as floats: refused below
        except ValueError:
            value = raw  # not JSON at all: text
        return json_value.strict(value, "the value")
    except json_value.NotJSON as err:
        raise json_value.NotJSON(f"{shown}: {err}") from None


def parse_assignment(text: str) -> tuple[str, Any]:
    """`amount=25` -> ('amount', 25): the value is JSON when it parses, else a string.
    Raises ArgumentTypeError for a malformed assignment or a value JSON cannot carry."""
    key, raw = split_assignment(text)
    try:
        return key, assignment_value(key, raw)
    except json_value.NotJSON as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def modified_params(assignments: Sequence[tuple[str, str]] | None) -> dict[str, Any] | None:
    """The `--set` assignments as modified parameters (None for none); UsageError for a
    value JSON cannot carry."""
    changes: dict[str, Any] = {}
    for key, raw in assignments or ():
        try:
            changes[key] = assignment_value(key, raw)
        except json_value.NotJSON as err:
            raise UsageError(str(err)) from None
    return changes or None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"expected a TCP port, 1 to 65535, got {text!r}")
    return value
