"""Tool parameter schemas: the spec's mini-schema, translated to JSON Schema.

The spec writes parameters as `{name: {type, required, description, enum,
default, items, properties}}`. We translate that once, at definition time, to
a JSON Schema object (what the Anthropic API wants as `input_schema` anyway)
and validate with `jsonschema`, so model-provided and human-modified
parameters go through one well-kept validator. A full JSON Schema object
(`{"type": "object", "properties": ...}`) is accepted as is, once it is plain
JSON and each of its `$ref`s resolves within it: the core fetches nothing, so a
reference to anything outside the schema could never be evaluated.
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
from clearance.core.json_value import NotJSON, strict

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
    given = dict(parameters) if is_json_schema(parameters) else _object(tool, "", parameters)
    try:
        # Sent to the model and stored with every execution: plain JSON only (a tuple
        # becomes a list; NaN, say, in a default is refused).
        schema: dict[str, Any] = strict(given, "parameters")
    except NotJSON as err:
        raise DefinitionError(f"tool '{tool}': invalid parameter schema: {err}") from None
    try:
        Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as err:
        raise DefinitionError(f"tool '{tool}': invalid parameter schema: {err.message}") from None
    unresolved = unresolved_refs(schema)
    if unresolved:
        raise DefinitionError(
            f"tool '{tool}': invalid parameter schema: $ref {unresolved[0]!r} does not resolve "
            "within the schema; refer to a part of the tool's own schema ('#/$defs/name', "
            "'#anchor', or the $id of one of its subschemas): nothing outside it is fetched"
        )
    return schema


def declared_parameters(schema: dict[str, Any]) -> list[str]:
    """The parameter names a tool's schema declares (its top-level `properties`)."""
    properties = schema.get("properties")
    return list(properties) if isinstance(properties, dict) else []


# -- $ref resolution, within the schema only -----------------------------------------------------

# Keywords whose value is a schema, a list of schemas, or a map of name -> schema. Values
# of other keywords (enum, const, default, examples) are data: a "$ref" there is no reference.
_SCHEMA_KEYWORDS = frozenset(
    {"items", "additionalProperties", "not", "if", "then", "else", "contains"}
    | {"propertyNames", "unevaluatedItems", "unevaluatedProperties", "additionalItems"}
    | {"contentSchema"}
)
_SCHEMA_LIST_KEYWORDS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems", "items"})
_SCHEMA_MAP_KEYWORDS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)


def _subschemas(node: dict[str, Any]) -> list[Any]:
    found: list[Any] = []
    for key, value in node.items():
        if key in _SCHEMA_KEYWORDS and isinstance(value, dict):
            found.append(value)
        elif key in _SCHEMA_LIST_KEYWORDS and isinstance(value, list):
            found.extend(v for v in value if isinstance(v, dict))
        elif key in _SCHEMA_MAP_KEYWORDS and isinstance(value, dict):
            found.extend(v for v in value.values() if isinstance(v, dict))
    return found


def unresolved_refs(schema: dict[str, Any]) -> list[str]:
    """Each `$ref` / `$dynamicRef` of `schema` that does not resolve within it, in order.

    Resolved as JSON Schema 2020-12 does for references inside one document: the
    part before '#' names the schema itself (empty) or a subschema by its `$id` as
    written; the fragment is a JSON pointer ('/...', '~0', '~1' and %-escapes
    undone) or an `$anchor` / `$dynamicAnchor` of that (sub)schema.
    """
    resources: dict[str, dict[str, Any]] = {}
    refs: list[tuple[str, dict[str, Any]]] = []

    def walk(node: dict[str, Any], resource: dict[str, Any]) -> None:
        if isinstance(node.get("$id"), str):
            resource = node
            resources[node["$id"].rstrip("#")] = node
        for key in ("$ref", "$dynamicRef"):
            if isinstance(node.get(key), str):
                refs.append((node[key], resource))
        for sub in _subschemas(node):
            walk(sub, resource)

    walk(schema, schema)
    return [ref for ref, resource in refs if not _resolves(ref, resource, resources, schema)]


def _resolves(
    ref: str, here: dict[str, Any], resources: dict[str, dict[str, Any]], root: dict[str, Any]
) -> bool:
    base, _, fragment = ref.partition("#")
    target: Any = here if not base else resources.get(base)
    if target is None:
        return False
    fragment = _percent_decoded(fragment)
    if not fragment:
        return True
    if not fragment.startswith("/"):
        return _has_anchor(target, fragment)
    for token in fragment[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and token in target:
            target = target[token]
        elif isinstance(target, list) and token.isdigit() and int(token) < len(target):
            target = target[int(token)]
        else:
            return False
    return True


def _has_anchor(resource: dict[str, Any], name: str) -> bool:
    stack = [resource]
    while stack:
        node = stack.pop()
        if name in (node.get("$anchor"), node.get("$dynamicAnchor")):
            return True
        # A subschema with its own $id holds its own anchors.
        stack.extend(s for s in _subschemas(node) if not isinstance(s.get("$id"), str))
    return False


def _percent_decoded(text: str) -> str:
    if "%" not in text:
        return text
    out = bytearray()
    i = 0
    while i < len(text):
        pair = text[i + 1 : i + 3]
        if text[i] == "%" and len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
            out += bytes.fromhex(pair)
            i += 3
        else:
            out += text[i].encode("utf-8", "surrogatepass")
            i += 1
    return out.decode("utf-8", "replace")


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
