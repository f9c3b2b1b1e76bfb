"""The errors Clearance raises. Every message says what was wrong and what to do instead."""

from __future__ import annotations


class ClearanceError(Exception):
    """Anything Clearance refuses to do. Nothing was changed when this is raised."""


class Refusal(ClearanceError):
    """An event that does not fit the execution's state.

    `decide()` raises it instead of changing anything: a second decision, a
    decision for an unknown or stale request, an approval after timeout, a
    reply to a model call nobody is waiting for. `code` is stable and
    machine-readable; the message is for people.
    """

    # Codes: wrong_state, unknown_request, already_decided, expired, not_due,
    # invalid_parameters, stale_model_reply, stale_tool_result, invalid_reply,
    # invalid_event; and from the runtime: unknown_execution, unknown_signal,
    # missing_request_id.
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class InvalidParameters(Refusal):
    """Tool parameters that fail the tool's schema. `problems` names each field and why."""

    def __init__(self, tool: str, problems: list[str]) -> None:
        super().__init__(
            "invalid_parameters", f"invalid parameters for tool '{tool}': " + "; ".join(problems)
        )
        self.tool = tool
        self.problems = problems


class DefinitionError(ClearanceError):
    """An agent or tool definition that cannot work as written."""
