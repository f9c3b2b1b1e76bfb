"""A store per customer: `tenant://NAME` is the SQLite file `NAME.db` in the directory
the environment variable CLEARANCE_TENANTS names (default `./tenants`).

One database per tenant keeps customers' approvals, audit records and keys apart, and
lets one tenant be backed up, moved or deleted alone. All the storing is Clearance's
own SQLite store; this plugin only decides where the file is.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from clearance.adapters.sqlite_store import SQLiteStore

# The name becomes a file name: no separators, dots or upper case (which would make
# `Acme` and `acme` two tenants on one filesystem and one on another).
TENANT = re.compile(r"[a-z0-9-]{1,40}")


def open_url(url: str, *, synchronous: str = "FULL") -> SQLiteStore:
    """The `clearance.stores` entry for `tenant://NAME` URLs."""
    name = url.removeprefix("tenant://")
    if name == url or not TENANT.fullmatch(name):
        raise ValueError(
            f"not a tenant store URL: {url!r}; accepted: tenant://NAME, NAME being 1-40"
            " lowercase letters, digits or '-' (e.g. tenant://acme)"
        )
    root = Path(os.environ.get("CLEARANCE_TENANTS", "tenants"))
    root.mkdir(parents=True, exist_ok=True)
    # As clearance's own sqlite:// opener does: the runtime's durability choice goes
    # through to SQLite's PRAGMA synchronous.
    return SQLiteStore(str(root / f"{name}.db"), synchronous=synchronous)
