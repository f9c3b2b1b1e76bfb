"""The SQLite store's layout: an event log folded into state, snapshots, packed bodies."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    REFUND,
    Commits,
    Recorder,
    as_if_restarted,
    check_the_timer_is_kept_and_claimed,
    define_refund_agent,
)
from hypothesis import given
from hypothesis import strategies as st

from clearance import Clearance, ClearanceError, HumanInLoop
from clearance.adapters.packed_json import pack, unpack
from clearance.adapters.sqlite_store import SCHEMA_VERSION, SQLiteStore
from clearance.core.decide import decide
from clearance.core.events import Approved
from clearance.core.execution import Execution
from clearance.core.rows import writes
from clearance.core.wire import parse_stamp, stamp
from clearance.ports.store import Claim, ClaimRequest, Conflict, LeaseLost, UnreadableExecution
from clearance.testing import FakeClock, ScriptedModel, SequentialIds, text, tool_use
from clearance.testing.contract.store import Run, agent

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@given(json_values)
def test_packed_bodies_round_trip(value: Any) -> None:
    packed = pack(value)
    assert unpack(packed) == value
    # Short bodies stay plain JSON (first byte 0); longer ones are deflated (dictionary 1).
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    assert packed[0] == (0 if len(text) < 200 else 1)


def test_a_blob_of_an_unknown_dictionary_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"first byte 7b; known: 0 for plain JSON, dictionaries 1"):
        unpack(b'{"type":"started"}')
    with pytest.raises(ValueError, match="first byte nothing"):
        unpack(b"")


def test_a_model_reply_is_stored_in_under_half_its_json() -> None:
    reply = {
        "type": "model_replied",
        "turn": 1,
        "content": [
            {"type": "text", "text": "I need to process a refund of $50 for order ORD-123"},
            {"type": "tool_use", "name": "process-refund", "input": REFUND, "id": "toolu_01_01"},
        ],
        "stop_reason": "tool_use",
        "at": "2026-11-26T05:49:04.230957Z",
        "usage": {"input_tokens": 1200, "output_tokens": 80},
        "tickets": [
            {
                "tool_use_id": "toolu_01_01",
                "request_id": "apr-3a062e1903a948f9",
                "reason": "Calling 'process-refund' requires approval",
            }
        ],
    }
    assert len(pack(reply)) < len(json.dumps(reply, separators=(",", ":"))) / 2


def _lookups(count: int) -> ScriptedModel:
    """`count` ungated lookups, one per turn, then the gated refund, then an answer."""
    turns = [[tool_use("get-order", {"orderId": f"ORD-{i}"})] for i in range(count)]
    turns += [[tool_use("process-refund", REFUND)], [text("Refunded.")]]
    return ScriptedModel(turns)


async def _long_run(app: Clearance, **store: Any) -> Execution:
    assert isinstance(app.store, SQLiteStore)
    for name, value in store.items():
        setattr(app.store, name, value)
    define_refund_agent(app, Recorder(), model=_lookups(12))
    return await app.run("safe-agent", input="Refund ORD-123 after checking 12 orders")


def _db(tmp_path: Path) -> sqlite3.Connection:
    """The `app` fixture's file, opened beside it."""
    return sqlite3.connect(tmp_path / "approvals.db")


async def test_a_long_run_loads_from_its_latest_snapshot_and_the_tail(
    app: Clearance, tmp_path: Path
) -> None:
    ex = await _long_run(app)  # 1 start + 12 x (reply, tool) + gated reply = 26
    assert (ex.status, ex.seq) == ("awaiting_approval", 26)
    db = _db(tmp_path)
    assert db.execute("SELECT execution_id, seq FROM snapshots").fetchall() == [(ex.id, 16)]
    assert await app.store.load(ex.id) == ex
    # Events before the snapshot are no longer read to load: spoil one and load again.
    with db:
        db.execute("UPDATE events SET body = x'01ff' WHERE seq = 3")
    as_if_restarted(app)
    assert await app.store.load(ex.id) == ex
    # Those after it are: the spoiled tail is an error, never a silently different state.
    with db:
        db.execute("UPDATE events SET body = x'01ff' WHERE seq = 20")
    as_if_restarted(app)
    with pytest.raises(UnreadableExecution, match="stored event 20 cannot be read back"):
        await app.store.load(ex.id)
    db.close()


