"""The HTTP API described as OpenAPI 3.1: what `GET /openapi.json` serves.

Hand-written, next to the routes it describes; tests check that it covers every
route and that every answer conforms to it (schemathesis).
"""

from __future__ import annotations

from typing import Any

from clearance.core.agent import TIMEOUT_ACTIONS
from clearance.core.execution import OUTCOMES, PENDING, REQUEST_STATUSES
from clearance.core.reviewers import BY_KINDS
from clearance.engine import SIGNALS
from clearance.http_bodies import DEFAULT_LIMIT, MAX_BATCH, MAX_BODY, MAX_LIMIT


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    described = {
        400: "The body is not valid UTF-8 JSON.",
        401: "The credential is missing.",
        403: "The credential is not valid; or (error.code) not_granted: the reviewer's"
        " grants do not cover the request, or a claimed name (a callback body) approves"
        " or rejects a request that needs a quorum; self_approval: the person who started"
        " the execution (requestedBy) approves its request.",
        404: "No such approval request, execution or route.",
        409: "Already decided (error.decision names the decision that stands), "
        "or the execution is in a state that takes no such signal; already_voted: this "
        "person already approved the request, which still needs others.",
        410: "The approval request expired or timed out; it can no longer be decided.",
        413: f"The body is larger than the limit ({MAX_BODY // 1024} KiB by default).",
        415: "The body is not Content-Type: application/json.",
        422: "The body or query is not valid; error.problems names each invalid "
        "modified parameter and why; extension_too_long: an extend's until is later than "
        "the tool lets a request stay open (max_approval_timeout); invalid_deadline: an "
        "extend's until is not a date and time with its offset, or not later than the "
        "request's deadline.",
        500: "The execution's stored log no longer reads back (error.code "
        "unreadable_execution names the row; trying again cannot help).",
        503: "The route's secret (webhook_secret or api_key) is not configured.",
    }
    return {str(s): _json(_ref("Error"), described[s]) for s in statuses}


_TEXT_OR_NULL = {"type": ["string", "null"]}
# Who or what decided a request (null while pending): one vocabulary with the audit log.
_OUTCOME = {"enum": [*OUTCOMES, None]}
# The request's callDigest as the decider saw it: the decision is refused (409
# stale_decision) if the request asks about another call.
_CALL_DIGEST = {"type": ["string", "null"], "description": "The request's callDigest."}
_OBJECT_OR_NULL = {"type": ["object", "null"]}
_BY = {
    "type": ["string", "null"],
    "description": (
        "Who decides; recorded in the audit log. On the signal route it comes from the"
        " credential: leave it out, or give the credential's own name."
    ),
}
_BY_KIND = {
    "enum": [*BY_KINDS, None],
    "description": (
        "How `by` is known: reviewer (a reviewer's key, the instance API key as 'admin',"
        " or a trusted header), app (the embedding code), claimed (unchecked: a callback"
        " or broker body, the CLI's --by)."
    ),
}


_TIME = {"type": "string", "format": "date-time"}
_VOTE = {
    "type": "object",
    "required": ["by", "byKind", "at", "groups", "onBehalfOf"],
    "description": "One person's approval counted towards the request's quorum.",
    "properties": {
        "by": {"type": "string"},
        "byKind": {"enum": list(BY_KINDS)},
        "at": _TIME,
        "groups": {
            "type": "array",
            "items": {"type": "string"},
            "description": "The voter's groups when they voted.",
        },
        "onBehalfOf": {
            **_TEXT_OR_NULL,
            "description": "The reviewer whose delegated grants the voter used.",
        },
    },
}
# A request's quorum and requester: present only where the request needs more than one
# approval or names groups (the first five), names who started the run (requestedBy), or
# is approved when nobody answers (timeoutAction).
_QUORUM: dict[str, Any] = {
    "approvalsRequired": {
        "type": "integer",
        "minimum": 1,
        "description": "Distinct people who must approve the same call.",
    },
    "groups": {
        "type": "array",
        "items": {"type": "string"},
        "description": "Reviewer groups of which one approver each must be.",
    },
    "votes": {"type": "array", "items": _VOTE, "description": "Approvals so far."},
    "stillNeeded": {
        "type": "object",
        "required": ["approvals", "groups"],
        "description": "While pending: approvals still needed, and the groups nobody who"
        " voted stands for yet.",
        "properties": {
            "approvals": {"type": "integer", "minimum": 0},
            "groups": {"type": "array", "items": {"type": "string"}},
        },
    },
    "requestedBy": {
        "type": "string",
        "description": "Who started the execution: they may not approve it.",
    },
    "timeoutAction": {
        "enum": list(TIMEOUT_ACTIONS),
        "description": "approve: an unanswered request is approved at its deadline.",
    },
}
# What a decision answer says of its request: decided, or still pending (a vote short of
# its quorum, or an extended deadline).
_DECISION = {"enum": ["approved", "rejected", PENDING]}


