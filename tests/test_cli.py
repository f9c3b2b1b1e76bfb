"""The `clearance` command, as a user runs it: real processes on a real SQLite file.

The demo runs in a subprocess (auto, interactive through stdin, timed out,
decided from another process while it waits at the prompt). The decision
commands run in a subprocess against an agent hosted by this test with the
system clock, which must pick their decisions up without a restart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from clearance import Clearance, HumanInLoop, ModelRequest, ToolContext
from clearance.cli import main, parse_assignment
from clearance.core.execution import TERMINAL, Execution
from clearance.core.json_value import loads
from clearance.demo import (
    AGENT_TAG,
    REFUND_PARAMS,
    USER_INPUT,
    define_refund_agent,
    final_answer,
    money,
    refund_script,
    refund_tools,
)
from clearance.testing import ScriptedModel, text, tool_use

APPROVED_ANSWER = "I've processed the $50 refund for order ORD-123"
REJECTED_ANSWER = "I wasn't able to process the refund. The approval was rejected because"
ESCALATE = "Would you like me to escalate this to a supervisor?"
TIMEOUT_ANSWER = (
    "I wasn't able to process the refund because the approval request timed out. "
    "Would you like me to try again, or would you prefer to handle this manually?"
)


def _env() -> dict[str, str]:
    # No real API key leaks into the demo: these tests are about the scripted model.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CLEARANCE_DB", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "COLUMNS")
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli(
    cwd: Path, *args: str, input: str | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    """`clearance ARGS` in a fresh process, in `cwd` (never the repo: ./clearance would
    shadow the installed package)."""
    return subprocess.run(
        [sys.executable, "-m", "clearance", *args],
        cwd=cwd,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )


async def acli(cwd: Path, *args: str, columns: int | None = None) -> tuple[int, str, str]:
    """`cli` without blocking the event loop, so an agent hosted by the test keeps running.
    `columns`: as if on a terminal that wide."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clearance",
        *args,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env() | ({"COLUMNS": str(columns)} if columns else {}),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def printed_request(stdout: str) -> dict[str, Any]:
    """The approval request the demo printed as indented JSON."""
    start = stdout.index("\n{\n") + 1
    end = stdout.index("\n}\n", start) + 2
    data: dict[str, Any] = json.loads(stdout[start:end])
    return data


def no_traceback(proc: subprocess.CompletedProcess[str] | tuple[int, str, str]) -> None:
    text = proc.stderr if isinstance(proc, subprocess.CompletedProcess) else proc[2]
    assert "Traceback" not in text


# -- the demo ------------------------------------------------------------------------------


def test_demo_auto_approve(tmp_path: Path) -> None:
    proc = cli(tmp_path, "demo", "--auto", "approve", "--by", "alice")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert str(tmp_path / "clearance.db") in out  # where the database is
    assert "scripted model" in out
    request = printed_request(out)
    assert set(request) == {
        "requestId",
        "executionId",
        "agentTag",
        "tool",
        "parameters",
        "reason",
        "timestamp",
        "timeout",
    }
    assert request["agentTag"] == "safe-agent"
    assert request["tool"] == "process-refund"
    assert request["parameters"] == {"orderId": "ORD-123", "amount": 50, "reason": "Damaged item"}
    assert request["reason"] == "Refund request requires approval"
    assert request["requestId"].startswith("apr-") and request["timeout"].endswith("Z")
    assert f"clearance pending --db {tmp_path / 'clearance.db'}" in out
    assert "refunding $50 for order ORD-123" in out  # the handler ran, once
    assert out.count("[process-refund handler]") == 1
    assert f"Agent: {APPROVED_ANSWER}." in out
    assert (tmp_path / "clearance.db").is_file()

    audit = cli(tmp_path, "audit", "--json")
    records = [json.loads(line) for line in audit.stdout.splitlines()]
    assert [(r["decision"], r["by"], r["requestId"]) for r in records] == [
        ("approved", "alice", request["requestId"])
    ]
    table = cli(tmp_path, "audit").stdout.splitlines()
    assert table[0].startswith("1 decision(s) in ") and "(time, decision, request" in table[0]
    assert f"approved  {request['requestId']}  process-refund" in table[1]


def test_demo_auto_reject(tmp_path: Path) -> None:
    proc = cli(tmp_path, "demo", "--auto", "reject", "--db", "r.db")
    assert proc.returncode == 0, proc.stderr
    assert (
        f"{REJECTED_ANSWER} the amount exceeds the refund limit. {ESCALATE}" in proc.stdout
    )  # the spec's sentence, word for word
    assert "[process-refund handler]" not in proc.stdout  # a rejected call never runs
    assert (tmp_path / "r.db").is_file()

    proc = cli(tmp_path, "demo", "--auto", "reject", "--reason", "Not eligible", "--db", "r.db")
    assert f"{REJECTED_ANSWER} not eligible. {ESCALATE}" in proc.stdout


def test_demo_auto_modify(tmp_path: Path) -> None:
    proc = cli(tmp_path, "demo", "--auto", "approve", "--set", "amount=25")
    assert proc.returncode == 0, proc.stderr
    assert "refunding $25 for order ORD-123" in proc.stdout
    assert "Agent: I've processed the $25 refund for order ORD-123" in proc.stdout
    assert "[process-refund handler] refunding $50" not in proc.stdout

    proc = cli(tmp_path, "demo", "--auto", "modify")  # the spec's example: amount 25
    assert "I've processed the $25 refund for order ORD-123" in proc.stdout

    proc = cli(tmp_path, "demo", "--auto", "modify", "--set", "amount=abc")
    assert proc.returncode == 1
    no_traceback(proc)
    assert "amount" in proc.stderr and "[process-refund handler]" not in proc.stdout


