"""The PostgreSQL store beyond the contract: opening by URL, the schema it keeps, the
audit log the database itself keeps append-only, two processes on one database."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shlex
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Recorder, check_the_timer_is_kept_and_claimed, define_refund_agent
from postgres_server import OwnServer, own_postgres, postgres_url
from psycopg import sql
from test_cli import acli

from clearance import Clearance, ClearanceError
from clearance.adapters.postgres_store import SCHEMA_VERSION, PostgresStore
from clearance.ports.store import ClaimRequest
from clearance.testing.contract.store import Run, agent

__all__ = ["own_postgres", "postgres_url"]  # the fixtures, for pytest


@pytest.fixture
async def url(postgres_url: str) -> AsyncIterator[str]:
    """A store URL on a schema of this test's own, dropped after it."""
    schema = f"s_{secrets.token_hex(6)}"
    yield f"{postgres_url}?schema={schema}"
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
        )


def _plain(url: str) -> tuple[str, str]:
    base, schema = url.split("?schema=")
    return base, schema


async def test_a_run_pauses_and_completes_on_postgresql_opened_by_url(url: str) -> None:
    recorder = Recorder()
    async with Clearance.open(url) as app:
        assert isinstance(app.store, PostgresStore)
        define_refund_agent(app, recorder)
        ex = await app.run("safe-agent", input="Refund order ORD-123")
        assert ex.status == "awaiting_approval" and recorder.ran("process-refund") == []
        request = ex.pending_approvals[0]
        ex = await app.signal(ex.id, "approve", request_id=request.request_id, by="lee")
        assert ex.status == "completed"
        assert len(recorder.ran("process-refund")) == 1
        (record,) = await app.store.audit(ex.id)
        assert (record.request_id, record.decision, record.by) == (
            request.request_id,
            "approved",
            "lee",
        )
    # postgres:// is the same store
    async with Clearance.open(url.replace("postgresql://", "postgres://", 1)) as again:
        assert (await again.execution(ex.id)) == ex


async def test_a_decision_in_another_process_starts_the_tool_on_the_host(url: str) -> None:
    recorder = Recorder()
    async with Clearance.open(url, poll_interval=30) as host, Clearance.open(url) as reviewer:
        define_refund_agent(host, recorder)
        ex = await host.run("safe-agent", input="Refund order ORD-123")
        request = ex.pending_approvals[0]
        # The reviewer does not host the agent: its approval queues the tool run, and
        # the host hears of it by NOTIFY (its poll is 30 s away).
        await reviewer.signal(ex.id, "approve", request_id=request.request_id, by="kim")
        for _ in range(500):
            if recorder.ran("process-refund"):
                break
            await asyncio.sleep(0.01)
        assert len(recorder.ran("process-refund")) == 1


async def test_the_audit_log_is_append_only_in_the_database(url: str) -> None:
    recorder = Recorder()
    async with Clearance.open(url) as app:
        define_refund_agent(app, recorder)
        ex = await app.run("safe-agent", input="Refund order ORD-123")
        await app.signal(ex.id, "reject", request_id=ex.pending_approvals[0].request_id)
        before = await app.store.audit(ex.id)
    base, schema = _plain(url)
    async with await psycopg.AsyncConnection.connect(
        base, autocommit=True, options=f"-c search_path={schema}"
    ) as conn:
        for statement in (
            "UPDATE clearance_audit SET body = '{}'",
            "DELETE FROM clearance_audit",
            "TRUNCATE clearance_audit",
            # An upsert that would rewrite a record goes through the UPDATE trigger too.
            "INSERT INTO clearance_audit (id, request_id, execution_id, body)"
            " OVERRIDING SYSTEM VALUE SELECT id, request_id, execution_id, '{}'"
            " FROM clearance_audit ON CONFLICT (id) DO UPDATE SET body = excluded.body",
        ):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                await conn.execute(statement)
    async with Clearance.open(url) as app:
        assert await app.store.audit(ex.id) == before


async def test_tables_of_another_schema_version_are_refused_untouched(url: str) -> None:
    store = PostgresStore(url)
    await store.open()
    await store.close()
    base, schema = _plain(url)
    async with await psycopg.AsyncConnection.connect(
        base, autocommit=True, options=f"-c search_path={schema}"
    ) as conn:
        await conn.execute("UPDATE clearance_schema SET version = 99")
        with pytest.raises(
            ClearanceError, match=rf"schema version 99.*reads PostgreSQL schema {SCHEMA_VERSION}"
        ):
            await PostgresStore(url).open()
        cur = await conn.execute("SELECT version FROM clearance_schema")
        assert await cur.fetchall() == [(99,)]


