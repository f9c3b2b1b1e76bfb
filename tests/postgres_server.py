"""The machine's PostgreSQL for tests: one database of their own per test run.

`CLEARANCE_TEST_POSTGRES` names the server (default: postgresql://postgres@127.0.0.1:5432/test,
trust auth); the run creates `clearance_test_<pid>_<random>` on it and drops it at the
end. Where no server answers, the tests that need one skip, saying why, unless
`CLEARANCE_REQUIRE_POSTGRES=1` (set by CI) makes that a failure.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

ADMIN_URL = os.environ.get("CLEARANCE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def on_schema_of(database_url: str, test_path: Path) -> str:
    """A store URL on a schema named after a test's tmp_path: the same for every store
    the test opens (another worker, a reopened store), another for each test."""
    return f"{database_url}?schema=t_{hashlib.sha256(str(test_path).encode()).hexdigest()[:16]}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of an empty database for this test run."""
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as err:
        reason = f"no PostgreSQL answers at {ADMIN_URL} ({err})".strip()
        if os.environ.get("CLEARANCE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"CLEARANCE_REQUIRE_POSTGRES=1 but {reason}")
        pytest.skip(reason)
    name = f"clearance_test_{os.getpid()}_{secrets.token_hex(4)}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_database(ADMIN_URL, name)
    finally:
        # On a connection of its own: a test may have restarted the server meanwhile.
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=30) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
