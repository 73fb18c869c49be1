"""SendGrid's Event Webhook over a real server: a mail sent through the real SDK to the fake, then
genuinely signed event batches about it. Each event counts once, a late event never moves the
message backwards, unsubscribes and spam reports withdraw consent, and forged, tampered or stale
batches get 403 and change nothing."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import FastAPI
from sqlalchemy import Engine, select

from channels.base import Channel, load_adapter
from engine.clock import FixedClock
from engine.config import ProjectConfig
from engine.dispatch import NO_CONSENT, Dispatcher
from engine.evaluation import Evaluator
from engine.ingest import CustomerIn, Ingestor, MembershipIn
from engine.models import ConsentEntry, Message, Outcome
from engine.runtime import Runtime
from engine.settings import Settings
from engine.webhooks import (
    SendGridWebhook,
    make_webhook_router,
    sendgrid_webhook_from,
    webhooks_from,
)
from tests.conftest import ROOT, make_trigger
from tests.fakes.sendgrid import API_KEY, FakeSendGrid, public_key_of
from tests.fakes.server import Served
from tests.test_opt_out import CLUB, TEMPLATES, rows

os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ["no_proxy"] = "127.0.0.1,localhost"

EVENTS = "/webhooks/sendgrid/events"
ANN = "ann@example.com"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeSendGrid]:
    sendgrid = FakeSendGrid(signing_key=ec.generate_private_key(ec.SECP256R1()))
    sendgrid.start()
    yield sendgrid
    sendgrid.stop()


@pytest.fixture
def email(fake: FakeSendGrid) -> Iterator[Channel]:
    fake.reset()
    channel = load_adapter("sendgrid").from_config("email", {
        "api_key": API_KEY, "from_email": "club@example.com", "host": fake.url, "timeout": 5.0})
    yield channel
    channel.close()


def settings() -> Settings:
    return Settings(rules_dir=ROOT / "rules", templates_dir=ROOT / "templates",
                    config_dir=ROOT / "config")


@pytest.fixture
def server(db: Engine, clock: FixedClock, fake: FakeSendGrid) -> Iterator[Served]:
    runtime = Runtime.load(settings(), clock, engine=db, migrate_db=False)
    app = FastAPI()
    app.include_router(make_webhook_router(
        runtime, sendgrid=SendGridWebhook.from_key(fake.public_key)))
    with Served(app) as served:
        yield served


def queue_email(db: Engine, clock: FixedClock, config: ProjectConfig, *trigger_ids: str) -> int:
    """Ann, ten days into her membership, gets one email per trigger id; the messages queued."""
    today = clock.now().date()
    ing = Ingestor(db, clock)
    ing.customers([CustomerIn(external_id="ann", first_name="Ann", email=ANN)])
    ing.memberships([MembershipIn(external_id="m-ann", customer_external_id="ann",
                                  starts_on=today - timedelta(days=10),
                                  ends_on=today + timedelta(days=355))])
    triggers = [make_trigger(id=tid, when={"stage_entered": "onboarding"},
                             action={"channel": "email", "template": "test/hello"})
                for tid in trigger_ids]
    return Evaluator(db, config, triggers, clock).tick().messages


def send(db: Engine, clock: FixedClock, config: ProjectConfig, email: Channel,
         *trigger_ids: str) -> None:
    assert queue_email(db, clock, config, *(trigger_ids or ("welcome",))) \
        == len(trigger_ids or ("welcome",))
    report = Dispatcher(db, TEMPLATES, {"email": email}, clock, club=CLUB).drain()
    assert report.sent == len(trigger_ids or ("welcome",))


def now(clock: FixedClock) -> float:
    """The runtime clock's now as a Unix timestamp, the form SendGrid signs."""
    return clock.now().replace(tzinfo=UTC).timestamp()


def post(fake: FakeSendGrid, server: Served, clock: FixedClock,
         *events: dict[str, Any]) -> httpx.Response:
    return fake.post_events(server.url + EVENTS, list(events), timestamp=now(clock))


def status_of(db: Engine) -> Any:
    with db.connect() as conn:
        return conn.execute(select(Message.status).order_by(Message.id)).scalars().first()


def sendgrid_outcomes(db: Engine) -> list[dict[str, Any]]:
    return [o for o in rows(db, Outcome, "status", "source", "detail", "dedupe_key")
            if o["source"] == "sendgrid"]


def snapshot(db: Engine) -> tuple[Any, ...]:
    return (rows(db, Message, "id", "status"), rows(db, Outcome, "id"),
            rows(db, ConsentEntry, "id"))


