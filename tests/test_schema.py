"""Parameter validation: the compiled fast path never lets through what jsonschema refuses."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema.validators import Draft202012Validator

from clearance.core import schema as schemas
from clearance.core.schema import TYPES, canonical, problems, to_json_schema

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=12,
)
names = st.sampled_from(["a", "b", "orderId", "amount"])


@st.composite
def fields(draw: st.DrawFn, depth: int = 0) -> dict[str, Any]:
    kind = draw(st.sampled_from(TYPES))
    field: dict[str, Any] = {"type": kind, "required": draw(st.booleans())}
    if draw(st.booleans()):
        field["enum"] = draw(st.lists(scalars, min_size=1, max_size=3))
    if kind == "array" and depth < 2 and draw(st.booleans()):
        field["items"] = draw(fields(depth + 1))
    if kind == "object" and depth < 2 and draw(st.booleans()):
        field["properties"] = draw(st.dictionaries(names, fields(depth + 1), max_size=3))
    return field


mini_schemas = st.dictionaries(names, fields(), max_size=4).map(lambda f: to_json_schema("t", f))


def _jsonschema_problems(schema: dict[str, Any], params: Any) -> list[str]:
    # From the canonical text, as problems() builds it: key order fixes error order.
    validator = Draft202012Validator(json.loads(canonical(schema)))
    return [
        f"{'.'.join(str(p) for p in err.absolute_path) or '(parameters)'}: {err.message}"
        for err in sorted(validator.iter_errors(params), key=lambda e: list(map(str, e.path)))
    ]


def _params_for(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Mostly near-miss objects of the schema's own keys, sometimes anything at all."""
    keys = st.sampled_from([*schema.get("properties", {}), "other"])
    return st.dictionaries(keys, json_values, max_size=4) | json_values


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_the_fast_path_agrees_with_jsonschema(data: st.DataObject) -> None:
    schema = data.draw(mini_schemas)
    params = data.draw(_params_for(schema))
    assert schemas._fast_check(schema) is not None  # mini-schemas use shared keywords only
    assert problems(schema, params) == _jsonschema_problems(schema, params)


@settings(max_examples=200, deadline=None)
@given(mini_schemas, st.data())
def test_values_the_schema_allows_pass_both(schema: dict[str, Any], data: st.DataObject) -> None:
    # Random values rarely fit a schema; build ones that do, so "valid" is exercised too.
    params = {
        name: data.draw(_fitting(field))
        for name, field in schema.get("properties", {}).items()
        if name in schema.get("required", []) or data.draw(st.booleans())
    }
    assert Draft202012Validator(schema).is_valid(params)
    assert problems(schema, params) == []


def _fitting(field: dict[str, Any]) -> st.SearchStrategy[Any]:
    if "enum" in field:
        return st.sampled_from(field["enum"]).filter(
            lambda v: Draft202012Validator(field).is_valid(v)
        )
    kind = field["type"]
    if kind == "array":
        return st.lists(_fitting(field["items"]) if "items" in field else json_values, max_size=3)
    if kind == "object":
        props = field.get("properties")
        if props is None:
            return st.dictionaries(st.text(max_size=3), json_values, max_size=3)
        return st.fixed_dictionaries(
            {k: _fitting(v) for k, v in props.items() if k in field.get("required", [])}
        )
    return {
        "string": st.text(max_size=5),
        "number": st.integers() | st.floats(allow_nan=False, allow_infinity=False),
        "integer": st.integers(-(2**70), 2**70),
        "boolean": st.booleans(),
        "null": st.none(),
    }[kind]


def test_keywords_beyond_the_shared_few_go_to_jsonschema_alone() -> None:
    for extra in (
        {"minimum": 0},
        {"prefixItems": [{"type": "string"}]},
        {"unevaluatedProperties": False},
        {"$defs": {}},
        {"format": "email"},
    ):
        schema = {"type": "object", "properties": {"a": {"type": "number", **extra}}}
        assert schemas._fast_check(schema) is None, extra
    tuple_items = {"type": "object", "properties": {"a": {"type": "array", "items": [{}]}}}
    assert schemas._fast_check(tuple_items) is None


def test_a_full_json_schema_keeps_jsonschemas_answers() -> None:
    schema = to_json_schema(
        "t",
        {
            "type": "object",
            "properties": {"amount": {"type": "number", "minimum": 1}},
            "required": ["amount"],
        },
    )
    assert problems(schema, {"amount": 0}) == ["amount: 0 is less than the minimum of 1"]
    assert problems(schema, {"amount": 5}) == []
