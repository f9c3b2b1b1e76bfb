"""The HTTP API over real HTTP: callbacks, signals, reads, OpenAPI, and `clearance serve`.

Servers run under uvicorn in the test's own event loop (the Clearance instance
and its SQLite file live in that loop), clients are httpx. Every error answer
is checked to have changed nothing: execution versions and event counts, the
audit log, the pending list and the tool handler's calls.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import httpx
import jsonschema
import pytest
import schemathesis
import uvicorn
from conftest import REFUND, Recorder, as_if_restarted, define_refund_agent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode

from clearance import ApprovalRequest, Clearance
from clearance.app import open_store
from clearance.callback import token_for
from clearance.core.execution import iso
from clearance.http_api import MAX_BODY, build_asgi, openapi_document
from clearance.testing import FakeClock, ScriptedModel, SequentialIds, text, tool_use

SECRET = "whsec_" + base64.b64encode(b"clearance http api test secret!").decode()
API_KEY = "ck_test_0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}

Snapshot = tuple[Any, ...]


@asynccontextmanager
async def served(asgi: Any) -> AsyncIterator[str]:
    """A real uvicorn server for `asgi` in this event loop; yields its base URL.

    Started and stopped by hand rather than by `serve()`, whose shutdown waits out
    fixed ticks (a fifth of a second per test)."""
    config = uvicorn.Config(asgi, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup()
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for listener in server.servers:
            listener.close()
        for connection in list(server.server_state.connections):
            connection.shutdown()
        for listener in server.servers:
            await listener.wait_closed()


@attrs.define
class Api:
    app: Clearance
    base: str
    client: httpx.AsyncClient
    recorder: Recorder
    clock: FakeClock
    executions: list[str] = attrs.Factory(list)

    async def start(self) -> ApprovalRequest:
        ex = await self.app.run("safe-agent", input="Refund order ORD-123")
        self.executions.append(ex.id)
        [request] = ex.pending_approvals
        return request

    def url(self, request: ApprovalRequest) -> str:
        return self.app.callback_url(request)

    async def respond(
        self, request: ApprovalRequest, body: Any = None, **kwargs: Any
    ) -> httpx.Response:
        if body is not None:
            kwargs["json"] = body
        return await self.client.post(self.url(request), **kwargs)

    async def snapshot(self) -> Snapshot:
        executions = []
        for execution_id in self.executions:
            ex = await self.app.store.load(execution_id)
            assert ex is not None
            executions.append((ex.id, ex.seq, ex.status))  # seq counts the events applied
        audit = [(r.request_id, r.decision, r.by) for r in await self.app.audit()]
        pending = [r.request_id for r in await self.app.pending()]
        return (tuple(executions), tuple(audit), tuple(pending), len(self.recorder.calls))


@asynccontextmanager
async def hosted(
    tmp_path: Path, clock: FakeClock | None = None, **options: Any
) -> AsyncIterator[Api]:
    clock = clock or FakeClock()
    recorder = Recorder()
    async with Clearance.open(
        f"sqlite:///{tmp_path / 'approvals.db'}", clock=clock, ids=SequentialIds(), **options
    ) as app:
        define_refund_agent(app, recorder)
        async with served(build_asgi(app)) as base, httpx.AsyncClient(base_url=base) as client:
            app.public_url = base  # known once the server has its port
            yield Api(app, base, client, recorder, clock)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with hosted(tmp_path, webhook_secret=SECRET, api_key=API_KEY) as instance:
        yield instance


def conforms(data: Any, component: str) -> Any:
    """`data` is valid for the OpenAPI document's `component` schema."""
    schema = {"$ref": f"#/components/schemas/{component}", **openapi_document()}
    jsonschema.Draft202012Validator(schema).validate(data)
    return data


def error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = conforms(response.json(), "Error")
    assert body["error"]["code"] == code, body
    message = str(body["error"]["message"])
    assert message
    return message


# -- the callback: approve, modify, reject ----------------------------------------------------


async def test_callback_approve_runs_the_tool_once_and_finishes(api: Api) -> None:
    request = await api.start()
    assert api.url(request).startswith(f"{api.base}/approvals/{request.request_id}/respond?token=")
    response = await api.respond(request, {"approved": True, "by": "ops-lead"})
    assert response.status_code == 200, response.text
    assert conforms(response.json(), "Decision") == {
        "requestId": request.request_id,
        "executionId": request.execution_id,
        "decision": "approved",
        "outcome": "approved",
        "tool": "process-refund",
        "parameters": REFUND,
        "by": "ops-lead",
        "byKind": "claimed",  # a callback body's word: the token is not a person
        "decidedAt": "2024-01-15T10:30:00Z",
        "executionStatus": "completed",
    }
    assert api.recorder.ran("process-refund") == [REFUND]
    ex = (await api.app.get_execution(request.execution_id)).execution
    assert (ex.status, ex.output) == ("completed", "Done.")
    [record] = await api.app.audit()
    assert (record.decision, record.by, record.modified_params) == ("approved", "ops-lead", None)


async def test_callback_modify_runs_with_the_merged_parameters(api: Api) -> None:
    request = await api.start()
    response = await api.respond(
        request, {"approved": True, "modifiedParams": {"amount": 25}, "by": "ops"}
    )
    assert response.status_code == 200, response.text
    body = conforms(response.json(), "Decision")
    assert body["modifiedParams"] == {"amount": 25}
    assert body["parameters"] == {**REFUND, "amount": 25}
    assert body["executionStatus"] == "completed"
    assert api.recorder.ran("process-refund") == [{**REFUND, "amount": 25}]
    [record] = await api.app.audit()
    assert (record.parameters, record.modified_params, record.by) == (REFUND, {"amount": 25}, "ops")


async def test_callback_reject_tells_the_model_and_never_runs_the_tool(api: Api) -> None:
    request = await api.start()
    response = await api.respond(request, {"approved": False, "reason": "Too expensive"})
    assert response.status_code == 200, response.text
    body = conforms(response.json(), "Decision")
    assert (body["decision"], body["reason"], body["executionStatus"]) == (
        "rejected",
        "Too expensive",
        "completed",
    )
    assert "by" not in body and "modifiedParams" not in body
    assert api.recorder.calls == []
    [record] = await api.app.audit()
    assert (record.decision, record.reason, record.by) == ("rejected", "Too expensive", None)


async def test_empty_modified_params_is_a_plain_approval(api: Api) -> None:
    request = await api.start()
    response = await api.respond(request, {"approved": True, "modifiedParams": {}, "reason": None})
    assert response.status_code == 200, response.text
    assert "modifiedParams" not in response.json()
    assert api.recorder.ran("process-refund") == [REFUND]


# -- errors: each one changes nothing ----------------------------------------------------------


def _token_parts(api: Api, request: ApprovalRequest) -> tuple[str, str, str]:
    """(purpose, digest, mac) of the request's callback token."""
    version, purpose, digest, mac = token_for(SECRET, request).split(".")
    assert version == "v2"
    return purpose, digest, mac


def first_form_token(request: ApprovalRequest) -> str:
    """A token as callback URLs of earlier releases carry: `{expiry}.{mac}`."""
    from clearance.callback import _mac

    expires = int(request.timeout.timestamp())
    return f"{expires}.{_mac(SECRET, request.request_id, expires)}"


async def _post_token(api: Api, request_id: str, token: str | None) -> httpx.Response:
    query = {} if token is None else {"token": token}
    return await api.client.post(
        f"/approvals/{request_id}/respond", params=query, json={"approved": True}
    )


