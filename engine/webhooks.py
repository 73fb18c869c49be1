"""Provider callbacks: Twilio delivery statuses and inbound replies, each signature-checked.

    POST /webhooks/twilio/status    a message's status callback (queued, sent, delivered,
                                    undelivered, failed): an outcome per (MessageSid, status),
                                    recorded once however often Twilio retries it
    POST /webhooks/twilio/inbound   an incoming SMS: STOP, STOPALL, UNSUBSCRIBE, CANCEL, END,
                                    QUIT withdraw marketing consent on the SMS channels of the
                                    customers with that phone number; START, UNSTOP give it back

Twilio signs each request over the URL it called, so the check needs the public URL (the one
configured at Twilio, behind any proxy), not the one this process listens on. A missing or wrong
`X-Twilio-Signature` gets 403 and changes nothing.

A message's status only moves forward: a late `sent` never overwrites `delivered`, and a
callback resolves `unknown` (a request that timed out but did reach Twilio).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import SecretStr
from sqlalchemy import Connection, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from twilio.request_validator import RequestValidator

from channels.twilio_sms import MESSAGE_ID_PARAM
from engine.models import ConsentEntry, Customer, Message, MessageStatus, Outcome, table
from engine.runtime import Runtime

__all__ = [
    "OPT_IN",
    "OPT_OUT",
    "TwilioWebhook",
    "make_webhook_router",
    "record_twilio_reply",
    "record_twilio_status",
    "router",
    "twilio_webhook_from",
]

OPT_OUT = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
OPT_IN = frozenset({"START", "UNSTOP"})
SIGNATURE_HEADER = "X-Twilio-Signature"

# Twilio's MessageStatus -> our status; None: recorded as an outcome, the message stays put
_TWILIO_STATUS: dict[str, MessageStatus | None] = {
    "accepted": None, "scheduled": None, "queued": None, "sending": None,
    "sent": MessageStatus.SENT, "delivered": MessageStatus.DELIVERED,
    "read": MessageStatus.DELIVERED,
    "undelivered": MessageStatus.FAILED, "failed": MessageStatus.FAILED,
}
# the statuses a message may move to each status from: never backwards, never out of a final one
_FROM: dict[MessageStatus, tuple[MessageStatus, ...]] = {
    MessageStatus.SENT: (MessageStatus.SENDING, MessageStatus.UNKNOWN),
    MessageStatus.DELIVERED: (MessageStatus.SENDING, MessageStatus.UNKNOWN, MessageStatus.SENT),
    MessageStatus.FAILED: (MessageStatus.SENDING, MessageStatus.UNKNOWN, MessageStatus.SENT),
}


@dataclass(frozen=True)
class TwilioWebhook:
    """What checking Twilio's signatures needs."""

    auth_token: SecretStr
    public_url: str  # scheme://host[:port] as Twilio calls it, e.g. https://tp.example.com

    def signed_url(self, request: Request) -> str:
        """The URL Twilio signed: the public origin with this request's path and query."""
        query = request.url.query
        return self.public_url.rstrip("/") + request.url.path + (f"?{query}" if query else "")


def twilio_webhook_from(runtime: Runtime) -> TwilioWebhook | None:
    """The Twilio webhook settings of the first Twilio channel with a status callback URL."""
    for name, channel in runtime.config.channels.channels.items():
        if not channel.adapter.startswith("twilio"):
            continue
        settings = {**channel.settings, **runtime.channel_overrides.get(name, {})}
        token, callback = settings.get("auth_token"), settings.get("status_callback_base_url")
        if token and callback:
            parts = urlsplit(str(callback))
            return TwilioWebhook(SecretStr(str(token)), f"{parts.scheme}://{parts.netloc}")
    return None


Resolve = Callable[[Request], tuple[Runtime, TwilioWebhook | None]]


def make_webhook_router(runtime: Runtime, twilio: TwilioWebhook | None = None) -> APIRouter:
    """The webhook routes over `runtime`; Twilio settings default to its Twilio channel's."""
    config = twilio or twilio_webhook_from(runtime)
    return _router(lambda _: (runtime, config))


def _from_app_state(request: Request) -> tuple[Runtime, TwilioWebhook | None]:
    state = request.app.state
    return state.runtime, getattr(state, "twilio_webhook", None)


