"""Two hosts with the same hostname in separate PID namespaces, sharing one store (a SQLite
file, or a PostgreSQL database, reached over loopback or, each host in a network
namespace of its own, across a veth link: tests/network_namespaces.py).

This is what two containers (or pods) on one volume look like: the same
hostname, and both apps at the same small pid. Each host runs
`namespace_host.py` under `unshare --pid --fork --mount-proc --uts` with
`hostname same-host`, as pid 1 of its namespace. A worker identity built from
hostname + pid cannot tell them apart: each takes the other for a dead earlier
incarnation of itself and "recovers" its live work.

What must hold, whatever the runtime uses to judge liveness:

  - live work is never taken over: a tool approved and running on host A runs
    exactly once and its result is recorded by A, although B polls all along;
  - with both hosts polling, every decision made elsewhere runs its tool once,
    and that run's result is what the execution records;
  - a decision recorded while only B is polling is carried out by B, once;
  - the work of a host that died is not stranded: B resolves it (the model is
    told the outcome is unknown) without running the tool again;
  - a host killed inside a model call: B makes the call again, and one turn is
    recorded.

The first two failed on the pid-based liveness of 0.1 (a worker named
host:pid, taken for dead when that pid was gone on "its" host): host B took
over A's live work. Without a usable `unshare` these tests skip, or fail
when CLEARANCE_REQUIRE_SERVICES=1. Where `Clearance.open` takes `lease=`, the
hosts use a short one (CLEARANCE_TEST_LEASE, default 2 s) that a 4 s tool run
outlives, so renewals are exercised too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import network_namespaces
import pytest
from postgres_server import on_schema_of, postgres_url

from clearance import Clearance

__all__ = ["postgres_url"]  # the fixture, for pytest
SCRIPT = str(Path(__file__).with_name("namespace_host.py"))
HOSTNAME = "same-host"
UNKNOWN_OUTCOME = "may or may not have taken effect"
TERMINAL = frozenset({"completed", "failed", "stopped"})
BOUND = 60.0  # seconds: generous bound on every wait (2 shared cores, lease expiry)


class TakenOver(AssertionError):
    """Live work of one host was taken over, or a tool ran twice: the defect under test."""


@functools.cache
def unshare_prefix() -> tuple[list[str] | None, str]:
    """The unshare command line that works here, or None and why not."""
    if shutil.which("unshare") is None:
        return None, "unshare(1) is not installed"
    why = ""
    shell = f'hostname {HOSTNAME} && exec "$0" -c "$1"'
    show = "import os, socket; print(os.getpid(), socket.gethostname())"
    for mount_proc in (["--mount-proc"], []):
        prefix = ["unshare", "--pid", "--fork", "--kill-child", *mount_proc, "--uts"]
        try:
            probe = subprocess.run(
                [*prefix, "sh", "-c", shell, sys.executable, show],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            why = f"{' '.join(prefix)}: {err}"
            continue
        if probe.returncode == 0 and probe.stdout.split()[1:] == [HOSTNAME]:
            return prefix, ""
        why = f"{' '.join(prefix)} exited {probe.returncode}: {probe.stderr.strip()[:300]}"
    return None, f"cannot make PID+UTS namespaces: {why}"


@pytest.fixture
def prefix() -> list[str]:
    found, why = unshare_prefix()
    if found is None:
        if os.environ.get("CLEARANCE_REQUIRE_SERVICES") == "1":
            pytest.fail(f"CLEARANCE_REQUIRE_SERVICES=1 but {why}")
        pytest.skip(why)
    return found


class Host:
    """One namespace_host.py in its own PID + UTS namespace, hostname `same-host`."""

    def __init__(self, label: str, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.label = label
        self.proc = proc
        self.stderr = stderr
        self.said: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.said.append(json.loads(line))

    async def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        await self.proc.stdin.drain()

    def all_said(self, event: str) -> list[dict[str, Any]]:
        return [said for said in self.said if said.get("event") == event]

    async def wait_said(self, event: str) -> dict[str, Any]:
        """The first line this host said with this event; bounded wait."""
        deadline = time.monotonic() + BOUND
        while time.monotonic() < deadline:
            if self.all_said(event):
                return self.all_said(event)[0]
            if self.proc.returncode is not None and self.reader.done():
                break
            await asyncio.sleep(0.02)
        raise AssertionError(
            f"host {self.label} never said {event!r}; it said {self.said}; stderr:\n"
            + self.stderr.read_text(errors="replace")[-2000:]
        )

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # unshare and its whole namespace
        await self.proc.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.reader, 5)


APART = "postgresql, network namespaces"


@pytest.fixture(params=["sqlite", "postgresql", APART])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store both hosts and the test share: a SQLite file, or a PostgreSQL schema
    (which, under APART, each host reaches from a network namespace of its own)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ns.db'}"
    if request.param == APART and (why := network_namespaces.unavailable()):
        if os.environ.get("CLEARANCE_REQUIRE_SERVICES") == "1":
            pytest.fail(f"CLEARANCE_REQUIRE_SERVICES=1 but {why}")
        pytest.skip(why)
    postgres: str = request.getfixturevalue("postgres_url")
    return on_schema_of(postgres, tmp_path)


@pytest.fixture
async def hosts(
    prefix: list[str], tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Any]]:
    started: list[Host] = []
    apart = request.node.callspec.params["store"] == APART
    networks = network_namespaces.Networks()

    async def spawn(label: str, tool_seconds: float = 4.0, model_seconds: float = 0.0) -> Host:
        stderr = tmp_path / f"host-{label}.err"
        network, url, interface = await networks.host(store) if apart else ([], store, "")
        with stderr.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *network,
                *prefix,
                "sh",
                "-c",
                f'hostname {HOSTNAME} && exec "$0" "$@"',
                sys.executable,
                SCRIPT,
                url,
                str(tmp_path / "runs.jsonl"),
                label,
                "--tool-seconds",
                str(tool_seconds),
                "--model-seconds",
                str(model_seconds),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        host = Host(label, proc, stderr)
        started.append(host)
        ready = await host.wait_said("ready")
        # The premise: both hosts look identical to a hostname+pid identity.
        assert ready["hostname"] == HOSTNAME, ready
        if apart:  # ...and each is on a network of its own
            assert ready["interfaces"] == sorted(["lo", interface]), ready
        return host

    try:
        yield spawn
    finally:
        for host in started:
            await host.kill()
        await networks.close()


def runs(tmp_path: Path, of: str = "runs.jsonl") -> list[dict[str, Any]]:
    """The tool runs the hosts made (`of="runs.jsonl.model"`: their model calls)."""
    path = tmp_path / of
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


async def until(predicate: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {BOUND:.0f} s: {what}")


async def rested(app: Clearance, execution_id: str) -> Any:
    async def terminal() -> Any:
        ex = (await app.get_execution(execution_id)).execution
        return ex if ex.status in TERMINAL else None

    return await until(terminal, f"execution {execution_id} finishes")


def check_ran_once_and_recorded(ex: Any, ran: list[dict[str, Any]], by: str | None) -> None:
    """The tool of `ex` ran exactly once and the execution records that run's result."""
    mine = [r for r in ran if r["execution"] == ex.id]
    if len(mine) != 1:
        raise TakenOver(f"execution {ex.id}: its tool ran {len(mine)} times: {mine}")
    [run] = mine
    if by is not None and run["label"] != by:
        raise AssertionError(f"execution {ex.id}: the tool ran on host {run['label']}, not {by}")
    if ex.status != "completed":
        raise AssertionError(f"execution {ex.id} ended {ex.status}: {ex.error}")
    if UNKNOWN_OUTCOME in (ex.output or ""):
        raise TakenOver(
            f"execution {ex.id}: host {run['label']} (pid {run['pid']} in its own PID namespace, "
            f"hostname {run['hostname']}) was alive and running the tool, yet the other host "
            f"took its claim over as a dead worker's and told the model: {ex.output!r}"
        )
    if f"recorded from host {run['label']}." not in (ex.output or ""):
        raise AssertionError(
            f"execution {ex.id}: output does not carry the result of the run on "
            f"{run['label']}: {ex.output!r}"
        )