def test_demo_interactive_modify_after_invalid_changes(tmp_path: Path) -> None:
    answers = "what\nm\namount=abc\nm\namount=25\n"
    proc = cli(tmp_path, "demo", "--by", "carol", input=answers)
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    assert "Please answer a (approve)" in proc.stdout
    assert "amount" in proc.stderr and "number" in proc.stderr  # the invalid field, named
    assert proc.stdout.count("[process-refund handler]") == 1
    assert "refunding $25" in proc.stdout
    assert "I've processed the $25 refund for order ORD-123" in proc.stdout
    assert 'approved by carol with changes {"amount": 25}' in proc.stdout


def test_demo_interactive_approve_and_reject(tmp_path: Path) -> None:
    proc = cli(tmp_path, "demo", input="a\n")
    assert proc.returncode == 0, proc.stderr
    assert f"Agent: {APPROVED_ANSWER}." in proc.stdout

    proc = cli(tmp_path, "demo", input="r\nAmount exceeds refund limit\n")
    assert proc.returncode == 0, proc.stderr
    assert f"{REJECTED_ANSWER} amount exceeds refund limit. {ESCALATE}" in proc.stdout
    assert "[process-refund handler]" not in proc.stdout


def test_demo_times_out_when_nobody_decides(tmp_path: Path) -> None:
    # stdin closed: the demo waits for another process or the timeout.
    proc = cli(tmp_path, "demo", "--timeout-ms", "300")
    assert proc.returncode == 0, proc.stderr
    assert "stdin is closed" in proc.stdout
    assert TIMEOUT_ANSWER in proc.stdout
    assert "[process-refund handler]" not in proc.stdout
    audit = cli(tmp_path, "audit", "--json")
    (record,) = [json.loads(line) for line in audit.stdout.splitlines()]
    assert record["decision"] == "timed_out"


async def test_demo_says_it_carries_on_what_an_interrupted_run_left(tmp_path: Path) -> None:
    db = tmp_path / "clearance.db"
    # An interrupted demo: its request was approved afterwards from the CLI, so its
    # refund waits for a process that hosts the agent.
    async with Clearance.open(f"sqlite:///{db}") as first:
        define_refund_agent(first, model=ScriptedModel(refund_script))
        ex = await first.run(AGENT_TAG, input=USER_INPUT)
    async with Clearance.open(f"sqlite:///{db}") as reviewer:
        await reviewer.decide(ex.pending_approvals[0].request_id, approved=True, by="ops")
    done = await asyncio.to_thread(cli, tmp_path, "demo", "--auto", "approve", "--scripted")
    assert done.returncode == 0, done.stderr
    assert f"An earlier run left 1 execution(s) mid-way: {ex.id}." in done.stdout
    async with Clearance.open(f"sqlite:///{db}") as after:
        assert (await after.get_execution(ex.id)).status == "completed"


def test_demo_notices_a_decision_made_by_another_process(tmp_path: Path) -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "clearance", "demo", "--db", "shared.db"],
        cwd=tmp_path,
        stdin=subprocess.PIPE,  # stays open: the demo sits at its prompt
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert demo.stdout is not None
        seen = []
        for line in demo.stdout:
            seen.append(line)
            if line.startswith("  clearance reject "):
                break
        request_id = printed_request("".join(seen))["requestId"]

        pending = cli(tmp_path, "pending", "--db", "shared.db", "--json")
        assert [json.loads(x)["requestId"] for x in pending.stdout.splitlines()] == [request_id]

        approve = cli(
            tmp_path,
            "approve",
            request_id,
            "--set",
            "amount=20",
            "--by",
            "bob",
            "--db",
            "shared.db",
        )
        assert approve.returncode == 0, approve.stderr
        assert f'{request_id}: approved by bob with changes {{"amount": 20}}.' in approve.stdout

        assert demo.wait(timeout=10) == 0
        rest = demo.stdout.read()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert 'Decided outside this terminal: approved by bob with changes {"amount": 20}.' in rest
    assert "I've processed the $20 refund for order ORD-123" in rest
    assert cli(tmp_path, "pending", "--db", "shared.db", "--json").stdout == ""


# -- deciding from another process, against an agent hosted here -----------------------------


class Host:
    """This test process hosting 'safe-agent' on the real clock, as an app would."""

    def __init__(self, app: Clearance, db: Path) -> None:
        self.app = app
        self.db = db
        self.refunds: list[dict[str, Any]] = []

    async def start(self) -> Execution:
        ex = await self.app.run(AGENT_TAG, input=USER_INPUT)
        assert ex.status == "awaiting_approval"
        return ex

    async def finished(self, execution_id: str, within: float = 10) -> Execution:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            ex = (await self.app.get_execution(execution_id)).execution
            if ex.status in TERMINAL:
                return ex
            await asyncio.sleep(0.02)
        raise AssertionError(f"execution {execution_id} did not finish within {within}s")


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    db = tmp_path / "host.db"
    async with Clearance.open(f"sqlite:///{db}", poll_interval=0.02) as app:
        h = Host(app, db)

        def on_refund(ctx: ToolContext, params: dict[str, Any]) -> None:
            h.refunds.append({**params, "key": ctx.idempotency_key, "by": ctx.approved_by})

        define_refund_agent(app, on_refund=on_refund)
        yield h


