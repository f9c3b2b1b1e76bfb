"""The reviewers' inbox page (`/inbox`): a real Chromium (Debian's, driven by Playwright)
against uvicorn in the test's own event loop, and, for sessions, CSRF and headers,
plain httpx.

The browser tests need `pip install playwright` (the package only: the browser is the
system's /usr/bin/chromium, `apt-get install chromium`); without either they skip,
or fail where CLEARANCE_REQUIRE_SERVICES=1. With CLEARANCE_SCREENSHOTS=DIR set,
`test_screenshots` saves the list and detail views there (docs/inbox.png and
docs/inbox-detail.png come from `CLEARANCE_SCREENSHOTS=docs pytest tests/test_inbox.py`).

Every refusal is checked to have changed nothing (`Api.snapshot`, plus the desk's
own tool calls).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import attrs
import httpx
import pytest
from conftest import REFUND, REFUND_PARAMS, define_refund_agent, wait_for
from test_http_api import API_KEY, AUTH, SECRET, Api, hosted

from clearance import Grant, HumanInLoop, Reviewer, Rule, Tool, ToolContext
from clearance.core.events import Approved
from clearance.http_api import build_asgi
from clearance.inbox import CSP
from clearance.page_session import csrf_token, header_secret
from clearance.testing import FakeClock, ScriptedModel, text, tool_use

try:
    from playwright.async_api import Browser, Locator, Page, async_playwright, expect
except ImportError:  # skipped (or failed, in CI) by the `browser` fixture
    async_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HAVE_CHROMIUM = CHROMIUM.exists()
WAIT_MS = 10_000  # the page polls every 2 s

REFUNDS = Reviewer("rita", [Grant(agents="*", tools="process-*,issue-*,close-*,run-*")])
LOOKUPS = Reviewer("lou", [Grant(agents="*", tools="get-*")])
ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "clearance" / "inbox_static"


def _unavailable(why: str) -> NoReturn:
    if os.environ.get("CLEARANCE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"CLEARANCE_REQUIRE_SERVICES=1 but {why}")
    pytest.skip(why)


# -- a second agent: tools whose schemas the form shows, checks, or cannot show ------------

CREDIT_SCHEMA = {
    "type": "object",
    "properties": {
        "customerId": {"type": "string"},
        "amount": {"type": "number", "maximum": 500, "description": "USD, at most 500"},
        "currency": {"enum": ["USD", "EUR"]},
    },
    "required": ["customerId", "amount"],
    "additionalProperties": False,
}
QUERY_SCHEMA = {  # anyOf at the top: beyond the form, edited as JSON
    "type": "object",
    "properties": {"sql": {"type": "string"}, "savedQuery": {"type": "string"}},
    "anyOf": [{"required": ["sql"]}, {"required": ["savedQuery"]}],
    "additionalProperties": False,
}


@attrs.define
class Desk:
    """Agent `support-desk`: each run asks for the tool call its input was registered
    with (`ask`), saying so in the model's words."""

    calls: list[tuple[str, dict[str, Any]]] = attrs.Factory(list)
    asks: dict[str, tuple[str, dict[str, Any], str]] = attrs.Factory(dict)

    def define(self, api: Api) -> None:
        def script(request: Any) -> list[dict[str, Any]]:
            if any(m["role"] == "assistant" for m in request.messages):
                return [text("Done.")]
            tool, params, say = self.asks[request.messages[0]["content"]]
            return [text(say), tool_use(tool, params)]

        async def handler(ctx: ToolContext, params: dict[str, Any]) -> dict[str, Any]:
            self.calls.append((ctx.tool, params))
            return {"ok": True}

        def gated(tag: str, parameters: dict[str, Any], minutes: float, why: str) -> Tool:
            return Tool(
                tag=tag,
                description=why,
                parameters=parameters,
                handler=handler,
                requires_confirmation=True,
                approval_timeout=int(minutes * 60_000),
                confirmation_message=why,
            )

        api.app.define(
            tag="support-desk",
            model=ScriptedModel(script),
            tools=[
                gated("issue-credit", CREDIT_SCHEMA, 2, "Credits move money to a customer"),
                gated(
                    "close-account",
                    {
                        "accountId": {"type": "string", "required": True},
                        "notify": {"type": "boolean"},
                        "tier": {"type": "string", "enum": ["free", "pro", "enterprise"]},
                    },
                    60,
                    "Closing an account cannot be undone",
                ),
                gated("run-query", QUERY_SCHEMA, 30, "Queries read customer data"),
            ],
            human_in_loop=HumanInLoop(enabled=True),
        )

    async def ask(
        self, api: Api, tool: str, params: dict[str, Any], input: str = "", say: str = ""
    ) -> Any:
        input = input or f"Ticket {len(self.asks) + 1}: {tool}"
        self.asks[input] = (tool, params, say or f"I will call {tool}.")
        ex = await api.app.run("support-desk", input=input)
        api.executions.append(ex.id)
        [request] = ex.pending_approvals
        return request


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with hosted(tmp_path, webhook_secret=SECRET, api_key=API_KEY) as instance:
        await instance.app.save_reviewer(REFUNDS)
        await instance.app.save_reviewer(LOOKUPS)
        yield instance


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if async_playwright is None:
        _unavailable("playwright is not installed (pip install playwright)")
    if not HAVE_CHROMIUM:
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    expect.set_options(timeout=WAIT_MS)
    async with async_playwright() as driver:
        launched = await driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@attrs.define
