"""Benchmark 8: approval requests published and decided over message brokers, end to end.

For each broker, one process (this one, one event loop) holds both sides:

- Clearance on a SQLite file (a fresh one in a temporary directory, `synchronous=FULL`,
  the default `poll_interval`), opened with `brokers={NAME: URL}` and a webhook secret,
  hosting the refund agent with `HumanInLoop(approval_broker=ApprovalBroker(NAME,
  EVENT))`. A builder starts `broker_requests` executions (`IN_FLIGHT` lanes, each
  starting its next `app.run()` as soon as the last one has paused); each pauses on
  the gated tool, and its approval request goes out on the broker.
- A reviewer service, written with the broker's own client library as an outside
  service would be (never with Clearance's adapter): it reads each request message as
  it arrives and at once publishes an approval on `EVENT.decisions` (`{"requestId",
  "approved", "reason", "modifiedParams", "by"}`), which Clearance reads, applies and
  then runs the tool.

Throughput: requests / (wall time from the first `run()` to the last tool handler
having started). Latency: the reviewer reads `time.monotonic()` just before it
publishes each decision; the tool handler reads it on entry; both are keyed by the
request id (`ctx.request_id`). The run() -> reviewer column is the time from `run()`
returning (the request is committed, pending) to the reviewer reading the request.

The webhook row is the same flow over the HTTP webhook channel: a receiver
(Starlette, served on this loop) checks the Standard Webhooks signature, answers 204
and POSTs `{"approved": true}` to the request's `callbackUrl`, on Clearance's own HTTP
API (`app.asgi()`, also served on this loop); the decision time is read just before
that POST.

Servers: Redis (`CLEARANCE_BENCH_REDIS`), NATS with JetStream (`CLEARANCE_BENCH_NATS`),
RabbitMQ (`CLEARANCE_BENCH_RABBITMQ`). Each run uses names of its own (a broker name
`bench-<hex>`, an event `bench-<hex>.approval-requested`) and deletes its streams,
queues and exchanges afterwards. A broker whose adapter is not installed, or whose
server does not answer, is reported as skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from bench.agents import AGENT, INPUT, RESULT, define_refund_agent
from bench.common import Section, Sizes, fmt, percentile, scratch_dir, table
from bench.concurrent import in_flight
from clearance import ApprovalBroker, Clearance, ClearanceError, ToolContext
from clearance.app import DEFAULT_POLL_INTERVAL

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

T = TypeVar("T")
REDIS = os.environ.get("CLEARANCE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
NATS = os.environ.get("CLEARANCE_BENCH_NATS", "nats://127.0.0.1:4222")
RABBITMQ = os.environ.get("CLEARANCE_BENCH_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/")
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
IN_FLIGHT = 64  # builder lanes, as benchmark 5
ONE_AT_A_TIME = 100  # requests in the unloaded pass
CONNECT_TIMEOUT = 3.0  # seconds a server has to answer before its row says skipped
REVIEWER = "bench-reviewer"


class Skipped(Exception):
    """This broker cannot be measured here: the row says why."""


@dataclass
class Times:
    """`time.monotonic()` readings, by request id."""

    paused: dict[str, float] = field(default_factory=dict)  # run() returned, request pending
    received: dict[str, float] = field(default_factory=dict)  # the reviewer read the request
    decided: dict[str, float] = field(default_factory=dict)  # just before it published
    started: dict[str, float] = field(default_factory=dict)  # the tool handler's first line
    errors: list[str] = field(default_factory=list)  # what went wrong on the reviewer's side
    broken: asyncio.Event = field(default_factory=asyncio.Event)  # the reviewer stopped

    def decision(self, request_id: str, body: dict[str, Any] | None = None) -> bytes | None:
        """The reviewer read `request_id`: the decision to publish, `body` or by default
        the broker decision (None if it already decided it: a redelivery). Call it just
        before publishing: it reads the clock."""
        if request_id in self.decided:
            return None
        self.received[request_id] = time.monotonic()
        if body is None:
            body = {
                "requestId": request_id,
                "approved": True,
                "reason": None,
                "modifiedParams": None,
                "by": REVIEWER,
            }
        data = json.dumps(body).encode()
        self.decided[request_id] = time.monotonic()
        return data


@dataclass
class Result:
    requests: int
    seconds: float
    latencies: list[float]  # decision published -> tool handler started, seconds
    delivery: list[float]  # run() returned -> reviewer read the request, seconds

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


class Side(Protocol):
    """The outside service's side of one channel."""

    label: str
    server: str  # what the row names as the server

    async def connect(self) -> None:
        """Reach the server; raises Skipped when it does not answer."""
        ...

    def open_options(self, name: str) -> dict[str, Any]:
        """What `Clearance.open` takes besides the store (brokers=, public_url=)."""
        ...

    def agent_options(self, name: str, event: str) -> dict[str, Any]:
        """What the agent's HumanInLoop takes (approval_broker=, approval_webhook=)."""
        ...

    def reviewing(
        self, app: Clearance, event: str, times: Times
    ) -> AbstractAsyncContextManager[None]:
        """The reviewer runs inside this context, ready to read once it is entered."""
        ...

    async def close(self, event: str) -> None:
        """Delete what this run made on the server; disconnect."""
        ...