def _signal_variant(signal: str, fields: dict[str, Any], required: list[str]) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": fields,
    }
    if required:
        payload["required"] = required
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["signal", "payload"] if required else ["signal"],
        "properties": {"signal": {"const": signal}, "payload": payload},
    }


_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "problems": {"type": "array", "items": {"type": "string"}},
                    "decision": {
                        "type": "object",
                        "properties": {
                            "status": {"type": "string"},
                            "outcome": _OUTCOME,
                            "by": _TEXT_OR_NULL,
                            "byKind": _BY_KIND,
                            "at": _TEXT_OR_NULL,
                        },
                    },
                },
            }
        },
    },
    "CallbackBody": {
        "description": "The spec's callback body: approve, approve with modified "
        "parameters, or reject with a reason.",
        "oneOf": [
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["approved"],
                "properties": {
                    "approved": {"const": True},
                    "modifiedParams": _OBJECT_OR_NULL,
                    "by": _BY,
                    "callDigest": _CALL_DIGEST,
                },
            },
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["approved"],
                "properties": {
                    "approved": {"const": False},
                    "reason": _TEXT_OR_NULL,
                    "by": _BY,
                    "callDigest": _CALL_DIGEST,
                },
            },
        ],
    },
    "SignalBody": {
        "description": "The spec's signal: approve or reject one request, or stop the "
        "execution; or extend a pending request's deadline. An approval of a request that "
        "needs a quorum is a vote: the answer shows it still pending, with its votes.",
        "oneOf": [
            _signal_variant(
                "approve",
                {
                    "requestId": {"type": "string"},
                    "modifiedParams": _OBJECT_OR_NULL,
                    "by": _BY,
                    # A session grant: later calls of this tool in this execution (within
                    # rememberWhen, a CEL bound on args) run without a request.
                    "remember": {"enum": ["execution", None]},
                    "rememberWhen": _TEXT_OR_NULL,
                    "callDigest": _CALL_DIGEST,
                },
                ["requestId"],
            ),
            _signal_variant(
                "reject",
                {
                    "requestId": {"type": "string"},
                    "reason": _TEXT_OR_NULL,
                    "by": _BY,
                    "callDigest": _CALL_DIGEST,
                },
                ["requestId"],
            ),
            _signal_variant("stop", {"reason": _TEXT_OR_NULL, "by": _BY}, []),
            _signal_variant(
                "extend",
                {
                    "requestId": {"type": "string"},
                    "until": {
                        **_TIME,
                        "description": "The new deadline: a date, a time and its offset"
                        " (2026-12-05T18:00Z, 2026-12-05T19:00:00+01:00; seconds optional),"
                        " read as the CLI's --until and Python's until=; a time without an"
                        " offset or a date alone is 422 invalid_deadline. At most the"
                        " tool's max_approval_timeout after the request was made (else 422"
                        " extension_too_long; see the request's extendableUntil). Needs the"
                        " 'extend' grant.",
                    },
                    "by": _BY,
                },
                ["requestId", "until"],
            ),
        ],
    },
    "Decision": {
        "type": "object",
        "required": [
            "requestId",
            "executionId",
            "decision",
            "tool",
            "parameters",
            "executionStatus",
        ],
        "properties": {
            "requestId": {"type": "string"},
            "executionId": {"type": "string"},
            "decision": _DECISION,
            "outcome": _OUTCOME,
            "tool": {"type": "string"},
            "parameters": {
                "type": "object",
                "description": "What the tool runs with (modified parameters merged in).",
            },
            "modifiedParams": {"type": "object"},
            "reason": {"type": "string"},
            "by": {"type": "string"},
            "byKind": _BY_KIND,
            "decidedAt": {"type": "string", "format": "date-time"},
            "expiresAt": {**_TIME, "description": "While still pending: its deadline."},
            "callDigest": {
                **_TEXT_OR_NULL,
                "description": "While still pending: the call it now asks about.",
            },
            **_QUORUM,
            "executionStatus": {"type": "string"},
        },
    },
    "BatchBody": {
        "type": "object",
        "required": ["requestIds", "approved"],
        "additionalProperties": False,
        "properties": {
            "requestIds": {
                "type": "array",
                "items": {"type": "string"},
                "minItems": 1,
                "maxItems": MAX_BATCH,
                "uniqueItems": True,
            },
            "approved": {"type": "boolean"},
            "reason": {"type": ["string", "null"], "description": "With approved: false."},
        },
    },
    "BatchResult": {
        "type": "object",
        "required": ["results"],
        "properties": {
            "results": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["requestId", "ok"],
                    "properties": {
                        "requestId": {"type": "string"},
                        "ok": {"type": "boolean"},
                        "decision": _DECISION,
                        "by": {"type": "string"},
                        "byKind": _BY_KIND,
                        "executionStatus": {"type": "string"},
                        "error": {
                            "type": "object",
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        },
                    },
                },
            }
        },
    },
    "SignalResult": {
        "type": "object",
        "required": ["signal", "executionId", "executionStatus"],
        "properties": {
            "signal": {"enum": list(SIGNALS)},
            "executionId": {"type": "string"},
            "executionStatus": {"type": "string"},
            "requestId": {"type": "string"},
            "decision": _DECISION,
            "expiresAt": _TIME,
            **_QUORUM,
        },
    },
    "ApprovalRequest": {
        "type": "object",
        "required": [
            "requestId",
            "executionId",
            "agentTag",
            "tool",
            "parameters",
            "reason",
            "timestamp",
            "timeout",
            "status",
            "expiresAt",
        ],
        "properties": {
            "requestId": {"type": "string"},
            "executionId": {"type": "string"},
            "agentTag": {"type": "string"},
            "tool": {"type": "string"},
            "parameters": {"type": "object"},
            "reason": {"type": "string"},
            "timestamp": {"type": "string", "format": "date-time"},
            "timeout": {"type": "string", "format": "date-time"},
            "status": {"enum": list(REQUEST_STATUSES)},
            "expiresAt": {"type": "string", "format": "date-time"},
            "callbackUrl": {"type": "string"},
            "outcome": _OUTCOME,
            "decidedBy": _TEXT_OR_NULL,
            "decidedByKind": _BY_KIND,
            "decidedAt": _TEXT_OR_NULL,
            "modifiedParams": _OBJECT_OR_NULL,
            "rejectionReason": _TEXT_OR_NULL,
            "callDigest": _TEXT_OR_NULL,
            "extendableUntil": {
                **_TIME,
                "description": "While pending and where its tool allows extensions"
                " (max_approval_timeout): the latest deadline an extend signal may give it."
                " Absent where it cannot be extended (further).",
            },
            "policy": {
                "type": "object",
                "description": "The policy rule that asked for this request (absent otherwise).",
                "required": ["ruleId", "reason", "version"],
                "properties": {
                    "ruleId": {"type": "string"},
                    "reason": _TEXT_OR_NULL,
                    "version": {"type": "string"},
                },
            },
            **_QUORUM,
        },
    },
    "Execution": {
        "type": "object",
        "required": ["executionId", "agentTag", "status", "pendingApprovals", "events"],
        "properties": {
            "executionId": {"type": "string"},
            "agentTag": {"type": "string"},
            "status": {"type": "string"},
            "input": {"type": "string"},
            "sessionId": _TEXT_OR_NULL,
            "requestedBy": {
                **_TEXT_OR_NULL,
                "description": "Who started it (Clearance.run(requested_by=...)).",
            },
            "output": _TEXT_OR_NULL,
            "error": _TEXT_OR_NULL,
            "createdAt": _TEXT_OR_NULL,
            "updatedAt": _TEXT_OR_NULL,
            "usage": {
                "type": "object",
                "properties": {
                    "inputTokens": {"type": "integer"},
                    "outputTokens": {"type": "integer"},
                },
            },
            "pendingApprovals": {"type": "array", "items": _ref("ApprovalRequest")},
            "approvals": {"type": "array", "items": _ref("ApprovalRequest")},
            "events": {
                "type": "array",
                "items": {"type": "object", "required": ["type"]},
                "description": "Every event of the execution, oldest first: `type` names "
                "it (started, model_replied, approved, ...); other fields camelCase, times "
                "in ISO-8601 UTC to the millisecond; model content and tool output as they "
                "were.",
            },
        },
    },
}

