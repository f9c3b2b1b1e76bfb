"""The `clearance` command: run the demo, list pending approvals, decide them, read the log,
serve the HTTP API.

Every command works on one SQLite database (`--db`, or $CLEARANCE_DB, else
./clearance.db). Deciding needs no agent definition: `clearance approve` records
the decision and returns, and the process hosting the agent (the demo, your
app) notices it within its poll interval and carries on. Errors are one line
on stderr and exit code 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import shlex
import signal
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn

from clearance.app import Clearance
from clearance.core.commands import AuditRecord
from clearance.core.decide import duration
from clearance.core.errors import ClearanceError
from clearance.core.events import (
    Approved,
    Event,
    ModelFailed,
    ModelReplied,
    Rejected,
    Started,
    StopRequested,
    TimerFired,
    ToolFailed,
    ToolFinished,
)
from clearance.core.execution import (
    APPROVED,
    AWAITING_APPROVAL,
    CANCELLED,
    PENDING,
    REJECTED,
    TERMINAL,
    TIMED_OUT,
    ApprovalRequest,
    Execution,
    iso,
)
from clearance.core.wire import event_to_data
from clearance.definition import DEFAULT_TIMEOUT_MS
from clearance.demo import (
    AGENT_TAG,
    DEFAULT_REJECTION,
    USER_INPUT,
    define_refund_agent,
    demo_model,
    money,
)
from clearance.ports.tools import ToolContext

DB_ENV = "CLEARANCE_DB"
SECRET_ENV = "CLEARANCE_WEBHOOK_SECRET"  # secrets come from the environment, never argv
API_KEY_ENV = "CLEARANCE_API_KEY"
DEFAULT_DB = "clearance.db"
POLL_SECONDS = 0.2  # how often the demo looks for decisions made by other processes


class UsageError(Exception):
    """Arguments that parse but do not make sense together: exit code 2."""


def say(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


def warn(message: str) -> None:
    print(f"clearance: error: {message}", file=sys.stderr, flush=True)


def default_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "cli"


def parse_assignment(text: str) -> tuple[str, Any]:
    """`amount=25` -> ('amount', 25): the value is JSON when it parses, else a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. amount=25), got {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def db_path(args: argparse.Namespace, *, must_exist: bool) -> Path:
    path = Path(args.db or os.environ.get(DB_ENV) or DEFAULT_DB).expanduser().resolve()
    if must_exist and not path.is_file():
        raise ClearanceError(
            f"no database at {path}; pass --db PATH (or set ${DB_ENV}) to the database the "
            "agent uses, e.g. the one `clearance demo` printed"
        )
    return path


@asynccontextmanager
async def opened(path: Path) -> AsyncIterator[Clearance]:
    async with Clearance.open(f"sqlite:///{path}") as app:
        yield app


def _compact(value: Any, limit: int = 0) -> str:
    out = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    if limit and len(out) > limit:
        out = out[: limit - 1] + "…"
    return out


def _relative(at: datetime) -> str:
    seconds = int((at - datetime.now(UTC)).total_seconds())
    if seconds <= 0:
        return "expired"
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"in {hours}h{minutes:02d}m"
    if minutes:
        return f"in {minutes}m{seconds:02d}s"
    return f"in {seconds}s"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def sentence(text: str) -> str:
    """'rejected: Too expensive.' stays as it is; 'approved' -> 'approved.'."""
    return text if text.endswith((".", "!", "?")) else text + "."


def describe_decision(request: ApprovalRequest) -> str:
    by = f" by {request.decided_by}" if request.decided_by else ""
    if request.status == APPROVED:
        if request.modified_params:
            return f"approved{by} with changes {_compact(request.modified_params)}"
        return f"approved{by}"
    if request.status == REJECTED:
        because = f": {request.rejection_reason}" if request.rejection_reason else ""
        return f"rejected{by}{because}"
    if request.status == TIMED_OUT:
        return f"timed out after {duration(request.timeout_ms)}"
    if request.status == CANCELLED:
        return f"cancelled{by}"
    return request.status


def audit_to_dict(record: AuditRecord) -> dict[str, Any]:
    return {
        "requestId": record.request_id,
        "executionId": record.execution_id,
        "agentTag": record.agent_tag,
        "tool": record.tool,
        "decision": record.decision,
        "at": iso(record.at),
        "by": record.by,
        "parameters": record.parameters,
        "modifiedParams": record.modified_params,
        "reason": record.reason,
    }


def audit_line(record: AuditRecord) -> str:
    parts = [
        iso(record.at),
        record.decision,
        record.request_id,
        record.tool,
        f"params={_compact(record.parameters)}",
    ]
    if record.modified_params is not None:
        parts.append(f"modified={_compact(record.modified_params)}")
    if record.by:
        parts.append(f"by={record.by}")
    if record.reason:
        parts.append(f"reason={json.dumps(record.reason, ensure_ascii=False)}")
    return "  ".join(parts)


# -- pending / approve / reject / show / audit -------------------------------------------


async def cmd_pending(args: argparse.Namespace) -> int:
    path = db_path(args, must_exist=True)
    async with opened(path) as app:
        requests = await app.pending(args.agent)
    if args.json:
        for request in requests:
            say(json.dumps(request.to_dict(), ensure_ascii=False))
        return 0
    if not requests:
        which = f" for agent '{args.agent}'" if args.agent else ""
        say(f"No pending approval requests{which} in {path}.")
        return 0
    rows = [("REQUEST", "EXECUTION", "AGENT", "TOOL", "PARAMETERS", "EXPIRES")]
    for r in requests:
        rows.append(
            (
                r.request_id,
                r.execution_id,
                r.agent_tag,
                r.tool,
                _compact(r.parameters, 60),
                f"{iso(r.timeout)} ({_relative(r.timeout)})",
            )
        )
    say(*_table(rows))
    return 0


async def _decide(args: argparse.Namespace, approved: bool) -> int:
    path = db_path(args, must_exist=True)
    changes = dict(args.set or []) or None
    by = args.by or default_user()
    async with opened(path) as app:
        ex = await app.decide(
            args.request_id,
            approved=approved,
            modified_params=changes,
            reason=None if approved else args.reason,
            by=by,
        )
    request = ex.request(args.request_id)
    assert request is not None  # decide() found it
    say(sentence(f"{args.request_id}: {describe_decision(request)}"))
    if approved:
        say(f"'{request.tool}' will run with {_compact(request.effective_parameters())}.")
    say(
        f"Execution {ex.id} is {ex.status}; the process hosting agent '{ex.agent_tag}' "
        f"carries on from here (see: clearance show {ex.id} --db {shlex.quote(str(path))})."
    )
    return 0


async def cmd_approve(args: argparse.Namespace) -> int:
    return await _decide(args, approved=True)


async def cmd_reject(args: argparse.Namespace) -> int:
    return await _decide(args, approved=False)


def _event_summary(event: Event) -> str:
    if isinstance(event, Started):
        return f"input={json.dumps(event.input, ensure_ascii=False)}"
    if isinstance(event, ModelReplied):
        parts = []
        for block in event.content:
            if block.get("type") == "text":
                parts.append(json.dumps(block.get("text", ""), ensure_ascii=False))
            elif block.get("type") == "tool_use":
                parts.append(f"tool_use {block.get('name')} {_compact(block.get('input'))}")
        return f"turn {event.turn}: " + "; ".join(parts)
    if isinstance(event, ModelFailed):
        return f"turn {event.turn}: {event.error}"
    if isinstance(event, ToolFinished):
        return f"{event.tool_use_id}: {_compact(event.output, 100)}"
    if isinstance(event, ToolFailed):
        return f"{event.tool_use_id}: {event.error}"
    if isinstance(event, Approved):
        by = f" by {event.by}" if event.by else ""
        changes = f" with {_compact(event.modified_params)}" if event.modified_params else ""
        return f"{event.request_id}{by}{changes}"
    if isinstance(event, Rejected):
        by = f" by {event.by}" if event.by else ""
        return f"{event.request_id}{by}: {event.reason or '(no reason)'}"
    if isinstance(event, TimerFired):
        return event.request_id
    if isinstance(event, StopRequested):
        by = f" by {event.by}" if event.by else ""
        return f"{by.strip()} {event.reason or ''}".strip()
    return ""


def _request_dict(request: ApprovalRequest) -> dict[str, Any]:
    return {
        **request.to_dict(),
        "status": request.status,
        "decidedBy": request.decided_by,
        "decidedAt": iso(request.decided_at) if request.decided_at else None,
        "modifiedParams": request.modified_params,
        "rejectionReason": request.rejection_reason,
    }


async def cmd_show(args: argparse.Namespace) -> int:
    path = db_path(args, must_exist=True)
    async with opened(path) as app:
        history = await app.get_execution(args.execution_id)
        records = await app.audit(execution_id=args.execution_id)
    ex = history.execution
    if args.json:
        body = {
            "executionId": ex.id,
            "agentTag": ex.agent_tag,
            "status": ex.status,
            "input": ex.input,
            "output": ex.output,
            "error": ex.error,
            "requests": [_request_dict(r) for r in ex.requests],
            "events": [event_to_data(e) for e in history.events],
            "audit": [audit_to_dict(r) for r in records],
        }
        say(json.dumps(body, ensure_ascii=False, indent=2))
        return 0
    say(f"Execution {ex.id}  agent {ex.agent_tag}  status {ex.status}")
    say(f"Input:  {ex.input}")
    if ex.output is not None:
        say(f"Output: {ex.output}")
    if ex.error is not None:
        say(f"Error:  {ex.error}")
    if ex.requests:
        say("", "Approval requests:")
        for r in ex.requests:
            say(f"  {r.request_id}  {r.tool}  {_compact(r.parameters)}  {describe_decision(r)}")
    say("", "Events:")
    for event in history.events:
        say(f"  {iso(event.at)}  {event.TAG:<15} {_event_summary(event)}")
    if records:
        say("", "Audit:")
        for record in records:
            say("  " + audit_line(record))
    return 0


async def cmd_audit(args: argparse.Namespace) -> int:
    path = db_path(args, must_exist=True)
    async with opened(path) as app:
        records = await app.audit(execution_id=args.execution, request_id=args.request)
    if args.json:
        for record in records:
            say(json.dumps(audit_to_dict(record), ensure_ascii=False))
    elif not records:
        say(f"No decisions recorded in {path}.")
    else:
        say(*(audit_line(r) for r in records))
    return 0


# -- the demo ---------------------------------------------------------------------------


class TerminalLines:
    """Lines typed on stdin, read by a daemon thread.

    A daemon thread on the raw file descriptor (not `input()` in the loop's
    executor): waiting for a line must neither block the event loop nor keep the
    process alive once a decision made elsewhere has ended the demo.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._eof = False
        self._loop = asyncio.get_running_loop()
        try:
            self._fd: int | None = sys.stdin.fileno()
            self.echo = not os.isatty(self._fd)
        except (AttributeError, OSError, ValueError):
            self._fd, self.echo = None, False
        if self._fd is None:
            self._queue.put_nowait(None)
        else:
            threading.Thread(target=self._read, name="clearance-stdin", daemon=True).start()

    def _put(self, item: str | None) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is asking any more
            return False
        return True

    def _read(self) -> None:
        assert self._fd is not None
        buffered = b""
        while True:
            try:
                chunk = os.read(self._fd, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                if buffered:
                    self._put(buffered.decode(errors="replace"))
                self._put(None)
                return
            buffered += chunk
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                if not self._put(line.decode(errors="replace").rstrip("\r")):
                    return

    async def line(self) -> str | None:
        """The next line, or None once stdin is closed."""
        if self._eof and self._queue.empty():
            return None
        item = await self._queue.get()
        if item is None:
            self._eof = True
        return item


class DecidedElsewhere(Exception):
    """The request stopped being pending while we waited at the prompt."""

    def __init__(self, request: ApprovalRequest) -> None:
        super().__init__(request.request_id)
        self.request = request


class Demo:
    def __init__(self, app: Clearance, args: argparse.Namespace, path: Path) -> None:
        self.app = app
        self.args = args
        self.path = path
        self.by = args.by or default_user()
        self.shown_messages = 0
        self.at_prompt = False  # the cursor sits after a prompt: start other output on a new line
        self._terminal: TerminalLines | None = None

    # -- output -----------------------------------------------------------------------

    def show_messages(self, ex: Execution) -> None:
        for message in ex.messages[self.shown_messages :]:
            content = message.get("content")
            if message.get("role") == "user" and isinstance(content, str):
                say(f"User:  {content}")
                continue
            for block in content if isinstance(content, list) else []:
                kind = block.get("type")
                if kind == "text" and block.get("text"):
                    say(f"Agent: {block['text']}")
                elif kind == "tool_use":
                    say(f"       [tool: {block.get('name')}] {_compact(block.get('input'))}")
                elif kind == "tool_result":
                    texts = block.get("content")
                    if isinstance(texts, list):
                        texts = " ".join(str(b.get("text", "")) for b in texts)
                    mark = "error" if block.get("is_error") else "result"
                    say(f"       [{mark}] {_compact_text(str(texts), 110)}")
        self.shown_messages = len(ex.messages)

    def show_request(self, request: ApprovalRequest) -> None:
        db = shlex.quote(str(self.path))
        rid = request.request_id
        say(
            "",
            f"[WAITING FOR APPROVAL] '{request.tool}' needs a human decision:",
            json.dumps(request.to_dict(), indent=2, ensure_ascii=False),
            "",
            "It is stored in the database, so you can also decide from another terminal:",
            f"  clearance pending --db {db}",
            f"  clearance approve {rid} --db {db}",
            f"  clearance approve {rid} --set amount=25 --db {db}",
            f"  clearance reject {rid} --reason 'Amount exceeds refund limit' --db {db}",
            "",
        )

    # -- asking -----------------------------------------------------------------------

    @property
    def terminal(self) -> TerminalLines:
        if self._terminal is None:
            self._terminal = TerminalLines()
        return self._terminal

    async def until_decided(self, ex_id: str, request_id: str) -> ApprovalRequest:
        while True:
            ex = (await self.app.get_execution(ex_id)).execution
            request = ex.request(request_id)
            if request is not None and request.status != PENDING:
                return request
            await asyncio.sleep(POLL_SECONDS)

    async def ask(self, request: ApprovalRequest, prompt: str) -> str | None:
        """A line typed at `prompt`, or None on end of input; raises DecidedElsewhere when
        the request is decided (or times out) before the line comes."""
        print(prompt, end="", flush=True)
        self.at_prompt = True
        typed = asyncio.create_task(self.terminal.line())
        decided = asyncio.create_task(self.until_decided(request.execution_id, request.request_id))
        try:
            done, _ = await asyncio.wait({typed, decided}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (typed, decided):
                task.cancel()
        if decided in done:
            self.end_prompt()
            raise DecidedElsewhere(decided.result())
        line = typed.result()
        self.at_prompt = False
        if self.terminal.echo:
            say(line if line is not None else "")
        return line

    def end_prompt(self) -> None:
        if self.at_prompt:
            self.at_prompt = False
            say("")

    async def try_decide(
        self,
        request: ApprovalRequest,
        approved: bool,
        *,
        changes: dict[str, Any] | None = None,
        reason: str | None = None,
    ) -> bool:
        """True once the request is no longer pending (decided here or elsewhere)."""
        try:
            await self.app.decide(
                request.request_id,
                approved=approved,
                modified_params=changes,
                reason=reason,
                by=self.by,
            )
        except ClearanceError as err:
            warn(str(err))
            ex = (await self.app.get_execution(request.execution_id)).execution
            now = ex.request(request.request_id)
            return now is None or now.status != PENDING
        return True

    async def settle(self, request: ApprovalRequest) -> None:
        """Decide `request`: --auto, or by asking in the terminal while watching for a
        decision from another process and for the timeout."""
        args = self.args
        if args.auto:
            # Unattended: a refusal (say, invalid --set values) ends the demo with exit 1.
            reason, changes = None, None
            if args.auto == "reject":
                reason = args.reason or DEFAULT_REJECTION
                say(f"--auto reject: rejecting as {self.by} ({reason!r}).")
            else:
                changes = dict(args.set or []) or None
                if args.auto == "modify" and changes is None:
                    changes = {"amount": 25}  # the spec's example
                with_changes = f" with changes {_compact(changes)}" if changes else ""
                say(f"--auto {args.auto}: approving as {self.by}{with_changes}.")
            await self.app.decide(
                request.request_id,
                approved=args.auto != "reject",
                modified_params=changes,
                reason=reason,
                by=self.by,
            )
            return
        try:
            await self.ask_until_decided(request)
        except DecidedElsewhere as elsewhere:
            request = elsewhere.request
            if request.status == TIMED_OUT:
                say(
                    f"No decision within {duration(request.timeout_ms)}: the request timed out "
                    "and the agent is told so."
                )
            else:
                say(sentence(f"Decided outside this terminal: {describe_decision(request)}"))

    async def ask_until_decided(self, request: ApprovalRequest) -> None:
        while True:
            answer = await self.ask(request, "Approve, modify or reject? [a/m/r] ")
            if answer is None:
                say(
                    "(stdin is closed: waiting for a decision from another process, "
                    f"or for the timeout at {iso(request.timeout)})"
                )
                raise DecidedElsewhere(
                    await self.until_decided(request.execution_id, request.request_id)
                )
            choice = answer.strip().lower()
            if choice in ("a", "approve", "y", "yes"):
                if await self.try_decide(request, True):
                    return
            elif choice in ("m", "modify"):
                text = await self.ask(
                    request, "Changes as NAME=VALUE, space-separated (e.g. amount=25): "
                )
                try:
                    changes = dict(parse_assignment(part) for part in shlex.split(text or ""))
                except (argparse.ArgumentTypeError, ValueError) as err:
                    warn(str(err))
                    continue
                if not changes:
                    say("No changes given; nothing decided.")
                    continue
                if await self.try_decide(request, True, changes=changes):
                    return
            elif choice in ("r", "reject", "n", "no"):
                reason = await self.ask(request, "Reason for rejecting: ")
                if await self.try_decide(request, False, reason=(reason or "").strip() or None):
                    return
            elif choice:
                say(
                    "Please answer a (approve), m (approve with modified parameters) or r (reject)."
                )

    # -- the run ----------------------------------------------------------------------

    def on_refund(self, ctx: ToolContext, params: dict[str, Any]) -> None:
        by = f", approved by {ctx.approved_by}" if ctx.approved_by else ""
        self.end_prompt()
        say(
            f"       [process-refund handler] refunding {money(params.get('amount'))} "
            f"for order {params.get('orderId')} (idempotency key {ctx.idempotency_key}{by})"
        )

    async def run(self) -> int:
        model, description = demo_model(scripted=self.args.scripted)
        timeout_ms: int = self.args.timeout_ms
        say(
            "Clearance demo: the refund scenario (human approval for a sensitive tool call)",
            f"  Database: {self.path}",
            f"  Model:    {description}",
            f"  Agent:    {AGENT_TAG}; 'process-refund' needs approval, 'get-order' does not",
            f"  Approval timeout: {duration(timeout_ms)}",
            "",
        )
        define_refund_agent(self.app, model=model, timeout_ms=timeout_ms, on_refund=self.on_refund)
        ex = await self.app.run(AGENT_TAG, input=USER_INPUT)
        shown: set[str] = set()
        while True:
            self.show_messages(ex)
            if ex.status in TERMINAL:
                break
            waiting = [r for r in ex.pending_approvals if r.request_id not in shown]
            if ex.status == AWAITING_APPROVAL and waiting:
                request = waiting[0]
                shown.add(request.request_id)
                self.show_request(request)
                await self.settle(request)
            else:
                await asyncio.sleep(POLL_SECONDS / 2)
            ex = (await self.app.get_execution(ex.id)).execution
        say("")
        for request in ex.requests:
            say(sentence(f"Approval {request.request_id}: {describe_decision(request)}"))
        say(f"Execution {ex.id}: {ex.status}.")
        if ex.error:
            warn(ex.error)
        say(f"Inspect it with: clearance show {ex.id} --db {shlex.quote(str(self.path))}")
        return 0 if ex.status == "completed" else 1


def _compact_text(value: str, limit: int) -> str:
    value = " ".join(value.split())
    return value if len(value) <= limit else value[: limit - 1] + "…"


async def cmd_demo(args: argparse.Namespace) -> int:
    if args.set and args.auto not in ("approve", "modify"):
        raise UsageError("--set goes with --auto approve or --auto modify")
    if args.reason and args.auto != "reject":
        raise UsageError("--reason goes with --auto reject")
    path = db_path(args, must_exist=False)
    async with opened(path) as app:
        return await Demo(app, args, path).run()


# -- serve ----------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises SIGTERM/SIGINT once it has shut down, which would end the
        # process before Clearance closes its store: shut down gracefully and return.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


async def cmd_serve(args: argparse.Namespace) -> int:
    path = db_path(args, must_exist=False)
    secret = os.environ.get(SECRET_ENV) or None
    api_key = os.environ.get(API_KEY_ENV) or None
    async with Clearance.open(
        f"sqlite:///{path}", public_url=args.public_url, webhook_secret=secret, api_key=api_key
    ) as app:
        config = uvicorn.Config(
            app.asgi(), host=args.host, port=args.port, lifespan="off", log_level="info"
        )
        say(
            f"Clearance HTTP API for {path} (OpenAPI at /openapi.json)",
            f"  callbacks:          {'on' if secret else f'off (set ${SECRET_ENV})'}",
            f"  signal/read routes: {'on' if api_key else f'off (set ${API_KEY_ENV})'}",
        )
        await _Server(config).serve()
    say("Stopped; anything pending stays pending in the database.")
    return 0


# -- the parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clearance",
        description="Human approval gates for AI agents' tool calls.",
        epilog=f"The database is --db PATH, else ${DB_ENV}, else ./{DEFAULT_DB}.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--db", metavar="PATH", help=f"SQLite database (default ./{DEFAULT_DB})")
        return p

    demo = command("demo", "run the spec's refund scenario and decide its approval")
    demo.add_argument(
        "--auto",
        choices=("approve", "modify", "reject"),
        help="decide without asking (modify defaults to --set amount=25)",
    )
    demo.add_argument(
        "--set",
        action="append",
        type=parse_assignment,
        metavar="NAME=VALUE",
        help="a modified parameter for --auto approve/modify (repeatable)",
    )
    demo.add_argument(
        "--reason", help=f"rejection reason for --auto reject ({DEFAULT_REJECTION!r})"
    )
    demo.add_argument("--by", metavar="NAME", help="who decides (default: your login name)")
    demo.add_argument(
        "--timeout-ms",
        type=positive_int,
        default=DEFAULT_TIMEOUT_MS,
        metavar="MS",
        help=f"approval timeout in milliseconds (default {DEFAULT_TIMEOUT_MS})",
    )
    demo.add_argument(
        "--scripted",
        action="store_true",
        help="use the built-in scripted model even when ANTHROPIC_API_KEY is set",
    )
    demo.set_defaults(run=cmd_demo)

    pending = command("pending", "list pending approval requests, oldest first")
    pending.add_argument("--agent", metavar="TAG", help="only this agent's requests")
    pending.add_argument("--json", action="store_true", help="one JSON request per line")
    pending.set_defaults(run=cmd_pending)

    approve = command("approve", "approve a pending request, optionally with modified parameters")
    approve.add_argument("request_id", metavar="REQUEST_ID")
    approve.add_argument(
        "--set",
        action="append",
        type=parse_assignment,
        metavar="NAME=VALUE",
        help="a modified parameter; VALUE is JSON when it parses, else text (repeatable)",
    )
    approve.add_argument("--by", metavar="NAME", help="who approves (default: your login name)")
    approve.set_defaults(run=cmd_approve)

    reject = command("reject", "reject a pending request with a reason")
    reject.add_argument("request_id", metavar="REQUEST_ID")
    reject.add_argument("--reason", required=True, help="why; the agent is told")
    reject.add_argument("--by", metavar="NAME", help="who rejects (default: your login name)")
    reject.set_defaults(run=cmd_reject, set=None)

    show = command("show", "an execution's status, output, approvals, events and audit")
    show.add_argument("execution_id", metavar="EXECUTION_ID")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=cmd_show)

    audit = command("audit", "the decision log: who decided what, when and why")
    audit.add_argument("--execution", metavar="ID", help="only this execution")
    audit.add_argument("--request", metavar="ID", help="only this approval request")
    audit.add_argument("--json", action="store_true", help="one JSON record per line")
    audit.set_defaults(run=cmd_audit)

    serve = command(
        "serve",
        f"serve the HTTP API (callbacks, signals, reads) and fire timeouts; secrets from "
        f"${SECRET_ENV} and ${API_KEY_ENV}",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=positive_int, default=8000, help="port (8000)")
    serve.add_argument(
        "--public-url", metavar="URL", help="where callers reach this server; callbackUrl base"
    )
    serve.set_defaults(run=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help, or a usage error argparse already printed
        return exit.code if isinstance(exit.code, int) else 2
    try:
        code: int = asyncio.run(args.run(args))
    except UsageError as err:
        print(f"clearance {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ClearanceError as err:
        warn(str(err))
        return 1
    except KeyboardInterrupt:
        print(
            "\nclearance: interrupted; anything pending stays pending in the database",
            file=sys.stderr,
        )
        return 130
    return code
