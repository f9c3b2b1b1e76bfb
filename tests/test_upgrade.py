"""Files written by the schema-2 release open with the current code and carry on.

`corpus/v2.sqlite3` was written by `corpus/make_v2_corpus.py` against commit
52542db (schema 2); `corpus/v2_expected.json` is what it held then. Each test
opens its own copy, hosting the same agents (`corpus/v2_agents.py`), and checks
that every execution folds to the state it was written with, that the approval
inbox, the audit log and the webhook deliveries read back, and that the work
the file left half done (pending requests, a queued tool run, a dead worker's
claim) is carried on exactly once. The corpus is never regenerated with newer
code: it stands for files already out there.

Later schemas are checked from the version before them, made as the stores' own
upgrade tests make one: the tests at the end (SQLite 5 and 8, PostgreSQL 2 and 5).
"""

from __future__ import annotations

import asyncio
import copy
import json
import secrets
import shutil
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
from conftest import Recorder, define_refund_agent
from corpus.v2_agents import (
    BATCH_A,
    BATCH_B,
    LONG_REFUND,
    PUBLIC_URL,
    REFUND,
    WEBHOOK_SECRET,
    Handlers,
    define_agents,
)
from postgres_server import postgres_url
from psycopg import sql

from clearance import Clearance, HumanInLoop, Refusal
from clearance.adapters import postgres_store, sqlite_store
from clearance.adapters.postgres_store import PostgresStore
from clearance.adapters.sqlite_store import SQLiteStore
from clearance.core.reviewers import Grant, Reviewer
from clearance.core.wire import converter, execution_from_data, execution_to_data
from clearance.ports.store import Store
from clearance.reviewer_keys import new_key
from clearance.testing import FakeClock, SequentialIds
from clearance.testing.contract.store import Run, agent

__all__ = ["postgres_url"]  # the fixture, for pytest

CORPUS = Path(__file__).parent / "corpus" / "v2.sqlite3"
EXPECTED: dict[str, Any] = json.loads(CORPUS.with_name("v2_expected.json").read_text())
EXECUTIONS: dict[str, dict[str, Any]] = EXPECTED["executions"]
PENDING = [rid for ex in EXECUTIONS.values() for rid in ex["pending"]]

# A tool call's status as schema 2 stored it -> its name in the current code.
# Empty while no status was renamed; a version that renames one adds it here.

# How many rounds of background work a host gets to carry on what the file left.
ROUNDS = 20


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def scenario(name: str) -> str:
    [ex_id] = [i for i, ex in EXECUTIONS.items() if ex["scenario"] == name]
    return ex_id


def expected_state(ex_id: str) -> dict[str, Any]:
    """The state 0.1 recorded, as this release reads a state of decide() version 1
    (its snapshot reader renames a call's "running" to "executing", gives a rejected or
    timed-out call that status, cancels a stopped execution's open calls). Replaying
    the log with this release's decide() must reach exactly that."""
    state = copy.deepcopy(EXECUTIONS[ex_id]["state"])
    agent = EXPECTED["agents"][EXECUTIONS[ex_id]["agent"]]
    read = execution_to_data(execution_from_data({**state, "agent": agent}))
    del read["agent"]
    return jsonable(read)


def queued_work() -> set[str]:
    """The executions whose tool run the corpus left queued or claimed: any host may
    carry those on whenever it does anything, so tests of other executions ignore
    their runs."""
    return {ex_id for ex_id, ex in EXECUTIONS.items() if ex.get("outbox")}


def request_of(rid: str) -> tuple[str, dict[str, Any]]:
    """The execution id and the stored (schema-2) data of approval request `rid`."""
    for ex_id, ex in EXECUTIONS.items():
        for request in ex["state"]["requests"]:
            if request["request_id"] == rid:
                return ex_id, request
    raise KeyError(rid)


def open_corpus(path: Path, clock: FakeClock, handlers: Handlers) -> Clearance:
    # New ids get another prefix, so nothing made here can collide with the corpus's.
    app = Clearance.open(
        f"sqlite:///{path}",
        clock=clock,
        ids=SequentialIds("t-"),
        public_url=PUBLIC_URL,
        webhook_secret=WEBHOOK_SECRET,
    )
    define_agents(app, handlers)
    return app


