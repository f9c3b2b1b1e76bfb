"""Clearance's core: pure, deterministic types, policy and the state machine.

Imports no I/O library, reads no clock and makes no ids: see DESIGN.md.
"""

from clearance.core.agent import AgentSpec, ToolSpec
from clearance.core.commands import AuditRecord, Command
from clearance.core.decide import decide
from clearance.core.errors import ClearanceError, DefinitionError, InvalidParameters, Refusal
from clearance.core.events import Event
from clearance.core.execution import ApprovalRequest, Execution, ToolCall, ToolResult, Usage

__all__ = [
    "AgentSpec",
    "ApprovalRequest",
    "AuditRecord",
    "ClearanceError",
    "Command",
    "DefinitionError",
    "Event",
    "Execution",
    "InvalidParameters",
    "Refusal",
    "ToolCall",
    "ToolResult",
    "ToolSpec",
    "Usage",
    "decide",
]
