"""Shared fixtures: an injected clock, a migrated database per test (SQLite, and PostgreSQL when
TOUCHPOINTS_TEST_POSTGRES_URL names a server), the repository's config, triggers from dicts."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from ruamel.yaml import YAML
from sqlalchemy import Engine, delete, event, text

from engine.clock import FixedClock
from engine.conditions import Condition, compile_condition
from engine.config import (
    ChannelsFile,
    ClubFile,
    ConsentDefaults,
    LifecycleFile,
    PolicyFile,
    ProjectConfig,
)
from engine.db import make_engine, migrate
from engine.ingest import EventIn, Ingestor, MembershipIn
from engine.models import (
    Base,
    Counter,
    Customer,
    Event,
    Membership,
    Occurrence,
    StageChange,
    Tick,
    TriggerState,
)
from engine.rulefile import Trigger

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("TOUCHPOINTS_TEST_POSTGRES_URL")

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


def _backends() -> list[Any]:
    skip = pytest.mark.skip(reason="TOUCHPOINTS_TEST_POSTGRES_URL is not set: no PostgreSQL server "
                                   "to test against")
    return ["sqlite", pytest.param("postgresql", marks=[pytest.mark.postgres]
                                   + ([] if PG_URL else [skip]))]


@pytest.fixture(params=_backends())
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A freshly migrated database on each backend."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'test.db'}")
    else:
        assert PG_URL
        engine = make_engine(PG_URL)
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(datetime(2026, 3, 2, 9, 0))


def _yaml(path: Path) -> Any:
    return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))


OPEN_POLICY = PolicyFile(consent=ConsentDefaults(marketing_otherwise="granted"), quiet_hours={},
                         frequency_caps=[], cycle_budget=None)


@pytest.fixture(scope="session")
def project_config() -> ProjectConfig:
    """The repository's own config/ directory, validated by the models, with a contact policy
    that lets everything through (consent by default, no quiet hours, caps or budget): tests of
    evaluation see evaluation alone; tests of the policy set their own."""
    cfg = ROOT / "config"
    return ProjectConfig(
        club=ClubFile.model_validate(_yaml(cfg / "club.yaml")),
        lifecycle=LifecycleFile.model_validate(_yaml(cfg / "lifecycle.yaml")),
        channels=ChannelsFile.model_validate(_yaml(cfg / "channels.yaml")),
        policy=OPEN_POLICY,
    )


@dataclass
class Loaded:
    """A trigger as the loader hands it to the evaluator."""

    trigger: Trigger
    conditions: list[Condition]
    path: str = "rules/test.yaml"
    sha256: str = "0" * 64


T = TypeVar("T")


def listening(db: Engine, name: str, listener: Callable[..., None], run: Callable[[], T]) -> T:
    """`run()`'s result, with `listener` on `db`'s cursor event `name` while it runs."""
    event.listen(db, name, listener)
    try:
        return run()
    finally:
        event.remove(db, name, listener)


def make_trigger(**fields: Any) -> Loaded:
    data = {"action": {"channel": "email", "template": "test/hello"}, **fields}
    trig = Trigger.model_validate(data)
    return Loaded(trig, [compile_condition(c) for c in trig.conditions])


def empty_club(*dbs: Engine) -> None:
    """Delete the customers and everything ticks wrote about them: a fresh start for each
    Hypothesis example on the same database."""
    for db in dbs:
        with db.begin() as conn:
            for model in (Occurrence, StageChange, Tick, TriggerState, Event, Membership,
                          Customer, Counter):
                conn.execute(delete(model))


def ingest_step(ing: Ingestor, now: datetime, what: str, who: str, *,
                renewal: timedelta) -> None:
    """What a Hypothesis step ingests before its tick: nothing ("none"), a visit of `who` at
    `now` ("visit"), or a new membership of theirs from today, `renewal` long ("renew")."""
    if what == "visit":
        ing.events([EventIn(customer_external_id=who, kind="visit", occurred_at=now)])
    elif what == "renew":
        today = now.date()
        ing.memberships([MembershipIn(external_id=f"renewal-{who}-{today}",
                                      customer_external_id=who, starts_on=today,
                                      ends_on=today + renewal)])


__all__ = ["Base", "Loaded", "empty_club", "ingest_step", "make_trigger"]