async def work_once(app: Clearance) -> None:
    """One round of what a hosting process does in the background (its `async with`
    task, without the webhook sender, which would go to the network): claim queued
    work and work whose lease ran out (the schema-2 claims all have)."""
    await app.engine.pickup()


async def settle(apps: list[Clearance], done: Callable[[], Any]) -> None:
    """Give every host rounds of background work until `done()` (async) is true."""
    for _ in range(ROUNDS):
        if await done():
            return
        for app in apps:
            await work_once(app)
        await asyncio.sleep(0.01)


async def status(app: Clearance, ex_id: str) -> str:
    return (await app.get_execution(ex_id)).status


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "v2.sqlite3"
    shutil.copyfile(CORPUS, path)
    return path


@pytest.fixture
def clock() -> FakeClock:
    # Where the corpus's clock stopped: its pending requests have a day left.
    return FakeClock(datetime.fromisoformat(EXPECTED["clock_end"]))


@pytest.fixture
def handlers() -> Handlers:
    return Handlers()


@pytest.fixture
async def app(corpus_file: Path, clock: FakeClock, handlers: Handlers) -> AsyncIterator[Clearance]:
    instance = open_corpus(corpus_file, clock, handlers)
    yield instance
    await instance.close()


def test_the_corpus_is_still_the_schema_2_file() -> None:
    # immutable=1: read the committed file without creating -wal/-shm next to it.
    db = sqlite3.connect(f"file:{CORPUS}?immutable=1", uri=True)
    try:
        (version,) = db.execute("PRAGMA user_version").fetchone()
    finally:
        db.close()
    assert version == EXPECTED["schema_version"] == 2
    assert CORPUS.stat().st_size < 1_000_000
    assert EXPECTED["snapshots"], "the corpus should hold a run long enough for a snapshot"


TOOL_DEFAULTS = {
    "approvals_required": 1,
    "groups": [],
    "timeout_action": "reject",
    "max_timeout_ms": None,
    "remind_before_ms": None,
    "escalation": [],
}


async def test_every_execution_loads_to_the_state_it_was_written_with(app: Clearance) -> None:
    for ex_id, expected in EXECUTIONS.items():
        history = await app.get_execution(ex_id)
        data = jsonable(execution_to_data(history.execution))
        spec = data.pop("agent")
        written = EXPECTED["agents"][expected["agent"]]
        # Fields an agent gained since (approval_broker) read as their defaults: unset.
        added = {key: spec.pop(key) for key in set(spec) - set(written)}
        assert added == dict.fromkeys(added), (ex_id, added)
        # ... and so do a tool's (a quorum, a timeout action, a longest deadline).
        for tool, was in zip(spec["tools"], written["tools"], strict=True):
            gained = {key: tool.pop(key) for key in set(tool) - set(was)}
            assert gained == {k: TOOL_DEFAULTS[k] for k in gained}, (ex_id, gained)
        assert spec == written, ex_id
        assert data == expected_state(ex_id), ex_id


async def test_opening_changes_no_audit_records_or_events(
    corpus_file: Path, clock: FakeClock, handlers: Handlers
) -> None:
    total = sum(len(ex["audit"]) for ex in EXECUTIONS.values())
    for _ in range(2):  # the first open upgrades the file; the second finds it upgraded
        app = open_corpus(corpus_file, clock, handlers)
        try:
            assert len(await app.audit()) == total
            for ex_id, expected in EXECUTIONS.items():
                history = await app.get_execution(ex_id)
                assert len(history.events) == expected["events"], ex_id
                assert len(await app.audit(execution_id=ex_id)) == len(expected["audit"])
        finally:
            await app.close()
    assert handlers.calls == []


async def test_every_pending_request_is_still_listed(app: Clearance) -> None:
    pending = await app.pending()
    assert [r.request_id for r in pending] == PENDING  # oldest first, as written
    for request in pending:
        ex_id, stored = request_of(request.request_id)
        assert request.execution_id == ex_id
        assert_as_stored(jsonable(converter.unstructure(request)), stored)
    parallel = EXECUTIONS[scenario("parallel-pending")]["pending"]
    assert [r.request_id for r in await app.pending("batch-refunds")] == parallel


