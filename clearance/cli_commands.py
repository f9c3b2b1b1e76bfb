"""The `clearance` commands but the demo: list pending approvals, decide them, show an
execution, read the audit log, serve the HTTP API; and what they share with the demo
(the database, `--set` values, the lines they print for people).

Every command works on one store (`--db`: a SQLite file, or a store URL such as
postgresql://host/db; else $CLEARANCE_DB, else ./clearance.db). Deciding needs no
agent definition: `clearance approve` records
the decision and returns, and the process hosting the agent (the demo, your
app) notices it within its poll interval and carries on. `--json` output is
`views`' camelCase, strict JSON. Errors are one line on stderr and exit code 1;
usage errors (bad arguments, a `--set` value JSON cannot carry) exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import getpass
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs
import uvicorn

from clearance import views
from clearance.adapters.sqlite_store import check_database_file
from clearance.app import Clearance
from clearance.cli_args import (
    API_KEY_ENV,
    DB_ENV,
    DEFAULT_DB,
    REVIEWER_KEY_ENV,
    SECRET_ENV,
    UsageError,
    modified_params,
)
from clearance.core.commands import AuditRecord
from clearance.core.deadlines import BadDeadline, parse_deadline
from clearance.core.decide import duration
from clearance.core.durations import BadDuration, parse_duration
from clearance.core.errors import ClearanceError, DefinitionError, Refusal, RefusalCode
from clearance.core.events import (
    Approved,
    Event,
    Extended,
    ModelFailed,
    ModelReplied,
    Rejected,
    Started,
    StopRequested,
    Ticket,
    TimerFired,
    ToolFailed,
    ToolFinished,
)
from clearance.core.execution import (
    ALLOWED_BY_POLICY,
    APPROVED,
    APPROVED_BY_TIMEOUT,
    CANCELLED,
    DENIED_BY_POLICY,
    INVALIDATED,
    PENDING,
    REJECTED,
    TIMED_OUT,
    ApprovalRequest,
    iso,
)
from clearance.core.policy import PolicySpec
from clearance.core.reviewers import CLAIMED, BadReviewer, Grant, Identity, Reviewer
from clearance.definition import Policy
from clearance.ports.store import UnknownReviewer
from clearance.reviewer_keys import key_id_of


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


def db_path(args: argparse.Namespace, *, must_exist: bool) -> str:
    """Where the store is: a SQLite file's resolved path, or a store URL as given
    (postgresql://…). `must_exist`: a command that reads or decides, which must find a
    Clearance database there and never creates or changes another file."""
    given = args.db or os.environ.get(DB_ENV) or DEFAULT_DB
    if "://" in given and not given.startswith("sqlite:///"):
        return str(given)
    path = Path(given.removeprefix("sqlite:///")).expanduser().resolve()
    if must_exist and not path.exists():
        raise ClearanceError(
            f"no database at {path}; pass --db PATH (or set ${DB_ENV}) to the database the "
            "agent uses, e.g. the one `clearance demo` printed"
        )
    check_database_file(str(path), must_hold_data=must_exist)
    return str(path)


def store_url(where: str) -> str:
    return where if "://" in where else f"sqlite:///{where}"


def shown(where: str) -> str:
    """`where` for messages (and the `--db` of commands they suggest): a URL without its
    user and password, in the address or as query parameters; host, port, database and
    other parameters (`?schema=`) stay, so the URL still names the same store."""
    if "://" not in where:
        return where
    parts = urlsplit(where)
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in _SECRET]
    return urlunsplit((parts.scheme, host, parts.path, urlencode(kept), ""))


# Connection parameters a message never shows.
_SECRET = frozenset({"user", "password", "passfile"})


@asynccontextmanager
async def opened(where: str) -> AsyncIterator[Clearance]:
    async with Clearance.open(store_url(where)) as app:
        yield app


def compact(value: Any, limit: int = 0) -> str:
    out = views.dumps(value)
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


GAP = "  "


def _table(rows: Sequence[Sequence[str]], width: int | None = None, shrink: int = 0) -> list[str]:
    """Columns of `rows` (the first is the header). `width`: lines longer than that
    have column `shrink` cut down (cells end in "…"), to no less than its header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    excess = sum(widths) + len(GAP) * (len(widths) - 1) - (width or 0)
    if width is not None and excess > 0:
        floor = len(rows[0][shrink]) + 1
        widths[shrink] = max(floor, widths[shrink] - excess)
        rows = [
            [
                cell if i != shrink or len(cell) <= widths[i] else cell[: widths[i] - 1] + "…"
                for i, cell in enumerate(row)
            ]
            for row in rows
        ]
    return [GAP.join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def terminal_width() -> int | None:
    """The width to fit tables to: $COLUMNS, else the terminal's; None when output goes
    to a pipe or file (whole lines, for grep and friends)."""
    with contextlib.suppress(ValueError):
        if int(os.environ.get("COLUMNS", "")) > 0:
            return int(os.environ["COLUMNS"])
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def sentence(text: str) -> str:
    """'rejected: Too expensive.' stays as it is; 'approved' -> 'approved.'."""
    return text if text.endswith((".", "!", "?")) else text + "."


# Outcomes and statuses in colour on a terminal, as gh and git show them; never into a
# pipe or a file, never with NO_COLOR set (no-color.org).
_COLOURS = {
    "approved": "32",
    "approved_modified": "32",
    "completed": "32",
    "rejected": "31",
    "failed": "31",
    "denied_by_policy": "31",
    "timed_out": "33",
    "pending": "33",
    "awaiting_approval": "33",
    "cancelled": "90",
    "invalidated": "90",
    "stopped": "90",
    "allowed_by_policy": "32",
    "approved_by_timeout": "32",
}


def tint(word: str) -> str:
    code = _COLOURS.get(word)
    if code is None or not _in_colour():
        return word
    return f"\033[{code}m{word}\033[0m"


@functools.cache
def _in_colour() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _people(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def quorum_text(request: ApprovalRequest) -> str:
    """Where a request needs several approvals (or names groups): who approved so far and,
    while it is pending, who is still needed: '1 of 2 approvals (alice); still needed: 1
    from risk'. Empty for a request one approval decides."""
    if not request.needs_quorum:
        return ""
    required = request.approvals_required
    names = [v.by for v in request.votes]
    text = f"{len(names)} of {required} approval{'s' if required != 1 else ''}"
    if names:
        text += f" ({', '.join(names)})"
    if request.status != PENDING:
        return text
    count, groups = request.still_needed()
    if not groups:
        return f"{text}; still needed: {count}"
    if count == len(groups) == 1:
        return f"{text}; still needed: 1 from {groups[0]}"
    if count == len(groups):
        return f"{text}; still needed: {count}, one from each of {_people(groups)}"
    each = f"one from {groups[0]}" if len(groups) == 1 else f"one from each of {_people(groups)}"
    return f"{text}; still needed: {count}, {each}"


def describe_decision(request: ApprovalRequest) -> str:
    by = f" by {request.decided_by}" if request.decided_by else ""
    if request.outcome == APPROVED_BY_TIMEOUT:
        return (
            f"{tint(APPROVED)} when nobody decided within {duration(request.timeout_ms)}"
            " (timeout_action 'approve')"
        )
    if request.status == PENDING and request.needs_quorum:
        return f"{tint(PENDING)}: {quorum_text(request)}"
    if request.outcome in (ALLOWED_BY_POLICY, DENIED_BY_POLICY):
        # Decided by the agent's new definition, not by a person (a redeploy).
        why = f": {request.rejection_reason}" if request.rejection_reason else ""
        return f"{tint(request.outcome)} when the agent was defined again{why}"
    if request.status == INVALIDATED:
        return f"{tint(INVALIDATED)}: the agent was defined again and {request.rejection_reason}"
    if request.status == APPROVED:
        if request.modified_params:
            return f"{tint('approved')}{by} with changes {compact(request.modified_params)}"
        return f"{tint('approved')}{by}"
    if request.status == REJECTED:
        because = f": {request.rejection_reason}" if request.rejection_reason else ""
        return f"{tint('rejected')}{by}{because}"
    if request.status == TIMED_OUT:
        return f"{tint('timed_out').replace('_', ' ')} after {duration(request.timeout_ms)}"
    if request.status == CANCELLED:
        return f"{tint('cancelled')}{by}"
    return tint(request.status)


def audit_line(record: AuditRecord) -> str:
    parts = [
        iso(record.at),
        tint(record.decision),
        # A call a policy decided has no request: its tool_use id says which call.
        record.request_id or f"call {record.tool_use_id}",
        record.tool,
        "params=(pruned)" if record.pruned else f"params={compact(record.parameters)}",
    ]
    if record.rule_id is not None:
        parts.append(f"rule={record.rule_id}")
    if record.modified_params is not None:
        parts.append(f"modified={compact(record.modified_params)}")
    if record.by:
        parts.append(f"by={record.by}")
    if record.on_behalf_of:
        parts.append(f"for={record.on_behalf_of}")
    if record.reason:
        parts.append(f"reason={views.dumps(record.reason)}")
    return "  ".join(parts)


# -- pending / approve / reject / show / audit -------------------------------------------


async def cmd_pending(args: argparse.Namespace) -> int:
    path = db_path(args, must_exist=True)
    width = None if args.json else terminal_width()
    async with opened(path) as app:
        requests = await app.pending(args.agent)
        short = await _short_ids(app, [r.request_id for r in requests]) if width else {}
    if args.json:
        for request in requests:
            say(views.dumps(views.approval_request(request)))
        return 0
    if not requests:
        which = f" for agent '{args.agent}'" if args.agent else ""
        say(f"No pending approval requests{which} in {shown(path)}.")
        return 0

    # Columns only some listings need: who must still approve, who may not.
    quorum = any(r.needs_quorum for r in requests)
    requester = any(r.requested_by for r in requests)

    def table(expiry: Callable[[datetime], str], execution: bool, ids: bool) -> list[list[str]]:
        header = ["REQUEST", "EXECUTION", "AGENT", "TOOL", "PARAMETERS"]
        header += ["APPROVALS"] * quorum + ["REQUESTER"] * requester + ["EXPIRES"]
        rows = [header] + [
            [
                r.request_id if ids else short[r.request_id],
                r.execution_id,
                r.agent_tag,
                r.tool,
                compact(r.effective_parameters(), 60),
                *([quorum_text(r) or "1 of 1"] if quorum else []),
                *([r.requested_by or "-"] if requester else []),
                expiry(r.timeout),
            ]
            for r in requests
        ]
        return rows if execution else [row[:1] + row[2:] for row in rows]

    # Narrower and narrower until it fits: the time left is what a reviewer acts on,
    # `clearance show REQUEST` finds the execution, and a unique start of a request id
    # is as good as the whole of it.
    for expiry, execution, ids in (
        (lambda at: f"{iso(at)} ({_relative(at)})", True, True),
        (_relative, True, True),
        (_relative, False, True),
        (_relative, False, False),
    ):
        rows = table(expiry, execution, ids)
        lines = _table(rows, width, shrink=rows[0].index("PARAMETERS"))
        if width is None or max(map(len, lines)) <= width:
            break
    say(*lines)
    return 0


async def _short_ids(app: Clearance, request_ids: list[str], least: int = 8) -> dict[str, str]:
    """Each id's shortest start (of `least` characters or more) that no other request's
    id, pending or decided, starts with."""
    short = {}
    for request_id in request_ids:
        n = least
        while n < len(request_id):
            taken = await app.request_ids_starting(request_id[:n], 2)
            if taken == [request_id]:
                break
            # The next length worth trying: past what this id shares with another.
            other = next(t for t in taken if t != request_id)
            shared = os.path.commonprefix([request_id, other])  # noqa: RUF071 (ids, not paths)
            n = max(n + 1, len(shared) + 1)
        short[request_id] = request_id[:n]
    return short


async def _whole_request_id(app: Clearance, given: str) -> str:
    """`given`, or the one request, pending or decided, whose id starts with it (as
    git takes a unique prefix of a commit id)."""
    if await app.execution_of_request(given) is not None:
        return given
    matches = await app.request_ids_starting(given, 6)
    if len(matches) > 1:
        listed = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise ClearanceError(
            f"'{given}' starts {'more than 5' if len(matches) > 5 else len(matches)} request"
            f" ids ({listed}); give more of it"
        )
    return matches[0] if matches else given  # none: the caller says there is no such request


async def _decider(app: Clearance, by: str | None) -> Identity:
    """Who decides from this terminal: the reviewer whose key is in $CLEARANCE_REVIEWER_KEY
    (checked: their grants apply, and their approval counts towards a quorum), else the
    --by name or the login name, as claimed (nothing checks it)."""
    key = os.environ.get(REVIEWER_KEY_ENV, "").strip()
    if not key:
        return Identity(by or default_user(), CLAIMED)
    who = await app.identify(key) if key_id_of(key) else None
    if who is None:
        raise ClearanceError(
            f"${REVIEWER_KEY_ENV} is not a valid reviewer key here (unknown, revoked or"
            " expired; clearance reviewer list)"
        )
    if by is not None and by != who.name:
        raise UsageError(
            f"--by is {by!r}, but ${REVIEWER_KEY_ENV} is {who.name!r}'s key: leave --by out"
        )
    return who


def _with_key_hint(refusal: Refusal, who: Identity) -> ClearanceError:
    """A refusal of a name typed at the terminal where only a checked person counts (a
    quorum): said with how to decide as a reviewer from here."""
    if refusal.code != RefusalCode.NOT_GRANTED or who.kind != CLAIMED:
        return refusal
    return ClearanceError(
        f"{refusal}; from this terminal: set ${REVIEWER_KEY_ENV} to your reviewer key"
    )


async def _decide(args: argparse.Namespace, approved: bool) -> int:
    every = getattr(args, "all", False)
    if every and args.request_ids:
        raise UsageError("give REQUEST_IDs or --all, not both")
    if not every and not args.request_ids:
        raise UsageError("give the REQUEST_IDs to decide, or --all (with --agent, --tool)")
    if not every and (getattr(args, "agent", None) or getattr(args, "tool", None)):
        raise UsageError("--agent and --tool narrow --all")
    if every or len(args.request_ids) != 1:
        return await _decide_many(args, approved)
    args.request_id = args.request_ids[0]
    changes = modified_params(args.set)
    path = db_path(args, must_exist=True)
    async with opened(path) as app:
        args.request_id = await _whole_request_id(app, args.request_id)
        who = await _decider(app, args.by)
        try:
            ex = await app.decide(
                args.request_id,
                approved=approved,
                modified_params=changes,
                reason=None if approved else args.reason,
                by=who,
            )
        except Refusal as refusal:
            raise _with_key_hint(refusal, who) from None
    request = ex.request(args.request_id)
    assert request is not None  # decide() found it
    if args.json:  # the HTTP API's answer to the same decision
        say(views.dumps(views.decision(request, ex.status)))
        return 0
    if request.status == PENDING:  # a vote towards a quorum that is not met yet
        say(
            f"{args.request_id}: your approval is counted; it is still pending:"
            f" {quorum_text(request)}."
        )
        return 0
    say(sentence(f"{args.request_id}: {describe_decision(request)}"))
    if request.status == APPROVED:
        say(f"'{request.tool}' will run with {compact(request.effective_parameters())}.")
    # This process cannot know whether a host runs: say what happens either way.
    say(
        f"Execution {ex.id} is {ex.status}. It goes on in a process that hosts agent "
        f"'{ex.agent_tag}' (the demo, your app): at once if one is running, else when one "
        f"starts (see: clearance show {ex.id} --db {shlex.quote(shown(path))})."
    )
    return 0


async def _decide_many(args: argparse.Namespace, approved: bool) -> int:
    """Several requests (`approve ID ID …`, `reject --all --agent … --tool …`), each
    decided on its own: one refused does not stop the others. Exit 1 if any was."""
    if args.set:
        raise UsageError("--set modifies one request's parameters: give one REQUEST_ID")
    path = db_path(args, must_exist=True)
    async with opened(path) as app:
        who = await _decider(app, args.by)
        if getattr(args, "all", False):
            pending = await app.pending(args.agent)
            ids = [r.request_id for r in pending if args.tool is None or r.tool == args.tool]
            if not ids:
                say("No pending approval requests match; nothing decided.")
                return 0
        else:
            ids = [await _whole_request_id(app, given) for given in args.request_ids]
        outcomes = await app.decide_many(
            ids,
            approved=approved,
            reason=None if approved else args.reason,
            by=who,
        )
    refused = voted = 0
    for outcome in outcomes:
        if args.json:
            say(views.dumps(views.batch_outcome(outcome)))
        elif outcome.refusal is not None:
            say(f"{outcome.request_id}: refused: {_with_key_hint(outcome.refusal, who)}")
        else:
            assert outcome.execution is not None
            decided = outcome.execution.request(outcome.request_id)
            assert decided is not None
            say(sentence(f"{outcome.request_id}: {describe_decision(decided)}"))
            voted += decided.status == PENDING  # one vote of several: still pending
        refused += outcome.refusal is not None
    if not args.json:
        votes = f", {voted} counted as a vote (still pending)" if voted else ""
        say(f"{len(outcomes) - refused - voted} decided{votes}, {refused} refused.")
    return 1 if refused else 0


async def cmd_approve(args: argparse.Namespace) -> int:
    return await _decide(args, approved=True)


async def cmd_reject(args: argparse.Namespace) -> int:
    return await _decide(args, approved=False)


async def cmd_extend(args: argparse.Namespace) -> int:
    until = _until(args.until)
    if not os.environ.get(REVIEWER_KEY_ENV, "").strip():
        raise ClearanceError(
            f"a deadline is extended by a reviewer granted 'extend': set ${REVIEWER_KEY_ENV}"
            " to their key (clearance reviewer add NAME --actions decide,extend); a --by"
            " name alone is not checked, so it cannot"
        )
    path = db_path(args, must_exist=True)
    async with opened(path) as app:
        who = await _decider(app, args.by)
        request_id = await _whole_request_id(app, args.request_id)
        execution_id = await app.execution_of_request(request_id)
        if execution_id is None:
            raise ClearanceError(f"no approval request '{args.request_id}' in {shown(path)}")
        ex = await app.signal(execution_id, "extend", request_id=request_id, until=until, by=who)
    request = ex.request(request_id)
    assert request is not None  # signal() found it
    if args.json:
        say(views.dumps({"signal": "extend", **views.decision(request, ex.status)}))
        return 0
    say(
        f"{request_id}: extended by {who.name}; it now expires at {iso(request.timeout)}"
        f" ({_relative(request.timeout)})."
    )
    return 0


def _until(text: str) -> datetime:
    """An --until (extend, reviewer delegate), read as the HTTP API and Python read theirs."""
    try:
        return parse_deadline(text, "--until")
    except BadDeadline as err:
        raise UsageError(str(err)) from None


def _authorised(ticket: Ticket | None) -> str:
    """What a policy or a session grant said about a proposed call, for `show`."""
    if ticket is None:
        return ""
    if ticket.grant is not None:
        return f" (session grant {ticket.grant})"
    verdict = ticket.verdict
    if verdict is None or verdict.effect == "none":
        return ""
    said = f"{verdict.effect} by rule {verdict.rule_id}"
    return f" ({said})" if verdict.enforced else f" (shadow: would {said})"


def _event_summary(event: Event) -> str:
    if isinstance(event, Started):
        return f"input={views.dumps(event.input)}"
    if isinstance(event, ModelReplied):
        parts = []
        tickets = {t.tool_use_id: t for t in event.tickets}
        for block in event.content:
            if block.get("type") == "text":
                parts.append(views.dumps(block.get("text", "")))
            elif block.get("type") == "tool_use":
                use = f"tool_use {block.get('name')} {compact(block.get('input'))}"
                parts.append(use + _authorised(tickets.get(str(block.get("id")))))
        return f"turn {event.turn}: " + "; ".join(parts)
    if isinstance(event, ModelFailed):
        return f"turn {event.turn}: {event.error}"
    if isinstance(event, ToolFinished):
        return f"{event.tool_use_id}: {compact(event.output, 100)}"
    if isinstance(event, ToolFailed):
        return f"{event.tool_use_id}: {event.error}"
    if isinstance(event, Approved):
        by = f" by {event.by}" if event.by else ""
        changes = f" with {compact(event.modified_params)}" if event.modified_params else ""
        return f"{event.request_id}{by}{changes}"
    if isinstance(event, Rejected):
        by = f" by {event.by}" if event.by else ""
        return f"{event.request_id}{by}: {event.reason or '(no reason)'}"
    if isinstance(event, TimerFired):
        return event.request_id
    if isinstance(event, Extended):
        by = f" by {event.by}" if event.by else ""
        return f"{event.request_id} until {iso(event.until)}{by}"
    if isinstance(event, StopRequested):
        by = f" by {event.by}" if event.by else ""
        return f"{by.strip()} {event.reason or ''}".strip()
    return ""


async def cmd_show(args: argparse.Namespace) -> int:
    path = db_path(args, must_exist=True)
    async with opened(path) as app:
        if await app.execution(args.execution_id) is None:
            # A request's id, or the start of one: show the execution it belongs to.
            request_id = await _whole_request_id(app, args.execution_id)
            execution_id = await app.execution_of_request(request_id)
            if execution_id is None:
                raise ClearanceError(
                    f"no execution or approval request '{args.execution_id}' in {shown(path)}"
                )
            args.execution_id = execution_id
        history = await app.get_execution(args.execution_id)
        records = await app.audit(execution_id=args.execution_id)
    ex = history.execution
    if args.json:
        say(views.dumps(views.execution_report(ex, history.events, records), indent=2))
        return 0
    say(f"Execution {ex.id}  agent {ex.agent_tag}  status {tint(ex.status)}")
    say(f"Input:  {ex.input}")
    if ex.requested_by is not None:
        say(f"Requested by: {ex.requested_by} (who may not approve its requests)")
    if ex.output is not None:
        say(f"Output: {ex.output}")
    if ex.error is not None:
        say(f"Error:  {ex.error}")
    if ex.requests:
        say("", "Approval requests:")
        for r in ex.requests:
            line = f"  {r.request_id}  {r.tool}  {compact(r.parameters)}  {describe_decision(r)}"
            if r.status == PENDING:
                line += f"; expires {iso(r.timeout)} ({_relative(r.timeout)})"
            elif r.needs_quorum:
                line += f"; {quorum_text(r)}"
            say(line)
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
    if args.action is not None:
        if args.execution or args.request:
            raise UsageError(
                f"audit {args.action} covers the whole log: drop --execution/--request"
            )
        async with opened(path) as app:
            if args.action == "verify":
                return await _audit_verify(app, path, args.json)
            return await _audit_export(app)
    if args.jsonl:
        raise UsageError("--jsonl goes with `clearance audit export`; the listing takes --json")
    async with opened(path) as app:
        if args.request:
            args.request = await _whole_request_id(app, args.request)
        if args.request and await app.execution_of_request(args.request) is None:
            raise ClearanceError(f"no approval request '{args.request}' in {shown(path)}")
        if args.execution and await app.execution(args.execution) is None:
            raise ClearanceError(f"no execution '{args.execution}' in {shown(path)}")
        records = await app.audit(execution_id=args.execution, request_id=args.request)
    if args.json:
        for record in records:
            say(views.dumps(views.audit_record(record)))
    elif not records:
        say(f"No decisions recorded in {shown(path)}.")
    else:
        say(
            f"{len(records)} decision(s) in {shown(path)}, oldest first"
            " (time, decision, request, tool, parameters, by, reason):",
            *(audit_line(r) for r in records),
        )
    return 0


async def _audit_verify(app: Clearance, path: str, as_json: bool) -> int:
    verdict = await app.verify_audit()
    if as_json:
        say(views.dumps(views.audit_verdict(verdict)))
    elif verdict.intact:
        say(
            f"The audit log of {shown(path)} is intact: {verdict.records} chained record(s),"
            f" head {verdict.head}."
        )
    else:
        say(
            f"The audit log of {shown(path)} was tampered with: {verdict.problem}."
            f" {verdict.records} record(s) before it are intact (last hash {verdict.head})."
        )
    return 0 if verdict.intact else 1


async def cmd_prune(args: argparse.Namespace) -> int:
    path = db_path(args, must_exist=True)
    try:
        age = parse_duration(args.older_than, "--older-than")
    except BadDuration as err:
        raise UsageError(str(err)) from None
    async with opened(path) as app:
        done = await app.prune(age, dry_run=args.dry_run)
    if args.json:
        say(views.dumps(views.pruning(done)))
        return 0
    verb = "would forget" if done.dry_run else "forgot"
    what = "would lose" if done.dry_run else "lost"
    lines = [
        f"{shown(path)}: {verb} {done.executions} execution(s) finished more than"
        f" {args.older_than} ago; {done.audit_pruned} audit record(s) of theirs {what}"
        " their parameters and reasons (who decided what, and when, stays)."
    ]
    if done.audit_kept:
        lines.append(
            f"{done.audit_kept} older record(s), from before the audit chain, were left whole."
        )
    if done.audit_unreadable:
        lines.append(
            f"{done.audit_unreadable} audit record(s) no longer read as records (changed"
            " outside Clearance?) and were left as they are: `clearance audit verify` names"
            " the first."
        )
    if done.busy:
        lines.append(
            f"{done.busy} stopped execution(s) still have a tool's outcome to record: next time."
        )
    if done.unreadable:
        lines.append(f"{done.unreadable} execution(s) could not be read and were left as they are.")
    say(*lines)
    return 0


async def _audit_export(app: Clearance) -> int:
    after = 0
    while rows := await app.audit_chain(after):
        for row in rows:
            say(views.dumps(views.audit_chain_row(row)))
        after = rows[-1].id
    return 0


# -- serve ----------------------------------------------------------------------------------

# A callback URL's token admits a decision on its own: the access log shows the path
# without it.
_TOKEN = re.compile(r"(?<=[?&]token=)[^&\s]+")


class _RedactTokens(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _TOKEN.sub("REDACTED", arg) if isinstance(arg, str) else arg for arg in record.args
            )
        return True


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
    # Several, separated by spaces or commas, while rotating: the first signs.
    secret = (os.environ.get(SECRET_ENV) or "").replace(",", " ").split() or None
    api_key = os.environ.get(API_KEY_ENV) or None
    async with Clearance.open(
        store_url(path),
        public_url=args.public_url,
        webhook_secret=secret,
        api_key=api_key,
        trust_header=args.trust_header,
    ) as app:
        config = uvicorn.Config(
            app.asgi(), host=args.host, port=args.port, lifespan="off", log_level="info"
        )
        logging.getLogger("uvicorn.access").addFilter(_RedactTokens())
        say(
            f"Clearance HTTP API for {shown(path)} (OpenAPI at /openapi.json)",
            f"  callbacks:          {'on' if secret else f'off (set ${SECRET_ENV})'}",
            f"  signal/read routes: {'on' if api_key else f'off (set ${API_KEY_ENV})'}"
            " (and reviewers' keys: clearance reviewer add)",
            f"  trusted header:     {args.trust_header or 'off (--trust-header)'}",
            f"  inbox:              {args.public_url or f'http://{args.host}:{args.port}'}/inbox",
        )
        await _Server(config).serve()
    say("Stopped; anything pending stays pending in the database.")
    return 0


# -- reviewers ------------------------------------------------------------------------------


async def cmd_reviewer(args: argparse.Namespace) -> int:
    path = db_path(args, must_exist=args.action != "add")  # only `add` may make a store
    async with opened(path) as app:
        return await _REVIEWER_ACTIONS[args.action](app, args)


def _expiry(app: Clearance, args: argparse.Namespace) -> datetime | None:
    if args.expires_in is None:
        return None
    try:
        return app.clock.now() + parse_duration(args.expires_in, "--expires-in")
    except BadDuration as err:
        raise UsageError(str(err)) from None


async def _reviewer_add(app: Clearance, args: argparse.Namespace) -> int:
    try:
        grant = Grant(agents=args.agents, tools=args.tools, actions=args.actions.split(","))
        reviewer = Reviewer(args.name, [grant], [g for g in args.groups.split(",") if g])
    except BadReviewer as err:
        raise UsageError(str(err)) from None
    if await app.reviewer_identity(reviewer.name) is not None:
        raise ClearanceError(
            f"reviewer {reviewer.name!r} exists; `clearance reviewer key {reviewer.name}` gives"
            " another key, `clearance reviewer remove` removes them"
        )
    expires_at = _expiry(app, args)
    await app.save_reviewer(reviewer)
    key = await app.issue_key(reviewer.name, expires_at=expires_at)
    _say_key(reviewer.name, key, expires_at)
    return 0


async def _reviewer_key(app: Clearance, args: argparse.Namespace) -> int:
    expires_at = _expiry(app, args)
    try:
        key = await app.issue_key(args.name, expires_at=expires_at)
    except UnknownReviewer:
        raise ClearanceError(f"no reviewer {args.name!r} (clearance reviewer list)") from None
    _say_key(args.name, key, expires_at)
    return 0


def _say_key(name: str, key: str, expires_at: datetime | None) -> None:
    until = f", valid until {iso(expires_at)}" if expires_at else ""
    say(
        f"Key for reviewer {name!r}{until}. It is shown this once; only its digest is kept:",
        "",
        f"  {key}",
        "",
        "Send it as `Authorization: Bearer <key>` to the HTTP API.",
    )


async def _reviewer_list(app: Clearance, args: argparse.Namespace) -> int:
    reviewers = await app.reviewers()
    if args.json:
        for reviewer in reviewers:
            keys = await app.reviewer_keys(reviewer.name)
            say(views.dumps(views.reviewer(reviewer, keys)))
        return 0
    if not reviewers:
        say("No reviewers. Add one: clearance reviewer add NAME --agents '*' --tools '*'")
        return 0
    now = app.clock.now()
    for reviewer in reviewers:
        grants = "; ".join(
            f"agents {','.join(g.agents)} tools {','.join(g.tools)} ({','.join(sorted(g.actions))})"
            for g in reviewer.grants
        )
        keys = await app.reviewer_keys(reviewer.name)
        valid = [k.key_id for k in keys if k.valid_at(now)]
        groups = f" groups {','.join(reviewer.groups)}" if reviewer.groups else ""
        handed = "".join(
            f"; delegates to {d.to} until {iso(d.until)}"
            for d in reviewer.delegations
            if d.active_at(now)
        )
        say(
            f"{reviewer.name}: {grants or 'no grants'}{groups}; keys"
            f" {', '.join(valid) or 'none'}{handed}"
        )
    return 0


async def _reviewer_delegate(app: Clearance, args: argparse.Namespace) -> int:
    if (args.until is None) == (args.for_ is None):
        raise UsageError("give --until TIME or --for DURATION (e.g. --for 7d)")
    now = app.clock.now()
    if args.for_ is not None:
        try:
            until = now + parse_duration(args.for_, "--for")
        except BadDuration as err:
            raise UsageError(str(err)) from None
    else:
        until = _until(args.until)
    try:
        await app.delegate(args.name, to=args.to, until=until)
    except UnknownReviewer as err:
        raise ClearanceError(f"{err} (clearance reviewer list)") from None
    if until <= now:
        say(f"Reviewer {args.name} no longer delegates to {args.to}.")
    else:
        say(
            f"Reviewer {args.to} may act with the grants of {args.name} until {iso(until)};"
            f" their decisions are audited as on behalf of {args.name}."
        )
    return 0


async def _reviewer_revoke(app: Clearance, args: argparse.Namespace) -> int:
    key_id = key_id_of(args.key_id) or args.key_id  # the whole key, or its id
    if not await app.revoke_key(key_id):
        raise ClearanceError(f"no valid key {key_id!r} (clearance reviewer list shows the ids)")
    say(f"Key {key_id} revoked.")
    return 0


async def _reviewer_remove(app: Clearance, args: argparse.Namespace) -> int:
    if not await app.remove_reviewer(args.name):
        raise ClearanceError(f"no reviewer {args.name!r} (clearance reviewer list)")
    say(f"Reviewer {args.name!r} and their keys removed.")
    return 0


_REVIEWER_ACTIONS = {
    "add": _reviewer_add,
    "key": _reviewer_key,
    "list": _reviewer_list,
    "revoke": _reviewer_revoke,
    "remove": _reviewer_remove,
    "delegate": _reviewer_delegate,
}


# -- policies ---------------------------------------------------------------------------------


def _policy_from(path: str) -> PolicySpec:
    """The policy in FILE, or the file's one-line error (exit code 2 via UsageError)."""
    try:
        return Policy.from_file(path).spec()
    except DefinitionError as err:
        raise UsageError(str(err)) from None


async def cmd_policy(args: argparse.Namespace) -> int:
    policy = _policy_from(args.file)
    if args.action == "check":
        return _policy_check(args, policy)
    return await _policy_replay(args, policy)


def _policy_check(args: argparse.Namespace, policy: PolicySpec) -> int:
    if args.json:
        say(
            views.dumps(
                {
                    "version": policy.version,
                    "enforce": policy.enforce,
                    "rules": [attrs.asdict(r) for r in policy.rules],
                }
            )
        )
        return 0
    mode = "enforced" if policy.enforce else "shadow mode: recorded, not enforced"
    say(f"{args.file}: {len(policy.rules)} rules, {mode}, version {policy.version}")
    rows = [["ID", "EFFECT", "TOOLS", "WHEN", "REASON"]] + [
        [r.id, r.effect, ",".join(r.tools), r.when or "always", r.reason] for r in policy.rules
    ]
    say(*_table(rows, terminal_width(), shrink=4))
    say(
        "Precedence: any matching deny wins, then ask, then allow; no match: the tool's own gating."
    )
    return 0


async def _policy_replay(args: argparse.Namespace, policy: PolicySpec) -> int:
    path = db_path(args, must_exist=True)
    async with opened(path) as app:
        since = None
        if args.since is not None:
            try:
                since = app.clock.now() - parse_duration(args.since, "--since")
            except BadDuration as err:
                raise UsageError(str(err)) from None
        report = await app.replay_policy(policy, agent_tag=args.agent, since=since)
    if args.json:
        say(views.dumps(views.policy_replay(report)))
        return 0
    scope = f" of agent {args.agent}" if args.agent else ""
    window = f" since {iso(since)}" if since else ""
    say(
        f"{report.calls} recorded calls{scope} in {report.executions} executions{window},"
        f" judged by {args.file} ({policy.version}) in {report.seconds:.2f} s"
    )
    outcomes = [
        o
        for o in ("allow", "ask", "deny", "host_required")
        if report.before.get(o) or report.after.get(o)
    ]
    rows = [["OUTCOME", "BEFORE", "AFTER"]] + [
        [o, str(report.before.get(o, 0)), str(report.after.get(o, 0))] for o in outcomes
    ]
    say(*_table(rows))
    if not report.changed:
        say("No call's outcome would change.")
        return 0
    shown_calls = report.changed[: args.limit]
    say(f"{len(report.changed)} calls would change:")
    rows = [["EXECUTION", "TOOL_USE", "TOOL", "AT", "BEFORE", "AFTER", "RULE"]] + [
        [c.execution_id, c.tool_use_id, c.tool, iso(c.at), c.before, c.after, c.rule_after or "-"]
        for c in shown_calls
    ]
    say(*_table(rows))
    if len(report.changed) > len(shown_calls):
        say(f"… and {len(report.changed) - len(shown_calls)} more (--limit N, or --json for all)")
    return 0
