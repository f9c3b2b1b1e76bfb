"""The contract suites an adapter plugin runs to show it keeps Clearance's promises:
`StoreContract` for a store (`clearance.stores` entry point), `BrokerContract` for a
broker (`clearance.channels`). Subclass one in your tests and give it your adapter;
see each module's docstring for the hooks. Needs pytest and pytest-asyncio."""

from clearance.testing.contract.broker import BrokerContract
from clearance.testing.contract.store import StoreContract

__all__ = ["BrokerContract", "StoreContract"]
