"""The embedded default store: one SQLite file (or `:memory:`), WAL, many processes.

Every write is one `BEGIN IMMEDIATE` transaction, so two processes racing on
one execution are serialised by SQLite and settled by the version check in
`commit`: exactly one wins, the other gets `Conflict` and decides again.
A paused execution is a few rows on disk and nothing in memory.

An execution is stored as its event log (`events`, one packed row per step,
the first also naming its agent spec) and rebuilt by folding the log through
`decide()`; `snapshots` holds a state every `SNAPSHOT_EVERY` events so a long
run's load replays a bounded tail. A step therefore appends one small row
instead of rewriting the whole state: fewer pages per commit, and about a
sixth of LangGraph's bytes per paused run.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import attrs

from clearance.adapters.packed_json import compact_json, pack, unpack
from clearance.adapters.stored_log import (
    KeptStates,
    PrunedRows,
    RolledBack,
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
    parse_stamp,
    request_from_data,
    reviewer_from_data,
    reviewer_to_data,
    stamp,
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

# Schema 6: reviewers (the body is `reviewer_to_data`'s JSON) and the digests of their
# keys. Also what `_from_5` runs, so an upgraded file has them exactly as a new one.
_REVIEWER_TABLES = """
CREATE TABLE IF NOT EXISTS reviewers (name TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reviewer_keys (
    key_id TEXT PRIMARY KEY, reviewer TEXT NOT NULL, digest TEXT NOT NULL,
    created_at TEXT NOT NULL, expires_at TEXT, revoked_at TEXT
);
CREATE INDEX IF NOT EXISTS reviewer_keys_of ON reviewer_keys (reviewer);
"""

# Schema 10: the one update the audit log takes is `clearance prune` dropping a chained
# record's payload (its body gains "pruned"); its link and where it belongs stay.
_AUDIT_NO_UPDATE = """
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    WHEN NOT (OLD.entry IS NOT NULL AND json_type(NEW.body, '$.pruned') IS 'object'
        AND NEW.id = OLD.id AND NEW.request_id IS OLD.request_id
        AND NEW.execution_id IS OLD.execution_id AND NEW.entry IS OLD.entry
        AND NEW.prev_hash IS OLD.prev_hash AND NEW.hash IS OLD.hash)
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"""

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS agents (
    spec_id TEXT PRIMARY KEY, body TEXT NOT NULL
) WITHOUT ROWID;
-- The spec each agent was last defined with (by the last process to define it): a
-- pending request made under another is judged again when next touched.
CREATE TABLE IF NOT EXISTS agent_definitions (
    tag TEXT PRIMARY KEY, spec_id TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    execution_id TEXT NOT NULL, seq INTEGER NOT NULL, body BLOB NOT NULL, spec_id TEXT,
    decide_version INTEGER,
    PRIMARY KEY (execution_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots (
    execution_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, state BLOB NOT NULL
);
-- When each finished execution last moved (schema 11): what `prune` looks through,
-- rather than fold every execution. '' for those stored before (not known: looked at).
CREATE TABLE IF NOT EXISTS finished (
    execution_id TEXT PRIMARY KEY, at TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS approvals (
    request_id TEXT PRIMARY KEY, execution_id TEXT NOT NULL, agent_tag TEXT NOT NULL,
    status TEXT NOT NULL, created_at TEXT NOT NULL, body BLOB
);
CREATE INDEX IF NOT EXISTS approvals_pending ON approvals (created_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS approvals_pending_tag
    ON approvals (agent_tag, created_at) WHERE status = 'pending';
-- held_until: a sweep that claimed the timer has it until then ('' = nobody).
CREATE TABLE IF NOT EXISTS timers (
    due_at TEXT NOT NULL, request_id TEXT NOT NULL, execution_id TEXT NOT NULL,
    held_until TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (due_at, request_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS work (
    id INTEGER PRIMARY KEY, execution_id TEXT NOT NULL,
    agent_tag TEXT NOT NULL, body TEXT NOT NULL, holder TEXT,
    lease_until TEXT NOT NULL DEFAULT ''
);
-- Only unheld work is indexed. Most work is claimed by the commit that queues it and
-- deleted by the next one: an index over held rows (or one on execution_id) would
-- be written twice per unit, and a renewal would move its entry. Lapsed leases are
-- found by scanning the queue, which holds outstanding work only.
CREATE INDEX IF NOT EXISTS work_queued ON work (agent_tag, id) WHERE holder IS NULL;
-- entry, prev_hash, hash: the record's link in the hash chain (core.audit_chain);
-- NULL for records older than the chain, which its genesis hash covers.
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY, request_id TEXT NOT NULL, execution_id TEXT NOT NULL,
    body TEXT NOT NULL, entry TEXT, prev_hash TEXT, hash TEXT
);
CREATE INDEX IF NOT EXISTS audit_execution ON audit (execution_id);
-- No two records follow the same one: the chain cannot fork.
CREATE UNIQUE INDEX IF NOT EXISTS audit_follows ON audit (prev_hash) WHERE prev_hash IS NOT NULL;
-- The chain's head: its last hash and how many records it holds (one row).
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1), hash TEXT NOT NULL, records INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY, request_id TEXT NOT NULL,
    execution_id TEXT NOT NULL, agent_tag TEXT NOT NULL, url TEXT NOT NULL,
    webhook_id TEXT NOT NULL, signer TEXT NOT NULL, status TEXT NOT NULL,
    next_attempt_at TEXT NOT NULL, expires_at TEXT NOT NULL,
    claimed_by TEXT, lease_until TEXT, channel TEXT NOT NULL DEFAULT 'webhook',
    purpose TEXT NOT NULL DEFAULT 'request'
);
CREATE INDEX IF NOT EXISTS deliveries_due
    ON deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_request ON deliveries (request_id);
CREATE TABLE IF NOT EXISTS delivery_attempts (
    delivery_id INTEGER NOT NULL, at TEXT NOT NULL, status_code INTEGER, error TEXT,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS delivery_attempts_of ON delivery_attempts (delivery_id);
CREATE TABLE IF NOT EXISTS disabled_endpoints (
    url TEXT PRIMARY KEY, at TEXT NOT NULL, reason TEXT NOT NULL
) WITHOUT ROWID;
"""
    + _AUDIT_NO_UPDATE
    + """;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""
    + _REVIEWER_TABLES
)

SYNCHRONOUS = ("FULL", "NORMAL")
# Bumped whenever a table changes shape; a file from another version is refused
# at open rather than misread.
SCHEMA_VERSION = 11
# A state snapshot every this many events bounds a load's replay; most runs
# (a pause costs 2 events, a whole approval cycle 5) never write one.
SNAPSHOT_EVERY = 16
# Recent states kept by execution id, checked against the log's last seq on load: a
# bounded cache, so a paused execution still costs nothing in memory at scale.
STATES_CACHED = 256
# How often `wait_for_work` looks for another process's commit.
WAKE_POLL = 0.02


def _execute_each(db: sqlite3.Connection, script: str) -> None:
    """The statements of `script` in the caller's transaction (`executescript` would
    commit it first)."""
    for statement in script.split(";\n"):
        if statement.strip():
            db.execute(statement)


def _from_2(db: sqlite3.Connection) -> int:
    """Schema 2 (0.1) to 3: the outbox becomes the leased work queue, the log records
    the decide() version (NULL reads as 1), deliveries name their channel. A claim
    held under 2 named a pid; it is taken as lapsed, so the next worker takes it
    over: a model call is made again, a tool run reported as of unknown outcome."""
    db.execute("ALTER TABLE events ADD COLUMN decide_version INTEGER")
    db.execute("ALTER TABLE deliveries ADD COLUMN channel TEXT NOT NULL DEFAULT 'webhook'")
    db.execute(
        "CREATE TABLE work (id INTEGER PRIMARY KEY AUTOINCREMENT, execution_id TEXT NOT NULL,"
        " agent_tag TEXT NOT NULL, body TEXT NOT NULL, holder TEXT,"
        " lease_until TEXT NOT NULL DEFAULT '')"
    )
    db.execute(
        "INSERT INTO work (id, execution_id, agent_tag, body, holder, lease_until)"
        " SELECT id, execution_id, agent_tag, body, claimed_by, '' FROM outbox ORDER BY id"
    )
    db.execute("DROP TABLE outbox")
    return 3


def _from_3(db: sqlite3.Connection) -> int:
    """Schema 3 to 4: work ids are time-ordered instead of AUTOINCREMENT (whose
    counter row every commit that queued work rewrote), and only unheld work is
    indexed. Ids already given stay; new ones are larger."""
    db.execute(
        "CREATE TABLE work_4 (id INTEGER PRIMARY KEY, execution_id TEXT NOT NULL,"
        " agent_tag TEXT NOT NULL, body TEXT NOT NULL, holder TEXT,"
        " lease_until TEXT NOT NULL DEFAULT '')"
    )
    db.execute(
        "INSERT INTO work_4 SELECT id, execution_id, agent_tag, body, holder, lease_until FROM work"
    )
    db.execute("DROP TABLE work")
    db.execute("ALTER TABLE work_4 RENAME TO work")
    return 4


def _from_4(db: sqlite3.Connection) -> int:
    """Schema 4 to 5: a timer sweep claims the timers it fires, so two processes
    sweeping one file share the due timers instead of both firing each."""
    db.execute("ALTER TABLE timers ADD COLUMN held_until TEXT NOT NULL DEFAULT ''")
    return 5


def _from_5(db: sqlite3.Connection) -> int:
    """Schema 5 to 6: reviewers and their keys, in tables of their own (new, empty)."""
    _execute_each(db, _REVIEWER_TABLES)
    return 6


def _from_6(db: sqlite3.Connection) -> int:
    """Schema 6 to 7: the spec each agent was last defined with (a new, empty table:
    the next process to define an agent fills it)."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS agent_definitions"
        " (tag TEXT PRIMARY KEY, spec_id TEXT NOT NULL) WITHOUT ROWID"
    )
    return 7


