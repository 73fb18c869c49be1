"""A fake of SendGrid's v3 Mail Send API (`POST /v3/mail/send`), and of its signed Event Webhook.

`FakeSendGrid(signing_key)` signs event batches like SendGrid: ECDSA P-256 over
`timestamp + body`, in the `X-Twilio-Email-Event-Webhook-*` headers; `public_key` is the
verification key as SendGrid's settings page shows it (base64 DER).
"""

from __future__ import annotations

import base64
import itertools
import json
import secrets
import time
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes import Fake, Recorded, json_error

__all__ = ["API_KEY", "FakeSendGrid", "public_key_of"]

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

    def __init__(self, api_key: str = API_KEY,
                 signing_key: ec.EllipticCurvePrivateKey | None = None) -> None:
        super().__init__()
        self.api_key = api_key
        self.signing_key = signing_key or ec.generate_private_key(ec.SECP256R1())
        self._ids = itertools.count(1)

    # the Event Webhook ---------------------------------------------------------------------------

    @property
    def public_key(self) -> str:
        """The verification key, as SendGrid's Mail Settings show it."""
        return public_key_of(self.signing_key)

    def event(self, kind: str, sent: int = 0, **fields: Any) -> dict[str, Any]:
        """An event about the `sent`-th mail received, with its custom args, as SendGrid sends."""
        mail = self.requests[sent].body
        personalization = mail["personalizations"][0]
        return {"email": personalization["to"][0]["email"],
                "timestamp": int(time.time()), "event": kind,
                "sg_event_id": secrets.token_urlsafe(16),
                "sg_message_id": f"{self.issued[sent]}.recvd-5f7c8d-abc-1-6543210-9.0",
                # SendGrid flattens the custom args into each event
                **mail.get("custom_args", {}), **personalization.get("custom_args", {}),
                **fields}

    def sign(self, body: bytes, timestamp: str,
             key: ec.EllipticCurvePrivateKey | None = None) -> dict[str, str]:
        """The signature headers of `body` sent at `timestamp`."""
        signature = (key or self.signing_key).sign(timestamp.encode("ascii") + body,
                                                   ec.ECDSA(hashes.SHA256()))
        return {"X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
                "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
                "Content-Type": "application/json"}

    def post_events(self, url: str, events: list[dict[str, Any]], *,
                    timestamp: float | None = None) -> httpx.Response:
        """POST a signed batch of `events` to `url`, as the Event Webhook does."""
        body = json.dumps(events).encode("utf-8")
        stamp = str(int(time.time() if timestamp is None else timestamp))
        return httpx.post(url, content=body, headers=self.sign(body, stamp), timeout=5)

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


def public_key_of(key: ec.EllipticCurvePrivateKey) -> str:
    """`key`'s public half as base64 DER (SubjectPublicKeyInfo), SendGrid's format."""
    der = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode("ascii")
