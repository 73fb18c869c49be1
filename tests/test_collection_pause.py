"""Ticks and ingestion batches run their transactions with Python's cyclic garbage collector held
off (`engine.db.collection_paused`), and it resumes after them."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from engine.clock import FixedClock
from engine.config import ProjectConfig
from engine.db import collection_paused, take_lease
from engine.evaluation import TICK_LEASE, Evaluator, TickBusy
from engine.ingest import EventIn
from tests.conftest import listening, make_trigger
from tests.test_evaluation import seed


@pytest.fixture(autouse=True)
def collector_on() -> Iterator[None]:
    """Each test starts with the collector on, and leaves it on."""
    gc.enable()
    yield
    gc.enable()


def test_a_tick_and_ingestion_run_every_statement_with_the_collector_off(
        db: Engine, clock: FixedClock, project_config: ProjectConfig) -> None:
    seen: list[bool] = []

    def record(*_: Any) -> None:
        seen.append(gc.isenabled())

    def work() -> None:
        ing = seed(db, clock)
        ing.events([EventIn(customer_external_id="ann", kind="visit", occurred_at=clock.now())])
        Evaluator(db, project_config, [make_trigger(id="hi", stage="onboarding",
                                                    when={"event": "visit"})], clock).tick()

    listening(db, "before_cursor_execute", record, work)
    assert len(seen) > 20
    assert not any(seen)
    assert gc.isenabled()


def test_a_tick_that_fails_turns_the_collector_back_on(
        db: Engine, clock: FixedClock, project_config: ProjectConfig) -> None:
    with db.begin() as conn:
        assert take_lease(conn, TICK_LEASE, "another process", clock.now(), timedelta(minutes=5))
    with pytest.raises(TickBusy):
        Evaluator(db, project_config, [], clock).tick()
    assert gc.isenabled()


def test_the_collector_resumes_when_the_last_block_ends_on_any_thread() -> None:
    entered, leave = threading.Event(), threading.Event()

    def other() -> None:
        with collection_paused():
            entered.set()
            leave.wait(10)

    thread = threading.Thread(target=other)
    with collection_paused():
        thread.start()
        assert entered.wait(10)
        assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread's block is still open
    leave.set()
    thread.join(10)
    assert gc.isenabled()


def test_a_collector_the_process_turned_off_stays_off() -> None:
    gc.disable()
    with collection_paused(), collection_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()