async def _chunks(total: int) -> AsyncIterator[bytes]:
    yield b'{"approved": true, "by": "'
    for _ in range(total // 4096 + 1):
        yield b"x" * 4096
    yield b'"}'


Case = Callable[[Api, ApprovalRequest], Awaitable[httpx.Response]]


async def _other_requests_token(api: Api, request: ApprovalRequest) -> httpx.Response:
    other = next(r for r in await api.app.pending() if r.request_id != request.request_id)
    return await _post_token(api, request.request_id, token_for(SECRET, other))


async def _expired(api: Api, request: ApprovalRequest) -> httpx.Response:
    api.clock.advance(minutes=5)
    return await api.respond(request, {"approved": True})


def _unknown_request(api: Api, request: ApprovalRequest) -> Awaitable[httpx.Response]:
    ghost = attrs.evolve(request, request_id="apr-ghost")
    return _post_token(api, "apr-ghost", token_for(SECRET, ghost))


def _altered_digest(api: Api, request: ApprovalRequest) -> Awaitable[httpx.Response]:
    purpose, digest, mac = _token_parts(api, request)
    other = ("0" if digest[0] != "0" else "1") + digest[1:]
    return _post_token(api, request.request_id, f"v2.{purpose}.{other}.{mac}")


def _altered_purpose(api: Api, request: ApprovalRequest) -> Awaitable[httpx.Response]:
    _, digest, mac = _token_parts(api, request)
    return _post_token(api, request.request_id, f"v2.reminder.{digest}.{mac}")


def _forged(api: Api, request: ApprovalRequest) -> Awaitable[httpx.Response]:
    purpose, digest, _ = _token_parts(api, request)
    return _post_token(api, request.request_id, f"v2.{purpose}.{digest}.{'A' * 43}")


def _altered_expiry(api: Api, request: ApprovalRequest) -> Awaitable[httpx.Response]:
    expires, _, mac = first_form_token(request).partition(".")
    return _post_token(api, request.request_id, f"{int(expires) + 3600}.{mac}")


async def _first_form_expired(api: Api, request: ApprovalRequest) -> httpx.Response:
    api.clock.advance(minutes=5)
    return await _post_token(api, request.request_id, first_form_token(request))


def _raw(content: bytes, content_type: str = "application/json") -> Case:
    async def send(api: Api, request: ApprovalRequest) -> httpx.Response:
        return await api.client.post(
            api.url(request), content=content, headers={"content-type": content_type}
        )

    return send


def _body(value: Any) -> Case:
    return _raw(json.dumps(value).encode())


ERRORS: dict[str, tuple[int, str, Case]] = {
    "no token": (401, "missing_token", lambda a, r: _post_token(a, r.request_id, None)),
    "empty token": (401, "missing_token", lambda a, r: _post_token(a, r.request_id, "")),
    "forged token": (403, "invalid_token", _forged),
    "malformed token": (403, "invalid_token", lambda a, r: _post_token(a, r.request_id, "x.y")),
    "token with odd digits": (
        403,
        "invalid_token",
        lambda a, r: _post_token(a, r.request_id, "\u00b2.abc"),
    ),
    "another request's token": (403, "invalid_token", _other_requests_token),
    "altered digest": (403, "invalid_token", _altered_digest),
    "altered purpose": (403, "invalid_token", _altered_purpose),
    "malformed v2 token": (403, "invalid_token", lambda a, r: _post_token(a, r.request_id, "v2.x")),
    "first form, altered expiry": (403, "invalid_token", _altered_expiry),
    "first form, expired": (410, "expired", _first_form_expired),
    "valid token, unknown request": (404, "unknown_request", _unknown_request),
    "forged token, unknown request": (
        403,
        "invalid_token",
        lambda a, r: _post_token(a, "apr-ghost", token_for(SECRET, r)),
    ),
    "expired token": (410, "expired", _expired),
    "text/plain": (415, "unsupported_media_type", _raw(b'{"approved": true}', "text/plain")),
    "form": (
        415,
        "unsupported_media_type",
        _raw(b"approved=true", "application/x-www-form-urlencoded"),
    ),
    "latin-1 charset": (
        415,
        "unsupported_media_type",
        _raw(b'{"approved": true}', "application/json; charset=latin-1"),
    ),
    "Content-Length over the limit": (
        413,
        "body_too_large",
        _raw(b'{"approved": true, "by": "' + b"x" * MAX_BODY + b'"}'),
    ),
    "chunked body over the limit": (
        413,
        "body_too_large",
        lambda a, r: a.client.post(
            a.url(r), content=_chunks(MAX_BODY), headers={"content-type": "application/json"}
        ),
    ),
    "not JSON": (400, "invalid_json", _raw(b'{"approved": tru')),
    "empty body": (400, "invalid_json", _raw(b"")),
    "not UTF-8": (400, "invalid_json", _raw(b'{"approved": true, "by": "\xff"}')),
    "NaN": (400, "invalid_json", _raw(b'{"approved": true, "modifiedParams": {"amount": NaN}}')),
    "1e400": (
        400,
        "invalid_json",
        _raw(b'{"approved": true, "modifiedParams": {"amount": 1e400}}'),
    ),
    "5000-digit int": (
        400,
        "invalid_json",
        _raw(b'{"approved": true, "by": ' + b"9" * 5000 + b"}"),
    ),
    "lone surrogate": (422, "invalid_body", _raw(b'{"approved": true, "by": "\\ud800"}')),
    "Infinity": (
        400,
        "invalid_json",
        _raw(b'{"approved": true, "modifiedParams": {"amount": Infinity}}'),
    ),
    "-Infinity": (
        400,
        "invalid_json",
        _raw(b'{"approved": true, "modifiedParams": {"amount": -Infinity}}'),
    ),
    "1e999": (
        400,
        "invalid_json",
        _raw(b'{"approved": true, "modifiedParams": {"amount": 1e999}}'),
    ),
    "lone surrogate in a key": (
        422,
        "invalid_body",
        _raw(b'{"approved": true, "modifiedParams": {"\\udc00": 1}}'),
    ),
    "nested 40 deep": (422, "invalid_body", _raw(b"[" * 40 + b"]" * 40)),
    "nested 60000 deep": (422, "invalid_body", _raw(b"[" * 60000)),
    "array body": (422, "invalid_body", _body([{"approved": True}])),
    "null body": (422, "invalid_body", _body(None)),
    "approved missing": (422, "invalid_body", _body({"reason": "no"})),
    "approved as string": (422, "invalid_body", _body({"approved": "true"})),
    "approved as 1": (422, "invalid_body", _body({"approved": 1})),
    "reason not a string": (422, "invalid_body", _body({"approved": False, "reason": 5})),
    "by not a string": (422, "invalid_body", _body({"approved": True, "by": ["a"]})),
    "modifiedParams a list": (422, "invalid_body", _body({"approved": True, "modifiedParams": []})),
    "unknown field": (422, "invalid_body", _body({"approved": True, "aproved": True})),
    "reason on an approval": (422, "invalid_body", _body({"approved": True, "reason": "ok"})),
    "changes on a rejection": (
        422,
        "invalid_body",
        _body({"approved": False, "modifiedParams": {"amount": 1}}),
    ),
    "amount of the wrong type": (
        422,
        "invalid_parameters",
        _body({"approved": True, "modifiedParams": {"amount": "lots"}}),
    ),
    "misspelt parameter": (
        422,
        "invalid_parameters",
        _body({"approved": True, "modifiedParams": {"amout": 25}}),
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
async def test_callback_error_changes_nothing(api: Api, case: str) -> None:
    status, code, send = ERRORS[case]
    request = await api.start()
    if case == "another request's token":
        await api.start()  # the other execution is part of the snapshot
    before = await api.snapshot()
    response = await send(api, request)
    message = error(response, status, code)
    assert await api.snapshot() == before
    if code == "invalid_parameters":
        problems = response.json()["error"]["problems"]
        field = "amount" if case == "amount of the wrong type" else "amout"
        assert any(field in p for p in problems), problems  # each problem names its field
        assert "process-refund" in message
    # The request is still decidable afterwards, unless its time is up.
    if status != 410:
        ok = await api.respond(request, {"approved": True})
        assert ok.status_code == 200, ok.text


async def test_replayed_callback_is_409_naming_the_decision_that_stands(api: Api) -> None:
    request = await api.start()
    first = await api.respond(request, {"approved": False, "reason": "No", "by": "alice"})
    assert first.status_code == 200
    before = await api.snapshot()
    for body in ({"approved": False, "reason": "No", "by": "alice"}, {"approved": True}):
        response = await api.respond(request, body)
        message = error(response, 409, "already_decided")
        assert "already rejected by alice" in message
        assert response.json()["error"]["decision"] == {
            "status": "rejected",
            "outcome": "rejected",
            "by": "alice",
            "byKind": "claimed",
            "at": "2024-01-15T10:30:00Z",
        }
    assert await api.snapshot() == before
    assert api.recorder.calls == []


async def test_timed_out_request_is_410_not_409(api: Api) -> None:
    request = await api.start()
    api.clock.advance(minutes=5)
    before = await api.snapshot()
    # Due but not yet swept: the callback's token has expired, so it is refused at the
    # door (410) and records nothing.
    error(await api.respond(request, {"approved": True}), 410, "expired")
    assert await api.snapshot() == before
    # The signal route behaves as app.signal() does: the timeout the sweep would record
    # is recorded first (the model is told), then the decision is refused with 410.
    response = await api.client.post(
        f"/executions/{request.execution_id}/signal",
        json={"signal": "approve", "payload": {"requestId": request.request_id}},
        headers=AUTH,
    )
    assert response.json()["error"]["decision"]["status"] == "timed_out"
    error(response, 410, "expired")
    executions, audit, pending, calls = await api.snapshot()
    assert [status for _, _, status in executions] == ["completed"]
    assert audit == ((request.request_id, "timed_out", None),) and pending == ()
    assert calls == 0
    assert await api.app.fire_due_timers() == 0
    before = await api.snapshot()
    response = await api.client.post(
        f"/executions/{request.execution_id}/signal",
        json={"signal": "reject", "payload": {"requestId": request.request_id}},
        headers=AUTH,
    )
    assert "timed out" in error(response, 410, "expired")
    assert response.json()["error"]["decision"]["status"] == "timed_out"
    assert await api.snapshot() == before
    assert api.recorder.calls == []


async def test_cancelled_request_is_409(api: Api) -> None:
    request = await api.start()
    stop = await api.client.post(
        f"/executions/{request.execution_id}/signal",
        json={"signal": "stop", "payload": {"reason": "customer withdrew"}},
        headers=AUTH,
    )
    assert stop.status_code == 200, stop.text
    assert conforms(stop.json(), "SignalResult") == {
        "signal": "stop",
        "executionId": request.execution_id,
        "executionStatus": "stopped",
    }
    before = await api.snapshot()
    assert "cancelled" in error(
        await api.respond(request, {"approved": True}), 409, "already_decided"
    )
    again = await api.client.post(
        f"/executions/{request.execution_id}/signal", json={"signal": "stop"}, headers=AUTH
    )
    message = error(again, 409, "wrong_state")
    # Said for people: the signal they sent, not the event's internal tag.
    assert "is stopped; it takes nothing more (a stop came)" in message
    assert "stop_requested" not in message
    assert await api.snapshot() == before


async def test_fifty_concurrent_callbacks_one_decision(api: Api) -> None:
    request = await api.start()
    bodies = [
        {"approved": True, "modifiedParams": {"amount": i + 1}, "by": f"approver-{i}"}
        for i in range(50)
    ]
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        url = api.url(request)
        responses = await asyncio.gather(*(client.post(url, json=b) for b in bodies))
    winners = [r for r in responses if r.status_code == 200]
    assert len(winners) == 1, [r.status_code for r in responses]
    winner = conforms(winners[0].json(), "Decision")
    losers = [r for r in responses if r.status_code != 200]
    assert len(losers) == 49
    for loser in losers:
        message = error(loser, 409, "already_decided")
        assert f"already approved by {winner['by']}" in message
    # One run, with the winner's parameters; one audit record, the winner's.
    assert api.recorder.ran("process-refund") == [{**REFUND, **winner["modifiedParams"]}]
    [record] = await api.app.audit()
    assert (record.by, record.modified_params) == (winner["by"], winner["modifiedParams"])
    ex = (await api.app.get_execution(request.execution_id)).execution
    assert ex.status == "completed"


# -- the signal route and the reads -------------------------------------------------------------


async def test_signal_route_needs_the_bearer_key(api: Api) -> None:
    request = await api.start()
    path = f"/executions/{request.execution_id}/signal"
    body = {"signal": "approve", "payload": {"requestId": request.request_id}}
    before = await api.snapshot()
    missing = await api.client.post(path, json=body)
    error(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"] == "Bearer"
    error(
        await api.client.post(path, json=body, headers={"Authorization": "Basic x"}),
        401,
        "unauthorized",
    )
    wrong = {"Authorization": f"Bearer {API_KEY}x"}
    error(await api.client.post(path, json=body, headers=wrong), 403, "forbidden")
    unicode = [(b"authorization", "Bearer cl\u00e9".encode())]
    error(await api.client.post(path, json=body, headers=unicode), 403, "forbidden")
    # The callback token is not an API key, and the API key is not a token.
    token = {"Authorization": f"Bearer {token_for(SECRET, request)}"}
    error(await api.client.post(path, json=body, headers=token), 403, "forbidden")
    for read in ("/approvals", f"/executions/{request.execution_id}"):
        error(await api.client.get(read), 401, "unauthorized")
        error(await api.client.get(read, headers=wrong), 403, "forbidden")
    error(await _post_token(api, request.request_id, API_KEY), 403, "invalid_token")
    assert await api.snapshot() == before


async def test_signal_approve_with_changes_and_reject(api: Api) -> None:
    first = await api.start()
    response = await api.client.post(
        f"/executions/{first.execution_id}/signal",
        json={
            "signal": "approve",
            "payload": {"requestId": first.request_id, "modifiedParams": {"amount": 20}},
        },
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    body = conforms(response.json(), "SignalResult")
    # `by` is the credential's: the instance API key is reviewer admin.
    assert (body["signal"], body["decision"], body["by"], body["byKind"]) == (
        "approve",
        "approved",
        "admin",
        "reviewer",
    )
    assert body["executionStatus"] == "completed"
    assert api.recorder.ran("process-refund") == [{**REFUND, "amount": 20}]
    second = await api.start()
    response = await api.client.post(
        f"/executions/{second.execution_id}/signal",
        json={"signal": "reject", "payload": {"requestId": second.request_id, "reason": "dup"}},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    assert (response.json()["decision"], response.json()["reason"]) == ("rejected", "dup")
    assert len(api.recorder.calls) == 1


SIGNAL_ERRORS: dict[str, tuple[int, str, Any]] = {
    "unknown signal": (422, "unknown_signal", {"signal": "maybe"}),
    "no signal": (422, "unknown_signal", {"payload": {}}),
    "approve without requestId": (422, "missing_request_id", {"signal": "approve"}),
    "payload not an object": (422, "invalid_body", {"signal": "stop", "payload": "now"}),
    "unknown payload field": (422, "invalid_body", {"signal": "stop", "payload": {"why": "x"}}),
    "unknown top-level field": (422, "invalid_body", {"signal": "stop", "executionId": "x"}),
    "stop with requestId": (422, "invalid_body", {"signal": "stop", "payload": {"requestId": "a"}}),
    "reject with changes": (
        422,
        "invalid_body",
        {"signal": "reject", "payload": {"requestId": "REQ", "modifiedParams": {"amount": 1}}},
    ),
    "unknown request": (
        404,
        "unknown_request",
        {"signal": "approve", "payload": {"requestId": "apr-ghost"}},
    ),
    "invalid changes": (
        422,
        "invalid_parameters",
        {"signal": "approve", "payload": {"requestId": "REQ", "modifiedParams": {"amount": None}}},
    ),
}


@pytest.mark.parametrize("case", list(SIGNAL_ERRORS))
async def test_signal_error_changes_nothing(api: Api, case: str) -> None:
    status, code, body = SIGNAL_ERRORS[case]
    request = await api.start()
    body = json.loads(json.dumps(body).replace("REQ", request.request_id))
    before = await api.snapshot()
    path = f"/executions/{request.execution_id}/signal"
    error(await api.client.post(path, json=body, headers=AUTH), status, code)
    assert await api.snapshot() == before


async def test_signal_to_unknown_execution_is_404(api: Api) -> None:
    before = await api.snapshot()
    response = await api.client.post(
        "/executions/exec-ghost/signal", json={"signal": "stop"}, headers=AUTH
    )
    error(response, 404, "unknown_execution")
    assert await api.snapshot() == before


async def test_list_pending_approvals(api: Api) -> None:
    first = await api.start()
    second = await api.start()
    response = await api.client.get("/approvals", headers=AUTH)
    assert response.status_code == 200, response.text
    listed = response.json()["approvals"]
    for approval in listed:
        conforms(approval, "ApprovalRequest")
    assert [a["requestId"] for a in listed] == [first.request_id, second.request_id]
    assert listed[0] == {
        **first.to_dict(),
        "status": "pending",
        "expiresAt": "2024-01-15T10:35:00Z",
        "callDigest": first.digest,
        "callbackUrl": api.url(first),
    }
    query: dict[str, str] = {"status": "pending", "agentTag": "safe-agent", "limit": "1"}
    one = await api.client.get("/approvals", params=query, headers=AUTH)
    assert [a["requestId"] for a in one.json()["approvals"]] == [first.request_id]
    # A full page names its next one: after=<its last requestId>; the last page, null.
    assert one.json()["next"] == first.request_id
    rest = await api.client.get(
        "/approvals", params={**query, "after": one.json()["next"]}, headers=AUTH
    )
    assert [a["requestId"] for a in rest.json()["approvals"]] == [second.request_id]
    end = await api.client.get(
        "/approvals", params={**query, "after": second.request_id}, headers=AUTH
    )
    assert end.json() == {"approvals": [], "next": None}
    assert response.json()["next"] is None  # not a full page
    unknown = await api.client.get("/approvals", params={"after": "apr-nope"}, headers=AUTH)
    assert "apr-nope" in error(unknown, 422, "invalid_query")
    none = await api.client.get("/approvals", params={"agentTag": "other"}, headers=AUTH)
    assert none.json() == {"approvals": [], "next": None}
    approved = await api.client.get("/approvals", params={"status": "approved"}, headers=AUTH)
    assert "only status=pending is supported" in error(approved, 422, "invalid_query")
    for bad in ({"status": "done"}, {"limit": "0"}, {"limit": "x"}, {"limit": "1001"}):
        error(await api.client.get("/approvals", params=bad, headers=AUTH), 422, "invalid_query")
    typo = await api.client.get("/approvals", params={"agent_tag": "x"}, headers=AUTH)
    assert "agent_tag" in error(typo, 422, "invalid_query")


async def test_get_execution(api: Api) -> None:
    request = await api.start()
    await api.respond(request, {"approved": True, "by": "ops"})
    response = await api.client.get(f"/executions/{request.execution_id}", headers=AUTH)
    assert response.status_code == 200, response.text
    body = conforms(response.json(), "Execution")
    history = await api.app.get_execution(request.execution_id)
    assert (body["status"], body["output"], body["error"]) == ("completed", "Done.", None)
    assert body["pendingApprovals"] == []
    [approval] = body["approvals"]
    assert (approval["status"], approval["decidedBy"]) == ("approved", "ops")
    assert body["usage"] == {"inputTokens": 0, "outputTokens": 0}
    events = body["events"]
    assert [e["type"] for e in events] == [type(e).TAG for e in history.events]
    assert events[0]["type"] == "started"
    # One vocabulary: camelCase names, times spelt like every other time of the API.
    for event, stored in zip(events, history.events, strict=True):
        assert all("_" not in name for name in event), event
        assert event["at"] == iso(stored.at)  # as createdAt and expiresAt spell times
    replied = events[1]
    assert replied["stopReason"] == "tool_use" and replied["usage"] == {
        "inputTokens": 0,
        "outputTokens": 0,
    }
    assert replied["tickets"][0]["requestId"] == request.request_id
    # The model's own blocks are its data, as it sent them.
    [use] = [block for block in replied["content"] if block["type"] == "tool_use"]
    assert use["input"] == REFUND  # not renamed, not re-cased
    assert events[2]["requestId"] == request.request_id and events[2]["by"] == "ops"
    error(await api.client.get("/executions/exec-ghost", headers=AUTH), 404, "unknown_execution")


async def test_unknown_routes_and_methods_answer_json(api: Api) -> None:
    error(await api.client.get("/nothing/here"), 404, "not_found")
    error(await api.client.get("/approvals/apr-1/respond"), 405, "method_not_allowed")
    error(await api.client.delete("/executions/exec-1", headers=AUTH), 405, "method_not_allowed")


async def test_routes_without_their_secret_say_how_to_configure_it(tmp_path: Path) -> None:
    async with hosted(tmp_path) as bare:
        request = await bare.start()
        before = await bare.snapshot()
        response = await _post_token(bare, request.request_id, "1.x")
        assert "webhook_secret" in error(response, 503, "not_configured")
        response = await bare.client.get("/approvals", headers=AUTH)
        assert "api_key" in error(response, 503, "not_configured")
        assert await bare.snapshot() == before


# -- OpenAPI, schemathesis and property-based fuzzing -------------------------------------------


async def test_openapi_document_is_valid_and_covers_every_route(api: Api) -> None:
    response = await api.client.get("/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.1")
    schema = schemathesis.openapi.from_dict(doc)
    schema.validate()
    operations = {
        (method.upper(), schema[path][method.upper()].path)
        for path, methods in doc["paths"].items()
        for method in methods
    }
    routes = {
        (method, route.path)
        for route in build_asgi(api.app).routes
        for method in getattr(route, "methods", set()) - {"HEAD"}
    }
    assert operations == routes


async def test_schemathesis_conformance(api: Api) -> None:
    """Generated requests, valid and invalid, against every documented operation: answers
    conform to the document, none is a 5xx, and nothing changes (no generated token or
    execution id is a real one)."""
    request = await api.start()
    before = await api.snapshot()
    doc = (await api.client.get("/openapi.json")).json()
    schema = schemathesis.openapi.from_dict(doc)
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        negative_data_rejection,
    ]

    def run() -> None:
        for path, methods in doc["paths"].items():
            operation = schema[path][next(iter(methods)).upper()]
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @settings(
                    max_examples=25,
                    deadline=None,
                    database=None,
                    derandomize=True,
                    suppress_health_check=list(HealthCheck),
                )
                @given(case=operation.as_strategy(generation_mode=mode))
                def conform(case: Any) -> None:
                    response = case.call(base_url=api.base, headers=AUTH, timeout=10)
                    case.validate_response(response, checks=checks, headers=AUTH)

                try:
                    conform()
                except Unsatisfiable:
                    # Nothing to negate (no parameters, or only free-form strings).
                    skipped.append(f"{mode.name} {operation.method.upper()} {operation.path}")

    skipped: list[str] = []
    await asyncio.to_thread(run)
    assert skipped == ["NEGATIVE GET /openapi.json"]
    # And a real execution's answer, against its documented schema.
    executions = schema["/executions/{executionId}"]["GET"]

    @settings(max_examples=5, deadline=None, database=None, derandomize=True)
    @given(case=executions.as_strategy(path_parameters={"executionId": request.execution_id}))
    def real(case: Any) -> None:
        response = case.call(base_url=api.base, headers=AUTH, timeout=10)
        assert response.status_code == 200
        case.validate_response(response, checks=checks, headers=AUTH)

    await asyncio.to_thread(real)
    assert await api.snapshot() == before


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
_NASTY = [
    b"",
    b"{",
    b"[" * 5000,
    b'{"approved": true, "by": "\\udc00"}',
    b'{"approved": true, "modifiedParams": {"amount": 1e999}}',
    b'{"approved": Infinity}',
    b"\xef\xbb\xbf{}",
    b'{"approved": true}' * 2,
    b'{"approved": true, "by": "' + b"a" * (MAX_BODY + 1) + b'"}',
]


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(attrs.NOTHING), st.none(), strategy, _JSON)


def _callback_body() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "approved": st.one_of(st.booleans(), _JSON),
            "reason": _maybe(st.text(max_size=30)),
            "by": _maybe(st.text(max_size=30)),
            "modifiedParams": _maybe(
                st.dictionaries(
                    st.sampled_from(["amount", "orderId", "reason", "amout"]),
                    st.one_of(
                        st.integers(-5, 500), st.floats(allow_nan=False), st.text(max_size=8)
                    ),
                    max_size=3,
                )
            ),
            "extra": _JSON,
        },
    ).map(lambda d: {k: v for k, v in d.items() if v is not attrs.NOTHING})


def _signal_body() -> st.SearchStrategy[dict[str, Any]]:
    payload = st.fixed_dictionaries(
        {},
        optional={
            "requestId": st.one_of(st.just("LIVE"), st.text(max_size=10), _JSON),
            "reason": _maybe(st.text(max_size=20)),
            "by": _maybe(st.text(max_size=20)),
            "modifiedParams": _maybe(
                st.dictionaries(st.sampled_from(["amount", "x"]), st.integers(0, 100), max_size=2)
            ),
        },
    ).map(lambda d: {k: v for k, v in d.items() if v is not attrs.NOTHING})
    return st.fixed_dictionaries(
        {},
        optional={
            "signal": st.one_of(st.sampled_from(["approve", "reject", "stop"]), _JSON),
            "payload": st.one_of(payload, _JSON),
        },
    )


_VALID_CALLBACKS = [
    {"approved": True},
    {"approved": False, "reason": "Too much"},
    {"approved": True, "modifiedParams": {"amount": 10}, "by": "fuzz"},
]
_VALID_SIGNALS = [
    {"signal": "approve", "payload": {"requestId": "LIVE"}},
    {"signal": "reject", "payload": {"requestId": "LIVE", "reason": "r"}},
    {"signal": "stop"},
]
_HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)


@st.composite
def _attempts(draw: st.DrawFn) -> dict[str, Any]:
    route = draw(st.sampled_from(["respond", "respond", "respond", "signal", "signal", "read"]))
    valid = _VALID_CALLBACKS if route == "respond" else _VALID_SIGNALS
    body = draw(
        st.one_of(
            st.sampled_from(valid).map(lambda v: json.dumps(v).encode()),
            st.sampled_from(valid).map(lambda v: json.dumps(v).encode()),
            (_callback_body() if route == "respond" else _signal_body()).map(
                lambda v: json.dumps(v).encode()
            ),
            _JSON.map(lambda v: json.dumps(v).encode()),
            st.binary(max_size=40),
            st.sampled_from(_NASTY),
        )
    )
    content_type = draw(
        st.one_of(
            st.just("application/json"),
            st.just("application/json"),
            st.just("application/json"),
            st.sampled_from(
                [
                    "application/json; charset=UTF-8",
                    "Application/JSON",
                    "application/json; charset=utf-16",
                    "text/plain",
                    "application/problem+json",
                    "multipart/form-data; boundary=x",
                ]
            ),
            _HEADER_TEXT,
            st.none(),
        )
    )
    extra = draw(st.dictionaries(st.from_regex(r"\Ax-[a-z0-9-]{1,12}\Z"), _HEADER_TEXT, max_size=3))
    return {
        "route": route,
        "method": draw(
            st.sampled_from(
                (["GET"] if route == "read" else ["POST"]) * 12 + ["GET", "POST", "PUT", "DELETE"]
            )
        ),
        "body": body,
        "content_type": content_type,
        "headers": extra,
        "token": draw(st.sampled_from(["valid"] * 3 + ["missing", "forged", "other"])),
        "target": draw(st.sampled_from(["live", "live", "decided", "unknown"])),
        "auth": draw(st.sampled_from(["valid", "valid", "missing", "wrong"])),
        "listing": draw(st.booleans()),
        "query": draw(
            st.dictionaries(
                st.sampled_from(["status", "agentTag", "limit", "page"]),
                st.one_of(
                    st.sampled_from(["pending", "approved", "1", "0", "safe-agent"]), _HEADER_TEXT
                ),
                max_size=3,
            )
        ),
        "declared_length": draw(
            st.one_of(
                st.none(),
                st.none(),
                st.sampled_from([0, 2, MAX_BODY, MAX_BODY + 1, 10 * MAX_BODY]),
                st.integers(0, 10 * MAX_BODY),
            )
        ),
    }


async def test_fuzzed_requests_never_5xx_and_errors_change_nothing(api: Api) -> None:
    """Arbitrary bodies, content types and headers, with real and bogus credentials and
    ids, against every route: never a 5xx; an error changes nothing; a success made
    exactly the decision it reports."""
    loop = asyncio.get_running_loop()
    live = {"request": await api.start()}
    decided = await api.start()
    assert (await api.respond(decided, {"approved": False})).status_code == 200
    transport = httpx.ASGITransport(app=build_asgi(api.app))
    client = httpx.AsyncClient(transport=transport, base_url="http://clearance.test")
    stats: dict[int, int] = {}

    async def attempt(a: dict[str, Any]) -> None:
        request: ApprovalRequest = live["request"]
        target = {"live": request, "decided": decided}.get(a["target"])
        target = target or attrs.evolve(request, request_id="apr-unknown", execution_id="exec-x")
        headers = dict(a["headers"])
        if a["content_type"] is not None:
            headers["content-type"] = a["content_type"]
        if a["declared_length"] is not None:
            headers["content-length"] = str(a["declared_length"])
        body = a["body"].replace(b'"LIVE"', json.dumps(target.request_id).encode())
        params: dict[str, str] = {}
        if a["route"] == "respond":
            path = f"/approvals/{target.request_id}/respond"
            token_of = {"valid": target, "other": decided if target is not decided else request}
            if a["token"] in token_of:
                params["token"] = token_for(SECRET, token_of[a["token"]])
            elif a["token"] == "forged":
                params["token"] = token_for(SECRET, target)[:-2] + "AA"
        else:
            auth = {"valid": API_KEY, "wrong": "nope"}.get(a["auth"])
            if auth:
                headers["authorization"] = f"Bearer {auth}"
            if a["route"] == "signal":
                path = f"/executions/{target.execution_id}/signal"
            elif a["listing"]:
                path, params = "/approvals", a["query"]
            else:
                path = f"/executions/{target.execution_id}"
        before = await api.snapshot()
        response = await client.request(
            a["method"], path, params=params, content=body, headers=headers
        )
        stats[response.status_code] = stats.get(response.status_code, 0) + 1
        assert response.status_code < 500, (a, response.text)
        data = response.json()
        after = await api.snapshot()
        if response.status_code >= 400:
            assert isinstance(data["error"]["code"], str) and data["error"]["message"]
            assert after == before, (a, response.text)
        elif a["method"] == "GET":
            assert after == before
        else:
            assert a["method"] == "POST" and response.status_code == 200
            ran = len(api.recorder.calls) - before[3]
            if data.get("decision") == "approved":
                assert ran == 1 and len(after[1]) == len(before[1]) + 1
            elif data.get("decision") == "rejected":
                assert ran == 0 and len(after[1]) == len(before[1]) + 1
            else:
                assert data["executionStatus"] == "stopped" and ran == 0
            live["request"] = await api.start()

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(a=_attempts())
    def fuzz(a: dict[str, Any]) -> None:
        asyncio.run_coroutine_threadsafe(attempt(a), loop).result(timeout=30)

    try:
        await asyncio.to_thread(fuzz)
    finally:
        await client.aclose()
    # The run reached past the credential checks, into decisions and validation.
    seen = str(sorted(stats.items()))
    assert stats.get(200, 0) >= 3 and stats.get(422, 0) >= 10, seen
    assert {401, 403, 415} <= set(stats) and len(stats) >= 7, seen


# -- `clearance serve` ------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARANCE_", "ANTHROPIC_"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


async def test_clearance_serve_answers_openapi_and_callbacks(tmp_path: Path) -> None:
    from servers import free_port

    db = tmp_path / "serve.db"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    recorder = Recorder()
    # This process hosts the agent; the server only records the decision.
    async with Clearance.open(
        f"sqlite:///{db}", webhook_secret=SECRET, public_url=base, poll_interval=0.05
    ) as app:
        define_refund_agent(app, recorder)
        ex = await app.run("safe-agent", input="Refund order ORD-123")
        [request] = ex.pending_approvals
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "clearance",
            "serve",
            "--db",
            str(db),
            "--port",
            str(port),
            "--public-url",
            base,
            cwd=tmp_path,
            env=_env(CLEARANCE_WEBHOOK_SECRET=SECRET, CLEARANCE_API_KEY=API_KEY),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                for _ in range(300):
                    try:
                        doc = await client.get("/openapi.json")
                        break
                    except httpx.TransportError:
                        assert proc.returncode is None
                        await asyncio.sleep(0.05)
                assert doc.status_code == 200 and doc.json()["openapi"].startswith("3.1")
                listed = await client.get("/approvals", headers=AUTH)
                [pending] = listed.json()["approvals"]
                assert pending["callbackUrl"] == app.callback_url(request)
                response = await client.post(
                    app.callback_url(request), json={"approved": True, "by": "remote"}
                )
                assert response.status_code == 200, response.text
                assert response.json()["decision"] == "approved"
                replay = await client.post(app.callback_url(request), json={"approved": True})
                error(replay, 409, "already_decided")
            for _ in range(200):  # this process picks the decision up and finishes the run
                ex = (await app.get_execution(ex.id)).execution
                if ex.status == "completed":
                    break
                await asyncio.sleep(0.05)
            assert (ex.status, ex.output) == ("completed", "Done.")
            assert recorder.ran("process-refund") == [REFUND]
            proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), 15)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()
    assert "Stopped" in out.decode()
    printed = out.decode() + err.decode()
    assert SECRET not in printed
    # The access log shows the callbacks, never their tokens.
    token = app.callback_url(request).partition("token=")[2]
    assert token not in printed
    assert f"/approvals/{request.request_id}/respond?token=REDACTED" in printed


