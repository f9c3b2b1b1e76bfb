"""A host for tests/test_namespaces.py, run inside its own PID and UTS namespace.

    python namespace_host.py STORE RUNS_FILE LABEL [--tool-seconds S] [--model-seconds S]

Hosts the agent `ns-agent` on the store at the URL STORE (public API only) and takes
one JSON command per stdin line:

    {"cmd": "run", "input": "..."}                                -> {"event": "ran", ...}
    {"cmd": "start", "input": "..."}                  run without waiting (no answer)
    {"cmd": "approve", "execution_id": "...", "request_id": "..."}  -> {"event": "signalled", ...}
    {"cmd": "exit"}                                   leave `async with` cleanly and exit 0

stdout is one JSON object per line; the first is {"event": "ready", "pid", "hostname"}.
The gated tool `slow-refund` appends one line per run to RUNS_FILE (fsync'd,
O_APPEND) *before* it sleeps --tool-seconds, then returns {"ranBy": LABEL, ...}:
the runs can be counted from outside, and the result tells who recorded it.
Each model call likewise appends a line to RUNS_FILE.model before it sleeps
--model-seconds and replies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
from typing import Any

from crash_process import open_options  # a short lease where the runtime has leases

from clearance import Clearance, HumanInLoop, ModelRequest, Tool, ToolContext
from clearance.testing import ScriptedModel, text, tool_use

REFUND = {"orderId": "ORD-NS", "amount": 50}


def say(**data: Any) -> None:
    print(json.dumps(data), flush=True)


def append(path: str, **data: Any) -> None:
    """One line, on disk before the caller goes on: a SIGKILL a moment later keeps it."""
    data.update(pid=os.getpid(), hostname=socket.gethostname())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(data) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def define(
    app: Clearance, runs_file: str, label: str, tool_seconds: float, model_seconds: float = 0
) -> None:
    async def script(request: ModelRequest) -> list[dict[str, Any]]:
        append(runs_file + ".model", label=label, execution=request.execution_id)
        await asyncio.sleep(model_seconds)
        last = request.messages[-1]["content"]
        if isinstance(last, str):
            return [text("Refunding."), tool_use("slow-refund", REFUND)]
        content = next(b for b in last if b.get("type") == "tool_result")["content"]
        with contextlib.suppress(TypeError, ValueError):
            ran_by = json.loads(content).get("ranBy")
            if ran_by:
                return [text(f"Refunded; the result was recorded from host {ran_by}.")]
        return [text("Finished: " + json.dumps(content))]

    async def slow_refund(ctx: ToolContext, params: dict[str, Any]) -> dict[str, Any]:
        append(runs_file, label=label, key=ctx.idempotency_key, execution=ctx.execution_id)
        await asyncio.sleep(tool_seconds)
        return {"refunded": params["amount"], "ranBy": label}

    app.define(
        tag="ns-agent",
        model=ScriptedModel(script),
        tools=[
            Tool(
                tag="slow-refund",
                requires_confirmation=True,
                parameters={
                    "orderId": {"type": "string", "required": True},
                    "amount": {"type": "number", "required": True},
                },
                handler=slow_refund,
            )
        ],
        human_in_loop=HumanInLoop(enabled=True, approval_timeout=600_000),
    )


async def host(args: argparse.Namespace) -> None:
    async with Clearance.open(args.store, poll_interval=0.05, **open_options()) as app:
        define(app, args.runs_file, args.label, args.tool_seconds, args.model_seconds)
        say(
            event="ready",
            pid=os.getpid(),
            hostname=socket.gethostname(),
            label=args.label,
            interfaces=sorted(os.listdir("/sys/class/net")),
        )
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        pending: set[asyncio.Task[None]] = set()

        async def approve(execution_id: str, request_id: str) -> None:
            ex = await app.signal(
                execution_id, "approve", request_id=request_id, by=f"host-{args.label}"
            )
            say(event="signalled", execution_id=ex.id, status=ex.status, output=ex.output)

        while line := await reader.readline():
            command = json.loads(line)
            if command["cmd"] == "exit":
                break
            if command["cmd"] == "run":
                ex = await app.run("ns-agent", input=command["input"])
                say(
                    event="ran",
                    execution_id=ex.id,
                    status=ex.status,
                    request_id=ex.pending_approvals[0].request_id if ex.pending_approvals else None,
                )
            elif command["cmd"] == "start":  # run without waiting for it
                task = asyncio.create_task(app.run("ns-agent", input=command["input"]))
                pending.add(task)
                task.add_done_callback(pending.discard)
            elif command["cmd"] == "approve":
                # In a task: the tool run takes a while, and this host keeps listening.
                task = asyncio.create_task(approve(command["execution_id"], command["request_id"]))
                pending.add(task)
                task.add_done_callback(pending.discard)
    say(event="closed")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store", help="the store URL")
    parser.add_argument("runs_file")
    parser.add_argument("label")
    parser.add_argument("--tool-seconds", type=float, default=4.0)
    parser.add_argument("--model-seconds", type=float, default=0.0)
    asyncio.run(host(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
