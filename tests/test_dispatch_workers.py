"""Several dispatcher processes against one database: each message sent once, senders paced
together through the database."""

from __future__ import annotations

import json
import multiprocessing
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from typer.testing import CliRunner

from channels.console import ConsoleChannel
from channels.ratelimit import RateLimiter
from channels.twilio_sms import TwilioSmsChannel
from engine.cli import app
from engine.clock import FixedClock
from engine.config import ProjectConfig
from engine.db import make_engine
from engine.dispatch import DatabaseBuckets, Dispatcher, DispatchReport
from engine.evaluation import Evaluator
from engine.ingest import CustomerIn, Ingestor, MembershipIn
from engine.models import Message, Outcome
from engine.runtime import Runtime
from engine.settings import Settings
from engine.templates import TemplateStore
from tests.conftest import ROOT, make_trigger
from tests.fakes.twilio import ACCOUNT_SID, AUTH_TOKEN

TEMPLATES = ROOT / "tests" / "testdata" / "templates"
NOW = datetime(2026, 3, 2, 9, 0)


def queue(db: Engine, clock: FixedClock, config: ProjectConfig, n: int) -> None:
    ing = Ingestor(db, clock)
    today = clock.now().date()
    ing.customers([CustomerIn(external_id=f"c{i}", first_name=f"C{i}", email=f"c{i}@example.com")
                   for i in range(n)])
    ing.memberships([MembershipIn(external_id=f"m{i}", customer_external_id=f"c{i}",
                                  starts_on=today, ends_on=today + timedelta(days=365))
                     for i in range(n)])
    trig = make_trigger(id="welcome", when={"stage_entered": "onboarding"})
    assert Evaluator(db, config, [trig], clock).tick().messages == n


def drain_worker(url: str, log: str, go: Any) -> DispatchReport:
    """One dispatcher process: waits for the others, then drains in small claims."""
    engine = make_engine(url)
    channel = ConsoleChannel.from_config("email", {"path": log})
    dispatcher = Dispatcher(engine, TemplateStore(TEMPLATES), {"email": channel},
                            FixedClock(NOW), club={"name": "Riverside"}, concurrency=4,
                            pacing=DatabaseBuckets(engine))
    go.wait(60)
    try:
        return dispatcher.drain(batch_size=5)
    finally:
        dispatcher.close()
        engine.dispose()


def test_worker_processes_send_each_message_once(db: Engine, tmp_path: Path,
                                                 project_config: ProjectConfig) -> None:
    queue(db, FixedClock(NOW), project_config, 60)
    log = tmp_path / "sent.jsonl"
    ctx = multiprocessing.get_context("spawn")
    url = db.url.render_as_string(hide_password=False)
    with ctx.Manager() as manager, ctx.Pool(3) as pool:
        go = manager.Event()
        pending = [pool.apply_async(drain_worker, (url, str(log), go)) for _ in range(3)]
        go.set()
        reports = [p.get(timeout=120) for p in pending]
    sent = [json.loads(line)["id"] for line in log.read_text().splitlines()]
    with db.connect() as conn:
        ids = list(conn.execute(select(Message.id)).scalars())
        statuses = set(conn.execute(select(Message.status)).scalars())
        outcomes = conn.execute(select(func.count()).select_from(Outcome)).scalar_one()
    assert sorted(sent) == sorted(ids) and len(ids) == 60  # every message, none twice
    assert statuses == {"sent"} and outcomes == 60
    assert sum(r.claimed for r in reports) == sum(r.sent for r in reports) == 60


class Ticking:
    """A wall clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_database_buckets_pace_a_sender_across_instances(db: Engine) -> None:
    clock = Ticking()
    one, two = DatabaseBuckets(db, clock=clock), DatabaseBuckets(db, clock=clock)  # 2 processes
    waits = [store.reserve(("twilio_sms", "+1555"), 50.0, 1) for store in (one, two, one, two)]
    assert waits == [0.0, 0.02, 0.04, 0.06]
    assert one.reserve(("twilio_sms", "+1666"), 50.0, 1) == 0.0  # another sender, another bucket
    clock.now += 1.0  # the bucket has refilled: a burst of 3 goes at once, then one each 10 ms
    assert [two.reserve("burst", 100.0, 3) for _ in range(4)] == [0.0, 0.0, 0.0, 0.01]


def test_pacing_store_reaches_the_channels_limiters(db: Engine) -> None:
    limiter = RateLimiter(5.0)
    sms = TwilioSmsChannel.from_config("sms", {"account_sid": ACCOUNT_SID,
                                               "auth_token": AUTH_TOKEN,
                                               "from_number": "+15550001111"})
    sms.limiter = limiter  # type: ignore[attr-defined]
    store = DatabaseBuckets(db)
    Dispatcher(db, TemplateStore(TEMPLATES), {"sms": sms}, FixedClock(NOW), pacing=store)
    assert limiter.store is store


def test_dispatch_command_with_worker_processes(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    outbox = tmp_path / "outbox.jsonl"
    for name, value in {"DATABASE_URL": f"sqlite:///{tmp_path / 'tp.db'}",
                        "RULES_DIR": ROOT / "rules", "TEMPLATES_DIR": ROOT / "templates",
                        "CONFIG_DIR": ROOT / "config", "CONSOLE_OUTBOX_PATH": outbox}.items():
        monkeypatch.setenv(f"TOUCHPOINTS_{name}", str(value))
    clock = FixedClock(datetime(2026, 3, 2, 10, 0))
    runtime = Runtime.load(Settings(), clock)
    today = clock.now().date()
    runtime.ingestor.customers([CustomerIn(external_id=f"c{i}", first_name=f"C{i}",
                                           email=f"c{i}@example.com") for i in range(20)])
    runtime.ingestor.memberships([MembershipIn(
        external_id=f"m{i}", customer_external_id=f"c{i}", starts_on=today,
        ends_on=today + timedelta(days=365)) for i in range(20)])
    queued = runtime.evaluator.tick().messages
    runtime.engine.dispose()
    assert queued > 0
    result = CliRunner().invoke(app, ["dispatch", "--workers", "2", "--concurrency", "3",
                                      "--now", "2026-03-02T10:00:00"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    sent = [json.loads(line)["id"] for line in outbox.read_text().splitlines()]
    assert report["claimed"] == report["sent"] == len(sent) == len(set(sent)) == queued
