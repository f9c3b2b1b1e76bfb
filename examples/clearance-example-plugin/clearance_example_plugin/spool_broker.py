"""A broker on a spool directory: `spool:///abs/dir?redeliver_after=SECONDS&poll=SECONDS`.

Processes on one host (or sharing a POSIX volume) exchange approval requests and
decisions as files, with no server. Each subject is a directory; its messages are
numbered files, and each consumer group keeps its marks beside them:

    DIR/<subject>/messages/0000000000000007.msg            {"id", "headers", "body"}
    DIR/<subject>/groups/<group>/0000000000000007.acked    acknowledged: never again
    DIR/<subject>/groups/<group>/0000000000000007.3.lease  hand-out 3, held until a time

Writing: the message goes into a temporary file (fsynced), which is then linked to the
number after the highest. A link, unlike a rename, fails when the name exists, so two
writers never share a number, and a name appears whole and only after every lower
one. Order: a subject's messages come in the order their numbers were taken, across
all writers (so, at least, in the order each writer wrote them).

Reading: a consumer takes a message by creating its next lease file the same way
(only one can create `7.3.lease`), held for `redeliver_after` seconds (30): if its
consumer dies unacknowledged, the lease runs out and any consumer of the group takes
it again; `retry(delay)` writes the next lease, running out `delay` from now. Lease
times are wall-clock, so hosts sharing a volume need synchronised clocks. Each look
lists the subject's files every `poll` seconds (0.05) while idle: fine for thousands
of messages, not for millions.

Another program reads messages in name order and writes one as a writer does (`id`
and `headers` may be left out). Nothing is deleted: this is an example, not a
retention policy. Acknowledgements are not fsynced: after a power loss one may come
again, as at-least-once delivery allows.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import secrets
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from clearance.core.json_text import dumps
from clearance.core.rows import broker_channel
from clearance.ports.broker import PUBLISHES_AT_ONCE, Signer, our_options, signed_message
from clearance.ports.channel import DELIVERED, FAILED, RETRY, Sent
from clearance.ports.store import Delivery

DIGITS = 16  # zero-padded, so that names sort as their numbers do
OPTIONS = {"redeliver_after": 30.0, "poll": 0.05}  # seconds


def component(name: str) -> str:
    """A subject or group as one path component: '/' escaped, never '.' or '..'."""
    quoted = quote(name, safe="-_.@+=")
    return quoted.replace(".", "%2E") if quoted.strip(".") == "" else quoted


def put(tmp: Path, target: Path) -> bool:
    """Give `tmp`'s content the name `target`, unless it is taken: unlike os.replace,
    os.link never overwrites, so one name is one writer's, whole."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        return False
    return True


def written(directory: Path, data: bytes, *, durable: bool) -> Path:
    """A new temporary file in `directory` (readers skip dot files) holding `data`."""
    tmp = directory / f".tmp-{os.getpid()}-{secrets.token_hex(8)}"
    with open(tmp, "xb") as file:
        file.write(data)
        if durable:
            file.flush()
            os.fsync(file.fileno())
    return tmp


def numbers(messages: Path) -> list[str]:
    """The subject's message numbers, in order (temporary and foreign files skipped)."""
    names = (n.removesuffix(".msg") for n in os.listdir(messages) if n.endswith(".msg"))
    return sorted(n for n in names if len(n) == DIGITS and n.isdigit())


def last(messages: Path) -> int:
    """The highest message number taken so far (0: none)."""
    return max((int(n) for n in numbers(messages)), default=0)


def group_marks(marks: Path) -> tuple[set[str], dict[str, int]]:
    """A group's acknowledged messages, and each message's latest lease."""
    acked: set[str] = set()
    leases: dict[str, int] = {}
    for mark in os.listdir(marks):
        number, _, kind = mark.partition(".")
        lease = kind.removesuffix(".lease")
        if kind == "acked":
            acked.add(number)
        elif lease != kind and lease.isdigit():
            leases[number] = max(leases.get(number, 0), int(lease))
    return acked, leases


def take(group: Path, number: str, lease: int, until: float) -> bool:
    """Create lease `lease` of message `number`, ending at `until`: False if taken."""
    tmp = written(group, repr(until).encode(), durable=False)
    try:
        return put(tmp, group / f"{number}.{lease}.lease")
    finally:
        tmp.unlink()


@dataclass(eq=False)
class SpoolMessage:
    data: bytes
    message_id: str  # the file's number: unique in its subject
    group: Path
    lease: int  # the hand-out this is: its lease file's number

    async def ack(self) -> None:
        # Whoever holds it now: an acknowledgement is for the message, not the hand-out.
        await asyncio.to_thread((self.group / f"{self.message_id}.acked").touch)

    async def retry(self, delay: float) -> None:
        # If the next lease exists, another consumer has taken it over: nothing to do.
        until = time.time() + delay
        await asyncio.to_thread(take, self.group, self.message_id, self.lease + 1, until)


