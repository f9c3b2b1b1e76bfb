"""Restarts, crashes and races across real processes on one SQLite file (guarantees 2-4)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from agent_process import refund_agent
from conftest import wait_for

from clearance import Clearance
from clearance.core.execution import TERMINAL

SCRIPT = str(Path(__file__).with_name("agent_process.py"))


def spawn(db: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, SCRIPT, str(db), *args],
        cwd=db.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def first_line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"process said nothing; stderr: {proc.stderr.read()}")  # type: ignore[union-attr]
    return dict(json.loads(line))


def run(db: Path, *args: str) -> dict[str, Any]:
    proc = spawn(db, *args)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return dict(json.loads(out.splitlines()[-1]))


def lines(db: Path, name: str) -> list[str]:
    path = db.with_suffix(f".{name}")
    return path.read_text().splitlines() if path.exists() else []


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


async def host_until_terminal(db: Path, execution_id: str, **options: Any) -> Any:
    """This process hosts the agent (system clock, fast polling) until the execution ends."""
    async with Clearance.open(f"sqlite:///{db}", poll_interval=0.05) as app:
        refund_agent(app, str(db), timeout_ms=300_000, **options)

        async def finished() -> Any:
            ex = (await app.get_execution(execution_id)).execution
            return ex if ex.status in TERMINAL else None

        return await wait_for(finished)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "approvals.db"


async def test_pending_approval_survives_a_kill_and_is_decided_after_restart(db: Path) -> None:
    host = spawn(db, "pause", "--wait")
    paused = first_line(host)
    assert paused["status"] == "awaiting_approval"
    kill(host)  # no clean shutdown: SIGKILL while paused

    async with Clearance.open(f"sqlite:///{db}", poll_interval=0.05) as app:
        refund_agent(app, str(db), timeout_ms=300_000)
        [req] = await app.pending()
        assert (req.request_id, req.execution_id) == (paused["request_id"], paused["execution_id"])
        ex = await app.signal(req.execution_id, "approve", request_id=req.request_id, by="ops")
        assert ex.status == "completed"
        assert "refunded" in (ex.output or "")
    assert len(lines(db, "tool")) == 1


async def test_decision_from_another_process_is_picked_up_without_restart(db: Path) -> None:
    host = spawn(db, "pause", "--wait")
    paused = first_line(host)
    try:
        # This process does not host the agent: it records the decision and returns.
        async with Clearance.open(f"sqlite:///{db}") as app:
            ex = await app.decide(paused["request_id"], approved=True, by="reviewer")
            assert ex.status == "running"  # the tool run is queued for the host
        assert lines(db, "tool") == []
        done = first_line(host)
        assert done["status"] == "completed"
        assert "refunded" in done["output"]
        assert len(lines(db, "tool")) == 1
        assert host.wait(timeout=10) == 0
    finally:
        if host.poll() is None:
            kill(host)


async def test_rejection_from_another_process_reaches_the_model(db: Path) -> None:
    host = spawn(db, "pause", "--wait")
    paused = first_line(host)
    try:
        result = run(db, "decide", paused["request_id"], "reject")
        assert result["ok"] is True
        done = first_line(host)
        assert done["status"] == "completed"
        assert "approval_rejected" in done["output"]
        assert lines(db, "tool") == []
    finally:
        if host.poll() is None:
            kill(host)


async def test_timer_that_fell_due_while_nothing_ran_fires_on_next_start(db: Path) -> None:
    paused = run(db, "pause", "--timeout-ms", "200", "--exit")
    assert paused["status"] == "awaiting_approval"
    await asyncio.sleep(0.3)  # the deadline passes while no process runs
    ex = await host_until_terminal(db, paused["execution_id"])
    assert ex.status == "completed"
    assert "approval_timeout" in ex.output
    assert lines(db, "tool") == []


@pytest.mark.parametrize("decisions", [["approve"] * 6, ["approve", "reject"] * 3])
async def test_racing_decisions_from_many_processes_leave_exactly_one(
    db: Path, decisions: list[str]
) -> None:
    paused = run(db, "pause", "--exit")
    procs = [
        spawn(db, "decide", paused["request_id"], d, "--by", str(i))
        for i, d in enumerate(decisions)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out.splitlines()[-1]))
    winners = [r for r in results if r["ok"]]
    assert len(winners) == 1, results
    for loser in (r for r in results if not r["ok"]):
        assert "already" in loser["error"] and "stands" in loser["error"]
    async with Clearance.open(f"sqlite:///{db}") as app:
        [record] = await app.audit(execution_id=paused["execution_id"])
    ex = await host_until_terminal(db, paused["execution_id"])
    assert ex.status == "completed"
    assert len(lines(db, "tool")) == (1 if record.decision == "approved" else 0)


async def test_racing_timer_sweeps_from_many_processes_fire_once(db: Path) -> None:
    paused = run(
        db, "pause", "--exit", "--timeout-ms", "60000", "--fake-now", "2024-01-15T10:30:00+00:00"
    )
    procs = [spawn(db, "fire", "2024-01-15T10:32:00+00:00") for _ in range(4)]
    fired = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        fired.append(json.loads(out.splitlines()[-1])["fired"])
    assert sum(fired) == 1, fired
    async with Clearance.open(f"sqlite:///{db}") as app:
        records = await app.audit(execution_id=paused["execution_id"])
        assert [r.decision for r in records] == ["timed_out"]


async def test_crash_during_a_tool_run_never_runs_it_again(db: Path) -> None:
    host = spawn(db, "pause", "--wait", "--slow-tool")
    paused = first_line(host)
    try:
        run(db, "decide", paused["request_id"], "approve")
        await wait_for(lambda: lines(db, "tool"))  # the handler has started...
    finally:
        kill(host)  # ...and the process dies inside it
    ex = await host_until_terminal(db, paused["execution_id"])
    assert ex.status == "completed"
    assert len(lines(db, "tool")) == 1  # not re-run: at most once
    assert "may or may not have taken effect" in ex.output
    assert paused["request_id"] in ex.output  # the idempotency key, to check by hand


async def test_crash_during_a_model_call_reissues_it(db: Path) -> None:
    host = spawn(db, "pause", "--wait", "--slow-model")
    await wait_for(lambda: lines(db, "model"))
    kill(host)
    [started] = lines(db, "model")
    execution_id = started.split()[0]
    async with Clearance.open(f"sqlite:///{db}", poll_interval=0.05) as app:
        refund_agent(app, str(db), timeout_ms=300_000)

        async def paused() -> Any:
            ex = (await app.get_execution(execution_id)).execution
            return ex if ex.status == "awaiting_approval" else None

        ex = await wait_for(paused)
        assert len(lines(db, "model")) == 2  # the interrupted call, issued again
        ex = await app.signal(ex.id, "approve", request_id=ex.pending_approvals[0].request_id)
        assert ex.status == "completed"
    assert len(lines(db, "tool")) == 1
