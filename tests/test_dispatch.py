"""The dispatcher: render, send, record; retries; an unknown result is never sent again."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from channels.base import Channel, OutgoingMessage, SendResult, SendStatus
from channels.console import ConsoleChannel
from engine.clock import FixedClock
from engine.config import ProjectConfig
from engine.dispatch import Dispatcher
from engine.evaluation import Evaluator
from engine.ingest import CustomerIn, Ingestor, MembershipIn
from engine.models import Message, Outcome
from engine.templates import TemplateStore
from tests.conftest import ROOT, make_trigger
from tests.test_evaluation import seed

TEMPLATES = TemplateStore(ROOT / "tests" / "testdata" / "templates")
CLUB = {"name": "Riverside"}


class Recording(Channel):
    """A channel that answers from a script and remembers every request it was given."""

    def __init__(self, answers: list[SendResult]) -> None:
        super().__init__("email", Channel.Settings())
        self.answers = answers
        self.requests: list[OutgoingMessage] = []

    def send(self, message: OutgoingMessage) -> SendResult:
        self.requests.append(message)
        return self.answers.pop(0) if self.answers else SendResult(SendStatus.SENT, "p-1")


def queue_one(db: Engine, clock: FixedClock, config: ProjectConfig,
              template: str = "test/hello") -> None:
    seed(db, clock)
    trig = make_trigger(id="welcome", when={"stage_entered": "onboarding"},
                        action={"channel": "email", "template": template})
    assert Evaluator(db, config, [trig], clock).tick().messages == 1  # ann


def statuses(db: Engine) -> list[str]:
    with db.connect() as conn:
        return list(conn.execute(select(Message.status)).scalars())


def outcomes(db: Engine) -> list[str]:
    with db.connect() as conn:
        return list(conn.execute(select(Outcome.status).order_by(Outcome.id)).scalars())


def test_console_channel_end_to_end(db: Engine, clock: FixedClock, tmp_path: Path,
                                    project_config: ProjectConfig) -> None:
    queue_one(db, clock, project_config)
    path = tmp_path / "out.jsonl"
    console = ConsoleChannel.from_config("email", {"path": str(path)})
    report = Dispatcher(db, TEMPLATES, {"email": console}, clock, club=CLUB).drain()
    assert report.sent == 1
    line = json.loads(path.read_text())
    assert line["to"] == "ann@example.com" and line["subject"] == "Hello Ann"
    assert "see you at Riverside" in line["body"]
    assert statuses(db) == ["sent"] and outcomes(db) == ["sent"]
    assert Dispatcher(db, TEMPLATES, {"email": console}, clock, club=CLUB).drain().claimed == 0


def test_unknown_result_is_not_sent_again(db: Engine, clock: FixedClock,
                                          project_config: ProjectConfig) -> None:
    queue_one(db, clock, project_config)
    channel = Recording([SendResult(SendStatus.UNKNOWN, error="timeout after request")])
    dispatcher = Dispatcher(db, TEMPLATES, {"email": channel}, clock, club=CLUB)
    dispatcher.drain()
    clock.advance(timedelta(hours=1))
    dispatcher.drain()
    assert len(channel.requests) == 1
    assert statuses(db) == ["unknown"] and outcomes(db) == ["unknown"]


def test_transient_failure_is_retried_later(db: Engine, clock: FixedClock,
                                            project_config: ProjectConfig) -> None:
    queue_one(db, clock, project_config)
    channel = Recording([SendResult(SendStatus.RETRY, error="429", retry_after=30)])
    dispatcher = Dispatcher(db, TEMPLATES, {"email": channel}, clock, club=CLUB)
    dispatcher.drain()
    assert statuses(db) == ["queued"] and len(channel.requests) == 1
    clock.advance(timedelta(seconds=10))
    assert dispatcher.drain().claimed == 0  # not due before Retry-After
    clock.advance(timedelta(seconds=21))
    assert dispatcher.drain().sent == 1
    assert len(channel.requests) == 2 and statuses(db) == ["sent"]


def test_crash_while_sending_becomes_unknown(db: Engine, clock: FixedClock,
                                             project_config: ProjectConfig) -> None:
    """A worker that died after marking `sending` leaves the message for reconciliation."""
    queue_one(db, clock, project_config)
    channel = Recording([])
    dead = Dispatcher(db, TEMPLATES, {"email": channel}, clock, club=CLUB, worker="dead")
    claimed = dead.claim(10)
    assert dead._mark_sending(claimed[0]["id"])
    # ... and the process is killed here, before any result was recorded.
    alive = Dispatcher(db, TEMPLATES, {"email": channel}, clock, club=CLUB, worker="alive")
    assert alive.drain().claimed == 0
    clock.advance(timedelta(minutes=6))
    assert alive.drain().claimed == 0
    assert channel.requests == [] and statuses(db) == ["unknown"]


def test_expired_claim_before_sending_is_claimed_again(db: Engine, clock: FixedClock,
                                                       project_config: ProjectConfig) -> None:
    queue_one(db, clock, project_config)
    channel = Recording([])
    Dispatcher(db, TEMPLATES, {"email": channel}, clock, club=CLUB, worker="dead").claim(10)
    alive = Dispatcher(db, TEMPLATES, {"email": channel}, clock, club=CLUB, worker="alive")
    assert alive.drain().claimed == 0  # still claimed by the dead worker
    clock.advance(timedelta(minutes=6))
    assert alive.drain().sent == 1 and len(channel.requests) == 1


def test_render_error_fails_the_message_only(db: Engine, clock: FixedClock,
                                             project_config: ProjectConfig) -> None:
    queue_one(db, clock, project_config, template="test/broken")
    channel = Recording([])
    report = Dispatcher(db, TEMPLATES, {"email": channel}, clock, club=CLUB).drain()
    assert report.failed == 1 and channel.requests == []
    with db.connect() as conn:
        error = conn.execute(select(Message.last_error)).scalar_one()
    assert error is not None and "nickname" in error


def test_two_workers_never_claim_the_same_message(db: Engine, clock: FixedClock,
                                                  project_config: ProjectConfig) -> None:
    ing = Ingestor(db, clock)
    today = clock.now().date()
    ing.customers([CustomerIn(external_id=f"c{i}", email=f"c{i}@example.com") for i in range(60)])
    ing.memberships([MembershipIn(external_id=f"m{i}", customer_external_id=f"c{i}",
                                  starts_on=today, ends_on=today + timedelta(days=365))
                     for i in range(60)])
    trig = make_trigger(id="welcome", when={"stage_entered": "onboarding"})
    assert Evaluator(db, project_config, [trig], clock).tick().messages == 60
    workers = [Dispatcher(db, TEMPLATES, {}, clock, worker=f"w{i}") for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        claims = list(pool.map(lambda w: [r["id"] for r in w.claim(25)], workers))
    claimed = [mid for ids in claims for mid in ids]
    assert len(claimed) == len(set(claimed)) == 60


class Checking(Channel):
    """Thread-safe; checks that each message is committed as `sending` before its request."""

    def __init__(self, db: Engine) -> None:
        super().__init__("email", Channel.Settings())
        self.db = db
        self.lock = threading.Lock()
        self.requests: list[int] = []
        self.not_sending: list[int] = []
        self.in_flight = 0
        self.most_in_flight = 0

    def send(self, message: OutgoingMessage) -> SendResult:
        with self.db.connect() as conn:
            status = conn.execute(select(Message.status)
                                  .where(Message.id == message.message_id)).scalar_one()
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(0.01)  # the provider's latency: sends must overlap
        with self.lock:
            self.in_flight -= 1
            self.requests.append(message.message_id)
            if status != "sending":
                self.not_sending.append(message.message_id)
        return SendResult(SendStatus.SENT, f"p-{message.message_id}")


def test_concurrent_sends_each_message_once_after_marking_it_sending(
        db: Engine, clock: FixedClock, project_config: ProjectConfig) -> None:
    ing = Ingestor(db, clock)
    today = clock.now().date()
    ing.customers([CustomerIn(external_id=f"c{i}", first_name=f"C{i}", email=f"c{i}@example.com")
                   for i in range(40)])
    ing.memberships([MembershipIn(external_id=f"m{i}", customer_external_id=f"c{i}",
                                  starts_on=today, ends_on=today + timedelta(days=365))
                     for i in range(40)])
    trig = make_trigger(id="welcome", when={"stage_entered": "onboarding"})
    assert Evaluator(db, project_config, [trig], clock).tick().messages == 40
    channel = Checking(db)
    dispatcher = Dispatcher(db, TEMPLATES, {"email": channel}, clock, club=CLUB, concurrency=8)
    report = dispatcher.drain(batch_size=25)
    assert (report.claimed, report.sent) == (40, 40)
    assert sorted(channel.requests) == sorted(set(channel.requests)) and len(channel.requests) == 40
    assert channel.not_sending == []
    assert statuses(db) == ["sent"] * 40 and outcomes(db) == ["sent"] * 40
    assert channel.most_in_flight > 1  # overlapped, not one after another
    assert dispatcher.drain().claimed == 0
    dispatcher.close()


def test_concurrency_must_be_positive(db: Engine, clock: FixedClock) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        Dispatcher(db, TEMPLATES, {}, clock, concurrency=0)
