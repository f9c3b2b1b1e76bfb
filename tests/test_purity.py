"""The core stays pure (docs/architecture.md): no I/O library, wall clock, ids or randomness."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "core"
# Everything the core may import: the standard library's pure parts and pure libraries.
ALLOWED = {
    "__future__",
    "collections",
    "copy",  # a policy predicate gets a copy of the arguments
    "datetime",
    "enum",
    "fnmatch",
    "functools",
    "hashlib",  # a policy's version is its content hash
    "json",
    "re",
    "typing",
    "attrs",
    "cattrs",
    "fastjsonschema",
    "jsonschema",
    "transitions",
    "cel_expr_python",  # policy conditions: CEL, a side-effect-free expression language
    "rfc8785",  # the audit chain's entries: canonical JSON, a pure function
    "clearance",
}
FORBIDDEN_CALLS = {
    "now",
    "utcnow",
    "today",
    "time",
    "monotonic",
    "uuid4",
    "uuid1",
    "token_hex",
    "random",
    "randint",
    "sleep",
}


def modules() -> list[Path]:
    return sorted(CORE.glob("*.py"))


def test_the_core_is_where_we_think() -> None:
    assert {p.name for p in modules()} >= {"decide.py", "machine.py", "events.py", "commands.py"}


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.name)
def test_core_module_imports_only_pure_libraries(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] in ALLOWED, f"{path.name} imports {name}"
            if name.startswith("clearance."):
                assert name.startswith("clearance.core"), f"{path.name} imports {name}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.name)
def test_core_module_reads_no_clock_and_makes_no_ids(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            assert name not in FORBIDDEN_CALLS, f"{path.name}:{node.lineno} calls {name}()"


def test_the_checks_would_catch_an_io_import(tmp_path: Path) -> None:
    bad = ast.parse("import sqlite3\nfrom datetime import datetime\nx = datetime.now()")
    imported = [a.name for n in ast.walk(bad) if isinstance(n, ast.Import) for a in n.names]
    assert any(name.split(".")[0] not in ALLOWED for name in imported)
    calls = [
        n.func.attr
        for n in ast.walk(bad)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    ]
    assert set(calls) & FORBIDDEN_CALLS
