"""The `clearance` command: run the demo, list pending approvals, decide them, read the log,
serve the HTTP API. This module is the parser and `main` (the console entry point);
the commands are in `cli_commands`, the interactive demo in `cli_demo`.

Every command works on one store (`--db`: a SQLite file, or a store URL such as
postgresql://host/db; else $CLEARANCE_DB, else ./clearance.db). Deciding needs no
agent definition: `clearance approve` records
the decision and returns, and the process hosting the agent (the demo, your
app) notices it within its poll interval and carries on. Errors are one line
on stderr and exit code 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib import metadata

# Only what the parser needs: `clearance --help` and usage errors never import the
# runtime. The commands are imported once the arguments parse.
from clearance.cli_args import (
    API_KEY_ENV,
    DB_ENV,
    DEFAULT_DB,
    DEFAULT_REJECTION,
    REVIEWER_KEY_ENV,
    SECRET_ENV,
    parse_assignment,
    port_number,
    positive_int,
    split_assignment,
)
from clearance.core.agent import DEFAULT_TIMEOUT_MS

__all__ = ["build_parser", "main", "parse_assignment"]

EXAMPLES = {
    "demo": [
        "clearance demo                      # asks you: approve, modify or reject",
        "clearance demo --auto modify --set amount=25",
        "clearance demo --auto reject --reason 'Over the refund limit'",
    ],
    "pending": [
        "clearance pending",
        "clearance pending --agent safe-agent --json | jq .requestId",
    ],
    "approve": [
        "clearance approve apr-1a23c8f5       # a unique start of the id is enough",
        "clearance approve apr-1a23c8f5 --set amount=25 --by ops-lead",
        "clearance --db /srv/approvals.db approve apr-1a23c8f5 --json",
        "clearance approve apr-1a23 apr-9f04 apr-77c1   # each decided on its own",
        f"{REVIEWER_KEY_ENV}=clr_... clearance approve apr-1a23   # as that reviewer: a vote",
    ],
    "reject": [
        "clearance reject apr-1a23c8f5 --reason 'Amount exceeds policy limit'",
        "clearance reject --all --agent safe-agent --tool process-refund --reason 'Fraud wave'",
    ],
    "extend": [
        f"{REVIEWER_KEY_ENV}=clr_... clearance extend apr-1a23c8f5 --until 2026-12-05T18:00Z",
    ],
    "show": [
        "clearance show exec-1a23c8f5e1c2 --json",
        "clearance show apr-1a23       # the execution of this approval request",
    ],
    "audit": [
        "clearance audit",
        "clearance audit --execution exec-1a23c8f5e1c2",
        "clearance audit --request apr-1a23 --json",
        "clearance audit verify       # the hash chain: was any record changed?",
        "clearance audit export --jsonl > audit.jsonl",
    ],
    "prune": [
        "clearance prune --older-than 90d --dry-run   # what would go",
        "clearance prune --older-than 90d",
    ],
    "reviewer": [
        "clearance reviewer add rita --agents 'support-*' --tools 'process-refund,*-account'",
        "clearance reviewer key rita --expires-in 90d",
        "clearance reviewer list",
        "clearance reviewer revoke k3x9a1b2c3d4",
        "clearance reviewer delegate alice --to bob --for 7d   # alice is on holiday",
    ],
    "policy": [
        "clearance policy check refunds.policy.toml",
        "clearance policy replay refunds.policy.toml --since 30d --agent support-agent",
    ],
    "serve": [
        "CLEARANCE_WEBHOOK_SECRET=whsec_... CLEARANCE_API_KEY=... clearance serve --port 8080"
        " --public-url https://approvals.example.com",
    ],
}


# -- the parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clearance",
        description="Human approval gates for AI agents' tool calls.",
        epilog=f"The store is --db (a SQLite file or a store URL), else ${DB_ENV}, else"
        f" ./{DEFAULT_DB}.",
    )
    parser.add_argument("--version", action="version", version=f"clearance {_version()}")
    db_help = (
        f"SQLite database file, or a store URL such as postgresql://host/db (default"
        f" ${DB_ENV}, else ./{DEFAULT_DB})"
    )
    # Before or after the command, as with git and kubectl: `clearance --db x pending`.
    parser.add_argument("--db", metavar="PATH|URL", help=db_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        examples = "\n".join(f"  {line}" for line in EXAMPLES[name])
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=f"examples:\n{examples}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        # SUPPRESS: absent here, it leaves the value given before the command alone.
        p.add_argument("--db", metavar="PATH|URL", default=argparse.SUPPRESS, help=db_help)
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
        type=split_assignment,
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
    demo.set_defaults(run="demo")

    pending = command("pending", "list pending approval requests, oldest first")
    pending.add_argument("--agent", metavar="TAG", help="only this agent's requests")
    pending.add_argument("--json", action="store_true", help="one JSON request per line")
    pending.set_defaults(run="pending")

    approve = command(
        "approve", "approve pending requests, one optionally with modified parameters"
    )
    approve.add_argument(
        "request_ids",
        nargs="+",
        metavar="REQUEST_ID",
        help="the 'apr-…' id, or a unique start of it; several are decided each on its own",
    )
    approve.add_argument(
        "--set",
        action="append",
        type=split_assignment,
        metavar="NAME=VALUE",
        help="a modified parameter; VALUE is JSON when it parses, else text; JSON that "
        "JSON cannot carry (1e999, NaN) is refused (repeatable)",
    )
    approve.add_argument(
        "--by",
        metavar="NAME",
        help=f"who approves (default: your login name; with ${REVIEWER_KEY_ENV}, the key's"
        " reviewer). A name is not checked: a request that needs several approvals counts"
        " only reviewers",
    )
    approve.add_argument("--json", action="store_true", help="the decision as JSON")
    approve.set_defaults(run="approve")

    reject = command("reject", "reject pending requests with a reason")
    reject.add_argument(
        "request_ids",
        nargs="*",
        metavar="REQUEST_ID",
        help="the 'apr-…' id, or a unique start of it; several are decided each on its own",
    )
    reject.add_argument(
        "--all", action="store_true", help="every pending request (narrow with --agent, --tool)"
    )
    reject.add_argument("--agent", metavar="TAG", help="with --all: only this agent's requests")
    reject.add_argument("--tool", metavar="TOOL", help="with --all: only requests for this tool")
    reject.add_argument("--reason", required=True, help="why; the agent is told")
    reject.add_argument(
        "--by",
        metavar="NAME",
        help=f"who rejects (default: your login name; with ${REVIEWER_KEY_ENV}, the key's"
        " reviewer)",
    )
    reject.add_argument("--json", action="store_true", help="the decision as JSON")
    reject.set_defaults(run="reject", set=None)

    extend = command(
        "extend",
        f"give a pending request more time, as the reviewer whose key is ${REVIEWER_KEY_ENV}"
        " (granted 'extend'), up to the tool's max_approval_timeout",
    )
    extend.add_argument(
        "request_id", metavar="REQUEST_ID", help="the 'apr-…' id, or a unique start of it"
    )
    extend.add_argument(
        "--until",
        required=True,
        metavar="TIME",
        help="the new deadline, ISO-8601 with Z or an offset, e.g. 2026-12-05T18:00Z",
    )
    extend.add_argument(
        "--by", metavar="NAME", help=f"who extends: the reviewer of ${REVIEWER_KEY_ENV}'s key"
    )
    extend.add_argument("--json", action="store_true", help="the request as JSON")
    extend.set_defaults(run="extend")

    show = command("show", "an execution's status, output, approvals, events and audit")
    show.add_argument(
        "execution_id",
        metavar="ID",
        help="the 'exec-…' id, or an approval request's 'apr-…' id or a unique start of it",
    )
    show.add_argument(
        "--json", action="store_true", help="the execution, its events and audit as JSON"
    )
    show.set_defaults(run="show")

    audit = command("audit", "the decision log: who decided what, when and why")
    audit.add_argument(
        "action",
        nargs="?",
        choices=("verify", "export"),
        metavar="verify|export",
        help="verify: check the log's hash chain, naming the first record changed, removed"
        " or inserted; export: every record with its hashes (--jsonl)",
    )
    audit.add_argument(
        "--jsonl", action="store_true", help="with export: one JSON object per line (the default)"
    )
    audit.add_argument("--execution", metavar="ID", help="only this execution")
    audit.add_argument(
        "--request", metavar="ID", help="only this approval request (or a unique start of its id)"
    )
    audit.add_argument("--json", action="store_true", help="one JSON record per line")
    audit.set_defaults(run="audit")

    prune = command(
        "prune",
        "forget executions that finished long ago; their audit records stay, without"
        " parameters or reasons (their hashes stay: `audit verify` still holds)",
    )
    prune.add_argument(
        "--older-than",
        required=True,
        metavar="DURATION",
        help="finished (completed, failed or stopped) more than this long ago, e.g. 90d",
    )
    prune.add_argument("--dry-run", action="store_true", help="count only; change nothing")
    prune.add_argument("--json", action="store_true", help="what was done, as JSON")
    prune.set_defaults(run="prune")

    serve = command(
        "serve",
        f"serve the HTTP API (callbacks, signals, reads) and fire timeouts; secrets from "
        f"${SECRET_ENV} and ${API_KEY_ENV}",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=port_number, default=8000, help="port (8000)")
    serve.add_argument(
        "--public-url", metavar="URL", help="where callers reach this server; callbackUrl base"
    )
    serve.add_argument(
        "--trust-header",
        metavar="HEADER",
        help="a header an SSO proxy in front sets to the signed-in reviewer's name (e.g."
        " X-Forwarded-User); off unless given: anyone can send any header",
    )
    serve.set_defaults(run="serve")

    reviewer = command("reviewer", "who may decide what: reviewers, their grants and keys")
    actions = reviewer.add_subparsers(
        dest="action",
        required=True,
        metavar="ACTION",
        help="add, key, list, revoke, remove, delegate",
    )
    add = actions.add_parser("add", help="register a reviewer and print their first key once")
    add.add_argument("name", metavar="NAME")
    add.add_argument(
        "--agents", default="*", metavar="GLOBS", help="agents they may decide for ('*')"
    )
    add.add_argument(
        "--tools", default="*", metavar="GLOBS", help="tools, e.g. 'process-refund,*-account'"
    )
    add.add_argument(
        "--actions", default="decide", metavar="LIST", help="decide and/or extend ('decide')"
    )
    add.add_argument("--groups", default="", metavar="LIST", help="groups they belong to")
    key = actions.add_parser("key", help="print another key for a reviewer, once")
    key.add_argument("name", metavar="NAME")
    for p in (add, key):
        p.add_argument("--expires-in", metavar="DURATION", help="e.g. 90d, 12h (default: never)")
    listing = actions.add_parser("list", help="reviewers, grants and key ids")
    listing.add_argument("--json", action="store_true", help="one JSON reviewer per line")
    revoke = actions.add_parser("revoke", help="revoke a key (its id, or the whole key)")
    revoke.add_argument("key_id", metavar="KEY_ID")
    remove = actions.add_parser("remove", help="remove a reviewer and all their keys")
    remove.add_argument("name", metavar="NAME")
    delegate = actions.add_parser(
        "delegate", help="let another reviewer act with NAME's grants for a while (audited)"
    )
    delegate.add_argument("name", metavar="NAME")
    delegate.add_argument("--to", required=True, metavar="REVIEWER", help="who acts for NAME")
    delegate.add_argument(
        "--until",
        metavar="TIME",
        help="until when (ISO-8601 with Z or an offset, e.g. 2026-12-24T18:00Z); a past time"
        " ends it",
    )
    delegate.add_argument("--for", dest="for_", metavar="DURATION", help="or for how long, e.g. 7d")
    for p in (add, key, listing, revoke, remove, delegate):
        p.add_argument("--db", metavar="PATH|URL", default=argparse.SUPPRESS, help=db_help)
    reviewer.set_defaults(run="reviewer")

    policy = command("policy", "check a policy file, or replay the store's calls against it")
    steps = policy.add_subparsers(
        dest="action", required=True, metavar="ACTION", help="check, replay"
    )
    check = steps.add_parser("check", help="validate FILE and print its rules as a table")
    replay = steps.add_parser(
        "replay", help="what FILE would have done to every call the store recorded"
    )
    replay.add_argument("--since", metavar="DURATION", help="only calls this recent, e.g. 30d")
    replay.add_argument("--agent", metavar="TAG", help="only this agent's calls")
    replay.add_argument(
        "--limit", type=int, default=50, metavar="N", help="changed calls listed (50)"
    )
    replay.add_argument("--db", metavar="PATH|URL", default=argparse.SUPPRESS, help=db_help)
    for p in (check, replay):
        p.add_argument("file", metavar="FILE", help="a policy file (TOML)")
        p.add_argument("--json", action="store_true", help="print JSON")
    policy.set_defaults(run="policy")
    return parser


def _version() -> str:
    try:
        return metadata.version("clearance")
    except metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help, or a usage error argparse already printed
        return exit.code if isinstance(exit.code, int) else 2
    import asyncio

    from clearance import cli_commands, cli_demo
    from clearance.cli_args import UsageError
    from clearance.core.errors import ClearanceError

    run = cli_demo.cmd_demo if args.run == "demo" else getattr(cli_commands, f"cmd_{args.run}")
    try:
        code: int = asyncio.run(run(args))
    except UsageError as err:
        print(f"clearance {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ClearanceError as err:
        cli_commands.warn(str(err))
        return 1
    except BrokenPipeError:
        # The reader went away (`clearance pending --json | head -1`): not an error.
        # Point stdout at nothing, so flushing it at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(
            "\nclearance: interrupted; anything pending stays pending in the database",
            file=sys.stderr,
        )
        return 130
    return code
