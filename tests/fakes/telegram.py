"""A fake of the Telegram Bot API's `sendMessage` (`POST /bot<token>/sendMessage`), and of its
webhook: `setWebhook` (url, secret_token) registers where `push` delivers updates, each with the
secret in `X-Telegram-Bot-Api-Secret-Token`, as Telegram does."""

from __future__ import annotations

import itertools
import time
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes import Fake, Recorded, json_error

__all__ = ["BOT_TOKEN", "FakeTelegram"]

BOT_TOKEN = "123456789:AAF-fake5ecretTelegramBotToken_x"


def _not_ok(status: int, description: str, **extra: object) -> dict[str, object]:
    return {"ok": False, "error_code": status, "description": description, **extra}


class FakeTelegram(Fake):
    """Checks the token in the path and answers like the Bot API."""

    errors = {
        "403": json_error(403, _not_ok(403, "Forbidden: bot was blocked by the user")),
        "400": json_error(400, _not_ok(400, "Bad Request: chat not found")),
        "429": json_error(429, _not_ok(429, "Too Many Requests: retry after 5",
                                       parameters={"retry_after": 5}), {"Retry-After": "5"}),
        "502": json_error(502, _not_ok(502, "Bad Gateway")),
    }

    def __init__(self, bot_token: str = BOT_TOKEN) -> None:
        super().__init__()
        self.bot_token = bot_token
        self._ids = itertools.count(100)
        self._updates = itertools.count(500_000)
        self.webhook: dict[str, Any] = {}  # the last setWebhook's parameters

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/bot{token}/sendMessage", self._send, methods=["POST"]),
                                 Route("/bot{token}/setWebhook", self._set_webhook,
                                       methods=["POST"])])

    async def _set_webhook(self, request: Request) -> Response:
        return await self.answer(request, self._webhook_set, self._authorized)

    def _webhook_set(self, rec: Recorded) -> Response:
        data = rec.body if isinstance(rec.body, dict) else {}
        if not str(data.get("url", "")).startswith(("http://", "https://")):
            return json_error(400, _not_ok(400, "Bad Request: bad webhook: An HTTPS URL must "
                                                "be provided for webhook"))(rec)
        self.webhook = dict(data)
        return JSONResponse({"ok": True, "result": True, "description": "Webhook was set"})

    def update(self, chat_id: int, text: str) -> dict[str, Any]:
        """A private-chat message update, as Telegram posts it."""
        return {"update_id": next(self._updates), "message": {
            "message_id": next(self._ids), "date": int(time.time()), "text": text,
            "from": {"id": chat_id, "is_bot": False, "first_name": "Ann"},
            "chat": {"id": chat_id, "type": "private", "first_name": "Ann"}}}

    def push(self, chat_id: int, text: str, *, secret: str | None = None) -> httpx.Response:
        """Deliver a message from `chat_id` to the registered webhook; `secret` overrides the
        registered secret_token ("" sends none)."""
        token = self.webhook.get("secret_token", "") if secret is None else secret
        headers = {"X-Telegram-Bot-Api-Secret-Token": token} if token else {}
        return httpx.post(self.webhook["url"], json=self.update(chat_id, text), headers=headers,
                          timeout=5)

    def _authorized(self, rec: Recorded) -> Response | None:
        if rec.path.rsplit("/", 1)[0] != f"/bot{self.bot_token}":
            return json_error(401, _not_ok(401, "Unauthorized"))(rec)
        return None

    async def _send(self, request: Request) -> Response:
        return await self.answer(request, self._sent, self._authorized)

    def _sent(self, rec: Recorded) -> Response:
        data = rec.body if isinstance(rec.body, dict) else {}
        if not data.get("chat_id") or not data.get("text"):
            return json_error(400, _not_ok(400, "Bad Request: message text is empty"))(rec)
        return JSONResponse({"ok": True, "result": {
            "message_id": int(self.issue(str(next(self._ids)))), "date": int(time.time()),
            "chat": {"id": data["chat_id"], "type": "private"}, "text": data["text"]}})
