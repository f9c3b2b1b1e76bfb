"""HTTP error answers: `ApiError`, and the one map from refusal codes to status codes.

Every error answer is `{"error": {"code", "message", **extra}}` with a status;
every route maps a `Refusal` through `REFUSAL_STATUS`, so a code means the same
status everywhere.
"""

from __future__ import annotations

from typing import Any, NoReturn

from clearance.core.errors import RefusalCode

# Refusal code -> HTTP status: every RefusalCode has one (a test holds it to that).
REFUSAL_STATUS: dict[RefusalCode, int] = {
    # the request or execution does not exist
    RefusalCode.UNKNOWN_REQUEST: 404,
    RefusalCode.UNKNOWN_EXECUTION: 404,
    # the request is past its deadline (or timed out): it can no longer be decided
    RefusalCode.EXPIRED: 410,
    # the body parsed but asks for something invalid
    RefusalCode.INVALID_PARAMETERS: 422,
    RefusalCode.MISSING_REQUEST_ID: 422,
    RefusalCode.UNKNOWN_SIGNAL: 422,
    # an edit that lands where a policy rule denies: the request stays pending
    RefusalCode.DENIED_BY_POLICY: 422,
    RefusalCode.INVALID_REMEMBER: 422,
    # a deadline later than the tool lets a request stay open
    RefusalCode.EXTENSION_TOO_LONG: 422,
    RefusalCode.INVALID_DEADLINE: 422,
    # it does not fit the execution's state now
    RefusalCode.ALREADY_DECIDED: 409,
    RefusalCode.WRONG_STATE: 409,
    RefusalCode.NOT_DUE: 409,
    RefusalCode.STALE_MODEL_REPLY: 409,
    RefusalCode.STALE_TOOL_RESULT: 409,
    RefusalCode.INVALID_REPLY: 409,
    RefusalCode.INVALID_EVENT: 409,
    # a decision made for another call than the request's (its digest differs)
    RefusalCode.STALE_DECISION: 409,
    # an edit a rule's Python predicate must judge, sent where the agent is not hosted
    RefusalCode.HOST_REQUIRED: 409,
    # a second approval of the same call by one person
    RefusalCode.ALREADY_VOTED: 409,
    # a reviewer whose grants do not cover the request's agent and tool
    RefusalCode.NOT_GRANTED: 403,
    # the person who started the execution approving its request
    RefusalCode.SELF_APPROVAL: 403,
}


class ApiError(Exception):
    """An HTTP error answer: `{"error": {"code", "message", **extra}}` with `status`."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra
        self.headers: dict[str, str] = {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


def fail(status: int, code: str, message: str, **extra: Any) -> NoReturn:
    raise ApiError(status, code, message, **extra)