async def test_without_snapshots_the_whole_log_is_folded(app: Clearance, tmp_path: Path) -> None:
    ex = await _long_run(app, snapshot_every=1000)
    db = _db(tmp_path)
    assert db.execute("SELECT count(*) FROM snapshots").fetchone() == (0,)
    db.close()
    assert await app.store.load(ex.id) == ex
    request = ex.pending_approvals[0]
    done = await app.signal(ex.id, "approve", request_id=request.request_id, by="ops")
    assert done.status == "completed"
    assert await app.store.load(ex.id) == done


async def test_a_stale_commit_is_a_conflict_and_writes_nothing(
    app: Clearance, tmp_path: Path
) -> None:
    define_refund_agent(app, Recorder())
    ex = await app.run("safe-agent", input="Refund ORD-123")
    request = ex.pending_approvals[0]
    event = Approved(request.request_id, ex.updated_at or ex.created_at, "ops")  # type: ignore[arg-type]
    winner, commands = decide(ex, event)
    await app.store.commit(writes(winner, event, commands), expected_seq=ex.seq)
    rows = _row_counts(_db(tmp_path))
    with pytest.raises(Conflict, match=f"moved past version {ex.seq}"):
        await app.store.commit(writes(winner, event, commands), expected_seq=ex.seq)
    assert _row_counts(_db(tmp_path)) == rows
    with pytest.raises(ValueError, match="one event past"):
        await app.store.commit(writes(ex, event, commands), expected_seq=ex.seq)


def _row_counts(db: sqlite3.Connection) -> dict[str, int]:
    try:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}
    finally:
        db.close()


def _untouched(path: Path, before: bytes) -> None:
    assert path.read_bytes() == before
    # Not even switched to WAL: no journal files beside it.
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_another_applications_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "theirs.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE executions (id TEXT PRIMARY KEY, state TEXT)")
    db.execute("INSERT INTO executions VALUES ('exec-1', '{}')")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(
        ClearanceError, match=r"another application's SQLite database \(tables: executions\)"
    ):
        SQLiteStore(str(path))
    _untouched(path, before)


def test_a_file_of_another_schema_version_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "later.db"
    SQLiteStore(str(path))._db.close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode = DELETE")  # as a copy that carries no -wal file
    db.execute("PRAGMA user_version = 99")
    db.close()
    for extra in tmp_path.glob("later.db-*"):
        extra.unlink()
    before = path.read_bytes()
    with pytest.raises(ClearanceError, match=rf"schema version 99.*reads schema {SCHEMA_VERSION}"):
        SQLiteStore(str(path))
    _untouched(path, before)


@pytest.mark.parametrize(
    ("content", "why"),
    [(b"hello\n", "not a SQLite database"), (bytes(range(256)) * 12, "not a SQLite database")],
    ids=["text", "binary"],
)
def test_a_file_that_is_no_database_is_refused_untouched(
    tmp_path: Path, content: bytes, why: str
) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(content)
    with pytest.raises(ClearanceError, match=why):
        SQLiteStore(str(path))
    _untouched(path, content)


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ClearanceError, match="is a directory"):
        SQLiteStore(str(tmp_path))


def test_a_file_this_version_made_opens_again(tmp_path: Path) -> None:
    path = str(tmp_path / "a.db")
    SQLiteStore(path)._db.close()
    store = SQLiteStore(path)
    assert store._db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    store._db.close()


def test_snapshot_every_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="snapshot_every must be 1 or more, got 0"):
        SQLiteStore(str(tmp_path / "a.db"), snapshot_every=0)


