"""The store contract on the SQLite adapter: a real file, and `:memory:`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from clearance.adapters.sqlite_store import SQLiteStore
from clearance.testing.contract import StoreContract


class TestSQLiteStore(StoreContract):
    def make_store(self, path: Path) -> SQLiteStore:
        return SQLiteStore(str(path / "contract.db"))


class TestSQLiteMemoryStore(StoreContract):
    """One connection, one database: the tests racing two instances are skipped."""

    def make_store(self, path: Path) -> SQLiteStore:
        return SQLiteStore(":memory:")

    def reopen(self, path: Path) -> None:
        return None


def test_the_testing_package_loads_without_pytest_or_hypothesis() -> None:
    code = (
        "import sys, clearance.testing as t; "
        "assert not {'pytest', 'hypothesis', 'clearance.testing.contract'} & set(sys.modules); "
        "print(*sorted(t.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [
        "FakeClock",
        "MemoryBroker",
        "ScriptedModel",
        "SequentialIds",
        "text",
        "tool_use",
    ]