async def test_cli_approve_is_picked_up_by_the_hosting_process(host: Host, tmp_path: Path) -> None:
    ex = await host.start()
    (request,) = ex.pending_approvals
    db = str(host.db)

    code, out, err = await acli(
        tmp_path, "approve", request.request_id, "--set", "amount=25", "--by", "alice", "--db", db
    )
    assert code == 0, err
    assert f'{request.request_id}: approved by alice with changes {{"amount": 25}}.' in out
    assert '"amount": 25' in out and f"clearance show {ex.id}" in out

    done = await host.finished(ex.id)
    assert done.status == "completed"
    assert done.output is not None
    assert done.output.startswith("I've processed the $25 refund for order ORD-123")
    assert host.refunds == [
        {**REFUND_PARAMS, "amount": 25, "key": request.request_id, "by": "alice"}
    ]

    # A second decision: refused, naming the one that stands; nothing changes.
    again = await acli(tmp_path, "reject", request.request_id, "--reason", "late", "--db", db)
    assert again[0] == 1
    no_traceback(again)
    assert f"approval request {request.request_id} was already approved by alice" in again[2]
    assert len(host.refunds) == 1

    code, out, _ = await acli(tmp_path, "show", ex.id, "--db", db)
    assert code == 0
    assert "status completed" in out and "approved by alice" in out and "Audit:" in out
    code, out, _ = await acli(tmp_path, "show", ex.id, "--db", db, "--json")
    shown = json.loads(out)
    assert shown["status"] == "completed"
    assert [r["decision"] for r in shown["audit"]] == ["approved_modified"]
    assert shown["audit"][0]["modifiedParams"] == {"amount": 25}


async def test_cli_reject_is_picked_up_by_the_hosting_process(host: Host, tmp_path: Path) -> None:
    ex = await host.start()
    (request,) = ex.pending_approvals
    code, out, err = await acli(
        tmp_path,
        "reject",
        request.request_id,
        "--reason",
        "Amount exceeds refund limit",
        "--by",
        "dana",
        "--db",
        str(host.db),
    )
    assert code == 0, err
    assert f"{request.request_id}: rejected by dana: Amount exceeds refund limit." in out

    done = await host.finished(ex.id)
    assert done.output == f"{REJECTED_ANSWER} amount exceeds refund limit. {ESCALATE}"
    assert host.refunds == []

    again = await acli(tmp_path, "approve", request.request_id, "--db", str(host.db))
    assert again[0] == 1
    no_traceback(again)
    assert "already rejected by dana" in again[2] and "that decision stands" in again[2]


async def test_invalid_modified_params_change_nothing(host: Host, tmp_path: Path) -> None:
    ex = await host.start()
    (request,) = ex.pending_approvals
    db = str(host.db)
    for bad, field in (("amount=abc", "amount"), ("amout=25", "amout")):
        result = await acli(tmp_path, "approve", request.request_id, "--set", bad, "--db", db)
        assert result[0] == 1
        no_traceback(result)
        assert field in result[2]
    code, out, _ = await acli(tmp_path, "pending", "--db", db, "--json")
    assert code == 0
    assert [json.loads(line)["requestId"] for line in out.splitlines()] == [request.request_id]
    assert (await host.app.get_execution(ex.id)).status == "awaiting_approval"
    assert await host.app.audit() == []
    assert host.refunds == []


async def test_pending_lists_oldest_first_with_agent_filter(host: Host, tmp_path: Path) -> None:
    first = (await host.start()).pending_approvals[0]
    second = (await host.start()).pending_approvals[0]
    db = str(host.db)

    code, out, _ = await acli(tmp_path, "pending", "--db", db, "--json")
    assert code == 0
    listed = [json.loads(line) for line in out.splitlines()]
    assert [r["requestId"] for r in listed] == [first.request_id, second.request_id]
    assert listed[0] == first.to_dict()

    code, out, _ = await acli(tmp_path, "pending", "--db", db)
    lines = out.splitlines()
    assert lines[0].split() == ["REQUEST", "EXECUTION", "AGENT", "TOOL", "PARAMETERS", "EXPIRES"]
    assert lines[1].startswith(first.request_id) and lines[2].startswith(second.request_id)
    assert "safe-agent" in lines[1] and "process-refund" in lines[1]

    code, out, _ = await acli(tmp_path, "pending", "--db", db, "--agent", "other-agent")
    assert code == 0 and "No pending approval requests for agent 'other-agent'" in out
    code, out, _ = await acli(tmp_path, "pending", "--db", db, "--agent", AGENT_TAG, "--json")
    assert len(out.splitlines()) == 2