class Inbox:
    api: Api
    page: Page
    problems: list[str]

    async def open(self, key: str | None = None) -> None:
        await self.page.goto(f"{self.api.base}/inbox")
        if key is not None:
            await expect(self.page.locator("#sign-in")).to_be_visible()
            await self.page.fill("#key", key)
            await self.page.click("#sign-in-form button[type=submit]")
            await expect(self.page.locator("#inbox")).to_be_visible()

    def row(self, request_id: str) -> Locator:
        return self.page.locator(f'#list li[data-id="{request_id}"]')

    async def show(self, request_id: str) -> Locator:
        await self.row(request_id).click()
        detail = self.page.locator("#detail")
        await expect(detail.locator(".ids")).to_contain_text(request_id)
        return detail


async def _inbox(api: Api, browser: Browser, **context: Any) -> AsyncIterator[Inbox]:
    ctx = await browser.new_context(viewport={"width": 1280, "height": 800}, **context)
    page = await ctx.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda err: problems.append(f"page error: {err}"))

    def console(message: Any) -> None:
        # A refused request is logged by Chromium as "Failed to load resource"; that is
        # the page working. A script error or a CSP violation is not.
        if message.type == "error" and "Failed to load resource" not in message.text:
            problems.append(f"console: {message.text}")

    page.on("console", console)
    try:
        yield Inbox(api, page, problems)
        assert problems == [], problems  # no script errors, no CSP violations
    finally:
        await ctx.close()


@pytest.fixture
async def inbox(api: Api, browser: Browser) -> AsyncIterator[Inbox]:
    async for instance in _inbox(api, browser):
        yield instance


async def desk_calls(desk: Desk, tool: str, count: int) -> list[dict[str, Any]]:
    await wait_for(lambda: len([c for c in desk.calls if c[0] == tool]) >= count, 10)
    return [params for name, params in desk.calls if name == tool]


# -- in the browser ----------------------------------------------------------------------------


async def test_sign_in_then_approve_with_a_changed_amount(inbox: Inbox) -> None:
    api, page = inbox.api, inbox.page
    await inbox.open()
    await expect(page.locator("#sign-in")).to_be_visible()
    await page.fill("#key", "clr_" + "a" * 12 + "_" + "b" * 43)
    await page.click("#sign-in-form button[type=submit]")
    await expect(page.locator("#sign-in-error")).to_contain_text("reviewer key is not valid")
    assert await page.context.cookies() == []
    await page.fill("#key", await api.app.issue_key("rita"))
    await page.click("#sign-in-form button[type=submit]")
    await expect(page.locator("#who-name")).to_contain_text("rita")
    [cookie] = await page.context.cookies()
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"], cookie["secure"]) == (
        True,
        "Strict",
        "/",
        False,  # plain http here; Secure over https (test_the_cookie_is_secure_over_https)
    )
    await expect(page.locator("#empty")).to_be_visible()

    request = await api.start()  # the agent pauses: the open page shows it
    await expect(inbox.row(request.request_id)).to_contain_text("process-refund")
    detail = await inbox.show(request.request_id)
    await expect(detail.locator(".reason-text")).to_have_text(request.reason)
    await expect(detail.locator("table.params")).to_contain_text("ORD-123")
    await expect(detail.locator(".detail-head .countdown")).to_have_text(
        re.compile(r"^4:\d\d left$")
    )
    await expect(page.locator("#approve-changes")).to_be_disabled()

    # The page checks types before sending anything.
    before = await api.snapshot()
    await page.fill("#field-amount", "fifty")
    await expect(page.locator("#approve")).to_be_disabled()  # changed: approve with changes
    await page.click("#approve-changes")
    await expect(detail.locator('[data-error-for="amount"]')).to_have_text("must be a number")
    assert await api.snapshot() == before

    await page.fill("#field-amount", "25")
    await page.click("#approve-changes")
    outcome = detail.locator("#outcome")
    await expect(outcome).to_contain_text("Approved by rita (reviewer)")
    await expect(outcome).to_contain_text("amount: 25")
    await expect(inbox.row(request.request_id)).to_have_count(0)
    await expect(detail.locator("#approve")).to_have_count(0)
    await expect(detail.locator('#history li[data-type="approved"]')).to_contain_text(
        "by rita (reviewer), changed amount: 25"
    )
    assert api.recorder.ran("process-refund") == [{**REFUND, "amount": 25}]
    # The page sent the digest of the call it showed: the decision is bound to it.
    history = await api.app.get_execution(request.execution_id)
    [approved] = [e for e in history.events if isinstance(e, Approved)]
    assert approved.digest == request.digest and request.digest
    [record] = await api.app.audit(request_id=request.request_id)
    assert (record.decision, record.by, record.by_kind, record.modified_params) == (
        "approved_modified",
        "rita",
        "reviewer",
        {"amount": 25},
    )


