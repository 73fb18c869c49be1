"""Two `touchpoints tick` processes at once against one database create each occurrence once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from engine.clock import FixedClock
from engine.ingest import CustomerIn, Ingestor, MembershipIn
from engine.models import Message, Occurrence
from tests.conftest import ROOT


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
