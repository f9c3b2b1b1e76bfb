"""A prune that SIGKILLs itself just before its K-th SQL statement (tests/test_prune.py).

    python prune_process.py DB K

Opens the SQLite file DB through the public API, then prunes what finished more
than a day ago a few executions per transaction (`page=PAGE`), counting the
statements the store runs in those transactions (`Store.forget`, BEGIN to
COMMIT). Before statement K it kills itself with SIGKILL (no rollback, no
cleanup): K=1 is the first transaction's BEGIN, the statement before a COMMIT
is the last of its deletions, and the statement after it is the next BEGIN. The
moment is chosen by K, not by a timer, so each trial repeats. stdout: `pruned N`
if it got to the end first; with K=0 it is not killed, and says `commits C1 C2 ...`
too: the number of each COMMIT statement.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from typing import Any

from clearance import Clearance

PAGE = 7  # executions per transaction: a prune of a few dozen takes several


class KillAt:
    """The store's connection, counting statements while `counting`, dying just before
    the K-th (never, with K=0)."""

    def __init__(self, db: sqlite3.Connection, k: int) -> None:
        self._db, self._k = db, k
        self.counting = False
        self.seen = 0
        self.commits: list[int] = []

    def _count(self) -> None:
        if not self.counting:
            return
        self.seen += 1
        if self.seen == self._k:
            os.kill(os.getpid(), signal.SIGKILL)

    def execute(self, *args: Any) -> sqlite3.Cursor:
        self._count()
        if self.counting and args[0] == "COMMIT":
            self.commits.append(self.seen)
        return self._db.execute(*args)

    def executemany(self, *args: Any) -> sqlite3.Cursor:
        self._count()
        return self._db.executemany(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


async def main(path: str, k: int) -> None:
    async with Clearance.open(f"sqlite:///{path}") as app:
        store: Any = app.store
        store._db = db = KillAt(store._db, k)
        forget = store.forget

        async def counted(*args: Any, **kwargs: Any) -> Any:
            db.counting = True
            try:
                return await forget(*args, **kwargs)
            finally:
                db.counting = False

        store.forget = counted
        done = await app.prune("1d", page=PAGE)
        print("pruned", done.executions, flush=True)
        if not k:
            print("commits", *db.commits, flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
