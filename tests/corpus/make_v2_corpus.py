"""Write the schema-2 upgrade corpus: `v2.sqlite3` and `v2_expected.json`, next to this file.

Kept as the record of how the corpus was made; it is not a test (pytest collects
only test_*.py, so it never runs under pytest). It must run against the release
that wrote schema 2 (commit 52542db), never against a checkout that has moved on:
a corpus written by newer code proves nothing about upgrading old files. Recipe,
from the repository root:

    git worktree add /tmp/v2tree 52542db
    pip install --no-deps --target /tmp/v2lib /tmp/v2tree   # a non-editable build
    cd /tmp && PYTHONPATH=/tmp/v2lib python /work/main/tests/corpus/make_v2_corpus.py
    git worktree remove --force /tmp/v2tree

(`cd /tmp` so that the checkout's own `clearance/` folder is not on sys.path.)
The script refuses to run unless the imported store writes schema version 2.

Everything is deterministic: a FakeClock from 2026-11-01T09:00:00Z and
SequentialIds('v2-'), so the file's contents (not its bytes: free pages keep
whatever SQLite left there) and the JSON come out the same on every run.

The corpus goes through the public API only (`Clearance`, `define`, `run`,
`signal`, `fire_due_timers`), with one exception, said here and in the JSON: the
outbox row of the 'claimed-by-dead-worker' execution is claimed by a direct
`UPDATE outbox SET claimed_by = 'corpus-host:999999:deadbeef'` after its approval
was committed, standing for a worker on another host that died mid-run.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import v2_agents
from v2_agents import (
    PUBLIC_URL,
    REFUND,
    WEBHOOK_SECRET,
    Handlers,
    define_agents,
)

import clearance
from clearance import Clearance
from clearance.adapters import sqlite_store
from clearance.adapters.sqlite_store import SQLiteStore
from clearance.core.wire import converter, execution_to_data
from clearance.testing import FakeClock, SequentialIds

HERE = Path(__file__).resolve().parent
DB = HERE / "v2.sqlite3"
EXPECTED = HERE / "v2_expected.json"
START = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
WRITTEN_BY = "52542db"
DEAD_WORKER = "corpus-host:999999:deadbeef"


def jsonable(value: Any) -> Any:
    """Tuples become lists, as they would after a trip through JSON."""
    return json.loads(json.dumps(value))


async def main() -> None:
    if sqlite_store.SCHEMA_VERSION != 2:
        sys.exit(
            f"refusing: {clearance.__file__} writes schema {sqlite_store.SCHEMA_VERSION}, not 2;"
            " run this against the schema-2 release (see the docstring)"
        )
    for path in (DB, DB.with_name(DB.name + "-wal"), DB.with_name(DB.name + "-shm")):
        path.unlink(missing_ok=True)

    clock = FakeClock(START)
    handlers = Handlers()
    host = Clearance(
        SQLiteStore(str(DB)),
        clock=clock,
        ids=SequentialIds("v2-"),
        public_url=PUBLIC_URL,
        webhook_secret=WEBHOOK_SECRET,
    )
    define_agents(host, handlers)
    # A second process on the same file that hosts no agent (a reviewer's server, the
    # CLI): its decisions are recorded and the tool runs left queued for a host.
    reviewer = Clearance(SQLiteStore(str(DB)), clock=clock, ids=SequentialIds("v2-reviewer-"))
    # Neither is entered (`async with`): no background task may pick up, recover or
    # deliver anything behind the script's back.

    scenarios: dict[str, tuple[str, str]] = {}  # execution id -> (scenario, what)

    def note(ex_id: str, scenario: str, what: str) -> None:
        scenarios[ex_id] = (scenario, what)
        clock.advance(minutes=1)

    async def run(tag: str, input: str, session: str | None = None) -> Any:
        ex = await host.run(tag, input=input, session_id=session)
        assert ex.status in ("awaiting_approval", "failed"), (ex.id, ex.status)
        return ex

    ex = await run("refunds", "Refund order ORD-123", "sess-approved")
    [req] = ex.pending_approvals
    done = await host.signal(ex.id, "approve", request_id=req.request_id, by="ops-lead")
    assert done.status == "completed", done.status
    note(ex.id, "approved", "sequential: approved by ops-lead, refund ran, completed")

    ex = await run("refunds", "Refund order ORD-123, but only part of it")
    [req] = ex.pending_approvals
    done = await host.signal(
        ex.id,
        "approve",
        request_id=req.request_id,
        by="ops-lead",
        modified_params={"amount": 30},
    )
    assert done.status == "completed", done.status
    assert handlers.ran("process-refund", ex.id) == [{**REFUND, "amount": 30}]
    note(ex.id, "approved-modified", "approved with modified_params amount=30; completed")

    ex = await run("refunds", "Refund order ORD-123 again")
    [req] = ex.pending_approvals
    done = await host.signal(
        ex.id, "reject", request_id=req.request_id, by="risk-team", reason="Already refunded."
    )
    assert done.status == "completed", done.status
    note(ex.id, "rejected", "rejected by risk-team with a reason; the model finished; completed")

    ex = await run("wires", "Wire 1200 to the supplier")
    clock.advance(minutes=2)  # past the wire tool's 60 s approval timeout
    assert await host.fire_due_timers() == 1
    done = (await host.get_execution(ex.id)).execution
    assert done.status == "completed", done.status
    assert done.requests[0].status == "timed_out"
    note(ex.id, "timed-out", "approval timed out (60 s) via fire_due_timers; completed")

    ex = await run("refunds", "Refund order ORD-123 (to be stopped)")
    done = await host.signal(ex.id, "stop", by="ops-lead", reason="Customer withdrew the claim")
    assert done.status == "stopped", done.status
    note(ex.id, "stopped", "stopped while awaiting approval; the request was cancelled")

    ex = await run("looper", "Look up every order")
    assert ex.status == "failed" and "max_iterations" in (ex.error or ""), ex.error
    note(ex.id, "failed", "failed: max_iterations=2 reached with no final answer")

    ex = await run("auditor", "Audit ORD-300 to ORD-309")
    assert len((await host.get_execution(ex.id)).events) > 16
    note(
        ex.id,
        "long-pending",
        f"{v2_agents.LOOKUPS} lookup turns (a snapshot row at event 16), then one pending refund",
    )

    ex = await run("refunds", "Refund order ORD-123 please", "sess-pending")
    note(ex.id, "pending", "sequential: one pending approval (with its timer row)")

    ex = await run("batch-refunds", "Refund ORD-201 and ORD-202")
    assert len(ex.pending_approvals) == 2
    note(ex.id, "parallel-pending", "parallel: lookup ran, two refunds pending at once")

    ex = await run("webhooked", "Refund order ORD-123 (webhook)")
    note(ex.id, "webhook-pending", "one pending approval with an undelivered webhook row")

    ex = await run("refunds", "Refund order ORD-123 (decided elsewhere)")
    [req] = ex.pending_approvals
    await reviewer.signal(ex.id, "approve", request_id=req.request_id, by="reviewer")
    note(
        ex.id,
        "approved-queued",
        "approved by a process not hosting the agent: the tool run sits unclaimed in the outbox",
    )

    ex = await run("refunds", "Refund order ORD-123 (worker died)")
    [req] = ex.pending_approvals
    await reviewer.signal(ex.id, "approve", request_id=req.request_id, by="reviewer")
    dead_id = ex.id
    note(
        ex.id,
        "claimed-by-dead-worker",
        f"approved elsewhere; its tool run then claimed by {DEAD_WORKER} through a direct"
        " UPDATE on the outbox (a worker on another host that died mid-run)",
    )
    await reviewer.close()

    end = clock.now()
    executions: dict[str, Any] = {}
    specs: dict[str, Any] = {}
    requests: list[str] = []
    for ex_id, (scenario, what) in scenarios.items():
        history = await host.get_execution(ex_id)
        data = execution_to_data(history.execution)
        spec = data.pop("agent")
        specs[spec["tag"]] = spec
        requests += [r["request_id"] for r in data["requests"]]
        executions[ex_id] = {
            "scenario": scenario,
            "what": what,
            "agent": spec["tag"],
            "events": len(history.events),
            "pending": [r.request_id for r in history.pending_approvals],
            "state": data,
            "audit": converter.unstructure(await host.audit(execution_id=ex_id)),
        }
    deliveries = {}
    for request_id in requests:
        found = await host.deliveries(request_id)
        if found:
            deliveries[request_id] = converter.unstructure(found)
    await host.close()

    db = sqlite3.connect(DB)
    with db:
        claimed = db.execute(
            "UPDATE outbox SET claimed_by = ? WHERE execution_id = ? AND claimed_by IS NULL",
            (DEAD_WORKER, dead_id),
        ).rowcount
        assert claimed == 1, claimed
    outbox = db.execute("SELECT execution_id, body, claimed_by FROM outbox ORDER BY id").fetchall()
    snapshots = [row[0] for row in db.execute("SELECT execution_id FROM snapshots")]
    (version,) = db.execute("PRAGMA user_version").fetchone()
    db.close()
    for ex_id, body, claimed_by in outbox:
        executions[ex_id].setdefault("outbox", []).append(
            {"command": json.loads(body), "claimed_by": claimed_by}
        )
    assert version == 2, version
    assert not DB.with_name(DB.name + "-wal").exists(), "the WAL was not checkpointed"

    expected = {
        "about": (
            "Expected contents of v2.sqlite3, written by make_v2_corpus.py against Clearance "
            f"{WRITTEN_BY} (schema 2). 'state' is execution_to_data() without 'agent' (the "
            "spec is under 'agents' by tag); 'outbox' is the raw schema-2 outbox row, for the "
            f"record only. The claim by {DEAD_WORKER} was made by a direct UPDATE."
        ),
        "written_by": WRITTEN_BY,
        "schema_version": version,
        "clock_start": START.isoformat(),
        "clock_end": end.isoformat(),
        "ids": "SequentialIds('v2-')",
        "public_url": PUBLIC_URL,
        "dead_worker": DEAD_WORKER,
        "snapshots": snapshots,
        "agents": dict(sorted(specs.items())),
        "executions": jsonable(executions),
        "deliveries": jsonable(deliveries),
        "tool_runs_while_writing": jsonable(handlers.calls),
    }
    EXPECTED.write_text(json.dumps(expected, indent=1, sort_keys=False) + "\n")
    print(f"clearance from {clearance.__file__}")
    print(f"wrote {DB} ({DB.stat().st_size} bytes) and {EXPECTED}")
    for ex_id, entry in executions.items():
        print(f"  {ex_id:12} {entry['state']['status']:18} {entry['scenario']}")


if __name__ == "__main__":
    asyncio.run(main())
