"""core.json_value.strict: the fast walk and the walk that spells out paths agree."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clearance.core.json_value import NotJSON, _strict, strict


class Colour(enum.StrEnum):
    RED = "red"


class Size(enum.IntEnum):
    BIG = 3


BAD_LEAVES = st.sampled_from(
    [
        math.nan,
        math.inf,
        -math.inf,
        "ok\ud800",
        b"bytes",
        {1, 2},
        datetime(2026, 1, 1, tzinfo=UTC),
        Colour.RED,
        Size.BIG,
        object,
    ]
)
LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | st.text() | BAD_LEAVES
KEYS = st.text() | st.sampled_from(["\udc00", 1, None, ("a",), Colour.RED])


def _values() -> st.SearchStrategy[Any]:
    return st.recursive(
        LEAVES,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.tuples(inner, inner)
            | st.dictionaries(KEYS, inner, max_size=4)
        ),
        max_leaves=12,
    )


def _outcome(check: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("value", check())
    except NotJSON as err:
        return ("refused", str(err))


def _plain_types(value: Any) -> bool:
    if isinstance(value, dict):
        return type(value) is dict and all(
            type(k) is str and _plain_types(v) for k, v in value.items()
        )
    if isinstance(value, list):
        return type(value) is list and all(_plain_types(v) for v in value)
    return value is None or type(value) in (bool, int, float, str)


@given(_values(), st.sampled_from([None, str]))
def test_strict_answers_exactly_as_the_walk_that_names_paths(
    value: Any, default: Callable[[Any], Any] | None
) -> None:
    fast = _outcome(lambda: strict(value, "input", default=default))
    slow = _outcome(lambda: _strict(value, "input", default, set()))
    # Compared by repr: NaN never equals itself, and neither walk may let one through.
    assert repr(fast) == repr(slow)
    if fast[0] == "value":
        assert _plain_types(fast[1])


def test_a_circular_reference_is_named_by_both_walks() -> None:
    looped: dict[str, Any] = {"a": [1]}
    looped["a"].append(looped)
    with pytest.raises(NotJSON, match=r"input\.a\[1\] contains itself"):
        strict(looped, "input")
    shared = [1, 2]
    assert strict({"x": shared, "y": shared}) == {"x": [1, 2], "y": [1, 2]}
