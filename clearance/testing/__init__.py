"""Test doubles for the edges: a scripted model, a clock you move by hand, readable ids."""

from clearance.adapters.clock import FakeClock
from clearance.adapters.ids import SequentialIds
from clearance.adapters.scripted_model import ScriptedModel, text, tool_use

__all__ = ["FakeClock", "ScriptedModel", "SequentialIds", "text", "tool_use"]