async def test_reject_with_a_reason_from_the_keyboard(inbox: Inbox) -> None:
    api, page = inbox.api, inbox.page
    request = await api.start()
    await inbox.open(API_KEY)  # the instance key: reviewer admin
    await expect(page.locator("#who-name")).to_contain_text("admin")
    await expect(inbox.row(request.request_id)).to_be_visible()
    await page.keyboard.press("j")
    detail = page.locator("#detail")
    await expect(detail.locator(".ids")).to_contain_text(request.request_id)
    await expect(page.locator("#reject")).to_be_enabled()
    await page.keyboard.press("r")
    await expect(page.locator("#reject-reason")).to_be_focused()
    before = await api.snapshot()
    await page.keyboard.press("Enter")  # no reason yet: the page asks for one
    await expect(page.locator("#detail-error")).to_contain_text("Say why")
    assert await api.snapshot() == before
    await page.keyboard.type("Too expensive")
    await page.keyboard.press("Enter")
    outcome = detail.locator("#outcome")
    await expect(outcome).to_contain_text("Rejected by admin (reviewer)")
    await expect(outcome).to_contain_text("Reason: Too expensive")
    await expect(inbox.row(request.request_id)).to_have_count(0)
    assert api.recorder.ran("process-refund") == []
    [record] = await api.app.audit(request_id=request.request_id)
    assert (record.decision, record.reason, record.by) == ("rejected", "Too expensive", "admin")


async def test_a_batch_of_five_approved_at_once(inbox: Inbox) -> None:
    api, page = inbox.api, inbox.page
    requests = [await api.start() for _ in range(5)]
    await inbox.open(await api.app.issue_key("rita"))
    await expect(page.locator("#list li")).to_have_count(5)
    await page.keyboard.press("j")
    await page.keyboard.press("x")  # x ticks the one shown ...
    await expect(page.locator("#list li.picked")).to_have_count(1)
    await page.keyboard.press("x")  # ... and unticks it
    await expect(page.locator("#list li.picked")).to_have_count(0)
    await expect(page.locator("#batch-approve")).to_be_disabled()
    await page.check("#select-all")
    await expect(page.locator("#list li.picked")).to_have_count(5)
    await page.click("#batch-approve")
    results = page.locator("#batch-results li.ok")
    await expect(results).to_have_count(5)
    await expect(results.first).to_contain_text("approved by rita")
    await expect(page.locator("#list li")).to_have_count(0)

    async def ran() -> bool:
        return len(api.recorder.ran("process-refund")) == 5

    await wait_for(ran, 10)
    audit = {(r.request_id, r.decision, r.by) for r in await api.app.audit()}
    assert audit == {(r.request_id, "approved", "rita") for r in requests}


async def test_requests_decided_elsewhere_leave_the_open_page(inbox: Inbox) -> None:
    api, page = inbox.api, inbox.page
    first, second, third = await api.start(), await api.start(), await api.start()
    await inbox.open(await api.app.issue_key("rita"))
    await expect(page.locator("#list li")).to_have_count(3)
    detail = await inbox.show(first.request_id)
    await expect(page.locator("#approve")).to_be_visible()
    # In Python (as the embedding app), and over the API with the instance key.
    await api.app.decide(first.request_id, approved=False, reason="Duplicate", by="billing")
    batch = await api.client.post(
        "/approvals/batch", json={"requestIds": [second.request_id], "approved": True}, headers=AUTH
    )
    assert batch.status_code == 200 and batch.json()["results"][0]["ok"]
    await expect(inbox.row(first.request_id)).to_have_count(0)
    await expect(inbox.row(second.request_id)).to_have_count(0)
    await expect(inbox.row(third.request_id)).to_be_visible()
    # The one shown now says who decided it, and why, instead of offering buttons.
    await expect(detail.locator("#outcome")).to_contain_text("Rejected by billing (app)")
    await expect(detail.locator("#outcome")).to_contain_text("Reason: Duplicate")
    await expect(detail.locator("#approve")).to_have_count(0)
    await page.keyboard.press("j")  # on to the next one still waiting
    await expect(detail.locator(".ids")).to_contain_text(third.request_id)


async def test_a_request_decided_by_the_cli_leaves_the_open_page(
    tmp_path: Path, browser: Browser
) -> None:
    """`clearance reject` in another process, on the same file: the open page drops the
    request. (The CLI runs on the real clock: so does this instance's, from now.)"""
    clock = FakeClock(datetime.now(UTC))
    async with hosted(tmp_path, clock, webhook_secret=SECRET, api_key=API_KEY) as api:
        await api.app.save_reviewer(REFUNDS)
        async for inbox in _inbox(api, browser):
            request, other = await api.start(), await api.start()
            await inbox.open(await api.app.issue_key("rita"))
            await expect(inbox.row(request.request_id)).to_be_visible()
            cli = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "clearance", "reject", request.request_id),
                *("--reason", "Not ours", "--by", "sam", "--db", "approvals.db"),
                cwd=str(tmp_path),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await cli.communicate()
            assert cli.returncode == 0, err.decode()
            await expect(inbox.row(request.request_id)).to_have_count(0)
            await expect(inbox.row(other.request_id)).to_be_visible()
            [record] = await api.app.audit(request_id=request.request_id)
            assert (record.decision, record.by, record.by_kind) == ("rejected", "sam", "claimed")