def _from_7(db: sqlite3.Connection) -> int:
    """Schema 7 to 8: the audit log becomes a hash chain. Records already there stay as
    they are: the chain starts from a genesis hash over them (written at open)."""
    have = {row[1] for row in db.execute("PRAGMA table_info(audit)")}
    for column in ("entry", "prev_hash", "hash"):
        if column not in have:
            db.execute(f"ALTER TABLE audit ADD COLUMN {column} TEXT")
    return 8


def _from_8(db: sqlite3.Connection) -> int:
    """Schema 8 to 9: a delivery says why it is sent (the request, its reminder, an
    escalation stage); every delivery already there was the request's."""
    have = {row[1] for row in db.execute("PRAGMA table_info(deliveries)")}
    if "purpose" not in have:
        db.execute("ALTER TABLE deliveries ADD COLUMN purpose TEXT NOT NULL DEFAULT 'request'")
    return 9


def _from_9(db: sqlite3.Connection) -> int:
    """Schema 9 to 10: the audit log takes the update that prunes a record's payload."""
    db.execute("DROP TRIGGER IF EXISTS audit_no_update")
    db.execute(_AUDIT_NO_UPDATE)
    return 10


def _from_10(db: sqlite3.Connection) -> int:
    """Schema 10 to 11: when each finished execution last moved, for `prune`. Which of
    the executions already stored finished, and when, only folding would tell: each is
    listed as not known (''), and prune looks at it."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS finished"
        " (execution_id TEXT PRIMARY KEY, at TEXT NOT NULL) WITHOUT ROWID"
    )
    db.execute(
        "INSERT OR IGNORE INTO finished (execution_id, at)"
        " SELECT execution_id, '' FROM events WHERE seq = 1"
    )
    return 11


# Each step upgrades a file in place by one schema version, at open.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], int]] = {
    2: _from_2,
    3: _from_3,
    4: _from_4,
    5: _from_5,
    6: _from_6,
    7: _from_7,
    8: _from_8,
    9: _from_9,
    10: _from_10,
}


class _StepBroke(Exception):
    """A step of a group failed after it wrote some of its rows."""


@attrs.frozen
class _Pending:
    """A step waiting for its group commit."""

    writes: Writes
    expected_seq: int
    claim: ClaimRequest | None
    done: Claim | None
    future: asyncio.Future[list[Work]]


# Tables only Clearance's files hold, in every schema version: how a file is told
# from another application's SQLite database.
_OURS = frozenset({"events", "approvals", "timers"})


def check_database_file(path: str, *, must_hold_data: bool = False) -> None:
    """Raise ClearanceError, saying what the file is, unless `path` is a Clearance
    database of a schema this version opens (or, unless `must_hold_data`, a path where
    one can be made: nothing there yet, or an empty file). Reads only: a file that is
    refused is left as it was, byte for byte."""
    if path == ":memory:":
        return
    where = Path(path)
    if where.exists() and not where.is_file():
        kind = "a directory" if where.is_dir() else "not a regular file"
        raise ClearanceError(f"{path} is {kind}; pass the path of a database file")
    if not where.exists() or where.stat().st_size == 0:
        if must_hold_data:
            what = "is empty" if where.exists() else "does not exist"
            raise ClearanceError(f"{path} {what}: it holds no Clearance database")
        return
    _check_writable_beside(path, where)
    try:
        db = sqlite3.connect(f"{where.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as err:
        raise ClearanceError(f"{path} cannot be opened: {err}") from None
    try:
        tables = {
            name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        (version,) = db.execute("PRAGMA user_version").fetchone()
    except sqlite3.DatabaseError as err:
        raise ClearanceError(
            f"{path} is not a SQLite database ({err}); pass the database the agent uses, "
            "or a new path to create one"
        ) from None
    finally:
        db.close()
    if tables and not _OURS.issubset(tables):
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise ClearanceError(
            f"{path} is another application's SQLite database (tables: {shown}); Clearance "
            "keeps its data in a file of its own: pass a new path"
        )
    if tables and version not in MIGRATIONS and version != SCHEMA_VERSION:
        raise ClearanceError(_unknown_schema(path, version))
    if must_hold_data and not tables:
        raise ClearanceError(f"{path} holds no Clearance database (no tables)")


def _check_writable_beside(path: str, where: Path) -> None:
    """SQLite in WAL mode keeps a -wal and a -shm file beside the database, and even a
    read needs them: where they cannot be made, SQLite says only "unable to open
    database file". Say why instead."""
    folder = where.resolve().parent
    if os.access(folder, os.W_OK):
        return
    read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    why = "is on a read-only file system" if read_only else "is in a directory you cannot write to"
    raise ClearanceError(
        f"{path} {why}: Clearance keeps its -wal and -shm files beside the database, even to"
        " read it; use a copy in a writable directory"
    )