def test_events_count_once_and_never_move_a_message_backwards(
        db: Engine, clock: FixedClock, project_config: ProjectConfig, email: Channel,
        fake: FakeSendGrid, server: Served) -> None:
    send(db, clock, project_config, email)
    processed, delivered = fake.event("processed"), fake.event("delivered")
    opened, clicked = fake.event("open"), fake.event("click", url="https://club.example.com")
    assert post(fake, server, clock, processed, delivered, opened, clicked).status_code == 204
    assert status_of(db) == "delivered"
    # SendGrid retries a batch it thinks failed: the same events again, and a late one
    late = fake.event("deferred", response="421 try again later", attempt="1")
    assert post(fake, server, clock, delivered, opened, clicked, late).status_code == 204
    assert status_of(db) == "delivered"
    outcomes = sendgrid_outcomes(db)
    assert [o["status"] for o in outcomes] == ["processed", "delivered", "opened", "clicked",
                                               "deferred"]
    assert outcomes[3]["detail"]["url"] == "https://club.example.com"
    assert outcomes[1]["dedupe_key"] == f"sendgrid:{delivered['sg_event_id']}"
    # a bounce after delivery is recorded, but the message stays delivered
    assert post(fake, server, clock, fake.event("bounce", reason="550 mailbox full")
                ).status_code == 204
    assert status_of(db) == "delivered"


@pytest.mark.parametrize("kind", ["bounce", "dropped"])
def test_bounces_fail_the_message_and_flag_the_address(
        kind: str, db: Engine, clock: FixedClock, project_config: ProjectConfig,
        email: Channel, fake: FakeSendGrid, server: Served) -> None:
    send(db, clock, project_config, email)
    event = fake.event(kind, reason="550 5.1.1 The email account does not exist",
                       type="bounce", status="5.1.1")
    assert post(fake, server, clock, event).status_code == 204
    assert status_of(db) == "failed"
    [outcome] = sendgrid_outcomes(db)
    assert outcome["status"] == "failed"
    assert outcome["detail"]["contact_point"] == {"channel": "email", "recipient": ANN,
                                                  "valid": False}
    assert outcome["detail"]["reason"].startswith("550")
    # a late delivered does not bring the message back
    assert post(fake, server, clock, fake.event("delivered")).status_code == 204
    assert status_of(db) == "failed"


@pytest.mark.parametrize("kind", ["spamreport", "unsubscribe", "group_unsubscribe"])
def test_opt_outs_withdraw_email_consent_once(
        kind: str, db: Engine, clock: FixedClock, project_config: ProjectConfig,
        email: Channel, fake: FakeSendGrid, server: Served) -> None:
    send(db, clock, project_config, email)
    event = fake.event(kind, asm_group_id=42)
    for _ in range(2):
        assert post(fake, server, clock, event).status_code == 204
    [entry] = rows(db, ConsentEntry, "channel", "purpose", "granted", "source")
    assert entry == {"channel": "email", "purpose": "marketing", "granted": False,
                     "source": f"sendgrid:{kind}"}
    assert len(sendgrid_outcomes(db)) == 1
    # the next marketing email is not sent (not queued, or blocked by the dispatcher)
    if queue_email(db, clock, project_config, "tips"):
        report = Dispatcher(db, TEMPLATES, {"email": email}, clock, club=CLUB).drain()
        assert report.failed == 1
        assert rows(db, Message, "last_error")[-1]["last_error"] == NO_CONSENT
    assert len(fake.requests) == 1


def test_an_unsubscribe_about_no_message_of_ours_goes_by_address(
        db: Engine, clock: FixedClock, project_config: ProjectConfig, email: Channel,
        fake: FakeSendGrid, server: Served) -> None:
    send(db, clock, project_config, email)
    event = {"email": ANN, "event": "unsubscribe", "sg_event_id": "unsub-from-an-old-campaign",
             "sg_message_id": "not-ours.filter-1", "timestamp": int(now(clock))}
    stranger = {**event, "email": "nobody@example.com", "sg_event_id": "someone-else"}
    for _ in range(2):
        assert post(fake, server, clock, event, stranger).status_code == 204
    assert rows(db, ConsentEntry, "channel", "granted", "source") == [
        {"channel": "email", "granted": False, "source": "sendgrid:unsub-from-an-old-campaign"}]
    assert sendgrid_outcomes(db) == []


