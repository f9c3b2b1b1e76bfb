"""Clearance's contract suites, run on this plugin's store and broker: each adapter
passes every test Clearance's own adapters pass."""

from __future__ import annotations

from pathlib import Path

import outside
import pytest
from clearance_example_plugin import spool_broker, tenant_store

from clearance.ports.broker import Broker, Signer
from clearance.ports.store import Store
from clearance.testing.contract import BrokerContract, StoreContract


class TestTenantStore(StoreContract):
    def make_store(self, path: Path) -> Store:
        # `path` is the test's fresh tmp_path: the tenants' directory for this test.
        with pytest.MonkeyPatch.context() as env:
            env.setenv("CLEARANCE_TENANTS", str(path))
            return tenant_store.open_url("tenant://acme")


class TestSpoolBroker(BrokerContract):
    redeliver_after = 0.3  # seconds, as the URL below sets it

    def make_broker(self, path: Path, name: str, sign: Signer | None) -> Broker:
        return spool_broker.open_url(name, f"spool://{path}/spool?redeliver_after=0.3", sign=sign)

    async def published(
        self, path: Path, name: str, subject: str
    ) -> list[tuple[bytes, dict[str, str]]]:
        return outside.read(path / "spool", subject)

    def unreachable(self, path: Path, name: str, sign: Signer | None) -> Broker:
        # A spool that can never be made: its parent is a file.
        (path / "a-file").write_text("")
        return spool_broker.open_url(name, f"spool://{path}/a-file/spool", sign=sign)