@asynccontextmanager
async def running(review: Coroutine[Any, Any, None], times: Times) -> AsyncIterator[None]:
    """Run a reviewer loop as a task while the context lasts. If it fails, `times`
    says why and `times.broken` ends the wait for the tools."""

    async def guarded() -> None:
        try:
            await review
        except Exception as err:
            times.errors.append(f"the reviewer failed: {type(err).__name__}: {err}")
            times.broken.set()

    task = asyncio.create_task(guarded())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- the sides ---------------------------------------------------------------------------


class BrokerSide:
    """What the broker sides share: Clearance opened with the broker's `url`, the agent
    publishing on it, and the side's reviewer (`_review`) running while measured."""

    url: str

    def open_options(self, name: str) -> dict[str, Any]:
        return {"brokers": {name: self.url}}

    def agent_options(self, name: str, event: str) -> dict[str, Any]:
        return {"approval_broker": ApprovalBroker(broker=name, event=event)}

    async def _review(self, event: str, times: Times) -> None:
        raise NotImplementedError

    def reviewing(
        self, app: Clearance, event: str, times: Times
    ) -> AbstractAsyncContextManager[None]:
        return running(self._review(event, times), times)


class MemorySide(BrokerSide):
    label = "memory"
    server = "in-process (`memory://`)"

    async def connect(self) -> None:
        from clearance.testing import MemoryBroker

        self.key = f"bench-{secrets.token_hex(4)}"
        self.hub = MemoryBroker.named(self.key)
        self.url = f"memory://{self.key}"

    async def _review(self, event: str, times: Times) -> None:
        while True:
            message = await self.hub.read(event, REVIEWER)
            await message.ack()
            data = times.decision(json.loads(message.data)["requestId"])
            if data is not None:
                self.hub.publish(f"{event}.decisions", data.decode())

    async def close(self, event: str) -> None:
        self.hub.clear()


class RedisSide(BrokerSide):
    label = "Redis Streams"
    server = url = REDIS

    async def connect(self) -> None:
        import redis.asyncio as redis
        from redis.exceptions import RedisError

        self.client = redis.from_url(REDIS, socket_connect_timeout=CONNECT_TIMEOUT)
        try:
            await self.client.ping()
        except (RedisError, OSError) as err:
            await self.client.aclose()
            raise Skipped(f"no Redis answers at {REDIS} ({err})") from None

    async def _review(self, event: str, times: Times) -> None:
        last = "0-0"
        while True:
            read: Any = await self.client.xread({event: last}, count=256, block=1000)
            # RESP2: [[stream, entries]]; RESP3: {stream: [entries]}.
            if isinstance(read, dict):
                entries = [e for got in read.values() for e in got[0]]
            else:
                entries = read[0][1] if read else []
            for entry_id, fields in entries:
                last = entry_id.decode()
                data = times.decision(fields[b"id"].decode())
                if data is not None:
                    await self.client.xadd(f"{event}.decisions", {"data": data})

    async def close(self, event: str) -> None:
        try:
            keys = [key async for key in self.client.scan_iter(match=f"{event}*")]
            if keys:
                await self.client.delete(*keys)
        finally:
            await self.client.aclose()


