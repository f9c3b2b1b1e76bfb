"""The runtime under pressure: stops racing approvals, slow tools, broken results and
stores, unreadable executions. Each test here reproduces a defect of the pid-based,
one-at-a-time runtime and failed on it."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    REFUND,
    REFUND_PARAMS,
    Recorder,
    as_if_restarted,
    define_refund_agent,
    wait_for,
)

from clearance import Clearance, HumanInLoop, ModelReply, Tool, ToolContext
from clearance.engine import Engine
from clearance.testing import FakeClock, ScriptedModel, SequentialIds, text, tool_use


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'approvals.db'}"


def _define_refund(app: Clearance, model: Any, handler: Any, **hitl: Any) -> None:
    """'safe-agent' with the gated refund tool run by `handler`."""
    tool = Tool(
        tag="process-refund", requires_confirmation=True, parameters=REFUND_PARAMS, handler=handler
    )
    app.define(
        tag="safe-agent", model=model, tools=[tool], human_in_loop=HumanInLoop(enabled=True, **hitl)
    )


def _events(history: Any) -> list[str]:
    return [type(e).TAG for e in history.events]


# -- 1. a stop stops ------------------------------------------------------------------


async def test_a_stop_after_an_approval_made_elsewhere_cancels_the_queued_tool_run(
    tmp_path: Path,
) -> None:
    clock, recorder = FakeClock(), Recorder()
    host = Clearance.open(_url(tmp_path), clock=clock, ids=SequentialIds("h"))
    reviewer = Clearance.open(_url(tmp_path), clock=clock, ids=SequentialIds("r"))
    try:
        define_refund_agent(host, recorder)
        ex = await host.run("safe-agent", input="Refund ORD-123")
        request = ex.pending_approvals[0]
        # Approved and stopped from a process that does not host the agent, before the
        # host looked: the approved run was queued, and the stop must cancel it.
        await reviewer.signal(ex.id, "approve", request_id=request.request_id, by="ops")
        stopped = await reviewer.signal(ex.id, "stop", by="ops", reason="wrong customer")
        assert stopped.status == "stopped"
        assert await host.engine.pickup() == 0
        await asyncio.sleep(0.05)
        assert recorder.ran("process-refund") == []
        history = await host.get_execution(ex.id)
        assert history.status == "stopped"
        assert _events(history)[-3:] == ["approved", "stop_requested", "tool_failed"]
        # The approved call is closed in the history as never run, not left executing.
        assert "not run: the execution was stopped" in history.events[-1].error
        assert [c.status for c in history.execution.calls] == ["done"]
    finally:
        await reviewer.close()
        await host.close()


async def test_a_stop_in_the_hosting_process_closes_each_queued_run_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release, started = asyncio.Event(), asyncio.Event()
    runs: list[dict[str, Any]] = []

    async def refund(ctx: ToolContext, params: dict[str, Any]) -> str:
        runs.append(params)
        started.set()
        await release.wait()
        return "refunded"

    closings: list[str] = []
    outcome = Engine._outcome

    async def counted(self: Engine, ex: Any, work: Any) -> Any:
        if work.cancelled:
            closings.append(work.command.tool_use_id)
        return await outcome(self, ex, work)

    monkeypatch.setattr(Engine, "_outcome", counted)
    other = {**REFUND, "orderId": "ORD-456"}
    model = ScriptedModel(
        [
            [
                tool_use("process-refund", REFUND, id="t1"),
                tool_use("process-refund", other, id="t2"),
            ],
            [text("Done.")],
        ]
    )
    # One slot: the first approved refund runs (and waits); the second waits in the queue.
    async with Clearance.open(_url(tmp_path), clock=FakeClock(), max_concurrency=1) as app:
        _define_refund(app, model, refund, approval_order="parallel")
        ex = await app.run("safe-agent", input="Two refunds")
        first, second = ex.pending_approvals
        # (An approval's caller waits for the execution to rest: not while t1 runs.)
        approving = [asyncio.create_task(app.signal(ex.id, "approve", request_id=first.request_id))]
        await asyncio.wait_for(started.wait(), 10)
        approving.append(
            asyncio.create_task(app.signal(ex.id, "approve", request_id=second.request_id))
        )
        await wait_for(lambda: _approved(app, ex.id, 2))
        stopped = await app.signal(ex.id, "stop", by="ops")
        assert stopped.status == "stopped"
        assert [c.status for c in stopped.calls] == ["executing", "done"]
        release.set()
        await asyncio.wait_for(asyncio.gather(*approving), 10)
        history = await wait_for(lambda: _has_event(app, ex.id, "tool_finished"), seconds=10)
        await asyncio.sleep(0.05)
        assert closings == ["t2"]  # closed once, by the stop; never handed to a task too
        assert runs == [REFUND]
        assert _events(history).count("tool_failed") == 1


async def _approved(app: Clearance, execution_id: str, n: int) -> bool:
    history = await app.get_execution(execution_id)
    return _events(history).count("approved") == n


class _ResultsFail:
    """A store on which no tool result can be committed (a full disk, say)."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def commit(self, writes: Any, **kwargs: Any) -> Any:
        if writes.event.TAG in ("tool_failed", "tool_finished"):
            raise sqlite3.OperationalError("database or disk is full")
        return await self._store.commit(writes, **kwargs)


