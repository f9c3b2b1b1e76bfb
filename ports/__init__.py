"""The interfaces the engine talks to. Adapters implement them; the core knows none of them."""

from clearance.ports.clock import Clock
from clearance.ports.ids import IdSource
from clearance.ports.model import ModelPort, ModelReply, ModelRequest
from clearance.ports.store import Conflict, DueTimer, OutboxEntry, Store
from clearance.ports.tools import Handler, ToolContext

__all__ = [
    "Clock",
    "Conflict",
    "DueTimer",
    "Handler",
    "IdSource",
    "ModelPort",
    "ModelReply",
    "ModelRequest",
    "OutboxEntry",
    "Store",
    "ToolContext",
]
