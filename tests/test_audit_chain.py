"""The audit log as a hash chain: a record changed, removed or inserted with plain SQL
is named by `clearance audit verify`; concurrent deciders extend one unbroken chain.

(Four worker processes and two deciders on PostgreSQL, and hosts SIGKILLed at random
on SQLite and PostgreSQL, verify the chain too: tests/test_many_workers.py and
tests/test_crash.py.)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import rfc8785
from conftest import Recorder, define_refund_agent
from hypothesis import given, settings
from hypothesis import strategies as st
from postgres_server import postgres_url
from test_cli import acli
from test_postgres_store import url

from clearance import Clearance
from clearance.core import audit_chain
from clearance.core.audit_chain import ChainRow, Link, verify
from clearance.core.commands import AuditRecord
from clearance.testing import FakeClock

__all__ = ["postgres_url", "url"]  # the fixtures, for pytest

T0 = datetime(2024, 1, 15, 10, 30, tzinfo=UTC)


def record(n: int, **more: Any) -> AuditRecord:
    return AuditRecord(
        request_id=f"apr-{n}",
        execution_id=f"exec-{n}",
        agent_tag="support",
        tool="process-refund",
        decision="approved",
        at=T0 + timedelta(seconds=n),
        parameters={"amount": n},
        by="rita",
        **more,
    )


def chain(n: int) -> tuple[list[ChainRow], str]:
    start = audit_chain.genesis([])
    records = [record(i) for i in range(1, n + 1)]
    links = audit_chain.extend(start, records)
    rows = [
        ChainRow(i + 1, r, "{}", link)
        for i, (r, link) in enumerate(zip(records, links, strict=True))
    ]
    return rows, links[-1].hash


# -- the chain, pure --------------------------------------------------------------------------


def test_an_untouched_chain_verifies() -> None:
    rows, head = chain(5)
    verdict = verify(rows, head, 5)
    assert (verdict.intact, verdict.records, verdict.head) == (True, 5, head)
    assert verify([], audit_chain.genesis([]), 0).intact


def test_each_kind_of_tampering_is_named_at_its_record() -> None:
    rows, head = chain(6)
    changed = list(rows)
    changed[2] = ChainRow(3, record(3, reason="edited later"), "{}", rows[2].link)
    verdict = verify(changed, head, 6)
    assert not verdict.intact and verdict.row == 3 and verdict.records == 2
    assert "record 3 (apr-3: approved by rita" in (verdict.problem or "")
    assert "was changed" in (verdict.problem or "")

    removed = rows[:3] + rows[4:]
    verdict = verify(removed, head, 6)
    assert verdict.row == 5 and "breaks before record 5" in (verdict.problem or "")

    forged = record(99)
    fake = ChainRow(
        10,
        forged,
        "{}",
        Link(
            audit_chain.entry(forged),
            "0" * 64,
            audit_chain.link("0" * 64, audit_chain.entry(forged)),
        ),
    )
    inserted = [*rows[:2], fake, *rows[2:]]
    verdict = verify(inserted, head, 6)
    assert verdict.row == 10 and "was inserted" in (verdict.problem or "")

    verdict = verify(rows[:-2], head, 6)
    assert verdict.row is None and "last 2 record(s)" in (verdict.problem or "")


def test_parameters_and_reason_enter_the_chain_as_their_hashes() -> None:
    text = json.loads(audit_chain.entry(record(1, reason="too much")))
    assert "parameters" not in text and "reason" not in text
    assert text["parametersHash"] == audit_chain.sha256('{"amount":1}')
    assert text["reasonHash"] == audit_chain.sha256('"too much"')
    assert text["modifiedParamsHash"] is None


texts = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)) | st.sampled_from('\x00\x1f\x7f"\\\u2028'),
    max_size=12,
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    words=st.lists(texts | st.none(), min_size=7, max_size=7),
    parameters=st.dictionaries(texts, texts | st.integers() | st.none(), max_size=3),
    reason=texts | st.none(),
)
def test_an_entry_is_exactly_rfc8785_canonical_json(
    words: list[str | None], parameters: dict[str, Any], reason: str | None
) -> None:
    """The chain's entries are written by a faster encoder than `rfc8785`'s: byte for
    byte the same text, whatever the names and ids hold (controls, quotes, non-BMP)."""
    request_id, agent, tool, by, by_kind, rule, behalf = words
    said = AuditRecord(
        request_id=request_id,
        execution_id="exec-1",
        agent_tag=agent or "",
        tool=tool or "",
        decision="approved",
        at=T0,
        parameters=parameters,
        by=by,
        by_kind=by_kind,
        reason=reason,
        rule_id=rule,
        on_behalf_of=behalf,
    )
    text = audit_chain.entry(said)
    assert text == rfc8785.dumps(json.loads(text)).decode("utf-8")


def test_an_entry_with_a_lone_surrogate_is_refused_as_rfc8785_refuses_it() -> None:
    with pytest.raises(rfc8785.CanonicalizationError):
        audit_chain.entry(record(1, reason=None, rule_id="eve\ud800"))


# -- on SQLite, through the CLI -------------------------------------------------------------


async def decided(path: Path, recorder: Recorder, n: int) -> list[str]:
    """`n` refunds approved (and one rejected) on the SQLite file at `path`."""
    async with Clearance.open(f"sqlite:///{path}", clock=FakeClock()) as app:
        define_refund_agent(app, recorder)
        ids = []
        for i in range(n):
            ex = await app.run("safe-agent", input=f"Refund order ORD-{i}")
            [request] = ex.pending_approvals
            await app.decide(request.request_id, approved=i != 1, by="rita", reason="checked")
            ids.append(request.request_id)
        return ids


def tamper(path: Path, *statements: str) -> None:
    """What someone with write access to the file could do, append-only triggers or not."""
    db = sqlite3.connect(path)
    try:
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("DROP TRIGGER audit_no_delete")
        for statement in statements:
            db.execute(statement)
        db.commit()
    finally:
        db.close()


async def test_the_cli_verifies_the_chain_and_names_the_record_changed_with_sql(
    tmp_path: Path, recorder: Recorder
) -> None:
    path = tmp_path / "audit.db"
    await decided(path, recorder, 4)
    code, out, err = await acli(tmp_path, "--db", str(path), "audit", "verify")
    assert code == 0, err
    assert "is intact: 4 chained record(s)" in out
    code, out, _ = await acli(tmp_path, "--db", str(path), "audit", "export", "--jsonl")
    exported = [json.loads(line) for line in out.splitlines()]
    assert [e["id"] for e in exported] == [1, 2, 3, 4]
    for before, after in itertools.pairwise(exported):
        assert after["prevHash"] == before["hash"]
        assert audit_chain.link(after["prevHash"], after["entry"]) == after["hash"]
    head = sqlite3.connect(path).execute("SELECT hash FROM audit_head").fetchone()[0]
    assert exported[-1]["hash"] == head

    tamper(path, "UPDATE audit SET body = replace(body, '\"rita\"', '\"mallory\"') WHERE id = 3")
    code, out, _ = await acli(tmp_path, "--db", str(path), "audit", "verify")
    assert code == 1
    assert "was tampered with: record 3 " in out and "was changed" in out
    assert "2 record(s) before it are intact" in out
    code, out, _ = await acli(tmp_path, "--db", str(path), "audit", "verify", "--json")
    assert json.loads(out)["row"] == 3 and json.loads(out)["intact"] is False


async def test_a_row_deleted_or_inserted_with_sql_is_named(
    tmp_path: Path, recorder: Recorder
) -> None:
    path = tmp_path / "audit.db"
    await decided(path, recorder, 4)
    tamper(path, "DELETE FROM audit WHERE id = 2")
    code, out, _ = await acli(tmp_path, "--db", str(path), "audit", "verify")
    assert code == 1 and "breaks before record 3" in out

    path = tmp_path / "inserted.db"
    await decided(path, recorder, 3)
    tamper(
        path,
        "INSERT INTO audit (id, request_id, execution_id, body, entry, prev_hash, hash)"
        " SELECT 10, request_id, execution_id, body, entry, 'forged', hash FROM audit"
        " WHERE id = 1",
    )
    # Ids order the chain: a row given id 10 comes last, after the head's record.
    code, out, _ = await acli(tmp_path, "--db", str(path), "audit", "verify")
    assert code == 1 and "record 10" in out

    path = tmp_path / "truncated.db"
    await decided(path, recorder, 3)
    tamper(path, "DELETE FROM audit WHERE id = 3")
    code, out, _ = await acli(tmp_path, "--db", str(path), "audit", "verify")
    assert code == 1 and "the last 1 record(s) of the chain were removed" in out


async def test_audit_verify_and_export_refuse_the_listings_filters(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    async with Clearance.open(f"sqlite:///{path}"):
        pass
    code, _, err = await acli(tmp_path, "--db", str(path), "audit", "verify", "--request", "x")
    assert code == 2 and "covers the whole log" in err and "Traceback" not in err
    code, out, _ = await acli(tmp_path, "--db", str(path), "audit", "verify")
    assert code == 0 and "intact: 0 chained record(s)" in out


# -- on PostgreSQL, concurrent deciders -------------------------------------------------------


async def test_concurrent_deciders_on_postgresql_extend_one_chain(
    url: str, recorder: Recorder
) -> None:
    async with Clearance.open(url, clock=FakeClock()) as host:
        define_refund_agent(host, recorder)
        started = [host.run("safe-agent", input=f"Refund order ORD-{i}") for i in range(24)]
        requests = [ex.pending_approvals[0] for ex in await asyncio.gather(*started)]
        # Two more processes' worth of connections deciding at once, with the host.
        async with (
            Clearance.open(url, clock=FakeClock()) as one,
            Clearance.open(url, clock=FakeClock()) as two,
        ):
            deciders = [host, one, two]
            await asyncio.gather(
                *(
                    deciders[i % 3].decide(r.request_id, approved=i % 4 != 0, by="rita")
                    for i, r in enumerate(requests)
                )
            )
        verdict = await host.verify_audit()
        assert verdict.intact, verdict.problem
        assert verdict.records == len(await host.audit()) == 24
        base, schema = url.split("?schema=")
        async with await psycopg.AsyncConnection.connect(
            base, autocommit=True, options=f"-c search_path={schema}"
        ) as conn:
            await conn.execute("ALTER TABLE clearance_audit DISABLE TRIGGER USER")
            await conn.execute(
                "UPDATE clearance_audit SET body = replace(body, '\"rita\"', '\"eve\"')"
                " WHERE id = (SELECT min(id) + 5 FROM clearance_audit)"
            )
        verdict = await host.verify_audit()
        assert (
            not verdict.intact and verdict.records == 5 and "was changed" in (verdict.problem or "")
        )