async def test_pending_fits_the_terminal_width(host: Host, tmp_path: Path) -> None:
    for _ in range(2):
        await host.start()
    db = str(host.db)
    code, out, _ = await acli(tmp_path, "pending", "--db", db)  # a pipe: whole lines
    assert code == 0
    whole = out.splitlines()
    assert "EXECUTION" in whole[0] and re.search(r"Z \(in \dm\d\ds\)$", whole[1]), whole
    # (width, the EXECUTION column shown, request ids whole)
    for columns, execution, whole_ids in (
        (200, True, True),
        (120, True, True),
        (100, False, True),
        (80, False, False),
        (60, False, False),
    ):
        code, out, _ = await acli(tmp_path, "pending", "--db", db, columns=columns)
        lines = out.splitlines()
        assert code == 0 and len(lines) == 3, out
        if columns >= max(map(len, whole)):
            assert [line.split("(in ")[0] for line in lines] == [
                line.split("(in ")[0] for line in whole
            ]
            continue
        assert ("EXECUTION" in lines[0]) == execution, (columns, lines)
        assert all(re.fullmatch(r"in \dm\d\ds", line.rsplit("  ", 1)[1]) for line in lines[1:])
        assert "…" in lines[1], lines  # the parameters were cut to fit
        if columns >= 80:
            assert max(map(len, lines)) <= columns, (columns, lines)
        shown = [line.split()[0] for line in lines[1:]]
        ids = [line.split()[0] for line in whole[1:]]
        if whole_ids:
            assert shown == ids
        else:  # a start of each, unique among all requests: what approve and show take
            assert all(len(s) >= 8 and i.startswith(s) for s, i in zip(shown, ids, strict=True))
            assert len(shown[0]) < len(ids[0])
            code, out, err = await acli(tmp_path, "show", shown[0], "--db", db)
            assert code == 0 and f"Execution {whole[1].split()[1]} " in out, err


# -- errors ---------------------------------------------------------------------------------


def test_errors_are_one_line_with_exit_codes(tmp_path: Path) -> None:
    cli(tmp_path, "demo", "--auto", "approve")  # creates ./clearance.db

    unknown = cli(tmp_path, "approve", "apr-nope")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "clearance: error: no approval request 'apr-nope'"

    missing = cli(tmp_path, "pending", "--db", "typo.db")
    assert missing.returncode == 1 and "no database at" in missing.stderr
    assert not (tmp_path / "typo.db").exists()  # not created by a typo

    for args in (
        ["reject", "apr-x"],  # no --reason
        ["approve", "apr-x", "--set", "amount"],  # not NAME=VALUE
        ["demo", "--auto", "maybe"],
        ["demo", "--timeout-ms", "0"],
        ["demo", "--auto", "reject", "--set", "amount=1"],
        [],
    ):
        usage = cli(tmp_path, *args)
        assert usage.returncode == 2, args
        no_traceback(usage)
        assert "error" in usage.stderr or "usage" in usage.stderr


def test_version_prints_the_installed_version(tmp_path: Path) -> None:
    from importlib import metadata

    done = cli(tmp_path, "--version")
    assert (done.returncode, done.stdout.strip()) == (
        0,
        f"clearance {metadata.version('clearance')}",
    )


def test_a_port_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    done = cli(tmp_path, "serve", "--port", "99999")
    assert done.returncode == 2
    no_traceback(done)
    assert "expected a TCP port, 1 to 65535, got '99999'" in done.stderr
    assert not (tmp_path / "clearance.db").exists()


def _foreign(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
    db.commit()
    db.close()


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: p.write_text("just some notes\n"), "is not a SQLite database"),
        (lambda p: p.write_bytes(bytes(range(256)) * 8), "is not a SQLite database"),
        (lambda p: p.write_bytes(b""), "is empty: it holds no Clearance database"),
        (_foreign, "another application's SQLite database (tables: orders)"),
        (lambda p: p.mkdir(), "is a directory"),
    ],
    ids=["text", "binary", "empty", "foreign", "directory"],
)
@pytest.mark.parametrize("command", [["pending"], ["audit"], ["show", "exec-1"]])
def test_a_file_that_is_no_clearance_database_is_one_line_and_left_untouched(
    tmp_path: Path, make: Callable[[Path], Any], says: str, command: list[str]
) -> None:
    path = tmp_path / "other.db"
    make(path)
    before = path.read_bytes() if path.is_file() else None
    done = cli(tmp_path, *command, "--db", str(path))
    assert done.returncode == 1, done
    no_traceback(done)
    assert len(done.stderr.strip().splitlines()) == 1 and says in done.stderr, done.stderr
    if before is not None:
        assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]  # no -wal, no -shm


async def test_audit_of_an_unknown_request_or_execution_says_so(host: Host, tmp_path: Path) -> None:
    await host.start()  # the database exists and holds a request
    db = str(host.db)
    for args, says in (
        (["--request", "apr-unknown"], "no approval request 'apr-unknown'"),
        (["--execution", "exec-unknown"], "no execution 'exec-unknown'"),
    ):
        code, out, err = await acli(tmp_path, "audit", *args, "--db", db)
        assert code == 1, (out, err)
        assert len(err.strip().splitlines()) == 1 and says in err


