"""Reviewers: named deciders with their own keys and grants, how each decision records
who decided and how that is known (`by_kind`), and batch decisions.

Over real HTTP (uvicorn in the test's loop, httpx clients), on a SQLite file. Every
refusal is checked to have changed nothing (`Api.snapshot`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import REFUND
from test_http_api import API_KEY, AUTH, SECRET, Api, conforms, error, hosted

from clearance import Grant, Identity, Refusal, Reviewer
from clearance.core.reviewers import APP, CLAIMED, REVIEWER, BadReviewer
from clearance.reviewer_keys import key_id_of

REFUNDS = Reviewer("rita", [Grant(agents="safe-agent", tools="process-*")])
LOOKUPS = Reviewer("lou", [Grant(agents="*", tools="get-*")])


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with hosted(tmp_path, webhook_secret=SECRET, api_key=API_KEY) as instance:
        yield instance


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def approve(
    api: Api, request_id: str, execution_id: str, headers: Any, **payload: Any
) -> Any:
    return await api.client.post(
        f"/executions/{execution_id}/signal",
        json={"signal": "approve", "payload": {"requestId": request_id, **payload}},
        headers=headers,
    )


async def test_a_reviewers_key_decides_as_that_reviewer(api: Api) -> None:
    assert await api.app.save_reviewer(REFUNDS) is True
    key = await api.app.issue_key("rita")
    request = await api.start()
    response = await approve(api, request.request_id, request.execution_id, bearer(key))
    assert response.status_code == 200, response.text
    body = conforms(response.json(), "SignalResult")
    assert (body["by"], body["byKind"], body["executionStatus"]) == ("rita", REVIEWER, "completed")
    [record] = await api.app.audit(request_id=request.request_id)
    assert (record.by, record.by_kind) == ("rita", REVIEWER)
    assert api.recorder.ran("process-refund") == [REFUND]


async def test_by_comes_from_the_credential_never_from_the_body(api: Api) -> None:
    await api.app.save_reviewer(REFUNDS)
    key = await api.app.issue_key("rita")
    request = await api.start()
    before = await api.snapshot()
    forged = await approve(api, request.request_id, request.execution_id, bearer(key), by="ceo")
    assert "comes from the credential" in error(forged, 422, "invalid_body")
    assert await api.snapshot() == before
    # Naming oneself is allowed (and changes nothing about who is recorded).
    ok = await approve(api, request.request_id, request.execution_id, bearer(key), by="rita")
    assert ok.status_code == 200 and ok.json()["by"] == "rita"


async def test_a_reviewer_decides_only_what_is_granted(api: Api) -> None:
    await api.app.save_reviewer(LOOKUPS)
    key = await api.app.issue_key("lou")
    request = await api.start()
    before = await api.snapshot()
    refused = await approve(api, request.request_id, request.execution_id, bearer(key))
    message = error(refused, 403, "not_granted")
    assert "'lou'" in message and "process-refund" in message
    stop = await api.client.post(
        f"/executions/{request.execution_id}/signal", json={"signal": "stop"}, headers=bearer(key)
    )
    error(stop, 403, "not_granted")  # a stop would cancel a request lou may not decide
    batch = await api.client.post(
        "/approvals/batch",
        json={"requestIds": [request.request_id], "approved": True},
        headers=bearer(key),
    )
    assert batch.status_code == 200
    [line] = conforms(batch.json(), "BatchResult")["results"]
    assert (line["ok"], line["error"]["code"]) == (False, "not_granted")
    assert await api.snapshot() == before
    # The instance API key is admin, granted everything.
    ok = await approve(api, request.request_id, request.execution_id, AUTH)
    assert (ok.status_code, ok.json()["by"]) == (200, "admin")


async def test_revoked_expired_unknown_and_malformed_keys_are_refused(api: Api) -> None:
    await api.app.save_reviewer(REFUNDS)
    revoked = await api.app.issue_key("rita")
    expiring = await api.app.issue_key("rita", expires_at=api.clock.now() + timedelta(hours=1))
    assert await api.app.revoke_key(key_id_of(revoked) or "") is True
    api.clock.advance(minutes=120)
    good = await api.app.issue_key("rita")
    unknown = "clr_" + "a" * 12 + "_" + "b" * 43
    tampered = good[:-1] + ("A" if good[-1] != "A" else "B")
    request = await api.start()
    before = await api.snapshot()
    for key in (revoked, expiring, unknown, tampered):
        response = await approve(api, request.request_id, request.execution_id, bearer(key))
        assert "reviewer key is not valid" in error(response, 403, "forbidden")
    assert await api.snapshot() == before
    assert await api.app.identify(good) == Identity("rita", REVIEWER, REFUNDS)
    await api.app.remove_reviewer("rita")
    assert await api.app.identify(good) is None  # a removed reviewer's keys go with them


async def test_a_trusted_header_counts_only_where_enabled_and_only_for_reviewers(
    tmp_path: Path,
) -> None:
    header = {"X-Forwarded-User": "rita"}
    async with hosted(tmp_path / "off", webhook_secret=SECRET, api_key=API_KEY) as off:
        await off.app.save_reviewer(REFUNDS)
        request = await off.start()
        before = await off.snapshot()
        forged = await approve(off, request.request_id, request.execution_id, header)
        error(forged, 401, "unauthorized")  # not enabled: the header is anyone's to send
        assert await off.snapshot() == before
    async with hosted(
        tmp_path / "on", webhook_secret=SECRET, api_key=API_KEY, trust_header="X-Forwarded-User"
    ) as on:
        await on.app.save_reviewer(REFUNDS)
        request = await on.start()
        before = await on.snapshot()
        stranger = {"X-Forwarded-User": "mallory"}
        refused = await approve(on, request.request_id, request.execution_id, stranger)
        assert "not a reviewer" in error(refused, 403, "forbidden")
        assert await on.snapshot() == before
        ok = await approve(on, request.request_id, request.execution_id, header)
        assert (ok.status_code, ok.json()["by"], ok.json()["byKind"]) == (200, "rita", REVIEWER)


async def test_each_channel_records_how_its_decider_is_known(api: Api) -> None:
    first, second, third = await api.start(), await api.start(), await api.start()
    await api.app.decide(first.request_id, approved=True, by="billing-service")
    callback = await api.respond(second, {"approved": False, "reason": "No", "by": "bob"})
    assert callback.status_code == 200
    await api.app.decide(third.request_id, approved=True, by=Identity("eve", CLAIMED))
    kinds = {r.request_id: (r.by, r.by_kind) for r in await api.app.audit()}
    assert kinds == {
        first.request_id: ("billing-service", APP),  # the embedding code's word
        second.request_id: ("bob", CLAIMED),  # a callback body's word
        third.request_id: ("eve", CLAIMED),
    }
    fourth = await api.start()
    await api.app.decide(fourth.request_id, approved=True)
    [record] = await api.app.audit(request_id=fourth.request_id)
    assert (record.by, record.by_kind) == (None, None)


async def test_a_batch_decides_each_request_on_its_own(api: Api) -> None:
    requests = [await api.start() for _ in range(5)]
    ids = [r.request_id for r in requests]
    await api.app.decide(ids[1], approved=False, reason="No", by="ops")  # decided already
    asked = [*ids, "apr-nope"]
    response = await api.client.post(
        "/approvals/batch", json={"requestIds": asked, "approved": True}, headers=AUTH
    )
    assert response.status_code == 200, response.text
    results = conforms(response.json(), "BatchResult")["results"]
    assert [line["requestId"] for line in results] == asked
    assert [line["ok"] for line in results] == [True, False, True, True, True, False]
    assert results[1]["error"]["code"] == "already_decided"
    assert results[5]["error"]["code"] == "unknown_request"
    assert {line["by"] for line in results if line["ok"]} == {"admin"}

    async def ran() -> bool:
        return len(api.recorder.ran("process-refund")) == 4

    from conftest import wait_for

    await wait_for(ran)
    audit = {r.request_id: r.decision for r in await api.app.audit()}
    assert audit == {**{i: "approved" for i in ids}, ids[1]: "rejected"}


async def test_decide_many_rejects_with_one_reason(api: Api) -> None:
    requests = [await api.start() for _ in range(3)]
    outcomes = await api.app.decide_many(
        [r.request_id for r in requests], approved=False, reason="Batch: over limit", by="ops"
    )
    assert [o.refusal for o in outcomes] == [None, None, None]
    for outcome in outcomes:
        assert outcome.execution is not None
        decided = outcome.execution.request(outcome.request_id)
        assert decided is not None
        assert (decided.status, decided.rejection_reason) == ("rejected", "Batch: over limit")
    assert api.recorder.ran("process-refund") == []


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"approved": True}, "requestIds is a list"),
        ({"requestIds": [], "approved": True}, "requestIds is a list"),
        ({"requestIds": ["a", "a"], "approved": True}, "more than once"),
        ({"requestIds": ["a"]}, "approved is required"),
        ({"requestIds": ["a"], "approved": True, "reason": "x"}, "reason goes with"),
        ({"requestIds": ["a"], "approved": True, "by": "x"}, "by"),
        ({"requestIds": ["a"] * 101, "approved": True}, "requestIds is a list"),
    ],
)
async def test_a_malformed_batch_is_422(api: Api, body: dict[str, Any], says: str) -> None:
    response = await api.client.post("/approvals/batch", json=body, headers=AUTH)
    assert says in error(response, 422, "invalid_body")


def test_reviewer_names_grants_and_actions_are_checked() -> None:
    for name in ("", "has space", "-dash", "x" * 65):
        with pytest.raises(BadReviewer, match="reviewer name"):
            Reviewer(name)
    with pytest.raises(BadReviewer, match="actions"):
        Grant(agents="*", tools="*", actions={"delete"})
    with pytest.raises(BadReviewer, match="at least one"):
        Grant(agents=" , ", tools="*")
    grant = Grant(agents="support-*,billing", tools="process-refund,*-account")
    assert grant.allows("support-eu", "close-account")
    assert grant.allows("billing", "process-refund")
    assert not grant.allows("billing-2", "process-refund")  # globs match whole names
    assert not grant.allows("billing", "process-refund", "extend")


async def test_a_reviewer_identity_passed_in_python_is_held_to_its_grants(api: Api) -> None:
    request = await api.start()
    who = Identity("lou", REVIEWER, LOOKUPS)
    with pytest.raises(Refusal) as refused:
        await api.app.decide(request.request_id, approved=True, by=who)
    assert refused.value.code == "not_granted"


# -- delegation ---------------------------------------------------------------------------


async def test_a_delegate_decides_with_the_delegators_grants_until_it_ends(api: Api) -> None:
    await api.app.save_reviewer(REFUNDS)
    await api.app.save_reviewer(LOOKUPS)
    key = await api.app.issue_key("lou")
    first, second, third = [await api.start() for _ in range(3)]
    before = await api.snapshot()
    refused = await approve(api, first.request_id, first.execution_id, bearer(key))
    assert "'lou'" in error(refused, 403, "not_granted")
    assert await api.snapshot() == before

    # Rita is on holiday: Lou decides her refunds for a day, audited as on her behalf.
    await api.app.delegate("rita", to="lou", until=api.clock.now() + timedelta(days=1))
    ok = await approve(api, first.request_id, first.execution_id, bearer(key))
    assert ok.status_code == 200, ok.text
    [record] = await api.app.audit(request_id=first.request_id)
    assert (record.by, record.by_kind, record.on_behalf_of) == ("lou", REVIEWER, "rita")
    lou = await api.app.reviewer_identity("lou")
    assert lou is not None
    await api.app.decide(second.request_id, approved=False, reason="no", by=lou)
    [record] = await api.app.audit(request_id=second.request_id)
    assert (record.decision, record.on_behalf_of) == ("rejected", "rita")
    # Her own grants are untouched; saving her again keeps the delegation.
    await api.app.save_reviewer(REFUNDS)
    assert [d.to for d in (await api.app.store.reviewer("rita")).delegations] == ["lou"]  # type: ignore[union-attr]

    api.clock.advance(minutes=25 * 60)
    before = await api.snapshot()
    late = await approve(api, third.request_id, third.execution_id, bearer(key))
    assert "'lou'" in error(late, 403, "not_granted")
    assert await api.snapshot() == before
    verdict = await api.app.verify_audit()
    assert verdict.intact and verdict.records == 2


async def test_delegation_is_between_registered_reviewers_and_can_be_ended(api: Api) -> None:
    from clearance import ClearanceError
    from clearance.ports.store import UnknownReviewer

    await api.app.save_reviewer(REFUNDS)
    soon = api.clock.now() + timedelta(hours=1)
    with pytest.raises(UnknownReviewer, match="'nobody'"):
        await api.app.delegate("rita", to="nobody", until=soon)
    with pytest.raises(ClearanceError, match="themselves"):
        await api.app.delegate("rita", to="rita", until=soon)
    # The one reading of a point in time, as for `extend`: a naive time is refused.
    for naive in (soon.replace(tzinfo=None), soon.isoformat()[:19]):
        with pytest.raises(ClearanceError, match=r"^until= .*(no offset|offset)"):
            await api.app.delegate("rita", to="lou", until=naive)
    await api.app.save_reviewer(LOOKUPS)
    await api.app.delegate("rita", to="lou", until=soon.isoformat())  # text with its offset
    lou = await api.app.reviewer_identity("lou")
    assert lou is not None and lou.acting_for("safe-agent", "process-refund") == "rita"
    assert lou.acting_for("safe-agent", "get-order") is None  # her own grant covers it
    await api.app.delegate("rita", to="lou", until=api.clock.now())  # ended now
    lou = await api.app.reviewer_identity("lou")
    assert lou is not None and not lou.may("safe-agent", "process-refund")


def test_only_a_reviewer_acts_on_someones_behalf() -> None:
    from test_state_table import two_refunds

    from clearance.core.decide import decide
    from clearance.core.events import Approved, Rejected

    life = two_refunds()
    at = life.at + timedelta(seconds=1)
    for event in (
        Approved("apr-1", at, "ops", by_kind=APP, on_behalf_of="rita"),
        Rejected("apr-1", at, "ops", "no", by_kind=CLAIMED, on_behalf_of="rita"),
    ):
        with pytest.raises(Refusal) as caught:
            decide(life.ex, event)
        assert caught.value.code == "invalid_event" and "only a reviewer" in str(caught.value)
    _, commands = decide(
        life.ex, Approved("apr-1", at, "lou", by_kind=REVIEWER, on_behalf_of="rita")
    )
    [record] = [c.record for c in commands if hasattr(c, "record")]
    assert (record.by, record.on_behalf_of) == ("lou", "rita")