async def test_a_stopped_run_whose_closing_cannot_be_recorded_is_closed_by_another_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("clearance.engine._RECORD_BACKOFF", 0.001)
    clock, recorder = FakeClock(), Recorder()
    host = Clearance.open(_url(tmp_path), clock=clock, ids=SequentialIds("h"))
    reviewer = Clearance.open(
        _url(tmp_path), clock=clock, ids=SequentialIds("r"), lease=0.3, renew_every=0.1
    )
    try:
        define_refund_agent(host, recorder)
        ex = await host.run("safe-agent", input="Refund ORD-123")
        request = ex.pending_approvals[0]
        await reviewer.signal(ex.id, "approve", request_id=request.request_id, by="ops")
        reviewer.engine.store = _ResultsFail(reviewer.store)  # type: ignore[assignment]
        # The stop commits; closing the cancelled run as never run cannot be recorded.
        stopped = await reviewer.signal(ex.id, "stop", by="ops")
        assert stopped.status == "stopped"
        assert [c.status for c in stopped.calls] == ["executing"]
        # Its lease lapses and the host takes it over: closed, still never run.
        history = await wait_for(lambda: _closed(host, ex.id), seconds=10)
        assert "not run: the execution was stopped" in history.events[-1].error
        assert recorder.ran("process-refund") == []
    finally:
        await reviewer.close()
        await host.close()


async def _closed(app: Clearance, execution_id: str) -> Any:
    await app.engine.pickup()
    history = await app.get_execution(execution_id)
    return history if _events(history)[-1] == "tool_failed" else None


async def test_a_tool_running_at_the_stop_has_its_outcome_recorded_and_not_sent_on(
    tmp_path: Path,
) -> None:
    release = asyncio.Event()
    started = asyncio.Event()
    runs: list[dict[str, Any]] = []

    async def slow_refund(ctx: ToolContext, params: dict[str, Any]) -> dict[str, Any]:
        started.set()
        await release.wait()
        runs.append(params)
        return {"refunded": params["amount"]}

    model = ScriptedModel([[tool_use("process-refund", REFUND)], [text("Done.")]])
    async with Clearance.open(_url(tmp_path), clock=FakeClock(), ids=SequentialIds()) as app:
        _define_refund(app, model, slow_refund)
        ex = await app.run("safe-agent", input="Refund")
        rid = ex.pending_approvals[0].request_id
        approving = asyncio.create_task(app.signal(ex.id, "approve", request_id=rid))
        await asyncio.wait_for(started.wait(), 10)
        stopped = await app.signal(ex.id, "stop", reason="changed my mind")
        assert stopped.status == "stopped"
        release.set()
        await asyncio.wait_for(approving, 10)
        history = await wait_for(lambda: _has_event(app, ex.id, "tool_finished"), seconds=10)
        assert runs == [REFUND]
        assert history.status == "stopped"
        assert _events(history)[-2:] == ["stop_requested", "tool_finished"]
        assert len(model.requests) == 1  # the model was not called after the stop


