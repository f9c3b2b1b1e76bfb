"""Clearance: human-in-the-loop approval gates for AI agents' sensitive tool calls."""

from clearance.app import Clearance, ExecutionHistory
from clearance.core.commands import AuditRecord
from clearance.core.errors import ClearanceError, DefinitionError, InvalidParameters, Refusal
from clearance.core.execution import ApprovalRequest, Execution
from clearance.definition import ClearanceWarning, HumanInLoop, Model, Tool
from clearance.ports.model import ModelReply, ModelRequest
from clearance.ports.tools import ToolContext

__all__ = [
    "ApprovalRequest",
    "AuditRecord",
    "Clearance",
    "ClearanceError",
    "ClearanceWarning",
    "DefinitionError",
    "Execution",
    "ExecutionHistory",
    "HumanInLoop",
    "InvalidParameters",
    "Model",
    "ModelReply",
    "ModelRequest",
    "Refusal",
    "Tool",
    "ToolContext",
]
