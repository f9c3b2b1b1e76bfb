"""Many workers on one PostgreSQL database: 4 hosting processes, 2 racing deciders.

Four processes (tests/crash_process.py, not killed here) host the same two agents
and start 125 executions each; two reviewer processes (tests/decider_process.py)
that host nothing decide every pending request by one fate per request, so they
race to record the same decision: approve, approve with modified parameters,
reject, stop the execution, or leave it (a send-email then times out after 1 s;
a refund is approved once every execution has started). Judged from outside,
through the public API and the processes' own records:

  - all 500 executions come to rest, finished: none running, none pending;
  - every tool ran at most once per idempotency key, and a gated tool only for a
    request whose one audit record says approved, with the approved parameters;
  - every decision a decider recorded is the one audit record of its request;
  - every tool_use got exactly one tool_result in the next model request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from crash_process import ALLOWED_UP_TO, DENIED_ABOVE
from postgres_server import postgres_url

from clearance import Clearance

__all__ = ["postgres_url"]  # the fixture, for pytest
HERE = Path(__file__).parent
HOSTS, PER_HOST, DECIDERS = 4, 125, 2
SEED = 7
FINISHED = {"completed", "stopped", "failed"}
BOUND = 240.0  # seconds for everything to come to rest (a hang, not a speed, fails)


async def _spawn(*args: str, stderr: Path) -> asyncio.subprocess.Process:
    with stderr.open("wb") as err:
        return await asyncio.create_subprocess_exec(
            sys.executable, *args, stdout=asyncio.subprocess.PIPE, stderr=err
        )


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_four_workers_and_two_deciders_keep_every_promise(
    tmp_path: Path, postgres_url: str
) -> None:
    store = f"{postgres_url}?schema=many_{time.time_ns()}"
    events, decisions = tmp_path / "events.jsonl", tmp_path / "decisions.jsonl"
    procs: list[asyncio.subprocess.Process] = []
    started: set[str] = set()
    try:
        for n in range(DECIDERS):
            decider = await _spawn(
                str(HERE / "decider_process.py"),
                store,
                str(decisions),
                "--seed",
                str(SEED),
                stderr=tmp_path / f"decider-{n}.err",
            )
            procs.append(decider)
            assert decider.stdout is not None
            assert (await asyncio.wait_for(decider.stdout.readline(), 60)).strip() == b"ready"

        async def read_starts(proc: asyncio.subprocess.Process) -> None:
            assert proc.stdout is not None
            async for line in proc.stdout:
                words = line.decode().split()
                if words and words[0] == "started":
                    started.add(words[1])

        readers = []
        for launch in range(HOSTS):
            host = await _spawn(
                str(HERE / "crash_process.py"),
                store,
                str(events),
                "--seed",
                str(SEED),
                "--launch",
                str(launch),
                "--start",
                str(PER_HOST),
                stderr=tmp_path / f"host-{launch}.err",
            )
            procs.append(host)
            readers.append(asyncio.ensure_future(read_starts(host)))
        deadline = time.monotonic() + BOUND
        while len(started) < HOSTS * PER_HOST and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # (the readers fill `started`; a bound, not an event)
        assert len(started) == HOSTS * PER_HOST, f"only {len(started)} executions started"
        (tmp_path / "DRAIN").touch()  # the deciders now approve the refunds they left
        async with Clearance.open(store) as app:
            while time.monotonic() < deadline:
                statuses = [(await app.execution(e)) for e in started]
                if all(ex is not None and ex.status in FINISHED for ex in statuses):
                    break
                await asyncio.sleep(0.5)
            problems = await _judge(app, started, _lines(events), _lines(decisions))
        problems += [
            f"process {n} exited ({proc.returncode}): see {tmp_path}/*.err"
            for n, proc in enumerate(procs)
            if proc.returncode is not None
        ]
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    assert not problems, "\n".join(problems[:20])


async def _judge(
    app: Clearance,
    started: set[str],
    events: list[dict[str, Any]],
    decisions: list[dict[str, Any]],
) -> list[str]:
    problems = []
    for execution_id in sorted(started):
        ex = await app.execution(execution_id)
        if ex is None or ex.status not in FINISHED:
            problems.append(f"{execution_id}: {'lost' if ex is None else ex.status}")
    if await app.pending():
        problems.append(f"{len(await app.pending())} requests still pending")
    runs = [e for e in events if e["kind"] == "run"]
    for key, n in Counter(r["key"] for r in runs).items():
        if n > 1:
            problems.append(f"tool run {key} ran {n} times")
    problems += [f"pairing: {e['problems']}" for e in events if e["kind"] == "violation"]
    decided = {d["request"]: d for d in decisions}
    for request_id, n in Counter(d["request"] for d in decisions).items():
        if n > 1:
            problems.append(f"{request_id} was decided {n} times")
    # Six processes wrote decisions at once: still one unbroken hash chain.
    verdict = await app.verify_audit()
    if not verdict.intact:
        problems.append(f"audit chain: {verdict.problem}")
    audit = await app.audit()
    # Calls the hosts' policy decided have no request: audited by their call.
    by_call = [a for a in audit if a.request_id is None]
    audit = [a for a in audit if a.request_id is not None]
    records = Counter(a.request_id for a in audit)
    problems += [f"{r}: {n} audit records" for r, n in records.items() if n > 1]
    by_request = {a.request_id: a for a in audit}
    for request_id, decision in decided.items():
        record = by_request.get(request_id)
        wanted = "cancelled" if decision["decision"] == "stopped" else decision["decision"]
        # An approval with changed parameters is audited as approved_modified.
        said = record.decision.replace("approved_modified", "approved") if record else None
        if record is None or said != wanted:
            problems.append(f"{request_id}: decided {wanted}, audit says {record}")
    for run in runs:
        if run["tool"] not in ("process-refund", "send-email"):
            continue
        if run["tool"] == "process-refund" and run["params"]["amount"] > DENIED_ABOVE:
            problems.append(f"a refund the policy denies ran: {run}")
            continue
        if not run["request"] and run["tool"] == "process-refund":
            allowed = [
                a
                for a in by_call
                if a.execution_id == run["execution"]
                and a.decision == "allowed_by_policy"
                and a.parameters == run["params"]
            ]
            if run["params"]["amount"] > ALLOWED_UP_TO or len(allowed) != 1:
                problems.append(f"{run} ran without a request; policy records {allowed}")
            continue
        record = by_request.get(run["key"])
        if record is None or record.decision not in ("approved", "approved_modified"):
            problems.append(f"gated run {run['key']} without an approval: {record}")
            continue
        approved = record.modified_params or record.parameters
        if run["params"] != approved:
            problems.append(f"{run['key']} ran with {run['params']}, approved {approved}")
    if not runs or not decided:
        problems.append(f"nothing happened: {len(runs)} runs, {len(decided)} decisions")
    return problems
