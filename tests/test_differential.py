"""The set-wise SQL evaluation and the per-customer `explain` evaluation agree, on random
customers and random conditions, on every backend."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, insert, update

from engine.clock import FixedClock
from engine.conditions import compile_condition
from engine.config import ProjectConfig
from engine.evaluation import CHANGED_CUSTOMERS, Evaluator
from engine.explain import load_facts
from engine.ingest import membership_mirror, recent_visits
from engine.models import Customer, Event, Membership

NOW = datetime(2026, 3, 29, 0, 30)  # the night Europe switches to summer time
ZONES = [None, "America/Los_Angeles", "Asia/Tokyo", "Europe/Berlin", "Pacific/Kiritimati"]

NUMBERS = ["visits_7d", "visits_30d", "days_since_last_visit", "days_until_membership_end",
           "days_since_membership_start", "lifetime_value", "price", "visits_total",
           "days_in_stage", "bookings_14d"]
TEXTS = {"plan": ["monthly", "annual", "corporate"], "segment": ["A", "B", "C"],
         "membership_status": ["active", "cancelled", "ended"],
         "stage": ["onboarding", "active", "renewal_due", "lapsed"],
         "attributes.goal": ["strength", "cardio"]}
BOOLS = ["has_email", "has_phone", "has_chat", "has_membership"]
OPS = ["==", "!=", "<", "<=", ">", ">="]


@st.composite
def comparison(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["number", "text", "in", "bool", "none"]))
    if kind == "number":
        name = draw(st.sampled_from(NUMBERS))
        # windowed visit counts around the customer's latest visits they keep (RECENT_VISITS)
        windowed = name.startswith("visits_") and name != "visits_total"
        value = draw(st.integers(-1, 20) | st.sampled_from([2.5, 15.5]) if windowed
                     else st.integers(-5, 400))
        return f"{name} {draw(st.sampled_from(OPS))} {value}"
    if kind == "text":
        name = draw(st.sampled_from(sorted(TEXTS)))
        op = draw(st.sampled_from(["==", "!="]))
        return f'{name} {op} "{draw(st.sampled_from(TEXTS[name]))}"'
    if kind == "in":
        name = draw(st.sampled_from(sorted(TEXTS)))
        values = draw(st.lists(st.sampled_from(TEXTS[name]), min_size=1, max_size=3))
        op = draw(st.sampled_from(["in", "not in"]))
        return f"{name} {op} [{', '.join(repr(v).replace(chr(39), chr(34)) for v in values)}]"
    if kind == "bool":
        return draw(st.sampled_from(BOOLS + ["attributes.vip == true", "attributes.vip == false"]))
    name = draw(st.sampled_from(["days_since_last_visit", "plan", "attributes.goal"]))
    return f"{name} is {draw(st.sampled_from(['None', 'not None']))}"


@st.composite
def condition(draw: st.DrawFn) -> str:
    parts = draw(st.lists(comparison(), min_size=1, max_size=3))
    glue = draw(st.sampled_from([" and ", " or "]))
    text = glue.join(parts)
    return f"not ({text})" if draw(st.booleans()) else text


@st.composite
def customer(draw: st.DrawFn) -> dict[str, Any]:
    has_membership = draw(st.booleans())
    start = NOW.date() + timedelta(days=draw(st.integers(-800, 30)))
    # spread over months, and a burst of recent ones (more than a customer keeps the instants of)
    visits = draw(st.lists(st.integers(-200 * 86400, 3600), max_size=8)) + draw(
        st.lists(st.integers(-9 * 86400, 3600), max_size=14))
    bookings = draw(st.lists(st.integers(-30 * 86400, 0), max_size=3))
    return {
        "timezone": draw(st.sampled_from(ZONES)),
        "segment": draw(st.sampled_from([None, "A", "B", "C"])),
        "email": draw(st.sampled_from([None, "", "x@example.com"])),
        "phone": draw(st.sampled_from([None, "+4915112345678"])),
        "chat_id": draw(st.sampled_from([None, "12345"])),
        "stage": draw(st.sampled_from([None, "onboarding", "active", "renewal_due", "lapsed"])),
        "stage_since": NOW - timedelta(seconds=draw(st.integers(0, 90 * 86400))),
        "lifetime_value": float(draw(st.integers(0, 3000))),
        "attributes": draw(st.fixed_dictionaries({}, optional={
            "goal": st.sampled_from(["strength", "cardio", 7]), "vip": st.booleans()})),
        "membership": None if not has_membership else {
            "plan": draw(st.sampled_from([None, "monthly", "annual", "corporate"])),
            "price": draw(st.sampled_from([None, 0.0, 39.0, 480.0])),
            "starts_on": start,
            "ends_on": start + timedelta(days=draw(st.integers(0, 400))),
            "status": draw(st.sampled_from(["active", "cancelled", "ended"])),
        },
        "visits": [NOW + timedelta(seconds=s, microseconds=draw(st.integers(0, 999_999)))
                   for s in visits],
        "bookings": [NOW + timedelta(seconds=s) for s in bookings],
        # whether ingestion kept their latest visits (else NULL: counted through the events)
        "kept": draw(st.booleans()),
    }


def _load(db: Engine, customers: list[dict[str, Any]]) -> None:
    with db.begin() as conn:
        for table in (Event, Membership, Customer):
            conn.execute(delete(table))
        for i, c in enumerate(customers, start=1):
            conn.execute(insert(Customer).values(
                id=i, external_id=f"c{i}", timezone=c["timezone"], segment=c["segment"],
                email=c["email"], phone=c["phone"], chat_id=c["chat_id"], stage=c["stage"],
                stage_since=c["stage_since"], lifetime_value=c["lifetime_value"],
                attributes=c["attributes"], created_at=NOW, updated_at=NOW,
                visit_count=len(c["visits"]), last_visit_at=max(c["visits"], default=None),
                current_membership_id=i if c["membership"] else None))
            if c["membership"]:
                conn.execute(insert(Membership).values(
                    id=i, external_id=f"m{i}", customer_id=i, created_at=NOW, updated_at=NOW,
                    **c["membership"]))
            for kind, times in (("visit", c["visits"]), ("booking", c["bookings"])):
                for at in times:
                    conn.execute(insert(Event).values(customer_id=i, kind=kind, occurred_at=at,
                                                      received_at=NOW, properties={}))
        c_ = Customer.__table__
        conn.execute(update(c_).values(**membership_mirror()))
        kept = [i for i, c in enumerate(customers, start=1) if c["kept"]]
        conn.execute(update(c_).where(c_.c.id.in_(kept)).values(
            recent_visits=recent_visits(conn.dialect.name, c_.c.id)))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(customers=st.lists(customer(), min_size=1, max_size=6),
       conditions=st.lists(condition(), min_size=1, max_size=2),
       minutes=st.integers(-24 * 60, 24 * 60))
def test_sql_and_explain_agree(db: Engine, project_config: ProjectConfig,
                               customers: list[dict[str, Any]], conditions: list[str],
                               minutes: int) -> None:
    now = NOW + timedelta(minutes=minutes)
    _load(db, customers)
    compiled = [compile_condition(c) for c in conditions]
    evaluator = Evaluator(db, project_config, [], FixedClock(now))
    with db.connect() as conn:
        evaluator._local_days(conn, now)
        ctx, base = evaluator._context(now)
        query = base.add_columns(ctx.customer.c.id).where(*(c.sql(ctx) for c in compiled))
        by_sql = set(conn.execute(query).scalars())
        by_python = {
            i for i in range(1, len(customers) + 1)
            if all(c.py(load_facts(conn, i, now, project_config.club.timezone)) for c in compiled)
        }
        stages_sql = dict(conn.execute(base.add_columns(
            ctx.customer.c.id, evaluator.lifecycle.stage_sql(ctx))).all())
        stages_py = {i: evaluator.lifecycle.stage_py(
            load_facts(conn, i, now, project_config.club.timezone))
            for i in range(1, len(customers) + 1)}
        # an incremental tick evaluates over its copies of the changed customers: the same
        # conditions and stages there (every customer here counts as changed)
        evaluator._copy_changed(conn, -1)
        copy, copied = evaluator._context(now, customers=CHANGED_CUSTOMERS)
        by_copy = set(conn.execute(copied.add_columns(copy.customer.c.id).where(
            *(c.sql(copy) for c in compiled))).scalars())
        stages_copy = dict(conn.execute(copied.add_columns(
            copy.customer.c.id, evaluator.lifecycle.stage_sql(copy))).all())
    assert by_sql == by_python, conditions
    assert stages_sql == stages_py
    assert by_copy == by_sql, conditions
    assert stages_copy == stages_sql


def test_local_calendar_day_counts() -> None:
    """A fixed case the random test must also get right: the local date decides day counts."""
    cond = compile_condition("days_until_membership_end == 1")
    from engine.metrics import Facts

    facts = Facts(customer={}, membership={"ends_on": date(2026, 3, 30)},
                  local_today=date(2026, 3, 29), now=NOW)
    assert cond.py(facts) is True
    facts.local_today = date(2026, 3, 28)
    assert cond.py(facts) is False
