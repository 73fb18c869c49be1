"""Twilio webhooks over a real server: signed status callbacks move a message forward once; signed
STOP/START replies change consent; forged or unsigned requests get 403 and change nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy import Engine, select
from twilio.request_validator import RequestValidator

from channels.base import Channel, OutgoingMessage, SendResult, SendStatus
from engine.clock import FixedClock
from engine.config import ProjectConfig
from engine.dispatch import NO_CONSENT, Dispatcher
from engine.evaluation import Evaluator
from engine.models import ConsentEntry, Message, Outcome
from engine.runtime import Runtime
from engine.settings import Settings
from engine.webhooks import TwilioWebhook, make_webhook_router
from tests.conftest import ROOT, make_trigger
from tests.fakes.server import Served
from tests.test_opt_out import CLUB, TEMPLATES, ann, queue, rows

TOKEN = "webhook-auth-token-5ecret"
PUBLIC = "https://touchpoints.example.com"  # what Twilio calls; the proxy forwards to us
SID = "SM" + "ab" * 16
PHONE = "+15551230000"


class Accepting(Channel):
    """Answers like Twilio, with a fixed SID."""

    def __init__(self) -> None:
        super().__init__("sms", Channel.Settings())
        self.requests: list[OutgoingMessage] = []

    def send(self, message: OutgoingMessage) -> SendResult:
        self.requests.append(message)
        return SendResult(SendStatus.SENT, provider_message_id=SID)


@pytest.fixture
def server(db: Engine, clock: FixedClock) -> Iterator[Served]:
    settings = Settings(rules_dir=ROOT / "rules", templates_dir=ROOT / "templates",
                        config_dir=ROOT / "config")
    runtime = Runtime.load(settings, clock, engine=db, migrate_db=False)
    app = FastAPI()
    app.include_router(make_webhook_router(runtime, TwilioWebhook(SecretStr(TOKEN), PUBLIC)))
    with Served(app) as served:
        yield served


def post(served: Served, path: str, params: dict[str, str], *, token: str | None = TOKEN,
         signed: dict[str, str] | None = None) -> httpx.Response:
    """POST `params` as Twilio would, signed with `token` over `signed` (default: `params`)."""
    headers = {}
    if token is not None:
        headers["X-Twilio-Signature"] = RequestValidator(token).compute_signature(
            PUBLIC + path, signed if signed is not None else params)
    return httpx.post(served.url + path, data=params, headers=headers, timeout=5)


def sent_sms(db: Engine, clock: FixedClock, config: ProjectConfig) -> Accepting:
    queue(db, clock, config, "welcome")
    channel = Accepting()
    assert Dispatcher(db, TEMPLATES, {"sms": channel}, clock, club=CLUB).drain().sent == 1
    return channel


def status_of(db: Engine) -> Any:
    with db.connect() as conn:
        return conn.execute(select(Message.status)).scalar_one()


def callback(status: str) -> dict[str, str]:
    return {"MessageSid": SID, "MessageStatus": status, "To": PHONE, "AccountSid": "AC" + "0" * 32}


def test_status_callbacks_count_once_and_never_go_backwards(
        db: Engine, clock: FixedClock, project_config: ProjectConfig, server: Served) -> None:
    sent_sms(db, clock, project_config)
    path = "/webhooks/twilio/status?touchpoints_message_id=1"
    for status in ("queued", "sent", "delivered", "delivered", "sent"):
        assert post(server, path, callback(status)).status_code == 204
    assert status_of(db) == "delivered"  # the late `sent` did not overwrite it
    twilio = [(o["status"], o["detail"]["twilio_status"]) for o in
              rows(db, Outcome, "status", "detail", "source") if o["source"] == "twilio"]
    assert twilio == [("queued", "queued"), ("sent", "sent"), ("delivered", "delivered")]


def test_undelivered_fails_the_message(db: Engine, clock: FixedClock,
                                       project_config: ProjectConfig, server: Served) -> None:
    sent_sms(db, clock, project_config)
    response = post(server, "/webhooks/twilio/status",
                    {**callback("undelivered"), "ErrorCode": "30003"})
    assert response.status_code == 204 and status_of(db) == "failed"
    [outcome] = [o for o in rows(db, Outcome, "source", "detail") if o["source"] == "twilio"]
    assert outcome["detail"]["error_code"] == "30003"


@pytest.mark.parametrize("forgery", ["unsigned", "wrong token", "tampered", "other url"])
def test_forged_requests_are_refused_and_change_nothing(
        forgery: str, db: Engine, clock: FixedClock, project_config: ProjectConfig,
        server: Served) -> None:
    sent_sms(db, clock, project_config)
    before = (rows(db, Outcome, "id"), rows(db, ConsentEntry, "id"))
    for path, params in (("/webhooks/twilio/status", callback("delivered")),
                         ("/webhooks/twilio/inbound", {"From": PHONE, "Body": "STOP"})):
        if forgery == "unsigned":
            response = post(server, path, params, token=None)
        elif forgery == "wrong token":
            response = post(server, path, params, token="not-the-token")
        elif forgery == "tampered":
            response = post(server, path, params, signed={**params, "From": "+10000000000"})
        else:
            headers = {"X-Twilio-Signature": RequestValidator(TOKEN).compute_signature(
                "https://elsewhere.example.com" + path, params)}
            response = httpx.post(server.url + path, data=params, headers=headers, timeout=5)
        assert response.status_code == 403
    assert status_of(db) == "sent"
    assert (rows(db, Outcome, "id"), rows(db, ConsentEntry, "id")) == before


def test_stop_withdraws_sms_consent_and_start_gives_it_back(
        db: Engine, clock: FixedClock, project_config: ProjectConfig, server: Served) -> None:
    channel = sent_sms(db, clock, project_config)
    reply = post(server, "/webhooks/twilio/inbound", {"From": PHONE, "Body": " stop ",
                                                      "MessageSid": "SM" + "cd" * 16})
    assert reply.status_code == 200 and "<Response" in reply.text
    [entry] = rows(db, ConsentEntry, "customer_id", "channel", "granted")
    assert entry == {"customer_id": ann(db), "channel": "sms", "granted": False}
    # the next marketing SMS is not sent: the contact policy does not queue it, or the
    # dispatcher blocks it
    tips = make_trigger(id="tips", when={"stage_entered": "onboarding"},
                        action={"channel": "sms", "template": "test/hello"})
    if Evaluator(db, project_config, [tips], clock).tick().messages:
        dispatcher = Dispatcher(db, TEMPLATES, {"sms": channel}, clock, club=CLUB)
        assert dispatcher.drain().failed == 1
        assert rows(db, Message, "last_error")[-1]["last_error"] == NO_CONSENT
    assert len(channel.requests) == 1
    assert post(server, "/webhooks/twilio/inbound",
                {"From": PHONE, "Body": "START"}).status_code == 200
    assert [e["granted"] for e in rows(db, ConsentEntry, "granted")] == [False, True]
    # other words change nothing
    assert post(server, "/webhooks/twilio/inbound",
                {"From": PHONE, "Body": "stop it please"}).status_code == 200
    assert len(rows(db, ConsentEntry, "id")) == 2


def test_a_callback_resolves_an_unknown_send(
        db: Engine, clock: FixedClock, project_config: ProjectConfig, server: Served) -> None:
    queue(db, clock, project_config, "welcome")
    lost = Dispatcher(db, TEMPLATES, {"sms": Timeout()}, clock, club=CLUB)
    assert lost.drain().unknown == 1
    [row] = rows(db, Message, "id", "status")
    path = f"/webhooks/twilio/status?touchpoints_message_id={row['id']}"
    assert post(server, path, callback("delivered")).status_code == 204
    assert rows(db, Message, "status", "provider_message_id") == [
        {"status": "delivered", "provider_message_id": SID}]


class Timeout(Channel):
    """The request reached Twilio, the answer was lost."""

    def __init__(self) -> None:
        super().__init__("sms", Channel.Settings())

    def send(self, message: OutgoingMessage) -> SendResult:
        return SendResult(SendStatus.UNKNOWN, error="unknown: read timeout")
