"""Hypothesis strategies for property-testing an agent you define with Clearance.

Everything is drawn for one agent definition, from its tools' parameter schemas
(the compiled JSON Schema of each `ToolSpec`, see `agent_spec`):

- model turns, as lists of content blocks in the Anthropic Messages shape the
  `ScriptedModel` plays (`model_turns`, `model_plans`): text-only answers, one to
  three `tool_use` blocks per turn (after some text or not), calls of tools the
  agent does not have, parameters valid for the tool's schema (drawn with
  `hypothesis-jsonschema`) and invalid ones (wrong type, missing required, extra
  or out-of-range values, values JSON cannot carry), and now and then a turn
  whose `tool_use` blocks share one id;
- human actions (`decisions`, `human_actions`): approve, approve with modified
  parameters (valid ones drawn from the schema, invalid ones derived from it),
  reject with a reason, stop, wait;
- clock moves around each tool's approval timeout (`clock_moves`).

What is *drawn* as valid or invalid is only a bias. Whether Clearance must accept
a value is judged by the oracles here (`acceptable_params`, `modification_problem`,
`is_json`): plain `jsonschema` and the README's rules, written apart from
Clearance's own checks so that the harness can catch them disagreeing.

Requires `hypothesis-jsonschema` (`pip install hypothesis-jsonschema`).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import attrs
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from hypothesis_jsonschema import from_schema
from jsonschema.validators import Draft202012Validator

from clearance.core.agent import AgentSpec, ToolSpec
from clearance.core.policy import ASK, PolicySpec
from clearance.definition import DEFAULT_MAX_ITERATIONS, HumanInLoop, Tool, compile_agent
from clearance.ports.model import ModelReply, ModelRequest

Block = dict[str, Any]
Turn = list[Block]
Plan = list[Turn]

# A tool name no agent of the harness defines (tool names are [a-zA-Z0-9_-]{1,64}).
UNKNOWN_TOOLS = ("no-such-tool", "delete_everything")
TEXTS = ("Let me look into that.", "Working on it.", "On it!")
ANSWERS = ("Done.", "I could not do that.", "All set: the request was handled.")
# The id two tool_use blocks of a malformed turn share.
TWIN_ID = "toolu_twin"
# Values JSON cannot carry: Clearance refuses them at its boundary.
NOT_JSON: tuple[Any, ...] = (math.nan, math.inf, -math.inf, "lone \ud800 surrogate")


# -- the agent ------------------------------------------------------------------------------


class _NoModel:
    """A model port that is never called: compiling a definition needs one."""

    async def reply(self, request: ModelRequest) -> ModelReply:  # pragma: no cover
        raise AssertionError("the placeholder model of agent_spec() was called")


def agent_spec(
    *,
    tag: str,
    tools: Sequence[Tool] = (),
    name: str = "",
    product: str = "",
    system_prompt: str = "",
    human_in_loop: HumanInLoop | None = None,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    model: Any = None,
) -> AgentSpec:
    """The `AgentSpec` that `Clearance.define(**same_arguments)` compiles: which tools are
    gated and each one's JSON Schema. Raises `DefinitionError` as `define()` would; its
    warnings are left to `define()`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hosted = compile_agent(
            tag=tag,
            name=name,
            product=product,
            model=_NoModel(),
            model_name="harness",
            system_prompt=system_prompt,
            tools=tools,
            human_in_loop=human_in_loop or HumanInLoop(),
            max_iterations=max_iterations,
        )
    return hosted.spec


# -- oracles: what Clearance must accept, judged without Clearance ---------------------------


