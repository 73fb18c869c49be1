"""A fake webhook receiver: records the signed POSTs the webhook channel makes."""

from __future__ import annotations

import itertools

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes import Fake, Recorded, json_error

__all__ = ["PATH", "SECRET", "FakeReceiver"]

PATH = "/hooks/touchpoints"
SECRET = "webhook-signing-5ecret-0123456789"


class FakeReceiver(Fake):
    """Answers 200 with an id; signatures are checked by the tests, not here."""

    errors = {
        "400": json_error(400, {"error": "unknown recipient"}),
        "429": json_error(429, {"error": "slow down"}, {"Retry-After": "12"}),
        "503": json_error(503, {"error": "maintenance"}),
    }

    def __init__(self) -> None:
        super().__init__()
        self._ids = itertools.count(1)

    def app(self) -> Starlette:
        return Starlette(routes=[Route(PATH, self._receive, methods=["POST"])])

    async def _receive(self, request: Request) -> Response:
        return await self.answer(request, self._ok)

    def _ok(self, rec: Recorded) -> Response:
        return JSONResponse({"id": self.issue(f"wh-{next(self._ids)}")})
