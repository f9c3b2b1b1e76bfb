"""The machine's PostgreSQL for tests: one database of their own per test run.

`CLEARANCE_TEST_POSTGRES` names the server (default: postgresql://postgres@127.0.0.1:5432/test,
trust auth); the run creates `clearance_test_<pid>_<random>` on it and drops it at the
end. Where no server answers, the tests that need one skip, saying why, unless
`CLEARANCE_REQUIRE_SERVICES=1` (set by CI) makes that a failure.

A test that must stop or restart a server gets one of its own (`own_postgres`): the
shared server is never stopped or reconfigured by a test.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import socket
import tempfile
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
        if os.environ.get("CLEARANCE_REQUIRE_SERVICES") == "1":
            pytest.fail(f"CLEARANCE_REQUIRE_SERVICES=1 but {reason}")
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


class OwnServer:
    """A PostgreSQL server of the test's own: a fresh cluster (initdb) in a temporary
    directory, on a free port of 127.0.0.1, run as the `postgres` user when we are
    root (the server refuses root). A test may stop, start and restart it; the
    machine's shared server is never touched."""

    def __init__(self, where: Path) -> None:
        self.data = where / "data"
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self._bin = Path(sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))[-1]).parent
        self._where = where

    def _run(self, *command: str) -> None:
        import subprocess

        done = subprocess.run(
            [*self._as_owner, *command], capture_output=True, text=True, timeout=120
        )
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)}: {done.stdout}{done.stderr}")

    def create(self) -> None:
        if self._as_owner:
            shutil.chown(self._where, "postgres")
        self._run(
            str(self._bin / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        )
        self.start()

    def _ctl(self, action: str, *flags: str) -> None:
        options = f"-p {self.port} -k {self._where} -c listen_addresses=127.0.0.1"
        self._run(
            str(self._bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "-l",
            str(self._where / "server.log"),
            *flags,
            action,
        )

    def start(self) -> None:
        self._ctl("start")

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server; `fast` cuts its sessions off, `immediate` is a crash."""
        with contextlib.suppress(Exception):
            self._ctl("stop", "-m", mode)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def own_postgres() -> Iterator[OwnServer]:
    """A PostgreSQL server of this test's own (see OwnServer)."""
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        reason = "PostgreSQL's server binaries (initdb, pg_ctl) are not installed"
        if os.environ.get("CLEARANCE_REQUIRE_SERVICES") == "1":
            pytest.fail(f"CLEARANCE_REQUIRE_SERVICES=1 but {reason}")
        pytest.skip(reason)
    # Not under pytest's tmp_path: its parents are closed to the `postgres` user.
    where = Path(tempfile.mkdtemp(prefix="clearance-own-postgres-"))
    server = OwnServer(where)
    try:
        server.create()
        yield server
    finally:
        server.stop()
        shutil.rmtree(where, ignore_errors=True)