def is_json(value: Any) -> bool:
    """Whether `value` is strict JSON: dicts with string keys, lists, strings UTF-8 can
    encode, finite numbers, booleans, None. (Clearance refuses anything else.)"""
    if value is None or isinstance(value, bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return _encodable(value)
    if isinstance(value, list):
        return all(is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _encodable(k) and is_json(v) for k, v in value.items())
    return False


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values, types included: 1, 1.0 and True are three different values
    (Python's == says they are one)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _canonical(schema: Mapping[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True)


@lru_cache(maxsize=256)
def _validator(schema_text: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_text))


def schema_valid(schema: Mapping[str, Any], value: Any) -> bool:
    """`value` against `schema` by plain `jsonschema` (draft 2020-12)."""
    return bool(_validator(_canonical(schema)).is_valid(value))


def declared(schema: Mapping[str, Any]) -> list[str]:
    """The parameter names a tool's schema declares (its top-level properties)."""
    properties = schema.get("properties")
    return list(properties) if isinstance(properties, dict) else []


def with_defaults(schema: Mapping[str, Any], params: Any) -> Any:
    """`params` with the schema's top-level defaults filled in for what is missing (the
    README: defaults are filled in before the human sees the request)."""
    if not isinstance(params, dict):
        return params
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return params
    missing = {
        k: v["default"]
        for k, v in properties.items()
        if isinstance(v, dict) and "default" in v and k not in params
    }
    return {**params, **missing}


def acceptable_params(schema: Mapping[str, Any], params: Any) -> bool:
    """Whether a model's `tool_use` input must be accepted: strict JSON, an object, and
    valid for the schema once defaults are filled in."""
    return (
        isinstance(params, dict)
        and is_json(params)
        and schema_valid(schema, with_defaults(schema, params))
    )


def modification_problem(
    schema: Mapping[str, Any], params: Mapping[str, Any], modified: Any
) -> str | None:
    """Why a reviewer's `modified_params` for a request with `params` must be refused, or
    None when it must be accepted (the README: modified parameters are validated against
    the tool's schema; a reviewer may change what the model proposed or set a declared
    parameter, never add a new argument)."""
    if not isinstance(modified, dict):
        return f"modified_params is a {type(modified).__name__}, not an object"
    if not is_json(modified):
        return "modified_params holds a value JSON cannot carry"
    known = set(declared(schema)) | set(params)
    added = sorted(k for k in modified if k not in known)
    if added:
        return f"modified_params adds {added}, which the tool does not take"
    if not schema_valid(schema, {**params, **modified}):
        return "the modified parameters fail the tool's schema"
    return None


def json_type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _fits_type(value: Any, types: Sequence[str]) -> bool:
    kind = json_type_of(value)
    return kind in types or (kind == "integer" and "number" in types)


# -- parameters -----------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _from_schema(schema_text: str) -> SearchStrategy[Any]:
    return from_schema(json.loads(schema_text))


def valid_params(schema: Mapping[str, Any]) -> SearchStrategy[dict[str, Any]]:
    """Objects valid for `schema`, strict JSON. Drawn by hypothesis-jsonschema, and
    checked with `jsonschema`: it does not know every draft 2020-12 keyword (it lets
    `dependentRequired` pass unchecked, say)."""
    return _from_schema(_canonical(schema)).filter(
        lambda v: isinstance(v, dict) and is_json(v) and schema_valid(schema, v)
    )


# One value of each JSON type (and a fraction): `wrong_type` picks those a field does not take.
_ONE_OF_EACH: tuple[Any, ...] = ("text", 7, 2.5, True, None, [1], {"k": 1})


def _types(field: Mapping[str, Any]) -> list[str] | None:
    kind = field.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list) and all(isinstance(k, str) for k in kind):
        return list(kind)
    return None


def wrong_type(field: Mapping[str, Any]) -> SearchStrategy[Any]:
    """A value of a JSON type the field's schema does not take (nothing when it takes any)."""
    types = _types(field)
    if types is None:
        return st.nothing()
    wrong = [v for v in _ONE_OF_EACH if not _fits_type(v, types)]
    return st.sampled_from(wrong) if wrong else st.nothing()


def out_of_range(field: Mapping[str, Any]) -> SearchStrategy[Any]:
    """Values of the right type that break one of the field's bounds: above `maximum`, at
    `exclusiveMaximum`, below `minimum`, too long or short a string, outside `enum`."""
    found: list[Any] = []
    for key, step in (("maximum", 1), ("minimum", -1)):
        bound = field.get(key)
        if isinstance(bound, int | float) and not isinstance(bound, bool):
            found += [bound + step, bound + step * 1000, bound + step * 0.5]
    for key in ("exclusiveMaximum", "exclusiveMinimum"):
        bound = field.get(key)
        if isinstance(bound, int | float) and not isinstance(bound, bool):
            found.append(bound)
    longest, shortest = field.get("maxLength"), field.get("minLength")
    if isinstance(longest, int):
        found.append("x" * (longest + 1))
    if isinstance(shortest, int) and shortest > 0:
        found.append("x" * (shortest - 1))
    if isinstance(field.get("enum"), list):
        found += ["not-one-of-the-enum", 123456789]
    if "const" in field:
        found.append(["not", "the", "const"])
    return st.sampled_from(found) if found else st.nothing()


