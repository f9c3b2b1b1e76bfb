"""Decisions that come back over a message broker, on `<event>.decisions`.

A reviewer service publishes `{"requestId", "approved", "reason", "modifiedParams",
"by"}` (camelCase, as the callback body). Each process hosting an agent that names
the broker reads that subject as one consumer group, so each message is applied
once by one of them, through the same path as `decide()`: one decision wins,
modified parameters are checked against the tool's schema, a late one finds the
request timed out.

A message is acknowledged only once its outcome is settled: applied (committed),
a redelivery of the decision that stands (acknowledged silently), or refused
(the refusal is published on `<event>.errors` first, then acknowledged). When the
store cannot be reached the message is left unacknowledged, so the broker hands
it out again: at least once in, exactly one decision.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from clearance.core.agent import BrokerTarget
from clearance.core.errors import ClearanceError, Refusal
from clearance.core.execution import APPROVED, REJECTED, ApprovalRequest
from clearance.ports.broker import Broker, Incoming

log = logging.getLogger("clearance")

GROUP = "clearance"  # the consumer group every hosting process joins
FIELDS = frozenset({"requestId", "approved", "reason", "modifiedParams", "by", "callDigest"})
# After a failure to reach the store or the broker: wait, then read again.
BACKOFF = 1.0
AT_ONCE = 16  # messages settled at once by one consumer


@attrs.frozen
class Decision:
    request_id: str
    approved: bool
    reason: str | None = None
    modified_params: dict[str, Any] | None = None
    by: str | None = None
    digest: str | None = None  # callDigest: the call the sender decided


class BadDecision(ClearanceError):
    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def parse(data: bytes) -> Decision:
    """A decision message, checked field by field; BadDecision says what is wrong."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadDecision(f"the message is not JSON: {err}") from None
    if not isinstance(body, dict):
        raise BadDecision(f"a decision is a JSON object, got {type(body).__name__}")
    request_id = body.get("requestId")
    if not isinstance(request_id, str) or not request_id:
        raise BadDecision("requestId (the 'apr-…' id) is missing or not a string")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise BadDecision(f"unknown fields {unknown}; a decision has {sorted(FIELDS)}", request_id)
    if not isinstance(body.get("approved"), bool):
        raise BadDecision("approved must be true or false", request_id)
    for key in ("reason", "by", "callDigest"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise BadDecision(f"{key} must be a string or null", request_id)
    changes = body.get("modifiedParams")
    if changes is not None and not isinstance(changes, dict):
        raise BadDecision("modifiedParams must be an object or null", request_id)
    return Decision(
        request_id,
        body["approved"],
        body.get("reason"),
        changes,
        body.get("by"),
        body.get("callDigest"),
    )


def stands(request: ApprovalRequest | None, decision: Decision) -> bool:
    """Whether `decision` is the one `request` already has: a redelivery."""
    if request is None or request.decided_by != decision.by:
        return False
    if decision.approved:
        return request.status == APPROVED and request.modified_params == decision.modified_params
    return request.status == REJECTED and request.rejection_reason == decision.reason


Decide = Callable[[Decision], Awaitable[Any]]
Lookup = Callable[[str], Awaitable[ApprovalRequest | None]]


async def consume(
    broker: Broker, target: BrokerTarget, consumer: str, decide: Decide, lookup: Lookup
) -> None:
    """Apply the decisions published on `target`'s decisions subject, until cancelled.

    Up to AT_ONCE messages are settled at once (each waits on the store), except that
    the decisions of one request are settled in the order they came: the first one
    published is the one that wins."""
    slots = asyncio.Semaphore(AT_ONCE)
    latest: dict[str | None, asyncio.Task[None]] = {}  # by request id: the last one read
    settling: set[asyncio.Task[None]] = set()
    held: set[str] = set()  # the message ids being settled

    async def settle(message: Incoming, after: asyncio.Task[None] | None) -> None:
        try:
            if after is not None:
                await asyncio.wait([after])
            await handle(broker, target, message, decide, lookup)
        except Exception:
            log.exception(
                "decision message %s could not be settled; it comes again", message.message_id
            )
            try:
                await message.retry(BACKOFF)
            except Exception:  # the broker went away too: it redelivers by itself
                log.exception("could not hand message %s back", message.message_id)
        finally:
            slots.release()

    def settled(key: str | None, message_id: str, task: asyncio.Task[None]) -> None:
        settling.discard(task)
        held.discard(message_id)
        if latest.get(key) is task:
            del latest[key]

    try:
        while True:
            try:
                async for message in broker.decisions(target.decisions, GROUP, consumer):
                    if message.message_id in held:
                        # Handed out again while still being settled here (it waited
                        # longer than the broker's redelivery time): that one answers.
                        continue
                    await slots.acquire()
                    key = _request_id(message.data)
                    task = asyncio.create_task(settle(message, latest.get(key)))
                    latest[key] = task
                    held.add(message.message_id)
                    settling.add(task)
                    task.add_done_callback(functools.partial(settled, key, message.message_id))
            except Exception:
                log.exception(
                    "reading decisions from %s on %s failed; trying again",
                    broker.name,
                    target.decisions,
                )
            await asyncio.sleep(BACKOFF)
    finally:
        for task in settling:
            task.cancel()
        await asyncio.gather(*settling, return_exceptions=True)


def _request_id(data: bytes) -> str | None:
    """The request a message decides, where it says (None: `handle` says what is wrong)."""
    try:
        request_id = json.loads(data).get("requestId")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return request_id if isinstance(request_id, str) else None


async def handle(
    broker: Broker, target: BrokerTarget, message: Incoming, decide: Decide, lookup: Lookup
) -> None:
    """Settle one message; raises (leaving it unacknowledged) when it cannot be."""
    try:
        decision = parse(message.data)
    except BadDecision as bad:
        await _refuse(broker, target, message, bad.request_id, "invalid_decision", str(bad))
        return
    try:
        await decide(decision)
    except Refusal as refusal:
        if refusal.code == "already_decided" and stands(
            await lookup(decision.request_id), decision
        ):
            log.info("decision for %s delivered again; it stands", decision.request_id)
        else:
            await _refuse(broker, target, message, decision.request_id, refusal.code, str(refusal))
            return
    await message.ack()


async def _refuse(
    broker: Broker,
    target: BrokerTarget,
    message: Incoming,
    request_id: str | None,
    code: str,
    text: str,
) -> None:
    log.warning("decision message %s refused: %s", message.message_id, text)
    await broker.publish(
        target.errors,
        {
            "type": "decision_refused",
            "requestId": request_id,
            "error": {"code": str(code), "message": text},
            "decision": _as_text(message.data),
        },
    )
    await message.ack()


def _as_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")