def _into_a_closed_pipe(cwd: Path, *args: str) -> tuple[int, bytes]:
    """`clearance ARGS` whose reader goes away before a line is written, as `| head -1`
    does mid-output: its exit code and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "clearance", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    return proc.wait(timeout=20), err


async def test_output_into_a_closed_pipe_ends_quietly(host: Host, tmp_path: Path) -> None:
    await host.start()
    code, err = await asyncio.to_thread(
        _into_a_closed_pipe, tmp_path, "pending", "--json", "--db", str(host.db)
    )
    assert code == 0, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err


async def test_a_tool_that_raises_is_logged_and_shown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "fail.db"

    def payment_api_down(ctx: ToolContext, params: dict[str, Any]) -> None:
        raise RuntimeError("payment API down")

    caplog.set_level(logging.WARNING, logger="clearance")
    async with Clearance.open(f"sqlite:///{db}") as app:
        define_refund_agent(app, on_refund=payment_api_down)
        ex = await app.run(AGENT_TAG, input=USER_INPUT)
        rid = ex.pending_approvals[0].request_id
        ex = await app.signal(ex.id, "approve", request_id=rid)
    [message] = [r.getMessage() for r in caplog.records if "payment API down" in r.getMessage()]
    assert ex.id in message and rid in message and "process-refund" in message
    code, out, err = await acli(tmp_path, "show", ex.id, "--db", str(db))
    assert code == 0, err
    assert "tool_failed" in out and "RuntimeError: payment API down" in out


@pytest.mark.parametrize("args", [["--help"], ["approve", "--help"], ["reject", "apr-x"]])
def test_help_and_usage_errors_do_not_import_the_runtime(tmp_path: Path, args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "clearance", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=20,
        env=_env(),
    )
    assert done.returncode in (0, 2), done.stderr
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "clearance.cli" in imported
    heavy = {"clearance.app", "clearance.core.decide", "httpx", "uvicorn", "jsonschema", "sqlite3"}
    assert imported.isdisjoint(heavy), sorted(imported & heavy)


async def test_a_request_id_by_its_unique_start_with_db_before_the_command(
    host: Host, tmp_path: Path
) -> None:
    first, second = await host.start(), await host.start()
    a = first.pending_approvals[0].request_id
    b = second.pending_approvals[0].request_id
    shared = a[: next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)]
    db = str(host.db)
    code, out, err = await acli(tmp_path, "--db", db, "approve", shared)
    assert code == 1 and "starts 2 request ids" in err and a in err, err
    assert len(err.strip().splitlines()) == 1
    code, out, err = await acli(tmp_path, "--db", db, "approve", a[: len(shared) + 1], "--json")
    assert code == 0, err
    answer = loads(out)
    assert (answer["requestId"], answer["decision"], answer["parameters"]["amount"]) == (
        a,
        "approved",
        50,
    )
    code, out, err = await acli(tmp_path, "reject", b, "--reason", "no", "--json", "--db", db)
    assert code == 0, err
    assert (loads(out)["decision"], loads(out)["reason"]) == ("rejected", "no")
    # Decided requests too: `show` takes a request's id (start) for its execution, and
    # `audit --request` a start of one.
    unique_b = b[: len(shared) + 1]
    code, out, err = await acli(tmp_path, "--db", db, "show", unique_b)
    assert code == 0, err
    assert out.startswith(f"Execution {second.id} "), out
    code, out, err = await acli(tmp_path, "--db", db, "audit", "--request", unique_b, "--json")
    assert code == 0, err
    assert [(r["requestId"], r["decision"]) for r in map(loads, out.splitlines())] == [
        (b, "rejected")
    ]
    code, out, err = await acli(tmp_path, "--db", db, "show", shared)
    assert code == 1 and "starts 2 request ids" in err, err
    code, out, err = await acli(tmp_path, "--db", db, "show", "apr-nothing-like-it")
    assert code == 1 and "no execution or approval request 'apr-nothing-like-it'" in err, err


def test_every_command_shows_examples_and_describes_its_arguments() -> None:
    from clearance.cli import EXAMPLES, build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(commands) == set(EXAMPLES)
    for name, command in commands.items():
        text = command.format_help()
        assert "examples:" in text and f"clearance {name}" in text.replace("--db PATH ", "")
        for action in command._actions:
            assert action.help, f"{name}: {action.dest} has no help"


def test_every_public_name_resolves_on_first_use() -> None:
    import clearance

    for name in clearance.__all__:
        assert getattr(clearance, name).__name__ == name


# -- in-process pieces -------------------------------------------------------------------


def test_parse_assignment() -> None:
    assert parse_assignment("amount=25") == ("amount", 25)
    assert parse_assignment("amount=25.5") == ("amount", 25.5)
    assert parse_assignment("reason=Damaged item") == ("reason", "Damaged item")
    assert parse_assignment("orderId=ORD-9") == ("orderId", "ORD-9")
    assert parse_assignment('tags=["a"]') == ("tags", ["a"])
    assert parse_assignment("note=a=b") == ("note", "a=b")
    assert parse_assignment("x=") == ("x", "")


def test_main_returns_exit_codes_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--help"]) == 0
    assert main(["pending", "--db", str(tmp_path / "none.db")]) == 1
    assert "no database at" in capsys.readouterr().err
    assert main(["demo", "--auto", "approve", "--db", str(tmp_path / "d.db")]) == 0
    assert APPROVED_ANSWER in capsys.readouterr().out


def _request_with(result: dict[str, Any]) -> ModelRequest:
    return ModelRequest(
        model="scripted",
        system="",
        messages=[
            {"role": "user", "content": USER_INPUT},
            {"role": "assistant", "content": []},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", **result}]},
        ],
        tools=[],
    )


def test_final_answer_reads_the_last_tool_result() -> None:
    refund = json.dumps({"orderId": "ORD-123", "amount": 50})
    assert final_answer(_request_with({"content": refund})) == f"{APPROVED_ANSWER}."
    modified = [
        {"type": "text", "text": "A human approved this call with modified parameters: ..."},
        {"type": "text", "text": json.dumps({"orderId": "ORD-123", "amount": 12.5})},
    ]
    assert final_answer(_request_with({"content": modified})).startswith(
        "I've processed the $12.50 refund for order ORD-123"
    )
    rejected = json.dumps({"error": "approval_rejected", "reason": "Over the limit."})
    assert final_answer(_request_with({"content": rejected, "is_error": True})) == (
        f"{REJECTED_ANSWER} over the limit. {ESCALATE}"
    )
    timeout = json.dumps({"error": "approval_timeout", "message": "..."})
    assert final_answer(_request_with({"content": timeout, "is_error": True})) == TIMEOUT_ANSWER
    assert money(50) == "$50" and money(25.5) == "$25.50"


# -- strict JSON at the command line ----------------------------------------------------------


def test_set_values_json_cannot_carry_are_refused() -> None:
    for raw in ("1e999", "-1e999", "NaN", "Infinity", "-Infinity", '"\\ud800"', '["\\udc00"]'):
        with pytest.raises(argparse.ArgumentTypeError) as refused:
            parse_assignment(f"amount={raw}")
        assert "amount" in str(refused.value) and "\n" not in str(refused.value)
    # What is not JSON at all stays text, as before.
    for raw in ("{bad", "1e", "ORD-9", "[1,", "Damaged item", "nan"):
        assert parse_assignment(f"x={raw}") == ("x", raw)


async def test_approve_with_an_out_of_range_number_is_refused(host: Host, tmp_path: Path) -> None:
    ex = await host.start()
    (request,) = ex.pending_approvals
    db = str(host.db)
    code, out, err = await acli(
        tmp_path, "approve", request.request_id, "--set", "amount=1e999", "--db", db
    )
    assert code == 2, (out, err)
    no_traceback((code, out, err))
    assert len(err.strip().splitlines()) == 1, err  # one line, naming the value
    assert "amount" in err and "1e999" in err
    assert (await host.app.get_execution(ex.id)).status == "awaiting_approval"
    assert await host.app.audit() == []
    assert host.refunds == []


async def test_a_nan_parameter_from_the_model_opens_no_request_and_json_output_stays_strict(
    host: Host, tmp_path: Path
) -> None:
    odd = {**REFUND_PARAMS, "amount": float("nan")}
    host.app.define(
        tag="odd-agent",
        model=ScriptedModel([[tool_use("process-refund", odd)], [text("Done.")]]),
        tools=refund_tools(),
        human_in_loop=HumanInLoop(enabled=True),
    )
    ex = await host.app.run("odd-agent", input=USER_INPUT)
    # The core refuses the call (the model hears why): nothing reaches a reviewer.
    assert ex.pending_approvals == [] and ex.status == "completed"
    db = str(host.db)
    code, out, err = await acli(tmp_path, "pending", "--db", db, "--agent", "odd-agent", "--json")
    assert (code, out.strip()) == (0, ""), err
    code, out, err = await acli(tmp_path, "show", ex.id, "--db", db, "--json")
    assert code == 0, err
    shown = loads(out)  # strict: no NaN anywhere
    assert shown["approvals"] == []
    assert host.refunds == []


def test_a_database_on_a_read_only_file_system_is_one_line_saying_so(tmp_path: Path) -> None:
    """As root a read-only file is writable anyway; a read-only mount is not (a bind
    mount in a mount namespace of the command's own)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "approvals.db"
    assert cli(tmp_path, "demo", "--db", str(db), "--auto", "reject").returncode == 0
    before = sorted(p.name for p in folder.iterdir())
    ro = f"mount --bind -o ro {folder} {folder}"
    probe = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f"{ro} && touch {folder}/x"],
        capture_output=True,
        text=True,
    )
    if "Read-only file system" not in probe.stderr:
        why = f"cannot make a read-only bind mount here: {probe.stderr.strip()[:200]}"
        if os.environ.get("CLEARANCE_REQUIRE_SERVICES") == "1":
            pytest.fail(f"CLEARANCE_REQUIRE_SERVICES=1 but {why}")
        pytest.skip(why)
    for command in ("pending", "audit", "approve apr-1"):
        done = subprocess.run(
            [
                "unshare",
                "--mount",
                "sh",
                "-c",
                f'{ro} && exec "$0" -m clearance {command} --db {db}',
                sys.executable,
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=_env(),
            timeout=30,
        )
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        no_traceback(done)
        assert "is on a read-only file system" in done.stderr, (command, done.stderr)
        assert "not a SQLite database" not in done.stderr
    assert sorted(p.name for p in folder.iterdir()) == before


def _on_a_terminal(cwd: Path, *args: str, **env: str) -> str:
    """`clearance ARGS` with its stdout on a pseudo-terminal; what it printed there."""
    import pty

    leader, follower = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "clearance", *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=follower,
            stderr=subprocess.PIPE,
            env=_env() | env,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        os.close(follower)
        out = b""
        with contextlib.suppress(OSError):  # EIO once everything written was read
            while chunk := os.read(leader, 65536):
                out += chunk
        return out.decode()
    finally:
        with contextlib.suppress(OSError):
            os.close(follower)
        os.close(leader)


def test_outcomes_are_coloured_on_a_terminal_only_and_never_with_no_color(
    tmp_path: Path,
) -> None:
    assert cli(tmp_path, "demo", "--db", "d.db", "--auto", "reject").returncode == 0
    red = "\x1b[31mrejected\x1b[0m"
    assert red in _on_a_terminal(tmp_path, "audit", "--db", "d.db")
    assert "\x1b[" not in _on_a_terminal(tmp_path, "audit", "--db", "d.db", NO_COLOR="1")
    piped = cli(tmp_path, "audit", "--db", "d.db")
    assert "rejected" in piped.stdout and "\x1b[" not in piped.stdout
    shown = cli(tmp_path, "audit", "--db", "d.db", "--json").stdout.splitlines()[0]
    execution = json.loads(shown)["executionId"]
    assert "status \x1b[32mcompleted\x1b[0m" in _on_a_terminal(
        tmp_path, "show", execution, "--db", "d.db"
    )


# -- several at once, and reviewers ------------------------------------------------------------


async def test_approve_several_and_reject_all_of_a_tool(host: Host, tmp_path: Path) -> None:
    runs = [await host.start() for _ in range(4)]
    ids = [ex.pending_approvals[0].request_id for ex in runs]
    db = str(host.db)
    code, out, err = await acli(tmp_path, "approve", ids[0], ids[1], "apr-nope", "--db", db)
    assert code == 1, err  # one refused: the others are decided all the same
    assert f"{ids[0]}: approved" in out and f"{ids[1]}: approved" in out
    assert "apr-nope: refused: no approval request" in out
    assert "2 decided, 1 refused." in out
    no_traceback((code, out, err))
    for ex in runs[:2]:
        assert (await host.finished(ex.id)).status == "completed"
    code, out, err = await acli(
        tmp_path,
        *("reject", "--all", "--agent", AGENT_TAG, "--tool", "process-refund"),
        *("--reason", "Fraud wave", "--by", "ops", "--db", db, "--json"),
    )
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(x["requestId"], x["ok"], x["decision"]) for x in lines] == [
        (ids[2], True, "rejected"),
        (ids[3], True, "rejected"),
    ]
    records = {r.request_id: (r.decision, r.by, r.by_kind) for r in await host.app.audit()}
    assert records[ids[3]] == ("rejected", "ops", "claimed")  # typed at a terminal
    assert len(host.refunds) == 2
    for args, says in (
        (["reject", "--reason", "x"], "give the REQUEST_IDs"),
        (["reject", ids[0], "--all", "--reason", "x"], "not both"),
        (["reject", ids[0], "--tool", "t", "--reason", "x"], "narrow --all"),
        (["approve", ids[0], ids[1], "--set", "amount=1"], "give one REQUEST_ID"),
    ):
        result = await acli(tmp_path, *args, "--db", db)
        assert result[0] == 2 and says in result[2], result