async def test_a_paused_run_keeps_its_request_readable_after_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    hitl = HumanInLoop(enabled=True, approval_timeout=60_000)
    async with Clearance.open(url, clock=FakeClock(), ids=SequentialIds()) as app:
        define_refund_agent(app, Recorder(), hitl=hitl)
        ex = await app.run("safe-agent", input="Refund ORD-123")
    async with Clearance.open(url, clock=FakeClock(), ids=SequentialIds("b")) as app:
        (pending,) = await app.pending()
        assert pending == ex.pending_approvals[0]
        assert (await app.get_execution(ex.id)).execution == ex


@given(st.datetimes(datetime(2, 1, 1), datetime(9999, 12, 30), timezones=st.timezones()))
def test_stamps_are_fixed_width_utc_and_read_back_exactly(at: datetime) -> None:
    text = stamp(at)
    assert len(text) == 27 and text.endswith("Z"), text
    # Compared as UTC instants: aware datetimes in a zone compare unequal across a
    # DST fold (PEP 495), so `== at` fails for e.g. Africa/Ceuta 1999-10-31 02:00.
    instant = at.astimezone(UTC)
    assert parse_stamp(text) == instant
    # Fixed width, so text order is time order: what the timer sweep's index relies on.
    # (The next microsecond is taken in UTC: `at + 1 µs` would drop a fold=1.)
    assert (text < stamp(instant + timedelta(microseconds=1))) is True


async def test_a_decided_request_leaves_the_inbox_copy_and_keeps_its_status(
    app: Clearance, tmp_path: Path
) -> None:
    define_refund_agent(app, Recorder())
    first = await app.run("safe-agent", input="Refund ORD-1")
    second = await app.run("safe-agent", input="Refund ORD-2")
    request = first.pending_approvals[0]
    await app.signal(first.id, "reject", request_id=request.request_id, reason="no")
    db = _db(tmp_path)
    rows = db.execute("SELECT request_id, status, body IS NULL FROM approvals ORDER BY rowid")
    assert rows.fetchall() == [
        (request.request_id, "rejected", 1),
        (second.pending_approvals[0].request_id, "pending", 0),
    ]
    db.close()
    assert await app.pending() == second.pending_approvals
    (record,) = await app.audit(request_id=request.request_id)
    assert (record.decision, record.reason) == ("rejected", "no")


async def test_a_log_that_no_longer_replays_is_named_not_taken_for_a_refusal(
    app: Clearance, tmp_path: Path
) -> None:
    define_refund_agent(app, Recorder())
    ex = await app.run("safe-agent", input="Refund ORD-123")
    # A well-formed event that decide() refuses where it stands: a second start.
    started = {
        "type": "started",
        "execution_id": ex.id,
        "input": "again",
        "at": "2024-01-15T10:30:00.000000Z",
        "session_id": None,
    }
    db = _db(tmp_path)
    with db:
        db.execute(
            "INSERT INTO events (execution_id, seq, body) VALUES (?, 3, ?)",
            (ex.id, pack(started)),
        )
    db.close()
    request = ex.pending_approvals[0]
    with pytest.raises(UnreadableExecution, match=r"stored event 3 cannot be read back \(Refusal"):
        await app.signal(ex.id, "approve", request_id=request.request_id)


@pytest.mark.parametrize("fold", [0, 1])
def test_a_stamp_of_an_ambiguous_local_time_reads_back_as_the_same_instant(fold: int) -> None:
    # The example Hypothesis once drew: 02:00 happened twice in Ceuta that night.
    from zoneinfo import ZoneInfo

    at = datetime(1999, 10, 31, 2, 0, tzinfo=ZoneInfo("Africa/Ceuta"), fold=fold)
    assert parse_stamp(stamp(at)) == at.astimezone(UTC)
    assert parse_stamp(stamp(at)).timestamp() == at.timestamp()