async def test_live_tool_run_on_host_a_is_not_taken_over_by_host_b(
    hosts: Callable[..., Any], tmp_path: Path, store: str
) -> None:
    a = await hosts("A", tool_seconds=4.0)
    b = await hosts("B")
    await a.send(cmd="run", input="Refund order ORD-NS")
    ran = await a.wait_said("ran")
    assert ran["status"] == "awaiting_approval", ran
    await a.send(cmd="approve", execution_id=ran["execution_id"], request_id=ran["request_id"])
    await until(lambda: runs(tmp_path), "the tool starts on A")  # ...and B polls meanwhile
    assert b.proc.returncode is None
    async with Clearance.open(store) as app:
        ex = await rested(app, ran["execution_id"])
    check_ran_once_and_recorded(ex, runs(tmp_path), by="A")
    signalled = await a.wait_said("signalled")
    assert signalled["status"] == "completed", signalled
    assert "recorded from host A." in signalled["output"], signalled


async def test_with_both_hosts_polling_each_decision_runs_once_and_is_recorded(
    hosts: Callable[..., Any], tmp_path: Path, store: str
) -> None:
    a = await hosts("A", tool_seconds=2.0)
    await hosts("B", tool_seconds=2.0)
    for i in range(4):
        await a.send(cmd="run", input=f"Refund order {i}")
        await until(lambda i=i: len(a.all_said("ran")) > i, f"A starts execution {i}")
    paused = a.all_said("ran")
    assert len(paused) == 4 and all(p["status"] == "awaiting_approval" for p in paused), paused
    async with Clearance.open(store) as app:
        for p in paused:  # decided here; whichever host picks a decision up runs it
            await app.decide(p["request_id"], approved=True, by="reviewer")
        executions = [await rested(app, p["execution_id"]) for p in paused]
    ran = runs(tmp_path)
    for ex in executions:
        check_ran_once_and_recorded(ex, ran, by=None)