async def test_an_expired_request_shows_as_timed_out(inbox: Inbox) -> None:
    api = inbox.api
    request = await api.start()
    await inbox.open(await api.app.issue_key("rita"))
    detail = await inbox.show(request.request_id)
    await expect(detail.locator("#status")).to_have_text("pending")
    api.clock.advance(minutes=5)
    assert await api.app.fire_due_timers() == 1
    await expect(inbox.row(request.request_id)).to_have_count(0)
    await expect(detail.locator("#status")).to_have_text("timed out")
    await expect(detail.locator("#outcome")).to_contain_text("Timed out: nobody decided before")
    await expect(detail.locator("#approve")).to_have_count(0)
    await expect(detail.locator('#history li[data-type="timer_fired"]')).to_be_visible()
    assert api.recorder.calls == []


async def test_a_reviewer_without_the_grant_is_shown_the_refusal(inbox: Inbox) -> None:
    api, page = inbox.api, inbox.page
    request = await api.start()
    await inbox.open(await api.app.issue_key("lou"))
    detail = await inbox.show(request.request_id)
    before = await api.snapshot()
    await page.click("#approve")
    error = page.locator("#detail-error")
    await expect(error).to_contain_text("not_granted")
    await expect(error).to_contain_text("'lou'")
    await page.check(f'#list li[data-id="{request.request_id}"] input.pick')
    await page.click("#batch-approve")
    await expect(page.locator("#batch-results li.refused")).to_contain_text("not_granted")
    assert await api.snapshot() == before
    await expect(inbox.row(request.request_id)).to_be_visible()
    await expect(detail.locator("#status")).to_have_text("pending")
    assert await page.locator("#outcome").count() == 0


async def test_the_schema_form_the_servers_problems_and_the_json_editor(inbox: Inbox) -> None:
    api, page = inbox.api, inbox.page
    desk = Desk()
    desk.define(api)
    refund = await api.start()  # 5 minutes
    account = await desk.ask(api, "close-account", {"accountId": "acc-9", "notify": True})  # 60
    credit = await desk.ask(api, "issue-credit", {"customerId": "cus-1", "amount": 120})  # 2
    query = await desk.ask(api, "run-query", {"sql": "select * from orders"})  # 30
    await inbox.open(await api.app.issue_key("rita"))
    soonest_first = [credit, refund, query, account]
    rows = page.locator("#list li")
    await expect(rows).to_have_count(4)
    assert await rows.evaluate_all("(rows) => rows.map((r) => r.dataset.id)") == [
        r.request_id for r in soonest_first
    ]
    await page.select_option("#filter-agent", "support-desk")
    await expect(rows).to_have_count(3)
    await page.select_option("#filter-tool", "close-account")
    await expect(rows).to_have_count(1)
    await page.select_option("#filter-tool", "")
    await page.select_option("#filter-agent", "")
    await expect(rows).to_have_count(4)

    # The form from the schema: an enum is a choice, a boolean true/false, required marked.
    detail = await inbox.show(account.request_id)
    assert await detail.locator("#field-tier option").all_inner_texts() == [
        "(not set)",
        "free",
        "pro",
        "enterprise",
    ]
    await expect(detail.locator("label[for=field-accountId] .required")).to_be_visible()
    await page.select_option("#field-notify", "false")
    await page.select_option("#field-tier", "pro")
    await page.keyboard.press("Escape")
    await page.keyboard.press("a")  # with changes: approves them
    await expect(detail.locator("#outcome")).to_contain_text(
        "With changes: notify: false · tier: pro"
    )
    assert await desk_calls(desk, "close-account", 1) == [
        {"accountId": "acc-9", "notify": False, "tier": "pro"}
    ]

    # What only the server checks (here `maximum`) comes back next to its field.
    detail = await inbox.show(credit.request_id)
    before = (await api.snapshot(), list(desk.calls))
    await page.fill("#field-amount", "900")
    await page.click("#approve-changes")
    await expect(detail.locator('[data-error-for="amount"]')).to_contain_text(
        "900 is greater than the maximum of 500"
    )
    await expect(page.locator("#detail-error")).to_contain_text("422 invalid_parameters")
    assert (await api.snapshot(), list(desk.calls)) == before
    await page.fill("#field-amount", "300")
    await page.click("#approve-changes")
    await expect(detail.locator("#outcome")).to_contain_text("Approved by rita (reviewer)")
    assert await desk_calls(desk, "issue-credit", 1) == [{"customerId": "cus-1", "amount": 300}]

    # A schema beyond the form: the parameters as JSON.
    detail = await inbox.show(query.request_id)
    raw = detail.locator("#field-raw")
    await expect(raw).to_be_visible()
    await raw.fill('{"sql": "select id from orders"}')
    await page.click("#approve-changes")
    await expect(detail.locator("#outcome")).to_contain_text("sql: select id from orders")
    assert await desk_calls(desk, "run-query", 1) == [{"sql": "select id from orders"}]