async def test_the_audit_log_reads_back(app: Clearance) -> None:
    everything = []
    for ex_id, expected in EXECUTIONS.items():
        records = jsonable(converter.unstructure(await app.audit(execution_id=ex_id)))
        assert_as_stored(records, expected["audit"])
        for record in expected["audit"]:
            by_request = await app.audit(request_id=record["request_id"])
            assert_as_stored(jsonable(converter.unstructure(by_request)), [record])
        everything += expected["audit"]
    assert_as_stored(jsonable(converter.unstructure(await app.audit())), everything)


def assert_as_stored(now: Any, then: Any) -> None:
    """`now` reads back as `then` was written: every field the corpus has, the same;
    a field added since (e.g. `by_kind`, who a decider is known as) at its default."""
    if isinstance(then, list):
        assert isinstance(now, list) and len(now) == len(then), (now, then)
        for a, b in zip(now, then, strict=True):
            assert_as_stored(a, b)
        return
    assert {k: now.get(k) for k in then} == then
    added = {k: v for k, v in now.items() if k not in then and v is not None}
    # A request's quorum came later: one approval, no groups, no votes, rejected on timeout.
    assert {k: v for k, v in added.items() if REQUEST_DEFAULTS.get(k, ...) != v} == {}, now


REQUEST_DEFAULTS = {
    "approvals_required": 1,
    "groups": [],
    "votes": [],
    "timeout_action": "reject",
    # No reminder sent, no escalation stage fired: schema 2 had neither.
    "reminded": False,
    "stages_fired": 0,
}


async def test_the_webhook_delivery_reads_back(app: Clearance) -> None:
    assert EXPECTED["deliveries"], "the corpus should hold a webhook delivery"
    for rid, deliveries in EXPECTED["deliveries"].items():
        found = jsonable(converter.unstructure(await app.deliveries(rid)))
        assert len(found) == len(deliveries), rid
        for now, then in zip(found, deliveries, strict=True):
            # Every field schema 2 had reads back the same; later ones may add fields.
            assert {k: now.get(k) for k in then} == then, rid
            # Schema 2 had only the request's own delivery (no reminder, no stage).
            assert now["purpose"] == "request", rid


async def test_decided_requests_stay_decided(app: Clearance, handlers: Handlers) -> None:
    decided = [
        r["request_id"]
        for ex in EXECUTIONS.values()
        for r in ex["state"]["requests"]
        if r["status"] != "pending"
    ]
    assert len(decided) == 7
    for rid in decided:
        with pytest.raises(Refusal) as refused:
            await app.decide(rid, approved=True, by="late-reviewer")
        assert refused.value.code == "already_decided", rid
    assert {ex_id for _, ex_id, _ in handlers.calls} <= queued_work()
    assert len(await app.audit()) == sum(len(ex["audit"]) for ex in EXECUTIONS.values())


@pytest.mark.parametrize("approved", [True, False], ids=["approve", "reject"])
@pytest.mark.parametrize("rid", PENDING)
async def test_every_pending_request_can_be_decided_once(
    app: Clearance, handlers: Handlers, rid: str, approved: bool
) -> None:
    ex_id, stored = request_of(rid)
    ex = await app.decide(rid, approved=approved, by="upgrade-test", reason="checked")
    [request] = [r for r in ex.requests if r.request_id == rid]
    assert request.status == ("approved" if approved else "rejected")
    assert rid not in [r.request_id for r in await app.pending()]
    runs = handlers.ran(stored["tool"], ex_id)
    assert runs == ([stored["parameters"]] if approved else [])
    [record] = await app.audit(request_id=rid)
    assert (record.decision, record.by) == (request.status, "upgrade-test")
    with pytest.raises(Refusal):
        await app.decide(rid, approved=not approved)
    assert handlers.ran(stored["tool"], ex_id) == runs


async def test_the_sequential_pending_request_completes_on_approval(
    app: Clearance, handlers: Handlers
) -> None:
    ex_id = scenario("pending")
    [rid] = EXECUTIONS[ex_id]["pending"]
    ex = await app.signal(ex_id, "approve", request_id=rid, by="upgrade-test")
    assert (ex.status, ex.output) == ("completed", "Done.")
    assert handlers.ran("process-refund", ex_id) == [REFUND]


