"""Policies in a file: TOML, one documented schema, checked with a clear error naming
the file, the line and the rule.

    # refunds.policy.toml
    enforce = true          # false: shadow mode (optional, default true)

    [[rules]]
    id = "no-large-refunds"
    effect = "deny"          # deny | ask | allow
    tools = "process-refund" # a tag or glob, or a list of them (default "*")
    when = "args.amount > 1000.0"   # a CEL condition (optional: always)
    reason = "Refunds above 1,000 are made by finance."

TOML because Python reads it without a dependency (`tomllib`) and it has no implicit
typing surprises (YAML's `no` is a boolean). Python predicates cannot live in a file:
a rule that needs one is written in Python.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match

from clearance.core.errors import DefinitionError
from clearance.core.policy import EFFECTS, PolicyError, compile_condition

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "enforce": {"type": "boolean"},
        "rules": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "pattern": r"^[A-Za-z0-9_.:-]{1,64}$"},
                    "effect": {"enum": list(EFFECTS)},
                    "tools": {
                        "anyOf": [
                            {"type": "string", "minLength": 1},
                            {
                                "type": "array",
                                "items": {"type": "string", "minLength": 1},
                                "minItems": 1,
                            },
                        ]
                    },
                    "when": {"type": "string", "minLength": 1},
                    "reason": {"type": "string"},
                },
                "required": ["id", "effect"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["rules"],
    "additionalProperties": False,
}
_RULE_HEADER = re.compile(r"^\s*\[\[\s*rules\s*\]\]")


def load_policy_file(path: str | Path) -> Any:
    """The `Policy` in the TOML file `path`. Raises DefinitionError, one line: where
    (file:line), which rule, and what is wrong."""
    from clearance.definition import Policy, Rule  # the public types; they import us not

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DefinitionError(f"{path}: cannot read the policy file ({err})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise DefinitionError(f"{path}: not valid TOML: {err}") from None
    lines = _rule_lines(text)
    error = best_match(jsonschema.Draft202012Validator(SCHEMA).iter_errors(data))
    if error is not None:
        where = list(error.absolute_path)
        if len(where) >= 2 and where[0] == "rules" and isinstance(where[1], int):
            index = where[1]
            rule = data["rules"][index]
            name = rule.get("id") if isinstance(rule, dict) else None
            field = ".".join(str(p) for p in where[2:]) or "the rule"
            raise DefinitionError(
                f"{_at(path, lines, index)}: rule {name or index + 1!r}: {field}: {_said(error)}"
            )
        raise DefinitionError(f"{path}: {'.'.join(map(str, where)) or 'the file'}: {_said(error)}")
    rules = []
    seen: set[str] = set()
    for index, rule in enumerate(data["rules"]):
        at = f"{_at(path, lines, index)}: rule '{rule['id']}'"
        if rule["id"] in seen:
            raise DefinitionError(f"{at}: the id is used twice")
        seen.add(rule["id"])
        if "when" in rule:
            try:
                compile_condition(rule["when"])
            except PolicyError as err:
                raise DefinitionError(f"{at}: when: {err}") from None
        rules.append(
            Rule(
                rule["effect"],
                rule.get("tools", "*"),
                rule.get("when"),
                None,
                rule["id"],
                rule.get("reason", ""),
            )
        )
    return Policy(tuple(rules), data.get("enforce", True))


def _rule_lines(text: str) -> list[int]:
    """The line of each `[[rules]]` header, in order (1-based)."""
    return [n for n, line in enumerate(text.splitlines(), 1) if _RULE_HEADER.match(line)]


def _at(path: Path, lines: list[int], index: int) -> str:
    return f"{path}:{lines[index]}" if index < len(lines) else str(path)


def _said(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        return f"{error.message}; a rule takes id, effect, tools, when and reason"
    if error.validator == "enum":
        return f"{error.instance!r} is not one of deny, ask, allow"
    if error.validator == "required":
        return error.message
    return error.message
