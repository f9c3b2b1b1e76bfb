"""A TCP proxy the test owns, in front of a real server, to take the server away from
its clients and give it back:

    async with TcpProxy(("127.0.0.1", 6379)) as proxy:
        url = f"redis://{proxy.host}:{proxy.port}/0"
        ...
        await proxy.stop()   # the listener closes and every open connection is cut
        ...                  # clients see the server gone: refused, reset, closed
        await proxy.start()  # listening again, on the same port

It runs in the test's event loop. Every connection is one task of its own (the
client's socket and one to the target, bytes copied both ways); `stop()` cancels
them all and waits until their sockets are closed, and leaving the `async with`
stops it, so nothing outlives the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from types import TracebackType

CHUNK = 65536
CONNECT_SECONDS = 5.0  # bound on reaching the target for one client


class TcpProxy:
    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self.port = 0  # chosen by the system on the first start, kept after
        self._server: asyncio.Server | None = None
        self._serving = False
        # Each open connection: its task and the writers of its two sockets.
        self._links: dict[asyncio.Task[None], list[asyncio.StreamWriter]] = {}

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def connections(self) -> int:
        """Connections open through the proxy now."""
        return len(self._links)

    async def start(self) -> None:
        """Listen (again) on `host`: on a free port the first time, the same port after."""
        if self._server is not None:
            return
        self._serving = True
        try:
            server = await asyncio.start_server(
                self._accepted, self.host, self.port, reuse_address=True, backlog=64
            )
        except BaseException:
            self._serving = False
            raise
        self.port = server.sockets[0].getsockname()[1]
        self._server = server

    async def stop(self) -> None:
        """Close the listener (new connections are refused) and cut every open
        connection, both its sides; returns once their sockets are closed."""
        self._serving = False
        server, self._server = self._server, None
        if server is not None:
            server.close()
        links = list(self._links.items())
        for task, writers in links:
            task.cancel()
            for writer in writers:  # also those of a task cancelled before it ran
                writer.transport.abort()
        if links:
            await asyncio.wait([task for task, _ in links])
        if server is not None:
            await server.wait_closed()

    def _accepted(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        # Called as the connection is accepted (a plain function, not a coroutine, so
        # asyncio calls it at once): registered before stop() can miss it.
        if not self._serving:
            client_out.transport.abort()
            return
        writers = [client_out]
        task = asyncio.get_running_loop().create_task(self._link(client_in, writers))
        self._links[task] = writers
        task.add_done_callback(self._gone)

    def _gone(self, task: asyncio.Task[None]) -> None:
        for writer in self._links.pop(task, []):
            writer.transport.abort()
        if not task.cancelled():
            task.exception()  # retrieved: _link handles what it expects

    async def _link(
        self, client_in: asyncio.StreamReader, writers: list[asyncio.StreamWriter]
    ) -> None:
        try:
            target_in, target_out = await asyncio.wait_for(
                asyncio.open_connection(*self.target), CONNECT_SECONDS
            )
        except (OSError, TimeoutError):
            return  # the client sees its connection closed, as with a dead server
        writers.append(target_out)
        if not self._serving:  # stopped while connecting
            return
        for writer in writers:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Either side closing ends the link; _gone closes both sockets.
        pipes = [
            asyncio.ensure_future(_copy(client_in, target_out)),
            asyncio.ensure_future(_copy(target_in, writers[0])),
        ]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def _copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await source.read(CHUNK):
            sink.write(data)
            await sink.drain()