async def test_an_execution_whose_log_does_not_read_back_is_a_500_naming_it(api: Api) -> None:
    request = await api.start()
    db = sqlite3.connect(api.app.store.path)  # type: ignore[attr-defined]
    with db:
        db.execute("UPDATE events SET body = x'01ff' WHERE seq = 2")
    db.close()
    as_if_restarted(api.app)
    response = await api.respond(request, {"approved": True})
    message = error(response, 500, "unreadable_execution")
    assert f"execution {request.execution_id}: its stored event 2 cannot" in message
    response = await api.client.get(f"/executions/{request.execution_id}", headers=AUTH)
    assert "stored event 2 cannot be read back" in error(response, 500, "unreadable_execution")
    # The listing still answers: it shows the request as the inbox holds it.
    listing = await api.client.get("/approvals", headers=AUTH)
    assert listing.status_code == 200, listing.text
    [listed] = listing.json()["approvals"]
    assert listed["requestId"] == request.request_id and "extendableUntil" not in listed
    assert api.recorder.calls == []
    paths = openapi_document()["paths"]
    for path, method in (
        ("/approvals/{requestId}/respond", "post"),
        ("/executions/{executionId}/signal", "post"),
        ("/executions/{executionId}", "get"),
    ):
        assert "unreadable_execution" in paths[path][method]["responses"]["500"]["description"]