def _fields(schema: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return {}
    return {k: v for k, v in properties.items() if isinstance(v, dict)}


def bad_value(field: Mapping[str, Any]) -> SearchStrategy[Any]:
    """A value one field must refuse: of a wrong type, out of range, or not JSON at all."""
    return st.one_of(wrong_type(field), out_of_range(field), st.sampled_from(NOT_JSON))


def invalid_params(schema: Mapping[str, Any]) -> SearchStrategy[Any]:
    """Inputs a tool must refuse, derived from its schema: a valid object with one field
    of a wrong type, out of range or not JSON; with a required field left out; with a key
    the schema does not declare (where it refuses extra keys); or no object at all."""
    fields = _fields(schema)
    required = [k for k in schema.get("required", ()) if isinstance(k, str)]
    valid = valid_params(schema)
    mutations: list[SearchStrategy[Any]] = [
        st.sampled_from([["not", "an", "object"], "a string", 42, None]),
    ]
    if fields:
        names = sorted(fields)
        mutations.append(
            st.tuples(valid, st.sampled_from(names)).flatmap(
                lambda pair: bad_value(fields[pair[1]]).map(lambda bad: {**pair[0], pair[1]: bad})
            )
        )
    if required:
        mutations.append(
            st.tuples(valid, st.sampled_from(required)).map(
                lambda pair: {k: v for k, v in pair[0].items() if k != pair[1]}
            )
        )
    mutations.append(valid.map(lambda v: {**v, "not_a_parameter": "surprise"}))
    return st.one_of(mutations).filter(lambda v: not acceptable_params(schema, v))


def modifications(
    schema: Mapping[str, Any], params: Mapping[str, Any]
) -> SearchStrategy[dict[str, Any]]:
    """Changes a reviewer could make that the tool takes: some of the declared fields of
    another valid object (possibly none). Most merge into valid parameters; the oracle
    `modification_problem` says which."""
    names = declared(schema)
    if not names:
        return st.just({})
    return valid_params(schema).flatmap(
        lambda full: st.sets(st.sampled_from(sorted(full) or [""])).map(
            lambda keys: {k: full[k] for k in sorted(keys) if k in full}
        )
    )


def invalid_modifications(
    schema: Mapping[str, Any], params: Mapping[str, Any]
) -> SearchStrategy[Any]:
    """Changes the tool must refuse: a declared field of a wrong type, out of range or not
    JSON; a new argument; something that is not an object."""
    fields = _fields(schema)
    options: list[SearchStrategy[Any]] = [
        st.sampled_from([{"not_a_parameter": 1}, ["amount", 5], "rm -rf /", 25]),
    ]
    if fields:
        options.append(
            st.sampled_from(sorted(fields)).flatmap(
                lambda name: bad_value(fields[name]).map(lambda bad: {name: bad})
            )
        )
    return st.one_of(options).filter(lambda m: modification_problem(schema, params, m) is not None)


# -- model turns ----------------------------------------------------------------------------


def text_block(value: str) -> Block:
    return {"type": "text", "text": value}


def tool_use_block(tag: str, params: Any, *, id: str | None = None) -> Block:
    block: Block = {"type": "tool_use", "name": tag, "input": params}
    if id is not None:
        block["id"] = id
    return block


def tool_uses(tools: Sequence[ToolSpec]) -> SearchStrategy[Block]:
    """One `tool_use` block: of a gated tool with valid parameters (most often), of any
    tool with valid parameters, of any tool with invalid ones, or of an unknown tool."""
    return _tool_use(tuple(tools))


_USE_KINDS = ("gated", "valid", "valid", "invalid", "unknown")


@st.composite
def _tool_use(draw: st.DrawFn, tools: tuple[ToolSpec, ...]) -> Block:
    gated = [t for t in tools if t.gated]
    kinds = [k for k in _USE_KINDS if (k != "gated" or gated) and (k == "unknown" or tools)]
    kind = draw(st.sampled_from(kinds))
    if kind == "unknown":
        return tool_use_block(draw(st.sampled_from(UNKNOWN_TOOLS)), {})
    spec = draw(st.sampled_from(gated if kind == "gated" else list(tools)))
    params = invalid_params if kind == "invalid" else valid_params
    return tool_use_block(spec.tag, draw(params(spec.input_schema)))


def _twinned(blocks: Turn) -> Turn:
    """The turn with its first tool_use block sent twice under one id: a malformed reply."""
    first = {**blocks[0], "id": TWIN_ID}
    return [first, *blocks[1:], dict(first)]


def model_turns(tools: Sequence[ToolSpec], *, max_uses: int = 3) -> SearchStrategy[Turn]:
    """One model turn that calls tools: 1 to `max_uses` tool_use blocks, alone or after
    some text, and (one turn in nine) with two blocks sharing an id. Blocks carry no
    id unless twinned: the player gives each a unique one."""
    return _model_turn(tuple(tools), max_uses)


@st.composite
def _model_turn(draw: st.DrawFn, tools: tuple[ToolSpec, ...], max_uses: int) -> Turn:
    style = draw(st.sampled_from(["plain"] * 4 + ["text"] * 4 + ["twin"]))
    blocks = draw(st.lists(_tool_use(tools), min_size=1, max_size=max_uses))
    if style == "twin":
        return _twinned(blocks)
    if style == "text":
        return [text_block(draw(st.sampled_from(TEXTS))), *blocks]
    return blocks


def answers() -> SearchStrategy[Turn]:
    """A text-only turn: the model's final answer, which ends the execution."""
    return st.sampled_from([[text_block(t)] for t in ANSWERS])


def model_plans(
    tools: Sequence[ToolSpec], *, max_turns: int = 3, gated_first: bool = False
) -> SearchStrategy[Plan]:
    """What the model says, turn by turn, in one execution: up to `max_turns` turns that
    call tools, then a text-only answer (an empty plan answers at once).
    `gated_first`: the first turn calls a gated tool with valid parameters (among its
    other calls, in any order), so that a person has something to decide."""
    return _model_plan(tuple(tools), max_turns, gated_first)


@st.composite
def _model_plan(
    draw: st.DrawFn, tools: tuple[ToolSpec, ...], max_turns: int, gated_first: bool
) -> Plan:
    gated = [t for t in tools if t.gated]
    turns: Plan = []
    if gated_first and gated and max_turns > 0:
        spec = draw(st.sampled_from(gated))
        ask = tool_use_block(spec.tag, draw(valid_params(spec.input_schema)))
        others = draw(st.lists(_tool_use(tools), max_size=2))
        turns.append(draw(st.permutations([ask, *others])))
        max_turns -= 1
    turns += draw(st.lists(_model_turn(tools, 3), max_size=max_turns))
    return [*turns, draw(answers())]


# -- human actions --------------------------------------------------------------------------


@attrs.frozen
class Approve:
    """Approve, as is (`modified=None`) or with `modified` parameters merged in."""

    modified: Any = None


@attrs.frozen
class Reject:
    reason: str | None = None


@attrs.frozen
class Stop:
    """Stop the whole execution: its pending requests are cancelled."""

    reason: str | None = None


@attrs.frozen
class Wait:
    """Do nothing for `milliseconds` (the clock moves; due approvals time out)."""

    milliseconds: int


Decision = Approve | Reject
HumanAction = Approve | Reject | Stop | Wait


def reasons() -> SearchStrategy[str | None]:
    """Why a person rejects or stops: none, a plain reason, any text, and (rarely) one
    with a lone surrogate, which Clearance must refuse."""
    plain = ["Amount exceeds policy limit", "Wrong order", "Not now.", "", "Nein."]
    return st.one_of(
        st.none(),
        st.sampled_from([*plain, "broken \udc80 text"]),
        st.text(max_size=30),
    )


def decisions(tool: ToolSpec, params: Mapping[str, Any]) -> SearchStrategy[Decision]:
    """A person's decision on a request of `tool` for `params`: approve as is, approve with
    changes the tool takes, approve with changes it must refuse, or reject with a reason."""
    schema = tool.input_schema
    return st.one_of(
        st.just(Approve()),
        modifications(schema, params).map(Approve),
        invalid_modifications(schema, params).map(Approve),
        reasons().map(Reject),
    )


def clock_moves(tools: Sequence[ToolSpec], policy: PolicySpec | None = None) -> SearchStrategy[int]:
    """Milliseconds to move the clock: a second, and just before, at and just after each
    gated tool's approval timeout, and past twice of it. With `policy`, a tool an
    enforced ask rule covers counts as gated: its calls may wait for approval too."""
    asked = [r for r in policy.rules if r.effect == ASK] if policy and policy.enforce else []
    moves = {1000}
    for tool in tools:
        if tool.gated or any(rule.covers(tool.tag) for rule in asked):
            t = tool.approval_timeout_ms
            moves |= {max(1, t - 1), t, t + 1, 2 * t + 1}
    return st.sampled_from(sorted(moves))


def human_actions(tool: ToolSpec, params: Mapping[str, Any]) -> SearchStrategy[HumanAction]:
    """Anything a person may do about a pending request of `tool`: decide it, stop its
    execution, or let time pass (up to past its timeout)."""
    return st.one_of(
        decisions(tool, params),
        reasons().map(Stop),
        clock_moves([tool]).map(Wait),
    )


__all__ = [
    "NOT_JSON",
    "TWIN_ID",
    "UNKNOWN_TOOLS",
    "Approve",
    "Decision",
    "HumanAction",
    "Reject",
    "Stop",
    "Wait",
    "acceptable_params",
    "agent_spec",
    "answers",
    "bad_value",
    "clock_moves",
    "decisions",
    "declared",
    "human_actions",
    "invalid_modifications",
    "invalid_params",
    "is_json",
    "model_plans",
    "model_turns",
    "modification_problem",
    "modifications",
    "out_of_range",
    "reasons",
    "same_json",
    "schema_valid",
    "text_block",
    "tool_use_block",
    "tool_uses",
    "valid_params",
    "with_defaults",
    "wrong_type",
]