def test_reviewer_commands_add_list_key_revoke_remove(tmp_path: Path) -> None:
    db = str(tmp_path / "r.db")
    added = cli(
        tmp_path,
        *("reviewer", "add", "rita", "--tools", "process-refund,*-account"),
        *("--agents", "support-*", "--expires-in", "90d", "--db", db),
    )
    assert added.returncode == 0, added.stderr
    [key] = re.findall(r"clr_[a-z0-9]{12}_[A-Za-z0-9_-]{43}", added.stdout)
    assert "shown this once" in added.stdout
    again = cli(tmp_path, "reviewer", "add", "rita", "--db", db)
    assert again.returncode == 1 and "exists" in again.stderr
    listed = cli(tmp_path, "reviewer", "list", "--json", "--db", db)
    [rita] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert rita["grants"] == [
        {"agents": ["support-*"], "tools": ["process-refund", "*-account"], "actions": ["decide"]}
    ]
    [stored] = rita["keys"]
    assert stored["keyId"] == key[4:16] and stored["expiresAt"] and not stored["revokedAt"]
    assert key not in listed.stdout and key[17:] not in listed.stdout  # never the secret
    second = cli(tmp_path, "reviewer", "key", "rita", "--db", db)
    assert second.returncode == 0 and "clr_" in second.stdout
    revoked = cli(tmp_path, "reviewer", "revoke", key, "--db", db)
    assert revoked.returncode == 0 and f"Key {key[4:16]} revoked." in revoked.stdout
    twice = cli(tmp_path, "reviewer", "revoke", key[4:16], "--db", db)
    assert twice.returncode == 1 and "no valid key" in twice.stderr
    text = cli(tmp_path, "reviewer", "list", "--db", db).stdout
    assert text.startswith("rita: agents support-* tools process-refund,*-account (decide)")
    for args, says in (
        (["reviewer", "add", "bad name"], "reviewer name"),
        (["reviewer", "add", "x", "--actions", "delete"], "actions"),
        (["reviewer", "add", "y", "--expires-in", "soon"], "--expires-in is"),
    ):
        result = cli(tmp_path, *args, "--db", db)
        assert result.returncode == 2 and says in result.stderr, result
        assert "Traceback" not in result.stderr
    unknown = cli(tmp_path, "reviewer", "key", "nobody", "--db", db)
    assert unknown.returncode == 1 and "no reviewer 'nobody'" in unknown.stderr
    removed = cli(tmp_path, "reviewer", "remove", "rita", "--db", db)
    assert removed.returncode == 0
    assert "No reviewers" in cli(tmp_path, "reviewer", "list", "--db", db).stdout