def _unknown_schema(path: str, version: int) -> str:
    return (
        f"{path} holds Clearance tables of schema version {version}; this version"
        f" of Clearance reads schema {SCHEMA_VERSION} and upgrades"
        f" {', '.join(map(str, sorted(MIGRATIONS)))}: open it with a newer"
        " Clearance, or use a new file"
    )


class SQLiteStore:
    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 10_000,
        snapshot_every: int = SNAPSHOT_EVERY,
        group_commit: bool = True,
    ):
        if synchronous.upper() not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, got {synchronous!r}")
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be 1 or more, got {snapshot_every}")
        self.path = path
        self.group_commit = group_commit
        self._batch: list[_Pending] = []
        self._states = KeptStates(STATES_CACHED)
        self._last_work_id = 0
        self.snapshot_every = snapshot_every
        # Before anything writes to it (switching to WAL does): a file that is not ours
        # is refused untouched.
        check_database_file(path)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if path != ":memory:":
                self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            self._setup(path)
        except sqlite3.Error as err:  # a read-only file or filesystem, a full disk
            raise ClearanceError(f"{path} cannot be used as a Clearance database: {err}") from None
        self._data_version = self._db.execute("PRAGMA data_version").fetchone()[0]
        self._specs = Specs()

    def _setup(self, path: str) -> None:
        with self._write():
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            (tables,) = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            if tables and version not in MIGRATIONS and version != SCHEMA_VERSION:
                raise ClearanceError(_unknown_schema(path, version))
            # In place, in the same transaction as the check: a crash leaves the old file.
            while tables and version != SCHEMA_VERSION:
                version = MIGRATIONS[version](self._db)
            _execute_each(self._db, SCHEMA)
            if self._db.execute("SELECT 1 FROM audit_head").fetchone() is None:
                older = self._db.execute("SELECT body FROM audit WHERE hash IS NULL ORDER BY id")
                self._db.execute(
                    "INSERT INTO audit_head (id, hash, records) VALUES (1, ?, 0)",
                    (audit_chain.genesis(body for (body,) in older),),
                )
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- agents ---------------------------------------------------------------------

    def _spec_id(self, spec: AgentSpec) -> str:
        """The spec's id, its row written in the current transaction. Only the id is
        cached: a commit that rolls back (a Conflict) takes the row with it, so the
        next first event writes it again (an ignored insert when it is there)."""
        spec_id, body = self._specs.row(spec)
        self._db.execute(
            "INSERT OR IGNORE INTO agents (spec_id, body) VALUES (?, ?)", (spec_id, body)
        )
        return spec_id

    async def define_agent(self, spec: AgentSpec) -> None:
        with self._write():
            self._db.execute(
                "INSERT INTO agent_definitions (tag, spec_id) VALUES (?, ?)"
                " ON CONFLICT (tag) DO UPDATE SET spec_id = excluded.spec_id",
                (spec.tag, self._spec_id(spec)),
            )

    async def current_agent(self, tag: str) -> AgentSpec | None:
        row = self._db.execute(
            "SELECT spec_id FROM agent_definitions WHERE tag = ?", (tag,)
        ).fetchone()
        return None if row is None else self._spec(row[0])

    def _spec(self, spec_id: str) -> AgentSpec:
        spec = self._specs.known(spec_id)
        if spec is None:
            row = self._db.execute("SELECT body FROM agents WHERE spec_id = ?", (spec_id,))
            found = row.fetchone()
            if found is None:
                raise UnreadableExecution(f"agent spec {spec_id} is not in the store")
            spec = self._specs.read(spec_id, found[0])
        return spec

    # -- executions and their log -------------------------------------------------------

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
        # Grouping costs a turn of the event loop and a future per step: worth it only
        # when other steps come in the same turn.
        if not self.group_commit or alone:
            with self._write():
                queued = self._step(writes, expected_seq, claim, done)
            self._states.keep(writes.execution)
            return queued
        # Group commit: every step committed during one turn of the event loop goes into
        # one transaction, each in its own savepoint (a Conflict or LeaseLost undoes only
        # its own step), so executions in flight together share one fsync.
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Work]] = loop.create_future()
        self._batch.append(_Pending(writes, expected_seq, claim, done, future))
        if len(self._batch) == 1:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        if not batch:
            return
        try:
            try:
                outcomes = self._group(batch, savepoints=False)
            except _StepBroke:
                # A step failed halfway (its rows half written): that transaction is
                # gone; write the group again, each step in a savepoint of its own.
                outcomes = self._group(batch, savepoints=True)
        except Exception as err:  # nothing of the batch is durable: each caller hears why
            for step in batch:
                if not step.future.done():
                    step.future.set_exception(type(err)(*err.args))
            return
        orphaned: list[Claim] = []
        for step, outcome in zip(batch, outcomes, strict=True):
            if step.future.cancelled():
                # Its caller gave up (a closing engine): work it claimed would sit held by
                # a worker that will never start it. Hand it back to the queue.
                if not isinstance(outcome, Exception):
                    orphaned += [w.claim for w in outcome if w.holder is not None]
            elif isinstance(outcome, Exception):
                step.future.set_exception(outcome)
            else:
                step.future.set_result(outcome)
            if not isinstance(outcome, Exception):
                self._states.keep(step.writes.execution)
        if orphaned:
            with self._write():
                for claim in orphaned:
                    self._release(claim)

    def _group(self, batch: list[_Pending], *, savepoints: bool) -> list[list[Work] | Exception]:
        """The batch's steps in one transaction. A Conflict or LeaseLost leaves nothing of
        its step behind (`_step` checks both before it writes anything else), so without
        savepoints only those two may fail a step alone; any other failure raises
        _StepBroke, unless each step has a savepoint to roll back to."""
        outcomes: list[list[Work] | Exception] = []
        with self._write():
            # A step alone needs no savepoint: if it fails, nothing else is lost by
            # committing the empty transaction.
            savepoints = savepoints and len(batch) > 1
            for step in batch:
                if savepoints:
                    self._db.execute("SAVEPOINT step")
                try:
                    outcomes.append(
                        self._step(step.writes, step.expected_seq, step.claim, step.done)
                    )
                except (Conflict, LeaseLost) as err:
                    outcomes.append(err)
                except Exception as err:
                    if len(batch) > 1 and not savepoints:
                        raise _StepBroke() from err
                    self._db.execute("ROLLBACK TO step" if savepoints else "ROLLBACK")
                    if not savepoints:
                        self._db.execute("BEGIN IMMEDIATE")  # for _write's COMMIT
                    outcomes.append(err)
                if savepoints:
                    self._db.execute("RELEASE step")
        return outcomes

    def _step(
        self, writes: Writes, expected_seq: int, claim: ClaimRequest | None, done: Claim | None
    ) -> list[Work]:
        """One step's writes, inside the caller's transaction."""
        execution, db = writes.execution, self._db
        # The first event names the agent spec the log folds from and the decide()
        # version that wrote it (the rest, NULL).
        first = expected_seq == 0
        try:
            # The log's key is the version check: whoever appends event n+1 first
            # wins; a racer that also read version n finds the slot taken.
            db.execute(
                "INSERT INTO events (execution_id, seq, body, spec_id, decide_version)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    execution.id,
                    execution.seq,
                    pack(event_to_data(writes.event)),
                    self._spec_id(execution.agent) if first else None,
                    DECIDE_VERSION if first else None,
                ),
            )
        except sqlite3.IntegrityError:
            if first:
                raise Conflict(f"execution {execution.id} already exists") from None
            raise Conflict(f"execution {execution.id} moved past version {expected_seq}") from None
        if done is not None and not self._delete_work(done):
            # Undone here, not by a savepoint: a group has none (see `_group`).
            db.execute(
                "DELETE FROM events WHERE execution_id = ? AND seq = ?",
                (execution.id, execution.seq),
            )
            raise LeaseLost(
                f"work {done.id} of execution {execution.id} is no longer held by"
                f" {done.holder}: its lease ran out and it was taken over"
            )
        if execution.seq % self.snapshot_every == 0:
            state = execution_to_data(execution)
            # Stored once per distinct spec, in `agents`; the state names its own (a
            # redefinition may have changed it since the first event).
            state["agent"] = self._spec_id(execution.agent)
            db.execute(
                "INSERT OR REPLACE INTO snapshots (execution_id, seq, state) VALUES (?, ?, ?)",
                (execution.id, execution.seq, pack(state)),
            )
        cancelled = self._cancel_queued(writes, claim) if writes.drop_queued_work else []
        self._apply(writes)
        return cancelled + self._queue(writes, claim)

    def _cancel_queued(self, writes: Writes, claim: ClaimRequest | None) -> list[Work]:
        """Unstarted work of a finished execution never starts; held work goes on. A
        queued model call is dropped. A queued tool run stays, marked cancelled (and held
        by `claim`'s holder, if any) until its call is closed as never run: if whoever
        closes it dies first, the worker that takes it over knows it never started."""
        db, execution = self._db, writes.execution
        holder = claim.holder if claim is not None else None
        until = stamp(claim.until) if claim is not None else ""
        cancelled = []
        rows = db.execute(
            "SELECT id, body FROM work WHERE execution_id = ? AND holder IS NULL", (execution.id,)
        ).fetchall()
        for work_id, body in rows:
            command, _ = work_command(body)
            if isinstance(command, RunTool):
                db.execute(
                    "UPDATE work SET body = ?, holder = ?, lease_until = ? WHERE id = ?",
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
                db.execute("DELETE FROM work WHERE id = ?", (work_id,))
        return cancelled

    def _apply(self, writes: Writes) -> None:
        """Apply the step's rows besides the event and its work."""
        db, execution = self._db, writes.execution
        for timer in writes.timers_started:
            db.execute(
                "INSERT OR REPLACE INTO timers (due_at, request_id, execution_id) VALUES (?, ?, ?)",
                (stamp(timer.due_at), timer.request_id, execution.id),
            )
        for timer in writes.timers_cancelled:
            db.execute(
                "DELETE FROM timers WHERE due_at = ? AND request_id = ?",
                (stamp(timer.due_at), timer.request_id),
            )
        for request in writes.requests_opened:
            db.execute(
                "INSERT INTO approvals (request_id, execution_id, agent_tag, status, created_at,"
                " body) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    request.request_id,
                    execution.id,
                    execution.agent_tag,
                    request.status,
                    stamp(request.timestamp),
                    pack(converter.unstructure(request)),
                ),
            )
        for request in writes.requests_revised:
            db.execute(
                "UPDATE approvals SET body = ? WHERE request_id = ? AND status = 'pending'",
                (pack(converter.unstructure(request)), request.request_id),
            )
        for d in writes.deliveries:
            # In the same transaction: a request committed is a request delivered.
            db.execute(
                "INSERT INTO deliveries (request_id, execution_id, agent_tag, url, webhook_id,"
                " signer, status, next_attempt_at, expires_at, channel, purpose)"
                " VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
                (
                    d.request_id,
                    execution.id,
                    execution.agent_tag,
                    d.target,
                    d.message_id,
                    d.signer,
                    stamp(d.not_before),
                    stamp(d.expires_at),
                    d.channel,
                    d.purpose,
                ),
            )
        if writes.audit:
            # In this step's transaction, which holds SQLite's one write lock: nobody
            # else extends the chain in between.
            (head,) = db.execute("SELECT hash FROM audit_head WHERE id = 1").fetchone()
            links = audit_chain.extend(head, writes.audit)
            for record, link in zip(writes.audit, links, strict=True):
                db.execute(
                    "INSERT INTO audit (request_id, execution_id, body, entry, prev_hash, hash)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        record.request_id or "",  # a call a policy decided has no request
                        record.execution_id,
                        compact_json(converter.unstructure(record)),
                        link.entry,
                        link.prev_hash,
                        link.hash,
                    ),
                )
            db.execute(
                "UPDATE audit_head SET hash = ?, records = records + ? WHERE id = 1",
                (links[-1].hash, len(links)),
            )
        for request_id, status in writes.requests_decided:
            # The body is only the inbox's copy of a pending request: once decided,
            # the log holds the request and the audit log its decision.
            db.execute(
                "UPDATE approvals SET status = ?, body = NULL WHERE request_id = ?",
                (status, request_id),
            )
        if writes.finished_at is not None:
            db.execute(
                "INSERT OR REPLACE INTO finished (execution_id, at) VALUES (?, ?)",
                (execution.id, stamp(writes.finished_at)),
            )

    def _queue(self, writes: Writes, claim: ClaimRequest | None) -> list[Work]:
        execution, queued = writes.execution, []
        for n, command in enumerate(writes.work):
            holder = claim.holder if claim is not None and n < claim.limit else None
            row = (
                execution.id,
                execution.agent_tag,
                compact_json(command_to_data(command)),
                holder,
                stamp(claim.until) if claim is not None and holder else "",
            )
            while True:
                work_id = self._next_work_id()
                try:
                    self._db.execute(
                        "INSERT INTO work (id, execution_id, agent_tag, body, holder,"
                        " lease_until) VALUES (?, ?, ?, ?, ?, ?)",
                        (work_id, *row),
                    )
                    break
                except sqlite3.IntegrityError:  # another process took this id: the next
                    continue
            queued.append(Work(work_id, execution.id, execution.agent_tag, command, holder))
        return queued

    def _next_work_id(self) -> int:
        """A work id never given before: microseconds since the epoch, then 10 random
        bits (two processes queueing in the same microsecond differ), and above this
        connection's last. Time-ordered, so the queue keeps its order across processes
        with no counter row to rewrite in every commit, as AUTOINCREMENT has."""
        now = time.time_ns() // 1000 << 10 | secrets.randbits(10)
        self._last_work_id = max(self._last_work_id + 1, now)
        return self._last_work_id

    async def load(self, execution_id: str) -> Execution | None:
        # The state this connection last committed or folded, if no event came since:
        # a step usually loads what the previous step wrote, so no replay is needed.
        cached = self._states.get(execution_id)
        if cached is not None:
            (last,) = self._db.execute(
                "SELECT max(seq) FROM events WHERE execution_id = ?", (execution_id,)
            ).fetchone()
            if last == cached.seq:
                self._states.keep(cached)
                return cached
        loaded = self._fold(execution_id)
        if loaded is not None:
            self._states.keep(loaded)
        return loaded

    def _fold(self, execution_id: str) -> Execution | None:
        row = self._db.execute(
            "SELECT e.spec_id, e.decide_version, s.seq, s.state FROM events e"
            " LEFT JOIN snapshots s ON s.execution_id = e.execution_id"
            " WHERE e.execution_id = ? AND e.seq = 1",
            (execution_id,),
        ).fetchone()
        if row is None:
            return None
        spec_id, version, since, state = row
        # The spec object we hold, not an equal copy: commit() finds its id by identity.
        spec = self._spec(spec_id)
        snapshot = None if state is None else (since, state)
        log = self._log(execution_id, since or 0)
        return fold(execution_id, spec, version, snapshot, log, self._spec)

    def _log(self, execution_id: str, after: int = 0) -> list[tuple[int, bytes]]:
        return self._db.execute(
            "SELECT seq, body FROM events WHERE execution_id = ? AND seq > ? ORDER BY seq",
            (execution_id, after),
        ).fetchall()

    async def events(self, execution_id: str) -> list[Event]:
        return [event for _, event in read_events(execution_id, self._log(execution_id))]

    async def execution_ids(
        self, agent_tag: str | None = None, *, after: str | None = None, limit: int = 1000
    ) -> list[str]:
        found: list[str] = []
        while len(found) < limit:
            # The first event of each execution names its agent's spec; a page of them at
            # a time, filtered by the spec's tag here (specs are few and cached).
            rows = self._db.execute(
                "SELECT execution_id, spec_id FROM events WHERE seq = 1 AND execution_id > ?"
                " ORDER BY execution_id LIMIT ?",
                (after or "", limit),
            ).fetchall()
            if not rows:
                break
            for execution_id, spec_id in rows:
                if agent_tag is None or self._spec(spec_id).tag == agent_tag:
                    found.append(execution_id)
            after = rows[-1][0]
        return found[:limit]

    # -- approvals, timers, audit --------------------------------------------------------

    async def execution_of_request(self, request_id: str) -> str | None:
        row = self._db.execute(
            "SELECT execution_id FROM approvals WHERE request_id = ?", (request_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    async def request_ids_starting(self, prefix: str, limit: int) -> list[str]:
        # A range of the primary key: LIKE would need escaping and skip the index.
        sql, args = "SELECT request_id FROM approvals WHERE request_id >= ?", [prefix]
        if (above := above_prefix(prefix)) is not None:
            sql += " AND request_id < ?"
            args.append(above)
        rows = self._db.execute(sql + " ORDER BY request_id LIMIT ?", (*args, limit))
        return [str(r) for (r,) in rows]

    async def pending(
        self, agent_tag: str | None = None, limit: int | None = None, after: str | None = None
    ) -> list[ApprovalRequest]:
        sql = "SELECT body FROM approvals WHERE status = 'pending'"
        args: list[Any] = []
        if agent_tag is not None:
            sql += " AND agent_tag = ?"
            args.append(agent_tag)
        if after is not None:
            # The listing's own order: a cursor stays valid after its request is decided.
            mark = self._db.execute(
                "SELECT created_at, rowid FROM approvals WHERE request_id = ?", (after,)
            ).fetchone()
            if mark is None:
                raise UnknownRequest(f"no approval request '{after}' to list after")
            sql += " AND (created_at, rowid) > (?, ?)"
            args += mark
        sql += " ORDER BY created_at, rowid"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [request_from_data(unpack(body)) for (body,) in self._db.execute(sql, args)]

    async def claim_timers(self, now: datetime, until: datetime, limit: int) -> list[DueTimer]:
        with self._write():
            rows = self._db.execute(
                "UPDATE timers SET held_until = ? WHERE (due_at, request_id) IN"
                " (SELECT due_at, request_id FROM timers WHERE due_at <= ? AND held_until <= ?"
                " ORDER BY due_at LIMIT ?) RETURNING execution_id, request_id, due_at",
                (stamp(until), stamp(now), stamp(now), limit),
            ).fetchall()
        return soonest_first(DueTimer(e, r, parse_stamp(d)) for e, r, d in rows)

    async def drop_timer(self, timer: DueTimer) -> None:
        with self._write():
            self._db.execute(
                "DELETE FROM timers WHERE due_at = ? AND request_id = ?",
                (stamp(timer.due_at), timer.request_id),
            )

    async def postpone_timer(self, timer: DueTimer, until: datetime) -> None:
        with self._write():
            cur = self._db.execute(
                "DELETE FROM timers WHERE due_at = ? AND request_id = ?",
                (stamp(timer.due_at), timer.request_id),
            )
            if cur.rowcount:
                self._db.execute(
                    "INSERT OR REPLACE INTO timers (due_at, request_id, execution_id)"
                    " VALUES (?, ?, ?)",
                    (stamp(until), timer.request_id, timer.execution_id),
                )

    async def audit(
        self, execution_id: str | None = None, request_id: str | None = None
    ) -> list[AuditRecord]:
        sql, args = "SELECT id, body FROM audit", []
        where = []
        if execution_id is not None:
            where.append("execution_id = ?")
            args.append(execution_id)
        if request_id is not None:
            # Through the request's execution: one index on the append-only log, not two.
            where.append(
                "execution_id = (SELECT execution_id FROM approvals WHERE request_id = ?)"
                " AND request_id = ?"
            )
            args += [request_id, request_id]
        if where:
            sql += " WHERE " + " AND ".join(where)
        return audit_records(self._db.execute(sql + " ORDER BY id", args))

    async def audit_chain(self, after: int = 0, limit: int = 10_000) -> list[ChainRow]:
        rows = self._db.execute(
            "SELECT id, body, entry, prev_hash, hash FROM audit WHERE id > ? ORDER BY id LIMIT ?",
            (after, limit),
        )
        return [chain_row(*row) for row in rows]

    async def audit_head(self) -> tuple[str, int] | None:
        row = self._db.execute("SELECT hash, records FROM audit_head WHERE id = 1").fetchone()
        return None if row is None else (row[0], row[1])

    # -- retention ---------------------------------------------------------------------------

    async def finished_before(
        self, cutoff: datetime, *, after: str | None = None, limit: int = 1000
    ) -> list[str]:
        rows = self._db.execute(
            "SELECT execution_id FROM finished WHERE execution_id > ? AND at < ?"
            " ORDER BY execution_id LIMIT ?",
            (after or "", stamp(cutoff), limit),
        )
        return [execution_id for (execution_id,) in rows]

    async def forget(
        self, executions: Sequence[Execution], at: datetime, *, dry_run: bool = False
    ) -> Forgotten:
        gone: list[str] = []
        audits: list[PrunedRows] = []
        vanished = 0
        db = self._db
        try:
            with self._write():
                for ex in executions:
                    (last,) = db.execute(
                        "SELECT max(seq) FROM events WHERE execution_id = ?", (ex.id,)
                    ).fetchone()
                    if last is None:  # another prune forgot it since it was loaded
                        vanished += 1
                        continue
                    # The queue holds outstanding work only: a scan of it is short.
                    busy = db.execute("SELECT 1 FROM work WHERE execution_id = ?", (ex.id,))
                    if last != ex.seq or busy.fetchone() is not None:
                        continue
                    db.execute("DELETE FROM events WHERE execution_id = ?", (ex.id,))
                    db.execute("DELETE FROM snapshots WHERE execution_id = ?", (ex.id,))
                    db.execute("DELETE FROM finished WHERE execution_id = ?", (ex.id,))
                    for request in ex.requests:
                        rid = (request.request_id,)
                        db.execute(
                            "DELETE FROM delivery_attempts WHERE delivery_id IN"
                            " (SELECT id FROM deliveries WHERE request_id = ?)",
                            rid,
                        )
                        db.execute("DELETE FROM deliveries WHERE request_id = ?", rid)
                        db.execute("DELETE FROM approvals WHERE request_id = ?", rid)
                    rows = db.execute(
                        "SELECT id, body, entry FROM audit WHERE execution_id = ?", (ex.id,)
                    )
                    audit = prune_rows(rows.fetchall(), at)
                    db.executemany("UPDATE audit SET body = ? WHERE id = ?", audit.bodies)
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

    # -- the work queue ----------------------------------------------------------------------

    def _claim_each(
        self, rows: list[Any], update: str, params: Callable[[Any], tuple[Any, ...]]
    ) -> list[Any]:
        """The rows (id first) that `update`, guarded by the state they were found in
        without a lock, still takes, all in one write: of two workers that saw the same
        row, exactly one gets it."""
        if not rows:
            return []
        with self._write():
            return [row for row in rows if self._db.execute(update, params(row)).rowcount == 1]

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
        marks = ",".join("?" * len(agent_tags))
        skipped = f" AND id NOT IN ({','.join('?' * len(skip))})" if skip else ""
        # Look first without a write lock: this runs on every poll of every worker.
        # Queued work has lease_until '' (before any time), so one range finds both it
        # and work whose holder stopped renewing.
        rows = self._db.execute(
            "SELECT id, execution_id, agent_tag, body, holder FROM work"
            f" WHERE holder IS NULL AND agent_tag IN ({marks}){skipped} ORDER BY id LIMIT ?",
            (*agent_tags, *skip, limit),
        ).fetchall()
        if len(rows) < limit:
            # Held work has no index (see SCHEMA): this scans the outstanding work, and
            # only when the queue did not fill the free slots.
            rows += self._db.execute(
                "SELECT id, execution_id, agent_tag, body, holder FROM work"
                f" WHERE holder IS NOT NULL AND lease_until <= ? AND agent_tag IN ({marks})"
                f"{skipped} ORDER BY id LIMIT ?",
                (stamp(now), *agent_tags, *skip, limit - len(rows)),
            ).fetchall()
        won = self._claim_each(
            rows,
            "UPDATE work SET holder = ?, lease_until = ?"
            " WHERE id = ? AND holder IS ? AND lease_until <= ?",
            lambda row: (holder, stamp(until), row[0], row[4], stamp(now)),
        )
        taken = []
        for i, e, t, b, previous in won:
            command, cancelled = work_command(b)
            taken.append(Work(i, e, t, command, holder, previous, cancelled))
        return taken

    async def with_work(self, agent_tags: Sequence[str]) -> list[str]:
        if not agent_tags:
            return []
        marks = ",".join("?" * len(agent_tags))
        rows = self._db.execute(
            f"SELECT execution_id FROM work WHERE agent_tag IN ({marks})"
            " GROUP BY execution_id ORDER BY min(id)",
            tuple(agent_tags),
        )
        return [execution_id for (execution_id,) in rows]

    async def renew(self, claims: Sequence[Claim], until: datetime) -> list[Claim]:
        if not claims:
            return []
        with self._write():
            return [
                c
                for c in claims
                if self._db.execute(
                    "UPDATE work SET lease_until = ? WHERE id = ? AND holder = ?",
                    (stamp(until), c.id, c.holder),
                ).rowcount
                == 1
            ]

    def _delete_work(self, claim: Claim) -> bool:
        cur = self._db.execute(
            "DELETE FROM work WHERE id = ? AND holder = ?", (claim.id, claim.holder)
        )
        return cur.rowcount == 1

    async def complete(self, claim: Claim) -> bool:
        with self._write():
            return self._delete_work(claim)

    def _release(self, claim: Claim) -> None:
        self._db.execute(
            "UPDATE work SET holder = NULL, lease_until = '' WHERE id = ? AND holder = ?",
            (claim.id, claim.holder),
        )

    async def release(self, claim: Claim) -> None:
        with self._write():
            self._release(claim)

    async def wait_for_work(self, seconds: float) -> bool:
        # SQLite has no notifications; `data_version` changes when another connection
        # commits, and reading it costs a few microseconds, so poll it finely.
        deadline = time.monotonic() + seconds
        while True:
            (version,) = self._db.execute("PRAGMA data_version").fetchone()
            if version != self._data_version:
                self._data_version = version
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(WAKE_POLL, left))

    # -- webhook deliveries ------------------------------------------------------------------

    _DELIVERY = (
        "SELECT id, request_id, execution_id, agent_tag, url, webhook_id, status,"
        " next_attempt_at, expires_at, channel, signer, purpose FROM deliveries"
    )

    def _deliveries(self, rows: list[Any]) -> list[Delivery]:
        out = []
        for i, rid, eid, tag, url, wid, status, next_at, expires, channel, signer, purpose in rows:
            attempts = tuple(
                DeliveryAttempt(parse_stamp(at), code, error, outcome)
                for at, code, error, outcome in self._db.execute(
                    "SELECT at, status_code, error, outcome FROM delivery_attempts"
                    " WHERE delivery_id = ? ORDER BY rowid",
                    (i,),
                )
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
                    parse_stamp(next_at),
                    parse_stamp(expires),
                    channel,
                    signer,
                    purpose,
                )
            )
        return out

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
        tags = ",".join("?" * len(agent_tags))
        # Only what this worker can carry out: an agent-signed delivery where it hosts
        # the agent; an instance-signed one only with the instance's secret, so a process
        # without it (the CLI, a reviewer's app, `serve` without the env var) never takes
        # one, not even of an agent it hosts; and only on a channel it has an adapter for.
        signer = f"(signer = 'agent' AND agent_tag IN ({tags}))"
        if instance_signed:
            signer = f"(signer = 'instance' OR {signer})"
        due = (
            " WHERE status = 'pending' AND next_attempt_at <= ?"
            f" AND {signer} AND channel IN ({','.join('?' * len(channels))})"
            " AND (claimed_by IS NULL OR lease_until <= ?)"
        )
        if exclude_urls:
            due += f" AND url NOT IN ({','.join('?' * len(exclude_urls))})"
        args = (stamp(now), *agent_tags, *channels, stamp(now), *exclude_urls)
        rows = self._db.execute(
            self._DELIVERY + due + " ORDER BY next_attempt_at LIMIT ?", (*args, limit)
        ).fetchall()
        won = self._claim_each(
            rows,
            "UPDATE deliveries SET claimed_by = ?, lease_until = ? WHERE id = ?"
            " AND status = 'pending' AND (claimed_by IS NULL OR lease_until <= ?)",
            lambda row: (worker, stamp(lease_until), row[0], stamp(now)),
        )
        return self._deliveries(won)

    async def release_delivery(self, delivery_id: int, worker: str) -> None:
        with self._write():
            self._db.execute(
                "UPDATE deliveries SET claimed_by = NULL, lease_until = NULL"
                " WHERE id = ? AND claimed_by = ?",
                (delivery_id, worker),
            )

    async def record_attempt(
        self,
        delivery_id: int,
        worker: str,
        attempt: DeliveryAttempt,
        status: str,
        next_attempt_at: datetime | None,
    ) -> bool:
        with self._write():
            cur = self._db.execute(
                "UPDATE deliveries SET status = ?, claimed_by = NULL, lease_until = NULL,"
                " next_attempt_at = COALESCE(?, next_attempt_at)"
                " WHERE id = ? AND claimed_by = ?",
                (
                    status,
                    stamp(next_attempt_at) if next_attempt_at else None,
                    delivery_id,
                    worker,
                ),
            )
            if cur.rowcount != 1:
                return False  # taken over after our lease ran out: theirs to record
            self._db.execute(
                "INSERT INTO delivery_attempts (delivery_id, at, status_code, error, outcome)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    delivery_id,
                    stamp(attempt.at),
                    attempt.status_code,
                    attempt.error,
                    attempt.outcome,
                ),
            )
        return True

    async def deliveries(self, request_id: str) -> list[Delivery]:
        rows = self._db.execute(
            self._DELIVERY + " WHERE request_id = ? ORDER BY id", (request_id,)
        ).fetchall()
        return self._deliveries(rows)

    async def disable_endpoint(self, url: str, at: datetime, reason: str) -> None:
        with self._write():
            self._db.execute(
                "INSERT OR IGNORE INTO disabled_endpoints (url, at, reason) VALUES (?, ?, ?)",
                (url, stamp(at), reason),
            )

    async def endpoint_disabled(self, url: str) -> bool:
        row = self._db.execute("SELECT 1 FROM disabled_endpoints WHERE url = ?", (url,))
        return row.fetchone() is not None

    # -- reviewers and their keys ------------------------------------------------------------

    async def save_reviewer(self, reviewer: Reviewer) -> bool:
        body = compact_json(reviewer_to_data(reviewer))
        with self._write():  # the write lock from the start: nobody saves it in between
            new = (
                self._db.execute(
                    "SELECT 1 FROM reviewers WHERE name = ?", (reviewer.name,)
                ).fetchone()
                is None
            )
            self._db.execute(
                "INSERT INTO reviewers (name, body) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET body = excluded.body",
                (reviewer.name, body),
            )
        return new

    async def reviewer(self, name: str) -> Reviewer | None:
        row = self._db.execute("SELECT body FROM reviewers WHERE name = ?", (name,)).fetchone()
        return None if row is None else reviewer_from_data(json.loads(row[0]))

    async def reviewers(self) -> list[Reviewer]:
        rows = self._db.execute("SELECT body FROM reviewers ORDER BY name")
        return [reviewer_from_data(json.loads(body)) for (body,) in rows]

    async def remove_reviewer(self, name: str) -> bool:
        with self._write():
            self._db.execute("DELETE FROM reviewer_keys WHERE reviewer = ?", (name,))
            return self._db.execute("DELETE FROM reviewers WHERE name = ?", (name,)).rowcount == 1

    _KEY = "SELECT key_id, reviewer, digest, created_at, expires_at, revoked_at FROM reviewer_keys"

    @staticmethod
    def _key(row: Any) -> ReviewerKey:
        key_id, reviewer, digest, created, expires, revoked = row
        return ReviewerKey(
            key_id,
            reviewer,
            digest,
            parse_stamp(created),
            None if expires is None else parse_stamp(expires),
            None if revoked is None else parse_stamp(revoked),
        )

    async def add_key(self, key: ReviewerKey) -> None:
        row = (
            key.key_id,
            key.reviewer,
            key.digest,
            stamp(key.created_at),
            None if key.expires_at is None else stamp(key.expires_at),
            None if key.revoked_at is None else stamp(key.revoked_at),
        )
        with self._write():
            # In the transaction that adds the key: a reviewer removed meanwhile would
            # leave a key that a new reviewer of that name would inherit.
            if (
                self._db.execute(
                    "SELECT 1 FROM reviewers WHERE name = ?", (key.reviewer,)
                ).fetchone()
                is None
            ):
                raise UnknownReviewer(f"no reviewer '{key.reviewer}' to add a key for")
            stored = self._db.execute(self._KEY + " WHERE key_id = ?", (key.key_id,)).fetchone()
            if stored is None:
                self._db.execute(
                    "INSERT INTO reviewer_keys (key_id, reviewer, digest, created_at,"
                    " expires_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?)",
                    row,
                )
            elif self._key(stored) != key:
                raise BadReviewer(f"key id {key.key_id} is already taken by another key")

    async def reviewer_key(self, key_id: str) -> ReviewerKey | None:
        row = self._db.execute(self._KEY + " WHERE key_id = ?", (key_id,)).fetchone()
        return None if row is None else self._key(row)

    async def reviewer_keys(self, reviewer: str) -> list[ReviewerKey]:
        rows = self._db.execute(
            self._KEY + " WHERE reviewer = ? ORDER BY created_at, key_id", (reviewer,)
        )
        return [self._key(row) for row in rows]

    async def revoke_key(self, key_id: str, at: datetime) -> bool:
        with self._write():
            cur = self._db.execute(
                "UPDATE reviewer_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (stamp(at), key_id),
            )
            return cur.rowcount == 1

    async def close(self) -> None:
        self._flush()  # steps committed but not yet flushed are written, not dropped
        self._db.close()


def open_url(url: str, *, synchronous: str = "FULL") -> SQLiteStore:
    """The `clearance.stores` entry for `sqlite:///relative.db`, `sqlite:////absolute.db`
    and `memory://` (also `sqlite://` and `sqlite:///:memory:`)."""
    if url in ("memory://", "sqlite://", "sqlite:///:memory:"):
        return SQLiteStore(":memory:", synchronous=synchronous)
    if not url.startswith("sqlite:///"):
        raise ClearanceError(
            f"not a SQLite store URL: {url!r}; accepted: sqlite:///PATH, memory://"
        )
    path = url.removeprefix("sqlite:///")
    if not path:
        raise ClearanceError("sqlite:/// needs a file path, e.g. sqlite:///approvals.db")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return SQLiteStore(path, synchronous=synchronous)