# -- one place per rule, and strict JSON on the way out ----------------------------------------


def _strict_json(response: httpx.Response) -> Any:
    """The answer's body, read as strict JSON: no NaN, no Infinity, valid UTF-8."""
    from clearance.core.json_value import loads

    return loads(response.content, "the answer")


async def test_a_nan_parameter_from_the_model_opens_no_request_and_answers_stay_strict(
    api: Api,
) -> None:
    """A model's NaN parameter: the core refuses the call and tells the model, so no
    request exists; the listing and the execution answer 200 with strict JSON. (A
    request that holds one all the same: `_OddFacade` below.)"""
    odd = {**REFUND, "amount": float("nan")}
    define_refund_agent(
        api.app,
        api.recorder,
        model=ScriptedModel([[tool_use("process-refund", odd)], [text("Done.")]]),
    )
    ex = await api.app.run("safe-agent", input="Refund order ORD-123")
    assert ex.pending_approvals == [] and ex.status == "completed"
    listed = await api.client.get("/approvals", headers=AUTH)
    assert listed.status_code == 200, listed.text
    assert _strict_json(listed) == {"approvals": [], "next": None}
    shown = await api.client.get(f"/executions/{ex.id}", headers=AUTH)
    assert shown.status_code == 200, shown.text
    assert _strict_json(shown)["status"] == "completed"
    assert api.recorder.ran("process-refund") == []