def test_reviewer_delegate_hands_over_grants_for_a_while(tmp_path: Path) -> None:
    db = str(tmp_path / "r.db")
    for name in ("rita", "lou"):
        assert cli(tmp_path, "reviewer", "add", name, "--db", db).returncode == 0
    given = cli(tmp_path, "reviewer", "delegate", "rita", "--to", "lou", "--for", "7d", "--db", db)
    assert given.returncode == 0, given.stderr
    assert "lou may act with the grants of rita until" in given.stdout
    text = cli(tmp_path, "reviewer", "list", "--db", db).stdout
    assert "delegates to lou until" in text
    [rita] = [
        r
        for r in map(
            json.loads, cli(tmp_path, "reviewer", "list", "--json", "--db", db).stdout.splitlines()
        )
        if r["name"] == "rita"
    ]
    assert [d["to"] for d in rita["delegations"]] == ["lou"] and rita["delegations"][0]["until"]
    for args, says in (
        (["--to", "lou"], "--until TIME or --for DURATION"),
        (["--to", "lou", "--until", "next week"], "--until 'next week' is not an ISO-8601"),
        (["--to", "nobody", "--for", "1d"], "no reviewer 'nobody'"),
    ):
        result = cli(tmp_path, "reviewer", "delegate", "rita", *args, "--db", db)
        assert result.returncode in (1, 2) and says in result.stderr, result
        assert "Traceback" not in result.stderr
    past = cli(
        tmp_path,
        "reviewer",
        "delegate",
        "rita",
        "--to",
        "lou",
        "--until",
        "2020-01-01T00:00Z",
        "--db",
        db,
    )
    assert past.returncode == 0 and "no longer delegates" in past.stdout
    assert "delegates to" not in cli(tmp_path, "reviewer", "list", "--db", db).stdout


