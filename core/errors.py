"""The errors Clearance raises. Every message says what was wrong and what to do instead."""

from __future__ import annotations

from enum import StrEnum


class ClearanceError(Exception):
    """Anything Clearance refuses to do. Nothing was changed when this is raised."""


class RefusalCode(StrEnum):
    """Why an event or a signal was refused: stable, machine-readable, one per cause.

    A member is a `str` and compares equal to its value (`code == "expired"`), so it
    serialises and matches as the plain text it always was.
    """

    # From decide(): the event does not fit the execution.
    WRONG_STATE = "wrong_state"  # the execution's status takes no such event now
    UNKNOWN_REQUEST = "unknown_request"  # no approval request by that id in the execution
    ALREADY_DECIDED = "already_decided"  # the request has its one decision; it stands
    EXPIRED = "expired"  # a decision after the request's deadline
    NOT_DUE = "not_due"  # a timer fired before the request's deadline
    INVALID_PARAMETERS = "invalid_parameters"  # modified parameters the tool does not take
    STALE_MODEL_REPLY = "stale_model_reply"  # a reply to a model call nobody waits for
    STALE_TOOL_RESULT = "stale_tool_result"  # a result for a tool call that is not executing
    INVALID_REPLY = "invalid_reply"  # a model reply that cannot be used (malformed content)
    INVALID_EVENT = "invalid_event"  # an event whose fields are not what they must be
    DENIED_BY_POLICY = "denied_by_policy"  # modified parameters a deny rule covers
    INVALID_REMEMBER = "invalid_remember"  # a session grant that cannot be given as asked
    STALE_DECISION = "stale_decision"  # made for another call digest than the request's
    SELF_APPROVAL = "self_approval"  # the person who started the execution approving it
    ALREADY_VOTED = "already_voted"  # a second approval of one call by the same person
    EXTENSION_TOO_LONG = "extension_too_long"  # a deadline past the tool's longest one
    INVALID_DEADLINE = "invalid_deadline"  # an extension to no time, or not a later one
    # From the runtime, before decide() sees anything.
    UNKNOWN_EXECUTION = "unknown_execution"
    UNKNOWN_SIGNAL = "unknown_signal"
    MISSING_REQUEST_ID = "missing_request_id"
    NOT_GRANTED = "not_granted"  # a reviewer acting on an agent's tool no grant covers
    # An edit a rule's Python predicate must judge, made where the agent is not hosted.
    HOST_REQUIRED = "host_required"


class Refusal(ClearanceError):
    """An event that does not fit the execution's state.

    `decide()` raises it instead of changing anything: a second decision, a
    decision for an unknown or stale request, an approval after timeout, a
    reply to a model call nobody is waiting for. `code` is a `RefusalCode`
    (given as the member or its string value); the message is for people.
    """

    code: RefusalCode

    def __init__(self, code: RefusalCode | str, message: str) -> None:
        # The message goes out as JSON and to terminals: whatever an event held, it is
        # valid UTF-8 text (a lone surrogate quoted from the event is spelled as an escape).
        try:
            message.encode("utf-8")
        except UnicodeEncodeError:
            message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        try:
            self.code = RefusalCode(code)
        except ValueError:
            known = ", ".join(RefusalCode)
            raise ValueError(
                f"unknown refusal code {code!r}; add it to RefusalCode (known: {known})"
            ) from None


class InvalidParameters(Refusal):
    """Tool parameters that fail the tool's schema. `problems` names each field and why."""

    def __init__(self, tool: str, problems: list[str]) -> None:
        super().__init__(
            RefusalCode.INVALID_PARAMETERS,
            f"invalid parameters for tool '{tool}': " + "; ".join(problems),
        )
        self.tool = tool
        self.problems = problems


class DefinitionError(ClearanceError):
    """An agent or tool definition that cannot work as written."""
