"""Benchmark 10: `clearance audit verify` over a large audit log.

The log is filled as the stores write it (`core.audit_chain.extend`, each record's
entry, previous hash and hash beside its body, the head row last), with records of
refund decisions whose parameters and reason vary, written straight into the store's
tables (100,000 records; writing them through 100,000 approval cycles would measure the
cycle, which benchmark 1 does). Then `Clearance.verify_audit()` reads the whole chain
back a page at a time, parses each record, recomputes its entry and hash and checks
the links and the head: the seconds that takes, on SQLite (a file of its own) and on
PostgreSQL (a schema of its own, dropped after), best of three runs.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from bench import postgres
from bench.common import Section, Sizes, scratch_dir, table
from clearance import Clearance
from clearance.adapters.packed_json import compact_json
from clearance.core import audit_chain
from clearance.core.commands import AuditRecord
from clearance.core.wire import converter

T0 = datetime(2026, 1, 1, tzinfo=UTC)
# (request id, execution id, body, entry, prev hash, hash): an audit row as stored.
Row = tuple[str, str, str, str, str, str]


def records(n: int) -> list[AuditRecord]:
    return [
        AuditRecord(
            request_id=f"apr-{i:08d}",
            execution_id=f"exec-{i:08d}",
            agent_tag="support-agent",
            tool="process-refund",
            decision="approved" if i % 5 else "rejected",
            at=T0 + timedelta(seconds=i),
            parameters={"orderId": f"ORD-{i}", "amount": i % 1000 + 0.5, "currency": "EUR"},
            by=f"reviewer-{i % 7}",
            by_kind="reviewer",
            reason=None if i % 5 else "Amount exceeds policy limit",
        )
        for i in range(n)
    ]


def rows(n: int) -> tuple[list[Row], str]:
    """The stored rows of `n` records, and the chain's head."""
    made = records(n)
    links = audit_chain.extend(audit_chain.genesis([]), made)
    out = [
        (
            r.request_id or "",
            r.execution_id,
            compact_json(converter.unstructure(r)),
            link.entry,
            link.prev_hash,
            link.hash,
        )
        for r, link in zip(made, links, strict=True)
    ]
    return out, links[-1].hash


async def _sqlite(n: int, filled: list[Row], head: str) -> float:
    with scratch_dir("audit") as folder:
        return await _sqlite_in(str(folder / "audit.db"), n, filled, head)


async def _sqlite_in(path: str, n: int, filled: list[Row], head: str) -> float:
    async with Clearance.open(f"sqlite:///{path}") as app:
        db = app.store._db  # type: ignore[attr-defined]
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO audit (request_id, execution_id, body, entry, prev_hash, hash)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            filled,
        )
        db.execute("UPDATE audit_head SET hash = ?, records = ? WHERE id = 1", (head, n))
        db.execute("COMMIT")
        return await _best(app, n)


async def _postgres(url: str, n: int, filled: list[Row], head: str) -> float:
    async with Clearance.open(url) as app:
        store: Any = app.store
        async with store._conn() as conn, conn.transaction():
            async with (
                conn.cursor() as cur,
                cur.copy(
                    "COPY clearance_audit (request_id, execution_id, body, entry, prev_hash, hash)"
                    " FROM STDIN"
                ) as copy,
            ):
                for row in filled:
                    await copy.write_row(row)
            await conn.execute(
                "UPDATE clearance_audit_head SET hash = %s, records = %s WHERE id = 1", (head, n)
            )
        return await _best(app, n)


async def _best(app: Clearance, n: int) -> float:
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        verdict = await app.verify_audit()
        best = min(best, time.perf_counter() - began)
        assert verdict.intact and verdict.records == n, verdict
    return best


def run(sizes: Sizes) -> Section:
    n = 2_000 if sizes.quick else 100_000
    filled, head = rows(n)
    section = Section("10. `clearance audit verify` over a large audit log")
    section.add(
        f"{n:,} chained records of refund decisions, written as the stores write them;"
        " `Clearance.verify_audit()` (what `clearance audit verify` runs) reads them back a"
        " page of 10,000 at a time, re-derives every entry and hash and checks every link"
        " and the head. Best of three.",
        "",
    )
    sqlite_s = asyncio.run(_sqlite(n, filled, head))
    lines = [("SQLite (WAL, one file)", f"{sqlite_s:.2f}", f"{n / sqlite_s:,.0f}")]
    skipped = postgres.unreachable()
    if skipped is None:
        with postgres.schema() as url:
            postgres_s = asyncio.run(_postgres(url, n, filled, head))
        lines.append(("PostgreSQL", f"{postgres_s:.2f}", f"{n / postgres_s:,.0f}"))
    else:
        lines.append(("PostgreSQL", skipped, "-"))
    section.add(*table(("store", "seconds", "records/s"), lines))
    return section