async def test_tables_of_schema_1_are_upgraded_keeping_their_timers_and_requests(url: str) -> None:
    store = PostgresStore(url)
    run = Run(agent(), "exec-1")
    await run.commit(store, run.started())
    await run.commit(store, run.asks(1, ("tu-1", "refund", "apr-1")))
    await store.close()
    base, schema = _plain(url)
    async with await psycopg.AsyncConnection.connect(
        base, autocommit=True, options=f"-c search_path={schema}"
    ) as conn:
        await conn.execute("ALTER TABLE clearance_timers DROP COLUMN held_until")
        await conn.execute("DROP TABLE clearance_agent_definitions")
        await conn.execute(
            'ALTER TABLE clearance_approvals ALTER COLUMN request_id TYPE TEXT COLLATE "default"'
        )
        await conn.execute("UPDATE clearance_schema SET version = 1")
        store = PostgresStore(url)
        try:
            await check_the_timer_is_kept_and_claimed(store, run)
        finally:
            await store.close()
        cur = await conn.execute("SELECT version FROM clearance_schema")
        assert await cur.fetchall() == [(SCHEMA_VERSION,)]
        cur = await conn.execute(
            "SELECT collation_name FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = 'clearance_approvals'"
            " AND column_name = 'request_id'",
            (schema,),
        )
        assert await cur.fetchall() == [("C",)]


async def test_a_server_that_does_not_answer_is_a_clear_error() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/nowhere", connect_timeout=1)
    where = r"127\.0\.0\.1:1/nowhere"
    with pytest.raises(ClearanceError, match=rf"cannot connect to PostgreSQL at {where}"):
        await store.open()


def test_a_bad_schema_name_is_refused() -> None:
    with pytest.raises(ClearanceError, match="letters, digits and _"):
        PostgresStore("postgresql://127.0.0.1/db?schema=x;drop")


def test_store_schemes_come_from_entry_points() -> None:
    with pytest.raises(ClearanceError, match=r"'redis://'; accepted: memory://, postgres://"):
        Clearance.open("redis://localhost")