def forged(fake: FakeSendGrid, server: Served, clock: FixedClock, how: str,
           events: list[dict[str, Any]]) -> httpx.Response:
    body = json.dumps(events).encode("utf-8")
    stamp = str(int(now(clock)))
    headers = fake.sign(body, stamp)
    if how == "unsigned":
        headers = {"Content-Type": "application/json"}
    elif how == "other key":
        headers = fake.sign(body, stamp, ec.generate_private_key(ec.SECP256R1()))
    elif how == "tampered":
        body = body.replace(b'"delivered"', b'"bounce"')
    elif how == "other timestamp":
        headers["X-Twilio-Email-Event-Webhook-Timestamp"] = str(int(now(clock)) - 1)
    elif how == "garbage signature":
        headers["X-Twilio-Email-Event-Webhook-Signature"] = "not base64!"
    elif how in ("replayed", "from the future"):
        shift = -301 if how == "replayed" else 301
        return fake.post_events(server.url + EVENTS, events, timestamp=now(clock) + shift)
    return httpx.post(server.url + EVENTS, content=body, headers=headers, timeout=5)


@pytest.mark.parametrize("how", ["unsigned", "other key", "tampered", "other timestamp",
                                 "garbage signature", "replayed", "from the future"])
def test_forged_or_stale_batches_are_refused_and_change_nothing(
        how: str, db: Engine, clock: FixedClock, project_config: ProjectConfig,
        email: Channel, fake: FakeSendGrid, server: Served) -> None:
    send(db, clock, project_config, email)
    before = snapshot(db)
    events = [fake.event("delivered"), fake.event("unsubscribe")]
    response = forged(fake, server, clock, how, events)
    assert response.status_code == 403, response.text
    assert snapshot(db) == before and status_of(db) == "sent"
    # the genuine batch, inside the window, goes through
    clock.advance(timedelta(minutes=4))
    assert fake.post_events(server.url + EVENTS, events,
                            timestamp=now(clock) - 4 * 60).status_code == 204
    assert status_of(db) == "delivered"


def test_without_a_key_every_batch_is_refused(
        db: Engine, clock: FixedClock, fake: FakeSendGrid) -> None:
    runtime = Runtime.load(settings(), clock, engine=db, migrate_db=False)
    assert webhooks_from(runtime).sendgrid is None  # the repository's email channel is console
    app = FastAPI()
    app.include_router(make_webhook_router(runtime))
    with Served(app) as served:
        response = fake.post_events(served.url + EVENTS, [], timestamp=now(clock))
    assert response.status_code == 403


def test_a_signed_body_that_is_not_an_event_list_is_a_bad_request(
        clock: FixedClock, fake: FakeSendGrid, server: Served) -> None:
    body = b'{"event": "delivered"}'
    headers = fake.sign(body, str(int(now(clock))))
    response = httpx.post(server.url + EVENTS, content=body, headers=headers, timeout=5)
    assert response.status_code == 400


def project_with_sendgrid(tmp_path: Path, **channel: Any) -> Settings:
    """A copy of the repository's config whose email channel is SendGrid."""
    config = tmp_path / "config"
    shutil.copytree(ROOT / "config", config)
    email = {"adapter": "sendgrid", "contact": "email",
             "settings": {"api_key": API_KEY, "from_email": "club@example.com", **channel}}
    (config / "channels.yaml").write_text(json.dumps({"version": 1, "channels": {
        "email": email, "sms": {"adapter": "console", "contact": "phone"},
        "chat": {"adapter": "console", "contact": "chat_id"}}}), encoding="utf-8")
    return Settings(rules_dir=tmp_path / "rules", templates_dir=ROOT / "templates",
                    config_dir=config)


def test_the_key_comes_from_the_channel_settings_or_their_overrides(
        tmp_path: Path, db: Engine, clock: FixedClock, fake: FakeSendGrid) -> None:
    (tmp_path / "rules").mkdir()
    pem_key = ec.generate_private_key(ec.SECP256R1())
    pem = pem_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    runtime = Runtime.load(
        project_with_sendgrid(tmp_path, event_webhook_public_key=fake.public_key,
                              event_webhook_max_age=60),
        clock, engine=db, migrate_db=False)
    found = sendgrid_webhook_from(runtime)
    assert found is not None
    assert (found.channel, found.max_age) == ("email", timedelta(seconds=60))
    assert public_key_of(fake.signing_key) == fake.public_key
    runtime.channels()  # the adapter accepts its settings, the webhook's included
    runtime.channel_overrides = {"email": {"event_webhook_public_key": pem.decode()}}
    overridden = sendgrid_webhook_from(runtime)
    assert overridden is not None
    assert overridden.public_key.public_numbers() == pem_key.public_key().public_numbers()
    runtime.channel_overrides = {"email": {"event_webhook_public_key": "bm90IGEga2V5"}}
    with pytest.raises(ValueError, match="not a public key"):
        sendgrid_webhook_from(runtime)