async def _has_event(app: Clearance, execution_id: str, tag: str) -> Any:
    history = await app.get_execution(execution_id)
    return history if tag in _events(history) else None


# -- 3. one slow tool freezes nothing else -------------------------------------------------


async def test_a_slow_tool_delays_neither_other_executions_nor_timeouts(tmp_path: Path) -> None:
    release = asyncio.Event()
    ran: list[str] = []

    async def refund(ctx: ToolContext, params: dict[str, Any]) -> str:
        if params["orderId"] == "SLOW":
            await release.wait()
        ran.append(params["orderId"])
        return "ok"

    def script(request: Any) -> list[dict[str, Any]]:
        if len(request.messages) > 1:
            return [text("Done.")]
        order = request.messages[0]["content"]
        return [tool_use("process-refund", {**REFUND, "orderId": order})]

    tools = [
        Tool(
            tag="process-refund",
            requires_confirmation=True,
            parameters=REFUND_PARAMS,
            handler=refund,
        )
    ]
    hitl = HumanInLoop(enabled=True, approval_timeout=60_000)
    reviewer = Clearance.open(_url(tmp_path), ids=SequentialIds("r"))
    async with Clearance.open(_url(tmp_path), ids=SequentialIds("h"), poll_interval=0.05) as host:
        host.define(tag="a", model=ScriptedModel(script), tools=tools, human_in_loop=hitl)
        host.define(
            tag="short",
            model=ScriptedModel(script),
            tools=tools,
            human_in_loop=HumanInLoop(enabled=True, approval_timeout=300),
        )
        slow = await host.run("a", input="SLOW")
        fast = await host.run("a", input="FAST")
        timing_out = await host.run("short", input="NEVER")
        try:
            # Decided elsewhere, so the host's background picks both up; the slow one first.
            await reviewer.decide(slow.pending_approvals[0].request_id, approved=True)
            await wait_for(lambda: _status(host, slow.id, "running"))
            await asyncio.sleep(0.1)
            await reviewer.decide(fast.pending_approvals[0].request_id, approved=True)
            await wait_for(lambda: _status(host, fast.id, "completed"), seconds=10)
            await wait_for(lambda: _status(host, timing_out.id, "completed"), seconds=10)
            assert ran == ["FAST"]
            (record,) = await host.audit(execution_id=timing_out.id)
            assert record.decision == "timed_out"
        finally:
            release.set()
            await reviewer.close()
        await wait_for(lambda: _status(host, slow.id, "completed"), seconds=10)
        assert sorted(ran) == ["FAST", "SLOW"]


async def _status(app: Clearance, execution_id: str, status: str) -> bool:
    return (await app.get_execution(execution_id)).status == status


async def test_a_busy_host_claims_only_what_it_can_start_and_leaves_the_rest_to_others(
    tmp_path: Path,
) -> None:
    release = asyncio.Event()
    ran_by: list[tuple[str, str]] = []

    def tools(name: str) -> list[Tool]:
        async def refund(ctx: ToolContext, params: dict[str, Any]) -> str:
            if name == "busy":
                await release.wait()
            ran_by.append((name, params["orderId"]))
            return "ok"

        return [
            Tool(
                tag="process-refund",
                requires_confirmation=True,
                parameters=REFUND_PARAMS,
                handler=refund,
            )
        ]

    script = [[tool_use("process-refund", REFUND)], [text("Done.")]]
    reviewer = Clearance.open(_url(tmp_path), ids=SequentialIds("r"))
    busy = Clearance.open(_url(tmp_path), ids=SequentialIds("b"), max_concurrency=1)
    idle = Clearance.open(_url(tmp_path), ids=SequentialIds("i"))
    try:
        for app, name in ((busy, "busy"), (idle, "idle")):
            hitl = HumanInLoop(enabled=True)
            app.define(tag="a", model=ScriptedModel(script), tools=tools(name), human_in_loop=hitl)
        first = await busy.run("a", input="1")
        second = await busy.run("a", input="2")
        for ex in (first, second):
            await reviewer.decide(ex.pending_approvals[0].request_id, approved=True)
        # The busy host has one slot: it takes one unit and leaves the other queued.
        assert await busy.engine.pickup() == 1
        assert await busy.engine.pickup() == 0
        assert await idle.engine.pickup() == 1
        await wait_for(lambda: ("idle", REFUND["orderId"]) in ran_by)
        assert [who for who, _ in ran_by] == ["idle"]
        release.set()
        await wait_for(lambda: len(ran_by) == 2)
        assert sorted(who for who, _ in ran_by) == ["busy", "idle"]
    finally:
        release.set()
        for app in (reviewer, busy, idle):
            await app.close()


