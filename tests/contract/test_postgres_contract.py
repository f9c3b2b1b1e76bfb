"""The store contract on PostgreSQL: the machine's server, a schema per test."""

from __future__ import annotations

from pathlib import Path

import pytest
from postgres_server import on_schema_of, postgres_url

from clearance.adapters.postgres_store import PostgresStore
from clearance.testing.contract import StoreContract

__all__ = ["postgres_url"]  # the fixture, for pytest


class TestPostgresStore(StoreContract):
    @pytest.fixture(autouse=True)
    def _database(self, postgres_url: str) -> None:
        self.url = postgres_url

    def make_store(self, path: Path) -> PostgresStore:
        return PostgresStore(on_schema_of(self.url, path))