async def test_behind_a_trusted_proxy_the_page_needs_no_sign_in(
    tmp_path: Path, browser: Browser
) -> None:
    async with hosted(
        tmp_path, webhook_secret=SECRET, api_key=API_KEY, trust_header="X-Forwarded-User"
    ) as api:
        await api.app.save_reviewer(REFUNDS)
        request = await api.start()
        proxy = {"extra_http_headers": {"X-Forwarded-User": "rita"}}  # what the proxy adds
        async for inbox in _inbox(api, browser, **proxy):
            await inbox.open()
            await expect(inbox.page.locator("#who-name")).to_contain_text("signed in by your proxy")
            await expect(inbox.page.locator("#sign-out")).to_be_hidden()
            await inbox.show(request.request_id)
            await inbox.page.click("#approve")  # a browser request: it carries the CSRF token
            await expect(inbox.page.locator("#outcome")).to_contain_text(
                "Approved by rita (reviewer)"
            )
        assert api.recorder.ran("process-refund") == [REFUND]


@pytest.fixture
def screenshots() -> Path:
    where = os.environ.get("CLEARANCE_SCREENSHOTS")
    if not where:
        pytest.skip("set CLEARANCE_SCREENSHOTS=DIR to save the inbox's screenshots there")
    out = Path(where)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_screenshots(inbox: Inbox, screenshots: Path) -> None:
    """The list and the detail view, saved where CLEARANCE_SCREENSHOTS names (for the docs)."""
    api, page = inbox.api, inbox.page
    desk = Desk()
    desk.define(api)
    await api.start()
    credit = await desk.ask(
        api,
        "issue-credit",
        {"customerId": "cus-4821", "amount": 180, "currency": "USD"},
        "Customer cus-4821 says they were charged twice for March.",
        "They were double-charged $180 in March; I will credit it back.",
    )
    await desk.ask(api, "close-account", {"accountId": "acc-1193", "notify": True, "tier": "pro"})
    query = await desk.ask(
        api, "run-query", {"sql": "select email from customers where plan = 'pro'"}
    )
    await api.start()
    await desk.ask(api, "issue-credit", {"customerId": "cus-0097", "amount": 45})
    await inbox.open(await api.app.issue_key("rita"))
    await expect(page.locator("#list li")).to_have_count(6)
    for picked in (credit, query):
        await page.check(f'#list li[data-id="{picked.request_id}"] input.pick')
    await page.screenshot(path=str(screenshots / "inbox.png"))
    detail = await inbox.show(credit.request_id)
    await page.fill("#field-amount", "150")
    await expect(detail.locator("#approve-changes")).to_be_enabled()
    await page.screenshot(path=str(screenshots / "inbox-detail.png"), full_page=True)
    assert _png(screenshots / "inbox.png") and _png(screenshots / "inbox-detail.png")


# -- sessions, CSRF and headers, over plain HTTP ------------------------------------------------


async def _signal(api: Api, request: Any, headers: dict[str, str], **payload: Any) -> Any:
    return await api.client.post(
        f"/executions/{request.execution_id}/signal",
        json={"signal": "approve", "payload": {"requestId": request.request_id, **payload}},
        headers=headers,
    )


async def test_a_cookie_session_needs_its_csrf_token_to_change_anything(api: Api) -> None:
    key = await api.app.issue_key("rita")
    request = await api.start()
    refused = await api.client.post("/inbox/api/session", json={"key": key + "x"})
    assert refused.status_code == 403 and "set-cookie" not in refused.headers
    signed = await api.client.post("/inbox/api/session", json={"key": key})
    assert signed.status_code == 200, signed.text
    cookie = signed.headers["set-cookie"]
    assert cookie.startswith(f"clearance_session={key};")
    assert {"httponly", "samesite=strict", "path=/"} <= {
        part.strip().lower() for part in cookie.split(";")
    }
    assert "secure" not in cookie.lower()  # plain http
    session = signed.json()
    assert (session["name"], session["byKind"], session["via"]) == ("rita", "reviewer", "cookie")
    assert session["csrfToken"] == csrf_token(key)
    assert session["now"] == "2024-01-15T10:30:00Z"  # the server's clock, for the countdown
    # Reads need no token.
    listed = await api.client.get("/approvals")
    assert listed.status_code == 200 and len(listed.json()["approvals"]) == 1

    before = await api.snapshot()
    wrong = {
        "no token": {},
        "a wrong token": {"X-CSRF-Token": "0" * 64},
        "another key's token": {"X-CSRF-Token": csrf_token(API_KEY)},
        "cross-site": {"X-CSRF-Token": csrf_token(key), "Sec-Fetch-Site": "cross-site"},
    }
    for case, headers in wrong.items():
        response = await _signal(api, request, headers)
        assert (response.status_code, response.json()["error"]["code"]) == (403, "csrf"), case
        batch = await api.client.post(
            "/approvals/batch",
            json={"requestIds": [request.request_id], "approved": True},
            headers=headers,
        )
        assert (batch.status_code, batch.json()["error"]["code"]) == (403, "csrf"), case
    assert await api.snapshot() == before

    ok = await _signal(api, request, {"X-CSRF-Token": session["csrfToken"]})
    assert (ok.status_code, ok.json()["by"], ok.json()["byKind"]) == (200, "rita", "reviewer")
    assert ok.headers["cache-control"] == "no-store"

    # Signing out clears the cookie; the page's reads are then refused.
    out = await api.client.delete("/inbox/api/session")
    assert out.status_code == 200 and "max-age=0" in out.headers["set-cookie"].lower()
    assert "clearance_session" not in api.client.cookies
    assert (await api.client.get("/inbox/api/session")).status_code == 401
    # A revoked key's cookie is worth nothing.
    await api.client.post("/inbox/api/session", json={"key": key})
    assert (await api.client.get("/approvals")).status_code == 200
    from clearance.reviewer_keys import key_id_of

    await api.app.revoke_key(key_id_of(key) or "")
    assert (await api.client.get("/approvals")).status_code == 403