async def test_units_at_work_never_exceed_max_concurrency(tmp_path: Path) -> None:
    active, peak = 0, 0

    async def working() -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.01)
        active -= 1

    script = ScriptedModel(
        lambda r: [text("Done.")] if len(r.messages) > 1 else [tool_use("lookup", {"q": "x"})]
    )

    class Slow:
        async def reply(self, request: Any) -> Any:
            await working()
            return await script.reply(request)

    async def lookup(ctx: ToolContext, params: dict[str, Any]) -> str:
        await working()
        return "found"

    async with Clearance.open(_url(tmp_path), max_concurrency=2) as app:
        app.define(
            tag="a",
            model=Slow(),
            tools=[Tool(tag="lookup", parameters={"q": {"type": "string"}}, handler=lookup)],
        )
        done = await asyncio.gather(*(app.run("a", input=str(i)) for i in range(8)))
    assert [ex.status for ex in done] == ["completed"] * 8
    assert peak == 2  # both slots used, never a third unit at once


# -- 5. a failure after a claim never strands an execution --------------------------------


class _Odd:
    pass


def _circular() -> Any:
    loop: list[Any] = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize(
    ("result", "why"),
    [
        ("bad \ud800 text", "lone surrogate"),
        (_circular(), "circular"),
        ({(1, 2): "tuple key"}, "key (1, 2)"),
        ({"amount": float("nan")}, "nan"),
    ],
    ids=["lone-surrogate", "circular", "tuple-key", "nan"],
)
async def test_a_tool_result_that_is_not_json_fails_the_call_and_the_run_goes_on(
    app: Clearance, result: Any, why: str
) -> None:
    model = ScriptedModel([[tool_use("lookup", {})], [text("Done.")]])
    app.define(tag="a", model=model, tools=[Tool(tag="lookup", handler=lambda ctx, p: result)])
    ex = await app.run("a", input="go")
    assert ex.status == "completed"
    tool_result = model.requests[1].messages[-1]["content"][0]
    assert tool_result["is_error"] is True
    assert "ran, but its result cannot be recorded" in tool_result["content"]
    assert why in tool_result["content"]


class _Garbage:
    def __init__(self, reply: Any) -> None:
        self.reply_value = reply

    async def reply(self, request: Any) -> Any:
        return self.reply_value


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (ModelReply(content=None), "must be a list of content blocks"),  # type: ignore[arg-type]
        (ModelReply(content=["just text"]), "could not be used"),  # type: ignore[list-item]
        (ModelReply(content=[{"type": "text", "text": _Odd()}]), "not JSON"),
        (ModelReply(content=[], stop_reason=None), "stop_reason"),  # type: ignore[arg-type]
        (object(), "must be a list of content blocks"),
    ],
    ids=["content-none", "non-dict-block", "non-json-value", "no-stop-reason", "not-a-reply"],
)
async def test_a_garbage_model_reply_fails_the_execution_instead_of_stranding_it(
    app: Clearance, reply: Any, why: str
) -> None:
    app.define(tag="a", model=_Garbage(reply))
    ex = await app.run("a", input="go")
    assert ex.status == "failed"
    assert why in (ex.error or "")


async def test_a_tuple_in_a_model_reply_reads_back_as_the_same_state(app: Clearance) -> None:
    seen: list[Any] = []
    use = {"type": "tool_use", "id": "t1", "name": "lookup", "input": {"ids": (1, 2)}}
    app.define(
        tag="a",
        model=ScriptedModel(lambda r: [text("Done.")] if len(r.messages) > 1 else [use]),
        tools=[
            Tool(
                tag="lookup",
                parameters={"ids": {"type": "array"}},
                handler=lambda ctx, p: seen.append(p) or "ok",
            )
        ],
    )
    ex = await app.run("a", input="go")
    assert ex.status == "completed"
    assert seen == [{"ids": [1, 2]}]
    assert (await app.get_execution(ex.id)).execution == ex