_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


def openapi_document(root_path: str = "") -> dict[str, Any]:
    """The API as OpenAPI 3.1: what /openapi.json serves."""
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Clearance",
            "version": "1",
            "description": "Human approval gates for AI agents' tool calls: decide approval "
            "requests by callback URL or signal, and read pending requests and executions.",
        },
        "paths": {
            "/approvals/{requestId}/respond": {
                "post": {
                    "operationId": "respond",
                    "summary": "Decide one approval request (the webhook's callbackUrl).",
                    "description": "The token from the callbackUrl is the credential; no API "
                    "key. Exactly one decision per request ever wins. A request that needs "
                    "a quorum (approvalsRequired over 1, or groups) is not decided here: "
                    "the body's `by` is unchecked, so it cannot count (403 not_granted); "
                    "use the signal route with a reviewer's key, or the inbox.",
                    "parameters": [
                        _path_param("requestId"),
                        {
                            "name": "token",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string"},
                            "description": "From the callbackUrl, as sent.",
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("CallbackBody")}},
                    },
                    "responses": {
                        "200": _json(_ref("Decision"), "Decided."),
                        **_errors(400, 401, 403, 404, 409, 410, 413, 415, 422, 500, 503),
                    },
                }
            },
            "/executions/{executionId}/signal": {
                "post": {
                    "operationId": "signal",
                    "summary": "Approve, reject or extend a request of an execution, or stop it.",
                    "security": _BEARER,
                    "parameters": [_path_param("executionId")],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("SignalBody")}},
                    },
                    "responses": {
                        "200": _json(_ref("SignalResult"), "Signalled."),
                        **_errors(400, 401, 403, 404, 409, 410, 413, 415, 422, 500, 503),
                    },
                }
            },
            "/approvals/batch": {
                "post": {
                    "operationId": "decideBatch",
                    "summary": "Approve or reject several requests with one reason.",
                    "description": "Each request is decided on its own: a refusal of one "
                    "(not granted, already decided, expired, unknown) leaves the others "
                    "decided. The answer lists every outcome in the order asked. `by` is "
                    "the credential's reviewer.",
                    "security": _BEARER,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("BatchBody")}},
                    },
                    "responses": {
                        "200": _json(_ref("BatchResult"), "Every outcome, in order."),
                        **_errors(400, 401, 403, 413, 415, 422, 500, 503),
                    },
                }
            },
            "/approvals": {
                "get": {
                    "operationId": "listApprovals",
                    "summary": "Pending approval requests, oldest first.",
                    "security": _BEARER,
                    "parameters": [
                        {
                            "name": "status",
                            "in": "query",
                            "schema": {"enum": [PENDING], "default": PENDING},
                            "description": "Only pending is supported.",
                        },
                        {"name": "agentTag", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": MAX_LIMIT,
                                "default": DEFAULT_LIMIT,
                            },
                        },
                        {
                            "name": "after",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "The next page: the `next` of the page before.",
                        },
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["approvals", "next"],
                                "properties": {
                                    "approvals": {
                                        "type": "array",
                                        "items": _ref("ApprovalRequest"),
                                    },
                                    "next": {
                                        "type": ["string", "null"],
                                        "description": "after= for the next page; null on "
                                        "the last one",
                                    },
                                },
                            },
                            "Pending requests.",
                        ),
                        **_errors(401, 403, 422, 503),
                    },
                }
            },
            "/executions/{executionId}": {
                "get": {
                    "operationId": "getExecution",
                    "summary": "An execution: status, output, approvals, usage and events.",
                    "security": _BEARER,
                    "parameters": [_path_param("executionId")],
                    "responses": {
                        "200": _json(_ref("Execution"), "The execution."),
                        **_errors(401, 403, 404, 500, 503),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")},
                }
            },
        },
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The instance's api_key ($CLEARANCE_API_KEY).",
                }
            },
        },
    }
    if root_path:
        doc["servers"] = [{"url": root_path}]
    return doc
