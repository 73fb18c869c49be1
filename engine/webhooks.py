"""Provider callbacks: delivery statuses, engagement and opt-outs, each signature-checked.

    POST /webhooks/twilio/status    a message's status callback (queued, sent, delivered,
                                    undelivered, failed): an outcome per (MessageSid, status),
                                    recorded once however often Twilio retries it
    POST /webhooks/twilio/inbound   an incoming SMS: STOP, STOPALL, UNSUBSCRIBE, CANCEL, END,
                                    QUIT withdraw marketing consent on the SMS channels of the
                                    customers with that phone number; START, UNSTOP give it back
    POST /webhooks/sendgrid/events  a batch of SendGrid Event Webhook events (JSON array)
    POST /webhooks/telegram         a Telegram bot update: `/stop` from a chat withdraws marketing
                                    consent on the chat channels of the customers with that chat
                                    id, `/start` gives it back

Twilio signs each request over the URL it called, so the check needs the public URL (the one
configured at Twilio, behind any proxy), not the one this process listens on. A missing or wrong
`X-Twilio-Signature` gets 403 and changes nothing.

SendGrid signs `timestamp + body` with ECDSA (P-256, SHA-256); the verification key is the
sendgrid channel's `event_webhook_public_key`. A bad signature, or a timestamp further than
`event_webhook_max_age` seconds (default 300) from the runtime clock, gets 403 and changes nothing.
Each event is recorded once, by its `sg_event_id`; our message id travels in its custom args:

    delivered                               the message is delivered
    open, click                             outcome `opened` / `clicked`
    bounce, dropped                         the message failed; the outcome says the address is
                                            not a valid contact point
    spamreport, unsubscribe,                marketing consent withdrawn on that email channel
    group_unsubscribe
    processed, deferred, ...                an outcome, the message stays put

Telegram sends the `secret_token` given to `setWebhook` in `X-Telegram-Bot-Api-Secret-Token`;
it is compared with `TOUCHPOINTS_TELEGRAM_WEBHOOK_SECRET` in constant time, 403 otherwise.

A message's status only moves forward: a late `sent` never overwrites `delivered`, and a
callback resolves `unknown` (a request that timed out but did reach the provider).
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key
from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import SecretStr
from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from twilio.request_validator import RequestValidator

from channels.sendgrid import MESSAGE_ID_ARG
from channels.twilio_sms import MESSAGE_ID_PARAM
from engine.models import ConsentEntry, Customer, Message, MessageStatus, Outcome, table
from engine.runtime import Runtime

__all__ = [
    "OPT_IN",
    "OPT_OUT",
    "SendGridWebhook",
    "TwilioWebhook",
    "Webhooks",
    "make_webhook_router",
    "record_sendgrid_events",
    "record_telegram_command",
    "record_twilio_reply",
    "record_twilio_status",
    "router",
    "sendgrid_webhook_from",
    "twilio_webhook_from",
    "webhooks_from",
]

OPT_OUT = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
OPT_IN = frozenset({"START", "UNSTOP"})
SIGNATURE_HEADER = "X-Twilio-Signature"
SENDGRID_SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
TELEGRAM_SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
MARKETING = "marketing"

# SendGrid's event -> (outcome status, the status the message moves to, or None)
_SENDGRID_EVENT: dict[str, tuple[str, MessageStatus | None]] = {
    "delivered": ("delivered", MessageStatus.DELIVERED),
    "open": ("opened", None), "click": ("clicked", None),
    "bounce": ("failed", MessageStatus.FAILED), "dropped": ("failed", MessageStatus.FAILED),
    "spamreport": ("spam_report", None), "unsubscribe": ("unsubscribed", None),
    "group_unsubscribe": ("unsubscribed", None),
}
_SENDGRID_OPT_OUT = frozenset({"spamreport", "unsubscribe", "group_unsubscribe"})
_SENDGRID_DETAIL = ("email", "reason", "status", "type", "response", "url", "attempt",
                    "asm_group_id", "bounce_classification")

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


@dataclass(frozen=True)
class SendGridWebhook:
    """What checking SendGrid's Event Webhook signatures needs."""

    public_key: ec.EllipticCurvePublicKey
    channel: str = "email"  # the channel whose consent an unsubscribe without a message changes
    max_age: timedelta = timedelta(minutes=5)

    @classmethod
    def from_key(cls, key: str, channel: str = "email",
                 max_age: timedelta = timedelta(minutes=5)) -> SendGridWebhook:
        """From the key as SendGrid shows it (base64 DER) or as PEM; ValueError if it is bad."""
        try:
            if key.lstrip().startswith("-----BEGIN"):
                loaded = load_pem_public_key(key.encode("ascii"))
            else:
                loaded = load_der_public_key(base64.b64decode("".join(key.split()),
                                                              validate=True))
        except (ValueError, binascii.Error, UnicodeEncodeError) as exc:
            raise ValueError(f"event_webhook_public_key is not a public key: {exc}") from None
        if not isinstance(loaded, ec.EllipticCurvePublicKey):
            raise ValueError("event_webhook_public_key is not an elliptic-curve key")
        return cls(loaded, channel, max_age)

    def verify(self, body: bytes, signature: str, timestamp: str, now: datetime) -> bool:
        """Whether `signature` signs `timestamp + body` and `timestamp` is recent."""
        try:
            signed_at = datetime.fromtimestamp(int(timestamp), UTC).replace(tzinfo=None)
            decoded = base64.b64decode(signature, validate=True)
        except (ValueError, OverflowError, OSError):
            return False
        if abs(now - signed_at) > self.max_age:
            return False  # a replay, or a clock far off
        try:
            self.public_key.verify(decoded, timestamp.encode("ascii") + body,
                                   ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True


def sendgrid_webhook_from(runtime: Runtime) -> SendGridWebhook | None:
    """The settings of the first sendgrid channel with an `event_webhook_public_key`."""
    for name, channel in runtime.config.channels.channels.items():
        if channel.adapter != "sendgrid":
            continue
        settings = {**channel.settings, **runtime.channel_overrides.get(name, {})}
        key = settings.get("event_webhook_public_key")
        if key:
            max_age = float(settings.get("event_webhook_max_age") or 300.0)
            return SendGridWebhook.from_key(str(key), name, timedelta(seconds=max_age))
    return None


@dataclass(frozen=True)
class Webhooks:
    """Each provider's settings; a provider left None refuses every request (403)."""

    twilio: TwilioWebhook | None = None
    sendgrid: SendGridWebhook | None = None
    telegram_secret: SecretStr | None = field(default=None, repr=False)


def webhooks_from(runtime: Runtime) -> Webhooks:
    """Every provider's webhook settings from the runtime's channels and settings."""
    return Webhooks(twilio_webhook_from(runtime), sendgrid_webhook_from(runtime),
                    runtime.settings.telegram_webhook_secret)


Resolve = Callable[[Request], tuple[Runtime, Webhooks]]


def make_webhook_router(runtime: Runtime, twilio: TwilioWebhook | None = None, *,
                        sendgrid: SendGridWebhook | None = None,
                        telegram_secret: SecretStr | None = None) -> APIRouter:
    """The webhook routes over `runtime`; each provider's settings default to the runtime's."""
    found = webhooks_from(runtime)
    config = Webhooks(twilio or found.twilio, sendgrid or found.sendgrid,
                      telegram_secret or found.telegram_secret)
    return _router(lambda _: (runtime, config))


def _from_app_state(request: Request) -> tuple[Runtime, Webhooks]:
    state = request.app.state
    return state.runtime, getattr(state, "webhooks", None) or Webhooks(
        twilio=getattr(state, "twilio_webhook", None))


def _router(resolve: Resolve) -> APIRouter:
    api = APIRouter(prefix="/webhooks", tags=["webhooks"])

    @api.post("/twilio/status", include_in_schema=False)
    async def twilio_status(request: Request) -> Response:
        runtime, config = resolve(request)
        form = await _verified_form(request, config.twilio)
        sid, status = form.get("MessageSid", ""), form.get("MessageStatus", "").lower()
        if not sid or status not in _TWILIO_STATUS:
            raise HTTPException(400, "MessageSid and a known MessageStatus are required")
        record_twilio_status(runtime, sid, status, form, request.query_params.get(MESSAGE_ID_PARAM))
        return Response(status_code=204)

    @api.post("/twilio/inbound", include_in_schema=False)
    async def twilio_inbound(request: Request) -> Response:
        runtime, config = resolve(request)
        form = await _verified_form(request, config.twilio)
        record_twilio_reply(runtime, form.get("From", ""), form.get("Body", ""),
                            form.get("MessageSid", ""))
        return Response("<Response/>", media_type="text/xml")

    @api.post("/sendgrid/events", include_in_schema=False)
    async def sendgrid_events(request: Request) -> Response:
        runtime, config = resolve(request)
        if config.sendgrid is None:
            raise HTTPException(403, "SendGrid webhooks are not configured")
        body = await request.body()
        if not config.sendgrid.verify(body, request.headers.get(SENDGRID_SIGNATURE_HEADER, ""),
                                      request.headers.get(SENDGRID_TIMESTAMP_HEADER, ""),
                                      runtime.clock.now()):
            raise HTTPException(403, "invalid or expired SendGrid signature")
        try:
            events = json.loads(body)
        except ValueError:
            raise HTTPException(400, "the body is not JSON") from None
        if not isinstance(events, list):
            raise HTTPException(400, "the body is not a JSON array of events")
        record_sendgrid_events(runtime, [e for e in events if isinstance(e, dict)],
                               config.sendgrid.channel)
        return Response(status_code=204)

    @api.post("/telegram", include_in_schema=False)
    async def telegram(request: Request) -> Response:
        runtime, config = resolve(request)
        given = request.headers.get(TELEGRAM_SECRET_HEADER, "").encode("utf-8")
        expected = b"" if config.telegram_secret is None \
            else config.telegram_secret.get_secret_value().encode("utf-8")
        if not expected or not secrets.compare_digest(given, expected):
            raise HTTPException(403, "invalid Telegram secret token")
        try:
            update_ = json.loads(await request.body())
        except ValueError:
            raise HTTPException(400, "the body is not JSON") from None
        message = update_.get("message") if isinstance(update_, dict) else None
        if isinstance(message, dict):
            chat = message.get("chat")
            chat_id = chat.get("id") if isinstance(chat, dict) else None
            text = message.get("text")
            if chat_id is not None and isinstance(text, str):
                record_telegram_command(runtime, str(chat_id), text,
                                        str(update_.get("update_id", "")))
        return Response(status_code=204)  # anything else: acknowledged, so Telegram moves on

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


def record_sendgrid_events(runtime: Runtime, events: list[dict[str, Any]],
                           channel: str = "email") -> int:
    """Record a batch of SendGrid events, each once by `sg_event_id`; how many were new."""
    now = runtime.clock.now()
    new = 0
    with runtime.engine.begin() as conn:
        for event in events:
            new += _record_sendgrid_event(conn, event, channel, now)
    return new


def _record_sendgrid_event(conn: Connection, event: dict[str, Any], channel: str,
                           now: datetime) -> bool:
    kind, event_id = str(event.get("event", "")), str(event.get("sg_event_id") or "")
    if not kind or not event_id:
        return False
    key = f"sendgrid:{event_id}"
    outcome, target = _SENDGRID_EVENT.get(kind, (kind, None))
    # SendGrid's sg_message_id is the X-Message-Id it answered the send with, plus a suffix
    xid = str(event.get("sg_message_id") or "").split(".", 1)[0]
    found = _sendgrid_message(conn, xid, event.get(MESSAGE_ID_ARG))
    if found is None:
        # no message of ours (sent before, or by someone else): only consent can still change
        return kind in _SENDGRID_OPT_OUT and _withdraw_email(conn, event, channel, key, now)
    mid, customer_id, message_channel = found
    detail: dict[str, Any] = {"sendgrid_event": kind, "sg_event_id": event_id,
                              **{k: event[k] for k in _SENDGRID_DETAIL if k in event}}
    if kind in ("bounce", "dropped"):
        detail["contact_point"] = {"channel": message_channel,
                                   "recipient": event.get("email"), "valid": False}
    if not _insert_once(conn, {"message_id": mid, "status": outcome[:16], "occurred_at": now,
                               "source": "sendgrid", "detail": detail, "dedupe_key": key}):
        return False
    if target is not None:
        t = table(Message)
        conn.execute(update(t).where(t.c.id == mid, t.c.status.in_(_FROM[target]))
                     .values(status=target, provider_message_id=func.coalesce(
                         t.c.provider_message_id, xid or None)))
    if kind in _SENDGRID_OPT_OUT:
        _append_withdrawals(conn, [customer_id], message_channel, f"sendgrid:{kind}", now)
    return True


def _sendgrid_message(conn: Connection, xid: str, message_id: Any,
                      ) -> tuple[int, int, str] | None:
    """(id, customer, channel) of our message: by our id in the custom args, else by `xid`."""
    t = table(Message)
    columns = (t.c.id, t.c.customer_id, t.c.channel, t.c.provider_message_id)
    if message_id is not None and str(message_id).isdigit():
        row = conn.execute(select(*columns).where(t.c.id == int(str(message_id)))).first()
        if row is not None and (not xid or row.provider_message_id in (None, xid)):
            return int(row.id), int(row.customer_id), str(row.channel)
    if not xid:
        return None
    row = conn.execute(select(*columns).where(t.c.provider_message_id == xid)).first()
    return None if row is None else (int(row.id), int(row.customer_id), str(row.channel))


def _withdraw_email(conn: Connection, event: dict[str, Any], channel: str, key: str,
                    now: datetime) -> bool:
    """Withdraw consent for the customers with the event's address, once per event."""
    email = event.get("email")
    cl = table(ConsentEntry)
    source = key[:64]
    if not email or conn.execute(select(cl.c.id).where(cl.c.source == source)).first():
        return False
    c = table(Customer)
    ids = [int(i) for i in conn.execute(select(c.c.id).where(c.c.email == str(email))).scalars()]
    return bool(_append_withdrawals(conn, ids, channel, source, now))


def _append_withdrawals(conn: Connection, customer_ids: list[int], channel: str, source: str,
                        now: datetime, *, granted: bool = False) -> int:
    rows = [{"customer_id": cid, "channel": channel, "purpose": MARKETING, "granted": granted,
             "occurred_at": now, "source": source[:64]} for cid in customer_ids]
    if rows:
        conn.execute(insert(ConsentEntry), rows)
    return len(rows)


def record_telegram_command(runtime: Runtime, chat_id: str, text: str, update_id: str = "") -> int:
    """Apply `/stop` or `/start` from `chat_id`; the consent entries appended."""
    # "/stop@SomeBot" in groups; anything after the command is ignored
    command = text.strip().split(maxsplit=1)[0].split("@", 1)[0].lower() if text.strip() else ""
    if command not in ("/stop", "/start") or not chat_id:
        return 0
    channels = [name for name, ch in runtime.config.channels.channels.items()
                if ch.contact == "chat_id"]
    c = table(Customer)
    now = runtime.clock.now()
    with runtime.engine.begin() as conn:
        ids = [int(i) for i in
               conn.execute(select(c.c.id).where(c.c.chat_id == chat_id)).scalars()]
        return sum(_append_withdrawals(conn, ids, name, f"telegram:{command[1:]}:{update_id}",
                                       now, granted=command == "/start")
                   for name in channels)


router = _router(_from_app_state)
"""The same routes, reading `app.state.runtime` and `app.state.webhooks` (or, for Twilio alone,
`app.state.twilio_webhook`)."""