class _FlakyCommits:
    """A store whose next `failures` commits fail as SQLite does when it is locked or full."""

    def __init__(self, store: Any, failures: int, message: str) -> None:
        self._store = store
        self.failures = failures
        self.message = message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def commit(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise sqlite3.OperationalError(self.message)
        return await self._store.commit(*args, **kwargs)


async def _refund_with_flaky_result_commits(
    tmp_path: Path, failures: int, message: str, **options: Any
) -> tuple[Clearance, Any, list[dict[str, Any]]]:
    """Pause a refund, approve it, and make the commits of its result fail `failures`
    times: the refund itself ran by then."""
    gate = asyncio.Event()
    runs: list[dict[str, Any]] = []

    async def refund(ctx: ToolContext, params: dict[str, Any]) -> str:
        runs.append(params)
        await gate.wait()
        return "refunded"

    app = Clearance.open(_url(tmp_path), clock=FakeClock(), ids=SequentialIds(), **options)
    app.define(
        tag="safe-agent",
        model=ScriptedModel([[tool_use("process-refund", REFUND)], [text("Done.")]]),
        tools=[
            Tool(
                tag="process-refund",
                requires_confirmation=True,
                parameters=REFUND_PARAMS,
                handler=refund,
            )
        ],
        human_in_loop=HumanInLoop(enabled=True),
    )
    ex = await app.run("safe-agent", input="Refund ORD-123")
    rid = ex.pending_approvals[0].request_id
    approving = asyncio.create_task(app.signal(ex.id, "approve", request_id=rid))
    await wait_for(lambda: runs)
    app.engine.store = _FlakyCommits(app.store, failures, message)  # type: ignore[assignment]
    gate.set()
    return app, approving, runs


async def test_a_locked_database_while_recording_a_result_is_retried(tmp_path: Path) -> None:
    app, approving, runs = await _refund_with_flaky_result_commits(
        tmp_path, 2, "database is locked"
    )
    try:
        done = await asyncio.wait_for(approving, 20)
        assert done.status == "completed"
        assert len(runs) == 1
        history = await app.get_execution(done.id)
        assert [type(e).TAG for e in history.events][-2:] == ["tool_finished", "model_replied"]
    finally:
        await app.close()


async def test_a_result_that_cannot_be_recorded_lapses_and_is_taken_over(tmp_path: Path) -> None:
    # Every try the engine makes to record the result fails: the work is left to lapse.
    app, approving, runs = await _refund_with_flaky_result_commits(
        tmp_path, 6, "database or disk is full", lease=0.6, renew_every=0.2
    )
    try:
        done = await asyncio.wait_for(approving, 30)
        # Never stranded in running: the lease lapsed, the work was taken over, and the
        # model was told the outcome is unknown. The refund ran once.
        assert done.status == "completed"
        assert len(runs) == 1
        history = await app.get_execution(done.id)
        failed = [e for e in history.events if type(e).TAG == "tool_failed"]
        assert len(failed) == 1 and "may or may not have taken effect" in failed[0].error
    finally:
        await app.close()


# -- 8. one unreadable execution does not block the timeouts after it ---------------------


async def test_an_unreadable_execution_does_not_block_later_timeouts(
    app: Clearance, clock: FakeClock, tmp_path: Path
) -> None:
    define_refund_agent(app, Recorder(), hitl=HumanInLoop(enabled=True, approval_timeout=1000))
    broken = await app.run("safe-agent", input="first")
    clock.advance(milliseconds=10)
    fine = await app.run("safe-agent", input="second")
    db = sqlite3.connect(tmp_path / "approvals.db")
    with db:
        db.execute("UPDATE events SET body = x'00ff' WHERE execution_id = ?", (broken.id,))
    db.close()
    as_if_restarted(app)
    clock.advance(seconds=5)
    assert await app.fire_due_timers() == 1
    assert (await app.get_execution(fine.id)).status == "completed"
    (record,) = await app.audit(execution_id=fine.id)
    assert record.decision == "timed_out"
    # The broken one's timer waits for later rather than sitting first in line.
    assert await app.fire_due_timers() == 0


class _SlowToReturn:
    """A store whose commits of a unit's result return late: the work row is gone
    while the worker has not yet heard that its commit landed."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def commit(self, writes: Any, **kwargs: Any) -> Any:
        queued = await self._store.commit(writes, **kwargs)
        if kwargs.get("done") is not None:
            await asyncio.sleep(0.3)
        return queued


async def test_work_completed_by_a_commit_still_returning_is_not_reported_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    async with Clearance.open(
        _url(tmp_path), clock=FakeClock(), ids=SequentialIds(), lease=0.5, renew_every=0.02
    ) as app:
        define_refund_agent(app, recorder)
        app.engine.store = _SlowToReturn(app.store)  # type: ignore[assignment]
        ex = await app.run("safe-agent", input="Refund ORD-123")
        request = ex.pending_approvals[0]
        with caplog.at_level(logging.WARNING, logger="clearance"):
            done = await app.signal(ex.id, "approve", request_id=request.request_id, by="ops")
        # Not the paused state the late return of the first model turn's commit carried.
        assert done.status == "completed"
        assert len(recorder.ran("process-refund")) == 1
    assert [r.getMessage() for r in caplog.records if "lease lost" in r.getMessage()] == []


async def test_a_lease_taken_over_is_reported_once_and_no_longer_renewed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    release, started = asyncio.Event(), asyncio.Event()

    async def slow_refund(ctx: ToolContext, params: dict[str, Any]) -> str:
        started.set()
        await release.wait()
        return "refunded"

    model = ScriptedModel([[tool_use("process-refund", REFUND)], [text("Done.")]])
    async with Clearance.open(
        _url(tmp_path), clock=FakeClock(), ids=SequentialIds(), lease=1, renew_every=0.02
    ) as app:
        _define_refund(app, model, slow_refund)
        ex = await app.run("safe-agent", input="Refund")
        rid = ex.pending_approvals[0].request_id
        approving = asyncio.create_task(app.signal(ex.id, "approve", request_id=rid))
        await asyncio.wait_for(started.wait(), 10)
        # Another worker took the run over (as if our lease had lapsed).
        other = sqlite3.connect(tmp_path / "approvals.db", isolation_level=None)
        other.execute("UPDATE work SET holder = 'worker-elsewhere'")
        other.close()
        with caplog.at_level(logging.WARNING, logger="clearance"):
            await asyncio.sleep(0.3)  # ~15 renewals
        lost = [r.getMessage() for r in caplog.records if "lease lost" in r.getMessage()]
        assert len(lost) == 1, lost
        assert app.engine._held == {}
        release.set()
        await asyncio.wait_for(approving, 10)


async def test_work_not_started_when_a_process_closes_goes_back_to_the_queue(
    tmp_path: Path,
) -> None:
    """A model call cut short by close() is handed back, so the next process takes it at
    once instead of waiting out the lease (30 s here)."""
    entered = asyncio.Event()

    async def hangs(request: Any) -> list[dict[str, Any]]:
        entered.set()
        await asyncio.sleep(3600)
        return [text("never")]

    first = Clearance.open(_url(tmp_path), lease=30)
    define_refund_agent(first, Recorder(), model=ScriptedModel(hangs))
    running = asyncio.create_task(first.run("safe-agent", input="Refund ORD-123"))
    await asyncio.wait_for(entered.wait(), 10)
    (execution_id,) = await first.with_work("safe-agent")
    await first.close()
    assert running.cancelled()
    async with Clearance.open(_url(tmp_path), lease=30) as second:
        define_refund_agent(second, Recorder())
        assert await second.engine.pickup() == 1
        ex = await wait_for(lambda: _paused(second, execution_id), seconds=10)
        assert len(ex.pending_approvals) == 1


async def _paused(app: Clearance, execution_id: str) -> Any:
    ex = await app.execution(execution_id)
    return ex if ex is not None and ex.status == "awaiting_approval" else None
