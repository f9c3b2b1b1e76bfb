"""The interfaces the engine talks to. Adapters implement them; the core knows none of them."""

from clearance.ports.clock import Clock
from clearance.ports.ids import IdSource
from clearance.ports.model import ModelPort, ModelReply, ModelRequest
from clearance.ports.store import Claim, Conflict, DueTimer, LeaseLost, Store, Work
from clearance.ports.tools import Handler, ToolContext

__all__ = [
    "Claim",
    "Clock",
    "Conflict",
    "DueTimer",
    "Handler",
    "IdSource",
    "LeaseLost",
    "ModelPort",
    "ModelReply",
    "ModelRequest",
    "Store",
    "ToolContext",
    "Work",
]