class _OddFacade:
    """Just what GET /approvals asks of `Clearance`, holding a request no core would make
    now: the listing must answer strict JSON all the same."""

    api_key = API_KEY
    webhook_secret = None
    public_url = None
    trust_header = None

    def __init__(self, request: ApprovalRequest) -> None:
        self.request = request

    async def pending(
        self, agent_tag: str | None, *, limit: int, after: str | None = None
    ) -> list[ApprovalRequest]:
        return [self.request]

    async def extendable(self, requests: list[ApprovalRequest]) -> dict[str, Any]:
        return {}


async def test_a_listing_answers_strict_json_whatever_a_request_holds() -> None:
    now = FakeClock().now()
    odd = ApprovalRequest(
        "apr-1", "exec-1", "safe-agent", "process-refund", "toolu_1", {}, "r", now, now, 0
    )
    odd = attrs.evolve(odd, parameters={"amount": float("nan"), "note": "a\ud800b"})
    transport = httpx.ASGITransport(app=build_asgi(_OddFacade(odd)))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://clearance.test") as client:
        listed = await client.get("/approvals", headers=AUTH)
    assert listed.status_code == 200, listed.text
    [approval] = _strict_json(listed)["approvals"]
    assert approval["parameters"] == {"amount": "NaN", "note": "a\ufffdb"}