async def test_the_parallel_requests_approve_one_reject_the_other(
    app: Clearance, handlers: Handlers
) -> None:
    ex_id = scenario("parallel-pending")
    first, second = EXECUTIONS[ex_id]["pending"]
    ex = await app.signal(ex_id, "approve", request_id=first, by="upgrade-test")
    assert ex.status == "awaiting_approval"
    assert [r.request_id for r in ex.pending_approvals] == [second]
    assert ex.request(second).parameters == BATCH_B  # type: ignore[union-attr]
    ex = await app.signal(ex_id, "reject", request_id=second, reason="Not eligible")
    assert (ex.status, ex.output) == ("completed", "All handled.")
    # The lookup ran while the corpus was written; only the approved refund runs now.
    assert handlers.ran("process-refund", ex_id) == [BATCH_A]
    assert handlers.ran("get-order", ex_id) == []
    results = ex.messages[-2]["content"]
    assert [r["is_error"] for r in results] == [False, False, True]


async def test_the_webhook_agents_request_is_rejected_and_the_run_completes(
    app: Clearance, handlers: Handlers
) -> None:
    ex_id = scenario("webhook-pending")
    [rid] = EXECUTIONS[ex_id]["pending"]
    ex = await app.signal(ex_id, "reject", request_id=rid, by="upgrade-test", reason="No.")
    assert ex.status == "completed"
    assert handlers.ran("process-refund", ex_id) == []


async def test_the_long_run_goes_on_from_its_snapshot(app: Clearance, handlers: Handlers) -> None:
    ex_id = scenario("long-pending")
    assert ex_id in EXPECTED["snapshots"]
    [rid] = EXECUTIONS[ex_id]["pending"]
    ex = await app.decide(rid, approved=True, by="upgrade-test")
    assert (ex.status, ex.output) == ("completed", "Audit finished.")
    assert handlers.ran("process-refund", ex_id) == [LONG_REFUND]
    assert handlers.ran("get-order", ex_id) == []
    history = await app.get_execution(ex_id)
    assert len(history.events) > EXECUTIONS[ex_id]["events"]
    assert history.execution == ex


async def test_the_queued_approved_tool_run_is_carried_out_once(
    corpus_file: Path, clock: FakeClock, handlers: Handlers
) -> None:
    ex_id = scenario("approved-queued")
    hosts = [open_corpus(corpus_file, clock, handlers) for _ in range(2)]
    try:
        assert await status(hosts[0], ex_id) == "running"

        async def completed() -> bool:
            return await status(hosts[0], ex_id) == "completed"

        await settle(hosts, completed)
        assert await completed()
        for _ in range(3):  # more rounds on both hosts run nothing again
            await asyncio.gather(*(work_once(host) for host in hosts))
        assert handlers.ran("process-refund", ex_id) == [REFUND]
        ex = (await hosts[1].get_execution(ex_id)).execution
        assert ex.output == "Done."
        assert ex.requests[0].decided_by == "reviewer"
    finally:
        for host in hosts:
            await host.close()


async def test_a_dead_workers_claim_is_taken_over_not_lost(
    app: Clearance, clock: FakeClock, handlers: Handlers
) -> None:
    # Schema 2 takes over a claim only when its pid is dead on this very host; the
    # corpus's claim names another host ('corpus-host'), so today it is held forever.
    ex_id = scenario("claimed-by-dead-worker")
    assert await status(app, ex_id) == "running"
    clock.advance(minutes=6 * 60)  # far past any lease the claim could be given

    async def finished() -> bool:
        return await status(app, ex_id) == "completed"

    await settle([app], finished)
    assert await finished(), "the dead worker's tool run was never taken over"
    # Re-run, or reported to the model as of unknown outcome: at most once either way.
    assert len(handlers.ran("process-refund", ex_id)) <= 1


# -- schema 5 (SQLite) and 2 (PostgreSQL): before reviewers were stored ---------------------
# Made as the stores' own upgrade tests make an old store: written by the current code,
# then put back in the old shape (here: without the reviewer tables) and version.

