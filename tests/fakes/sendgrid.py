"""A fake of SendGrid's v3 Mail Send API (`POST /v3/mail/send`)."""

from __future__ import annotations

import itertools
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes import Fake, Recorded, json_error

__all__ = ["API_KEY", "FakeSendGrid"]

API_KEY = "SG.fake-key.5ecret-sendgrid-api-key"
RESET_IN = 30  # seconds until the rate limit resets, in the 429 answer


def _errors(*messages: str) -> dict[str, list[dict[str, str | None]]]:
    return {"errors": [{"message": m, "field": None, "help": None} for m in messages]}


def _rate_limited(rec: Recorded) -> Response:
    return JSONResponse(_errors("too many requests"), status_code=429, headers={
        "X-RateLimit-Limit": "600", "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": str(int(time.time()) + RESET_IN)})


class FakeSendGrid(Fake):
    """Checks the bearer API key and answers 202 with an `X-Message-Id`, like SendGrid."""

    errors = {
        "400": json_error(400, _errors("The from email does not contain a valid address.")),
        "401": json_error(401, _errors("The provided authorization grant is invalid, expired, "
                                       "or revoked")),
        "413": json_error(413, _errors("Payload Too Large")),
        "429": _rate_limited,
        "500": json_error(500, _errors("internal server error")),
    }

    def __init__(self, api_key: str = API_KEY) -> None:
        super().__init__()
        self.api_key = api_key
        self._ids = itertools.count(1)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v3/mail/send", self._send, methods=["POST"])])

    def _authorized(self, rec: Recorded) -> Response | None:
        if rec.headers.get("authorization") != f"Bearer {self.api_key}":
            return self.errors["401"](rec)
        return None

    async def _send(self, request: Request) -> Response:
        return await self.answer(request, self._accepted, self._authorized)

    def _accepted(self, rec: Recorded) -> Response:
        mail = rec.body if isinstance(rec.body, dict) else {}
        if not mail.get("personalizations") or not mail.get("from"):
            return json_error(400, _errors("personalizations and from are required"))(rec)
        message_id = self.issue(f"sg-{next(self._ids):06d}")
        return Response(status_code=202, headers={"X-Message-Id": message_id})
