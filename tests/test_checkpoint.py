"""SQLite's write-ahead log: the tick commits without copying it into the database file, and the
checkpointer copies it after the tick, on a thread of its own."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event

from engine.clock import FixedClock
from engine.config import ProjectConfig
from engine.db import Checkpoint, WalCheckpointer, make_engine, migrate
from engine.evaluation import Evaluator
from tests.conftest import make_trigger
from tests.test_evaluation import seed


class Held(WalCheckpointer):
    """A checkpointer that counts the requests and does not act on them."""

    requests = 0

    def request(self) -> None:
        self.requests += 1


@pytest.fixture
def eager(tmp_path: Path) -> Iterator[Engine]:
    """A SQLite database whose connections checkpoint at every commit that leaves a page in
    the log (`wal_autocheckpoint=1`): whatever a commit leaves there, it left on purpose."""
    engine = make_engine(f"sqlite:///{tmp_path / 'club.db'}")

    @event.listens_for(engine, "connect")
    def _eager(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute("PRAGMA wal_autocheckpoint=1")

    migrate(engine)
    yield engine
    engine.dispose()


def in_file(engine: Engine, tmp_path: Path, sql: str) -> Any:
    """`sql`'s answer from the database file alone, without its log: a copy of the file, opened
    where no log lies beside it."""
    path = Path(str(engine.url.database))
    alone = tmp_path / "alone" / path.name
    alone.parent.mkdir(exist_ok=True)
    shutil.copyfile(path, alone)
    conn = sqlite3.connect(alone)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


def autocheckpoint(engine: Engine) -> int:
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        return int(raw.execute("PRAGMA wal_autocheckpoint").fetchone()[0])


def ticked(engine: Engine, clock: FixedClock, config: ProjectConfig) -> Evaluator:
    seed(engine, clock)
    trig = make_trigger(id="renewal-entry", when={"stage_entered": "renewal_due"})
    return Evaluator(engine, config, [trig], clock)


def test_the_tick_commits_without_a_checkpoint_and_asks_for_one(
        eager: Engine, tmp_path: Path, clock: FixedClock, project_config: ProjectConfig) -> None:
    ev = ticked(eager, clock, project_config)
    assert ev.checkpoints is not None
    ev.checkpoints = held = Held(eager)
    result = ev.tick()
    assert result.occurrences == {"renewal-entry": 1}
    assert held.requests == 1
    # the tick's rows are in the log only; the customers ingested before it are in the file
    assert in_file(eager, tmp_path, "SELECT count(*) FROM occurrences") == 0
    assert in_file(eager, tmp_path, "SELECT count(*) FROM stage_history") == 0
    assert in_file(eager, tmp_path, "SELECT count(*) FROM customers") == 3
    # and the connection that ticked checkpoints its other commits again
    assert autocheckpoint(eager) == 1

    done = WalCheckpointer(eager).checkpoint()
    assert done.complete and done.frames > 0
    assert in_file(eager, tmp_path, "SELECT count(*) FROM occurrences") == 1
    assert in_file(eager, tmp_path, "SELECT count(*) FROM stage_history") == 3


def test_the_checkpointer_copies_the_log_after_the_tick(
        eager: Engine, tmp_path: Path, clock: FixedClock, project_config: ProjectConfig) -> None:
    ev = ticked(eager, clock, project_config)
    ev.tick()
    assert ev.checkpoints is not None
    done = ev.checkpoints.wait()
    assert done is not None and done.complete and done.frames > 0
    assert in_file(eager, tmp_path, "SELECT count(*) FROM occurrences") == 1


def test_a_dry_run_asks_for_no_checkpoint(
        eager: Engine, clock: FixedClock, project_config: ProjectConfig) -> None:
    ev = ticked(eager, clock, project_config)
    ev.checkpoints = held = Held(eager)
    assert ev.tick(dry_run=True).occurrences == {"renewal-entry": 1}
    assert held.requests == 0


def test_a_reader_keeps_what_it_still_reads_in_the_log(
        eager: Engine, tmp_path: Path, clock: FixedClock, project_config: ProjectConfig) -> None:
    ev = ticked(eager, clock, project_config)
    ev.checkpoints = Held(eager)
    ev.tick()  # 3 stage changes in the log
    reader = sqlite3.connect(str(eager.url.database), isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM stage_history").fetchone()[0] == 3
        # every membership has ended: Ann's and Bob's stages change
        clock.advance(timedelta(days=400))
        ev.tick()
        partial = WalCheckpointer(eager).checkpoint()
        # (the file alone shows no consistent state until the checkpoint is complete: a page
        # the second tick wrote again is left in the log with the rest of that tick)
        assert not partial.complete and 0 < partial.copied < partial.frames
    finally:
        reader.close()
    assert WalCheckpointer(eager).checkpoint().complete
    assert in_file(eager, tmp_path, "SELECT count(*) FROM stage_history") == 5


class Gated(WalCheckpointer):
    """A checkpointer whose checkpoints wait for the test's go, and are counted."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.go = threading.Event()
        self.started = threading.Semaphore(0)
        self.runs = 0

    def checkpoint(self) -> Checkpoint:
        self.started.release()
        assert self.go.wait(10)
        self.runs += 1
        return super().checkpoint()


def test_requests_during_a_checkpoint_get_one_more_after_it(
        eager: Engine, clock: FixedClock, project_config: ProjectConfig) -> None:
    ev = ticked(eager, clock, project_config)
    ev.checkpoints = gated = Gated(eager)
    ev.tick()
    assert gated.started.acquire(timeout=10)  # the first checkpoint is under way
    ev.tick()
    gated.request()
    gated.go.set()
    done = gated.wait()
    assert gated.runs == 2  # the first, and one for both requests made while it ran
    assert done is not None and done.complete


def test_a_database_without_a_log_is_not_checkpointed(tmp_path: Path) -> None:
    path = tmp_path / "rollback.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    plain = create_engine(f"sqlite:///{path}")  # rollback journal: no write-ahead log
    try:
        done = WalCheckpointer(plain).checkpoint()
    finally:
        plain.dispose()
    assert done.busy and not done.complete


def test_only_a_sqlite_file_has_a_log_to_checkpoint(
        db: Engine, project_config: ProjectConfig, clock: FixedClock) -> None:
    assert (Evaluator(db, project_config, [], clock).checkpoints is None) == (
        db.dialect.name != "sqlite")
    memory = make_engine("sqlite://")
    assert Evaluator(memory, project_config, [], clock).checkpoints is None
