"""Crash harness: random SIGKILLs across the whole cycle, with restarts, judged from outside.

Each trial (seeded `random.Random(seed)`) runs `crash_process.py` as the host of
two scripted agents on a fresh SQLite file and SIGKILLs it 0-300 ms after it
says `ready`, over and over: during starts, model turns, pauses, pickups of
decisions made here, tool runs and final model calls. Meanwhile this process,
with its OWN `Clearance` instance on the same file that hosts no agent, decides
whatever is pending (approve, approve with modified parameters, reject, stop
the execution, or leave it to time out), also while no host is up. Finally one
last host is started and the reviewer decides everything left; after a bounded
wait (DRAIN_SECONDS) the trial asserts, through the public API only:

  - 0 lost executions: every execution the host reported or ran a model call or
    tool for, or that had a pending request, still exists;
  - 0 double runs: each idempotency key appears at most once among tool runs;
  - 0 ungated runs / 0 runs of rejected, timed-out or cancelled requests: each
    gated run's key is its request id, whose only audit record is `approved`,
    and it ran with exactly the approved (possibly modified) parameters;
  - 0 stuck executions: none still `running`, none waiting on a timer long due;
  - exactly one audit record per decided request, agreeing with the request's
    status and with the decision this process made;
  - every tool_use got exactly one tool_result in the next model request.

A trial is deterministic apart from the moments of the kills (and what those
moments make pending when): the number of launches, the kill delays and every
request's fate derive from the seed. A failure prints the seed, the problems
and a short merged timeline of this process's actions and the hosts' runs.

Running it:

    pytest tests/test_crash.py                       # CI: 20 trials on SQLite, 10 on PostgreSQL
    pytest tests/test_crash.py -m soak               # 300 trials (CLEARANCE_CRASH_TRIALS=N)
    CLEARANCE_CRASH_SEEDS=1234,99 pytest tests/test_crash.py -k lose_nothing   # replay seeds

CLEARANCE_CRASH_SEED moves the base seed (default 20240115) to explore other
seeds; CLEARANCE_CRASH_PARALLEL sets how many trials run at once (default 2);
CLEARANCE_CRASH_DRAIN the bound in seconds on the final wait (default 20).
Where `Clearance.open` takes `lease=` (runtime v2) the hosts pass a short one,
CLEARANCE_TEST_LEASE seconds (default 2), so a killed host's claims are taken
over well within that bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from crash_process import ALLOWED_UP_TO, DENIED_ABOVE
from postgres_server import postgres_url

from clearance import ApprovalRequest, Clearance, ClearanceError, Execution

__all__ = ["postgres_url"]  # the fixture, for pytest
SCRIPT = str(Path(__file__).with_name("crash_process.py"))
# Statuses as the README names them (kept here so the test needs no runtime internals).
PENDING, RUNNING = "pending", "running"
TERMINAL = frozenset({"completed", "failed", "stopped"})
RESTING = TERMINAL | {"awaiting_approval"}
GATED = ("process-refund", "send-email")
BASE_SEED = int(os.environ.get("CLEARANCE_CRASH_SEED", "20240115"))
CI_TRIALS = 20
PG_TRIALS = 10  # in CI, on PostgreSQL (each trial a schema of its own)
SOAK_TRIALS = int(os.environ.get("CLEARANCE_CRASH_TRIALS", "300"))
PARALLEL = int(os.environ.get("CLEARANCE_CRASH_PARALLEL", "2"))
KILLS = (1, 3)  # host launches killed per trial, before the last one
KILL_AFTER = 0.3  # seconds: each kill lands 0..KILL_AFTER after the host said `ready`
READY_SECONDS = 60.0  # bound on a host's start-up (2 busy cores can be slow)
# Bound on the last host bringing every execution to rest (raise it if takeover waits on
# a lease longer than this).
DRAIN_SECONDS = float(os.environ.get("CLEARANCE_CRASH_DRAIN", "20"))
OVERDUE_SECONDS = 5.0  # a pending request this far past its timeout means a lost timer
BY = "crash-reviewer"

# Each request's fate, by tool: (action, weight). "leave" is decided only in the
# final drain; "timeout" is never decided (send-email times out after 1 s).
FATES = {
    "process-refund": [
        ("approve", 35),
        ("modify", 20),
        ("reject", 20),
        ("stop", 10),
        ("leave", 15),
    ],
    "send-email": [("approve", 35), ("modify", 10), ("reject", 15), ("timeout", 40)],
}
MODIFIED = {"process-refund": {"amount": 25}, "send-email": {"body": "Edited by a human."}}


def seeds(count: int, offset: int) -> list[int]:
    replay = os.environ.get("CLEARANCE_CRASH_SEEDS")
    if replay:
        return [int(s) for s in replay.split(",") if s.strip()]
    return [BASE_SEED + offset + i for i in range(count)]


def order_of(request: ApprovalRequest) -> str:
    params = request.parameters
    if request.tool == "process-refund":
        return str(params["orderId"]).removeprefix("ORD-")
    return str(params["to"]).removeprefix("customer-").removesuffix("@example.com")


@dataclass
class Fate:
    action: str
    delay: float  # seconds after this process first saw the request pending
    drain_approves: bool  # what "leave" becomes in the drain


@dataclass
class Host:
    launch: int
    proc: asyncio.subprocess.Process
    reader: asyncio.Task[None]
    ready: asyncio.Event
    stderr_path: Path


@dataclass
class Trial:
    seed: int
    dir: Path
    store: str = ""  # a store URL; "" is a fresh SQLite file in `dir`
    rng: random.Random = field(init=False)
    t0: float = field(default_factory=time.time)
    timeline: list[tuple[float, str]] = field(default_factory=list)
    reported: set[str] = field(default_factory=set)  # executions hosts said they started
    seen: dict[str, ApprovalRequest] = field(default_factory=dict)  # request id -> request
    first_seen: dict[str, float] = field(default_factory=dict)
    acted: set[str] = field(default_factory=set)  # request ids this process tried to decide
    decided: dict[str, str] = field(default_factory=dict)  # request id -> decision that took
    hosts: list[Host] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # unexpected exceptions from the API
    draining: bool = False

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.dir.mkdir(parents=True)

    @property
    def url(self) -> str:
        return self.store or f"sqlite:///{self.dir / 'crash.db'}"

    @property
    def events_path(self) -> Path:
        return self.dir / "events.jsonl"

    def log(self, line: str) -> None:
        self.timeline.append((time.time(), line))

    def fate(self, request: ApprovalRequest) -> Fate:
        rng = random.Random(f"{self.seed}:fate:{order_of(request)}:{request.tool}")
        actions, weights = zip(*FATES[request.tool], strict=True)
        action = rng.choices(actions, weights)[0]
        return Fate(action, rng.uniform(0, 0.25), rng.random() < 0.7)

    # -- hosts ------------------------------------------------------------------------

    async def spawn(self, launch: int, start: int) -> Host:
        stderr_path = self.dir / f"host-{launch}.err"
        with stderr_path.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                SCRIPT,
                self.url,
                str(self.events_path),
                "--seed",
                str(self.seed),
                "--launch",
                str(launch),
                "--start",
                str(start),
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,  # its own process group, killed as one
            )
        ready = asyncio.Event()
        host = Host(launch, proc, asyncio.create_task(self._read(proc, ready)), ready, stderr_path)
        self.hosts.append(host)
        self.log(f"launch {launch}: spawned (starts {start} executions)")
        waiting = asyncio.ensure_future(ready.wait())
        await asyncio.wait(
            [waiting, host.reader], timeout=READY_SECONDS, return_when=asyncio.FIRST_COMPLETED
        )
        waiting.cancel()
        if not ready.is_set():
            raise AssertionError(
                f"host launch {launch} never said ready (exit {proc.returncode}); stderr:\n"
                + tail(stderr_path, 20)
            )
        self.log(f"launch {launch}: ready")
        return host

    async def _read(self, proc: asyncio.subprocess.Process, ready: asyncio.Event) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            words = raw.decode().split()
            if words[:1] == ["ready"]:
                ready.set()
            elif words[:1] == ["started"]:
                self.reported.add(words[1])
                self.log(f"host: run() returned {words[1]} {words[2]}")

    async def kill(self, host: Host) -> None:
        if host.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(host.proc.pid, signal.SIGKILL)
        await host.proc.wait()  # reaped before anyone else looks at its pid
        with contextlib.suppress(Exception):
            await asyncio.wait_for(host.reader, 5)
        self.log(f"launch {host.launch}: SIGKILLed (exit {host.proc.returncode})")

    # -- the reviewer --------------------------------------------------------------------

    async def review(self, app: Clearance) -> None:
        while True:
            for request in await app.pending():
                self.seen.setdefault(request.request_id, request)
                if request.request_id in self.acted:
                    continue
                now = time.time()
                first = self.first_seen.setdefault(request.request_id, now)
                fate = self.fate(request)
                if fate.action == "timeout" or (fate.action == "leave" and not self.draining):
                    continue
                if now - first < fate.delay and not self.draining:
                    continue
                self.acted.add(request.request_id)
                action = fate.action
                if action == "leave":
                    action = "approve" if fate.drain_approves else "reject"
                await self.act(app, request, action)
            await asyncio.sleep(0.02)

    async def act(self, app: Clearance, request: ApprovalRequest, action: str) -> None:
        what = f"{action} {request.request_id} ({request.tool} of {request.execution_id})"
        try:
            if action == "stop":
                await app.signal(request.execution_id, "stop", by=BY, reason="crash trial")
            elif action == "reject":
                await app.decide(request.request_id, approved=False, reason="no", by=BY)
                self.decided[request.request_id] = "rejected"
            else:
                modified = MODIFIED[request.tool] if action == "modify" else None
                await app.decide(request.request_id, approved=True, modified_params=modified, by=BY)
                changed = modified is not None and {**request.parameters, **modified} != (
                    request.parameters
                )
                self.decided[request.request_id] = "approved_modified" if changed else "approved"
        except ClearanceError as err:
            self.log(f"review: {what} refused: {err}")
        except Exception as err:
            self.errors.append(f"{what}: {type(err).__name__}: {err}")
            self.log(f"review: {what} raised {type(err).__name__}: {err}")
        else:
            self.log(f"review: {what}")

    async def stop_one(self, app: Clearance) -> None:
        known = sorted(self.known_executions())
        if not known:
            return
        execution_id = self.rng.choice(known)
        try:
            await app.signal(execution_id, "stop", by=BY, reason="crash trial")
        except ClearanceError as err:
            self.log(f"review: stop {execution_id} refused: {err}")
        except Exception as err:
            self.errors.append(f"stop {execution_id}: {type(err).__name__}: {err}")
        else:
            self.log(f"review: stop {execution_id}")

    # -- what happened -------------------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines() if line]

    def known_executions(self) -> set[str]:
        known = set(self.reported) | {r.execution_id for r in self.seen.values()}
        known |= {e["execution"] for e in self.events() if e.get("execution")}
        return known

    async def statuses(self, app: Clearance) -> dict[str, Execution | None]:
        found: dict[str, Execution | None] = {}
        for execution_id in sorted(self.known_executions()):
            try:
                found[execution_id] = (await app.get_execution(execution_id)).execution
            except ClearanceError:
                found[execution_id] = None
        return found

    async def check(self, app: Clearance) -> list[str]:
        problems: list[str] = []
        events = self.events()
        runs = [e for e in events if e["kind"] == "run"]
        executions = await self.statuses(app)

        for execution_id, ex in executions.items():
            if ex is None:
                problems.append(f"LOST: execution {execution_id} was started but does not exist")
            elif ex.status == RUNNING:
                problems.append(
                    f"STUCK: execution {execution_id} still running {DRAIN_SECONDS:.0f} s "
                    f"after the last restart (calls: {call_summary(ex)})"
                )
            elif ex.status == "failed":
                problems.append(f"FAILED: execution {execution_id}: {ex.error}")
            elif ex.status not in RESTING:
                problems.append(f"STUCK: execution {execution_id} in status {ex.status}")
            else:
                overdue = [
                    r.request_id
                    for r in ex.pending_approvals
                    if time.time() - r.timeout.timestamp() > OVERDUE_SECONDS
                ]
                if overdue:
                    problems.append(
                        f"STUCK: execution {execution_id} still waits on {overdue}, "
                        f"more than {OVERDUE_SECONDS:.0f} s past their timeout"
                    )

        for key, count in Counter(r["key"] for r in runs).items():
            if count > 1:
                where = [(r["tool"], r["launch"]) for r in runs if r["key"] == key]
                problems.append(f"DOUBLE RUN: idempotency key {key} ran {count} times {where}")

        for run in runs:
            if run["tool"] not in GATED:
                continue
            if run["tool"] == "process-refund" and run["params"]["amount"] > DENIED_ABOVE:
                problems.append(f"DENIED RUN: a refund the policy denies ran: {run}")
                continue
            if not run["request"] and run["tool"] == "process-refund":
                # Allowed by the policy, unasked: audited by its call, with the rule.
                allowed = [
                    r
                    for r in await app.audit(execution_id=run["execution"])
                    if r.decision == "allowed_by_policy" and r.parameters == run["params"]
                ]
                if run["params"]["amount"] > ALLOWED_UP_TO or len(allowed) != 1:
                    problems.append(
                        f"UNGATED RUN: {run} ran without a request; policy records {allowed}"
                    )
                continue
            if run["key"] != run["request"]:
                problems.append(
                    f"KEY: gated run of {run['tool']} has idempotency key {run['key']} "
                    f"but request {run['request']}"
                )
            records = await app.audit(request_id=run["request"] or run["key"])
            decisions = [r.decision for r in records]
            if decisions not in (["approved"], ["approved_modified"]):
                problems.append(
                    f"UNGATED RUN: {run['tool']} ran for request {run['request']} "
                    f"(launch {run['launch']}) whose audit says {decisions}"
                )
                continue
            expected = {**records[0].parameters, **(records[0].modified_params or {})}
            if run["params"] != expected:
                problems.append(
                    f"PARAMS: {run['tool']} for {run['request']} ran with {run['params']}, "
                    f"approved were {expected}"
                )

        for ex in executions.values():
            for request in ex.requests if ex else ():
                decisions = [r.decision for r in await app.audit(request_id=request.request_id)]
                expected_decisions = [] if request.status == PENDING else [request.outcome]
                if decisions != expected_decisions:
                    problems.append(
                        f"AUDIT: request {request.request_id} is {request.status} "
                        f"but its audit records are {decisions}"
                    )
        for request_id, decision in self.decided.items():
            decisions = [r.decision for r in await app.audit(request_id=request_id)]
            if decisions != [decision]:
                problems.append(
                    f"AUDIT: this process's '{decision}' of {request_id} took, "
                    f"but its audit records are {decisions}"
                )

        verdict = await app.verify_audit()  # the hash chain survives the kills unbroken
        if not verdict.intact or verdict.records != len(await app.audit()):
            problems.append(f"AUDIT CHAIN: {verdict}")
        problems.extend(f"API ERROR: {error}" for error in self.errors)
        for violation in (e for e in events if e["kind"] == "violation"):
            problems.append(
                f"PAIRING: model request of {violation['execution']}: {violation['problems']}"
            )
        return problems

    def report(self, problems: list[str], full: bool = False) -> str:
        merged = list(self.timeline)
        for e in self.events():
            what = (
                f"model turn {e['turn']}"
                if e["kind"] == "model"
                else f"RUN {e['tool']} key={e['key']}"
                if e["kind"] == "run"
                else "PAIRING VIOLATION"
            )
            merged.append((e["t"], f"host {e['launch']}: {e.get('execution')} {what}"))
        merged.sort()
        ids = {w.strip("(),:'[]") for p in problems for w in p.split() if "-" in w}
        relevant = [
            (t, line)
            for t, line in merged
            if full or "launch" in line or "SIGKILL" in line or any(i and i in line for i in ids)
        ]
        lines = [f"  {t - self.t0:7.3f}  {line}" for t, line in relevant[-60 if not full else 0 :]]
        errors = []
        for host in self.hosts:
            bad = [
                line
                for line in host.stderr_path.read_text(errors="replace").splitlines()
                if "ERROR" in line or "Traceback" in line or "Error" in line
            ]
            if bad:
                errors.append(f"  launch {host.launch} stderr: " + " | ".join(bad[-5:]))
        return (
            f"seed {self.seed} ({len(self.hosts)} launches, {len(self.known_executions())} "
            f"executions, {len(self.decided)} decisions): {len(problems)} problem(s)\n"
            + "\n".join(f"  - {p}" for p in problems[:15])
            + ("\n  ..." if len(problems) > 15 else "")
            + "\n timeline (kills, launches and the ids above):\n"
            + "\n".join(lines)
            + ("\n host errors:\n" + "\n".join(errors) if errors else "")
            + f"\n replay: CLEARANCE_CRASH_SEEDS={self.seed} pytest {__file__} -k lose_nothing"
        )


def call_summary(ex: Execution) -> str:
    calls = getattr(ex, "calls", ())  # diagnostics only
    return ", ".join(f"{c.tool}:{c.status}" for c in calls) or "none"


def tail(path: Path, n: int) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


async def run_trial(seed: int, workdir: Path, store: str = "") -> str | None:
    """One trial; returns a failure report, or None when every promise held."""
    trial = Trial(seed, workdir, store)
    kills = trial.rng.randint(*KILLS)
    async with Clearance.open(trial.url, poll_interval=0.05) as app:
        reviewer = asyncio.create_task(trial.review(app))
        try:
            for launch in range(kills):
                host = await trial.spawn(launch, start=trial.rng.randint(2, 5))
                await asyncio.sleep(trial.rng.uniform(0, KILL_AFTER))
                await trial.kill(host)
                if trial.rng.random() < 0.25:
                    await trial.stop_one(app)
                await asyncio.sleep(trial.rng.uniform(0, 0.1))  # decisions land with no host up
            last = await trial.spawn(kills, start=0)
            trial.draining = True
            deadline = time.monotonic() + DRAIN_SECONDS
            while time.monotonic() < deadline:
                executions = await trial.statuses(app)
                if all(ex is not None and ex.status in TERMINAL for ex in executions.values()):
                    break
                await asyncio.sleep(0.05)
            await trial.kill(last)
        finally:
            if reviewer.done() and not reviewer.cancelled() and reviewer.exception():
                trial.errors.append(f"the reviewer died: {reviewer.exception()!r}")
            reviewer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reviewer
            for host in trial.hosts:
                if host.proc.returncode is None:
                    await trial.kill(host)
    # Judged from an instance with no background work, so nothing moves while it looks.
    quiet = Clearance.open(trial.url)
    try:
        problems = await trial.check(quiet)
    finally:
        await quiet.close()
    return trial.report(problems) if problems else None


async def run_trials(all_seeds: list[int], tmp_path: Path, postgres: str = "") -> None:
    """`postgres`: the database URL to run them on, a schema per trial; else SQLite."""
    gate = asyncio.Semaphore(PARALLEL)
    started = time.monotonic()

    async def one(seed: int) -> str | None:
        async with gate:
            try:
                store = f"{postgres}?schema=crash_{seed}" if postgres else ""
                return await run_trial(seed, tmp_path / f"seed-{seed}", store)
            except Exception as err:  # a broken harness run is reported with its seed too
                return f"seed {seed}: the trial itself broke: {type(err).__name__}: {err}"

    reports = await asyncio.gather(*(one(s) for s in all_seeds))
    failed = [r for r in reports if r]
    elapsed = time.monotonic() - started
    print(f"{len(all_seeds)} crash trials in {elapsed:.1f} s, {len(failed)} failed")
    if failed:
        seeds_failed = [s for s, r in zip(all_seeds, reports, strict=True) if r]
        raise AssertionError(
            f"{len(failed)} of {len(all_seeds)} crash trials broke a promise; "
            f"failing seeds: {seeds_failed}\n\n" + "\n\n".join(failed[:5])
        )


async def test_random_sigkills_lose_nothing(tmp_path: Path) -> None:
    await run_trials(seeds(CI_TRIALS, 0), tmp_path)


@pytest.mark.soak
async def test_random_sigkills_soak(tmp_path: Path) -> None:
    await run_trials(seeds(SOAK_TRIALS, 100_000), tmp_path)


async def test_random_sigkills_lose_nothing_on_postgresql(
    tmp_path: Path, postgres_url: str
) -> None:
    await run_trials(seeds(PG_TRIALS, 50_000), tmp_path, postgres_url)


@pytest.mark.soak
async def test_random_sigkills_soak_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    await run_trials(seeds(SOAK_TRIALS, 150_000), tmp_path, postgres_url)
