"""The PostgreSQL store: many worker processes on many hosts, one database.

SQL only: what a step writes comes from the pure core (`core.rows.writes`), an
execution is rebuilt by `core.replay.replay`, exactly as in the SQLite store,
so both behave alike by construction and the contract suite holds both.

- The event log's primary key is the version check: of two workers appending
  event n+1, the second's insert fails and it gets `Conflict`.
- Work and deliveries are claimed with `FOR UPDATE SKIP LOCKED` under a lease,
  so workers never wait on each other's claims and never take the same unit.
- Ids come from identity columns: never reused.
- The audit log is append-only in the database: triggers refuse UPDATE (also
  the one an `INSERT ... ON CONFLICT DO UPDATE` would make), DELETE and TRUNCATE.
- A commit that leaves work or a delivery for another process sends a NOTIFY in
  its transaction; `wait_for_work` listens on a connection of its own, and the
  caller's poll stays as the fallback.

Tables are prefixed `clearance_` so they can share a schema with an
application's; `?schema=NAME` in the URL puts them in a schema of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Concatenate, LiteralString, ParamSpec, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from clearance.adapters.packed_json import compact_json, pack, unpack
from clearance.adapters.stored_log import (
    KeptStates,
    PrunedRows,
    RolledBack,
    SpecNeeded,
    Specs,
    audit_records,
    chain_row,
    fold,
    forgotten,
    prune_rows,
    read_events,
    work_command,
)
from clearance.core import audit_chain
from clearance.core.agent import AgentSpec
from clearance.core.audit_chain import ChainRow
from clearance.core.commands import AuditRecord, RunTool
from clearance.core.errors import ClearanceError
from clearance.core.events import Event
from clearance.core.execution import ApprovalRequest, Execution
from clearance.core.replay import (
    DECIDE_VERSION,
)
from clearance.core.reviewers import BadReviewer, Reviewer, ReviewerKey
from clearance.core.rows import Writes
from clearance.core.wire import (
    command_to_data,
    converter,
    event_to_data,
    execution_to_data,
    request_from_data,
    reviewer_from_data,
    reviewer_to_data,
)
from clearance.ports.store import (
    Claim,
    ClaimRequest,
    Conflict,
    Delivery,
    DeliveryAttempt,
    DueTimer,
    Forgotten,
    LeaseLost,
    UnknownRequest,
    UnknownReviewer,
    UnreadableExecution,
    Work,
    above_prefix,
    soonest_first,
)

P = ParamSpec("P")
T = TypeVar("T")

SCHEMA_VERSION = 8
# Schema 3: reviewers (the body is `reviewer_to_data`'s JSON) and the digests of their
# keys. Names and key ids compare by code point ("C"), so reviewers list in the order
# SQLite lists them, whatever the database's collation. IF NOT EXISTS: tables that
# are already there are taken as they are (as SQLite's schema does), so an older
# version's tables that already hold these upgrade too.
_REVIEWER_TABLES = """
CREATE TABLE IF NOT EXISTS clearance_reviewers (
    name TEXT COLLATE "C" PRIMARY KEY, body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS clearance_reviewer_keys (
    key_id TEXT COLLATE "C" PRIMARY KEY, reviewer TEXT COLLATE "C" NOT NULL,
    digest TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL, expires_at TIMESTAMPTZ,
    revoked_at TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS clearance_reviewer_keys_of ON clearance_reviewer_keys (reviewer)
"""
# Each upgrades the tables in place by one schema version, at open, in the
# transaction that checked the version.
# The audit log as a hash chain (core.audit_chain): no two records follow the same one
# (the chain cannot fork), and a head row (its last hash, its length) that a decision
# locks to extend it. entry / prev_hash / hash are NULL for records older than the
# chain, which its genesis hash (the head's first value, written at open) covers.
_AUDIT_CHAIN: LiteralString = """
CREATE UNIQUE INDEX IF NOT EXISTS clearance_audit_follows ON clearance_audit (prev_hash)
    WHERE prev_hash IS NOT NULL;
CREATE TABLE IF NOT EXISTS clearance_audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1), hash TEXT NOT NULL, records BIGINT NOT NULL
);
"""

# Schema 7: the one update the audit log takes is `clearance prune` dropping a chained
# record's payload (its body gains "pruned"); its link and where it belongs stay.
_AUDIT_APPEND_ONLY: LiteralString = """
CREATE OR REPLACE FUNCTION clearance_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF OLD.entry IS NOT NULL AND jsonb_typeof(NEW.body::jsonb -> 'pruned') = 'object'
            AND NEW.id = OLD.id AND NEW.request_id = OLD.request_id
            AND NEW.execution_id = OLD.execution_id AND NEW.entry = OLD.entry
            AND NEW.prev_hash IS NOT DISTINCT FROM OLD.prev_hash AND NEW.hash = OLD.hash THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION 'the audit log is append-only';
END $$"""

# Schema 8: when each finished execution last moved (`Writes.finished_at`): what prune
# looks through, rather than fold every execution.
_FINISHED: LiteralString = """
CREATE TABLE IF NOT EXISTS clearance_finished (
    execution_id TEXT COLLATE "C" PRIMARY KEY, at TIMESTAMPTZ NOT NULL
)"""

MIGRATIONS: dict[int, LiteralString] = {
    # A timer sweep claims the timers it fires (held_until: NULL = nobody); request
    # ids compare by code point whatever the database's collation, so a prefix is a
    # range of the primary key.
    1: "ALTER TABLE clearance_timers ADD COLUMN held_until TIMESTAMPTZ;"
    ' ALTER TABLE clearance_approvals ALTER COLUMN request_id TYPE TEXT COLLATE "C"',
    # Reviewers and their keys: new tables, made exactly as a new database has them.
    2: _REVIEWER_TABLES,
    # The spec each agent was last defined with: a new table, filled by the next
    # process to define an agent.
    3: "CREATE TABLE IF NOT EXISTS clearance_agent_definitions"
    " (tag TEXT PRIMARY KEY, spec_id TEXT NOT NULL)",
    4: "ALTER TABLE clearance_audit ADD COLUMN IF NOT EXISTS entry TEXT,"
    " ADD COLUMN IF NOT EXISTS prev_hash TEXT, ADD COLUMN IF NOT EXISTS hash TEXT;" + _AUDIT_CHAIN,
    # Why a delivery is sent (the request, its reminder, an escalation stage): every
    # delivery already there was the request's.
    5: "ALTER TABLE clearance_deliveries"
    " ADD COLUMN IF NOT EXISTS purpose TEXT NOT NULL DEFAULT 'request'",
    6: _AUDIT_APPEND_ONLY,
    # When each finished execution last moved, for prune. Which of those already stored
    # finished, and when, only folding would tell: each is listed as not known
    # (-infinity), and prune looks at it.
    7: _FINISHED + "; INSERT INTO clearance_finished (execution_id, at)"
    " SELECT execution_id, '-infinity' FROM clearance_events WHERE seq = 1"
    " ON CONFLICT DO NOTHING",
}
SNAPSHOT_EVERY = 16
STATES_CACHED = 256
# Connections per store: steps of executions in flight commit side by side.
POOL_SIZE = 8

SCHEMA = (
    """
