"""Who holds an outbox claim, and whether that process is still alive.

A claim names its worker as `host:pid:nonce`. On the same host a dead pid (or
our own pid with a nonce no open worker here has: a closed instance, or an
earlier process that had our pid) means the claim is orphaned. A worker on
another host is presumed alive: a claim it holds is never taken over, which
can delay but never duplicates a tool run.
"""

from __future__ import annotations

import os
import secrets
import socket

# Workers of this process that are still open: two Clearance objects in one
# process share a pid, and neither may take the other's claims.
_open_here: set[str] = set()


def new_worker_id() -> str:
    worker = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    _open_here.add(worker)
    return worker


def retire(worker: str) -> None:
    _open_here.discard(worker)


def is_orphaned(claimed_by: str, me: str) -> bool:
    host, pid, _ = [*claimed_by.rsplit(":", 2), "", ""][:3]
    my_host, my_pid, _ = me.rsplit(":", 2)
    if host != my_host or not pid.isdigit():
        return False
    if pid == my_pid:
        return claimed_by not in _open_here
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