async def test_a_kept_state_pushed_out_of_the_cache_while_its_load_awaited_still_loads(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by 4 workers with 125 executions each: a load found the state it kept, then
    # awaited the database while other steps filled the cache; it failed with KeyError.
    recorder = Recorder()
    async with Clearance.open(url) as app:
        define_refund_agent(app, recorder)
        ex = await app.run("safe-agent", input="Refund order ORD-123")
        store = app.store
        assert isinstance(store, PostgresStore)
        connection = store._conn

        class Crowded:
            """A connection during whose queries 256 other executions move on."""

            def __init__(self, conn: Any) -> None:
                self.conn = conn

            async def execute(self, query: str, *args: Any) -> Any:
                store._states.clear()
                return await self.conn.execute(query, *args)

            def __getattr__(self, name: str) -> Any:
                return getattr(self.conn, name)

        @contextlib.asynccontextmanager
        async def crowded() -> AsyncIterator[Any]:
            async with connection() as conn:
                yield Crowded(conn)

        monkeypatch.setattr(store, "_conn", crowded)
        assert await store.load(ex.id) == ex


async def test_connections_killed_mid_flight_cost_retries_not_data_or_double_runs(
    url: str,
) -> None:
    # What a failover or a restarted server does to a worker: every connection it
    # holds (the pool's and the one listening for NOTIFY) dies mid-step.
    recorder = Recorder()
    base, _ = _plain(url)
    async with (
        Clearance.open(url) as app,
        await psycopg.AsyncConnection.connect(base, autocommit=True) as admin,
    ):
        define_refund_agent(app, recorder)
        paused = await asyncio.gather(
            *(app.run("safe-agent", input=f"Refund order ORD-{n}") for n in range(20))
        )

        async def kill_every_connection(times: int) -> int:
            killed = 0
            for _ in range(times):
                cur = await admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                killed += (await cur.fetchone() or (0,))[0]
                await asyncio.sleep(0.005)
            return killed

        decided = [
            app.signal(ex.id, "approve", request_id=ex.pending_approvals[0].request_id)
            for ex in paused
        ]
        *done, killed = await asyncio.gather(*decided, kill_every_connection(20))
        assert killed > 0
        assert [ex.status for ex in done] == ["completed"] * 20
        keys = [ctx.idempotency_key for name, ctx, _ in recorder.calls if name == "process-refund"]
        assert len(keys) == len(set(keys)) == 20
        assert len(await app.store.audit()) == 20


async def test_a_restarted_server_costs_retries_not_data_or_double_runs(
    own_postgres: OwnServer,
) -> None:
    recorder = Recorder()
    async with Clearance.open(own_postgres.url) as app:
        define_refund_agent(app, recorder)
        paused = await asyncio.gather(
            *(app.run("safe-agent", input=f"Refund order ORD-{n}") for n in range(20))
        )
        started = await _postmaster_start(own_postgres.url)
        # Down (sessions cut off) before the decisions, up again while they retry.
        await asyncio.to_thread(own_postgres.stop, "fast")
        decided = asyncio.gather(
            *(
                app.signal(ex.id, "approve", request_id=ex.pending_approvals[0].request_id)
                for ex in paused
            )
        )
        await asyncio.sleep(0.5)
        assert not decided.done()
        await asyncio.to_thread(own_postgres.start)
        done = await decided
        assert await _postmaster_start(own_postgres.url) > started
        assert [ex.status for ex in done] == ["completed"] * 20
        keys = [ctx.idempotency_key for name, ctx, _ in recorder.calls if name == "process-refund"]
        assert len(keys) == len(set(keys)) == 20
        assert len(await app.store.audit()) == 20


async def _postmaster_start(url: str) -> datetime:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT pg_postmaster_start_time()")
        (at,) = await cur.fetchone() or (None,)
        assert isinstance(at, datetime)
        return at


async def test_the_cli_decides_on_postgresql_and_never_prints_the_urls_credentials(
    url: str, tmp_path: Path
) -> None:
    recorder = Recorder()
    # Trust auth ignores the password; given in the address and as a parameter.
    secret_url = url.replace("postgresql://postgres@", "postgresql://postgres:hunter2@", 1)
    secret_url += "&password=hunter2"
    # What messages show: the same store, without user or password.
    same_store = url.replace("postgresql://postgres@", "postgresql://", 1)
    said: list[str] = []
    async with Clearance.open(url, poll_interval=30) as host:
        define_refund_agent(host, recorder)
        ex = await host.run("safe-agent", input="Refund order ORD-123")
        request_id = ex.pending_approvals[0].request_id
        code, out, err = await acli(tmp_path, "pending", "--db", secret_url)
        said += [out, err]
        assert code == 0, err
        assert request_id in out
        code, out, err = await acli(tmp_path, "approve", request_id, "--db", secret_url)
        said += [out, err]
        assert code == 0, err
        # The command it suggests names the same store.
        assert f"--db {shlex.quote(same_store)})" in out
        for _ in range(500):  # the host hears of it by NOTIFY: its poll is 30 s away
            if recorder.ran("process-refund"):
                break
            await asyncio.sleep(0.01)
        assert len(recorder.ran("process-refund")) == 1
        code, out, err = await acli(tmp_path, "pending", "--db", secret_url)
        said += [out, err]
        assert code == 0 and f"No pending approval requests in {same_store}." in out
        code, out, err = await acli(tmp_path, "audit", "--db", secret_url)
        said += [out, err]
        assert code == 0 and request_id in out
    for text in said:
        assert "hunter2" not in text and "postgres@" not in text


async def test_leases_are_judged_by_the_database_clock_not_by_a_skewed_host(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lease = timedelta(seconds=30)

    async def store_on_a_clock(skew: timedelta) -> PostgresStore:
        store = PostgresStore(url)
        monkeypatch.setattr(store, "_local_now", lambda: datetime.now(UTC) + skew)
        await store.open()
        return store

    live = await store_on_a_clock(timedelta(0))
    ahead = await store_on_a_clock(timedelta(hours=1))
    behind = await store_on_a_clock(-timedelta(hours=1))
    try:
        now = datetime.now(UTC)
        held, lapsing = Run(agent(), "exec-held"), Run(agent(), "exec-lapsing")
        await held.commit(live, held.started(), claim=ClaimRequest("w1", now + lease, 1))
        short = ClaimRequest("w1", now + timedelta(seconds=0.2), 1)
        (lapsed,) = await lapsing.commit(live, lapsing.started(), claim=short)
        # A host an hour ahead passes its own `now`: no live lease has run out for it.
        skewed = datetime.now(UTC) + timedelta(hours=1)
        assert await ahead.claim_work([held.tag], "w2", skewed, skewed + lease, 9) == []
        await asyncio.sleep(0.4)
        # A host an hour behind still takes over the lease that ran out, and only that.
        skewed = datetime.now(UTC) - timedelta(hours=1)
        taken = await behind.claim_work([held.tag], "w3", skewed, skewed + lease, 9)
        assert [(w.id, w.previous_holder) for w in taken] == [(lapsed.id, "w1")]
        # ...holding it for a lease on the database's clock, not one that ended an hour
        # ago: a host with the right time does not find it lapsed.
        now = datetime.now(UTC)
        assert await live.claim_work([held.tag], "w4", now, now + lease, 9) == []
    finally:
        for store in (live, ahead, behind):
            await store.close()
