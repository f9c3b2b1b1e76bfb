"""The child of tests/test_broker_outages.py's crash test: SIGKILLs itself between the
commit of a pause and the publish of its approval request.

    python broker_crash_process.py STORE BROKER_URL EVENT [decide]

Opens the store STORE with the broker BROKER_URL as "approval-events", defines the
refund agent publishing on EVENT, and wraps the broker channel's `send` (the object
the delivery relay sends through) so that its first call SIGKILLs this process
BEFORE anything is published. Then it runs the agent: the execution pauses, the
pause and its delivery row are committed, the relay claims the delivery and calls
`send`, and the process dies there.

With `decide`, it instead hosts the agent and SIGKILLs itself applying the first
decision it reads off the broker (`deciding <request id>`, after `reading`).

stdout, one line each, flushed: `sending <execution id> <request id>` just before the
kill (so the parent knows the kill came from inside `send`), `paused <execution id>
<status>` if `run` came back first, `ran <tool>` if a tool ever ran here (it must
not: nobody decides before the kill), and `alive` if the kill never came.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

from broker_sides import SECRET
from conftest import Recorder, define_refund_agent

from clearance import ApprovalBroker, Clearance, HumanInLoop, ToolContext
from clearance.ports.channel import Sent
from clearance.ports.store import Delivery

BROKER = "approval-events"
# The relay's lease on a delivery it claimed is 2 x webhook_timeout + 5 s: a short
# timeout here lets the next process take the dead one's delivery over within ~6 s.
WEBHOOK_TIMEOUT = 0.5
GIVE_UP_SECONDS = 30.0  # no kill by then: say `alive` and exit 0 (the parent fails)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def define(app: Clearance, recorder: Recorder, event: str) -> None:
    """The spec's refund agent, publishing its approval requests on `event`."""
    define_refund_agent(
        app,
        recorder,
        hitl=HumanInLoop(enabled=True, approval_broker=ApprovalBroker(broker=BROKER, event=event)),
    )


class Telling(Recorder):
    """Says on stdout when a tool runs, before it does."""

    async def process_refund(self, ctx: ToolContext, params: dict[str, Any]) -> dict[str, Any]:
        say(f"ran {ctx.tool}")
        return await super().process_refund(ctx, params)


async def decide_and_die(store: str, url: str, event: str) -> None:
    """Host the agent, and die (SIGKILL) applying the first decision read off the
    broker: after reading it, before its commit and its ack."""
    async with Clearance.open(
        store, poll_interval=0.02, webhook_secret=SECRET, brokers={BROKER: url}
    ) as app:
        apply = app._record_decision

        async def record(decision: Any) -> None:
            say(f"deciding {decision.request_id}")
            os.kill(os.getpid(), signal.SIGKILL)
            await apply(decision)  # never reached

        app._record_decision = record  # type: ignore[method-assign]
        define(app, Telling(), event)
        say("reading")
        await asyncio.sleep(GIVE_UP_SECONDS)
    say("alive")


async def main(store: str, url: str, event: str) -> None:
    async with Clearance.open(
        store,
        poll_interval=0.02,
        webhook_secret=SECRET,
        webhook_timeout=WEBHOOK_TIMEOUT,
        brokers={BROKER: url},
    ) as app:
        define(app, Telling(), event)
        channel = app.brokers[BROKER]
        # The relay holds the channel objects themselves: wrap this very instance.
        assert app.webhooks.channels[channel.name] is channel, app.webhooks.channels
        publish = channel.send

        async def send(delivery: Delivery, body: dict[str, Any]) -> Sent:
            say(f"sending {delivery.execution_id} {delivery.webhook_id}")
            os.kill(os.getpid(), signal.SIGKILL)  # committed, claimed, not yet published
            return await publish(delivery, body)  # never reached

        channel.send = send  # type: ignore[method-assign]
        ex = await app.run("safe-agent", input="Refund ORD-123")
        say(f"paused {ex.id} {ex.status}")
        await asyncio.sleep(GIVE_UP_SECONDS)  # the relay attempts the delivery: the kill
    say("alive")


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5) or sys.argv[4:] not in ([], ["decide"]):
        sys.exit(__doc__)
    run = decide_and_die if sys.argv[4:] == ["decide"] else main
    asyncio.run(run(sys.argv[1], sys.argv[2], sys.argv[3]))
