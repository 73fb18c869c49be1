"""Two `touchpoints tick` processes at once against one database create each occurrence once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select

from engine.clock import FixedClock
from engine.config import ProjectConfig
from engine.evaluation import Evaluator
from engine.ingest import CustomerIn, EventIn, Ingestor, MembershipIn
from engine.models import Customer, Message, Occurrence
from tests.conftest import ROOT, make_trigger


def test_two_tick_processes(db: Engine, clock: FixedClock) -> None:
    ing = Ingestor(db, clock)
    today = clock.now().date()
    n = 300
    ing.customers([CustomerIn(external_id=f"c{i}", email=f"c{i}@example.com",
                              phone="+4915112345678") for i in range(n)])
    ing.memberships([MembershipIn(external_id=f"m{i}", customer_external_id=f"c{i}",
                                  plan="monthly", starts_on=today - timedelta(days=40 + i % 40),
                                  ends_on=today + timedelta(days=(i % 60) - 10))
                     for i in range(n)])
    env = {**os.environ, "TOUCHPOINTS_DATABASE_URL": db.url.render_as_string(hide_password=False),
           "TOUCHPOINTS_RULES_DIR": str(ROOT / "rules"),
           "TOUCHPOINTS_TEMPLATES_DIR": str(ROOT / "templates"),
           "TOUCHPOINTS_CONFIG_DIR": str(ROOT / "config")}
    now = (clock.now() + timedelta(hours=10)).isoformat()
    cmd = [sys.executable, "-m", "engine.cli", "tick", "--now", now]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    created = [sum(r["occurrences"].values()) for r in results]
    assert max(created) > 0 and min(created) == 0  # one did the work, the other found it done
    with db.connect() as conn:
        occurrences = conn.execute(select(func.count()).select_from(Occurrence)).scalar()
        keys = conn.execute(select(func.count()).select_from(
            select(Occurrence.trigger_id, Occurrence.customer_id, Occurrence.scope_key)
            .distinct().subquery())).scalar()
        messages = conn.execute(select(func.count()).select_from(Message)).scalar()
        per_occurrence = conn.execute(select(func.count(Message.occurrence_id.distinct()))).scalar()
    assert occurrences == keys == sum(created)
    assert messages == per_occurrence


def test_event_batch_committing_late_is_not_skipped(db: Engine, clock: FixedClock,
                                                    project_config: ProjectConfig) -> None:
    """Batch A inserts its visit and stalls before committing; batch B arrives meanwhile; a tick
    runs, then both commit. The next tick still fires for both visits: B cannot commit ids
    above A's while A is open, so the first tick's event watermark does not pass A's visit."""
    if db.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: event batches cannot interleave there")
    ing = Ingestor(db, clock)
    today = clock.now().date()
    ing.customers([CustomerIn(external_id=name, email=f"{name}@example.com")
                   for name in ("ann", "bob")])
    ing.memberships([MembershipIn(external_id=f"m-{name}", customer_external_id=name,
                                  starts_on=today - timedelta(days=60),
                                  ends_on=today + timedelta(days=300)) for name in ("ann", "bob")])
    ev = Evaluator(db, project_config, [make_trigger(id="visit", when={"event": "visit"})], clock)
    ev.tick()

    inserted, release = threading.Event(), threading.Event()
    owner: list[int] = []  # the thread of batch A, the one to stall

    def stall(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("INSERT INTO events") and threading.get_ident() in owner:
            inserted.set()
            release.wait(30)

    event.listen(db, "after_cursor_execute", stall)
    try:
        visit = clock.now()

        def batch_a() -> None:
            owner.append(threading.get_ident())
            ing.events([EventIn(customer_external_id="ann", kind="visit", occurred_at=visit)])

        a = threading.Thread(target=batch_a)
        b = threading.Thread(target=lambda: ing.events(
            [EventIn(customer_external_id="bob", kind="visit", occurred_at=visit)]))
        a.start()
        assert inserted.wait(30)
        b.start()
        b.join(2)  # B waits for A (or, were batches unordered, commits now)
        clock.advance(timedelta(minutes=1))
        ev.tick()
        release.set()
        a.join(30)
        b.join(30)
    finally:
        release.set()
        event.remove(db, "after_cursor_execute", stall)
    clock.advance(timedelta(minutes=1))
    ev.tick()
    with db.connect() as conn:
        fired = set(conn.execute(select(Customer.external_id).join(
            Occurrence, Occurrence.customer_id == Customer.id)).scalars())
    assert fired == {"ann", "bob"}


@pytest.mark.parametrize("level,code", [("OFF", 0), ("NORMAL", 1), ("FULL", 2)])
def test_sqlite_durability_is_the_configured_one(tmp_path: Path, level: str, code: int) -> None:
    from engine.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'd.db'}", sqlite_synchronous=level)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == code
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()
    with pytest.raises(ValueError, match="expected OFF, NORMAL or FULL, got 'LAZY'"):
        make_engine("sqlite://", sqlite_synchronous="LAZY")