class NatsSide(BrokerSide):
    label = "NATS JetStream"
    server = url = NATS

    async def connect(self) -> None:
        import nats
        from nats.errors import Error as NatsError

        async def quiet(err: Exception) -> None:
            pass  # nats-py reports each failed try here; the row says why in the end

        try:
            self.nc = await asyncio.wait_for(
                nats.connect(
                    NATS,
                    connect_timeout=CONNECT_TIMEOUT,
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                    error_cb=quiet,
                ),
                CONNECT_TIMEOUT,
            )
        except (NatsError, OSError, TimeoutError) as err:
            why = str(err) or f"no answer within {CONNECT_TIMEOUT:g} s"
            raise Skipped(f"no NATS answers at {NATS} ({type(err).__name__}: {why})") from None
        self.js = self.nc.jetstream()
        try:
            await self.js.account_info()
        except (NatsError, TimeoutError) as err:
            await self.nc.close()
            raise Skipped(f"NATS at {NATS} has no JetStream ({err})") from None

    async def _stream(self, event: str) -> str | None:
        from nats.js.errors import NotFoundError

        try:
            return await self.js.find_stream_name_by_subject(event)
        except NotFoundError:
            return None

    async def _review(self, event: str, times: Times) -> None:
        # Clearance makes the stream on its first publish: wait for it.
        stream = await appeared(lambda: self._stream(event), f"a stream taking {event}")
        sub = await self.js.pull_subscribe(event, durable=REVIEWER, stream=stream)
        while True:
            try:
                messages = await sub.fetch(batch=256, timeout=1)
            except TimeoutError:
                continue
            # The batch's decisions are published together, so the reviewer keeps up.
            await asyncio.gather(*(self._decide(event, m, times) for m in messages))

    async def _decide(self, event: str, message: Any, times: Times) -> None:
        request_id = (message.headers or {}).get("Nats-Msg-Id")
        if request_id is None:
            request_id = json.loads(message.data)["requestId"]
        data = times.decision(request_id)
        if data is not None:
            await self.js.publish(f"{event}.decisions", data)
        await message.ack()

    async def close(self, event: str) -> None:
        try:
            stream = await self._stream(event)
            if stream is not None:
                await self.js.delete_stream(stream)
        finally:
            await self.nc.close()


