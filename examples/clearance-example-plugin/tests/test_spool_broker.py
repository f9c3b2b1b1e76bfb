"""The spool broker beyond the contract: its URL, several processes writing and reading
one spool, and files it did not write."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from clearance_example_plugin.spool_broker import SpoolBroker, SpoolMessage, open_url

SUBJECT = "approval-requested.decisions"

# A child process: `write N` publishes N messages; `read` takes messages (acknowledging
# them) until none has come for a second. It prints what it wrote or took, as JSON.
CHILD = """
import asyncio, json, os, sys
from clearance_example_plugin.spool_broker import open_url

async def main(spool, subject, what, count=0):
    broker = open_url("files", f"spool://{spool}")
    if what == "write":
        for i in range(int(count)):
            await broker.publish(subject, {"writer": os.getpid(), "n": i})
        return
    messages = broker.decisions(subject, "clearance", str(os.getpid()))
    while True:
        try:
            message = await asyncio.wait_for(anext(messages), 1.0)
        except TimeoutError:
            return
        await message.ack()
        print(json.dumps(json.loads(message.data)), flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


def children(tmp_path: Path, *args: list[str]) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path / "spool"), SUBJECT, *a],
            cwd=tmp_path,  # so that the plugin comes from where it is installed
            stdout=subprocess.PIPE,
            text=True,
        )
        for a in args
    ]


def outputs(processes: list[subprocess.Popen[str]]) -> list[list[dict[str, int]]]:
    found = []
    for process in processes:
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        found.append([json.loads(line) for line in out.splitlines()])
    return found


@asynccontextmanager
async def spool(tmp_path: Path, query: str = "") -> AsyncIterator[SpoolBroker]:
    broker = open_url("files", f"spool://{tmp_path}/spool{query}")
    try:
        yield broker
    finally:
        await broker.aclose()


async def take(broker: SpoolBroker, count: int, seconds: float = 10.0) -> list[SpoolMessage]:
    messages = broker.decisions(SUBJECT, "clearance", "test")
    taken = [await asyncio.wait_for(anext(messages), seconds) for _ in range(count)]
    await messages.aclose()
    return taken


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("spool://relative/dir", "absolute directory"),
        ("spool:relative", "absolute directory"),
        ("redis:///tmp/x", "absolute directory"),
        ("spool:///tmp/x?redeliver_after=0", "redeliver_after must be a number of seconds"),
        ("spool:///tmp/x?redeliver_after=soon", "redeliver_after must be a number of seconds"),
        ("spool:///tmp/x?redeliver_after=inf", "redeliver_after must be a number of seconds"),
        ("spool:///tmp/x?poll=-1", "poll must be a number of seconds"),
        ("spool:///tmp/x?maxlen=5", "unknown spool URL options 'maxlen=5'"),
    ],
)
def test_a_bad_url_is_refused_saying_what_is_accepted(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        open_url("files", url)


def test_a_url_sets_its_options() -> None:
    broker = open_url("files", "spool:///var/spool/my%20approvals?redeliver_after=2.5&poll=1")
    assert (broker.root, broker.redeliver_after, broker.poll) == (
        Path("/var/spool/my approvals"),
        2.5,
        1.0,
    )


async def test_writers_in_other_processes_each_come_in_order_and_once(tmp_path: Path) -> None:
    writers = children(tmp_path, ["write", "25"], ["write", "25"], ["write", "25"])
    async with spool(tmp_path) as broker:
        await asyncio.gather(*(broker.publish(SUBJECT, {"writer": 0, "n": i}) for i in range(25)))
        outputs(writers)
        taken = [json.loads(m.data) for m in await take(broker, 100)]
    by_writer: dict[int, list[int]] = {}
    for body in taken:
        by_writer.setdefault(body["writer"], []).append(body["n"])
    assert len(by_writer) == 4
    # Our own 25 went out at once (threads): all of them, but in no promised order.
    assert sorted(by_writer.pop(0)) == list(range(25))
    assert all(ns == list(range(25)) for ns in by_writer.values()), by_writer
    names = sorted(p.name for p in (tmp_path / "spool" / SUBJECT / "messages").iterdir())
    assert names == [f"{n:016d}.msg" for n in range(1, 101)]


async def test_consumers_in_other_processes_share_a_groups_messages(tmp_path: Path) -> None:
    async with spool(tmp_path) as broker:
        for i in range(60):
            await broker.publish(SUBJECT, {"n": i})
    a, b = outputs(children(tmp_path, ["read"], ["read"]))
    assert sorted(m["n"] for m in a + b) == list(range(60)), "each message once, to one"
    assert [m["n"] for m in a] == sorted(m["n"] for m in a)  # each in the written order


async def test_a_message_handed_back_comes_no_sooner_than_asked(tmp_path: Path) -> None:
    async with spool(tmp_path, "?redeliver_after=0.2") as broker:
        await broker.publish(SUBJECT, {"n": 1})
        [message] = await take(broker, 1)
        await message.retry(1.0)
        handed_back = time.monotonic()
        [again] = await take(broker, 1)
        assert time.monotonic() - handed_back >= 0.9
        assert again.data == message.data and again.message_id == message.message_id


async def test_reading_waits_for_a_spool_that_is_not_there_yet(tmp_path: Path) -> None:
    async with spool(tmp_path) as broker:
        reading = asyncio.create_task(take(broker, 1))
        await asyncio.sleep(0.3)
        assert not reading.done() and not (tmp_path / "spool").exists()
        await broker.publish(SUBJECT, {"n": 1})
        [message] = await reading
        assert json.loads(message.data) == {"n": 1}


async def test_files_it_did_not_write_are_skipped_or_handed_on(tmp_path: Path) -> None:
    async with spool(tmp_path) as broker:
        await broker.publish(SUBJECT, {"n": 1})
        messages = tmp_path / "spool" / SUBJECT / "messages"
        (messages / "notes.txt").write_text("not a message")
        (messages / "0000000000000002.msg").write_text("not an envelope")
        await broker.publish(SUBJECT, {"n": 3})
        taken = [m.data for m in await take(broker, 3)]
    # The decision consumer refuses what is not a decision, and acknowledges it.
    assert taken == [b'{"n":1}', b"not an envelope", b'{"n":3}']