def test_views_encode_strict_json_whatever_a_request_holds() -> None:
    from clearance import views
    from clearance.core.json_value import loads
    from clearance.testing import FakeClock

    now = FakeClock().now()
    request = ApprovalRequest(
        request_id="apr-1",
        execution_id="exec-1",
        agent_tag="safe-agent",
        tool="process-refund",
        tool_use_id="toolu_1",
        parameters={"amount": float("inf"), "low": float("-inf"), "note": "a\ud800b"},
        reason="Refund request requires approval",
        timestamp=now,
        timeout=now,
        timeout_ms=0,
    )
    for data in (
        views.approval_request(request),
        views.approval(request, None),
        views.webhook_body(request, "https://example.test/cb"),
    ):
        for text_ in (views.dumps(data), views.dumps(data, compact=True), views.encode(data)):
            parameters = loads(text_)["parameters"]
            assert parameters == {"amount": "Infinity", "low": "-Infinity", "note": "a\ufffdb"}
    # What is JSON already goes out unchanged.
    plain = views.approval_request(attrs.evolve(request, parameters=REFUND))
    assert json.loads(views.dumps(plain)) == plain


def test_the_spec_views_keep_their_fields() -> None:
    from clearance import views
    from clearance.testing import FakeClock

    now = FakeClock().now()
    request = ApprovalRequest(
        "apr-1", "exec-1", "safe-agent", "process-refund", "toolu_1", REFUND, "r", now, now, 0
    )
    assert list(views.approval_request(request)) == [
        "requestId",
        "executionId",
        "agentTag",
        "tool",
        "parameters",
        "reason",
        "timestamp",
        "timeout",
    ]
    assert views.webhook_body(request, None) == {
        "type": "approval_request",
        "requestId": "apr-1",
        "executionId": "exec-1",
        "agentTag": "safe-agent",
        "tool": "process-refund",
        "parameters": REFUND,
        "reason": "r",
        "timestamp": "2024-01-15T10:30:00Z",
        "expiresAt": "2024-01-15T10:30:00Z",
        "callbackUrl": None,
        "callDigest": None,  # made by hand: no digest
    }


def test_every_refusal_code_has_a_status() -> None:
    from clearance.core.errors import RefusalCode
    from clearance.http_errors import REFUSAL_STATUS

    assert set(REFUSAL_STATUS) == set(RefusalCode)
    assert all(400 <= status < 500 for status in REFUSAL_STATUS.values())


def test_the_signal_names_are_the_engines() -> None:
    from clearance.engine import SIGNALS

    variants = openapi_document()["components"]["schemas"]["SignalBody"]["oneOf"]
    assert [v["properties"]["signal"]["const"] for v in variants] == list(SIGNALS)
    result = openapi_document()["components"]["schemas"]["SignalResult"]
    assert result["properties"]["signal"]["enum"] == list(SIGNALS)


