"""Who holds an outbox claim, and whether that process is still alive.

A claim names its worker as `host:pid:nonce`. On the same host a dead pid (or
our own pid with another nonce: a previous incarnation) means the claim is
orphaned. A worker on another host is presumed alive: a claim it holds is
never taken over, which can delay but never duplicates a tool run.
"""

from __future__ import annotations

import os
import secrets
import socket


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def is_orphaned(claimed_by: str, me: str) -> bool:
    host, pid, _ = [*claimed_by.rsplit(":", 2), "", ""][:3]
    my_host, my_pid, _ = me.rsplit(":", 2)
    if host != my_host or not pid.isdigit():
        return False
    if pid == my_pid:
        return claimed_by != me
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