async def _paused(app: Clearance, n: int) -> list[Execution]:
    define_refund_agent(app, Recorder())
    return [await app.run("safe-agent", input=f"Refund ORD-{i}") for i in range(n)]


def _approval(ex: Execution) -> Any:
    event = Approved(ex.pending_approvals[0].request_id, ex.created_at, "ops")  # type: ignore[arg-type]
    new, commands = decide(ex, event)
    return writes(new, event, commands)


async def _each_moved_one_step(tmp_path: Path, paused: list[Execution]) -> None:
    """What a fresh connection reads: each execution one event past `paused`."""
    again = SQLiteStore(str(tmp_path / "approvals.db"))
    try:
        for ex in paused:
            loaded = await again.load(ex.id)
            assert loaded is not None and loaded.seq == ex.seq + 1
    finally:
        await again.close()


def _quiet(tmp_path: Path) -> Clearance:
    """An instance without the background loop, so only the test commits."""
    return Clearance.open(f"sqlite:///{tmp_path / 'approvals.db'}", clock=FakeClock())


async def test_steps_committed_together_share_one_transaction(tmp_path: Path) -> None:
    app = _quiet(tmp_path)
    paused = await _paused(app, 5)
    commits = Commits(app)
    results = await asyncio.gather(
        *(app.store.commit(_approval(ex), expected_seq=ex.seq) for ex in paused)
    )
    assert commits.count == 1  # one transaction, one fsync, for five steps
    assert [len(queued) for queued in results] == [1] * 5  # each queued its tool run
    await _each_moved_one_step(tmp_path, paused)
    await app.close()


async def test_a_step_committed_alone_does_not_wait_for_the_group(tmp_path: Path) -> None:
    app = _quiet(tmp_path)
    paused = await _paused(app, 3)
    commits = Commits(app)
    grouped = [
        asyncio.ensure_future(app.store.commit(_approval(ex), expected_seq=ex.seq))
        for ex in paused[:2]
    ]
    alone = paused[2]
    # Durable when it returns, before the group (queued in the same turn) is written.
    await app.store.commit(_approval(alone), expected_seq=alone.seq, alone=True)
    assert commits.count == 1 and not any(g.done() for g in grouped)
    await asyncio.gather(*grouped)
    assert commits.count == 2  # the group, in one transaction
    await _each_moved_one_step(tmp_path, paused)
    await app.close()


async def test_executions_driven_together_through_the_app_share_transactions(
    tmp_path: Path,
) -> None:
    app = _quiet(tmp_path)
    await _paused(app, 1)  # the agent, and one alone: 2 steps, 2 commits
    commits = Commits(app)
    await app.run("safe-agent", input="Refund ORD-alone")
    assert commits.count == 2
    paused = await asyncio.gather(
        *(app.run("safe-agent", input=f"Refund ORD-{i}") for i in range(32))
    )
    assert all(ex.status == "awaiting_approval" for ex in paused)
    # 64 steps (each start, each model turn) in a few transactions, not 64 fsyncs.
    assert commits.count - 2 <= 8, commits.count
    approved = await asyncio.gather(
        *(
            app.signal(ex.id, "approve", request_id=ex.pending_approvals[0].request_id)
            for ex in paused
        )
    )
    assert all(ex.status == "completed" for ex in approved)
    assert commits.count - 2 <= 8 + 12, commits.count  # 96 more steps
    await app.close()


async def test_a_conflict_in_a_group_undoes_only_its_own_step(tmp_path: Path) -> None:
    app = _quiet(tmp_path)
    first, second = await _paused(app, 2)
    rows = _row_counts(_db(tmp_path))
    won, lost, other = await asyncio.gather(
        app.store.commit(_approval(first), expected_seq=first.seq),
        app.store.commit(_approval(first), expected_seq=first.seq),
        app.store.commit(_approval(second), expected_seq=second.seq),
        return_exceptions=True,
    )
    assert isinstance(lost, Conflict) and not isinstance(won, Exception)
    assert not isinstance(other, Exception)
    after = _row_counts(_db(tmp_path))
    # Two steps' rows, not three: one event, one audit record, one tool run each.
    assert after["events"] - rows["events"] == 2
    assert after["audit"] - rows["audit"] == 2
    await app.close()