# -- quorums and extensions -----------------------------------------------------------------


async def _acli_as(cwd: Path, key: str | None, *args: str) -> tuple[int, str, str]:
    """`acli`, as the reviewer whose key is `key` ($CLEARANCE_REVIEWER_KEY)."""
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "clearance", *args),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env() | ({"CLEARANCE_REVIEWER_KEY": key} if key else {}),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_pending_show_and_extend_for_a_request_that_needs_two_approvals(
    tmp_path: Path,
) -> None:
    from conftest import Recorder
    from conftest import define_refund_agent as define_quorum_agent

    from clearance import Grant, Reviewer

    db = tmp_path / "quorum.db"
    async with Clearance.open(f"sqlite:///{db}", poll_interval=0.02) as app:
        define_quorum_agent(
            app,
            Recorder(),
            hitl=HumanInLoop(enabled=True),
            approvals_required=2,
            groups=["finance", "risk"],
            max_approval_timeout="2h",
            timeout_action="reject",
        )
        every = [Grant(("*",), ("*",), {"decide", "extend"})]
        await app.save_reviewer(Reviewer("alice", every, groups=["finance"]))
        await app.save_reviewer(Reviewer("bob", every, groups=["risk"]))
        alice, bob = await app.issue_key("alice"), await app.issue_key("bob")
        ex = await app.run("safe-agent", input="Refund order ORD-123", requested_by="carol")
        [request] = ex.pending_approvals
        rid, where = request.request_id, ("--db", str(db))

        claimed = await acli(tmp_path, "approve", rid, "--by", "alice", *where)
        assert claimed[0] == 1 and "CLEARANCE_REVIEWER_KEY" in claimed[2], claimed
        assert len(claimed[2].strip().splitlines()) == 1
        no_traceback(claimed)
        code, out, err = await _acli_as(tmp_path, alice, "approve", rid, *where)
        assert code == 0, err
        progress = "1 of 2 approvals (alice); still needed: 1 from risk"
        assert progress in out and "still pending" in out
        code, out, err = await acli(tmp_path, "pending", *where)
        header, line = out.splitlines()
        assert header.split() == [
            *("REQUEST", "EXECUTION", "AGENT", "TOOL", "PARAMETERS"),
            *("APPROVALS", "REQUESTER", "EXPIRES"),
        ]
        assert progress in line and "  carol  " in line
        code, out, err = await acli(tmp_path, "pending", "--json", *where)
        listed = json.loads(out)
        assert ([v["by"] for v in listed["votes"]], listed["requestedBy"]) == (["alice"], "carol")
        assert listed["stillNeeded"] == {"approvals": 1, "groups": ["risk"]}

        until = (request.timestamp + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        code, out, err = await _acli_as(tmp_path, bob, "extend", rid[:8], "--until", until, *where)
        assert code == 0, err
        assert f"{rid}: extended by bob; it now expires at {until}" in out
        extended = await app.request(rid)
        assert extended is not None and extended.timeout.strftime("%Y-%m-%dT%H:%M:%SZ") == until
        for key, args, exit_code, says in (
            (bob, ["--until", "tomorrow"], 2, "--until 'tomorrow' is not an ISO-8601 date"),
            (None, ["--until", until], 1, "CLEARANCE_REVIEWER_KEY"),
            (bob, ["--until", "2000-01-01T00:00Z", "--by", "alice"], 2, "bob"),
            ("clr_nope", ["--until", until], 1, "not a valid reviewer key"),
            (bob, ["--until", "2999-01-01T00:00Z"], 1, "2 hours at most"),
        ):
            result = await _acli_as(tmp_path, key, "extend", rid, *args, *where)
            assert result[0] == exit_code and says in result[2], result
            assert len(result[2].strip().splitlines()) == 1
            no_traceback(result)

        code, out, err = await acli(tmp_path, "show", rid, *where)
        assert code == 0, err
        assert "Requested by: carol" in out and f"pending: {progress}" in out
        assert "extended" in out and "vote" in out
        code, out, err = await _acli_as(tmp_path, bob, "approve", rid, "--json", *where)
        assert code == 0, err
        decided = json.loads(out)
        assert (decided["decision"], [v["by"] for v in decided["votes"]]) == (
            "approved",
            ["alice", "bob"],
        )
