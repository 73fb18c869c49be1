"""Opt-outs from send results: a provider's opt-out answer withdraws marketing consent on that
channel, and no further marketing message goes out on it; a bad number is recorded as such."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select

from channels.base import Channel, load_adapter
from engine.clock import FixedClock
from engine.config import ProjectConfig
from engine.dispatch import NO_CONSENT, Dispatcher
from engine.evaluation import Evaluator
from engine.ingest import CustomerIn, Ingestor, MembershipIn
from engine.models import ConsentEntry, Customer, Message, Outcome
from engine.templates import TemplateStore
from tests.conftest import ROOT, make_trigger
from tests.fakes.twilio import ACCOUNT_SID, AUTH_TOKEN, FakeTwilio

os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ["no_proxy"] = "127.0.0.1,localhost"

TEMPLATES = TemplateStore(ROOT / "tests" / "testdata" / "templates")
CLUB = {"name": "Riverside"}


@pytest.fixture(scope="module")
def twilio() -> Iterator[FakeTwilio]:
    fake = FakeTwilio()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def sms(twilio: FakeTwilio) -> Iterator[Channel]:
    twilio.reset()
    channel = load_adapter("twilio_sms").from_config("sms", {
        "account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "from_number": "+15550001111",
        "base_url": twilio.url, "rate_per_second": None, "timeout": 5.0})
    yield channel
    channel.close()


def queue(db: Engine, clock: FixedClock, config: ProjectConfig, *trigger_ids: str,
          purpose: str = "marketing") -> None:
    """Ann, ten days into her membership, gets one SMS per trigger id."""
    today = clock.now().date()
    ing = Ingestor(db, clock)
    ing.customers([CustomerIn(external_id="ann", first_name="Ann", phone="+15551230000")])
    ing.memberships([MembershipIn(external_id="m-ann", customer_external_id="ann",
                                  starts_on=today - timedelta(days=10),
                                  ends_on=today + timedelta(days=355))])
    triggers = [make_trigger(id=tid, when={"stage_entered": "onboarding"}, purpose=purpose,
                             action={"channel": "sms", "template": "test/hello"})
                for tid in trigger_ids]
    assert Evaluator(db, config, triggers, clock).tick().messages == len(trigger_ids)


def ann(db: Engine) -> int:
    with db.connect() as conn:
        return int(conn.execute(select(Customer.id).where(Customer.external_id == "ann"))
                   .scalar_one())


def rows(db: Engine, model: Any, *columns: str) -> list[dict[str, Any]]:
    t = model.__table__
    with db.connect() as conn:
        return [dict(r) for r in conn.execute(
            select(*(t.c[c] for c in columns)).order_by(t.c.id)).mappings()]


def dispatcher(db: Engine, clock: FixedClock, channel: Channel, **options: Any) -> Dispatcher:
    return Dispatcher(db, TEMPLATES, {"sms": channel}, clock, club=CLUB, **options)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_an_opt_out_answer_withdraws_consent_and_stops_the_next_sms(
        concurrency: int, db: Engine, clock: FixedClock, project_config: ProjectConfig,
        twilio: FakeTwilio, sms: Channel) -> None:
    queue(db, clock, project_config, "welcome", "tips")
    twilio.fail("21610")
    d = dispatcher(db, clock, sms, concurrency=concurrency)
    first = d.run_once(batch_size=1)
    assert (first.claimed, first.failed) == (1, 1) and len(twilio.requests) == 1
    [entry] = rows(db, ConsentEntry, "channel", "purpose", "granted", "source")
    assert entry == {"channel": "sms", "purpose": "marketing", "granted": False,
                     "source": "twilio:21610"}
    second = d.drain()
    assert (second.claimed, second.failed) == (1, 1)
    assert len(twilio.requests) == 1  # the second SMS was never requested
    outbox = rows(db, Message, "status", "last_error")
    assert outbox[0]["last_error"].startswith("opt_out: twilio 21610")
    assert outbox[1] == {"status": "failed", "last_error": NO_CONSENT}
    assert [o["detail"] for o in rows(db, Outcome, "detail")][1] == {"error": NO_CONSENT}


def test_an_opt_out_stops_the_rest_of_the_same_batch(
        db: Engine, clock: FixedClock, project_config: ProjectConfig, twilio: FakeTwilio,
        sms: Channel) -> None:
    queue(db, clock, project_config, "welcome", "tips")
    twilio.fail("21610")
    report = dispatcher(db, clock, sms).drain()
    assert (report.claimed, report.failed) == (2, 2) and len(twilio.requests) == 1
    assert [r["last_error"] for r in rows(db, Message, "last_error")][1] == NO_CONSENT
    assert len(rows(db, ConsentEntry, "id")) == 1


def test_consent_given_again_lets_marketing_through(
        db: Engine, clock: FixedClock, project_config: ProjectConfig, twilio: FakeTwilio,
        sms: Channel) -> None:
    queue(db, clock, project_config, "welcome")
    now, customer = clock.now(), ann(db)
    with db.begin() as conn:
        conn.execute(insert(ConsentEntry), [
            {"customer_id": customer, "channel": "sms", "purpose": "marketing", "granted": granted,
             "occurred_at": now, "source": "test"} for granted in (False, True)])
        conn.execute(insert(ConsentEntry).values(  # another channel's withdrawal: irrelevant
            customer_id=customer, channel="email", purpose="marketing", granted=False,
            occurred_at=now, source="test"))
    assert dispatcher(db, clock, sms).drain().sent == 1 and len(twilio.requests) == 1


def test_a_withdrawal_does_not_stop_transactional_messages(
        db: Engine, clock: FixedClock, project_config: ProjectConfig, twilio: FakeTwilio,
        sms: Channel) -> None:
    queue(db, clock, project_config, "receipt", purpose="transactional")
    customer = ann(db)
    with db.begin() as conn:
        conn.execute(insert(ConsentEntry).values(
            customer_id=customer, channel="sms", purpose="marketing", granted=False,
            occurred_at=clock.now(), source="test"))
    blind = dispatcher(db, clock, sms, trigger_purposes={"receipt": "transactional"})
    assert blind.drain().sent == 1 and len(twilio.requests) == 1


def test_an_invalid_number_is_recorded_as_a_bad_contact_point(
        db: Engine, clock: FixedClock, project_config: ProjectConfig, twilio: FakeTwilio,
        sms: Channel) -> None:
    queue(db, clock, project_config, "welcome")
    twilio.fail("21211")
    assert dispatcher(db, clock, sms).drain().failed == 1
    [outcome] = rows(db, Outcome, "status", "detail")
    assert outcome["status"] == "failed"
    assert outcome["detail"]["error_class"] == "invalid_recipient"
    assert outcome["detail"]["contact_point"] == {"channel": "sms", "recipient": "+15551230000",
                                                  "valid": False}
    assert rows(db, ConsentEntry, "id") == []  # a bad number is not a withdrawal