OPS = Reviewer("ops.lead@example.com", (Grant(("billing-*",), ("*-refund",)),), ("finance",))


async def _pending_run(store: Store) -> Run:
    run = Run(agent(), "exec-1")
    await run.commit(store, run.started())
    await run.commit(store, run.asks(1, ("tu-1", "refund", "apr-1")))
    return run


async def _check_upgraded(store: Store, run: Run) -> None:
    """The pending request is still listed and its execution loads; reviewers and their
    keys can be stored."""
    assert await store.pending() == [run.request("apr-1")]
    assert await store.load(run.id) == run.ex
    assert await store.reviewers() == []
    assert await store.save_reviewer(OPS) is True
    _, key = new_key(OPS.name, datetime(2026, 1, 1, tzinfo=UTC))
    await store.add_key(key)
    assert await store.reviewer(OPS.name) == OPS
    assert await store.reviewer_keys(OPS.name) == [key]


def _reviewer_tables(path: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(
            "SELECT name, sql FROM sqlite_master WHERE tbl_name LIKE 'reviewer%' ORDER BY name"
        ).fetchall()
    finally:
        db.close()


async def test_a_schema_5_sqlite_file_is_upgraded_keeping_its_pending_requests(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v5.db"
    store = SQLiteStore(str(path))
    run = await _pending_run(store)
    await store.close()
    fresh = _reviewer_tables(path)
    assert {"reviewers", "reviewer_keys", "reviewer_keys_of"} <= {name for name, _ in fresh}
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP TABLE reviewer_keys")
    db.execute("DROP TABLE reviewers")
    db.execute("ALTER TABLE deliveries DROP COLUMN purpose")  # came with schema 9
    db.execute("PRAGMA user_version = 5")
    db.close()
    assert _reviewer_tables(path) == []

    store = SQLiteStore(str(path))
    try:
        assert store._db.execute("PRAGMA user_version").fetchone() == (11,)
        assert sqlite_store.SCHEMA_VERSION == 11
        assert _reviewer_tables(path) == fresh  # as a new file has them
        await _check_upgraded(store, run)
    finally:
        await store.close()
    store = SQLiteStore(str(path))  # the second open finds it upgraded
    try:
        assert await store.reviewer(OPS.name) == OPS
        assert await store.pending() == [run.request("apr-1")]
    finally:
        await store.close()


@pytest.fixture
async def pg_schemas(postgres_url: str) -> AsyncIterator[tuple[str, str]]:
    """Two store URLs, each on a schema of its own, dropped after the test."""
    names = [f"up_{secrets.token_hex(6)}" for _ in range(2)]
    yield f"{postgres_url}?schema={names[0]}", f"{postgres_url}?schema={names[1]}"
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        for name in names:
            await conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name))
            )


async def _in_schema(url: str) -> psycopg.AsyncConnection[Any]:
    """An autocommit connection to the store at `url`, in its schema: to take its tables
    back to an older version."""
    base, schema = url.split("?schema=")
    return await psycopg.AsyncConnection.connect(
        base, autocommit=True, options=f"-c search_path={schema}"
    )


async def _pg_reviewer_columns(conn: psycopg.AsyncConnection[Any], schema: str) -> list[Any]:
    cur = await conn.execute(
        "SELECT table_name, column_name, data_type, is_nullable, collation_name"
        " FROM information_schema.columns WHERE table_schema = %s"
        " AND table_name LIKE 'clearance_reviewer%%' ORDER BY table_name, ordinal_position",
        (schema,),
    )
    columns = await cur.fetchall()
    cur = await conn.execute(
        "SELECT tablename, indexname FROM pg_indexes WHERE schemaname = %s"
        " AND tablename LIKE 'clearance_reviewer%%' ORDER BY indexname",
        (schema,),
    )
    return [*columns, *await cur.fetchall()]


