"""A broker's server going away, and a process dying between the commit of a pause
and the publish of its approval request: the outbox still publishes each request
exactly once, with the request id as message id, and its decision still comes back.

Each test runs on every broker of tests/broker_sides.py with a server of its own
(`side.server`); the in-memory broker lives in this process, so it has none to stop
or to outlive (tests/test_brokers.py covers its `down` switch).

- A broker stopped during a run: the app reaches the server through a TCP proxy this
  test owns (tests/tcp_proxy.py), which it stops (listener closed, every connection
  cut) and starts again on the same port.
- SIGKILL between commit and publish: a child process (tests/broker_crash_process.py)
  kills itself inside the broker channel's `send`, before publishing; this process
  then opens the same SQLite file.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from broker_crash_process import BROKER, define
from broker_sides import SECRET, SERVED, SIDES
from conftest import REFUND, Recorder, wait_for
from tcp_proxy import TcpProxy

from clearance import Clearance
from clearance.ports.store import Delivery

CHILD = str(Path(__file__).with_name("broker_crash_process.py"))
CHILD_SECONDS = 60.0  # bound on the child's start-up, run and death (busy machines)
# Bound on a client library reconnecting (each has its own backoff) plus the relay's
# next attempt (its backoff starts at ~1 s), and on a dead process's lease lapsing.
BACK_SECONDS = 30.0


class ServerSide(Protocol):
    """A side whose broker is a real server, reachable through another address."""

    @property
    def url(self) -> str: ...
    @property
    def event(self) -> str: ...
    @property
    def server(self) -> tuple[str, int]: ...
    def url_for(self, host: str, port: int) -> str: ...
    def messages(self, subject: str) -> list[dict[str, Any]]: ...
    def message_ids(self, subject: str) -> list[str]: ...
    def publish(self, subject: str, body: dict[str, Any] | str) -> None: ...
    def close(self) -> None: ...


@pytest.fixture(params=SERVED)
def side(request: pytest.FixtureRequest) -> Iterator[ServerSide]:
    made: Any = SIDES[request.param]()
    try:
        yield made
    finally:
        made.close()


def _opened(store: str, url: str) -> Clearance:
    return Clearance.open(store, poll_interval=0.02, webhook_secret=SECRET, brokers={BROKER: url})


async def _delivery(app: Clearance, request_id: str) -> Delivery:
    [delivery] = await app.deliveries(request_id)
    return delivery


async def _status(app: Clearance, execution_id: str, status: str) -> Any:
    async def rested() -> Any:
        ex = await app.execution(execution_id)
        return ex if ex is not None and ex.status == status else None

    return await wait_for(rested, BACK_SECONDS)


def _decide(side: ServerSide, request_id: str, by: str) -> None:
    side.publish(f"{side.event}.decisions", {"requestId": request_id, "approved": True, "by": by})


async def test_a_broker_stopped_during_a_run_is_retried_and_published_once_it_is_back(
    tmp_path: Path, side: ServerSide
) -> None:
    recorder = Recorder()
    async with (
        TcpProxy(side.server) as proxy,
        _opened(f"sqlite:///{tmp_path / 'outage.db'}", side.url_for(proxy.host, proxy.port)) as app,
    ):
        define(app, recorder, side.event)
        # Up: published and decided over the broker, through the proxy.
        first = await app.run("safe-agent", input="Refund ORD-1")
        a = first.pending_approvals[0].request_id
        assert await wait_for(lambda: side.message_ids(side.event)) == [a]
        _decide(side, a, "ops")
        await _status(app, first.id, "completed")
        assert len(recorder.ran("process-refund")) == 1
        assert proxy.connections > 0  # the app's clients are connected through it

        # Down: the listener closed, every connection cut.
        await proxy.stop()
        second = await app.run("safe-agent", input="Refund ORD-2")
        assert second.status == "awaiting_approval"
        b = second.pending_approvals[0].request_id

        async def tried() -> Delivery | None:
            delivery = await _delivery(app, b)
            return delivery if delivery.attempts else None

        retried = await wait_for(tried, BACK_SECONDS)
        assert (retried.channel, retried.status) == (f"broker:{BROKER}", "pending"), retried
        assert retried.attempts[0].outcome == "retry" and retried.attempts[0].error, retried
        assert side.message_ids(side.event) == [a]  # nothing got out meanwhile

        # Back, on the same port: published once, then decided over the broker.
        await proxy.start()

        async def delivered() -> Delivery | None:
            delivery = await _delivery(app, b)
            return delivery if delivery.status != "pending" else None

        done = await wait_for(delivered, BACK_SECONDS)
        outcomes = [attempt.outcome for attempt in done.attempts]
        assert done.status == "delivered" and outcomes[-1] == "delivered", done
        assert set(outcomes[:-1]) == {"retry"}, done
        assert side.message_ids(side.event) == [a, b]
        assert side.messages(side.event)[1]["requestId"] == b
        _decide(side, b, "ops-after-outage")
        finished = await _status(app, second.id, "completed")
        assert finished.request(b).decided_by == "ops-after-outage"
        assert recorder.ran("process-refund") == [REFUND, REFUND]  # once more, not twice
        assert proxy.connections > 0  # back through the proxy, on its old port
        [record] = await app.audit(request_id=b)
        assert (record.decision, record.by) == ("approved", "ops-after-outage")
        assert side.message_ids(side.event) == [a, b]  # still one message each


async def _killed_child(
    *args: str, reading: Callable[[], None] | None = None
) -> tuple[list[str], str]:
    """Run tests/broker_crash_process.py with `args` until it dies, which must be by
    SIGKILL; `reading`: done once the child says it reads decisions. Returns the
    lines it said, and a text about it for assertion messages."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        CHILD,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        if reading is not None:
            assert child.stdout is not None
            line = await asyncio.wait_for(child.stdout.readline(), CHILD_SECONDS)
            assert line.decode().strip() == "reading", line
            reading()
        out, err = await asyncio.wait_for(child.communicate(), CHILD_SECONDS)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    said = out.decode().splitlines()
    why = f"the child said {said}; stderr:\n{err.decode(errors='replace')[-3000:]}"
    assert child.returncode == -signal.SIGKILL, why
    return said, why