async def test_a_step_that_breaks_halfway_in_a_group_undoes_only_its_own_rows(
    tmp_path: Path,
) -> None:
    app = _quiet(tmp_path)
    paused = await _paused(app, 3)
    broken = paused[1]
    db = _db(tmp_path)
    # Its audit record cannot be written: the step fails after its event went in.
    db.execute(
        "CREATE TRIGGER no_audit BEFORE INSERT ON audit"
        f" WHEN NEW.execution_id = '{broken.id}' BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    )
    db.commit()
    rows = _row_counts(db)
    outcomes = await asyncio.gather(
        *(app.store.commit(_approval(ex), expected_seq=ex.seq) for ex in paused),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], sqlite3.IntegrityError), outcomes
    assert not isinstance(outcomes[0], Exception) and not isinstance(outcomes[2], Exception)
    after = _row_counts(_db(tmp_path))
    assert after["events"] - rows["events"] == 2
    assert after["audit"] - rows["audit"] == 2
    as_if_restarted(app)
    assert await app.store.load(broken.id) == broken
    await app.close()


async def test_a_lost_lease_in_a_group_undoes_only_its_own_step(tmp_path: Path) -> None:
    app = _quiet(tmp_path)
    paused = await _paused(app, 2)
    rows = _row_counts(_db(tmp_path))
    outcomes = await asyncio.gather(
        app.store.commit(_approval(paused[0]), expected_seq=paused[0].seq),
        app.store.commit(
            _approval(paused[1]), expected_seq=paused[1].seq, done=Claim(10**9, "w-gone")
        ),
        return_exceptions=True,
    )
    assert not isinstance(outcomes[0], Exception) and isinstance(outcomes[1], LeaseLost)
    assert _row_counts(_db(tmp_path))["events"] - rows["events"] == 1
    as_if_restarted(app)
    assert await app.store.load(paused[1].id) == paused[1]
    await app.close()


async def test_a_group_that_cannot_commit_fails_every_step_and_writes_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "approvals.db"
    app = Clearance(SQLiteStore(str(path), busy_timeout_ms=50), clock=FakeClock())
    try:
        paused = await _paused(app, 2)
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            outcomes = await asyncio.gather(
                *(app.store.commit(_approval(ex), expected_seq=ex.seq) for ex in paused),
                return_exceptions=True,
            )
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert all(isinstance(o, sqlite3.OperationalError) for o in outcomes), outcomes
        for ex in paused:
            assert await app.store.load(ex.id) == ex
    finally:
        await app.close()


async def test_a_state_kept_from_a_commit_is_not_used_once_another_process_moved_on(
    tmp_path: Path,
) -> None:
    host = _quiet(tmp_path)
    other = _quiet(tmp_path)
    try:
        (ex,) = await _paused(host, 1)
        assert await host.store.load(ex.id) is ex  # kept from its own commit: no replay
        moved = await other.signal(ex.id, "reject", request_id=ex.pending_approvals[0].request_id)
        loaded = await host.store.load(ex.id)
        assert loaded == moved and loaded is not ex
        fresh = SQLiteStore(str(tmp_path / "approvals.db"))
        try:
            assert await fresh.load(ex.id) == loaded
        finally:
            await fresh.close()
    finally:
        await other.close()
        await host.close()


