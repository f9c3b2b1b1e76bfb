"""`clearance demo`: the spec's refund scenario in a terminal. It runs the agent, shows the
approval request, and asks for a decision while watching for one made elsewhere (another
terminal's `clearance approve`) and for the timeout; `--auto` decides unattended.

The scenario itself (agent, tools, scripted model) is `clearance.demo`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import threading
from typing import Any

from clearance import views
from clearance.app import Clearance
from clearance.cli_args import DEFAULT_REJECTION, UsageError, modified_params, parse_assignment
from clearance.cli_commands import (
    compact,
    db_path,
    default_user,
    describe_decision,
    opened,
    say,
    sentence,
    shown,
    warn,
)
from clearance.core.decide import duration
from clearance.core.errors import ClearanceError
from clearance.core.execution import (
    AWAITING_APPROVAL,
    PENDING,
    TERMINAL,
    TIMED_OUT,
    ApprovalRequest,
    Execution,
    iso,
)
from clearance.core.reviewers import CLAIMED, Identity
from clearance.demo import (
    AGENT_TAG,
    USER_INPUT,
    define_refund_agent,
    demo_model,
    money,
)
from clearance.ports.tools import ToolContext

POLL_SECONDS = 0.2  # how often the demo looks for decisions made by other processes


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
    def __init__(
        self,
        app: Clearance,
        args: argparse.Namespace,
        path: str,
        changes: dict[str, Any] | None = None,
    ) -> None:
        self.app = app
        self.args = args
        self.path = path
        self.changes = changes  # --set, read before the demo starts
        # A name typed at (or taken from) the terminal: said, not checked.
        self.by = Identity(args.by or default_user(), CLAIMED)
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
                    say(f"       [tool: {block.get('name')}] {compact(block.get('input'))}")
                elif kind == "tool_result":
                    texts = block.get("content")
                    if isinstance(texts, list):
                        texts = " ".join(str(b.get("text", "")) for b in texts)
                    mark = "error" if block.get("is_error") else "result"
                    say(f"       [{mark}] {_compact_text(str(texts), 110)}")
        self.shown_messages = len(ex.messages)

    def show_request(self, request: ApprovalRequest) -> None:
        db = shlex.quote(shown(self.path))
        rid = request.request_id
        say(
            "",
            f"[WAITING FOR APPROVAL] '{request.tool}' needs a human decision:",
            views.dumps(views.approval_request(request), indent=2),
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

    async def until_decided(self, request_id: str) -> ApprovalRequest:
        while True:
            request = await self.app.request(request_id)
            if request is not None and request.status != PENDING:
                return request
            await asyncio.sleep(POLL_SECONDS)

    async def ask(self, request: ApprovalRequest, prompt: str) -> str | None:
        """A line typed at `prompt`, or None on end of input; raises DecidedElsewhere when
        the request is decided (or times out) before the line comes."""
        print(prompt, end="", flush=True)
        self.at_prompt = True
        typed = asyncio.create_task(self.terminal.line())
        decided = asyncio.create_task(self.until_decided(request.request_id))
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
            now = await self.app.request(request.request_id)
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
                say(f"--auto reject: rejecting as {self.by.name} ({reason!r}).")
            else:
                changes = self.changes
                if args.auto == "modify" and changes is None:
                    changes = {"amount": 25}  # the spec's example
                with_changes = f" with changes {compact(changes)}" if changes else ""
                say(f"--auto {args.auto}: approving as {self.by.name}{with_changes}.")
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
                raise DecidedElsewhere(await self.until_decided(request.request_id))
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

    async def say_what_an_earlier_run_left(self) -> None:
        """Hosting the agent, this process carries on what an interrupted demo left (an
        approved refund runs now): say so, rather than run it unannounced."""
        left = await self.app.with_work(AGENT_TAG)
        waiting = await self.app.pending(AGENT_TAG)
        if left:
            say(
                f"An earlier run left {len(left)} execution(s) mid-way: {', '.join(left)}.",
                "  This demo hosts the agent, so they carry on here now (an approved refund runs).",
            )
        if waiting:
            ids = ", ".join(r.request_id for r in waiting)
            say(
                f"{len(waiting)} request(s) of an earlier run still wait for a decision: {ids}.",
                "  Decide them with clearance approve/reject; this demo carries them on then.",
            )
        if left or waiting:
            say("")

    async def run(self) -> int:
        model, description = demo_model(scripted=self.args.scripted)
        timeout_ms: int = self.args.timeout_ms
        say(
            "Clearance demo: the refund scenario (human approval for a sensitive tool call)",
            f"  Database: {shown(self.path)}",
            f"  Model:    {description}",
            f"  Agent:    {AGENT_TAG}; 'process-refund' needs approval, 'get-order' does not",
            f"  Approval timeout: {duration(timeout_ms)}",
            "",
        )
        await self.say_what_an_earlier_run_left()
        define_refund_agent(self.app, model=model, timeout_ms=timeout_ms, on_refund=self.on_refund)
        ex = await self.app.run(AGENT_TAG, input=USER_INPUT)
        listed: set[str] = set()
        while True:
            self.show_messages(ex)
            if ex.status in TERMINAL:
                break
            waiting = [r for r in ex.pending_approvals if r.request_id not in listed]
            if ex.status == AWAITING_APPROVAL and waiting:
                request = waiting[0]
                listed.add(request.request_id)
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
        say(f"Inspect it with: clearance show {ex.id} --db {shlex.quote(shown(self.path))}")
        return 0 if ex.status == "completed" else 1


def _compact_text(value: str, limit: int) -> str:
    value = " ".join(value.split())
    return value if len(value) <= limit else value[: limit - 1] + "…"


async def cmd_demo(args: argparse.Namespace) -> int:
    if args.set and args.auto not in ("approve", "modify"):
        raise UsageError("--set goes with --auto approve or --auto modify")
    if args.reason and args.auto != "reject":
        raise UsageError("--reason goes with --auto reject")
    changes = modified_params(args.set)
    path = db_path(args, must_exist=False)
    async with opened(path) as app:
        return await Demo(app, args, path, changes).run()