def _router(resolve: Resolve) -> APIRouter:
    api = APIRouter(prefix="/webhooks", tags=["webhooks"])

    @api.post("/twilio/status", include_in_schema=False)
    async def twilio_status(request: Request) -> Response:
        runtime, config = resolve(request)
        form = await _verified_form(request, config)
        sid, status = form.get("MessageSid", ""), form.get("MessageStatus", "").lower()
        if not sid or status not in _TWILIO_STATUS:
            raise HTTPException(400, "MessageSid and a known MessageStatus are required")
        record_twilio_status(runtime, sid, status, form, request.query_params.get(MESSAGE_ID_PARAM))
        return Response(status_code=204)

    @api.post("/twilio/inbound", include_in_schema=False)
    async def twilio_inbound(request: Request) -> Response:
        runtime, config = resolve(request)
        form = await _verified_form(request, config)
        record_twilio_reply(runtime, form.get("From", ""), form.get("Body", ""),
                            form.get("MessageSid", ""))
        return Response("<Response/>", media_type="text/xml")

    return api


async def _verified_form(request: Request, config: TwilioWebhook | None) -> dict[str, str]:
    """The form fields of a request Twilio signed; 403 otherwise."""
    if config is None:
        raise HTTPException(403, "Twilio webhooks are not configured")
    # parsed here: Starlette's form parser needs python-multipart, which we do not depend on
    form = dict(parse_qsl((await request.body()).decode("utf-8", "replace"),
                          keep_blank_values=True))
    signature = request.headers.get(SIGNATURE_HEADER, "")
    validator = RequestValidator(config.auth_token.get_secret_value())
    if not signature or not validator.validate(config.signed_url(request), form, signature):
        raise HTTPException(403, "invalid Twilio signature")
    return form


def record_twilio_status(runtime: Runtime, sid: str, status: str, form: Mapping[str, str],
                         message_id: str | None = None) -> bool:
    """Record one status callback; False when it was a duplicate or names no known message."""
    t = table(Message)
    now = runtime.clock.now()
    with runtime.engine.begin() as conn:
        mid = _message_id(conn, sid, message_id)
        if mid is None:
            return False
        detail: dict[str, Any] = {"twilio_status": status, "sid": sid}
        if form.get("ErrorCode"):
            detail["error_code"] = form["ErrorCode"]
        target = _TWILIO_STATUS[status]
        if not _insert_once(conn, {
                "message_id": mid, "status": str(target or status)[:16], "occurred_at": now,
                "source": "twilio", "detail": detail, "dedupe_key": f"twilio:{sid}:{status}"}):
            return False
        if target is not None:
            conn.execute(update(t).where(t.c.id == mid, t.c.status.in_(_FROM[target]))
                         .values(status=target, provider_message_id=sid))
    return True


def _message_id(conn: Connection, sid: str, message_id: str | None) -> int | None:
    """Our message: by the id in the callback URL (the primary key), else by the SID."""
    t = table(Message)
    if message_id is not None and message_id.isdigit():
        # also finds a message whose send answer was lost (unknown, no SID recorded)
        found = conn.execute(select(t.c.id, t.c.provider_message_id)
                             .where(t.c.id == int(message_id))).first()
        if found is not None and found.provider_message_id in (None, sid):
            return int(found.id)
    # provider_message_id has no index: a scan, for callbacks without our id
    by_sid = conn.execute(select(t.c.id).where(t.c.provider_message_id == sid)).scalar()
    return None if by_sid is None else int(by_sid)


def _insert_once(conn: Connection, values: dict[str, Any]) -> bool:
    """Insert an outcome unless one with its dedupe key exists; True when inserted."""
    o = table(Outcome)
    dialect = conn.dialect.name
    if dialect in ("postgresql", "sqlite"):
        make = pg_insert if dialect == "postgresql" else sqlite_insert
        stmt = make(o).values(**values).on_conflict_do_nothing(index_elements=["dedupe_key"])
        return bool(conn.execute(stmt).rowcount)
    if conn.execute(select(o.c.id).where(o.c.dedupe_key == values["dedupe_key"])).first():
        return False
    conn.execute(insert(o).values(**values))
    return True


def record_twilio_reply(runtime: Runtime, phone: str, body: str, sid: str = "") -> int:
    """Apply an opt-out or opt-in keyword from `phone`; the consent entries appended."""
    keyword = body.strip().upper()
    if keyword not in OPT_OUT | OPT_IN or not phone:
        return 0
    channels = [name for name, ch in runtime.config.channels.channels.items()
                if ch.contact == "phone" and "whatsapp" not in ch.adapter]
    c = table(Customer)
    now = runtime.clock.now()
    with runtime.engine.begin() as conn:
        ids = conn.execute(select(c.c.id).where(c.c.phone == phone)).scalars().all()
        rows = [{"customer_id": cid, "channel": channel, "purpose": "marketing",
                 "granted": keyword in OPT_IN, "occurred_at": now,
                 "source": f"twilio:{keyword.lower()}:{sid}"[:64]}
                for cid in ids for channel in channels]
        if rows:
            conn.execute(insert(ConsentEntry), rows)
    return len(rows)


router = _router(_from_app_state)
"""The same routes, reading `app.state.runtime` and `app.state.twilio_webhook`."""
