"""Tool parameter schemas: the spec's mini-schema, translated to JSON Schema.

The spec writes parameters as `{name: {type, required, description, enum,
default, items, properties}}`. We translate that once, at definition time, to
a JSON Schema object (what the Anthropic API wants as `input_schema` anyway)
and validate with `jsonschema`, so model-provided and human-modified
parameters go through one well-kept validator. A full JSON Schema object
(`{"type": "object", "properties": ...}`) is accepted as is.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import fastjsonschema
import jsonschema
from jsonschema.validators import Draft202012Validator

from clearance.core.errors import DefinitionError, InvalidParameters

TYPES = ("string", "number", "integer", "boolean", "array", "object", "null")
FIELD_KEYS = ("type", "required", "description", "enum", "default", "items", "properties")


def is_json_schema(parameters: dict[str, Any]) -> bool:
    return parameters.get("type") == "object" and (
        "properties" not in parameters or isinstance(parameters["properties"], dict)
    )


def to_json_schema(tool: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema for a tool's parameters; DefinitionError says what is wrong."""
    if not isinstance(parameters, dict):
        raise DefinitionError(
            f"tool '{tool}': parameters must be a dict of name -> field, got "
            f"{type(parameters).__name__}"
        )
    schema = dict(parameters) if is_json_schema(parameters) else _object(tool, "", parameters)
    try:
        Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as err:
        raise DefinitionError(f"tool '{tool}': invalid parameter schema: {err.message}") from None
    return schema


def _object(tool: str, path: str, fields: dict[str, Any]) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, field in fields.items():
        where = f"{path}.{name}" if path else name
        properties[name] = _field(tool, where, field)
        if isinstance(field, dict) and field.get("required") is True:
            required.append(name)
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        # A typo in a modified parameter ("amout") must fail, not be ignored.
        "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    return schema


def _field(tool: str, where: str, field: Any) -> dict[str, Any]:
    if not isinstance(field, dict):
        raise DefinitionError(
            f"tool '{tool}': parameter '{where}' must be a dict like "
            f"{{'type': 'string', 'required': True}}, got {field!r}"
        )
    unknown = sorted(set(field) - set(FIELD_KEYS))
    if unknown:
        raise DefinitionError(
            f"tool '{tool}': parameter '{where}' has unknown key(s) {unknown}; "
            f"accepted keys: {', '.join(FIELD_KEYS)}"
        )
    kind = field.get("type")
    if kind not in TYPES:
        raise DefinitionError(
            f"tool '{tool}': parameter '{where}' has type {kind!r}; accepted types: "
            f"{', '.join(TYPES)}"
        )
    if "required" in field and not isinstance(field["required"], bool):
        raise DefinitionError(f"tool '{tool}': parameter '{where}': 'required' must be True/False")
    out: dict[str, Any] = {"type": kind}
    for key in ("description", "enum", "default"):
        if key in field:
            out[key] = field[key]
    if "items" in field:
        if kind != "array":
            raise DefinitionError(f"tool '{tool}': parameter '{where}': 'items' needs type 'array'")
        out["items"] = _field(tool, f"{where}[]", field["items"])
    if "properties" in field:
        if kind != "object":
            raise DefinitionError(
                f"tool '{tool}': parameter '{where}': 'properties' needs type 'object'"
            )
        out.update(_object(tool, where, field["properties"]))
    return out


@lru_cache(maxsize=1024)
def _validator_of_text(schema_json: str) -> Draft202012Validator:
    # Built from the canonical text, whose sorted keys fix the order errors come in.
    return Draft202012Validator(json.loads(schema_json))


# Keywords that mean the same in draft-07 (all fastjsonschema speaks) and in 2020-12
# (what jsonschema checks here), with `items` as one schema for every element.
_SHARED_KEYWORDS = frozenset(
    {"type", "properties", "required", "additionalProperties", "enum", "items"}
    | {"description", "default", "title"}
)
FastCheck = Callable[[Any], Any]


def _shared_only(schema: Any) -> bool:
    if not isinstance(schema, dict) or not schema.keys() <= _SHARED_KEYWORDS:
        return False
    subschemas = list(schema.get("properties", {}).values())
    for key in ("items", "additionalProperties"):
        if key in schema and not isinstance(schema[key], bool):
            subschemas.append(schema[key])
    return isinstance(schema.get("properties", {}), dict) and all(map(_shared_only, subschemas))


def _fast_check(schema: dict[str, Any]) -> FastCheck | None:
    """jsonschema walks a schema per call (most of a step's validation cost);
    fastjsonschema compiles it to Python once. It only ever answers "valid":
    a failure, and any schema using keywords beyond the shared few, goes to
    jsonschema, which alone words the problems (tests/test_schema.py checks
    the two agree)."""
    if not _shared_only(schema):
        return None
    check: FastCheck = fastjsonschema.compile(
        schema, use_default=False, use_formats=False, detailed_exceptions=False
    )
    return check


# The validators of each schema dict by its identity, so that a call does not spell the
# schema out as JSON again to find them (a third of a valid call's cost). A spec's
# schema is not changed once made (ToolSpec is frozen and nothing edits its dict). Each
# entry holds its dict, so no other dict can take that id while the entry stands.
_BY_IDENTITY: dict[int, tuple[dict[str, Any], Draft202012Validator, FastCheck | None]] = {}


def _validators(schema: dict[str, Any]) -> tuple[Draft202012Validator, FastCheck | None]:
    hit = _BY_IDENTITY.get(id(schema))
    if hit is not None and hit[0] is schema:
        return hit[1], hit[2]
    if len(_BY_IDENTITY) >= 1024:
        # Specs loaded from the store bring new dicts each time: start over, not grow.
        _BY_IDENTITY.clear()
    validator = _validator_of_text(canonical(schema))
    fast = _fast_check(schema)
    _BY_IDENTITY[id(schema)] = (schema, validator, fast)
    return validator, fast


def canonical(value: Any) -> str:
    """One JSON spelling per value: cache keys and content hashes rely on it."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def with_defaults(schema: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Top-level defaults filled in, so the human approves what will actually run."""
    props = schema.get("properties", {})
    missing = {
        k: v["default"]
        for k, v in props.items()
        if isinstance(v, dict) and "default" in v and k not in params
    }
    return {**params, **missing} if missing else params


def problems(schema: dict[str, Any], params: Any) -> list[str]:
    """Each way `params` fails `schema`, naming the field; empty when valid."""
    validator, fast = _validators(schema)
    if fast is not None:
        try:
            fast(params)
            return []
        except fastjsonschema.JsonSchemaValueException:
            pass
    elif validator.is_valid(params):  # the usual case, without collecting and sorting errors
        return []
    found = []
    for err in sorted(validator.iter_errors(params), key=lambda e: list(map(str, e.path))):
        field = ".".join(str(p) for p in err.absolute_path) or "(parameters)"
        found.append(f"{field}: {err.message}")
    return found


def check(tool: str, schema: dict[str, Any], params: Any) -> None:
    found = problems(schema, params)
    if found:
        raise InvalidParameters(tool, found)
