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

import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from clearance.adapters.packed_json import compact_json, pack, unpack
from clearance.core.agent import AgentSpec
from clearance.core.commands import (
    AuditRecord,
    CallModel,
    CancelTimer,
    Command,
    PublishApprovalRequest,
    RecordDecision,
    RunTool,
    StartTimer,
)
from clearance.core.decide import decide
from clearance.core.errors import ClearanceError
from clearance.core.events import Event
from clearance.core.execution import ApprovalRequest, Execution
from clearance.core.schema import canonical
from clearance.core.wire import (
    audit_from_data,
    command_from_data,
    command_to_data,
    converter,
    event_from_data,
    event_to_data,
    execution_from_data,
    execution_to_data,
    parse_stamp,
    request_from_data,
    stamp,
)
from clearance.ports.store import (
    Conflict,
    Delivery,
    DeliveryAttempt,
    DueTimer,
    OutboxEntry,
    UnreadableExecution,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    spec_id TEXT PRIMARY KEY, body TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    execution_id TEXT NOT NULL, seq INTEGER NOT NULL, body BLOB NOT NULL, spec_id TEXT,
    PRIMARY KEY (execution_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots (
    execution_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, state BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS approvals (
    request_id TEXT PRIMARY KEY, execution_id TEXT NOT NULL, agent_tag TEXT NOT NULL,
    status TEXT NOT NULL, created_at TEXT NOT NULL, body BLOB
);
CREATE INDEX IF NOT EXISTS approvals_pending ON approvals (created_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS approvals_pending_tag
    ON approvals (agent_tag, created_at) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS timers (
    due_at TEXT NOT NULL, request_id TEXT NOT NULL, execution_id TEXT NOT NULL,
    PRIMARY KEY (due_at, request_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY, execution_id TEXT NOT NULL, agent_tag TEXT NOT NULL,
    body TEXT NOT NULL, claimed_by TEXT
);
CREATE INDEX IF NOT EXISTS outbox_queued ON outbox (agent_tag) WHERE claimed_by IS NULL;
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY, request_id TEXT NOT NULL, execution_id TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_execution ON audit (execution_id);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY, request_id TEXT NOT NULL, execution_id TEXT NOT NULL,
    agent_tag TEXT NOT NULL, url TEXT NOT NULL, webhook_id TEXT NOT NULL,
    signer TEXT NOT NULL, status TEXT NOT NULL, next_attempt_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    claimed_by TEXT, lease_until TEXT
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
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""

SYNCHRONOUS = ("FULL", "NORMAL")
# Bumped whenever a table changes shape; a file from another version is refused
# at open rather than misread.
SCHEMA_VERSION = 2
# A state snapshot every this many events bounds a load's replay; most runs
# (a pause costs 2 events, a whole approval cycle 5) never write one.
SNAPSHOT_EVERY = 16


class SQLiteStore:
    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 10_000,
        snapshot_every: int = SNAPSHOT_EVERY,
    ):
        if synchronous.upper() not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, got {synchronous!r}")
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be 1 or more, got {snapshot_every}")
        self.path = path
        self.snapshot_every = snapshot_every
        self.commits = 0
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if path != ":memory:":
            self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        with self._write():
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            (tables,) = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            if tables and version != SCHEMA_VERSION:
                raise ClearanceError(
                    f"{path} holds Clearance tables of schema version {version}; this version"
                    f" of Clearance reads schema {SCHEMA_VERSION} only: finish or drop its"
                    " executions with the Clearance that wrote them, or use a new file"
                )
            for statement in SCHEMA.split(";\n"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        # spec_id by the id() of specs we hold: a strong reference keeps ids unique.
        self._spec_ids: dict[int, tuple[AgentSpec, str]] = {}
        self._specs: dict[str, AgentSpec] = {}

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
        known = self._spec_ids.get(id(spec))
        if known is not None:
            return known[1]
        body = canonical(converter.unstructure(spec))
        spec_id = hashlib.sha256(body.encode()).hexdigest()[:24]
        self._db.execute(
            "INSERT OR IGNORE INTO agents (spec_id, body) VALUES (?, ?)", (spec_id, body)
        )
        self._spec_ids[id(spec)] = (spec, spec_id)
        self._specs.setdefault(spec_id, spec)
        return spec_id

    async def remember_agent(self, spec: AgentSpec) -> str:
        return self._spec_id(spec)

    def _spec(self, spec_id: str) -> AgentSpec:
        spec = self._specs.get(spec_id)
        if spec is None:
            row = self._db.execute("SELECT body FROM agents WHERE spec_id = ?", (spec_id,))
            spec = converter.structure(json.loads(row.fetchone()[0]), AgentSpec)
            self._specs[spec_id] = spec
            self._spec_ids[id(spec)] = (spec, spec_id)
        return spec

    # -- executions and their log -------------------------------------------------------

    async def commit(
        self,
        execution: Execution,
        event: Event,
        commands: Sequence[Command],
        *,
        expected_seq: int,
        claimed_by: str | None,
        done: int | None = None,
    ) -> list[OutboxEntry]:
        entries: list[OutboxEntry] = []
        db = self._db
        if execution.seq != expected_seq + 1:
            raise ValueError(f"commit expects the state one event past {expected_seq}")
        with self._write():
            # The first event names the agent spec the log folds from (the rest, NULL).
            spec_id = self._spec_id(execution.agent) if expected_seq == 0 else None
            try:
                # The log's key is the version check: whoever appends event n+1 first
                # wins; a racer that also read version n finds the slot taken.
                db.execute(
                    "INSERT INTO events (execution_id, seq, body, spec_id) VALUES (?, ?, ?, ?)",
                    (execution.id, execution.seq, pack(event_to_data(event)), spec_id),
                )
            except sqlite3.IntegrityError:
                if expected_seq == 0:
                    raise Conflict(f"execution {execution.id} already exists") from None
                raise Conflict(
                    f"execution {execution.id} moved past version {expected_seq}"
                ) from None
            if execution.seq % self.snapshot_every == 0:
                state = execution_to_data(execution)
                del state["agent"]  # stored once per distinct spec, in `agents`
                db.execute(
                    "INSERT OR REPLACE INTO snapshots (execution_id, seq, state) VALUES (?, ?, ?)",
                    (execution.id, execution.seq, pack(state)),
                )
            for command in commands:
                entry = self._apply(execution, command, claimed_by)
                if entry is not None:
                    entries.append(entry)
            if done is not None:
                db.execute("DELETE FROM outbox WHERE id = ?", (done,))
        self.commits += 1
        return entries

    def _apply(
        self, execution: Execution, command: Command, claimed_by: str | None
    ) -> OutboxEntry | None:
        db = self._db
        if isinstance(command, CallModel | RunTool):
            cur = db.execute(
                "INSERT INTO outbox (execution_id, agent_tag, body, claimed_by)"
                " VALUES (?, ?, ?, ?)",
                (
                    execution.id,
                    execution.agent_tag,
                    compact_json(command_to_data(command)),
                    claimed_by,
                ),
            )
            assert cur.lastrowid is not None
            return OutboxEntry(
                cur.lastrowid, execution.id, execution.agent_tag, command, claimed_by
            )
        if isinstance(command, StartTimer):
            db.execute(
                "INSERT OR REPLACE INTO timers (due_at, request_id, execution_id) VALUES (?, ?, ?)",
                (stamp(command.due_at), command.request_id, execution.id),
            )
        elif isinstance(command, CancelTimer):
            # Keyed by due time first, so the sweep needs no second index; a request's
            # timer is due at its timeout (decide() starts it so).
            timed = execution.request(command.request_id)
            if timed is not None:
                db.execute(
                    "DELETE FROM timers WHERE due_at = ? AND request_id = ?",
                    (stamp(timed.timeout), command.request_id),
                )
        elif isinstance(command, PublishApprovalRequest):
            request = command.request
            if execution.agent.approval_webhook:
                # In the same transaction: a request committed is a request delivered.
                db.execute(
                    "INSERT INTO deliveries (request_id, execution_id, agent_tag, url, webhook_id,"
                    " signer, status, next_attempt_at, expires_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                    (
                        request.request_id,
                        execution.id,
                        execution.agent_tag,
                        execution.agent.approval_webhook,
                        f"msg_{request.request_id}",
                        "agent" if execution.agent.own_webhook_secret else "instance",
                        stamp(request.timestamp),
                        stamp(request.timeout),
                    ),
                )
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
        elif isinstance(command, RecordDecision):
            record = command.record
            db.execute(
                "INSERT INTO audit (request_id, execution_id, body) VALUES (?, ?, ?)",
                (
                    record.request_id,
                    record.execution_id,
                    compact_json(converter.unstructure(record)),
                ),
            )
            decided = execution.request(record.request_id)
            if decided is not None:
                # The body is only the inbox's copy of a pending request: once decided,
                # the log holds the request and the audit log its decision.
                db.execute(
                    "UPDATE approvals SET status = ?, body = NULL WHERE request_id = ?",
                    (decided.status, decided.request_id),
                )
        return None

    async def load(self, execution_id: str) -> Execution | None:
        row = self._db.execute(
            "SELECT e.spec_id, s.seq, s.state FROM events e LEFT JOIN snapshots s"
            " ON s.execution_id = e.execution_id WHERE e.execution_id = ? AND e.seq = 1",
            (execution_id,),
        ).fetchone()
        if row is None:
            return None
        spec_id, since, state = row
        # The spec object we hold, not an equal copy: commit() finds its id by identity.
        spec = self._spec(spec_id)
        if state is None:
            ex, since = Execution(agent=spec), 0
        else:
            with self._reading(execution_id, f"snapshot at event {since}"):
                data = unpack(state)
                data["agent"] = spec
                ex = execution_from_data(data)
        # decide() is pure and deterministic, so folding the log rebuilds the state the
        # steps made (tests/test_properties.py checks it on every run it generates).
        for seq, body in self._log(execution_id, since):
            with self._reading(execution_id, f"event {seq}"):
                ex, _ = decide(ex, event_from_data(unpack(body)))
        return ex

    def _log(self, execution_id: str, after: int = 0) -> list[tuple[int, bytes]]:
        return self._db.execute(
            "SELECT seq, body FROM events WHERE execution_id = ? AND seq > ? ORDER BY seq",
            (execution_id, after),
        ).fetchall()

    @contextmanager
    def _reading(self, execution_id: str, what: str) -> Iterator[None]:
        """A stored row that no longer reads back is named, not passed off as, say, a
        refusal of whatever signal made us load the execution."""
        try:
            yield
        except Exception as err:
            raise UnreadableExecution(
                f"execution {execution_id}: its stored {what} cannot be read back"
                f" ({type(err).__name__}: {err}); it was written by another version of"
                " Clearance or the file was changed"
            ) from err

    async def events(self, execution_id: str) -> list[Event]:
        events = []
        for seq, body in self._log(execution_id):
            with self._reading(execution_id, f"event {seq}"):
                events.append(event_from_data(unpack(body)))
        return events

    async def spec_of(self, execution_id: str) -> AgentSpec | None:
        row = self._db.execute(
            "SELECT spec_id FROM events WHERE execution_id = ? AND seq = 1", (execution_id,)
        ).fetchone()
        return None if row is None else self._spec(row[0])

    # -- approvals, timers, audit --------------------------------------------------------

    async def execution_of_request(self, request_id: str) -> str | None:
        row = self._db.execute(
            "SELECT execution_id FROM approvals WHERE request_id = ?", (request_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    async def pending(
        self, agent_tag: str | None = None, limit: int | None = None
    ) -> list[ApprovalRequest]:
        sql = "SELECT body FROM approvals WHERE status = 'pending'"
        args: list[Any] = []
        if agent_tag is not None:
            sql += " AND agent_tag = ?"
            args.append(agent_tag)
        sql += " ORDER BY created_at, rowid"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [request_from_data(unpack(body)) for (body,) in self._db.execute(sql, args)]

    async def due_timers(self, now: datetime, limit: int) -> list[DueTimer]:
        rows = self._db.execute(
            "SELECT execution_id, request_id, due_at FROM timers WHERE due_at <= ?"
            " ORDER BY due_at LIMIT ?",
            (stamp(now), limit),
        )
        return [DueTimer(e, r, converter.structure(d, datetime)) for e, r, d in rows]

    async def drop_timer(self, timer: DueTimer) -> None:
        with self._write():
            self._db.execute(
                "DELETE FROM timers WHERE due_at = ? AND request_id = ?",
                (stamp(timer.due_at), timer.request_id),
            )

    async def audit(
        self, execution_id: str | None = None, request_id: str | None = None
    ) -> list[AuditRecord]:
        sql, args = "SELECT body FROM audit", []
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
        rows = self._db.execute(sql + " ORDER BY id", args)
        return [audit_from_data(json.loads(body)) for (body,) in rows]

    # -- the outbox ------------------------------------------------------------------------

    def _entries(self, rows: Iterator[Any]) -> list[OutboxEntry]:
        return [OutboxEntry(i, e, t, command_from_data(json.loads(b)), c) for i, e, t, b, c in rows]

    def _claim_each(
        self, rows: list[Any], update: str, params: Callable[[int], tuple[Any, ...]]
    ) -> list[Any]:
        """The rows (id first) that `update`, guarded by the state they were found in
        without a lock, still takes, all in one write: of two hosts that saw the same
        row, exactly one gets it."""
        if not rows:
            return []
        with self._write():
            return [row for row in rows if self._db.execute(update, params(row[0])).rowcount == 1]

    async def claim_queued(
        self, agent_tags: Sequence[str], worker: str, limit: int
    ) -> list[OutboxEntry]:
        if not agent_tags:
            return []
        marks = ",".join("?" * len(agent_tags))
        # Look first without a write lock: this runs on every poll of every host.
        rows = self._db.execute(
            "SELECT id, execution_id, agent_tag, body, claimed_by FROM outbox"
            f" WHERE claimed_by IS NULL AND agent_tag IN ({marks}) ORDER BY id LIMIT ?",
            (*agent_tags, limit),
        ).fetchall()
        won = self._claim_each(
            rows,
            "UPDATE outbox SET claimed_by = ? WHERE id = ? AND claimed_by IS NULL",
            lambda entry_id: (worker, entry_id),
        )
        return [
            OutboxEntry(e.id, e.execution_id, e.agent_tag, e.command, worker)
            for e in self._entries(iter(won))
        ]

    async def claimed_by_others(self, agent_tags: Sequence[str], worker: str) -> list[OutboxEntry]:
        if not agent_tags:
            return []
        marks = ",".join("?" * len(agent_tags))
        rows = self._db.execute(
            "SELECT id, execution_id, agent_tag, body, claimed_by FROM outbox"
            f" WHERE claimed_by IS NOT NULL AND claimed_by != ? AND agent_tag IN ({marks})"
            " ORDER BY id",
            (worker, *agent_tags),
        )
        return self._entries(rows)

    async def reclaim(self, entry_id: int, previous: str, worker: str) -> bool:
        with self._write():
            cur = self._db.execute(
                "UPDATE outbox SET claimed_by = ? WHERE id = ? AND claimed_by = ?",
                (worker, entry_id, previous),
            )
        return cur.rowcount == 1

    async def discard(self, entry_id: int) -> None:
        with self._write():
            self._db.execute("DELETE FROM outbox WHERE id = ?", (entry_id,))

    # -- webhook deliveries ------------------------------------------------------------------

    _DELIVERY = (
        "SELECT id, request_id, execution_id, agent_tag, url, webhook_id, status,"
        " next_attempt_at, expires_at FROM deliveries"
    )

    def _deliveries(self, rows: list[Any]) -> list[Delivery]:
        out = []
        for i, rid, eid, tag, url, wid, status, next_at, expires in rows:
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
        exclude_urls: Sequence[str] = (),
    ) -> list[Delivery]:
        tags = ",".join("?" * len(agent_tags))
        due = (
            " WHERE status = 'pending' AND next_attempt_at <= ?"
            f" AND (signer = 'instance' OR agent_tag IN ({tags}))"
            " AND (claimed_by IS NULL OR lease_until <= ?)"
        )
        if exclude_urls:
            due += f" AND url NOT IN ({','.join('?' * len(exclude_urls))})"
        args = (stamp(now), *agent_tags, stamp(now), *exclude_urls)
        rows = self._db.execute(
            self._DELIVERY + due + " ORDER BY next_attempt_at LIMIT ?", (*args, limit)
        ).fetchall()
        won = self._claim_each(
            rows,
            "UPDATE deliveries SET claimed_by = ?, lease_until = ? WHERE id = ?"
            " AND status = 'pending' AND (claimed_by IS NULL OR lease_until <= ?)",
            lambda delivery_id: (worker, stamp(lease_until), delivery_id, stamp(now)),
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
        attempt: DeliveryAttempt,
        status: str,
        next_attempt_at: datetime | None,
    ) -> None:
        with self._write():
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
            self._db.execute(
                "UPDATE deliveries SET status = ?, claimed_by = NULL, lease_until = NULL,"
                " next_attempt_at = COALESCE(?, next_attempt_at) WHERE id = ?",
                (status, stamp(next_attempt_at) if next_attempt_at else None, delivery_id),
            )

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

    async def close(self) -> None:
        self._db.close()