@pytest.mark.parametrize("a_leaves", ["exits", "is killed"])
async def test_decision_recorded_while_only_b_polls_is_carried_out_by_b_once(
    hosts: Callable[..., Any], tmp_path: Path, store: str, a_leaves: str
) -> None:
    a = await hosts("A")
    await hosts("B", tool_seconds=0.5)
    await a.send(cmd="run", input="Refund order ORD-NS")
    ran = await a.wait_said("ran")
    assert ran["status"] == "awaiting_approval", ran
    if a_leaves == "exits":
        await a.send(cmd="exit")
        await a.wait_said("closed")
    await a.kill()
    async with Clearance.open(store) as app:
        # Recorded here, by a process that hosts nothing: B, polling, must carry it out.
        await app.decide(ran["request_id"], approved=True, by="reviewer")
        ex = await rested(app, ran["execution_id"])
        [record] = await app.audit(request_id=ran["request_id"])
    assert (record.decision, record.by) == ("approved", "reviewer")
    check_ran_once_and_recorded(ex, runs(tmp_path), by="B")


async def test_work_of_a_host_that_died_mid_tool_is_resolved_by_b_without_rerunning(
    hosts: Callable[..., Any], tmp_path: Path, store: str
) -> None:
    a = await hosts("A", tool_seconds=60.0)
    await a.send(cmd="run", input="Refund order ORD-NS")
    ran = await a.wait_said("ran")
    await a.send(cmd="approve", execution_id=ran["execution_id"], request_id=ran["request_id"])
    await until(lambda: runs(tmp_path), "the tool starts on A")
    await a.kill()  # A dies inside the handler; B comes up afterwards and alone
    await hosts("B")
    async with Clearance.open(store) as app:
        ex = await rested(app, ran["execution_id"])  # bounded: within a lease's expiry
    assert ex.status == "completed", (ex.status, ex.error)
    assert len(runs(tmp_path)) == 1  # at most once: not run again
    assert UNKNOWN_OUTCOME in (ex.output or "") and ran["request_id"] in (ex.output or "")


async def test_work_of_a_host_that_died_mid_model_call_is_taken_over_by_b(
    hosts: Callable[..., Any], tmp_path: Path, store: str
) -> None:
    a = await hosts("A", model_seconds=60.0)
    await hosts("B")
    await a.send(cmd="start", input="Refund order ORD-NS")
    [call] = await until(lambda: runs(tmp_path, "runs.jsonl.model"), "A calls the model")
    await a.kill()  # inside the model call: its reply never comes
    async with Clearance.open(store) as app:
        paused = await until(
            lambda: _paused(app, call["execution"]), "B makes the model call again and pauses"
        )
    assert [c["label"] for c in runs(tmp_path, "runs.jsonl.model")] == ["A", "B"]
    assert len(paused.pending_approvals) == 1  # one turn recorded: one request, not two
    assert runs(tmp_path) == []  # and nothing ran unapproved


async def _paused(app: Clearance, execution_id: str) -> Any:
    ex = (await app.get_execution(execution_id)).execution
    return ex if ex.status == "awaiting_approval" else None