CREATE TABLE clearance_schema (version INTEGER NOT NULL);
CREATE TABLE clearance_agents (spec_id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE clearance_agent_definitions (tag TEXT PRIMARY KEY, spec_id TEXT NOT NULL);
CREATE TABLE clearance_events (
    execution_id TEXT NOT NULL, seq INTEGER NOT NULL, body BYTEA NOT NULL, spec_id TEXT,
    decide_version INTEGER, PRIMARY KEY (execution_id, seq)
);
CREATE TABLE clearance_snapshots (
    execution_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, state BYTEA NOT NULL
);
"""
    + _FINISHED
    + """;
CREATE TABLE clearance_approvals (
    request_id TEXT COLLATE "C" PRIMARY KEY, execution_id TEXT NOT NULL, agent_tag TEXT NOT NULL,
    status TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL, body BYTEA,
    listed BIGINT GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX clearance_approvals_pending ON clearance_approvals (created_at, listed)
    WHERE status = 'pending';
CREATE INDEX clearance_approvals_pending_tag
    ON clearance_approvals (agent_tag, created_at, listed) WHERE status = 'pending';
CREATE TABLE clearance_timers (
    due_at TIMESTAMPTZ NOT NULL, request_id TEXT NOT NULL, execution_id TEXT NOT NULL,
    held_until TIMESTAMPTZ, PRIMARY KEY (due_at, request_id)
);
CREATE TABLE clearance_work (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, execution_id TEXT NOT NULL,
    agent_tag TEXT NOT NULL, body TEXT NOT NULL, holder TEXT, lease_until TIMESTAMPTZ,
    queued_by INTEGER NOT NULL
);
CREATE INDEX clearance_work_queued ON clearance_work (agent_tag, id) WHERE holder IS NULL;
CREATE INDEX clearance_work_held ON clearance_work (lease_until) WHERE holder IS NOT NULL;
CREATE INDEX clearance_work_of ON clearance_work (execution_id);
CREATE TABLE clearance_audit (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, request_id TEXT NOT NULL,
    execution_id TEXT NOT NULL, body TEXT NOT NULL, entry TEXT, prev_hash TEXT, hash TEXT
);
CREATE INDEX clearance_audit_execution ON clearance_audit (execution_id);
"""
    + _AUDIT_CHAIN
    + """
CREATE TABLE clearance_deliveries (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, request_id TEXT NOT NULL,
    execution_id TEXT NOT NULL, agent_tag TEXT NOT NULL, url TEXT NOT NULL,
    webhook_id TEXT NOT NULL, signer TEXT NOT NULL, status TEXT NOT NULL,
    next_attempt_at TIMESTAMPTZ NOT NULL, expires_at TIMESTAMPTZ NOT NULL,
    claimed_by TEXT, lease_until TIMESTAMPTZ, channel TEXT NOT NULL,
    purpose TEXT NOT NULL DEFAULT 'request'
);
CREATE INDEX clearance_deliveries_due ON clearance_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX clearance_deliveries_request ON clearance_deliveries (request_id);
CREATE TABLE clearance_delivery_attempts (
    delivery_id BIGINT NOT NULL, n BIGINT GENERATED ALWAYS AS IDENTITY, at TIMESTAMPTZ NOT NULL,
    status_code INTEGER, error TEXT, outcome TEXT NOT NULL
);
CREATE INDEX clearance_delivery_attempts_of ON clearance_delivery_attempts (delivery_id, n);
CREATE TABLE clearance_disabled_endpoints (
    url TEXT PRIMARY KEY, at TIMESTAMPTZ NOT NULL, reason TEXT NOT NULL
);
"""
    + _AUDIT_APPEND_ONLY
    + """;
CREATE TRIGGER clearance_audit_no_change BEFORE UPDATE OR DELETE ON clearance_audit
    FOR EACH ROW EXECUTE FUNCTION clearance_audit_append_only();
CREATE TRIGGER clearance_audit_no_truncate BEFORE TRUNCATE ON clearance_audit
    FOR EACH STATEMENT EXECUTE FUNCTION clearance_audit_append_only();
"""
    + _REVIEWER_TABLES
)

_WORK = "id, execution_id, agent_tag, body, holder"
# Seconds between measurements of the database clock's offset from ours; an offset
# this small is taken for none.
OFFSET_EVERY = 60.0
SAME_CLOCK = timedelta(milliseconds=10)
ZERO = timedelta(0)
# Tries of a store call whose connection goes away (with backoff: about 6 s in all).
ATTEMPTS = 8
_DELIVERY = (
    "id, request_id, execution_id, agent_tag, url, webhook_id, status, next_attempt_at,"
    " expires_at, channel, signer, purpose"
)

_RETURNED_DELIVERY = ", ".join("d." + column.strip() for column in _DELIVERY.split(","))
_KEY = "key_id, reviewer, digest, created_at, expires_at, revoked_at"


def _backoff(attempt: int) -> float:
    return float(min(2.0, 0.05 * 2**attempt))


def _retried(
    method: Callable[Concatenate[PostgresStore, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[PostgresStore, P], Coroutine[Any, Any, T]]:
    """Call again, with backoff, when the connection goes: for calls that may be
    repeated (reads; writes that find nothing left to do the second time)."""

    async def again(self: PostgresStore, /, *args: P.args, **kwargs: P.kwargs) -> T:
        for attempt in range(ATTEMPTS - 1):
            try:
                return await method(self, *args, **kwargs)
            except psycopg.OperationalError:
                await self._after_connection_loss(attempt)
        return await method(self, *args, **kwargs)

    again.__name__, again.__qualname__ = method.__name__, method.__qualname__
    again.__doc__ = method.__doc__
    return again


def _conflict(execution: Execution) -> Conflict:
    """Another event took the slot this step's event was to fill."""
    if execution.seq == 1:
        return Conflict(f"execution {execution.id} already exists")
    return Conflict(f"execution {execution.id} moved past version {execution.seq - 1}")


def _lease_lost(done: Claim, execution: Execution) -> LeaseLost:
    return LeaseLost(
        f"work {done.id} of execution {execution.id} is no longer held by {done.holder}:"
        " its lease ran out and it was taken over"
    )


def _utc(at: datetime) -> datetime:
    return at.astimezone(UTC)


def _split_url(url: str) -> tuple[str, str | None]:
    """The connection URL for psycopg, and the `schema` query parameter taken out of it."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "schema"), None)
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    if schema is not None and not schema.replace("_", "").isalnum():
        raise ClearanceError(f"schema={schema!r} in the store URL: accepted: letters, digits and _")
    scheme = "postgresql" if parts.scheme in ("postgres", "postgresql") else parts.scheme
    return urlunsplit((scheme, parts.netloc, parts.path, rest, parts.fragment)), schema


class PostgresStore:
    """Open with `PostgresStore(url)`; it connects on first use (or `await open()`)."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = POOL_SIZE,
        snapshot_every: int = SNAPSHOT_EVERY,
        connect_timeout: float = 10.0,
        synchronous_commit: bool = True,
    ) -> None:
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be 1 or more, got {snapshot_every}")
        self.url = url
        self._conninfo, self.schema = _split_url(url)
        self.snapshot_every = snapshot_every
        self._connect_timeout = connect_timeout
        options = "-c TimeZone=UTC"
        if not synchronous_commit:
            options += " -c synchronous_commit=off"
        if self.schema:
            options += f" -c search_path={self.schema}"
        self._options = options
        self._pool = AsyncConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=pool_size,
            open=False,
            kwargs={"autocommit": True, "options": options},
        )
        self._opened = False
        self._opening = asyncio.Lock()
        # NOTIFY channel: one per schema, so stores in other schemas sleep on.
        self._channel = f"clearance_work_{self.schema or 'default'}"
        # Our own notifications wake nobody here: their payload is this token.
        self._token = secrets.token_hex(8)
        self._listener: psycopg.AsyncConnection[Any] | None = None
        self._states = KeptStates(STATES_CACHED)
        self._specs = Specs()
        # The database's clock minus ours (see `_db_time`), and when it was measured.
        self._offset = ZERO
        self._offset_at = float("-inf")

    # -- opening --------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and create (or check) the tables. Raises ClearanceError."""
        if self._opened:
            return
        async with self._opening:
            if self._opened:
                return
            try:
                await self._pool.open(wait=True, timeout=self._connect_timeout)
            except Exception as err:
                await self._pool.close()
                raise ClearanceError(
                    f"cannot connect to PostgreSQL at {self._shown()}: {err}"
                ) from None
            try:
                await self._setup()
            except BaseException:
                await self._pool.close()
                raise
            self._opened = True
            await self._measure_offset()
            # Listening from the start: a NOTIFY sent before the first wait_for_work
            # (a decision right after this process started) is not lost.
            await self._listen()

    def _db_time(self, at: datetime) -> datetime:
        """A time of this process's clock on the database's clock. Lease expiry and due
        timers are judged by the database's clock, so hosts whose clocks disagree agree
        on when a lease ran out: the engine's `now` and `until` arrive on our clock and
        are moved by the offset measured against the server's (within half a round
        trip), measured at open and again by the polling calls every OFFSET_EVERY s."""
        return _utc(at) + self._offset

    async def _fresh_offset(self) -> None:
        if time.monotonic() - self._offset_at > OFFSET_EVERY:
            await self._measure_offset()

    @_retried
    async def _measure_offset(self) -> None:
        async with self._conn() as conn:
            before = self._local_now()
            cur = await conn.execute("SELECT clock_timestamp()")
            after = self._local_now()
            (server,) = await cur.fetchone() or (None,)
        assert server is not None
        offset = server - (before + (after - before) / 2)
        # Within what a round trip can tell apart, the clocks agree: no shift at all,
        # so a boundary (a timer due at a microsecond) is the same on both.
        self._offset = offset if abs(offset) > max(2 * (after - before), SAME_CLOCK) else ZERO
        self._offset_at = time.monotonic()

    @staticmethod
    def _local_now() -> datetime:
        return datetime.now(UTC)

    def _shown(self) -> str:
        parts = urlsplit(self._conninfo)
        host = parts.hostname or "localhost"
        return f"{host}:{parts.port or 5432}{parts.path}"

    async def _setup(self) -> None:
        async with self._pool.connection() as conn, conn.transaction():
            # One worker at a time creates or checks the tables.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('clearance schema'))")
            if self.schema:
                await conn.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
                )
            cur = await conn.execute(
                "SELECT to_regclass('clearance_schema'), to_regclass('clearance_events')"
            )
            versions_table, events_table = await cur.fetchone() or (None, None)
            if versions_table is None:
                if events_table is not None:
                    raise ClearanceError(
                        f"{self._shown()} has a clearance_events table but no schema version:"
                        " not a Clearance database; use another database or ?schema=NAME"
                    )
                await conn.execute(SCHEMA)
                await conn.execute(
                    "INSERT INTO clearance_schema (version) VALUES (%s)", (SCHEMA_VERSION,)
                )
                await self._start_chain(conn)
                return
            cur = await conn.execute("SELECT version FROM clearance_schema")
            row = await cur.fetchone()
            version: int | None = None if row is None else int(row[0])
            if version != SCHEMA_VERSION and version not in MIGRATIONS:
                found = "no version" if version is None else f"schema version {version}"
                raise ClearanceError(
                    f"{self._shown()} holds Clearance tables of {found}; this version of"
                    f" Clearance reads PostgreSQL schema {SCHEMA_VERSION} and upgrades"
                    f" {', '.join(map(str, sorted(MIGRATIONS)))}: open it with a newer"
                    " Clearance, or use another database or ?schema=NAME"
                )
            while version is not None and version != SCHEMA_VERSION:
                await conn.execute(MIGRATIONS[version])
                version += 1
            await conn.execute("UPDATE clearance_schema SET version = %s", (SCHEMA_VERSION,))
            await self._start_chain(conn)

    @staticmethod
    async def _start_chain(conn: psycopg.AsyncConnection[Any]) -> None:
        """The chain's head, if it has none: the genesis hash over the records older
        than the chain (none in a new database)."""
        cur = await conn.execute("SELECT 1 FROM clearance_audit_head")
        if await cur.fetchone() is not None:
            return
        cur = await conn.execute("SELECT body FROM clearance_audit WHERE hash IS NULL ORDER BY id")
        start = audit_chain.genesis(body for (body,) in await cur.fetchall())
        await conn.execute(
            "INSERT INTO clearance_audit_head (id, hash, records) VALUES (1, %s, 0)"
            " ON CONFLICT DO NOTHING",
            (start,),
        )

    async def _after_connection_loss(self, attempt: int) -> None:
        """Before trying again: wait, and drop the pool's idle connections that died too
        (after a restart all of them did). Checking each connection as it is handed out
        would cost a round trip on every call instead."""
        await asyncio.sleep(_backoff(attempt))
        with contextlib.suppress(Exception):
            await self._pool.check()

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        if not self._opened:
            await self.open()
        async with self._pool.connection() as conn:
            yield conn

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with self._conn() as conn, conn.transaction():
            yield conn

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        await self._pool.close()
        self._opened = False

    # -- agents ---------------------------------------------------------------------------

    @_retried
    async def define_agent(self, spec: AgentSpec) -> None:
        spec_id, body = self._specs.row(spec)
        async with self._write() as conn:
            await conn.execute(
                "INSERT INTO clearance_agents (spec_id, body) VALUES (%s, %s)"
                " ON CONFLICT DO NOTHING",
                (spec_id, body),
            )
            await conn.execute(
                "INSERT INTO clearance_agent_definitions (tag, spec_id) VALUES (%s, %s)"
                " ON CONFLICT (tag) DO UPDATE SET spec_id = excluded.spec_id",
                (spec.tag, spec_id),
            )

    @_retried
    async def current_agent(self, tag: str) -> AgentSpec | None:
        async with self._conn() as conn:
            cur = await conn.execute(
                "SELECT spec_id FROM clearance_agent_definitions WHERE tag = %s", (tag,)
            )
            row = await cur.fetchone()
            return None if row is None else await self._spec(conn, row[0])

    async def _spec(self, conn: psycopg.AsyncConnection[Any], spec_id: str) -> AgentSpec:
        spec = self._specs.known(spec_id)
        if spec is None:
            cur = await conn.execute(
                "SELECT body FROM clearance_agents WHERE spec_id = %s", (spec_id,)
            )
            found = await cur.fetchone()
            if found is None:
                raise UnreadableExecution(f"agent spec {spec_id} is not in the store")
            spec = self._specs.read(spec_id, found[0])
        return spec

    # -- executions and their log -----------------------------------------------------------

    async def commit(
        self,
        writes: Writes,
        *,
        expected_seq: int,
        claim: ClaimRequest | None = None,
        done: Claim | None = None,
        alone: bool = False,
    ) -> list[Work]:
        if writes.execution.seq != expected_seq + 1:
            raise ValueError(f"commit expects the state one event past {expected_seq}")
        body = pack(event_to_data(writes.event))
        for attempt in range(ATTEMPTS):
            try:
                work = await self._commit(writes, body, expected_seq, claim, done)
                break
            except psycopg.OperationalError:
                # The connection went (a restart, a failover, a killed backend), maybe
                # while COMMIT was on its way: if our event is in the log, the step
                # committed; else nothing of it did, and it is written again.
                landed = await self._landed(writes.execution, body)
                if landed is not None:
                    work = landed
                    break
                if attempt == ATTEMPTS - 1:
                    raise
                await self._after_connection_loss(attempt)
        self._states.keep(writes.execution)
        return work

    @_retried
    async def _landed(self, execution: Execution, body: bytes) -> list[Work] | None:
        """The work a step queued, if its event (these very bytes) is in the log."""
        async with self._conn() as conn:
            cur = await conn.execute(
                "SELECT body FROM clearance_events WHERE execution_id = %s AND seq = %s",
                (execution.id, execution.seq),
            )
            row = await cur.fetchone()
            if row is None or bytes(row[0]) != body:
                return None
            cur = await conn.execute(
                f"SELECT {_WORK} FROM clearance_work WHERE execution_id = %s AND queued_by = %s"
                " ORDER BY id",
                (execution.id, execution.seq),
            )
            work = []
            for work_id, execution_id, tag, text, holder in await cur.fetchall():
                command, cancelled = work_command(text)
                work.append(Work(work_id, execution_id, tag, command, holder, None, cancelled))
            return work

    async def _commit(
        self,
        writes: Writes,
        body: bytes,
        expected_seq: int,
        claim: ClaimRequest | None,
        done: Claim | None,
    ) -> list[Work]:
        """One step: its statement (see `_statement`), and before it, for a finishing
        step, its queued work dropped or marked cancelled in the same transaction; a
        lease found lost rolls that back too."""
        execution = writes.execution
        query, args, holders = self._statement(writes, body, expected_seq == 0, claim, done)
        finishing = writes.drop_queued_work
        async with self._conn() as conn:
            try:
                async with conn.transaction() if finishing else contextlib.nullcontext():
                    cancelled = await self._cancel_queued(conn, writes, claim) if finishing else []
                    cur = await conn.execute(query, args)
                    row = await cur.fetchone()
                    assert row is not None
                    if not row[0]:
                        assert done is not None
                        raise _lease_lost(done, execution)
            except psycopg.errors.UniqueViolation:
                raise _conflict(execution) from None
        ids = row[1] or []
        return cancelled + [
            Work(work_id, execution.id, execution.agent_tag, command, holder)
            for work_id, command, holder in zip(ids, writes.work, holders, strict=True)
        ]

    def _statement(
        self,
        writes: Writes,
        body: bytes,
        first: bool,
        claim: ClaimRequest | None,
        done: Claim | None,
    ) -> tuple[str, dict[str, Any], list[str | None]]:
        """A step's rows as one statement of data-modifying CTEs, its arguments, and the
        holder of each unit of work it queues. One statement: atomic without BEGIN/COMMIT,
        one round trip, and the client's cost of one statement instead of eight (the
        worker's CPU, not the server, bounds a PostgreSQL worker). Every write is gated
        on `ok`: the finished work was still ours (`done`), else nothing is written; the
        statement answers `ok`, the ids of the work queued, and whether it notified. A
        taken event slot fails the whole statement (Conflict)."""
        execution = writes.execution
        args: dict[str, Any] = {
            "eid": execution.id,
            "seq": execution.seq,
            "tag": execution.agent_tag,
            "body": body,
            "version": DECIDE_VERSION if first else None,
        }
        parts = []
        if done is not None:
            parts.append(
                "d AS (DELETE FROM clearance_work WHERE id = %(done_id)s"
                " AND holder = %(done_holder)s RETURNING id)"
            )
            parts.append("g AS (SELECT EXISTS (SELECT 1 FROM d) AS ok)")
            args.update(done_id=done.id, done_holder=done.holder)
        else:
            parts.append("g AS (SELECT true AS ok)")
        ok = "(SELECT ok FROM g)"
        spec_id = None
        snapshot = execution.seq % self.snapshot_every == 0
        if first or snapshot:
            # The first event and a snapshot name the spec the state folds with.
            spec_id, spec_body = self._specs.row(execution.agent)
            parts.append(
                "ag AS (INSERT INTO clearance_agents (spec_id, body)"
                f" SELECT %(spec_row)s, %(spec_body)s WHERE {ok} ON CONFLICT DO NOTHING)"
            )
            args.update(spec_row=spec_id, spec_body=spec_body)
        args["spec_id"] = spec_id if first else None
        parts.append(
            "ev AS (INSERT INTO clearance_events"
            " (execution_id, seq, body, spec_id, decide_version)"
            f" SELECT %(eid)s, %(seq)s, %(body)s, %(spec_id)s, %(version)s WHERE {ok})"
        )
        if snapshot:
            state = execution_to_data(execution)
            state["agent"] = spec_id  # stored once per distinct spec, in clearance_agents
            args["state"] = pack(state)
            parts.append(
                "sn AS (INSERT INTO clearance_snapshots (execution_id, seq, state)"
                f" SELECT %(eid)s, %(seq)s, %(state)s WHERE {ok} ON CONFLICT (execution_id)"
                " DO UPDATE SET seq = excluded.seq, state = excluded.state)"
            )
        if writes.timers_started:
            args["ts_due"] = [_utc(t.due_at) for t in writes.timers_started]
            args["ts_req"] = [t.request_id for t in writes.timers_started]
            parts.append(
                "ts AS (INSERT INTO clearance_timers (due_at, request_id, execution_id)"
                " SELECT due_at, request_id, %(eid)s FROM"
                " unnest(%(ts_due)s::timestamptz[], %(ts_req)s::text[]) AS t(due_at, request_id)"
                f" WHERE {ok} ON CONFLICT DO NOTHING)"
            )
        if writes.timers_cancelled:
            args["tc_due"] = [_utc(t.due_at) for t in writes.timers_cancelled]
            args["tc_req"] = [t.request_id for t in writes.timers_cancelled]
            parts.append(
                "tc AS (DELETE FROM clearance_timers x USING"
                " unnest(%(tc_due)s::timestamptz[], %(tc_req)s::text[]) AS t(due_at, request_id)"
                f" WHERE x.due_at = t.due_at AND x.request_id = t.request_id AND {ok})"
            )
        if writes.requests_opened:
            opened = writes.requests_opened
            args["ap_id"] = [r.request_id for r in opened]
            args["ap_status"] = [r.status for r in opened]
            args["ap_at"] = [_utc(r.timestamp) for r in opened]
            args["ap_body"] = [pack(converter.unstructure(r)) for r in opened]
            parts.append(
                "ap AS (INSERT INTO clearance_approvals"
                " (request_id, execution_id, agent_tag, status, created_at, body)"
                " SELECT request_id, %(eid)s, %(tag)s, status, created_at, body FROM unnest("
                "%(ap_id)s::text[], %(ap_status)s::text[], %(ap_at)s::timestamptz[],"
                " %(ap_body)s::bytea[]) WITH ORDINALITY"
                " AS r(request_id, status, created_at, body, n)"
                f" WHERE {ok} ORDER BY n)"
            )
        if writes.requests_revised:
            revised = writes.requests_revised
            args["rv_id"] = [r.request_id for r in revised]
            args["rv_body"] = [pack(converter.unstructure(r)) for r in revised]
            parts.append(
                "rv AS (UPDATE clearance_approvals x SET body = r.body"
                " FROM unnest(%(rv_id)s::text[], %(rv_body)s::bytea[]) AS r(request_id, body)"
                f" WHERE x.request_id = r.request_id AND x.status = 'pending' AND {ok})"
            )
        if writes.deliveries:
            sent = writes.deliveries
            args["dl"] = [
                [d.request_id, d.target, d.message_id, d.signer, d.channel, d.purpose] for d in sent
            ]
            args["dl_not_before"] = [_utc(d.not_before) for d in sent]
            args["dl_expires"] = [_utc(d.expires_at) for d in sent]
            parts.append(
                "dl AS (INSERT INTO clearance_deliveries (request_id, execution_id, agent_tag,"
                " url, webhook_id, signer, status, next_attempt_at, expires_at, channel, purpose)"
                " SELECT (%(dl)s::text[])[n][1], %(eid)s, %(tag)s, (%(dl)s::text[])[n][2],"
                " (%(dl)s::text[])[n][3], (%(dl)s::text[])[n][4], 'pending', nb, ex,"
                " (%(dl)s::text[])[n][5], (%(dl)s::text[])[n][6]"
                " FROM unnest(%(dl_not_before)s::timestamptz[], %(dl_expires)s::timestamptz[])"
                " WITH ORDINALITY AS t(nb, ex, n)"
                f" WHERE {ok} ORDER BY n)"
            )
        if writes.audit:
            # A call a policy decided has no request: "" in the column, null in the body.
            args["au_req"] = [r.request_id or "" for r in writes.audit]
            args["au_ex"] = [r.execution_id for r in writes.audit]
            args["au_body"] = [compact_json(converter.unstructure(r)) for r in writes.audit]
            # The chain is extended here, in this statement: the head row is locked
            # (FOR UPDATE: a racer waits, then reads the head this step leaves), each
            # record hashed after the one before it by the database's own sha256.
            args["au_entry"] = [audit_chain.entry(r) for r in writes.audit]
            args["au_k"] = len(writes.audit)
            parts.append(
                f"hd AS (SELECT hash FROM clearance_audit_head WHERE id = 1 AND {ok} FOR UPDATE)"
            )
            parts.append(
                "ch(n, prev, hash) AS (SELECT 1, hd.hash, encode(sha256(convert_to(hd.hash"
                " || (%(au_entry)s::text[])[1], 'UTF8')), 'hex') FROM hd UNION ALL"
                " SELECT ch.n + 1, ch.hash, encode(sha256(convert_to(ch.hash"
                " || (%(au_entry)s::text[])[ch.n + 1], 'UTF8')), 'hex') FROM ch"
                " WHERE ch.n < %(au_k)s)"
            )
            parts.append(
                "au AS (INSERT INTO clearance_audit"
                " (request_id, execution_id, body, entry, prev_hash, hash)"
                " SELECT (%(au_req)s::text[])[n], (%(au_ex)s::text[])[n],"
                " (%(au_body)s::text[])[n], (%(au_entry)s::text[])[n], prev, hash"
                " FROM ch ORDER BY n)"
            )
            parts.append(
                "hu AS (UPDATE clearance_audit_head x SET records = x.records + %(au_k)s,"
                " hash = (SELECT hash FROM ch WHERE n = %(au_k)s) WHERE x.id = 1"
                " AND EXISTS (SELECT 1 FROM hd))"
            )
        if writes.finished_at is not None:
            args["fn_at"] = _utc(writes.finished_at)
            parts.append(
                "fn AS (INSERT INTO clearance_finished (execution_id, at)"
                f" SELECT %(eid)s, %(fn_at)s WHERE {ok}"
                " ON CONFLICT (execution_id) DO UPDATE SET at = excluded.at)"
            )
        if writes.requests_decided:
            args["dc_id"] = [request_id for request_id, _ in writes.requests_decided]
            args["dc_status"] = [status for _, status in writes.requests_decided]
            parts.append(
                "dc AS (UPDATE clearance_approvals x SET status = c.status, body = NULL"
                " FROM unnest(%(dc_id)s::text[], %(dc_status)s::text[]) AS c(request_id, status)"
                f" WHERE x.request_id = c.request_id AND {ok})"
            )
        holders = [
            claim.holder if claim is not None and n < claim.limit else None
            for n in range(len(writes.work))
        ]
        returned = "NULL::bigint[]"
        if writes.work:
            args["wk_body"] = [compact_json(command_to_data(c)) for c in writes.work]
            args["wk_holder"] = holders
            args["wk_until"] = [
                self._db_time(claim.until) if claim is not None and h else None for h in holders
            ]
            parts.append(
                "wk AS (INSERT INTO clearance_work"
                " (execution_id, agent_tag, body, holder, lease_until, queued_by)"
                " SELECT %(eid)s, %(tag)s, body, holder, until, %(seq)s FROM unnest("
                "%(wk_body)s::text[], %(wk_holder)s::text[], %(wk_until)s::timestamptz[])"
                f" WITH ORDINALITY AS w(body, holder, until, n) WHERE {ok} ORDER BY n"
                " RETURNING id)"
            )
            returned = "ARRAY(SELECT id FROM wk ORDER BY id)"
        notified = "0"
        if writes.deliveries or None in holders:
            args.update(channel=self._channel, token=self._token)
            parts.append(f"nt AS (SELECT pg_notify(%(channel)s, %(token)s) WHERE {ok})")
            notified = "(SELECT count(*) FROM nt)"
        # RECURSIVE for the audit chain's `ch`; the other parts are plain.
        query = f"WITH RECURSIVE {', '.join(parts)} SELECT {ok}, {returned}, {notified}"
        return query, args, holders

    async def _notify(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("SELECT pg_notify(%s, %s)", (self._channel, self._token))

    async def _cancel_queued(
        self, conn: psycopg.AsyncConnection[Any], writes: Writes, claim: ClaimRequest | None
    ) -> list[Work]:
        """As the SQLite store: queued tool runs stay, marked cancelled (held by the
        claim's holder); queued model calls go."""
        execution = writes.execution
        holder = claim.holder if claim is not None else None
        until = self._db_time(claim.until) if claim is not None else None
        cur = await conn.execute(
            "SELECT id, body FROM clearance_work WHERE execution_id = %s AND holder IS NULL"
            " ORDER BY id FOR UPDATE",
            (execution.id,),
        )
        cancelled = []
        for work_id, body in await cur.fetchall():
            command, _ = work_command(body)
            if isinstance(command, RunTool):
                await conn.execute(
                    "UPDATE clearance_work SET body = %s, holder = %s, lease_until = %s"
                    " WHERE id = %s",
                    (
                        compact_json({**command_to_data(command), "cancelled": True}),
                        holder,
                        until,
                        work_id,
                    ),
                )
                cancelled.append(
                    Work(
                        work_id, execution.id, execution.agent_tag, command, holder, cancelled=True
                    )
                )
            else:
                await conn.execute("DELETE FROM clearance_work WHERE id = %s", (work_id,))
        return cancelled

    @_retried
    async def load(self, execution_id: str) -> Execution | None:
        async with self._conn() as conn:
            cached = self._states.get(execution_id)
            if cached is not None:
                cur = await conn.execute(
                    "SELECT max(seq) FROM clearance_events WHERE execution_id = %s",
                    (execution_id,),
                )
                (last,) = await cur.fetchone() or (None,)
                if last == cached.seq:
                    # Remembered again, not moved: while this awaited, other steps'
                    # states may have pushed it out of the bounded cache.
                    self._states.keep(cached)
                    return cached
            loaded = await self._fold(conn, execution_id)
        if loaded is not None:
            self._states.keep(loaded)
        return loaded

    async def _fold(
        self, conn: psycopg.AsyncConnection[Any], execution_id: str
    ) -> Execution | None:
        cur = await conn.execute(
            "SELECT e.spec_id, e.decide_version, s.seq, s.state FROM clearance_events e"
            " LEFT JOIN clearance_snapshots s ON s.execution_id = e.execution_id"
            " WHERE e.execution_id = %s AND e.seq = 1",
            (execution_id,),
        )
        row = await cur.fetchone()
        if row is None:
            return None
        spec_id, version, since, state = row
        spec = await self._spec(conn, spec_id)
        snapshot = None if state is None else (since, bytes(state))
        log = await self._log(conn, execution_id, since or 0)

        def known(named: str) -> AgentSpec:
            found = self._specs.known(named)
            if found is None:
                raise SpecNeeded(named)
            return found

        try:
            return fold(execution_id, spec, version, snapshot, log, known)
        except SpecNeeded as need:  # the snapshot's spec (redefined since): read it
            await self._spec(conn, need.spec_id)
            return fold(execution_id, spec, version, snapshot, log, known)

    @staticmethod
    async def _log(
        conn: psycopg.AsyncConnection[Any], execution_id: str, after: int = 0
    ) -> list[tuple[int, bytes]]:
        cur = await conn.execute(
            "SELECT seq, body FROM clearance_events WHERE execution_id = %s AND seq > %s"
            " ORDER BY seq",
            (execution_id, after),
        )
        return await cur.fetchall()

    @_retried
    async def events(self, execution_id: str) -> list[Event]:
        async with self._conn() as conn:
            rows = await self._log(conn, execution_id)
        return [event for _, event in read_events(execution_id, rows)]

    async def execution_ids(
        self, agent_tag: str | None = None, *, after: str | None = None, limit: int = 1000
    ) -> list[str]:
        found: list[str] = []
        async with self._conn() as conn:
            while len(found) < limit:
                cur = await conn.execute(
                    "SELECT execution_id, spec_id FROM clearance_events WHERE seq = 1"
                    " AND execution_id > %s ORDER BY execution_id LIMIT %s",
                    (after or "", limit),
                )
                rows = await cur.fetchall()
                if not rows:
                    break
                for execution_id, spec_id in rows:
                    spec = await self._spec(conn, spec_id)
                    if agent_tag is None or spec.tag == agent_tag:
                        found.append(execution_id)
                after = rows[-1][0]
        return found[:limit]

    @_retried
    async def finished_before(
        self, cutoff: datetime, *, after: str | None = None, limit: int = 1000
    ) -> list[str]:
        async with self._conn() as conn:
            cur = await conn.execute(
                "SELECT execution_id FROM clearance_finished WHERE execution_id > %s"
                " AND at < %s ORDER BY execution_id LIMIT %s",
                (after or "", _utc(cutoff), limit),
            )
            return [execution_id for (execution_id,) in await cur.fetchall()]

    # -- approvals, timers, audit -----------------------------------------------------------

    @_retried
    async def audit_chain(self, after: int = 0, limit: int = 10_000) -> list[ChainRow]:
        async with self._conn() as conn:
            cur = await conn.execute(
                "SELECT id, body, entry, prev_hash, hash FROM clearance_audit WHERE id > %s"
                " ORDER BY id LIMIT %s",
                (after, limit),
            )
            return [chain_row(*row) for row in await cur.fetchall()]

    # -- retention ---------------------------------------------------------------------------

    @_retried
    async def forget(
        self, executions: Sequence[Execution], at: datetime, *, dry_run: bool = False
    ) -> Forgotten:
        gone: list[str] = []
        audits: list[PrunedRows] = []
        vanished = 0
        try:
            async with self._write() as conn:
                for ex in executions:
                    # Work first: a worker's last commit removes its work and appends its
                    # event at once, so with no work left the seq read next is final.
                    cur = await conn.execute(
                        "SELECT 1 FROM clearance_work WHERE execution_id = %s LIMIT 1", (ex.id,)
                    )
                    if await cur.fetchone() is not None:
                        continue
                    # The last event, locked: a prune forgetting the same execution at the
                    # same time waits here until this one commits, and then finds it gone.
                    cur = await conn.execute(
                        "SELECT seq FROM clearance_events WHERE execution_id = %s"
                        " ORDER BY seq DESC LIMIT 1 FOR UPDATE",
                        (ex.id,),
                    )
                    row = await cur.fetchone()
                    if row is None:
                        vanished += 1
                        continue
                    if row[0] != ex.seq:
                        continue
                    requests = [r.request_id for r in ex.requests]
                    await conn.execute(
                        "DELETE FROM clearance_events WHERE execution_id = %s", (ex.id,)
                    )
                    await conn.execute(
                        "DELETE FROM clearance_snapshots WHERE execution_id = %s", (ex.id,)
                    )
                    await conn.execute(
                        "DELETE FROM clearance_finished WHERE execution_id = %s", (ex.id,)
                    )
                    if requests:
                        await conn.execute(
                            "DELETE FROM clearance_delivery_attempts WHERE delivery_id IN"
                            " (SELECT id FROM clearance_deliveries WHERE request_id = ANY(%s))",
                            (requests,),
                        )
                        await conn.execute(
                            "DELETE FROM clearance_deliveries WHERE request_id = ANY(%s)",
                            (requests,),
                        )
                        await conn.execute(
                            "DELETE FROM clearance_approvals WHERE request_id = ANY(%s)",
                            (requests,),
                        )
                    cur = await conn.execute(
                        "SELECT id, body, entry FROM clearance_audit WHERE execution_id = %s",
                        (ex.id,),
                    )
                    audit = prune_rows(await cur.fetchall(), at)
                    if audit.bodies:
                        await conn.cursor().executemany(
                            "UPDATE clearance_audit SET body = %s WHERE id = %s", audit.bodies
                        )
                    audits.append(audit)
                    gone.append(ex.id)
                done = forgotten(gone, audits, vanished)
                if dry_run:
                    raise RolledBack
        except RolledBack:
            return done
        for execution_id in gone:
            self._states.drop(execution_id)
        return done

    @_retried
    async def audit_head(self) -> tuple[str, int] | None:
        async with self._conn() as conn:
            cur = await conn.execute("SELECT hash, records FROM clearance_audit_head WHERE id = 1")
            row = await cur.fetchone()
            return None if row is None else (row[0], int(row[1]))

    async def _one(self, query: str, args: Sequence[Any]) -> Any:
        async with self._conn() as conn:
            cur = await conn.execute(query, args)
            return await cur.fetchone()

    async def _all(self, query: str, args: Sequence[Any]) -> list[Any]:
        async with self._conn() as conn:
            cur = await conn.execute(query, args)
            return await cur.fetchall()

    @_retried
    async def execution_of_request(self, request_id: str) -> str | None:
        row = await self._one(
            "SELECT execution_id FROM clearance_approvals WHERE request_id = %s", (request_id,)
        )
        return None if row is None else str(row[0])

    @_retried
    async def request_ids_starting(self, prefix: str, limit: int) -> list[str]:
        # A range of the primary key (ids compare as "C": code point order).
        query, args = "SELECT request_id FROM clearance_approvals WHERE request_id >= %s", [prefix]
        if (above := above_prefix(prefix)) is not None:
            query += " AND request_id < %s"
            args.append(above)
        rows = await self._all(query + " ORDER BY request_id LIMIT %s", (*args, limit))
        return [str(r) for (r,) in rows]

    @_retried
    async def pending(
        self, agent_tag: str | None = None, limit: int | None = None, after: str | None = None
    ) -> list[ApprovalRequest]:
        query = "SELECT body FROM clearance_approvals WHERE status = 'pending'"
        args: list[Any] = []
        if agent_tag is not None:
            query += " AND agent_tag = %s"
            args.append(agent_tag)
        if after is not None:
            mark = await self._one(
                "SELECT created_at, listed FROM clearance_approvals WHERE request_id = %s",
                (after,),
            )
            if mark is None:
                raise UnknownRequest(f"no approval request '{after}' to list after")
            query += " AND (created_at, listed) > (%s, %s)"
            args += mark
        query += " ORDER BY created_at, listed"
        if limit is not None:
            query += " LIMIT %s"
            args.append(limit)
        rows = await self._all(query, args)
        return [request_from_data(unpack(bytes(body))) for (body,) in rows]

    @_retried
    @_retried
    async def claim_timers(self, now: datetime, until: datetime, limit: int) -> list[DueTimer]:
        await self._fresh_offset()
        async with self._write() as conn:
            # Locked without waiting for timers another sweep is claiming; the old row's
            # due_at on the index of due time: O(due), not O(pending).
            cur = await conn.execute(
                "WITH due AS (SELECT due_at, request_id FROM clearance_timers"
                " WHERE due_at <= %(now)s AND (held_until IS NULL OR held_until <= %(now)s)"
                " ORDER BY due_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
                " UPDATE clearance_timers t SET held_until = %(until)s FROM due"
                " WHERE t.due_at = due.due_at AND t.request_id = due.request_id"
                " RETURNING t.execution_id, t.request_id, t.due_at",
                {"now": self._db_time(now), "until": self._db_time(until), "limit": limit},
            )
            rows = await cur.fetchall()
        return soonest_first(DueTimer(e, r, _utc(d)) for e, r, d in rows)

    @_retried
    async def drop_timer(self, timer: DueTimer) -> None:
        async with self._write() as conn:
            await conn.execute(
                "DELETE FROM clearance_timers WHERE due_at = %s AND request_id = %s",
                (_utc(timer.due_at), timer.request_id),
            )

    @_retried
    async def postpone_timer(self, timer: DueTimer, until: datetime) -> None:
        async with self._write() as conn:
            cur = await conn.execute(
                "DELETE FROM clearance_timers WHERE due_at = %s AND request_id = %s",
                (_utc(timer.due_at), timer.request_id),
            )
            if cur.rowcount:
                await conn.execute(
                    "INSERT INTO clearance_timers (due_at, request_id, execution_id)"
                    " VALUES (%s, %s, %s) ON CONFLICT (due_at, request_id) DO NOTHING",
                    (_utc(until), timer.request_id, timer.execution_id),
                )

    @_retried
    async def audit(
        self, execution_id: str | None = None, request_id: str | None = None
    ) -> list[AuditRecord]:
        query, args, where = "SELECT id, body FROM clearance_audit", [], []
        if execution_id is not None:
            where.append("execution_id = %s")
            args.append(execution_id)
        if request_id is not None:
            # Through the request's execution: one index on the append-only log, not two.
            where.append(
                "execution_id = (SELECT execution_id FROM clearance_approvals"
                " WHERE request_id = %s) AND request_id = %s"
            )
            args += [request_id, request_id]
        if where:
            query += " WHERE " + " AND ".join(where)
        return audit_records(await self._all(query + " ORDER BY id", args))

    # -- the work queue -----------------------------------------------------------------------

    @_retried
    async def claim_work(
        self,
        agent_tags: Sequence[str],
        holder: str,
        now: datetime,
        until: datetime,
        limit: int,
        skip: Sequence[int] = (),
    ) -> list[Work]:
        if not agent_tags or limit <= 0:
            return []
        await self._fresh_offset()
        tags, skipped = list(agent_tags), list(skip)
        # Queued work first, then work whose holder stopped renewing: each on its own
        # partial index, locked without waiting for rows another worker is claiming.
        picks = (
            "SELECT id, holder FROM clearance_work WHERE holder IS NULL"
            " AND agent_tag = ANY(%(tags)s) AND NOT id = ANY(%(skip)s)"
            " ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED",
            "SELECT id, holder FROM clearance_work WHERE holder IS NOT NULL"
            " AND lease_until <= %(now)s AND agent_tag = ANY(%(tags)s)"
            " AND NOT id = ANY(%(skip)s) ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED",
        )
        taken: list[Work] = []
        async with self._write() as conn:
            for pick in picks:
                if len(taken) >= limit:
                    break
                cur = await conn.execute(
                    f"WITH picked AS ({pick}) UPDATE clearance_work w"
                    " SET holder = %(holder)s, lease_until = %(until)s FROM picked"
                    " WHERE w.id = picked.id"
                    " RETURNING w.id, w.execution_id, w.agent_tag, w.body, picked.holder",
                    {
                        "tags": tags,
                        "skip": skipped,
                        "now": self._db_time(now),
                        "limit": limit - len(taken),
                        "holder": holder,
                        "until": self._db_time(until),
                    },
                )
                for work_id, execution_id, tag, body, previous in await cur.fetchall():
                    command, cancelled = work_command(body)
                    taken.append(
                        Work(work_id, execution_id, tag, command, holder, previous, cancelled)
                    )
        return sorted(taken, key=lambda w: w.id)

    @_retried
    async def with_work(self, agent_tags: Sequence[str]) -> list[str]:
        if not agent_tags:
            return []
        rows = await self._all(
            "SELECT execution_id FROM clearance_work WHERE agent_tag = ANY(%s)"
            " GROUP BY execution_id ORDER BY min(id)",
            (list(agent_tags),),
        )
        return [execution_id for (execution_id,) in rows]

    @_retried
    async def renew(self, claims: Sequence[Claim], until: datetime) -> list[Claim]:
        if not claims:
            return []
        rows = await self._all(
            "UPDATE clearance_work w SET lease_until = %s"
            " FROM unnest(%s::bigint[], %s::text[]) AS c(id, holder)"
            " WHERE w.id = c.id AND w.holder = c.holder RETURNING w.id, w.holder",
            (self._db_time(until), [c.id for c in claims], [c.holder for c in claims]),
        )
        kept = {(i, h) for i, h in rows}
        return [c for c in claims if (c.id, c.holder) in kept]

    @_retried
    async def complete(self, claim: Claim) -> bool:
        async with self._conn() as conn:
            cur = await conn.execute(
                "DELETE FROM clearance_work WHERE id = %s AND holder = %s",
                (claim.id, claim.holder),
            )
            return cur.rowcount == 1

    @_retried
    async def release(self, claim: Claim) -> None:
        async with self._write() as conn:
            cur = await conn.execute(
                "UPDATE clearance_work SET holder = NULL, lease_until = NULL"
                " WHERE id = %s AND holder = %s",
                (claim.id, claim.holder),
            )
            if cur.rowcount:
                await self._notify(conn)

    async def _listen(self) -> psycopg.AsyncConnection[Any]:
        """A connection of its own, listening on this store's channel."""
        listener = await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, options=self._options
        )
        await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        self._listener = listener
        return listener

    async def wait_for_work(self, seconds: float) -> bool:
        if not self._opened:
            await self.open()
        deadline = time.monotonic() + seconds
        try:
            listener = self._listener
            if listener is None or listener.closed:
                listener = await self._listen()
            while (left := deadline - time.monotonic()) > 0:
                async for note in listener.notifies(timeout=left, stop_after=1):
                    if note.payload != self._token:
                        return True
            return False
        except psycopg.OperationalError:
            # The listening connection is gone (a restart, a failover): look now, and
            # listen on a new one next time.
            if self._listener is not None:
                await self._listener.close()
            self._listener = None
            return True

    # -- deliveries -----------------------------------------------------------------------------

    async def _deliveries(
        self, conn: psycopg.AsyncConnection[Any], rows: list[Any]
    ) -> list[Delivery]:
        out = []
        for i, rid, eid, tag, url, wid, status, next_at, expires, channel, signer, purpose in rows:
            cur = await conn.execute(
                "SELECT at, status_code, error, outcome FROM clearance_delivery_attempts"
                " WHERE delivery_id = %s ORDER BY n",
                (i,),
            )
            attempts = tuple(
                DeliveryAttempt(_utc(at), code, error, outcome)
                for at, code, error, outcome in await cur.fetchall()
            )
            out.append(
                Delivery(
                    i,
                    rid,
                    eid,
                    tag,
                    url,
                    wid,
                    status,
                    attempts,
                    _utc(next_at),
                    _utc(expires),
                    channel,
                    signer,
                    purpose,
                )
            )
        return out

    @_retried
    async def claim_deliveries(
        self,
        agent_tags: Sequence[str],
        worker: str,
        now: datetime,
        lease_until: datetime,
        limit: int,
        *,
        instance_signed: bool,
        channels: Sequence[str] = ("webhook",),
        exclude_urls: Sequence[str] = (),
    ) -> list[Delivery]:
        # Only what this worker can carry out (see the SQLite store).
        await self._fresh_offset()
        signer = "(signer = 'agent' AND agent_tag = ANY(%(tags)s))"
        if instance_signed:
            signer = f"(signer = 'instance' OR {signer})"
        pick = (
            "SELECT id FROM clearance_deliveries WHERE status = 'pending'"
            f" AND next_attempt_at <= %(now)s AND {signer} AND channel = ANY(%(channels)s)"
            " AND (claimed_by IS NULL OR lease_until <= %(now)s)"
            " AND NOT url = ANY(%(exclude)s)"
            " ORDER BY next_attempt_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
        )
        async with self._write() as conn:
            cur = await conn.execute(
                f"WITH picked AS ({pick}) UPDATE clearance_deliveries d"
                " SET claimed_by = %(worker)s, lease_until = %(until)s FROM picked"
                f" WHERE d.id = picked.id RETURNING {_RETURNED_DELIVERY}",
                {
                    "tags": list(agent_tags),
                    "now": self._db_time(now),
                    "channels": list(channels),
                    "exclude": list(exclude_urls),
                    "limit": limit,
                    "worker": worker,
                    "until": self._db_time(lease_until),
                },
            )
            rows = sorted(await cur.fetchall(), key=lambda r: (r[7], r[0]))
            return await self._deliveries(conn, rows)

    @_retried
    async def release_delivery(self, delivery_id: int, worker: str) -> None:
        async with self._write() as conn:
            await conn.execute(
                "UPDATE clearance_deliveries SET claimed_by = NULL, lease_until = NULL"
                " WHERE id = %s AND claimed_by = %s",
                (delivery_id, worker),
            )

    @_retried
    async def record_attempt(
        self,
        delivery_id: int,
        worker: str,
        attempt: DeliveryAttempt,
        status: str,
        next_attempt_at: datetime | None,
    ) -> bool:
        async with self._write() as conn:
            cur = await conn.execute(
                "UPDATE clearance_deliveries SET status = %s, claimed_by = NULL,"
                " lease_until = NULL, next_attempt_at = COALESCE(%s, next_attempt_at)"
                " WHERE id = %s AND claimed_by = %s",
                (
                    status,
                    _utc(next_attempt_at) if next_attempt_at else None,
                    delivery_id,
                    worker,
                ),
            )
            if cur.rowcount != 1:
                return False  # taken over after our lease ran out: theirs to record
            await conn.execute(
                "INSERT INTO clearance_delivery_attempts"
                " (delivery_id, at, status_code, error, outcome) VALUES (%s, %s, %s, %s, %s)",
                (
                    delivery_id,
                    _utc(attempt.at),
                    attempt.status_code,
                    attempt.error,
                    attempt.outcome,
                ),
            )
        return True

    @_retried
    async def deliveries(self, request_id: str) -> list[Delivery]:
        async with self._conn() as conn:
            cur = await conn.execute(
                f"SELECT {_DELIVERY} FROM clearance_deliveries WHERE request_id = %s ORDER BY id",
                (request_id,),
            )
            return await self._deliveries(conn, await cur.fetchall())

    @_retried
    async def disable_endpoint(self, url: str, at: datetime, reason: str) -> None:
        async with self._write() as conn:
            await conn.execute(
                "INSERT INTO clearance_disabled_endpoints (url, at, reason) VALUES (%s, %s, %s)"
                " ON CONFLICT (url) DO NOTHING",
                (url, _utc(at), reason),
            )

    @_retried
    async def endpoint_disabled(self, url: str) -> bool:
        row = await self._one("SELECT 1 FROM clearance_disabled_endpoints WHERE url = %s", (url,))
        return row is not None

    # -- reviewers and their keys -------------------------------------------------------------

    @_retried
    async def save_reviewer(self, reviewer: Reviewer) -> bool:
        body = compact_json(reviewer_to_data(reviewer))
        async with self._write() as conn:
            # Insert, else update: an upsert alone cannot tell which it did. A racer's
            # insert is waited for by ON CONFLICT; a removal between the two, tried again.
            while True:
                cur = await conn.execute(
                    "INSERT INTO clearance_reviewers (name, body) VALUES (%s, %s)"
                    " ON CONFLICT (name) DO NOTHING",
                    (reviewer.name, body),
                )
                if cur.rowcount == 1:
                    return True
                cur = await conn.execute(
                    "UPDATE clearance_reviewers SET body = %s WHERE name = %s",
                    (body, reviewer.name),
                )
                if cur.rowcount == 1:
                    return False

    @_retried
    async def reviewer(self, name: str) -> Reviewer | None:
        row = await self._one("SELECT body FROM clearance_reviewers WHERE name = %s", (name,))
        return None if row is None else reviewer_from_data(json.loads(row[0]))

    @_retried
    async def reviewers(self) -> list[Reviewer]:
        rows = await self._all("SELECT body FROM clearance_reviewers ORDER BY name", ())
        return [reviewer_from_data(json.loads(body)) for (body,) in rows]

    @_retried
    async def remove_reviewer(self, name: str) -> bool:
        async with self._write() as conn:
            # The reviewer first: it waits for an add_key holding the row (see there),
            # so the keys deleted next include the key that one added.
            cur = await conn.execute("DELETE FROM clearance_reviewers WHERE name = %s", (name,))
            await conn.execute("DELETE FROM clearance_reviewer_keys WHERE reviewer = %s", (name,))
            return cur.rowcount == 1

    @staticmethod
    def _key(row: Any) -> ReviewerKey:
        key_id, reviewer, digest, created, expires, revoked = row
        return ReviewerKey(
            key_id,
            reviewer,
            digest,
            _utc(created),
            None if expires is None else _utc(expires),
            None if revoked is None else _utc(revoked),
        )

    @_retried
    async def add_key(self, key: ReviewerKey) -> None:
        async with self._write() as conn:
            # Held until the key is in (as a foreign key would, without blocking a save):
            # a removal of the reviewer waits, then deletes this key too, instead of
            # leaving it to a new reviewer of that name.
            cur = await conn.execute(
                "SELECT 1 FROM clearance_reviewers WHERE name = %s FOR KEY SHARE",
                (key.reviewer,),
            )
            if await cur.fetchone() is None:
                raise UnknownReviewer(f"no reviewer '{key.reviewer}' to add a key for")
            cur = await conn.execute(
                "INSERT INTO clearance_reviewer_keys (key_id, reviewer, digest, created_at,"
                " expires_at, revoked_at) VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (key_id) DO NOTHING",
                (
                    key.key_id,
                    key.reviewer,
                    key.digest,
                    _utc(key.created_at),
                    None if key.expires_at is None else _utc(key.expires_at),
                    None if key.revoked_at is None else _utc(key.revoked_at),
                ),
            )
            if cur.rowcount == 1:
                return
            # Already there: this very key (a call repeated after a lost connection
            # whose insert had landed), or another that drew the same id.
            cur = await conn.execute(
                f"SELECT {_KEY} FROM clearance_reviewer_keys WHERE key_id = %s", (key.key_id,)
            )
            stored = await cur.fetchone()
            if stored is None or self._key(stored) != key:
                raise BadReviewer(f"key id {key.key_id} is already taken by another key")

    @_retried
    async def reviewer_key(self, key_id: str) -> ReviewerKey | None:
        row = await self._one(
            f"SELECT {_KEY} FROM clearance_reviewer_keys WHERE key_id = %s", (key_id,)
        )
        return None if row is None else self._key(row)

    @_retried
    async def reviewer_keys(self, reviewer: str) -> list[ReviewerKey]:
        rows = await self._all(
            f"SELECT {_KEY} FROM clearance_reviewer_keys WHERE reviewer = %s"
            " ORDER BY created_at, key_id",
            (reviewer,),
        )
        return [self._key(row) for row in rows]

    @_retried
    async def revoke_key(self, key_id: str, at: datetime) -> bool:
        async with self._conn() as conn:
            cur = await conn.execute(
                "UPDATE clearance_reviewer_keys SET revoked_at = %s"
                " WHERE key_id = %s AND revoked_at IS NULL",
                (_utc(at), key_id),
            )
            return cur.rowcount == 1


def open_url(url: str, *, synchronous: str = "FULL") -> PostgresStore:
    """The `clearance.stores` entry for `postgresql://` (and `postgres://`) URLs.
    `synchronous`: FULL (the default) waits for each commit to be flushed; NORMAL
    sets `synchronous_commit = off`, so a server crash may lose the last moments of
    commits (never corrupting any), as SQLite's NORMAL may on a power cut."""
    if synchronous.upper() not in ("FULL", "NORMAL"):
        raise ValueError(f"synchronous must be one of ('FULL', 'NORMAL'), got {synchronous!r}")
    return PostgresStore(url, synchronous_commit=synchronous.upper() == "FULL")
