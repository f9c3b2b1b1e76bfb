"""Clearance: human-in-the-loop approval gates for AI agents' sensitive tool calls."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clearance.app import BatchOutcome, Clearance, ExecutionHistory
    from clearance.core.commands import AuditRecord
    from clearance.core.errors import ClearanceError, DefinitionError, InvalidParameters, Refusal
    from clearance.core.execution import ApprovalRequest, Execution
    from clearance.core.reviewers import Grant, Identity, Reviewer
    from clearance.definition import (
        ApprovalBroker,
        ClearanceWarning,
        HumanInLoop,
        Model,
        Policy,
        Rule,
        Stage,
        Tool,
    )
    from clearance.ports.model import ModelReply, ModelRequest
    from clearance.ports.tools import ToolContext

_WHERE = {
    "ApprovalBroker": "clearance.definition",
    "ApprovalRequest": "clearance.core.execution",
    "AuditRecord": "clearance.core.commands",
    "BatchOutcome": "clearance.app",
    "Clearance": "clearance.app",
    "ClearanceError": "clearance.core.errors",
    "ClearanceWarning": "clearance.definition",
    "DefinitionError": "clearance.core.errors",
    "Execution": "clearance.core.execution",
    "ExecutionHistory": "clearance.app",
    "Grant": "clearance.core.reviewers",
    "HumanInLoop": "clearance.definition",
    "Identity": "clearance.core.reviewers",
    "InvalidParameters": "clearance.core.errors",
    "Model": "clearance.definition",
    "ModelReply": "clearance.ports.model",
    "ModelRequest": "clearance.ports.model",
    "Policy": "clearance.definition",
    "Refusal": "clearance.core.errors",
    "Reviewer": "clearance.core.reviewers",
    "Rule": "clearance.definition",
    "Stage": "clearance.definition",
    "Tool": "clearance.definition",
    "ToolContext": "clearance.ports.tools",
}


def __getattr__(name: str) -> Any:
    """The public names, each imported on first use (PEP 562): importing the package,
    or one small module of it (the CLI's parser), does not import the runtime."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # found directly from now on
    return value


__all__ = [
    "ApprovalBroker",
    "ApprovalRequest",
    "AuditRecord",
    "BatchOutcome",
    "Clearance",
    "ClearanceError",
    "ClearanceWarning",
    "DefinitionError",
    "Execution",
    "ExecutionHistory",
    "Grant",
    "HumanInLoop",
    "Identity",
    "InvalidParameters",
    "Model",
    "ModelReply",
    "ModelRequest",
    "Policy",
    "Refusal",
    "Reviewer",
    "Rule",
    "Stage",
    "Tool",
    "ToolContext",
]
