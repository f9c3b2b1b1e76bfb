"""POSTs one signed webhook with `httpx`, signed per Standard Webhooks (`standardwebhooks`)."""

from __future__ import annotations

from datetime import datetime

import attrs
import httpx
from standardwebhooks.webhooks import Webhook

USER_AGENT = "clearance-webhooks/1"


@attrs.frozen
class Answer:
    status_code: int | None  # None: no HTTP answer at all
    error: str | None = None


def signed_headers(secret: str, webhook_id: str, at: datetime, body: str) -> dict[str, str]:
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, at, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


class WebhookSender:
    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        # Made on first use: building an SSL context costs ~24 ms, which every short-lived
        # process (`clearance approve`) would pay for nothing.
        self._client: httpx.AsyncClient | None = None

    async def post(
        self, url: str, *, secret: str, webhook_id: str, at: datetime, body: str
    ) -> Answer:
        headers = signed_headers(secret, webhook_id, at, body)
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        try:
            response = await self._client.post(url, content=body.encode(), headers=headers)
        except httpx.TimeoutException as err:
            return Answer(None, f"timed out: {type(err).__name__}")
        except httpx.HTTPError as err:
            return Answer(None, f"{type(err).__name__}: {err}")
        if response.is_success:
            return Answer(response.status_code)
        return Answer(response.status_code, response.text[:200] or response.reason_phrase)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