async def test_a_schema_2_postgresql_database_is_upgraded_keeping_its_pending_requests(
    pg_schemas: tuple[str, str],
) -> None:
    url, fresh_url = pg_schemas
    store = PostgresStore(url)
    run = await _pending_run(store)
    await store.close()
    fresh_store = PostgresStore(fresh_url)
    await fresh_store.open()
    await fresh_store.close()
    schema, fresh_schema = url.split("?schema=")[1], fresh_url.split("?schema=")[1]
    async with await _in_schema(url) as conn:
        fresh = await _pg_reviewer_columns(conn, fresh_schema)
        assert len(fresh) == 2 + 6 + 3  # two tables' columns, their keys and the index
        await conn.execute("DROP TABLE clearance_reviewer_keys")
        await conn.execute("DROP TABLE clearance_reviewers")
        await conn.execute("ALTER TABLE clearance_deliveries DROP COLUMN purpose")  # schema 6
        await conn.execute("UPDATE clearance_schema SET version = 2")
        assert await _pg_reviewer_columns(conn, schema) == []

        store = PostgresStore(url)
        try:
            await _check_upgraded(store, run)
        finally:
            await store.close()
        cur = await conn.execute("SELECT version FROM clearance_schema")
        assert await cur.fetchall() == [(8,)] and postgres_store.SCHEMA_VERSION == 8
        assert await _pg_reviewer_columns(conn, schema) == fresh  # as a new database has them
        store = PostgresStore(url)  # the second open finds it upgraded
        try:
            assert await store.reviewer(OPS.name) == OPS
            assert await store.pending() == [run.request("apr-1")]
        finally:
            await store.close()


# -- schema 8 (SQLite) and 5 (PostgreSQL): before a delivery said why it is sent -----------
# Made as above: written by the current code, then without the `purpose` column (every
# delivery then was the request's own) and at the old version.

HOOK = "https://hooks.example/approvals"


async def _delivering_run(store: Store) -> Run:
    run = Run(agent(webhook=HOOK), "exec-1")
    await run.commit(store, run.started())
    await run.commit(store, run.asks(1, ("tu-1", "refund", "apr-1")))
    return run


async def _check_purposes(store: Store, run: Run) -> None:
    """The old delivery reads back as the request's own; deliveries committed now keep
    their purpose (a request and its reminder)."""
    (old,) = await store.deliveries("apr-1")
    assert (old.webhook_id, old.purpose, old.status) == ("msg_apr-1", "request", "pending")
    again = Run(agent(webhook=HOOK), "exec-2")
    await again.commit(store, again.started())
    step = again.step(again.asks(1, ("tu-2", "refund", "apr-2")))
    (first,) = step.deliveries
    reminder = attrs.evolve(first, message_id="msg_apr-2.reminder", purpose="reminder")
    step = attrs.evolve(step, deliveries=(first, reminder))
    await store.commit(step, expected_seq=again.ex.seq)
    assert [(d.webhook_id, d.purpose) for d in await store.deliveries("apr-2")] == [
        ("msg_apr-2", "request"),
        ("msg_apr-2.reminder", "reminder"),
    ]
    assert await store.deliveries("apr-1") == [old]
    assert await store.load(run.id) == run.ex


