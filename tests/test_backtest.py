"""A backtest of the club's rules over the demo's history sends nothing and reports the same
messages per trigger as the live run did."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select

from engine.backtest import reason_kind, run_backtest
from engine.db import make_engine
from engine.demo import run_demo
from engine.models import Message
from engine.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _settings() -> Settings:
    return Settings(rules_dir=ROOT / "rules", templates_dir=ROOT / "templates",
                    config_dir=ROOT / "config")


def test_backtest_of_the_demo_matches_the_live_run(tmp_path: Path) -> None:
    live = run_demo(members=300, days=16, seed=3, workdir=tmp_path / "demo",
                    config_path=ROOT / "config" / "demo.yaml", settings=_settings(),
                    write_report=False)
    assert sum(live.messages_by_trigger.values()) > 50
    outbox_lines = live.outbox_path.read_text().count("\n")
    source = _settings().model_copy(update={"database_url": live.database_url})
    start = live.config.start
    report = run_backtest(source, start, start + timedelta(days=live.days - 1),
                          scratch=tmp_path / "scratch.db")
    assert report.ticks == live.ticks
    assert report.per_trigger() == {k: v for k, v in sorted(live.messages_by_trigger.items())}
    totals = report.totals()
    assert sum(t.held_out for t in totals.values()) == live.held_out
    assert sum(sum(t.stopped.values()) for t in totals.values()) == live.skipped
    assert {ch for t in totals.values() for ch in t.channels} <= {"email", "sms", "chat"}
    # nothing was sent: the scratch outbox is all queued, the source and console untouched
    scratch = make_engine(report.scratch_url)
    with scratch.connect() as conn:
        statuses = dict(conn.execute(select(Message.status, func.count())
                                     .group_by(Message.status)).all())
    scratch.dispose()
    assert set(statuses) == {"queued"}
    assert live.outbox_path.read_text().count("\n") == outbox_lines


def test_reason_kinds() -> None:
    assert reason_kind("frequency_cap 1 per 1d") == "frequency_cap"
    assert reason_kind("no_consent (sms); no_contact_point (email)") == "no_consent"
    assert reason_kind("lower_priority than welcome") == "lower_priority"
    assert reason_kind("cycle_budget 15/15") == "cycle_budget"
    assert reason_kind(None) == "unknown"