async def test_a_sigkill_between_commit_and_publish_is_published_once_after_the_restart(
    tmp_path: Path, side: ServerSide
) -> None:
    store = f"sqlite:///{tmp_path / 'crash.db'}"
    said, why = await _killed_child(store, side.url, side.event)
    # Killed inside `send`, before it published: the pause committed, nothing out.
    [sending] = [line for line in said if line.startswith("sending ")]
    _, execution_id, request_id = sending.split()
    assert not [line for line in said if line.startswith("ran ")], why
    assert side.messages(side.event) == []

    recorder = Recorder()
    async with _opened(store, side.url) as app:
        define(app, recorder, side.event)
        ex = await app.execution(execution_id)
        assert ex is not None and ex.status == "awaiting_approval", ex
        assert [r.request_id for r in ex.pending_approvals] == [request_id]
        before = await _delivery(app, request_id)
        assert (before.status, before.attempts) == ("pending", ())  # the attempt died unrecorded
        # Once the dead process's lease on the delivery lapses, this process takes it.
        assert await wait_for(lambda: side.message_ids(side.event), BACK_SECONDS) == [request_id]
        [body] = side.messages(side.event)
        assert (body["requestId"], body["executionId"]) == (request_id, execution_id)
        assert body["parameters"] == REFUND

        async def delivered() -> Delivery | None:
            delivery = await _delivery(app, request_id)
            return delivery if delivery.status != "pending" else None

        after = await wait_for(delivered)
        assert [attempt.outcome for attempt in after.attempts] == ["delivered"], after
        _decide(side, request_id, "ops")
        done = await _status(app, execution_id, "completed")
        assert done.request(request_id).status == "approved"
        assert recorder.ran("process-refund") == [REFUND]
        assert side.message_ids(side.event) == [request_id]  # published exactly once


async def test_a_process_killed_applying_a_decision_leaves_it_to_another(
    tmp_path: Path, side: ServerSide
) -> None:
    """At least once in: the process that read a decision dies before its commit and
    ack; the broker hands the decision to the next reader, which applies it once."""
    store = f"sqlite:///{tmp_path / 'decide.db'}"
    recorder = Recorder()
    async with _opened(store, side.url) as app:
        define(app, recorder, side.event)
        ex = await app.run("safe-agent", input="Refund ORD-123")
        request_id = ex.pending_approvals[0].request_id
        await wait_for(lambda: side.message_ids(side.event))
    # Nobody reads the decisions now; the child is the only reader once it starts.
    said, why = await _killed_child(
        store, side.url, side.event, "decide", reading=lambda: _decide(side, request_id, "ops")
    )
    assert said == [f"deciding {request_id}"], why

    async with _opened(store, side.url) as app:
        define(app, recorder, side.event)
        assert (await app.execution(ex.id)).status == "awaiting_approval"  # type: ignore[union-attr]
        done = await _status(app, ex.id, "completed")
        assert done.request(request_id).decided_by == "ops"
        assert recorder.ran("process-refund") == [REFUND]
        assert len(await app.audit(request_id=request_id)) == 1
        assert side.messages(f"{side.event}.errors") == []
