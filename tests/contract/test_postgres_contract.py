"""The store contract on PostgreSQL: the machine's server, a schema per test."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from postgres_server import postgres_url

from clearance.adapters.postgres_store import PostgresStore
from clearance.testing.contract import StoreContract

__all__ = ["postgres_url"]  # the fixture, for pytest


def schema_for(path: Path) -> str:
    """The same schema for `make_store` and `reopen` of one test, another for each test."""
    return "t_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]


class TestPostgresStore(StoreContract):
    @pytest.fixture(autouse=True)
    def _database(self, postgres_url: str) -> None:
        self.url = postgres_url

    def make_store(self, path: Path) -> PostgresStore:
        return PostgresStore(f"{self.url}?schema={schema_for(path)}")
