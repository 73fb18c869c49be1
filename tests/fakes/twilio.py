"""A fake of Twilio's Messages API (`POST /2010-04-01/Accounts/{sid}/Messages.json`)."""

from __future__ import annotations

import base64
import itertools
from collections.abc import Callable
from email.utils import formatdate

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes import Fake, Recorded, json_error

__all__ = ["ACCOUNT_SID", "AUTH_TOKEN", "FakeTwilio"]

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "twilio-auth-token-5ecret"


def _twilio_error(status: int, code: int, message: str,
                  headers: dict[str, str] | None = None) -> Callable[[Recorded], Response]:
    return json_error(status, {"code": code, "message": message, "status": status,
                               "more_info": f"https://www.twilio.com/docs/errors/{code}"},
                      headers)


class FakeTwilio(Fake):
    """Checks basic auth (account SID and auth token) and answers like Twilio."""

    errors = {
        "21610": _twilio_error(400, 21610, "Attempt to send to unsubscribed recipient"),
        "21211": _twilio_error(400, 21211, "The 'To' number is not a valid phone number."),
        "21614": _twilio_error(400, 21614, "'To' number is not a valid mobile number"),
        "21408": _twilio_error(400, 21408, "Permission to send an SMS has not been enabled "
                                           "for the region indicated by the 'To' number"),
        "20429": _twilio_error(429, 20429, "Too Many Requests", {"Retry-After": "7"}),
        "500": _twilio_error(500, 20500, "Internal Server Error"),
    }

    def __init__(self, account_sid: str = ACCOUNT_SID, auth_token: str = AUTH_TOKEN) -> None:
        super().__init__()
        self.account_sid, self.auth_token = account_sid, auth_token
        self._sids = itertools.count(1)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/2010-04-01/Accounts/{sid}/Messages.json",
                                       self._create, methods=["POST"])])

    def _authorized(self, rec: Recorded) -> Response | None:
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        if rec.headers.get("authorization") != f"Basic {expected}" \
                or f"/Accounts/{self.account_sid}/" not in rec.path:
            return _twilio_error(401, 20003, "Authenticate")(rec)
        return None

    async def _create(self, request: Request) -> Response:
        return await self.answer(request, self._created, self._authorized)

    def _created(self, rec: Recorded) -> Response:
        form = rec.body if isinstance(rec.body, dict) else {}
        if "To" not in form or not (form.get("From") or form.get("MessagingServiceSid")):
            return _twilio_error(400, 21604, "A 'To' and a 'From' are required")(rec)
        sid = self.issue(f"SM{next(self._sids):032x}")
        return JSONResponse({
            "sid": sid, "account_sid": self.account_sid, "to": form["To"],
            "from": form.get("From"), "messaging_service_sid": form.get("MessagingServiceSid"),
            "body": form.get("Body"), "status": "queued", "num_segments": "1",
            "direction": "outbound-api", "api_version": "2010-04-01",
            "date_created": formatdate(usegmt=True), "date_updated": formatdate(usegmt=True),
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
        }, status_code=201)