async def test_two_processes_queueing_in_the_same_microsecond_get_different_work_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Work ids are time-ordered with random low bits; make both draws equal, as two
    # processes queueing at the same instant with the same luck would: the second
    # insert must take the next id, not fail its step.
    from clearance.adapters import sqlite_store

    monkeypatch.setattr(sqlite_store.time, "time_ns", lambda: 1_800_000_000_000_000_000)
    monkeypatch.setattr(sqlite_store.secrets, "randbits", lambda bits: 7)
    path = str(tmp_path / "ids.db")
    first, second = SQLiteStore(path), SQLiteStore(path)
    try:
        now = datetime(2026, 1, 1, tzinfo=UTC)
        hold = ClaimRequest("w1", now + timedelta(seconds=30), 1)
        one, two = Run(agent(), "exec-1"), Run(agent(), "exec-2")
        (a,) = await one.commit(first, one.started(), claim=hold)
        (b,) = await two.commit(second, two.started(), claim=hold)
        assert a.id == 1_800_000_000_000_000 << 10 | 7 and b.id == a.id + 1
        assert await second.complete(a.claim) and await first.complete(b.claim)
    finally:
        await first.close()
        await second.close()


async def test_work_ids_of_an_upgraded_file_stay_and_new_ones_come_after(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v3.db"
    store = SQLiteStore(str(path))
    now = datetime(2026, 1, 1, tzinfo=UTC)
    run = Run(agent(), "exec-1")
    (queued,) = await run.commit(store, run.started())
    await store.close()
    # The file as schema 3 left it: AUTOINCREMENT ids counting from 1.
    db = sqlite3.connect(path, isolation_level=None)
    _timers_of_schema_4(db)
    db.execute("DROP TABLE work")
    db.execute(
        "CREATE TABLE work (id INTEGER PRIMARY KEY AUTOINCREMENT, execution_id TEXT NOT NULL,"
        " agent_tag TEXT NOT NULL, body TEXT NOT NULL, holder TEXT,"
        " lease_until TEXT NOT NULL DEFAULT '')"
    )
    db.execute(
        "INSERT INTO work (id, execution_id, agent_tag, body, holder, lease_until)"
        " VALUES (1, 'exec-1', ?, ?, NULL, '')",
        (run.tag, json.dumps({"type": "call_model", "turn": 1})),
    )
    db.execute("PRAGMA user_version = 3")
    db.close()
    store = SQLiteStore(str(path))
    try:
        assert store._db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        (old,) = await store.claim_work([run.tag], "w1", now, now + timedelta(seconds=30), 9)
        assert old.id == 1 and old.command == queued.command
        other = Run(agent(), "exec-2")
        (new,) = await other.commit(store, other.started())
        assert new.id > old.id
        sql = store._db.execute("SELECT sql FROM sqlite_master WHERE name = 'work'").fetchone()
        assert "AUTOINCREMENT" not in sql[0]
    finally:
        await store.close()


def _timers_of_schema_4(db: sqlite3.Connection) -> None:
    """The timers table as schemas 2 to 4 had it: no hold."""
    db.execute(
        "CREATE TABLE timers_4 (due_at TEXT NOT NULL, request_id TEXT NOT NULL,"
        " execution_id TEXT NOT NULL, PRIMARY KEY (due_at, request_id)) WITHOUT ROWID"
    )
    db.execute("INSERT INTO timers_4 SELECT due_at, request_id, execution_id FROM timers")
    db.execute("DROP TABLE timers")
    db.execute("ALTER TABLE timers_4 RENAME TO timers")


async def test_timers_of_a_schema_4_file_are_kept_and_claimed_after_the_upgrade(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v4.db"
    store = SQLiteStore(str(path))
    run = Run(agent(), "exec-1")
    await run.commit(store, run.started())
    await run.commit(store, run.asks(1, ("tu-1", "refund", "apr-1")))
    await store.close()
    db = sqlite3.connect(path, isolation_level=None)
    _timers_of_schema_4(db)
    db.execute("PRAGMA user_version = 4")
    db.close()
    store = SQLiteStore(str(path))
    try:
        assert store._db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        await check_the_timer_is_kept_and_claimed(store, run)
    finally:
        await store.close()
