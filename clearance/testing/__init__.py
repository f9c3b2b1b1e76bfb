"""Test doubles for the edges: a scripted model, a clock you move by hand, readable ids,
and a message broker in memory (`memory://NAME`)."""

from clearance.adapters.clock import FakeClock
from clearance.adapters.ids import SequentialIds
from clearance.adapters.scripted_model import ScriptedModel, text, tool_use
from clearance.testing.memory_broker import MemoryBroker

__all__ = ["FakeClock", "MemoryBroker", "ScriptedModel", "SequentialIds", "text", "tool_use"]