async def test_a_schema_8_sqlite_file_is_upgraded_reading_its_deliveries_as_requests(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v8.db"
    store = SQLiteStore(str(path))
    run = await _delivering_run(store)
    await store.close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("ALTER TABLE deliveries DROP COLUMN purpose")
    db.execute("PRAGMA user_version = 8")
    db.close()

    for _ in range(2):  # the second open finds it upgraded
        store = SQLiteStore(str(path))
        try:
            assert store._db.execute("PRAGMA user_version").fetchone() == (11,)
            columns = {row[1] for row in store._db.execute("PRAGMA table_info(deliveries)")}
            assert "purpose" in columns
            (old,) = await store.deliveries("apr-1")
            assert old.purpose == "request"
        finally:
            await store.close()
    store = SQLiteStore(str(path))
    try:
        await _check_purposes(store, run)
    finally:
        await store.close()


async def test_a_schema_5_postgresql_database_is_upgraded_reading_its_deliveries_as_requests(
    pg_schemas: tuple[str, str],
) -> None:
    url, _ = pg_schemas
    store = PostgresStore(url)
    run = await _delivering_run(store)
    await store.close()
    async with await _in_schema(url) as conn:
        await conn.execute("ALTER TABLE clearance_deliveries DROP COLUMN purpose")
        await conn.execute("UPDATE clearance_schema SET version = 5")
        for _ in range(2):  # the second open finds it upgraded
            store = PostgresStore(url)
            try:
                (old,) = await store.deliveries("apr-1")
                assert old.purpose == "request"
            finally:
                await store.close()
            cur = await conn.execute("SELECT version FROM clearance_schema")
            assert await cur.fetchall() == [(8,)]
        store = PostgresStore(url)
        try:
            await _check_purposes(store, run)
        finally:
            await store.close()


async def test_the_audit_chain_starts_after_the_older_releases_records(
    app: Clearance, corpus_file: Path
) -> None:
    """The records written before the chain are covered by its genesis hash: a decision
    made now is chained after them, and a change to an old record shows too."""
    older = len(await app.audit())
    assert older > 0
    verdict = await app.verify_audit()
    assert verdict.intact and verdict.records == 0
    await app.decide(PENDING[0], approved=True, by="upgrade-test")
    verdict = await app.verify_audit()
    assert verdict.intact and verdict.records == 1
    db = sqlite3.connect(corpus_file)
    try:
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("UPDATE audit SET body = replace(body, 'approved', 'rejected') WHERE id = 1")
        db.commit()
    finally:
        db.close()
    verdict = await app.verify_audit()
    assert not verdict.intact and "older than the chain was changed" in (verdict.problem or "")


# -- schema 9 (SQLite) and 6 (PostgreSQL): before `clearance prune` -------------------------
# Their audit triggers refused every update; the upgrade lets through the one a pruning
# makes. Made as above: the current schema, with the old trigger put back.

_OLD_SQLITE_TRIGGER = (
    "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit"
    " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"
)
_OLD_PG_FUNCTION = (
    "CREATE OR REPLACE FUNCTION clearance_audit_append_only() RETURNS trigger"
    " LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$"
)


async def _decided_long_ago(url: str) -> str:
    """One approved and finished execution, 100 days before the returned clock."""
    clock = FakeClock()
    async with Clearance.open(url, clock=clock) as app:
        define_refund_agent(app, Recorder())
        ex = await app.run("safe-agent", input="Refund order ORD-1")
        ex = await app.decide(ex.pending_approvals[0].request_id, approved=True, by="rita")
        assert ex.status == "completed"
        return ex.id


async def _prunes_after_upgrade(url: str, execution_id: str) -> None:
    later = FakeClock(datetime(2024, 6, 1, tzinfo=UTC))
    async with Clearance.open(url, clock=later) as app:
        done = await app.prune("90d")
        assert (done.executions, done.audit_pruned) == (1, 1)
        assert await app.execution(execution_id) is None
        verdict = await app.verify_audit()
        assert verdict.intact and verdict.records == 1, verdict.problem


async def test_a_schema_9_sqlite_file_is_upgraded_so_that_prune_can_drop_payloads(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v9.db"
    execution_id = await _decided_long_ago(f"sqlite:///{path}")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP TRIGGER audit_no_update")
    db.execute(_OLD_SQLITE_TRIGGER)
    db.execute("PRAGMA user_version = 9")
    db.close()
    await _prunes_after_upgrade(f"sqlite:///{path}", execution_id)
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone() == (11,)
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("UPDATE audit SET body = '{}'")
    finally:
        db.close()


async def test_a_schema_6_postgresql_database_is_upgraded_so_that_prune_can_drop_payloads(
    pg_schemas: tuple[str, str],
) -> None:
    url, _ = pg_schemas
    execution_id = await _decided_long_ago(url)
    async with await _in_schema(url) as conn:
        await conn.execute(_OLD_PG_FUNCTION)
        await conn.execute("UPDATE clearance_schema SET version = 6")
        await _prunes_after_upgrade(url, execution_id)
        cur = await conn.execute("SELECT version FROM clearance_schema")
        assert await cur.fetchall() == [(8,)]
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            await conn.execute("UPDATE clearance_audit SET body = '{}'")


async def _one_finished_one_waiting(url: str) -> tuple[str, str]:
    """An approved, finished execution and one awaiting approval (its request open for
    a year), both in January 2024; their ids."""
    async with Clearance.open(url, clock=FakeClock()) as app:
        define_refund_agent(
            app, Recorder(), hitl=HumanInLoop(enabled=True, approval_timeout="365d")
        )
        ex = await app.run("safe-agent", input="Refund order ORD-1")
        done = await app.decide(ex.pending_approvals[0].request_id, approved=True, by="rita")
        waiting = await app.run("safe-agent", input="Refund order ORD-2")
        assert (done.status, waiting.status) == ("completed", "awaiting_approval")
        return done.id, waiting.id


async def _prunes_what_finished_before_and_after_the_upgrade(
    url: str, finished: str, waiting: str
) -> None:
    """Executions stored before the store kept when each finished are looked at by the
    first prune: the finished one goes, the waiting one stays; once that one finishes,
    after the upgrade, it is pruned when it is old enough, not before."""
    clock = FakeClock(datetime(2024, 6, 1, tzinfo=UTC))
    async with Clearance.open(url, clock=clock) as app:
        done = await app.prune("90d")
        assert (done.executions, done.busy, done.unreadable) == (1, 0, 0)
        assert await app.execution(finished) is None
        ex = await app.execution(waiting)
        assert ex is not None and ex.status == "awaiting_approval"
        assert (await app.prune("90d")).executions == 0
        define_refund_agent(
            app, Recorder(), hitl=HumanInLoop(enabled=True, approval_timeout="365d")
        )
        ex = await app.decide(ex.pending_approvals[0].request_id, approved=False, by="rita")
        assert ex.status == "completed"
        assert (await app.prune("90d")).executions == 0  # it finished just now
        clock.advance(minutes=91 * 24 * 60)
        assert (await app.prune("90d")).executions == 1
        assert await app.execution(waiting) is None
        assert (await app.verify_audit()).intact


async def test_a_schema_10_sqlite_file_is_upgraded_so_that_prune_need_not_fold_everything(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v10.db"
    finished, waiting = await _one_finished_one_waiting(f"sqlite:///{path}")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP TABLE finished")
    db.execute("PRAGMA user_version = 10")
    db.close()
    async with Clearance.open(f"sqlite:///{path}", clock=FakeClock()):
        pass
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone() == (11,)
        rows = db.execute("SELECT execution_id, at FROM finished ORDER BY execution_id")
        assert rows.fetchall() == sorted([(finished, ""), (waiting, "")])
    finally:
        db.close()
    await _prunes_what_finished_before_and_after_the_upgrade(f"sqlite:///{path}", finished, waiting)


async def test_a_schema_7_postgresql_database_is_upgraded_so_that_prune_need_not_fold_everything(
    pg_schemas: tuple[str, str],
) -> None:
    url, _ = pg_schemas
    finished, waiting = await _one_finished_one_waiting(url)
    async with await _in_schema(url) as conn:
        await conn.execute("DROP TABLE clearance_finished")
        await conn.execute("UPDATE clearance_schema SET version = 7")
        async with Clearance.open(url, clock=FakeClock()) as app:
            await app.pending()  # the store opens (and upgrades) on first use
        cur = await conn.execute("SELECT version FROM clearance_schema")
        assert await cur.fetchall() == [(8,)]
        cur = await conn.execute(
            "SELECT execution_id, at = '-infinity' FROM clearance_finished ORDER BY execution_id"
        )
        assert await cur.fetchall() == sorted([(finished, True), (waiting, True)])
        await _prunes_what_finished_before_and_after_the_upgrade(url, finished, waiting)


async def test_prune_leaves_the_older_releases_records_whole(app: Clearance) -> None:
    """Records written before the audit chain are covered by its genesis hash over their
    bodies: pruning forgets their executions but leaves those records as they are."""
    before = await app.audit()
    assert [r.request_id for r in await app.pending()] == PENDING
    assert isinstance(app.clock, FakeClock)
    app.clock.advance(minutes=400 * 24 * 60)
    done = await app.prune("90d")
    assert done.executions > 0 and done.audit_kept > 0 and done.audit_pruned == 0
    assert await app.audit() == before
    verdict = await app.verify_audit()
    assert verdict.intact and verdict.records == 0, verdict.problem
    # Awaiting approval (no timer was fired here): live, however old, so left alone.
    assert [r.request_id for r in await app.pending()] == PENDING
