"""`clearance prune --older-than 90d`: executions that finished long ago are forgotten,
their audit records keep who decided what and when but drop the payload, and the
audit chain still verifies. Nothing live is touched; the database refuses any other
change to the audit log."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
from conftest import Recorder, define_refund_agent, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from postgres_server import postgres_url
from test_cli import acli
from test_postgres_store import url

from clearance import Clearance, ClearanceError, HumanInLoop
from clearance.core import audit_chain
from clearance.core.commands import AuditRecord
from clearance.core.execution import COMPLETED, STOPPED
from clearance.ports.tools import ToolContext
from clearance.testing import FakeClock

__all__ = ["postgres_url", "url"]  # the fixtures, for pytest

DAY = 24 * 60  # minutes


async def _history(app: Clearance, recorder: Recorder) -> dict[str, Any]:
    """An approved run, a rejected one and a stopped one, then 91 days later a run still
    awaiting approval from the start and a fresh approved one."""
    define_refund_agent(app, recorder, hitl=HumanInLoop(enabled=True, approval_timeout="200d"))
    runs: dict[str, Any] = {}
    ex = await app.run("safe-agent", input="Refund order ORD-1")
    runs["approved"] = await app.decide(
        ex.pending_approvals[0].request_id, approved=True, by="rita", reason="receipt seen"
    )
    ex = await app.run("safe-agent", input="Refund order ORD-2")
    runs["rejected"] = await app.decide(
        ex.pending_approvals[0].request_id, approved=False, by="rita", reason="no receipt"
    )
    ex = await app.run("safe-agent", input="Refund order ORD-3")
    runs["stopped"] = await app.signal(ex.id, "stop", by="rita")
    runs["waiting"] = await app.run("safe-agent", input="Refund order ORD-4")
    assert isinstance(app.clock, FakeClock)
    app.clock.advance(minutes=91 * DAY)
    ex = await app.run("safe-agent", input="Refund order ORD-5")
    runs["recent"] = await app.decide(
        ex.pending_approvals[0].request_id, approved=True, by="rita", reason="fine"
    )
    assert [runs[k].status for k in ("approved", "rejected", "stopped", "recent")] == [
        COMPLETED,
        COMPLETED,
        STOPPED,
        COMPLETED,
    ]
    return runs


async def _approved(app: Clearance, recorder: Recorder, n: int) -> None:
    """`n` refunds run to completion, each approved by rita."""
    define_refund_agent(app, recorder)
    for i in range(n):
        ex = await app.run("safe-agent", input=f"Refund order ORD-{i}")
        await app.decide(ex.pending_approvals[0].request_id, approved=True, by="rita")


async def _prunes_what_finished_long_ago(app: Clearance, recorder: Recorder) -> None:
    runs = await _history(app, recorder)
    old = [runs[k] for k in ("approved", "rejected", "stopped")]
    records_before = await app.audit()
    old_records = [r for r in records_before if r.execution_id in {ex.id for ex in old}]
    assert len(old_records) == 3  # an approval, a rejection, a request cancelled by the stop

    dry = await app.prune("90d", dry_run=True)
    assert (dry.dry_run, dry.executions, dry.audit_pruned) == (True, 3, 3)
    assert await app.audit() == records_before  # a dry run changes nothing

    report = await app.prune(timedelta(days=90))
    assert (report.executions, report.audit_pruned, report.audit_kept, report.busy) == (3, 3, 0, 0)
    for ex in old:
        assert await app.execution(ex.id) is None
        assert await app.request(ex.requests[0].request_id) is None
        assert await app.deliveries(ex.requests[0].request_id) == []
    # Who decided what, and when, stays; what they saw and said is gone but for its hash.
    records = await app.audit()
    assert len(records) == len(records_before)
    for before, after in zip(records_before, records, strict=True):
        if before.execution_id in {ex.id for ex in old}:
            assert after.pruned is not None and after.pruned.at == app.clock.now()
            assert (after.parameters, after.modified_params, after.reason) == ({}, None, None)
            assert audit_chain.entry(after) == audit_chain.entry(before)
            assert (after.decision, after.by, after.at) == (before.decision, before.by, before.at)
        else:
            assert after == before
    verdict = await app.verify_audit()
    assert verdict.intact and verdict.records == len(records), verdict.problem

    # What is still live, or finished within 90 days, is untouched and goes on.
    assert await app.execution(runs["recent"].id) == runs["recent"]
    waiting = runs["waiting"].pending_approvals[0]
    assert [r.request_id for r in await app.pending()] == [waiting.request_id]
    done = await app.decide(waiting.request_id, approved=True, by="rita")
    assert done.status == COMPLETED
    assert len(recorder.ran("process-refund")) == 3  # ORD-1, ORD-5, and now ORD-4

    again = await app.prune("90d")
    assert (again.executions, again.audit_pruned) == (0, 0)
    assert (await app.verify_audit()).intact


async def test_prune_forgets_old_finished_executions_and_keeps_the_chain_on_sqlite(
    tmp_path: Path, recorder: Recorder
) -> None:
    async with Clearance.open(f"sqlite:///{tmp_path / 'a.db'}", clock=FakeClock()) as app:
        await _prunes_what_finished_long_ago(app, recorder)


async def test_prune_forgets_old_finished_executions_and_keeps_the_chain_on_postgresql(
    url: str, recorder: Recorder
) -> None:
    async with Clearance.open(url, clock=FakeClock()) as app:
        await _prunes_what_finished_long_ago(app, recorder)


async def _two_prunes_at_once(url: str, recorder: Recorder) -> None:
    """Two processes prune the same store at the same moment (a cron job on two hosts):
    each execution is forgotten once, by one of them, and counted once."""
    clock = FakeClock()
    async with Clearance.open(url, clock=clock) as app:
        await _approved(app, recorder, 30)
    clock.advance(minutes=2 * DAY)
    async with Clearance.open(url, clock=clock) as one, Clearance.open(url, clock=clock) as two:
        reports = await asyncio.gather(one.prune("1d", page=4), two.prune("1d", page=4))
        assert sum(r.executions for r in reports) == 30, reports
        assert sum(r.audit_pruned for r in reports) == 30, reports
        assert sum(r.busy for r in reports) == 0, reports
        assert await one.store.finished_before(clock.now()) == []
        records = await one.audit()
        assert len(records) == 30 and all(r.pruned is not None for r in records)
        verdict = await two.verify_audit()
        assert verdict.intact and verdict.records == 30, verdict.problem


async def test_two_prunes_at_once_forget_each_execution_once_on_sqlite(
    tmp_path: Path, recorder: Recorder
) -> None:
    await _two_prunes_at_once(f"sqlite:///{tmp_path / 'a.db'}", recorder)


async def test_two_prunes_at_once_forget_each_execution_once_on_postgresql(
    url: str, recorder: Recorder
) -> None:
    await _two_prunes_at_once(url, recorder)


async def test_prune_refuses_what_is_not_a_positive_duration(tmp_path: Path) -> None:
    async with Clearance.open(f"sqlite:///{tmp_path / 'a.db'}", clock=FakeClock()) as app:
        for bad in ("0s", 0, "-5d", "ninety days", float("nan")):
            with pytest.raises(ClearanceError, match="older_than"):
                await app.prune(bad)  # type: ignore[arg-type]


async def test_a_stopped_execution_whose_tool_is_still_running_waits_for_its_outcome(
    tmp_path: Path,
) -> None:
    """A stop overtook a tool run already started: its outcome is still to be recorded,
    so prune leaves the execution until it is, and forgets it at the next prune."""
    release = asyncio.Event()
    started = asyncio.Event()

    class Slow(Recorder):
        async def process_refund(self, ctx: ToolContext, params: dict[str, Any]) -> Any:
            started.set()
            await release.wait()
            return await super().process_refund(ctx, params)

    clock = FakeClock()
    async with Clearance.open(f"sqlite:///{tmp_path / 'a.db'}", clock=clock) as app:
        define_refund_agent(app, Slow())
        ex = await app.run("safe-agent", input="Refund order ORD-1")
        request_id = ex.pending_approvals[0].request_id
        deciding = asyncio.create_task(app.decide(request_id, approved=True, by="rita"))
        await asyncio.wait_for(started.wait(), 10)
        stopped = await app.signal(ex.id, "stop", by="rita")
        assert stopped.status == STOPPED
        clock.advance(minutes=91 * DAY)
        report = await app.prune("90d")
        assert (report.executions, report.busy) == (0, 1)
        assert await app.execution(ex.id) is not None
        release.set()
        await deciding

        async def outcome_recorded() -> bool:
            return await app.with_work("safe-agent") == []

        await wait_for(outcome_recorded)
        recorded = await app.execution(ex.id)
        assert recorded is not None and recorded.calls[0].status == "done"
        assert (await app.prune("90d")).executions == 0  # recording it was activity
        clock.advance(minutes=91 * DAY)
        assert (await app.prune("90d")).executions == 1
        assert await app.execution(ex.id) is None
        assert (await app.verify_audit()).intact


# -- a prune killed at any moment -----------------------------------------------------------

PRUNE_PROCESS = str(Path(__file__).with_name("prune_process.py"))


def _copy(source: Path, target: Path) -> None:
    """`source` as one consistent file at `target` (SQLite's backup: the WAL included)."""
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


async def test_a_prune_killed_at_any_statement_leaves_each_execution_whole_or_forgotten(
    tmp_path: Path, recorder: Recorder
) -> None:
    """SIGKILL before the K-th statement of a prune (inside one of its transactions or
    between two): every execution is then either all there, as it was, with its audit
    payloads, or gone with its payloads dropped; the chain verifies; what was live is
    untouched; and a prune run again finishes the job."""
    pristine = tmp_path / "pristine.db"
    async with Clearance.open(f"sqlite:///{pristine}", clock=FakeClock()) as app:
        await _approved(app, recorder, 24)  # by the real clock, they finished in 2024
        waiting = await app.run("safe-agent", input="Refund order ORD-99")
        before = {ex.id: ex for ex in [await app.execution(i) for i in await _ids(app)] if ex}
        records_before = await app.audit()
    finished = {i for i, ex in before.items() if ex.status == COMPLETED}
    assert len(finished) == 24 and len(records_before) == 24

    async def prune(k: int) -> tuple[Path, str]:
        """A prune of a copy of `pristine`, killed before statement `k` (0: never)."""
        path = tmp_path / f"k{k}.db"
        _copy(pristine, path)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            PRUNE_PROCESS,
            str(path),
            str(k),
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == (0 if k == 0 else -signal.SIGKILL), (k, err.decode())
        return path, out.decode()

    whole, said = await prune(0)
    assert said.startswith("pruned 24\n"), said
    commits = [int(n) for n in said.split("commits")[1].split()]
    assert len(commits) >= 4  # 24 + 1 executions, 7 a page: one transaction each
    # Before each transaction's BEGIN (after the COMMIT before it), just after it, in the
    # middle of its deletions, and just before its COMMIT (every deletion made).
    moments = {1, 2, commits[0] // 2, commits[0], commits[0] + 1, commits[0] + 2}
    moments |= {(commits[1] + commits[2]) // 2, commits[2], commits[2] + 1, commits[3]}
    outcomes: set[str] = set()
    for k in [0, *sorted(moments)]:
        path = whole if k == 0 else (await prune(k))[0]
        async with Clearance.open(f"sqlite:///{path}") as app:
            verdict = await app.verify_audit()
            assert verdict.intact and verdict.records == 24, (k, verdict.problem)
            records = {r.execution_id: r for r in await app.audit()}
            gone = set()
            for execution_id in finished:
                now = await app.execution(execution_id)
                record = records[execution_id]
                if now is None:
                    gone.add(execution_id)
                    assert record.pruned is not None and record.parameters == {}, k
                    assert await app.request(before[execution_id].requests[0].request_id) is None
                else:
                    assert now == before[execution_id], k
                    assert record.pruned is None and record.parameters != {}, k
            assert await app.execution(waiting.id) == before[waiting.id], k
            assert [r.request_id for r in await app.pending()] == [
                waiting.pending_approvals[0].request_id
            ]
            outcomes.add("none" if not gone else "all" if gone == finished else "some")
            again = await app.prune("1d")  # the next prune finishes what the kill cut short
            assert again.executions == len(finished - gone), k
            assert all([await app.execution(i) is None for i in finished]), k
            assert (await app.verify_audit()).intact, k
    # The kills landed before, inside and after the work (the moments are fixed by K).
    assert outcomes == {"none", "some", "all"}, outcomes


async def _ids(app: Clearance) -> list[str]:
    return await app.store.execution_ids(after=None, limit=1000)


# -- the database keeps the audit log append-only but for pruning --------------------------


def _chained_rows(path: Path) -> list[tuple[int, str]]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT id, body FROM audit ORDER BY id").fetchall()
    finally:
        db.close()


def _refused(path: Path, statement: str, *args: Any) -> str:
    db = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.DatabaseError) as refused:
            db.execute(statement, args)
        db.rollback()
        return str(refused.value)
    finally:
        db.close()


async def test_sqlite_refuses_every_other_change_to_the_audit_log(
    tmp_path: Path, recorder: Recorder
) -> None:
    path = tmp_path / "a.db"
    async with Clearance.open(f"sqlite:///{path}", clock=FakeClock()) as app:
        await _approved(app, recorder, 2)
    (first, body), _ = _chained_rows(path)
    data = json.loads(body)
    pruned = json.dumps({**data, "parameters": {}, "pruned": {"at": data["at"]}})
    changed = json.dumps({**data, "by": "mallory"})
    for statement, args in (
        ("UPDATE audit SET body = ? WHERE id = ?", (changed, first)),  # not a pruning
        ("UPDATE audit SET hash = 'x', body = ? WHERE id = ?", (pruned, first)),
        ("UPDATE audit SET entry = 'x', body = ? WHERE id = ?", (pruned, first)),
        ("UPDATE audit SET execution_id = 'x', body = ? WHERE id = ?", (pruned, first)),
        ("UPDATE audit SET id = 99, body = ? WHERE id = ?", (pruned, first)),
        ("DELETE FROM audit WHERE id = ?", (first,)),
    ):
        assert "append-only" in _refused(path, statement, *args)
    # The shape of a pruning gets through the database; what it says is verify's to judge.
    db = sqlite3.connect(path)
    db.execute("UPDATE audit SET body = ? WHERE id = ?", (pruned, first))
    db.commit()
    db.close()
    async with Clearance.open(f"sqlite:///{path}") as app:
        verdict = await app.verify_audit()
        assert (
            not verdict.intact and verdict.row == first and "was changed" in (verdict.problem or "")
        )


async def test_a_pruned_record_whose_kept_hash_is_changed_is_named(
    tmp_path: Path, recorder: Recorder
) -> None:
    path = tmp_path / "a.db"
    clock = FakeClock()
    async with Clearance.open(f"sqlite:///{path}", clock=clock) as app:
        await _approved(app, recorder, 3)
        clock.advance(minutes=2 * DAY)
        assert (await app.prune("1d")).audit_pruned == 3
    row, body = _chained_rows(path)[1]
    data = json.loads(body)
    data["pruned"]["parameters_hash"] = audit_chain.sha256('{"amount":1}')
    db = sqlite3.connect(path)
    db.execute("UPDATE audit SET body = ? WHERE id = ?", (json.dumps(data), row))
    db.commit()
    db.close()
    async with Clearance.open(f"sqlite:///{path}") as app:
        verdict = await app.verify_audit()
        assert not verdict.intact and verdict.row == row and verdict.records == 1


async def test_postgresql_refuses_every_other_change_to_the_audit_log(
    url: str, recorder: Recorder
) -> None:
    async with Clearance.open(url, clock=FakeClock()) as app:
        define_refund_agent(app, recorder)
        ex = await app.run("safe-agent", input="Refund order ORD-1")
        await app.decide(ex.pending_approvals[0].request_id, approved=True, by="rita")
    base, schema = url.split("?schema=")
    async with await psycopg.AsyncConnection.connect(
        base, autocommit=True, options=f"-c search_path={schema}"
    ) as conn:
        cur = await conn.execute("SELECT id, body FROM clearance_audit")
        [(first, body)] = await cur.fetchall()
        data = json.loads(body)
        pruned = json.dumps({**data, "parameters": {}, "pruned": {"at": data["at"]}})
        changed = json.dumps({**data, "by": "mallory"})
        for statement, args in (
            ("UPDATE clearance_audit SET body = %s WHERE id = %s", (changed, first)),
            ("UPDATE clearance_audit SET hash = 'x', body = %s WHERE id = %s", (pruned, first)),
            ("UPDATE clearance_audit SET entry = 'x', body = %s WHERE id = %s", (pruned, first)),
            (
                "UPDATE clearance_audit SET request_id = 'x', body = %s WHERE id = %s",
                (pruned, first),
            ),
            ("DELETE FROM clearance_audit WHERE id = %s", (first,)),
        ):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                await conn.execute(statement, args)  # type: ignore[arg-type]
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            await conn.execute("TRUNCATE clearance_audit")
        await conn.execute("UPDATE clearance_audit SET body = %s WHERE id = %s", (pruned, first))


# -- the record, pure --------------------------------------------------------------------------

payloads = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(
    parameters=st.dictionaries(st.text(max_size=5), payloads, max_size=4),
    modified=st.none() | st.dictionaries(st.text(max_size=5), payloads, max_size=4),
    reason=st.none() | st.text(max_size=20),
)
def test_dropping_a_payload_keeps_the_records_entry(
    parameters: dict[str, Any], modified: dict[str, Any] | None, reason: str | None
) -> None:
    from datetime import UTC, datetime

    at = datetime(2025, 1, 1, tzinfo=UTC)
    record = AuditRecord(
        "apr-1",
        "exec-1",
        "support",
        "refund",
        "approved",
        at,
        parameters,
        "rita",
        modified_params=modified,
        reason=reason,
    )
    pruned = audit_chain.without_payload(record, at + timedelta(days=90))
    assert audit_chain.entry(pruned) == audit_chain.entry(record)
    assert (pruned.parameters, pruned.modified_params, pruned.reason) == ({}, None, None)
    assert audit_chain.without_payload(pruned, at) == pruned  # once pruned, it stays so
    # A payload that was there differs from one that was not, also once pruned.
    other = attrs.evolve(record, parameters={**parameters, "x": 1})
    assert audit_chain.entry(audit_chain.without_payload(other, at)) != audit_chain.entry(pruned)


# -- the CLI ----------------------------------------------------------------------------------


async def test_the_cli_prunes_and_says_what_it_did(tmp_path: Path, recorder: Recorder) -> None:
    path = tmp_path / "a.db"
    # FakeClock starts in 2024: by the real clock these ran long ago.
    async with Clearance.open(f"sqlite:///{path}", clock=FakeClock()) as app:
        await _approved(app, recorder, 2)
        waiting = await app.run("safe-agent", input="Refund order ORD-9")
    db = ["--db", str(path)]
    code, out, err = await acli(tmp_path, *db, "prune", "--older-than", "90d", "--dry-run")
    assert code == 0, err
    assert "would forget 2 execution(s)" in out and "2 audit record(s)" in out
    code, out, err = await acli(tmp_path, *db, "prune", "--older-than", "90d", "--json")
    assert code == 0, err
    said = json.loads(out)
    assert (said["executions"], said["auditPruned"], said["dryRun"]) == (2, 2, False)
    code, out, err = await acli(tmp_path, *db, "audit", "verify")
    assert code == 0 and "intact: 2 chained record(s)" in out, out + err
    code, out, err = await acli(tmp_path, *db, "pending")
    assert code == 0 and waiting.pending_approvals[0].request_id in out
    for bad, says in (
        (["--older-than", "0d"], "above zero"),
        (["--older-than", "soon"], "--older-than"),
        ([], "--older-than"),
    ):
        code, out, err = await acli(tmp_path, *db, "prune", *bad)
        assert code == 2 and says in err and "Traceback" not in err, err


async def test_a_record_changed_outside_clearance_is_left_for_verify_to_name(
    tmp_path: Path, recorder: Recorder
) -> None:
    """An audit body that no longer reads as a record (someone got past the triggers)
    does not stop the prune: it is left as it is and counted, and `verify` names it."""
    path = tmp_path / "a.db"
    clock = FakeClock()
    async with Clearance.open(f"sqlite:///{path}", clock=clock) as app:
        await _approved(app, recorder, 2)
    first, _ = _chained_rows(path)[0]
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("UPDATE audit SET body = 'not a record' WHERE id = ?", (first,))
    db.commit()
    db.close()
    # Listing it says which record and what to run, in one line (it was a traceback).
    code, _, err = await acli(tmp_path, "--db", str(path), "audit")
    assert code == 1 and "Traceback" not in err
    assert f"audit record {first} cannot be read back" in err and "audit verify" in err
    clock.advance(minutes=2 * DAY)
    async with Clearance.open(f"sqlite:///{path}", clock=clock) as app:
        done = await app.prune("1d", dry_run=True)
        assert (done.executions, done.audit_pruned, done.audit_unreadable) == (2, 1, 1)
    # The CLI prunes by the real clock: FakeClock's runs (2024) are long over.
    code, out, err = await acli(tmp_path, "--db", str(path), "prune", "--older-than", "1d")
    assert code == 0 and "Traceback" not in err, err
    assert "forgot 2 execution(s)" in out and "1 audit record(s) no longer read" in out
    async with Clearance.open(f"sqlite:///{path}", clock=clock) as app:
        [_, kept] = await app.audit_chain()
        assert kept.record is not None and kept.record.pruned is not None
        verdict = await app.verify_audit()
        assert not verdict.intact and verdict.row == first
