"""End to end: the evaluator queues a message, the dispatcher sends it through a real adapter and
its real SDK to a local fake provider, and the outbox records what happened."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from channels.base import Channel, load_adapter
from engine.clock import FixedClock
from engine.config import ProjectConfig
from engine.dispatch import Dispatcher
from engine.evaluation import Evaluator
from engine.ingest import CustomerIn, Ingestor, MembershipIn
from engine.models import Message, Outcome
from engine.templates import TemplateStore
from tests.conftest import ROOT, make_trigger
from tests.fakes import Fake
from tests.fakes.sendgrid import API_KEY, FakeSendGrid
from tests.fakes.smtp import PASSWORD, USERNAME, FakeSmtp, make_certificate
from tests.fakes.telegram import BOT_TOKEN, FakeTelegram
from tests.fakes.twilio import ACCOUNT_SID, AUTH_TOKEN, FakeTwilio
from tests.fakes.webhook import PATH, SECRET, FakeReceiver

os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ["no_proxy"] = "127.0.0.1,localhost"

TEMPLATES = TemplateStore(ROOT / "tests" / "testdata" / "templates")
CLUB = {"name": "Riverside"}
AnyFake = Fake | FakeSmtp


@dataclass(frozen=True)
class Route:
    """An adapter serving one of the configured channel names, pointed at its fake."""

    adapter: str
    channel: str  # a channel of config/channels.yaml: email, sms or chat
    recipient: str

    def settings(self, fake: Any, **overrides: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "sendgrid": lambda: {"api_key": API_KEY, "from_email": "club@example.com",
                                 "host": fake.url},
            "smtp": lambda: {"host": fake.host, "port": fake.port, "username": USERNAME,
                             "password": PASSWORD, "ca_file": str(fake.cert),
                             "from_email": "club@example.com"},
            "twilio_sms": lambda: {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN,
                                   "from_number": "+15550001111", "base_url": fake.url,
                                   "rate_per_second": None},
            "twilio_whatsapp": lambda: {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN,
                                        "from_number": "+15550001111", "base_url": fake.url,
                                        "rate_per_second": None},
            "telegram": lambda: {"bot_token": BOT_TOKEN, "api_base": fake.url,
                                 "rate_per_second": None},
            "webhook": lambda: {"url": fake.url + PATH, "secret": SECRET},
        }[self.adapter]()
        return {**base, "timeout": 5.0, **overrides}


ROUTES = [
    Route("sendgrid", "email", "ann@example.com"),
    Route("smtp", "email", "ann@example.com"),
    Route("twilio_sms", "sms", "+15551230000"),
    Route("twilio_whatsapp", "sms", "+15551230000"),
    Route("telegram", "chat", "4242"),
    Route("webhook", "email", "ann@example.com"),
]


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, AnyFake]]:
    cert, key = make_certificate(tmp_path_factory.mktemp("smtp-tls"))
    running: dict[str, AnyFake] = {}
    try:
        for name, make in (("sendgrid", FakeSendGrid), ("twilio", FakeTwilio),
                           ("telegram", FakeTelegram), ("webhook", FakeReceiver)):
            running[name] = make()
            running[name].start()
        running["smtp"] = FakeSmtp(cert, key)
        running["smtp"].start()
        yield running
    finally:
        for fake in running.values():
            fake.stop()


def fake_for(fakes: dict[str, AnyFake], route: Route) -> AnyFake:
    fake = fakes["twilio" if route.adapter.startswith("twilio") else route.adapter]
    fake.reset()
    return fake


@pytest.fixture
def channels() -> Iterator[list[Channel]]:
    built: list[Channel] = []
    yield built
    for channel in built:
        channel.close()


def build(route: Route, fake: AnyFake, built: list[Channel], **overrides: Any) -> Channel:
    adapter = load_adapter(route.adapter).from_config(route.channel,
                                                      route.settings(fake, **overrides))
    built.append(adapter)
    return adapter


def queue_one(db: Engine, clock: FixedClock, config: ProjectConfig, channel: str) -> None:
    """Ann, two weeks into her membership, gets the welcome message on `channel`."""
    today = clock.now().date()
    ing = Ingestor(db, clock)
    ing.customers([CustomerIn(external_id="ann", first_name="Ann", email="ann@example.com",
                              phone="+15551230000", chat_id="4242")])
    ing.memberships([MembershipIn(external_id="m-ann", customer_external_id="ann",
                                  starts_on=today - timedelta(days=10),
                                  ends_on=today + timedelta(days=355))])
    trig = make_trigger(id="welcome", when={"stage_entered": "onboarding"},
                        action={"channel": channel, "template": "test/hello"})
    assert Evaluator(db, config, [trig], clock).tick().messages == 1


def outbox(db: Engine) -> list[dict[str, Any]]:
    with db.connect() as conn:
        return [dict(r) for r in conn.execute(
            select(Message.status, Message.provider_message_id, Message.last_error,
                   Message.recipient, Message.attempts, Message.due_at)).mappings()]


def outcomes(db: Engine) -> list[str]:
    with db.connect() as conn:
        return list(conn.execute(select(Outcome.status).order_by(Outcome.id)).scalars())


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.adapter)
def test_a_queued_message_is_delivered_through_the_real_sdk(
        route: Route, db: Engine, clock: FixedClock, project_config: ProjectConfig,
        fakes: dict[str, AnyFake], channels: list[Channel]) -> None:
    queue_one(db, clock, project_config, route.channel)
    fake = fake_for(fakes, route)
    adapter = build(route, fake, channels)
    report = Dispatcher(db, TEMPLATES, {route.channel: adapter}, clock, club=CLUB).drain()
    assert (report.claimed, report.sent) == (1, 1)
    [row] = outbox(db)
    assert row["status"] == "sent" and row["recipient"] == route.recipient
    assert len(fake.requests) == 1 and fake.issued == [row["provider_message_id"]]
    assert outcomes(db) == ["sent"]
    # sent is final: nothing goes out again
    clock.advance(timedelta(hours=1))
    assert Dispatcher(db, TEMPLATES, {route.channel: adapter}, clock, club=CLUB).drain() \
        .claimed == 0
    assert len(fake.requests) == 1


def test_a_recipient_who_replied_stop_fails_as_opt_out(
        db: Engine, clock: FixedClock, project_config: ProjectConfig,
        fakes: dict[str, AnyFake], channels: list[Channel]) -> None:
    route = ROUTES[2]
    queue_one(db, clock, project_config, route.channel)
    fake = fake_for(fakes, route)
    fake.fail("21610")
    adapter = build(route, fake, channels)
    dispatcher = Dispatcher(db, TEMPLATES, {route.channel: adapter}, clock, club=CLUB)
    assert dispatcher.drain().failed == 1
    [row] = outbox(db)
    assert row["status"] == "failed" and row["provider_message_id"] is None
    assert row["last_error"].startswith("opt_out: twilio 21610")
    assert AUTH_TOKEN not in row["last_error"]
    clock.advance(timedelta(days=1))
    assert dispatcher.drain().claimed == 0 and len(fake.requests) == 1  # never retried
    assert outcomes(db) == ["failed"]


def test_a_rate_limited_send_waits_for_retry_after_then_goes_out(
        db: Engine, clock: FixedClock, project_config: ProjectConfig,
        fakes: dict[str, AnyFake], channels: list[Channel]) -> None:
    route = ROUTES[2]
    queue_one(db, clock, project_config, route.channel)
    fake = fake_for(fakes, route)
    fake.fail("20429")  # Twilio answers Retry-After: 7
    adapter = build(route, fake, channels)
    dispatcher = Dispatcher(db, TEMPLATES, {route.channel: adapter}, clock, club=CLUB)
    assert dispatcher.drain().retried == 1
    [row] = outbox(db)
    assert row["status"] == "queued" and row["due_at"] == clock.now() + timedelta(seconds=7)
    fake.reset()
    clock.advance(timedelta(seconds=6))
    assert dispatcher.drain().claimed == 0
    clock.advance(timedelta(seconds=2))
    assert dispatcher.drain().sent == 1
    [row] = outbox(db)
    assert row["status"] == "sent" and row["attempts"] == 2
    assert row["provider_message_id"] == fake.issued[0]


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.adapter)
def test_a_timeout_after_the_request_arrived_leaves_one_request_and_unknown(
        route: Route, db: Engine, clock: FixedClock, project_config: ProjectConfig,
        fakes: dict[str, AnyFake], channels: list[Channel]) -> None:
    queue_one(db, clock, project_config, route.channel)
    fake = fake_for(fakes, route)
    fake.delay(3.0)
    adapter = build(route, fake, channels, timeout=0.3)
    dispatcher = Dispatcher(db, TEMPLATES, {route.channel: adapter}, clock, club=CLUB)
    assert dispatcher.drain().unknown == 1
    assert len(fake.requests) == 1
    clock.advance(timedelta(hours=1))
    assert dispatcher.drain().claimed == 0
    assert len(fake.requests) == 1  # never sent again
    [row] = outbox(db)
    assert row["status"] == "unknown" and row["provider_message_id"] is None
    assert row["last_error"].startswith("unknown: ")
    assert outcomes(db) == ["unknown"]


def test_the_outbox_keeps_no_secret(db: Engine, clock: FixedClock, tmp_path: Path,
                                    project_config: ProjectConfig, fakes: dict[str, AnyFake],
                                    channels: list[Channel]) -> None:
    route = ROUTES[4]  # telegram: the token is in the URL path
    queue_one(db, clock, project_config, route.channel)
    fake = fake_for(fakes, route)
    fake.drop()
    adapter = build(route, fake, channels)
    Dispatcher(db, TEMPLATES, {route.channel: adapter}, clock, club=CLUB).drain()
    [row] = outbox(db)
    assert row["status"] == "unknown"
    assert BOT_TOKEN.split(":")[1] not in row["last_error"]
