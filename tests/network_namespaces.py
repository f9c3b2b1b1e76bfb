"""Hosts on networks of their own: a network namespace per host (`ip netns`), joined
to this one by a veth pair, reaching the machine's PostgreSQL at an address of its
own link.

The server listens on 127.0.0.1 only, and its configuration is the machine's, not
ours to change; so on this side of each link a TCP relay listens on the link's
address and passes the bytes on to 127.0.0.1:5432. Seen from a host, the database
is at 10.x.y.1, across a network interface: what it says, a SIGKILL of the host,
and a connection that dies with it cross a link, not loopback.

Needs root (CAP_NET_ADMIN) and iproute2; without them the tests that use it skip.
A run killed before its cleanup leaves namespaces named clrt*; deleting one
deletes its link: `ip netns list | grep -o '^clrt[0-9a-f]*' | xargs -rn1 ip netns delete`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import shutil
import subprocess
from urllib.parse import urlsplit, urlunsplit

PREFIX = "clrt"  # names of our namespaces and links, for cleaning up after a killed run


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@functools.cache
def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "ip(8) (iproute2) is not installed"
    name = f"{PREFIX}probe{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or err
        return f"cannot make a network namespace (ip netns add): {str(detail).strip()}"
    with contextlib.suppress(Exception):
        _ip("netns", "delete", name)
    return None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


class Networks:
    """Namespaces made for one test; `close()` removes them and their relays."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.target = target
        self._names: list[str] = []
        self._relays: list[asyncio.Server] = []
        self._ends: set[asyncio.StreamWriter] = set()
        self._tag = secrets.token_hex(2)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._ends |= {writer, upstream_w}
        try:
            await asyncio.gather(_pipe(reader, upstream_w), _pipe(upstream_r, writer))
        finally:
            self._ends -= {writer, upstream_w}

    async def host(self, url: str) -> tuple[list[str], str, str]:
        """A new namespace: the command prefix that runs a program in it, `url` (a
        PostgreSQL URL on 127.0.0.1) as seen from there, and its network interface."""
        n = len(self._names)
        name = f"{PREFIX}{self._tag}{n}"
        self._names.append(name)
        outside, inside = f"{name}a", f"{name}b"
        # A /30 of 10.128.0.0/9 picked at random: test runs side by side do not collide.
        net = secrets.randbelow(1 << 21) << 2
        ours = f"10.{128 + (net >> 16 & 127)}.{net >> 8 & 255}.{(net & 255) + 1}"
        theirs = ours.rsplit(".", 1)[0] + f".{(net & 255) + 2}"
        _ip("netns", "add", name)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", name)
        _ip("addr", "add", f"{ours}/30", "dev", outside)
        _ip("link", "set", outside, "up")
        _ip("-n", name, "addr", "add", f"{theirs}/30", "dev", inside)
        _ip("-n", name, "link", "set", inside, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        self._relays.append(await asyncio.start_server(self._relay, ours, self.target[1]))
        parts = urlsplit(url)
        netloc = f"{parts.username}@" if parts.username else ""
        seen = urlunsplit(parts._replace(netloc=f"{netloc}{ours}:{self.target[1]}"))
        return ["ip", "netns", "exec", name], seen, inside

    async def close(self) -> None:
        for relay in self._relays:
            relay.close()
        for end in list(self._ends):
            end.close()
        for name in self._names:
            with contextlib.suppress(Exception):
                _ip("link", "delete", f"{name}a")  # its peer goes with it
            with contextlib.suppress(Exception):
                _ip("netns", "delete", name)