def test_the_http_layer_talks_to_the_facade_only() -> None:
    """No route (and no command) reaches past `Clearance` into its store."""
    import ast

    import clearance

    root = Path(clearance.__file__).resolve().parent
    files = [*root.glob("http_*.py"), *root.glob("cli*.py"), root / "views.py"]
    for path in [*files, root / "inbox.py", root / "page_session.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                assert node.attr != "store", f"{path.name}:{node.lineno} reaches into the store"


async def test_the_facade_reads_one_request(api: Api) -> None:
    request = await api.start()
    assert await api.app.execution_of_request(request.request_id) == request.execution_id
    assert await api.app.request(request.request_id) == request
    assert await api.app.execution_of_request("apr-ghost") is None
    assert await api.app.request("apr-ghost") is None
    await api.respond(request, {"approved": True, "by": "ops"})
    decided = await api.app.request(request.request_id)
    assert decided is not None and (decided.status, decided.decided_by) == ("approved", "ops")
    ex = await api.app.execution(request.execution_id)
    assert ex is not None and ex.status == "completed"
    assert await api.app.execution("exec-ghost") is None


async def test_a_signal_approval_may_remember_the_tool_for_the_execution(api: Api) -> None:
    request = await api.start()
    url = f"/executions/{request.execution_id}/signal"
    payload = {"requestId": request.request_id, "remember": "forever"}
    error(
        await api.client.post(url, json={"signal": "approve", "payload": payload}, headers=AUTH),
        422,
        "invalid_remember",
    )
    payload = {"requestId": request.request_id, "remember": "execution"}
    refused = await api.client.post(
        url, json={"signal": "reject", "payload": payload}, headers=AUTH
    )
    error(refused, 422, "invalid_body")
    payload["rememberWhen"] = "args.amount <= 100.0"
    body = {"signal": "approve", "payload": payload}
    conforms(body, "SignalBody")
    response = await api.client.post(url, json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    ex = await api.app.store.load(request.execution_id)
    assert ex is not None
    [grant] = ex.grants
    assert (grant.tool, grant.by, grant.by_kind, grant.when) == (
        "process-refund",
        "admin",
        "reviewer",
        "args.amount <= 100.0",
    )


async def test_a_callback_made_for_another_call_is_409_and_changes_nothing(api: Api) -> None:
    request = await api.start()
    assert request.digest and request.digest.startswith("sha256:")
    before = await api.snapshot()
    stale = {"approved": True, "callDigest": "sha256:" + "0" * 64}
    error(await api.respond(request, stale), 409, "stale_decision")
    assert await api.snapshot() == before
    response = await api.respond(request, {"approved": True, "callDigest": request.digest})
    assert response.status_code == 200, response.text


# -- quorums, requesters and extensions -------------------------------------------------------


@asynccontextmanager
async def quorum_hosted(tmp_path: Path) -> AsyncIterator[tuple[Api, dict[str, dict[str, str]]]]:
    """The refund agent with a 2-approval, finance quorum (open up to 2h), and bearer
    headers of reviewers alice, bob (finance, decide and extend), carol (decide only)."""
    from clearance import Grant, HumanInLoop, Reviewer

    async with hosted(tmp_path, webhook_secret=SECRET, api_key=API_KEY) as api:
        define_refund_agent(
            api.app,
            api.recorder,
            hitl=HumanInLoop(enabled=True),
            approvals_required=2,
            groups=["finance"],
            max_approval_timeout="2h",
            timeout_action="reject",
        )
        headers = {}
        for name, actions in (("alice", {"decide", "extend"}), ("bob", {"decide", "extend"})):
            await api.app.save_reviewer(
                Reviewer(name, [Grant(("*",), ("*",), actions)], groups=["finance"])
            )
        await api.app.save_reviewer(Reviewer("carol", [Grant(("*",), ("*",), {"decide"})]))
        for name in ("alice", "bob", "carol"):
            headers[name] = {"Authorization": f"Bearer {await api.app.issue_key(name)}"}
        yield api, headers


async def _quorum_request(api: Api, requested_by: str | None = "carol") -> ApprovalRequest:
    ex = await api.app.run("safe-agent", input="Refund order ORD-123", requested_by=requested_by)
    api.executions.append(ex.id)
    [request] = ex.pending_approvals
    return request


async def _signal(
    api: Api, request: ApprovalRequest, headers: dict[str, str], signal: str, **payload: Any
) -> httpx.Response:
    return await api.client.post(
        f"/executions/{request.execution_id}/signal",
        json={"signal": signal, "payload": {"requestId": request.request_id, **payload}},
        headers=headers,
    )


async def test_a_two_approval_request_over_http_is_voted_then_decided(tmp_path: Path) -> None:
    async with quorum_hosted(tmp_path) as (api, keys):
        request = await _quorum_request(api)
        listed = (await api.client.get("/approvals", headers=AUTH)).json()["approvals"]
        [shown] = [conforms(a, "ApprovalRequest") for a in listed]
        assert shown["approvalsRequired"] == 2 and shown["groups"] == ["finance"]
        assert shown["votes"] == [] and shown["requestedBy"] == "carol"
        assert shown["stillNeeded"] == {"approvals": 2, "groups": ["finance"]}

        # The person who started the run may not approve it: nothing changes.
        before = await api.snapshot()
        self_approval = await _signal(api, request, keys["carol"], "approve")
        assert "carol" in error(self_approval, 403, "self_approval")
        # A callback body's name is claimed: it cannot count towards a quorum.
        claimed = await api.respond(request, {"approved": True, "by": "alice"})
        error(claimed, 403, "not_granted")
        assert await api.snapshot() == before

        first = await _signal(api, request, keys["alice"], "approve")
        assert first.status_code == 200, first.text
        body = conforms(first.json(), "SignalResult")
        conforms({k: v for k, v in body.items() if k != "signal"}, "Decision")
        assert (body["decision"], body["outcome"], body["executionStatus"]) == (
            "pending",
            None,
            "awaiting_approval",
        )
        [vote] = body["votes"]
        assert (vote["by"], vote["byKind"], vote["groups"]) == ("alice", "reviewer", ["finance"])
        assert body["stillNeeded"] == {"approvals": 1, "groups": []}
        assert body["expiresAt"] == "2024-01-15T10:35:00Z"
        assert api.recorder.ran("process-refund") == []
        listed = (await api.client.get("/approvals", headers=AUTH)).json()["approvals"]
        assert [v["by"] for v in listed[0]["votes"]] == ["alice"]

        before = await api.snapshot()
        again = await _signal(api, request, keys["alice"], "approve")
        assert "alice already approved" in error(again, 409, "already_voted")
        assert await api.snapshot() == before

        second = await _signal(api, request, keys["bob"], "approve")
        assert second.status_code == 200, second.text
        body = conforms(second.json(), "SignalResult")
        assert (body["decision"], body["by"], body["executionStatus"]) == (
            "approved",
            "bob",
            "completed",
        )
        assert [v["by"] for v in body["votes"]] == ["alice", "bob"]
        assert "stillNeeded" not in body
        assert api.recorder.ran("process-refund") == [REFUND]
        decisions = [(r.decision, r.by) for r in await api.app.audit()]
        assert decisions == [("vote", "alice"), ("approved", "bob")]
        execution = await api.client.get(f"/executions/{request.execution_id}", headers=AUTH)
        data = conforms(execution.json(), "Execution")
        assert data["requestedBy"] == "carol"
        assert [v["by"] for v in data["approvals"][0]["votes"]] == ["alice", "bob"]


async def test_a_deadline_is_extended_over_http_within_the_tools_longest(tmp_path: Path) -> None:
    async with quorum_hosted(tmp_path) as (api, keys):
        request = await _quorum_request(api, requested_by=None)
        body = {"signal": "extend", "payload": {"requestId": request.request_id, "until": "x"}}
        conforms(
            {**body, "payload": {**body["payload"], "until": "2024-01-15T11:30:00Z"}}, "SignalBody"
        )
        before = await api.snapshot()
        for payload, status, code in (
            ({"until": "tomorrow"}, 422, "invalid_deadline"),
            ({"until": "2024-01-15T11:30:00"}, 422, "invalid_deadline"),  # no offset
            ({"until": 1705318200}, 422, "invalid_body"),  # not a string
            ({}, 422, "invalid_body"),
            ({"until": "2024-01-15T11:30:00Z", "reason": "x"}, 422, "invalid_body"),
            ({"until": "2024-01-15T13:00:00Z"}, 422, "extension_too_long"),  # past 2h
        ):
            answer = await _signal(api, request, keys["alice"], "extend", **payload)
            error(answer, status, code)
        approve_until = await _signal(
            api, request, keys["alice"], "approve", until="2024-01-15T11:30:00Z"
        )
        assert "extend" in error(approve_until, 422, "invalid_body")
        error(
            await _signal(api, request, keys["carol"], "extend", until="2024-01-15T11:30:00Z"),
            403,
            "not_granted",
        )
        assert await api.snapshot() == before

        moved = await _signal(
            api, request, keys["alice"], "extend", until="2024-01-15T12:00:00+01:00"
        )
        assert moved.status_code == 200, moved.text
        answer = conforms(moved.json(), "SignalResult")
        assert (answer["signal"], answer["decision"], answer["expiresAt"]) == (
            "extend",
            "pending",
            "2024-01-15T11:00:00Z",
        )
        listed = (await api.client.get("/approvals", headers=AUTH)).json()["approvals"]
        assert listed[0]["expiresAt"] == "2024-01-15T11:00:00Z"
        [record] = await api.app.audit()
        assert (record.decision, record.by) == ("extended", "alice")
        # Past the first deadline, the request is still open until the new one.
        api.clock.advance(minutes=10)
        assert await api.app.fire_due_timers() == 0
        vote = await _signal(api, request, keys["alice"], "approve")
        assert vote.status_code == 200 and vote.json()["decision"] == "pending", vote.text
        too_long = await _signal(api, request, keys["bob"], "extend", until="2024-01-15T12:30:01Z")
        assert "2 hours at most" in error(too_long, 422, "extension_too_long")


def test_quorum_views_show_votes_and_who_is_still_needed() -> None:
    from clearance import views
    from clearance.core.quorum import Vote

    now = FakeClock().now()
    plain = ApprovalRequest(
        "apr-1", "exec-1", "safe-agent", "process-refund", "toolu_1", REFUND, "r", now, now, 0
    )
    vote = Vote("alice", now, "reviewer", ("finance",))
    request = attrs.evolve(
        plain, approvals_required=2, groups=("finance", "risk"), votes=(vote,), requested_by="carol"
    )
    extra = {
        "approvalsRequired": 2,
        "groups": ["finance", "risk"],
        "votes": [
            {
                "by": "alice",
                "byKind": "reviewer",
                "at": "2024-01-15T10:30:00Z",
                "groups": ["finance"],
                "onBehalfOf": None,
            }
        ],
        "stillNeeded": {"approvals": 1, "groups": ["risk"]},
        "requestedBy": "carol",
    }
    assert views.webhook_body(request, None) == {**views.webhook_body(plain, None), **extra}
    assert views.approval_request(request) == {**plain.to_dict(), **extra}
    assert views.decision(request, "awaiting_approval")["stillNeeded"] == extra["stillNeeded"]
    assert conforms(views.approval(request), "ApprovalRequest")["votes"] == extra["votes"]
    # Decided: the votes stay, nobody is needed any more.
    done = attrs.evolve(request, status="approved", outcome="approved", decided_by="bob")
    assert "stillNeeded" not in views.approval(done) and views.approval(done)["votes"]
    assert "stillNeeded" not in views.webhook_body(done, None)


async def test_an_execution_and_the_listing_say_how_far_a_pending_request_may_be_extended(
    api: Api,
) -> None:
    from clearance import HumanInLoop

    async def shown(request: ApprovalRequest) -> tuple[dict[str, Any], dict[str, Any]]:
        answer = await api.client.get(f"/executions/{request.execution_id}", headers=AUTH)
        data = conforms(answer.json(), "Execution")
        [listed] = [a for a in data["approvals"] if a["requestId"] == request.request_id]
        pending = [a for a in data["pendingApprovals"] if a["requestId"] == request.request_id]
        assert pending in ([], [listed])
        # The inbox's listing says the same of each pending request (one rule for both).
        page = (await api.client.get("/approvals", headers=AUTH)).json()["approvals"]
        assert [a for a in page if a["requestId"] == request.request_id] == pending
        return listed, answer.json()

    plain = await api.start()  # its tool sets no max_approval_timeout: no field at all
    listed, body = await shown(plain)
    assert "extendableUntil" not in listed and "extendableUntil" not in json.dumps(body)
    define_refund_agent(
        api.app, api.recorder, hitl=HumanInLoop(enabled=True), max_approval_timeout="1h"
    )
    request = await api.start()  # asked at 10:30, open until 10:35, up to 11:30
    listed, _ = await shown(request)
    assert (listed["expiresAt"], listed["extendableUntil"]) == (
        "2024-01-15T10:35:00Z",
        "2024-01-15T11:30:00Z",
    )
    moved = await _signal(api, request, AUTH, "extend", until=listed["extendableUntil"])
    assert moved.status_code == 200, moved.text
    listed, _ = await shown(request)  # at its longest: nothing more to give
    assert listed["expiresAt"] == "2024-01-15T11:30:00Z" and "extendableUntil" not in listed
    decided = await api.start()
    await api.app.decide(decided.request_id, approved=False, reason="no", by="ops")
    listed, _ = await shown(decided)
    assert listed["status"] == "rejected" and "extendableUntil" not in listed


async def test_a_redeploy_that_allows_extensions_shows_them_where_a_signal_takes_them(
    api: Api,
) -> None:
    """A request made before the tool had max_approval_timeout: after a redeploy gives it
    one, both views say how far it may go (as the current definition judges it, which is
    what an extend signal is judged by), and extending it that far is taken."""
    from clearance import HumanInLoop

    request = await api.start()  # 10:30, no max_approval_timeout yet

    async def seen() -> list[dict[str, Any]]:
        listing = (await api.client.get("/approvals", headers=AUTH)).json()["approvals"]
        one = (await api.client.get(f"/executions/{request.execution_id}", headers=AUTH)).json()
        return [
            a for a in listing + one["pendingApprovals"] if a["requestId"] == request.request_id
        ]

    assert [a.get("extendableUntil") for a in await seen()] == [None, None]
    define_refund_agent(
        api.app, api.recorder, hitl=HumanInLoop(enabled=True), max_approval_timeout="2h"
    )
    shown = [a.get("extendableUntil") for a in await seen()]
    assert shown == ["2024-01-15T12:30:00Z"] * 2, shown
    moved = await _signal(api, request, AUTH, "extend", until=shown[0])
    assert moved.status_code == 200, moved.text
    assert [a["expiresAt"] for a in await seen()] == ["2024-01-15T12:30:00Z"] * 2


async def test_a_callback_url_lives_as_long_as_its_extended_request(api: Api) -> None:
    from clearance import HumanInLoop

    define_refund_agent(
        api.app, api.recorder, hitl=HumanInLoop(enabled=True), max_approval_timeout="1h"
    )
    request = await api.start()
    url = api.url(request)  # its token made with the first deadline, 10:35
    moved = await _signal(api, request, AUTH, "extend", until="2024-01-15T11:00:00Z")
    assert moved.status_code == 200 and moved.json()["expiresAt"] == "2024-01-15T11:00:00Z"
    api.clock.advance(minutes=10)
    response = await api.client.post(url, json={"approved": True, "by": "ops"})
    assert response.status_code == 200, response.text
    assert response.json()["decision"] == "approved"
    assert api.recorder.ran("process-refund") == [REFUND]
    # Past the new deadline, the same URL is expired like any other.
    late = await api.start()
    api.clock.advance(minutes=6)
    error(await api.respond(late, {"approved": True}), 410, "expired")


async def test_a_callback_url_of_an_earlier_release_still_decides(api: Api) -> None:
    """URLs sent before callback tokens were bound to the call carry `{expiry}.{mac}`:
    they are accepted until their expiry, like before."""
    request = await api.start()
    response = await _post_token(api, request.request_id, first_form_token(request))
    assert response.status_code == 200, response.text
    assert api.recorder.ran("process-refund") == [REFUND]


async def test_a_callback_url_for_a_call_a_redeploy_changed_is_stale(api: Api) -> None:
    """The URL is bound to the call it was sent for: after the agent is defined again
    with a policy (the request is kept, about the call as the new policy sees it), a
    decision through the old URL is refused, and the new URL decides."""
    from clearance import HumanInLoop, Rule

    request = await api.start()
    old_url = api.url(request)
    define_refund_agent(
        api.app,
        api.recorder,
        hitl=HumanInLoop(enabled=True, policy=[Rule.ask("process-refund", id="refunds")]),
    )
    error(await api.client.post(old_url, json={"approved": True}), 409, "stale_decision")
    [kept] = await api.app.pending()
    assert kept.request_id == request.request_id and kept.digest != request.digest
    assert api.recorder.ran("process-refund") == []
    response = await api.client.post(api.url(kept), json={"approved": True})
    assert response.status_code == 200, response.text
    assert api.recorder.ran("process-refund") == [REFUND]


def test_webhook_secrets_rotate_the_first_signs_any_is_accepted() -> None:
    from clearance.callback import check_token

    new = "whsec_" + base64.b64encode(b"the-next-secret-0123456789abcdef").decode()
    request = ApprovalRequest(
        request_id="apr-1",
        execution_id="exec-1",
        agent_tag="a",
        tool="t",
        tool_use_id="tu1",
        parameters={},
        reason="",
        timestamp=datetime(2024, 1, 15, tzinfo=UTC),
        timeout=datetime(2024, 1, 16, tzinfo=UTC),
        timeout_ms=86_400_000,
        digest="sha256:" + "ab" * 32,
    )
    now = datetime(2024, 1, 15, 12, tzinfo=UTC)
    for token in (token_for(SECRET, request), token_for(new, request)):
        admitted = check_token([new, SECRET], "apr-1", token, now)
        assert admitted.digest == request.digest
    with pytest.raises(Exception, match="not valid"):
        check_token([new], "apr-1", token_for(SECRET, request), now)
    app = Clearance(open_store("memory://"), webhook_secret=[new, SECRET])
    assert app.webhook_secret == new and app.webhook_secrets == (new, SECRET)
