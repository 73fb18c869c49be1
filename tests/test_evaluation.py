"""The tick over a small base: stages, each kind of `when`, re-entry scopes, holdout, outbox."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import Engine, event, func, select
from sqlalchemy.engine.default import CACHE_HIT

from engine.clock import FixedClock
from engine.config import ProjectConfig
from engine.db import analyze_if_grown, make_engine, migrate
from engine.evaluation import Evaluator, TickKind
from engine.ingest import CustomerIn, EventIn, Ingestor, MembershipIn
from engine.models import MEMBERSHIP_MIRROR, Customer, Membership, Message, Occurrence, StageChange
from tests.conftest import listening, make_trigger

T = TypeVar("T")


def seed(db: Engine, clock: FixedClock) -> Ingestor:
    ing = Ingestor(db, clock)
    ing.customers([
        CustomerIn(external_id="ann", first_name="Ann", email="ann@example.com",
                   timezone="America/Los_Angeles"),
        CustomerIn(external_id="bob", first_name="Bob", phone="+4915112345678"),
        CustomerIn(external_id="cat", first_name="Cat", email="cat@example.com"),
    ])
    today = clock.now().date()
    ing.memberships([
        MembershipIn(external_id="m-ann", customer_external_id="ann", plan="annual", price=480,
                     starts_on=today - timedelta(days=10), ends_on=today + timedelta(days=355)),
        MembershipIn(external_id="m-bob", customer_external_id="bob", plan="monthly", price=40,
                     starts_on=today - timedelta(days=300), ends_on=today + timedelta(days=14)),
        MembershipIn(external_id="m-cat", customer_external_id="cat", plan="corporate", price=0,
                     starts_on=today - timedelta(days=400), ends_on=today - timedelta(days=35)),
    ])
    return ing


def occurrence_plans(db: Engine, run: Callable[[], T]) -> tuple[T, list[list[Any]]]:
    """`run()`'s result, and the plan of each occurrence INSERT it executed: explained in the
    tick's own connection as it runs (an incremental tick's copies are that connection's
    temporary tables), EXPLAIN QUERY PLAN rows on SQLite, EXPLAIN lines on PostgreSQL."""
    prefix = "EXPLAIN QUERY PLAN " if db.dialect.name == "sqlite" else "EXPLAIN "
    plans: list[list[Any]] = []

    def explain(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        if statement.startswith("INSERT INTO occurrences"):
            plans.append(cursor.connection.execute(prefix + statement, params).fetchall())

    return listening(db, "after_cursor_execute", explain, run), plans


def stages(db: Engine) -> dict[str, str | None]:
    with db.connect() as conn:
        return dict(conn.execute(select(Customer.external_id, Customer.stage)).all())


def test_stages_are_computed_and_recorded(db: Engine, clock: FixedClock,
                                          project_config: ProjectConfig) -> None:
    seed(db, clock)
    ev = Evaluator(db, project_config, [], clock)
    result = ev.tick()
    assert stages(db) == {"ann": "onboarding", "bob": "renewal_due", "cat": "lapsed"}
    assert result.stage_changes == 3
    assert ev.tick().stage_changes == 0
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(StageChange)).scalar() == 3


def test_stage_entered_trigger_fires_once_per_cycle(db: Engine, clock: FixedClock,
                                                    project_config: ProjectConfig) -> None:
    seed(db, clock)
    trig = make_trigger(id="renewal-entry", when={"stage_entered": "renewal_due"})
    ev = Evaluator(db, project_config, [trig], clock)
    first = ev.tick()
    assert first.occurrences == {"renewal-entry": 1}
    assert first.messages == 0 and first.skipped == 1  # bob has no email and no fallback
    assert ev.tick().occurrences == {"renewal-entry": 0}


def test_fallback_channel_and_outbox(db: Engine, clock: FixedClock,
                                     project_config: ProjectConfig) -> None:
    seed(db, clock)
    trig = make_trigger(id="renewal-entry", when={"stage_entered": "renewal_due"},
                        action={"channel": "email", "template": "t/x", "fallback": ["sms"]})
    Evaluator(db, project_config, [trig], clock).tick()
    with db.connect() as conn:
        rows = conn.execute(select(Message.channel, Message.recipient, Message.status)).all()
    assert rows == [("sms", "+4915112345678", "queued")]


def test_relative_trigger_fires_at_local_time(db: Engine, clock: FixedClock,
                                              project_config: ProjectConfig) -> None:
    seed(db, clock)
    # Bob (club time zone, Europe/Berlin) ends in 14 days; 09:00 UTC is 10:00 in Berlin in March.
    trig = make_trigger(id="reminder-14d", when={"before": "membership.ends_at", "days": 14,
                                                 "at": "10:30"},
                        action={"channel": "sms", "template": "t/x"})
    ev = Evaluator(db, project_config, [trig], clock)
    assert ev.tick().occurrences == {"reminder-14d": 0}  # 10:00 local, not yet 10:30
    clock.advance(timedelta(minutes=30))
    assert ev.tick().occurrences == {"reminder-14d": 1}
    clock.advance(timedelta(hours=3))
    assert ev.tick().occurrences == {"reminder-14d": 0}


def test_event_trigger_with_conditions(db: Engine, clock: FixedClock,
                                       project_config: ProjectConfig) -> None:
    ing = seed(db, clock)
    trig = make_trigger(id="first-visit", when={"event": "visit"},
                        conditions=["visits_total == 1", 'plan != "corporate"'])
    ev = Evaluator(db, project_config, [trig], clock)
    ev.tick()
    now = clock.now()
    ing.events([EventIn(customer_external_id="ann", kind="visit", occurred_at=now),
                EventIn(customer_external_id="cat", kind="visit", occurred_at=now)])
    assert ev.tick(kind=TickKind.INCREMENTAL).occurrences == {"first-visit": 1}
    ing.events([EventIn(customer_external_id="ann", kind="visit", occurred_at=now)])
    assert ev.tick().occurrences == {"first-visit": 0}


def test_incremental_tick_reads_all_new_events_of_a_trigger_new_to_it(
        db: Engine, clock: FixedClock, project_config: ProjectConfig) -> None:
    """An incremental tick reads event triggers through the changed customers only when the
    trigger has read every event up to the previous tick. A trigger added since reads its whole
    window, for customers unchanged since that tick too; one that has caught up reads the
    changed customers, whose events these are."""
    ing = seed(db, clock)
    known = make_trigger(id="known", when={"event": "visit", "within": "7d"})
    Evaluator(db, project_config, [known], clock).tick()
    ing.events([EventIn(customer_external_id=name, kind="visit", occurred_at=clock.now())
                for name in ("ann", "bob")])
    clock.advance(timedelta(minutes=5))
    assert Evaluator(db, project_config, [known], clock).tick(
        kind=TickKind.INCREMENTAL).occurrences == {"known": 2}
    added = make_trigger(id="added", when={"event": "visit", "within": "7d"})
    both = Evaluator(db, project_config, [known, added], clock)
    clock.advance(timedelta(minutes=5))
    # nobody changed since the last tick: `added` still fires for the two visits in its window
    assert both.tick(kind=TickKind.INCREMENTAL).occurrences == {"known": 0, "added": 2}
    ing.events([EventIn(customer_external_id="cat", kind="visit", occurred_at=clock.now())])
    clock.advance(timedelta(minutes=5))
    assert both.tick(kind=TickKind.INCREMENTAL).occurrences == {"known": 1, "added": 1}


def test_holdout_is_recorded_not_sent(db: Engine, clock: FixedClock,
                                      project_config: ProjectConfig) -> None:
    ing = Ingestor(db, clock)
    today = clock.now().date()
    ing.customers([CustomerIn(external_id=f"c{i}", email=f"c{i}@example.com") for i in range(400)])
    ing.memberships([MembershipIn(external_id=f"m{i}", customer_external_id=f"c{i}",
                                  starts_on=today, ends_on=today + timedelta(days=365))
                     for i in range(400)])
    trig = make_trigger(id="welcome", when={"stage_entered": "onboarding"}, holdout="25%")
    result = Evaluator(db, project_config, [trig], clock).tick()
    assert result.occurrences == {"welcome": 400}
    assert 60 < result.held_out < 140
    assert result.messages == 400 - result.held_out
    with db.connect() as conn:
        queued = conn.execute(select(func.count()).select_from(Message)).scalar()
        held = conn.execute(select(func.count()).where(Occurrence.arm == "holdout")).scalar()
    assert queued == result.messages and held == result.held_out


def test_dry_run_writes_nothing(db: Engine, clock: FixedClock,
                                project_config: ProjectConfig) -> None:
    seed(db, clock)
    trig = make_trigger(id="renewal-entry", when={"stage_entered": "renewal_due"},
                        action={"channel": "sms", "template": "t/x"})
    ev = Evaluator(db, project_config, [trig], clock)
    assert ev.tick(dry_run=True).occurrences == {"renewal-entry": 1}
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Occurrence)).scalar() == 0
        assert conn.execute(select(func.count()).select_from(StageChange)).scalar() == 0
    assert ev.tick().occurrences == {"renewal-entry": 1}


def test_new_cycle_reenters_stages(db: Engine, clock: FixedClock,
                                   project_config: ProjectConfig) -> None:
    ing = seed(db, clock)
    trig = make_trigger(id="welcome", when={"stage_entered": "onboarding"})
    ev = Evaluator(db, project_config, [trig], clock)
    assert ev.tick().occurrences == {"welcome": 1}  # ann
    today = clock.now().date()
    ing.memberships([MembershipIn(external_id="m-cat-2", customer_external_id="cat",
                                  starts_on=today, ends_on=date(today.year + 1, 1, 1))])
    assert ev.tick(kind=TickKind.INCREMENTAL).occurrences == {"welcome": 1}  # cat's new cycle
    assert stages(db)["cat"] == "onboarding"


def test_schedule_trigger(db: Engine, clock: FixedClock, project_config: ProjectConfig) -> None:
    seed(db, clock)
    trig = make_trigger(id="weekly", when={"schedule": "0 8 * * *"}, once="per_event",
                        stage="onboarding")
    ev = Evaluator(db, project_config, [trig], clock)
    # 09:00 UTC: 10:00 Berlin (slot 08:00 passed), 01:00 Los Angeles (yesterday's slot in range).
    assert ev.tick().occurrences == {"weekly": 1}
    assert ev.tick().occurrences == {"weekly": 0}
    clock.set(datetime(2026, 3, 2, 16, 30))  # 08:30 in Los Angeles: a new slot
    assert ev.tick().occurrences == {"weekly": 1}


def test_preview_counts_without_writing(db: Engine, clock: FixedClock,
                                        project_config: ProjectConfig) -> None:
    seed(db, clock)
    trig = make_trigger(id="renewal-entry", when={"stage_entered": "renewal_due"},
                        action={"channel": "sms", "template": "t/x"}, conditions=["price < 100"])
    ev = Evaluator(db, project_config, [trig], clock)
    preview = ev.preview("renewal-entry")
    assert preview["would_fire"] == 1
    assert preview["matching_conditions"] == 2  # bob and cat: no stage filter, both < 100
    assert [s["external_id"] for s in preview["sample"]] == ["bob"]
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(StageChange)).scalar() == 0


def test_a_tick_that_fills_empty_tables_refreshes_their_statistics(
        db: Engine, clock: FixedClock, project_config: ProjectConfig) -> None:
    """On PostgreSQL, a tick that writes most of the occurrences and outbox rows ANALYZEs them,
    so that the next statements are not planned for empty tables; small ticks do not."""
    if db.dialect.name != "postgresql":
        pytest.skip("statistics are refreshed on PostgreSQL only")
    ing = Ingestor(db, clock)
    ing.customers([CustomerIn(external_id=f"c{i}", email=f"c{i}@example.com")
                   for i in range(80)])
    trig = make_trigger(id="everyone", when={"stage_entered": "lapsed"},
                        action={"channel": "email", "template": "t/x"})

    def reltuples(name: str) -> float:
        with db.connect() as conn:
            return float(conn.exec_driver_sql(
                f"SELECT reltuples FROM pg_class WHERE oid = '{name}'::regclass").scalar_one())

    assert reltuples("occurrences") <= 0  # never analysed
    result = Evaluator(db, project_config, [trig], clock).tick()
    assert result.occurrences == {"everyone": 80} and result.messages == 80
    assert reltuples("occurrences") == 80 and reltuples("outbox") == 80
    with db.begin() as conn:
        assert not analyze_if_grown(conn, "occurrences", 57)  # under 50 + 10% of 80
        assert analyze_if_grown(conn, "occurrences", 59)
        assert not analyze_if_grown(conn, "occurrences", 130, share=1.0)  # not doubled
        assert analyze_if_grown(conn, "occurrences", 131, share=1.0)


@pytest.mark.parametrize("when,conditions,stage,driver,ticks", [
    ({"before": "membership.ends_at", "days": 14, "at": "10:00"}, [], "renewal_due",
     "ix_customers_membership_ends_on", 1),
    ({"after": "membership.starts_at", "days": 5, "at": "10:00"}, [], "onboarding",
     "ix_customers_membership_starts_on", 1),
    ({"schedule": "0 9 * * *"}, ["days_since_last_visit == 10"], "active",
     "ix_customers_last_visit_at", 1),
    # a whole stage in key order; a stage in the few zones where the slot passed
    ({"schedule": "0 9 * * *"}, [], "active", "ix_customers_stage", 1),
    ({"schedule": "0 14 * * sun"}, [], "active", "ix_customers_stage_timezone", 1),
    # an event trigger's first tick reads its `within` window; later ticks, its new events
    ({"event": "visit"}, [], None, "ix_events_kind_occurred_at_customer_id", 1),
    ({"event": "visit"}, [], None, "ix_events_kind_id", 2),
])
def test_sqlite_reads_each_trigger_through_its_own_index(
        tmp_path: Path, clock: FixedClock, project_config: ProjectConfig, when: dict[str, Any],
        conditions: list[str], stage: str | None, driver: str, ticks: int) -> None:
    """A club's SQLite database has no planner statistics (nothing analyses it), so the index a
    trigger is read through is the evaluator's choice: the anchor date of a date trigger (the
    current membership's, on the customer rows), the range of a day count, else the stage and
    zone; for an event trigger, the event time at its first tick and the event id after. Read
    through the stage, a date trigger at a million customers scanned every customer in the
    stage (the steady tick took 5.6 s instead of 2.9); read by id, a visit trigger's first tick
    read every visit ever recorded."""
    db = make_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    migrate(db)
    ingest = seed(db, clock)
    trig = make_trigger(id="t", when=when, conditions=conditions,
                        **({"stage": stage} if stage else {}))
    evaluator = Evaluator(db, project_config, [trig], clock)
    seen: list[tuple[str, Any]] = []

    def keep(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        if statement.startswith("INSERT INTO occurrences"):
            seen.append((statement, params))

    for _ in range(ticks):
        clock.advance(timedelta(hours=12))
        ingest.events([EventIn(customer_external_id="ann", kind="visit",
                               occurred_at=clock.now() - timedelta(hours=1))])
        seen.clear()
        event.listen(db, "before_cursor_execute", keep)
        evaluator.tick()
        event.remove(db, "before_cursor_execute", keep)
    assert len(seen) == 1
    with db.connect() as conn:
        plan = [row[3] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + seen[0][0],
                                                       seen[0][1])]
    db.dispose()
    reads = [step for step in plan if step.startswith("SEARCH") or step.startswith("SCAN")]
    assert f"INDEX {driver} " in reads[0], plan
    assert not any("ix_customers_stage" in step for step in reads[1:]), plan
    # a date or schedule trigger passes over, by its unique key, the customers it has already
    # fired for in this scope (every full tick reads its day of due customers again)
    keyed = "(trigger_id=? AND customer_id=? AND scope_key=?)"
    assert any(keyed in step for step in reads) == ("event" not in when), plan


@pytest.mark.parametrize(("when", "conditions", "stage"), [
    ({"before": "membership.ends_at", "days": 21, "at": "09:00"},
     ["days_since_last_visit > 14"], "renewal_due"),
    ({"schedule": "0 9 * * *"}, ["days_since_last_visit == 10"], "active"),
    ({"schedule": "0 9 * * *"}, [], "active"),
])
def test_sqlite_reads_a_settled_slot_through_the_ids_to_read_again(
        tmp_path: Path, clock: FixedClock, project_config: ProjectConfig, when: dict[str, Any],
        conditions: list[str], stage: str | None) -> None:
    """A full tick a minute after the previous one reads a date or schedule trigger's slot
    through the list of customers to read again, not through the anchor, day-count or stage
    index: through the anchor's index, SQLite probed each anchor's customers for every id of
    the list (3.6 s for one trigger at a million customers after 10,000 changes)."""
    db = make_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    migrate(db)
    seed(db, clock)
    trig = make_trigger(id="t", when=when, conditions=conditions,
                        **({"stage": stage} if stage else {}))
    evaluator = Evaluator(db, project_config, [trig], clock)
    evaluator.tick()
    clock.advance(timedelta(minutes=1))
    seen: list[tuple[str, Any]] = []

    def keep(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        if statement.startswith("INSERT INTO occurrences"):
            seen.append((statement, params))

    event.listen(db, "before_cursor_execute", keep)
    evaluator.tick()
    event.remove(db, "before_cursor_execute", keep)
    assert len(seen) == 1
    with db.connect() as conn:
        plan = [(row[0], row[1], row[3]) for row in conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN " + seen[0][0], seen[0][1])]
    db.dispose()
    # the candidates' own reads, in the co-routine the INSERT reads them from (the list's own
    # reads use the indexes, as they should)
    root = next(node for node, _, step in plan if step == "CO-ROUTINE fired")
    reads = [step for _, parent, step in plan
             if parent == root and step.startswith(("SEARCH", "SCAN"))]
    assert reads[0] == "SEARCH customers USING INTEGER PRIMARY KEY (rowid=?)", plan
    assert not any(index in step for step in reads for index in (
        "ix_customers_membership_ends_on", "ix_customers_last_visit_at",
        "ix_customers_stage")), plan


@pytest.mark.parametrize(("when", "anchor"), [
    ({"before": "membership.ends_at", "days": 14, "at": "10:00"}, "ends_on"),
    ({"after": "membership.starts_at", "days": 5, "at": "10:00"}, "starts_on"),
])
def test_sqlite_reads_the_changed_customers_due_by_the_copies_anchor_index(
        tmp_path: Path, clock: FixedClock, project_config: ProjectConfig, when: dict[str, Any],
        anchor: str) -> None:
    """An incremental tick reads a date trigger's changed customers through the anchor date's
    index on their copy (the current membership's columns on their rows), and reads the copy
    no other way: the few changed customers due today, not a pass over every changed customer
    for each date trigger, and no second read of them for their membership."""
    db = make_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    migrate(db)
    ingest = seed(db, clock)
    evaluator = Evaluator(db, project_config, [make_trigger(id="t", when=when)], clock)
    evaluator.tick()
    clock.advance(timedelta(minutes=5))
    ingest.events([EventIn(customer_external_id="bob", kind="visit", occurred_at=clock.now())])
    _, explained = occurrence_plans(db, lambda: evaluator.tick(kind=TickKind.INCREMENTAL))
    db.dispose()
    plans = [[row[3] for row in rows] for rows in explained]
    assert len(plans) == 1
    reads = [step for step in plans[0] if step.startswith(("SEARCH", "SCAN"))]
    # each anchor date of the zones (a multi-index OR where they differ), then the customers
    memberships = [step for step in reads if step.startswith(
        "SEARCH tick_changed_customers USING INDEX "
        f"ix_tick_changed_customers_membership_{anchor} ")]
    assert reads[0] in memberships, plans
    assert not [step for step in reads
                if "tick_changed_customers" in step and step not in memberships], plans


def test_a_membership_moved_to_another_customer_leaves_its_previous_owners_row(
        db: Engine, clock: FixedClock, project_config: ProjectConfig) -> None:
    """A membership ingested again under another customer moves: the previous owner's current
    membership and its columns on their row are computed again (none left here), so a tick,
    which reads them there, no longer finds them due for its dates."""
    ing = seed(db, clock)
    today = clock.now().date()
    # Bob's membership ends in 14 days: the reminder's anchor
    reminder = make_trigger(id="reminder", when={"before": "membership.ends_at", "days": 14,
                                                 "at": "00:00"})
    ing.memberships([MembershipIn(external_id="m-bob", customer_external_id="ann",
                                  plan="monthly", price=40,
                                  starts_on=today - timedelta(days=300),
                                  ends_on=today + timedelta(days=14))])
    c, m = Customer.__table__, Membership.__table__
    with db.connect() as conn:
        rows = {r.external_id: r for r in conn.execute(select(
            c.c.external_id, c.c.current_membership_id, c.c.membership_plan,
            c.c.membership_ends_on, c.c.lifetime_value,
            select(m.c.external_id).where(m.c.id == c.c.current_membership_id)
            .scalar_subquery().label("current")))}
    assert (rows["bob"].current_membership_id, rows["bob"].membership_plan,
            rows["bob"].membership_ends_on, rows["bob"].lifetime_value) == (None, None, None, 0)
    # Ann's own membership began later: still her current one
    assert (rows["ann"].current, rows["ann"].membership_plan, rows["ann"].lifetime_value) == (
        "m-ann", "annual", 520)
    result = Evaluator(db, project_config, [reminder], clock).tick()
    assert result.occurrences == {"reminder": 0}


def test_ticks_read_the_customers_memberships_from_their_rows(
        db: Engine, clock: FixedClock, project_config: ProjectConfig) -> None:
    """Ingestion keeps the current membership's columns on the customer row, and ticks read the
    customers' memberships from there: no statement of a full or an incremental tick reads
    `memberships`, a date trigger finds its due customers by the anchor date on their rows. A
    renewal to another plan is what the next incremental tick sees; an earlier term ingested
    later, or a change to a membership that is not the current one, leaves the customer's
    current membership as it was."""
    ing = seed(db, clock)
    trig = make_trigger(id="t", when={"event": "visit"}, once="per_event",
                        conditions=['plan == "annual"', 'membership_status == "active"',
                                    "price >= 500", "days_until_membership_end > 300"])
    # Bob's membership ends in 14 days
    reminder = make_trigger(id="reminder", when={"before": "membership.ends_at", "days": 14,
                                                 "at": "00:00"}, conditions=["price < 100"])
    evaluator = Evaluator(db, project_config, [trig, reminder], clock)
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    first = listening(db, "before_cursor_execute", record, evaluator.tick)
    assert first.occurrences == {"t": 0, "reminder": 1}
    today = clock.now().date()
    ing.memberships([
        MembershipIn(external_id="m-bob-2", customer_external_id="bob", plan="annual",
                     price=520, starts_on=today, ends_on=today + timedelta(days=364)),
        # an earlier term of Ann's, and a change to Cat's ended one (her current): only Cat's
        # columns change
        MembershipIn(external_id="m-ann-0", customer_external_id="ann", plan="monthly",
                     price=40, starts_on=today - timedelta(days=60),
                     ends_on=today - timedelta(days=31)),
        MembershipIn(external_id="m-cat", customer_external_id="cat", plan="corporate", price=0,
                     starts_on=today - timedelta(days=400), ends_on=today - timedelta(days=35),
                     status="cancelled"),
    ])
    m, c = Membership.__table__, Customer.__table__
    with db.connect() as conn:
        same = (c.c[name] == m.c[column] for name, column in MEMBERSHIP_MIRROR.items())
        mirrored = conn.execute(
            select(c.c.external_id, m.c.external_id, *same)
            .join(m, m.c.id == c.c.current_membership_id).order_by(c.c.external_id)).all()
    assert [tuple(row) for row in mirrored] == [
        ("ann", "m-ann", *[True] * 5), ("bob", "m-bob-2", *[True] * 5),
        ("cat", "m-cat", *[True] * 5)], mirrored
    clock.advance(timedelta(minutes=5))
    ing.events([EventIn(customer_external_id=who, kind="visit", occurred_at=clock.now())
                for who in ("ann", "bob", "cat")])
    result = listening(db, "before_cursor_execute", record,
                       lambda: evaluator.tick(kind=TickKind.INCREMENTAL))
    # Bob's new annual membership (and its end a year away: no second reminder); Ann's price
    # is 480
    assert result.occurrences == {"t": 1, "reminder": 0}
    with db.connect() as conn:
        fired = conn.execute(select(Occurrence.trigger_id, Customer.external_id).join(
            Customer, Occurrence.customer_id == Customer.id).order_by(Occurrence.id)).all()
    assert [tuple(row) for row in fired] == [("reminder", "bob"), ("t", "bob")]
    # a full tick a day later restages the customers whose membership day counts crossed a
    # boundary of the stages (found by the membership's dates on their rows)
    restaged: list[str] = []
    clock.advance(timedelta(days=1))
    listening(db, "before_cursor_execute", record,
              lambda: listening(db, "before_cursor_execute",
                                lambda conn, cursor, statement, *args: restaged.append(statement)
                                if statement.startswith("INSERT INTO stage_history") else None,
                                evaluator.tick))
    assert len(restaged) == 1 and "membership_ends_on BETWEEN" in restaged[0], restaged
    assert statements and not [s for s in statements if re.search(r"\bmemberships\b", s)], [
        s for s in statements if re.search(r"\bmemberships\b", s)]


def test_incremental_ticks_of_one_slot_run_one_insert_at_each_ticks_own_instant(
        db: Engine, clock: FixedClock, project_config: ProjectConfig) -> None:
    """A trigger's occurrence INSERT is built once and run again by the next incremental tick of
    the same slot, with that tick's instant bound: a windowed count is taken at the second
    tick's instant, not the first's, and SQLAlchemy runs it compiled once."""
    ing = seed(db, clock)
    trig = make_trigger(id="t", when={"schedule": "0 0 * * *"}, conditions=["visits_30d >= 1"])
    # first, and built only once its slot begins (the club's Monday 11:00, between the two
    # incremental ticks): its window is a new instant of the evaluator's
    weekly = make_trigger(id="weekly", when={"schedule": "0 11 * * mon"},
                          conditions=["visits_90d >= 1"])
    evaluator = Evaluator(db, project_config, [weekly, trig], clock)
    evaluator.tick()  # nobody has visited yet
    inserts: list[Any] = []
    compiled: list[Any] = []

    def record(conn: Any, clause: Any, *args: Any) -> None:
        if str(clause).startswith("INSERT INTO occurrences"):
            inserts.append(clause)

    def cache(conn: Any, cursor: Any, statement: str, params: Any, context: Any,
              *args: Any) -> None:
        if statement.startswith("INSERT INTO occurrences"):
            compiled.append(context.cache_hit)

    def visits_then_tick(visits: dict[str, datetime]) -> dict[str, int]:
        ing.events([EventIn(customer_external_id=who, kind="visit", occurred_at=at)
                    for who, at in visits.items()])
        return listening(db, "before_execute", record, lambda: listening(
            db, "after_cursor_execute", cache,
            lambda: evaluator.tick(kind=TickKind.INCREMENTAL))).occurrences

    first = clock.now() + timedelta(minutes=5)
    clock.set(first)
    assert first.isoweekday() == 1
    assert visits_then_tick({"ann": first - timedelta(minutes=1)}) == {"weekly": 0, "t": 1}
    clock.set(first + timedelta(hours=2))
    # Bob's visit lies inside the 30 days before the first tick, outside those before this one
    assert visits_then_tick({"bob": first - timedelta(days=30, hours=-1),
                             "cat": clock.now() - timedelta(minutes=1)}) == {"weekly": 2, "t": 1}
    with db.connect() as conn:
        fired = conn.execute(select(Customer.external_id).join(
            Occurrence, Occurrence.customer_id == Customer.id)
            .order_by(Customer.external_id)).scalars().all()
    assert fired == ["ann", "bob", "cat", "cat"]
    assert len(inserts) == 3 and inserts[0] is inserts[2]  # `weekly` ran in between
    assert compiled[2] == CACHE_HIT, compiled


@pytest.mark.parametrize("conditions", [
    [], ["visits_total >= 0", "lifetime_value >= 0"],
    ['plan != "monthly"', "days_until_membership_end > -60"]])
def test_a_trigger_reads_the_membership_from_the_customer_rows(
        db: Engine, clock: FixedClock, project_config: ProjectConfig,
        conditions: list[str]) -> None:
    """The occurrence's membership (its cycle, its holdout bucket) is the customer row's current
    membership, and so are the membership fields its conditions read: no trigger joins
    `memberships` (a row lookup per candidate), whatever its conditions."""
    seed(db, clock)
    trig = make_trigger(id="t", when={"schedule": "0 * * * *"}, conditions=conditions,
                        once="per_cycle", holdout="50%")
    inserts: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("INSERT INTO occurrences"):
            inserts.append(statement)

    result = listening(db, "before_cursor_execute", record,
                       Evaluator(db, project_config, [trig], clock).tick)
    fired = result.occurrences["t"]
    assert len(inserts) == 1
    assert not re.search(r"\bmemberships\b", inserts[0]), inserts[0]
    with db.connect() as conn:
        rows = conn.execute(select(Occurrence.membership_id, Occurrence.scope_key,
                                   Customer.current_membership_id)
                            .join(Customer, Customer.id == Occurrence.customer_id)).all()
    assert fired == len(rows) == (2 if conditions[:1] == ['plan != "monthly"'] else 3)
    assert all(m == current and scope == f"cycle:{current}" for m, scope, current in rows), rows


def test_an_every_scope_probes_the_customers_occurrences_not_a_pass_over_all_of_them(
        db: Engine, clock: FixedClock, project_config: ProjectConfig) -> None:
    """`once: {every: ...}` is one probe of the customer's occurrences per candidate (SQLite:
    through the (trigger, customer) unique key), never a join with every occurrence in the
    table, which PostgreSQL planned as a pass over all of them (a club's whole history); and
    it fires again once the interval has passed."""
    seed(db, clock)
    trig = make_trigger(id="t", when={"schedule": "0 * * * *"}, once={"every": "2h"})
    ev = Evaluator(db, project_config, [trig], clock)
    result, explained = occurrence_plans(db, ev.tick)
    plan = "\n".join(str(row) for row in explained[0])
    assert len(explained) == 1
    if db.dialect.name == "sqlite":
        assert "CORRELATED SCALAR SUBQUERY" in plan, plan
        # the unique key (SQLite names the index of a table constraint itself)
        assert "SEARCH occurrences USING INDEX sqlite_autoindex_occurrences_1 " \
               "(trigger_id=? AND customer_id=?)" in plan, plan
    else:
        assert "Anti Join" not in plan and "SubPlan" in plan, plan
    assert result.occurrences == {"t": 3}
    for hours, fired in ((1, 0), (1, 3)):
        clock.advance(timedelta(hours=hours))
        assert ev.tick().occurrences == {"t": fired}


def test_a_kept_insert_is_built_again_for_a_new_local_date(
        db: Engine, clock: FixedClock, project_config: ProjectConfig) -> None:
    """An event trigger's INSERT, kept from one incremental tick to the next, is built again
    when the customers' local date moves: a day count to the membership's end is counted from
    the new date, not the one the kept statement was built for."""
    ing = seed(db, clock)  # Bob's membership ends in 14 days
    today = clock.now().date()
    ing.customers([CustomerIn(external_id="dan", first_name="Dan", email="dan@example.com")])
    ing.memberships([MembershipIn(external_id="m-dan", customer_external_id="dan",
                                  starts_on=today - timedelta(days=100),
                                  ends_on=today + timedelta(days=15))])
    trig = make_trigger(id="t", when={"event": "visit"},
                        conditions=["days_until_membership_end == 14"])
    evaluator = Evaluator(db, project_config, [trig], clock)
    evaluator.tick()

    def visits_then_tick(*who: str) -> dict[str, int]:
        ing.events([EventIn(customer_external_id=name, kind="visit", occurred_at=clock.now())
                    for name in who])
        return evaluator.tick(kind=TickKind.INCREMENTAL).occurrences

    clock.advance(timedelta(minutes=5))
    assert visits_then_tick("bob", "dan") == {"t": 1}  # Bob: 14 days, Dan: 15
    clock.advance(timedelta(minutes=5))
    assert visits_then_tick("dan") == {"t": 0}  # the kept statement, run again
    clock.advance(timedelta(days=1))
    assert visits_then_tick("bob", "dan") == {"t": 1}  # Bob: 13 days, Dan: 14
    with db.connect() as conn:
        fired = conn.execute(select(Customer.external_id).join(
            Occurrence, Occurrence.customer_id == Customer.id)
            .order_by(Occurrence.id)).scalars().all()
    assert fired == ["bob", "dan"]
