"""Strict JSON: the one check every value crossing a boundary goes through.

Parameters from a model, a reviewer's `modified_params`, HTTP and CLI bodies,
tool results: each is stored in the log, replayed, and sent on as JSON. Python's
`json` module lets through what JSON has no spelling for (NaN, Infinity), what
UTF-8 cannot encode (lone surrogates) and what only looks like JSON (tuples,
which replay as lists, so a live state and its replay would differ). `strict`
refuses each of those with the path of the offending value, and returns a copy
made only of dict, list, str, int, float, bool and None.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from clearance.core.errors import ClearanceError

_INFINITY = float("inf")

ACCEPTED = (
    "JSON values: objects with string keys, arrays, strings, finite numbers, true, false, null"
)


class NotJSON(ClearanceError, ValueError):
    """A value JSON cannot carry faithfully; the message names where and why."""


def strict(value: Any, what: str = "value", *, default: Callable[[Any], Any] | None = None) -> Any:
    """`value` as plain JSON data, or NotJSON naming the first offending part.

    `default` turns a value of another type into something JSON (tool results
    use `str`, so a datetime becomes its text); without it such a value is
    refused.
    """
    try:
        try:
            return _plain(value, set())
        except _Refused:
            # Almost every value passes the fast walk. What it balks at (anything not
            # plain: a str subclass as a key, a tuple) the full walk judges, spelling
            # out the path of the offending part only then.
            return _strict(value, what, default, set())
    except RecursionError:
        raise NotJSON(f"{what} is nested too deeply to be JSON") from None


class _Refused(Exception):
    """`_plain` leaves this value to `_strict`."""


def _plain(value: Any, seen: set[int]) -> Any:
    # `_strict` for plain values, without the paths; anything else goes to `_strict`.
    if value is None or value is True or value is False:
        return value
    kind = type(value)
    if kind is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Refused from None
        return value
    if kind is int:
        return value
    if kind is float:
        if value != value or value in (_INFINITY, -_INFINITY):
            raise _Refused
        return value
    if kind is dict or kind is list:
        if id(value) in seen:
            raise _Refused
        seen.add(id(value))
        if kind is dict:
            out: dict[str, Any] = {}
            for key, item in value.items():
                if type(key) is not str:
                    raise _Refused
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    raise _Refused from None
                out[key] = _plain(item, seen)
            copied: Any = out
        else:
            copied = [_plain(item, seen) for item in value]
        seen.discard(id(value))
        return copied
    raise _Refused  # subclasses (enums), tuples, other types


def _strict(value: Any, path: str, default: Callable[[Any], Any] | None, seen: set[int]) -> Any:
    # Exact type checks: a bool is an int, and str/int/float subclasses (enums) are
    # stored as their plain value so replay reads back the same thing.
    if value is None or value is True or value is False:
        return value
    if isinstance(value, str):
        return _text(value, path)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if value != value or value in (_INFINITY, -_INFINITY):  # NaN, or +/- Infinity
            raise NotJSON(f"{path} is {value!r}, which JSON cannot carry; accepted: finite numbers")
        return float(value)
    if isinstance(value, dict | list | tuple):
        if id(value) in seen:
            raise NotJSON(f"{path} contains itself (a circular reference); accepted: {ACCEPTED}")
        seen.add(id(value))
        try:
            if isinstance(value, dict):
                out: dict[str, Any] = {}
                for key, item in value.items():
                    if not isinstance(key, str):
                        raise NotJSON(
                            f"{path} has a key {key!r} of type {type(key).__name__}; "
                            "accepted: string keys"
                        )
                    # The key first: the item's path spells it, so it must be valid text.
                    key = _text(key, f"{path} key")
                    out[key] = _strict(item, f"{path}.{key}", default, seen)
                return out
            return [_strict(item, f"{path}[{i}]", default, seen) for i, item in enumerate(value)]
        finally:
            seen.discard(id(value))
    if default is not None:
        return _strict(default(value), path, None, seen)
    raise NotJSON(f"{path} is a {type(value).__name__}, not JSON; accepted: {ACCEPTED}")


def _text(text: str, path: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise NotJSON(
            f"{path} holds a lone surrogate ({text[err.start]!r} at {err.start}) that UTF-8 "
            "cannot encode; accepted: valid Unicode text"
        ) from None
    return str(text)


def check_text(text: str, what: str) -> str:
    """A free-text field (a reason, an input): valid Unicode, or NotJSON."""
    return _text(text, what)


def _no_constant(name: str) -> Any:
    raise NotJSON(f"{name} is not JSON (JSON has no NaN or Infinity); accepted: finite numbers")


def loads(text: str | bytes, what: str = "body") -> Any:
    """Parse JSON text strictly: no NaN/Infinity (also none by overflow, as 1e999),
    no lone surrogates. Raises NotJSON; a syntax error is NotJSON too."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except NotJSON as err:
        raise NotJSON(f"{what}: {err}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise NotJSON(f"{what} is not valid JSON: {err}") from None
    return strict(value, what)