async def test_a_bearer_key_needs_no_token_even_beside_a_cookie(api: Api) -> None:
    request = await api.start()
    await api.client.post("/inbox/api/session", json={"key": await api.app.issue_key("lou")})
    response = await _signal(api, request, AUTH)  # bearer first: the cookie does not count
    assert (response.status_code, response.json()["by"]) == (200, "admin")


async def test_the_api_key_signs_in_too_whatever_it_is_spelt_with(tmp_path: Path) -> None:
    odd = 'k3y; with spaces,="quotes"\\'
    async with hosted(tmp_path, webhook_secret=SECRET, api_key=odd) as api:
        signed = await api.client.post("/inbox/api/session", json={"key": odd})
        assert signed.status_code == 200 and signed.json()["name"] == "admin"
        assert (await api.client.get("/inbox/api/session")).json()["csrfToken"] == csrf_token(odd)


async def test_the_cookie_is_secure_over_https(api: Api) -> None:
    transport = httpx.ASGITransport(app=build_asgi(api.app))
    async with httpx.AsyncClient(transport=transport, base_url="https://inbox.test") as client:
        key = await api.app.issue_key("rita")
        signed = await client.post("/inbox/api/session", json={"key": key})
    assert signed.status_code == 200
    assert "secure" in {p.strip().lower() for p in signed.headers["set-cookie"].split(";")}


