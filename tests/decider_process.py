"""A reviewer process of tests/test_many_workers.py: decides what is pending, racing another.

    python decider_process.py STORE DECISIONS --seed N

Hosts no agent. Polls `pending()` and decides each request by its fate (derived
from the seed and the request id, so both deciders choose the same thing and race
to record it): approve, approve with modified parameters, reject, stop the
execution, or leave it (a send-email then times out; a refund is approved once
DRAIN appears beside DECISIONS). Each decision that took is one JSON line appended
to DECISIONS; a refusal (the other decider was first) is expected and not written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
from pathlib import Path
from typing import Any

from clearance import ApprovalRequest, Clearance, ClearanceError

BY_PREFIX = "decider"
FATES = {
    "process-refund": [
        ("approve", 40),
        ("modify", 20),
        ("reject", 20),
        ("stop", 10),
        ("leave", 10),
    ],
    "send-email": [("approve", 40), ("modify", 10), ("reject", 15), ("leave", 35)],
}
MODIFIED = {"process-refund": {"amount": 25}, "send-email": {"body": "Edited by a human."}}


def fate(seed: int, request: ApprovalRequest) -> str:
    actions, weights = zip(*FATES[request.tool], strict=True)
    return random.Random(f"{seed}:{request.request_id}").choices(actions, weights)[0]


async def decide(app: Clearance, request: ApprovalRequest, action: str, by: str) -> str | None:
    """The decision recorded, or None if the request was no longer pending."""
    try:
        if action == "stop":
            await app.signal(request.execution_id, "stop", by=by, reason="test")
            return "stopped"
        if action == "reject":
            await app.decide(request.request_id, approved=False, reason="no", by=by)
            return "rejected"
        modified: dict[str, Any] | None = None
        if action == "modify":
            modified = {**request.parameters, **MODIFIED[request.tool]}
        await app.decide(request.request_id, approved=True, modified_params=modified, by=by)
        return "approved"
    except ClearanceError:
        return None  # decided by the other decider, timed out, or its execution stopped


async def main(args: argparse.Namespace) -> None:
    out = os.open(args.decisions, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    drain = Path(args.decisions).with_name("DRAIN")
    by = f"{BY_PREFIX}-{os.getpid()}"
    async with Clearance.open(args.store, poll_interval=0.05) as app:
        print("ready", flush=True)
        while True:
            draining = drain.exists()
            for request in await app.pending():
                action = fate(args.seed, request)
                if action == "leave":
                    if not draining or request.tool == "send-email":
                        continue
                    action = "approve"
                took = await decide(app, request, action, by)
                if took is not None:
                    line = {"request": request.request_id, "decision": took, "action": action}
                    line["parameters"] = request.parameters
                    if action == "modify":
                        line["parameters"] = {**request.parameters, **MODIFIED[request.tool]}
                    os.write(out, (json.dumps(line) + "\n").encode())
            await asyncio.sleep(0.02)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("decisions")
    parser.add_argument("--seed", type=int, required=True)
    asyncio.run(main(parser.parse_args()))
