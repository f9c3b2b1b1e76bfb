"""One reading of a point in time (`core.deadlines`): the CLI's `extend --until` and
`reviewer delegate --until`, the HTTP API's extend `payload.until` and Python's
`signal(..., until=)` accept and refuse the same inputs, with one message that differs
only in where the value came from. A time without its offset is refused everywhere.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest
from conftest import define_refund_agent
from test_cli import _acli_as
from test_http_api import API_KEY, Api, hosted

from clearance import Grant, HumanInLoop, Refusal, Reviewer
from clearance.core.deadlines import ACCEPTED, BadDeadline, parse_deadline
from clearance.core.execution import iso
from clearance.testing import FakeClock

# -- the parser ------------------------------------------------------------------------------

AT = datetime(2026, 12, 5, 18, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-12-05T18:00Z", AT),
        ("2026-12-05T18:00:00Z", AT),
        ("2026-12-05t18:00z", AT),
        ("2026-12-05 19:00+01:00", AT),
        ("2026-12-05T19:00+0100", AT),
        ("2026-12-05T18:00:00.250-00:00", AT + timedelta(milliseconds=250)),
        ("2026-12-05T18:00:00.000000999Z", AT),  # kept to the microsecond
        ("  2026-12-05T13:00-05:00\n", AT),
        (datetime(2026, 12, 5, 20, tzinfo=timezone(timedelta(hours=2))), AT),
        (AT, AT),
    ],
)
def test_a_date_time_and_offset_is_read_as_utc(value: Any, expected: datetime) -> None:
    at = parse_deadline(value, "--until")
    assert at == expected and at.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("2026-12-05T18:00", "'2026-12-05T18:00' has no offset, so it could be any time zone's"),
        (
            datetime(2026, 12, 5, 18),
            "datetime.datetime(2026, 12, 5, 18, 0) has no offset (tzinfo), so it could be"
            " any time zone's",
        ),
        ("2026-12-05", "'2026-12-05' is a date without a time of day"),
        ("2026-12-05+01:00", "'2026-12-05+01:00' is a date without a time of day"),
        (date(2026, 12, 5), "datetime.date(2026, 12, 5) is a date without a time of day"),
        ("tomorrow", "'tomorrow' is not an ISO-8601 date and time"),
        ("", "is empty"),
        (" ", "is empty"),
        (None, "is missing"),
        ("\ud800", "'\\ud800' is not an ISO-8601 date and time"),
        ("2026-12-05T18:00Z\ud800", "'2026-12-05T18:00Z\\ud800' is not an ISO-8601 date"),
        ("٢٠٢٦-12-05T18:00Z", "is not an ISO-8601 date and time"),  # ASCII digits only
        ("10000-01-01T00:00Z", "'10000-01-01T00:00Z' is past the year 9999"),
        ("9999-12-31T23:00-05:00", "is outside the years 0001 to 9999 in UTC"),
        ("0001-01-01T00:30+01:00", "is outside the years 0001 to 9999 in UTC"),
        ("0000-01-01T00:00Z", "is not a real time (year 0 is out of range)"),
        ("2026-02-30T18:00Z", "is not a real time (day is out of range for month)"),
        ("2026-12-05T18:00+24:00", "is not an ISO-8601 date and time"),
        (1765044000, "1765044000 is not a date and time"),
        (float("nan"), "nan is not a date and time"),
        (float("inf"), "inf is not a date and time"),
        (True, "True is not a date and time"),
    ],
)
def test_anything_else_is_refused_saying_what_is_accepted(value: Any, problem: str) -> None:
    with pytest.raises(BadDeadline) as refused:
        parse_deadline(value, "--until")
    message = str(refused.value)
    assert message.startswith("--until ") and message.endswith(f"; {ACCEPTED}")
    assert problem in message
    message.encode("utf-8")  # a lone surrogate is quoted as an escape: printable anywhere


def test_a_long_text_is_quoted_short() -> None:
    with pytest.raises(BadDeadline) as refused:
        parse_deadline("x" * 70_000, "payload.until")
    assert len(str(refused.value)) < 300 and "'…" in str(refused.value)


# -- the four entry points -----------------------------------------------------------------


@attrs.frozen
class Row:
    """One input: `value` from Python; the CLI and the HTTP API send `text` (a datetime's
    isoformat: a naive datetime and its text are one input). `accepted`: the deadline it
    gives; else `problem`, part of the one message."""

    name: str
    value: Any
    accepted: datetime | None = None
    problem: str = ""

    @property
    def text(self) -> str:
        return self.value.isoformat() if isinstance(self.value, datetime) else str(self.value)


def rows(base: datetime) -> list[Row]:
    """The table, from `base` (a request's minute): accepted deadlines come later and
    later (each extension moves one request further), within the tool's 2 hours."""
    plus = timedelta(minutes=1)
    return [
        Row("with Z", f"{base + 20 * plus:%Y-%m-%dT%H:%M}Z", base + 20 * plus),
        Row(
            "with +02:00",
            (base + 30 * plus).astimezone(timezone(timedelta(hours=2))).isoformat(),
            base + 30 * plus,
        ),
        Row(
            "aware datetime",
            (base + 40 * plus).astimezone(timezone(timedelta(hours=-3, minutes=-30))),
            base + 40 * plus,
        ),
        Row("naive", f"{base + 50 * plus:%Y-%m-%dT%H:%M:%S}", problem="has no offset"),
        Row("naive datetime", (base + 50 * plus).replace(tzinfo=None), problem="has no offset"),
        Row("date only", f"{base:%Y-%m-%d}", problem="is a date without a time of day"),
        Row("garbage", "next tuesday", problem="is not an ISO-8601 date and time"),
        Row("empty", "", problem="is empty"),
        # \udcff: the one kind of lone surrogate a command line can carry (an undecodable
        # byte); the HTTP API refuses it in any body before reading a field.
        Row("lone surrogate", "\udcff", problem="'\\udcff' is not an ISO-8601 date"),
        Row("year 10000", "10000-01-01T00:00Z", problem="is past the year 9999"),
        Row("past UTC's years", "9999-12-31T23:00-05:00", problem="outside the years 0001"),
    ]


def message(row: Row, what: str) -> str:
    """The one refusal, as it reads for a value from `what`; `row.problem` in it."""
    value = row.value if what == "until=" else row.text
    with pytest.raises(BadDeadline) as refused:
        parse_deadline(value, what)
    text = str(refused.value)
    assert text.startswith(f"{what} ") and row.problem in text and ACCEPTED in text
    return text


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    """An instance on today's time (the CLI's clock is the system's), refunds open for
    5 minutes and extensible to 2 hours; reviewers alice (decide, extend), rita, lou."""
    async with hosted(tmp_path, FakeClock(datetime.now(UTC)), api_key=API_KEY) as instance:
        define_refund_agent(
            instance.app,
            instance.recorder,
            hitl=HumanInLoop(enabled=True, approval_timeout=300_000),
            max_approval_timeout="2h",
        )
        every = [Grant(("*",), ("*",), {"decide", "extend"})]
        for name in ("alice", "rita", "lou"):
            await instance.app.save_reviewer(Reviewer(name, every))
        yield instance


async def test_python_http_and_both_cli_commands_read_until_alike(api: Api, tmp_path: Path) -> None:
    app = api.app
    alice_key = await app.issue_key("alice")
    alice = await app.reviewer_identity("alice")
    bearer = {"Authorization": f"Bearer {alice_key}"}
    where = ("--db", str(tmp_path / "approvals.db"))
    # One request per entry point, all made at the same (fake) time: each moves its own
    # deadline later, row by row.
    python, http, cli = [await api.start() for _ in range(3)]
    table = rows(python.timestamp.replace(second=0, microsecond=0))

    for row in table:
        before = await api.snapshot()
        # Python
        try:
            ex = await app.signal(
                python.execution_id,
                "extend",
                request_id=python.request_id,
                until=row.value,
                by=alice,
            )
        except Refusal as refusal:
            assert (row.accepted, refusal.code) == (None, "invalid_deadline"), row
            assert str(refusal) == message(row, "until="), row
        else:
            moved = ex.request(python.request_id)
            assert moved is not None and moved.timeout == row.accepted, row
        # HTTP
        body = {"signal": "extend", "payload": {"requestId": http.request_id, "until": row.text}}
        answer = await api.client.post(
            f"/executions/{http.execution_id}/signal",
            content=json.dumps(body),  # ASCII, so a lone surrogate travels as \udcff
            headers={**bearer, "Content-Type": "application/json"},
        )
        error = answer.json().get("error", {})
        if row.accepted is not None:
            assert answer.status_code == 200, (row, answer.text)
            assert answer.json()["expiresAt"] == iso(row.accepted), row
        elif row.name == "lone surrogate":
            assert (answer.status_code, error["code"]) == (422, "invalid_body"), row
        else:
            assert (answer.status_code, error["code"]) == (422, "invalid_deadline"), row
            assert error["message"] == message(row, "payload.until"), row
        # The CLI: extend, and reviewer delegate.
        extend, delegate = await asyncio.gather(
            _acli_as(tmp_path, alice_key, "extend", cli.request_id, "--until", row.text, *where),
            _acli_as(
                tmp_path,
                None,
                "reviewer",
                "delegate",
                "rita",
                "--to",
                "lou",
                *("--until", row.text, *where),
            ),
        )
        for command, (code, out, err) in (("extend", extend), ("reviewer", delegate)):
            assert "Traceback" not in err, (row, err)
            if row.accepted is not None:
                assert code == 0, (row, command, err)
                assert iso(row.accepted) in out, (row, command, out)
            else:
                assert code == 2, (row, command, out, err)
                assert err == f"clearance {command}: error: {message(row, '--until')}\n", row
        if row.accepted is None:
            assert await api.snapshot() == before, row

    final = {r.request_id: r.timeout for r in await app.pending()}
    last = max(r.accepted for r in table if r.accepted is not None)
    assert [final[r.request_id] for r in (python, http, cli)] == [last] * 3
    [rita] = [r for r in await app.reviewers() if r.name == "rita"]
    assert [(d.to, d.until) for d in rita.delegations] == [("lou", last)]


async def test_a_refused_deadline_is_refused_before_the_request_is_looked_at(api: Api) -> None:
    """As over HTTP (the body is read first): a bad until is invalid_deadline even for a
    request that does not exist, and nothing is loaded or changed."""
    with pytest.raises(Refusal) as refused:
        await api.app.signal("exec-nope", "extend", request_id="apr-nope", until="soon", by="x")
    assert refused.value.code == "invalid_deadline"
    assert str(refused.value).startswith("until= 'soon' is not an ISO-8601 date and time")