class RabbitSide(BrokerSide):
    label = "RabbitMQ"
    url = RABBITMQ
    server = RABBITMQ.replace("guest:guest@", "")

    async def connect(self) -> None:
        import aio_pika

        try:
            self.connection = await aio_pika.connect(RABBITMQ, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as err:
            raise Skipped(
                f"no RabbitMQ answers at {self.server} ({type(err).__name__}: {err})"
            ) from None

    def open_options(self, name: str) -> dict[str, Any]:
        self.exchange = name  # the broker name is the exchange's
        return super().open_options(name)

    async def _review(self, event: str, times: Times) -> None:
        import aio_pika
        from aio_pika.exceptions import ChannelClosed

        async def declared() -> tuple[AbstractChannel, AbstractQueue] | None:
            channel = await self.connection.channel()
            try:
                return channel, await channel.declare_queue(queue_name, passive=True)
            except ChannelClosed:  # NOT_FOUND closes the channel: the next try opens another
                return None

        # Clearance declares the exchange and its queues: wait for the request queue.
        queue_name = f"{self.exchange}.{event}"
        channel, queue = await appeared(declared, f"the queue {queue_name}")
        await channel.set_qos(prefetch_count=256)
        exchange = await channel.get_exchange(self.exchange)

        async def decide(message: AbstractIncomingMessage) -> None:
            request_id = message.message_id or json.loads(message.body)["requestId"]
            data = times.decision(request_id)
            if data is not None:
                await exchange.publish(
                    aio_pika.Message(
                        data,
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=f"{event}.decisions",
                )
            await message.ack()

        # A task per message (at most the prefetch at once), so that the reviewer does
        # not wait for one publisher confirm before it reads the next request.
        running: set[asyncio.Task[None]] = set()
        try:
            async with queue.iterator() as messages:
                async for message in messages:
                    task = asyncio.create_task(decide(message))
                    running.add(task)
                    task.add_done_callback(running.discard)
        finally:
            for task in running:
                task.cancel()

    async def close(self, event: str) -> None:
        try:
            channel = await self.connection.channel()
            for suffix in ("", ".decisions", ".errors"):
                await channel.queue_delete(f"{self.exchange}.{event}{suffix}")
            await channel.exchange_delete(self.exchange)
        finally:
            await self.connection.close()


class WebhookSide:
    label = "webhook (baseline)"
    server = "local HTTP receiver, callback to `app.asgi()`"

    async def connect(self) -> None:
        import httpx

        self.receiver_port = free_port()
        self.api_port = free_port()
        self.http = httpx.AsyncClient(timeout=30)

    def open_options(self, name: str) -> dict[str, Any]:
        return {"public_url": f"http://127.0.0.1:{self.api_port}"}

    def agent_options(self, name: str, event: str) -> dict[str, Any]:
        return {"approval_webhook": f"http://127.0.0.1:{self.receiver_port}/hook"}

    @asynccontextmanager
    async def reviewing(self, app: Clearance, event: str, times: Times) -> AsyncIterator[None]:
        import httpx
        from standardwebhooks.webhooks import Webhook, WebhookVerificationError
        from starlette.applications import Starlette
        from starlette.background import BackgroundTask
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        verifier = Webhook(SECRET)

        async def decide(request_id: str, callback: str) -> None:
            # The callback body: the request is named by the URL.
            data = times.decision(request_id, {"approved": True, "by": REVIEWER})
            if data is None:
                return
            try:
                answer = await self.http.post(
                    callback, content=data, headers={"content-type": "application/json"}
                )
            except httpx.HTTPError as err:
                times.errors.append(f"callback failed: {type(err).__name__}: {err}")
                return
            if answer.status_code != 200:
                times.errors.append(f"callback answered {answer.status_code}: {answer.text}")

        async def receive(request: Request) -> Response:
            body = await request.body()
            try:
                payload = verifier.verify(body, dict(request.headers))
            except WebhookVerificationError:
                return Response(status_code=400)
            # Acknowledge at once; decide right after, through the callback URL.
            task = BackgroundTask(decide, payload["requestId"], payload["callbackUrl"])
            return Response(status_code=204, background=task)

        receiver = Starlette(routes=[Route("/hook", receive, methods=["POST"])])
        async with serving(receiver, self.receiver_port), serving(app.asgi(), self.api_port):
            yield

    async def close(self, event: str) -> None:
        await self.http.aclose()


SIDES: dict[str, type[Side]] = {
    "memory": MemorySide,
    "redis": RedisSide,
    "nats": NatsSide,
    "rabbitmq": RabbitSide,
    "webhook": WebhookSide,
}
QUICK = ("memory", "redis", "webhook")  # --quick: no NATS or RabbitMQ


async def appeared(probe: Callable[[], Awaitable[T | None]], what: str) -> T:
    """What `probe` finds, once it finds something: what Clearance makes on its first
    publish (a stream, a queue). Looks every 10 ms for up to 30 s."""
    for _ in range(3000):
        found = await probe()
        if found is not None:
            return found
        await asyncio.sleep(0.01)
    raise RuntimeError(f"{what} did not appear within 30 s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def serving(asgi: Any, port: int) -> AsyncIterator[None]:
    """Serve `asgi` on 127.0.0.1:`port` from this event loop (as `clearance serve` does)."""
    import uvicorn

    config = uvicorn.Config(
        asgi, host="127.0.0.1", port=port, log_level="warning", lifespan="off", access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError(f"the bench server on port {port} stopped before it started")
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await task


# -- the measurement ---------------------------------------------------------------------


async def measure(side: Side, n: int, store: str, deadline: float, lanes: int) -> Result:
    """`n` requests through `side`, end to end, `lanes` of runs at once; raises Skipped
    when it cannot run."""
    name = f"bench-{secrets.token_hex(4)}"
    event = f"{name}.approval-requested"
    times = Times()
    all_ran = asyncio.Event()

    ran: dict[str, asyncio.Future[None]] = {}  # one at a time: the run waits for its tool

    async def handler(ctx: ToolContext, params: dict[str, Any]) -> dict[str, Any]:
        times.started[ctx.request_id or ""] = time.monotonic()
        if len(times.started) >= n:
            all_ran.set()
        waiting = ran.get(ctx.request_id or "")
        if waiting is not None and not waiting.done():
            waiting.set_result(None)
        return RESULT

    await side.connect()
    try:
        async with AsyncExitStack() as stack:
            try:
                app = Clearance.open(store, webhook_secret=SECRET, **side.open_options(name))
            except ClearanceError as err:
                raise Skipped(str(err)) from None
            await stack.enter_async_context(app)
            model = define_refund_agent(app, handler=handler, **side.agent_options(name, event))
            await stack.enter_async_context(side.reviewing(app, event, times))

            async def one() -> None:
                ex = await app.run(AGENT, input=INPUT)
                assert ex.status == "awaiting_approval", ex.status
                request_id = ex.pending_approvals[0].request_id
                times.paused[request_id] = time.monotonic()
                if lanes == 1 and request_id not in times.started:
                    ran[request_id] = asyncio.get_running_loop().create_future()
                    await asyncio.wait_for(ran[request_id], deadline)

            start = time.perf_counter()
            await in_flight(one, n, lanes)
            waits = [asyncio.ensure_future(e.wait()) for e in (all_ran, times.broken)]
            left = deadline - (time.perf_counter() - start)
            await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            for wait in waits:
                wait.cancel()
            if not all_ran.is_set():
                errors = f"; {len(times.errors)} errors, first: {times.errors[0]}"
                raise RuntimeError(
                    f"only {len(times.started)} of {n} tools ran in "
                    f"{time.perf_counter() - start:.0f} s ({len(times.received)} requests "
                    f"reached the reviewer{errors if times.errors else ''})"
                )
            seconds = time.perf_counter() - start
            model.requests.clear()
    finally:
        await side.close(event)
    latencies = [times.started[r] - times.decided[r] for r in times.started]
    delivery = [times.received[r] - times.paused[r] for r in times.received if r in times.paused]
    return Result(n, seconds, latencies, delivery)


def _row(label: str, server: str, n: int, result: Result) -> list[str]:
    lat, dl = result.latencies, result.delivery
    return [
        label,
        server,
        f"{n:,}",
        fmt(result.rate),
        f"{result.seconds:.2f}",
        f"{percentile(dl, 50) * 1000:.1f} / {percentile(dl, 99) * 1000:.1f}",
        f"{percentile(lat, 50) * 1000:.1f}",
        f"{percentile(lat, 99) * 1000:.1f}",
    ]


def run(sizes: Sizes) -> Section:
    n = sizes.broker_requests
    alone = min(n, ONE_AT_A_TIME)
    deadline = 30.0 if sizes.quick else 120.0
    chosen = QUICK if sizes.quick else tuple(SIDES)
    rows: list[list[str]] = []
    quiet: list[list[str]] = []
    for key, make in SIDES.items():
        side = make()
        for count, lanes, into in ((n, IN_FLIGHT, rows), (alone, 1, quiet)):
            if key not in chosen:
                into.append(
                    [side.label, side.server, "-", "skipped: not run with --quick", *"----"]
                )
                continue
            with scratch_dir(f"brokers-{key}") as where:
                store = f"sqlite:///{where / 'bench.db'}"
                try:
                    result = asyncio.run(measure(side, count, store, deadline, lanes))
                except Skipped as why:
                    into.append([side.label, side.server, "-", f"skipped: {why}", *"----"])
                    continue
                except Exception as err:  # one broker failing does not lose the others' rows
                    failed = f"failed: {type(err).__name__}: {err}"
                    into.append([side.label, side.server, "-", failed, *"----"])
                    continue
            into.append(_row(side.label, side.server, count, result))

    section = Section("8. Approval requests over message brokers, end to end")
    section.add(
        f"{n:,} approval requests per broker. One process: Clearance on a fresh SQLite file "
        f"(`synchronous=FULL`, `poll_interval` {DEFAULT_POLL_INTERVAL} s, the defaults) "
        f"hosting the refund agent with `approval_broker`, a builder starting the {n:,} "
        f"executions ({IN_FLIGHT} `app.run()` lanes; each pauses on the gated tool), and "
        "a reviewer written with the broker's own client library (redis-py, nats-py, "
        "aio-pika) that reads each request message and at once publishes an approval "
        "on `EVENT.decisions`. requests/s = requests / wall time from the first `run()` "
        "to the last tool handler having started. decision -> tool: `time.monotonic()` "
        "just before the reviewer publishes a decision to the tool handler's first line, "
        "same request id. run() -> reviewer: from `run()` returning (the request "
        "committed) to the reviewer reading it. Webhook row: the same flow over a "
        "signed HTTP webhook to a receiver on this loop that answers 204 and POSTs the "
        "approval to the request's `callbackUrl` (Clearance's HTTP API, same loop). "
        "Percentiles are nearest-rank.",
        "",
    )
    columns = [
        "channel",
        "server",
        "requests",
        "requests/s",
        "wall s",
        "run() -> reviewer p50 / p99 ms",
        "decision -> tool p50 ms",
        "decision -> tool p99 ms",
    ]
    section.add(f"Under load ({IN_FLIGHT} runs at once):", "", *table(columns, rows), "")
    section.add(
        f"One at a time ({alone} requests, each run started once the last one's tool ran):",
        "",
        *table(columns, quiet),
    )
    return section