class SpoolBroker:
    per_target: int | None = PUBLISHES_AT_ONCE

    def __init__(
        self, name: str, root: Path, *, redeliver_after: float, poll: float, sign: Signer | None
    ) -> None:
        self.name = broker_channel(name)
        self.root = root
        self.redeliver_after = redeliver_after
        self.poll = poll
        self._sign = sign
        self._lock = threading.Lock()  # this process's writers take numbers in turn
        self._next: dict[str, int] = {}  # per subject: the number to try first

    async def send(self, delivery: Delivery, body: dict[str, Any]) -> Sent:
        message = signed_message(delivery, body, self._sign)
        if message is None:
            return Sent(FAILED, error="no webhook_secret configured to sign it")
        text, headers = message
        envelope = {"id": delivery.webhook_id, "headers": headers, "body": text}
        try:
            await asyncio.to_thread(self._append, delivery.url, envelope)
        except OSError as err:
            return Sent(RETRY, error=str(err))
        return Sent(DELIVERED)

    async def publish(self, subject: str, body: dict[str, Any]) -> None:
        await asyncio.to_thread(self._append, subject, {"body": dumps(body, compact=True)})

    def _append(self, subject: str, envelope: dict[str, Any]) -> None:
        messages = self.root / component(subject) / "messages"
        messages.mkdir(parents=True, exist_ok=True)
        tmp = written(messages, dumps(envelope, compact=True).encode(), durable=True)
        try:
            with self._lock:
                number = self._next.get(subject) or last(messages) + 1
                while not put(tmp, messages / f"{number:0{DIGITS}d}.msg"):
                    number = last(messages) + 1  # another process wrote meanwhile
                self._next[subject] = number + 1
        finally:
            tmp.unlink()
        # The new name is durable once its directory is: only then is it DELIVERED.
        fd = os.open(messages, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def decisions(
        self, subject: str, group: str, consumer: str
    ) -> AsyncGenerator[SpoolMessage, None]:
        # `consumer` is not needed on disk: whoever holds a message's lease has it. The
        # files are read in a thread, so a slow disk never stalls the event loop; if the
        # reader is cancelled meanwhile, what the thread takes is not handed out, and
        # comes again when its lease runs out, as if its consumer had died.
        while True:
            try:
                message = await asyncio.to_thread(self._claim, subject, group)
            except OSError:  # missing, unreadable, a full disk: look again later
                message = None
            if message is None:
                await asyncio.sleep(self.poll)
            else:
                yield message

    def _claim(self, subject: str, group: str) -> SpoolMessage | None:
        """Take the first message of `subject` that `group` has neither acknowledged nor
        handed out under a lease still running; None when there is none."""
        messages = self.root / component(subject) / "messages"
        order = numbers(messages)
        marks = self.root / component(subject) / "groups" / component(group)
        marks.mkdir(parents=True, exist_ok=True)
        acked, leases = group_marks(marks)
        now = time.time()
        for number in order:
            lease = leases.get(number, 0)
            if number in acked or (lease and self._until(marks, number, lease) > now):
                continue
            if not take(marks, number, lease + 1, now + self.redeliver_after):
                continue  # another consumer took it first
            if (marks / f"{number}.acked").exists():
                continue  # acknowledged by its last holder since we listed the marks
            return SpoolMessage(self._body(messages / f"{number}.msg"), number, marks, lease + 1)
        return None

    @staticmethod
    def _until(marks: Path, number: str, lease: int) -> float:
        try:
            return float((marks / f"{number}.{lease}.lease").read_text())
        except ValueError:  # emptied by a crash: the lease is over
            return 0.0

    @staticmethod
    def _body(path: Path) -> bytes:
        raw = path.read_bytes()
        try:
            body = json.loads(raw)["body"]
        except (ValueError, TypeError, KeyError):
            return raw  # not an envelope: handed on as it is, for the reader to refuse
        return body.encode() if isinstance(body, str) else raw

    async def aclose(self) -> None:
        pass  # no connections, no pollers outside `decisions`


def open_url(name: str, url: str, *, sign: Signer | None = None) -> SpoolBroker:
    """The `clearance.channels` entry for `spool:///abs/dir` URLs."""
    options, rest = our_options(url, set(OPTIONS))
    parts = urlsplit(rest)
    if parts.scheme != "spool" or parts.netloc or not parts.path.startswith("/"):
        raise ValueError(f"a spool URL names an absolute directory: spool:///abs/dir, got {url!r}")
    if parts.query:
        raise ValueError(f"unknown spool URL options {parts.query!r}; accepted: {sorted(OPTIONS)}")
    return SpoolBroker(
        name,
        Path(unquote(parts.path)),
        redeliver_after=seconds(options, "redeliver_after"),
        poll=seconds(options, "poll"),
        sign=sign,
    )


def seconds(options: dict[str, str], key: str) -> float:
    """The URL's `key` option, a number of seconds above 0 (its default if absent)."""
    text = options.get(key)
    if text is None:
        return OPTIONS[key]
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise ValueError(f"{key} must be a number of seconds above 0 (e.g. {key}=30), got {text!r}")
    return value