async def test_the_cookie_goes_only_to_the_api_where_it_is_mounted(api: Api) -> None:
    """Mounted in someone's app under /clearance, the key's cookie is scoped there: the
    app around it never receives it."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    outer = Starlette(routes=[Mount("/clearance", app=build_asgi(api.app))])
    transport = httpx.ASGITransport(app=outer)
    async with httpx.AsyncClient(transport=transport, base_url="http://host.test") as client:
        key = await api.app.issue_key("rita")
        signed = await client.post("/clearance/inbox/api/session", json={"key": key})
        assert signed.status_code == 200, signed.text
        parts = {p.strip().lower() for p in signed.headers["set-cookie"].split(";")}
        assert "path=/clearance/" in parts, parts
        listed = await client.get("/clearance/approvals")  # the cookie signs this in
        assert listed.status_code == 200, listed.text


async def test_a_trusted_header_counts_only_where_enabled(tmp_path: Path) -> None:
    forged = {"X-Forwarded-User": "rita"}
    async with hosted(tmp_path / "off", webhook_secret=SECRET, api_key=API_KEY) as off:
        await off.app.save_reviewer(REFUNDS)
        await off.app.save_reviewer(LOOKUPS)
        request = await off.start()
        before = await off.snapshot()
        assert (await off.client.get("/inbox/api/session", headers=forged)).status_code == 401
        assert (await _signal(off, request, forged)).status_code == 401
        # With lou's cookie, the header makes nobody rita: lou is not granted refunds.
        session = await off.client.post(
            "/inbox/api/session", json={"key": await off.app.issue_key("lou")}
        )
        who = await off.client.get("/inbox/api/session", headers=forged)
        assert who.json()["name"] == "lou"
        token = {"X-CSRF-Token": session.json()["csrfToken"]}
        refused = await _signal(off, request, {**forged, **token})
        assert (refused.status_code, refused.json()["error"]["code"]) == (403, "not_granted")
        assert await off.snapshot() == before

    async with hosted(
        tmp_path / "on", webhook_secret=SECRET, api_key=API_KEY, trust_header="X-Forwarded-User"
    ) as on:
        await on.app.save_reviewer(REFUNDS)
        request = await on.start()
        before = await on.snapshot()
        session = (await on.client.get("/inbox/api/session", headers=forged)).json()
        assert (session["name"], session["via"]) == ("rita", "header")
        assert session["csrfToken"] == csrf_token(header_secret("rita"))
        browser = {**forged, "Origin": on.base, "Sec-Fetch-Site": "same-origin"}
        stranger = await on.client.get("/inbox/api/session", headers={"X-Forwarded-User": "eve"})
        assert stranger.status_code == 403
        over = await on.client.post("/inbox/api/session", json={"key": API_KEY}, headers=forged)
        assert (over.status_code, over.json()["error"]["code"]) == (409, "signed_in_by_proxy")
        assert "set-cookie" not in over.headers
        # From a browser: the token, and no request another site made it send.
        for headers in (
            browser,
            {**browser, "X-CSRF-Token": "0" * 64},
            {**browser, "X-CSRF-Token": session["csrfToken"], "Sec-Fetch-Site": "cross-site"},
            {**forged, "Origin": "https://evil.example", "X-CSRF-Token": "nope"},
        ):
            response = await _signal(on, request, headers)
            assert (response.status_code, response.json()["error"]["code"]) == (403, "csrf")
        assert await on.snapshot() == before
        ok = await _signal(on, request, {**browser, "X-CSRF-Token": session["csrfToken"]})
        assert (ok.status_code, ok.json()["by"]) == (200, "rita")
        # An API client behind the proxy (no Origin, no Sec-Fetch-*) needs no token.
        second = await on.start()
        assert (await _signal(on, second, forged)).status_code == 200


async def test_the_page_and_answers_carry_the_security_headers(api: Api) -> None:
    redirect = await api.client.get("/inbox")
    assert redirect.status_code in (307, 308) and redirect.headers["location"].endswith("/inbox/")
    page = await api.client.get("/inbox/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for answer in (page, await api.client.get("/approvals", headers=AUTH)):
        assert answer.headers["content-security-policy"] == CSP
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert answer.headers["cache-control"] == "no-store"
    script = await api.client.get("/inbox/static/inbox.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert script.headers["x-content-type-options"] == "nosniff"
    for missing in ("/inbox/static/index.html", "/inbox/static/..%2Fapp.py", "/inbox/nope"):
        assert (await api.client.get(missing)).status_code == 404, missing
    tools = await api.client.get("/inbox/api/executions/exec-1/tools/process-refund")
    assert tools.status_code == 401  # the schema is for reviewers only
    request = await api.start()
    schema = await api.client.get(
        f"/inbox/api/executions/{request.execution_id}/tools/process-refund", headers=AUTH
    )
    assert schema.json()["inputSchema"]["required"] == [
        name for name, field in REFUND_PARAMS.items() if field.get("required")
    ]
    unknown = await api.client.get(
        f"/inbox/api/executions/{request.execution_id}/tools/nope", headers=AUTH
    )
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "unknown_tool")


def test_the_page_has_no_inline_script_or_style_and_never_parses_html() -> None:
    html = (STATIC / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="static/inbox.js" defer>']
    assert not re.search(r"\son\w+\s*=|\sstyle\s*=|<style\b|javascript:", html, re.IGNORECASE)
    script = (STATIC / "inbox.js").read_text()
    for unsafe in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert unsafe not in script, unsafe


async def test_the_policy_rule_that_asked_is_shown(inbox: Inbox) -> None:
    api = inbox.api
    rule = Rule.ask(
        "process-refund",
        when="args.amount > 20.0",
        id="review-refunds",
        reason="Refunds above 20 need a person.",
    )
    define_refund_agent(api.app, api.recorder, hitl=HumanInLoop(enabled=True, policy=[rule]))
    await inbox.open(await api.app.issue_key("rita"))
    request = await api.start()
    detail = await inbox.show(request.request_id)
    await expect(detail.locator(".policy-rule")).to_have_text(
        "Asked by policy rule review-refunds: Refunds above 20 need a person."
    )


async def test_a_request_a_redeploy_decided_says_so_not_a_person(inbox: Inbox) -> None:
    api = inbox.api
    await inbox.open(await api.app.issue_key("rita"))
    request = await api.start()
    detail = await inbox.show(request.request_id)
    await expect(detail.locator("#status")).to_have_text("pending")
    frozen = Rule.deny("process-refund", id="frozen", reason="Refunds are frozen.")
    define_refund_agent(api.app, api.recorder, hitl=HumanInLoop(enabled=True, policy=[frozen]))
    await api.app.engine.sweep_redefined()
    await expect(inbox.row(request.request_id)).to_have_count(0)
    await expect(detail.locator("#outcome")).to_contain_text(
        "Denied by the agent's policy when it was defined again"
    )
    await expect(detail.locator("#outcome")).to_contain_text("Refunds are frozen.")
    await expect(detail.locator("#approve")).to_have_count(0)
    assert api.recorder.calls == []


async def test_a_two_approval_request_stays_pending_with_the_vote(inbox: Inbox) -> None:
    api, page = inbox.api, inbox.page
    define_refund_agent(
        api.app,
        api.recorder,
        hitl=HumanInLoop(enabled=True),
        approvals_required=2,
        groups=["finance", "risk"],
        max_approval_timeout="2h",
    )
    every = [Grant(("*",), ("*",), {"decide", "extend"})]
    await api.app.save_reviewer(Reviewer("alice", every, groups=["finance"]))
    await api.app.save_reviewer(Reviewer("bob", every, groups=["risk"]))
    ex = await api.app.run("safe-agent", input="Refund order ORD-123", requested_by="carol")
    [request] = ex.pending_approvals
    await inbox.open(await api.app.issue_key("alice"))
    detail = await inbox.show(request.request_id)
    await expect(detail.locator("#quorum")).to_have_text(
        "0 of 2 approvals; still needed: 2, one from each of finance and risk"
    )
    await expect(detail.locator("#requester")).to_contain_text("Requested by carol")
    await expect(detail).not_to_contain_text("null")  # parts a request lacks are left out
    await page.click("#approve")
    progress = "1 of 2 approvals — alice; still needed: 1 from risk"
    await expect(detail.locator("#quorum")).to_have_text(progress)
    await expect(detail.locator("#notice")).to_contain_text(progress)
    await expect(detail.locator("#status")).to_have_text("pending")
    await expect(detail.locator("#outcome")).to_have_count(0)
    await expect(inbox.row(request.request_id)).to_contain_text(progress)
    await expect(page.locator("#approve")).to_be_disabled()  # alice voted already
    await expect(detail.locator('#history li[data-type="approved"]')).to_contain_text("vote")
    assert api.recorder.calls == []
    # The second, from risk, decides it: the page shows it approved by both.
    await api.app.signal(
        request.execution_id,
        "approve",
        request_id=request.request_id,
        by=await api.app.reviewer_identity("bob"),
    )
    await expect(detail.locator("#outcome")).to_contain_text("Approved by bob (reviewer)")
    await expect(detail.locator("#outcome")).to_contain_text("2 of 2 approvals — alice, bob")
    assert api.recorder.ran("process-refund") == [REFUND]


async def test_a_deadline_is_extended_from_the_page_up_to_the_tools_longest(
    inbox: Inbox,
) -> None:
    api, page = inbox.api, inbox.page
    await api.app.save_reviewer(Reviewer("ed", [Grant(("*",), ("*",), {"decide", "extend"})]))
    plain = await api.start()  # its tool sets no max_approval_timeout
    await inbox.open(await api.app.issue_key("ed"))
    await inbox.show(plain.request_id)
    await expect(page.locator("#approve")).to_be_visible()
    await expect(page.locator("#extend")).to_have_count(0)  # no control that cannot work

    define_refund_agent(
        api.app, api.recorder, hitl=HumanInLoop(enabled=True), max_approval_timeout="1h"
    )
    request = await api.start()  # asked at 10:30, expires 10:35, may be extended to 11:30
    detail = await inbox.show(request.request_id)
    until = page.locator("#extend-until")
    await expect(until).to_have_value("2024-01-15T11:30")  # the most it may have
    await expect(detail.locator("#extend .hint")).to_have_text("at most 2024-01-15 11:30:00 UTC")

    # The server's refusals, as it words them; nothing changes.
    before = await api.snapshot()
    error = page.locator("#detail-error")
    for typed, code, says in (
        ("2024-01-15T11:30:01", "extension_too_long", "1 hour at most"),
        ("2024-01-15T10:34", "invalid_deadline", "is not later than"),
    ):
        await until.fill(typed)
        await page.click("#extend-button")
        await expect(error).to_contain_text(f"(422 {code})")
        await expect(error).to_contain_text(says)
        await expect(error).to_contain_text("Not extended: ")
    assert await api.snapshot() == before

    await until.fill("2024-01-15T11:00")
    await until.press("Enter")
    await expect(detail.locator("#notice")).to_have_text(
        "Extended: it now expires at 2024-01-15 11:00:00 UTC."
    )
    await expect(error).to_be_empty()
    await expect(detail.locator(".ids")).to_contain_text("expires 2024-01-15 11:00:00 UTC")
    await expect(detail.locator('#history li[data-type="extended"]')).to_contain_text(
        "until 2024-01-15 11:00:00 UTC by ed (reviewer)"
    )
    moved = await api.app.request(request.request_id)
    assert moved is not None and moved.timeout == datetime(2024, 1, 15, 11, tzinfo=UTC)
    [record] = await api.app.audit(request_id=request.request_id)
    assert (record.decision, record.by, record.by_kind) == ("extended", "ed", "reviewer")

    # Once more, to the most it may have: then there is nothing more to give.
    await expect(until).to_have_value("2024-01-15T11:30")
    await page.click("#extend-button")
    await expect(detail.locator("#notice")).to_contain_text("expires at 2024-01-15 11:30:00 UTC")
    await expect(page.locator("#extend")).to_have_count(0)
    await expect(inbox.row(request.request_id).locator(".countdown")).to_have_text(
        re.compile(r"^(1h 00m|59:\d\d) left$")  # the list's countdown moved too
    )
    await expect(page.locator("#approve")).to_be_enabled()  # still to be decided
    assert api.recorder.calls == []
