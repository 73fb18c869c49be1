"""The contact policy inside the tick: consent, quiet hours in the customer's zone (daylight-saving
days included), frequency caps with priority, the per-cycle budget, segments, channel fallback,
and the reasons recorded for every decision."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import pytest
from sqlalchemy import Engine, literal_column, select

from engine.assignment import bucket_sql
from engine.clock import FixedClock
from engine.config import ConsentDefaults, FrequencyCap, PolicyFile, ProjectConfig, SegmentPolicy
from engine.dispatch import Dispatcher
from engine.evaluation import Evaluator
from engine.ingest import ConsentIn, CustomerIn, EventIn, Ingestor, MembershipIn
from engine.models import Customer, Message, Occurrence
from engine.policy import next_opening
from engine.templates import TemplateStore
from tests.conftest import ROOT, Loaded, listening, make_trigger

T = TypeVar("T")
LA = "America/Los_Angeles"
PHONE = "+14155550100"
# consent by default, the default quiet hours (SMS and chat 08:00-21:00), no caps, no budget
QUIET_ONLY = PolicyFile(consent=ConsentDefaults(marketing_otherwise="granted"),
                        frequency_caps=[], cycle_budget=None)


def config(base: ProjectConfig, policy: PolicyFile) -> ProjectConfig:
    return dataclasses.replace(base, policy=policy)


def customer(db: Engine, clock: FixedClock, external_id: str = "ann", **fields: Any) -> Ingestor:
    ing = Ingestor(db, clock)
    values: dict[str, Any] = {"first_name": "Ann", "email": f"{external_id}@example.com",
                              "phone": PHONE, "timezone": LA}
    values.update(fields)
    ing.customers([CustomerIn(external_id=external_id, **values)])
    today = clock.now().date()
    ing.memberships([MembershipIn(external_id=f"m-{external_id}",
                                  customer_external_id=external_id,
                                  starts_on=today - timedelta(days=100),
                                  ends_on=today + timedelta(days=200))])
    return ing


def visit(ing: Ingestor, clock: FixedClock, external_id: str = "ann") -> None:
    ing.events([EventIn(customer_external_id=external_id, kind="visit",
                        occurred_at=clock.now())])


def on_visit(trigger_id: str, channel: str = "sms", **fields: Any) -> Loaded:
    action = {"channel": channel, "template": "test/hello", **fields.pop("action", {})}
    return make_trigger(id=trigger_id, when={"event": "visit"}, once="per_event", action=action,
                        **fields)


def decisions(db: Engine) -> list[tuple[str, str, str | None, str | None]]:
    with db.connect() as conn:
        return [tuple(r) for r in conn.execute(  # type: ignore[misc]
            select(Occurrence.trigger_id, Occurrence.status, Occurrence.channel,
                   Occurrence.reason).order_by(Occurrence.id))]


def outbox(db: Engine) -> list[tuple[str, str, datetime]]:
    with db.connect() as conn:
        return [tuple(r) for r in conn.execute(  # type: ignore[misc]
            select(Message.trigger_id, Message.channel, Message.due_at).order_by(Message.id))]


DAILY = FrequencyCap(max=1, per=timedelta(days=1))


def limits(*caps: FrequencyCap, cycle_budget: int | None = None, **fields: Any) -> PolicyFile:
    """A policy of limits alone: marketing consent granted by default, no quiet hours, the
    frequency `caps` and `cycle_budget` (none unless given), and any other `fields`."""
    return PolicyFile(consent=ConsentDefaults(marketing_otherwise="granted"), quiet_hours={},
                      frequency_caps=list(caps), cycle_budget=cycle_budget, **fields)


def ranks(statement: str) -> bool:
    """Whether `statement` is a limit's ranking UPDATE."""
    return statement.startswith("UPDATE occurrences") and "ranked" in statement


def executed(db: Engine, run: Callable[[], T]) -> tuple[T, list[tuple[str, Any]]]:
    """`run()`'s result, and every statement (with its parameters) it executed on `db`."""
    seen: list[tuple[str, Any]] = []

    def keep(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        seen.append((statement, params))

    return listening(db, "before_cursor_execute", keep, run), seen


# quiet hours -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("utc_now", "due", "until"), [
    # 20:59 PST on 2026-03-02: inside the window, due now
    (datetime(2026, 3, 3, 4, 59), datetime(2026, 3, 3, 4, 59), None),
    # 21:00 PST: the window has closed; 08:00 PST next morning is 16:00 UTC
    (datetime(2026, 3, 3, 5, 0), datetime(2026, 3, 3, 16, 0), "2026-03-03T08:00-08:00"),
    # 22:00 PST on Saturday 2026-03-07; clocks spring forward that night: 08:00 PDT = 15:00 UTC
    (datetime(2026, 3, 8, 6, 0), datetime(2026, 3, 8, 15, 0), "2026-03-08T08:00-07:00"),
    # 01:30 PST on the change day itself, before the jump
    (datetime(2026, 3, 8, 9, 30), datetime(2026, 3, 8, 15, 0), "2026-03-08T08:00-07:00"),
    # 22:00 PDT on Saturday 2026-10-31; clocks fall back that night: 08:00 PST = 16:00 UTC
    (datetime(2026, 11, 1, 5, 0), datetime(2026, 11, 1, 16, 0), "2026-11-01T08:00-08:00"),
    # 01:30 PST on the change day, after the repeated hour
    (datetime(2026, 11, 1, 9, 30), datetime(2026, 11, 1, 16, 0), "2026-11-01T08:00-08:00"),
])
def test_quiet_hours_in_the_customers_own_zone(db: Engine, project_config: ProjectConfig,
                                               utc_now: datetime, due: datetime,
                                               until: str | None) -> None:
    clock = FixedClock(utc_now)
    ing = customer(db, clock)
    visit(ing, clock)
    Evaluator(db, config(project_config, QUIET_ONLY), [on_visit("thanks")], clock).tick()
    assert outbox(db) == [("thanks", "sms", due)]
    reason = None if until is None else f"deferred: quiet_hours until {until}"
    assert decisions(db) == [("thanks", "message", "sms", reason)]


def test_next_opening_is_none_inside_the_window_and_a_wrapping_window_works() -> None:
    window = QUIET_ONLY.quiet_hours["sms"]
    assert next_opening(window, LA, datetime(2026, 3, 3, 4, 59)) is None
    night = PolicyFile.model_validate({"quiet_hours": {"sms": "22:00-06:00"}}).quiet_hours["sms"]
    assert night.is_open(datetime(2026, 1, 1, 23, 0).time())
    assert night.is_open(datetime(2026, 1, 1, 5, 59).time())
    assert not night.is_open(datetime(2026, 1, 1, 12, 0).time())
    # noon in Berlin (CET) -> 22:00 local the same day
    assert next_opening(night, "Europe/Berlin", datetime(2026, 1, 1, 11, 0)) == \
        datetime(2026, 1, 1, 21, 0)


def test_a_deferred_message_is_not_claimed_before_its_time(db: Engine,
                                                           project_config: ProjectConfig) -> None:
    clock = FixedClock(datetime(2026, 3, 3, 6, 0))  # 22:00 PST
    ing = customer(db, clock)
    visit(ing, clock)
    Evaluator(db, config(project_config, QUIET_ONLY), [on_visit("thanks")], clock).tick()
    templates = TemplateStore(ROOT / "tests" / "testdata" / "templates")
    dispatcher = Dispatcher(db, templates, {}, clock)
    assert dispatcher.claim(10) == []
    clock.set(datetime(2026, 3, 3, 16, 0))  # 08:00 PST
    assert [row["trigger_id"] for row in dispatcher.claim(10)] == ["thanks"]


def test_email_ignores_quiet_hours_and_a_trigger_may_fall_back_instead_of_waiting(
        db: Engine, project_config: ProjectConfig) -> None:
    clock = FixedClock(datetime(2026, 3, 3, 6, 0))  # 22:00 PST
    ing = customer(db, clock)
    visit(ing, clock)
    triggers = [on_visit("waits"),
                on_visit("hurries", action={"fallback": ["email"], "in_quiet_hours": "fallback"}),
                on_visit("mail", channel="email")]
    Evaluator(db, config(project_config, QUIET_ONLY), triggers, clock).tick()
    assert sorted(outbox(db)) == [("hurries", "email", clock.now()),
                                  ("mail", "email", clock.now()),
                                  ("waits", "sms", datetime(2026, 3, 3, 16, 0))]


def test_a_fallback_trigger_with_every_channel_closed_waits_on_the_first(
        db: Engine, project_config: ProjectConfig) -> None:
    clock = FixedClock(datetime(2026, 3, 3, 6, 0))  # 22:00 PST
    ing = customer(db, clock, chat_id="4242")
    visit(ing, clock)
    trig = on_visit("hurries", action={"fallback": ["chat"], "in_quiet_hours": "fallback"})
    Evaluator(db, config(project_config, QUIET_ONLY), [trig], clock).tick()
    # chat is closed too: rather than skip, the message waits for SMS to open
    assert outbox(db) == [("hurries", "sms", datetime(2026, 3, 3, 16, 0))]
    assert decisions(db)[0][3] == "deferred: quiet_hours until 2026-03-03T08:00-08:00"


# consent and fallback ----------------------------------------------------------------------------

def test_fallback_from_sms_to_email_when_the_phone_is_missing(
        db: Engine, project_config: ProjectConfig) -> None:
    clock = FixedClock(datetime(2026, 3, 3, 18, 0))  # 10:00 PST
    ing = customer(db, clock, phone=None)
    visit(ing, clock)
    triggers = [on_visit("with-fallback", action={"fallback": ["email"]}),
                on_visit("sms-only")]
    Evaluator(db, config(project_config, QUIET_ONLY), triggers, clock).tick()
    assert decisions(db) == [("with-fallback", "message", "email", None),
                             ("sms-only", "skipped", None, "no_contact_point (sms)")]


def test_consent_required_by_default_and_an_opt_out_mid_cycle_stops_later_marketing(
        db: Engine, project_config: ProjectConfig) -> None:
    policy = PolicyFile(consent=ConsentDefaults(marketing={"email": "granted", "sms": "required"}),
                        quiet_hours={}, frequency_caps=[], cycle_budget=None)
    cfg = config(project_config, policy)
    clock = FixedClock(datetime(2026, 3, 3, 18, 0))
    ing = customer(db, clock)
    triggers = [on_visit("promo", action={"fallback": ["email"]}),
                on_visit("receipt", purpose="transactional")]
    ev = Evaluator(db, cfg, triggers, clock)
    visit(ing, clock)
    ev.tick()  # no SMS consent yet: the promo falls back to email; transactional SMS is fine
    ing.consents([ConsentIn(customer_external_id="ann", channel="sms", granted=True,
                            occurred_at=clock.now(), source="signup_form")])
    clock.advance(timedelta(days=1))
    visit(ing, clock)
    ev.tick()  # consent given: SMS
    clock.advance(timedelta(days=1))
    ing.consents([ConsentIn(customer_external_id="ann", channel="sms", granted=False,
                            occurred_at=clock.now(), source="twilio:stop")])
    for _ in range(3):
        clock.advance(timedelta(days=1))
        visit(ing, clock)
        ev.tick()
    rows = [(t, s, ch) for t, s, ch, _ in decisions(db)]
    assert rows == [("promo", "message", "email"), ("receipt", "message", "sms"),
                    ("promo", "message", "sms"), ("receipt", "message", "sms"),
                    *[("promo", "message", "email"), ("receipt", "message", "sms")] * 3]
    no_fallback = on_visit("sms-promo")
    visit(ing, clock)
    Evaluator(db, cfg, [no_fallback], clock).tick()
    assert decisions(db)[-1] == ("sms-promo", "skipped", None, "no_consent (sms)")


def test_an_occurrence_no_channel_can_take_is_written_skipped_with_its_reasons(
        db: Engine, project_config: ProjectConfig) -> None:
    """The occurrence INSERT writes the refusal and its reasons itself (the reasons are worked
    out only for those rows): no UPDATE rewrites the tick's occurrences afterwards, and the
    tick still reports what the policy stopped."""
    policy = PolicyFile(consent=ConsentDefaults(marketing={"email": "granted", "sms": "required"}),
                        quiet_hours={}, frequency_caps=[], cycle_budget=None)
    clock = FixedClock(datetime(2026, 3, 3, 18, 0))
    ing = customer(db, clock)
    visit(ing, clock)
    ev = Evaluator(db, config(project_config, policy),
                   [on_visit("sms-promo"), on_visit("promo", action={"fallback": ["email"]})],
                   clock)
    result, seen = executed(db, ev.tick)
    assert decisions(db) == [("sms-promo", "skipped", None, "no_consent (sms)"),
                             ("promo", "message", "email", None)]
    assert result.stopped == {"channel": 1} and result.messages == 1
    assert [st for st, _ in seen if st.startswith("UPDATE occurrences")] == []


def test_segments_restrict_channels_and_cap_sms_per_cycle(
        db: Engine, project_config: ProjectConfig) -> None:
    policy = limits(segments={"C": SegmentPolicy(channels=["email"]),
                              "A": SegmentPolicy(max_per_cycle={"sms": 2})})
    clock = FixedClock(datetime(2026, 3, 3, 18, 0))
    ing = customer(db, clock, "cora", segment="C")
    customer(db, clock, "abe", segment="A")
    ev = Evaluator(db, config(project_config, policy), [on_visit("promo")], clock)
    for _ in range(3):
        visit(ing, clock, "cora")
        visit(ing, clock, "abe")
        ev.tick()
        clock.advance(timedelta(days=1))
    with db.connect() as conn:
        rows = conn.execute(select(Occurrence.customer_id, Occurrence.status, Occurrence.reason)
                            .order_by(Occurrence.id)).all()
    cora = [r for r in rows if r.customer_id == 1]
    abe = [r for r in rows if r.customer_id == 2]
    assert [(r.status, r.reason) for r in cora] == [("skipped", "segment C excludes sms")] * 3
    assert [(r.status, r.reason) for r in abe] == [
        ("message", None), ("message", None), ("skipped", "segment_budget A: sms 2/2")]


# caps, budget, priority --------------------------------------------------------------------------

def test_an_occurrence_records_its_recipient_only_while_it_is_to_be_sent(
        db: Engine, project_config: ProjectConfig) -> None:
    """The recipient is the contact point of the channel chosen (a fallback's included), written
    with the occurrence and copied to the outbox; held-out and skipped occurrences have none,
    a message the frequency cap stops after the channel was chosen included."""
    policy = limits(DAILY)
    clock = FixedClock(datetime(2026, 3, 3, 18, 0))
    people = {f"c{i:02}": f"+1415555{i:04}" for i in range(20)}
    people["nophone"] = None
    for who, phone in people.items():
        ing = customer(db, clock, who, phone=phone)
        visit(ing, clock, who)
    triggers = [on_visit("promo", action={"fallback": ["email"]}, priority=90, holdout=0.3),
                on_visit("invite", channel="email", priority=40),
                on_visit("sms-receipt", purpose="transactional")]
    Evaluator(db, config(project_config, policy), triggers, clock).tick()
    with db.connect() as conn:
        occurrences = conn.execute(select(
            Occurrence.id, Occurrence.customer_id, Occurrence.channel, Occurrence.status,
            Occurrence.reason, Occurrence.recipient)).all()
        contacts = {row.id: {"email": row.email, "sms": row.phone}
                    for row in conn.execute(select(Customer.id, Customer.email, Customer.phone))}
        sent = dict(conn.execute(select(Message.occurrence_id, Message.recipient)).all())
    for row in occurrences:
        expected = contacts[row.customer_id][row.channel] if row.status == "message" else None
        assert row.recipient == expected, row
    assert sent == {row.id: row.recipient for row in occurrences if row.status == "message"}
    seen = {(row.status, (row.reason or "").split(" ")[0], row.channel) for row in occurrences}
    assert {("message", "", "sms"), ("message", "", "email"), ("held_out", "holdout", "sms"),
            ("skipped", "lower_priority", "email"),
            ("skipped", "no_contact_point", None)} <= seen, seen


@pytest.mark.parametrize("with_policy", [True, False])
def test_the_holdout_hash_is_computed_once_for_the_arm_and_once_for_the_policy_channel(
        db: Engine, project_config: ProjectConfig, with_policy: bool) -> None:
    """Status, reason and recipient read the arm and channel the occurrence INSERT has
    computed, not the hash again (neither database shares a repeated expression): the arm
    computes it, and with the contact policy the channel too (held-out rows keep the channel a
    contact point allows, without the policy's probes)."""
    clock = FixedClock(datetime(2026, 3, 3, 18, 0))
    for who in ("ann", "bob"):
        visit(customer(db, clock, who), clock, who)
    ev = Evaluator(db, config(project_config, QUIET_ONLY),
                   [on_visit("promo", action={"fallback": ["email"]}, holdout=0.5)], clock)
    if not with_policy:
        ev.policy = None
    # how often one bucket's text holds its first constant (each step squares the previous)
    one = str(bucket_sql(literal_column("c"), literal_column("m"), 7).compile(
        dialect=db.dialect, compile_kwargs={"literal_binds": True})).count("1000003")
    result, seen = executed(db, ev.tick)
    hashes = [
        # named: one value per bind, placed where it is used; positional: one value per place
        sum(statement.count(f"%({key})s") for key, value in params.items() if value == 1_000_003)
        if isinstance(params, dict) else sum(1 for value in params if value == 1_000_003)
        for statement, params in seen if statement.startswith("INSERT INTO occurrences")]
    assert hashes == [(2 if with_policy else 1) * one]
    assert result.occurrences == {"promo": 2}


def test_two_triggers_the_same_day_under_a_daily_cap_the_higher_priority_wins(
        db: Engine, project_config: ProjectConfig) -> None:
    policy = limits(DAILY)
    clock = FixedClock(datetime(2026, 3, 3, 18, 0))
    ing = customer(db, clock)
    triggers = [on_visit("class-invite", channel="email", priority=40),
                on_visit("renewal-offer", channel="email", priority=90),
                on_visit("receipt", channel="email", purpose="transactional")]
    ev = Evaluator(db, config(project_config, policy), triggers, clock)
    visit(ing, clock)
    ev.tick()
    assert decisions(db) == [
        ("class-invite", "skipped", "email", "lower_priority than renewal-offer"),
        ("renewal-offer", "message", "email", None),
        ("receipt", "message", "email", None)]  # transactional: exempt from caps
    clock.advance(timedelta(hours=12))  # the same rolling day: the cap is used up
    visit(ing, clock)
    ev.tick()
    assert decisions(db)[3:] == [
        ("class-invite", "skipped", "email", "frequency_cap 1 per 1d"),
        ("renewal-offer", "skipped", "email", "frequency_cap 1 per 1d"),
        ("receipt", "message", "email", None)]
    clock.advance(timedelta(hours=13))
    visit(ing, clock)
    ev.tick()
    assert [d[1] for d in decisions(db)[6:]] == ["skipped", "message", "message"]


def test_only_the_limits_a_customer_could_exceed_in_the_tick_rank_its_messages(
        db: Engine, project_config: ProjectConfig) -> None:
    """Each cap's ranking UPDATE runs only when some customer's messages in the tick and
    counted messages could take them over it: none for a first message, the daily cap's alone
    for a second message the same day (3 per 7 days still has room), which stops it."""
    policy = limits(DAILY, FrequencyCap(max=3, per=timedelta(days=7)))
    clock = FixedClock(datetime(2026, 3, 3, 18, 0))
    ing = customer(db, clock)
    ev = Evaluator(db, config(project_config, policy), [on_visit("promo", channel="email")],
                   clock)
    ranked: list[int] = []
    for _ in range(2):
        visit(ing, clock)
        _, seen = executed(db, ev.tick)
        ranked.append(sum(1 for st, _ in seen if ranks(st)))
        clock.advance(timedelta(hours=1))
    assert ranked == [0, 1]
    assert decisions(db) == [("promo", "message", "email", None),
                             ("promo", "skipped", "email", "frequency_cap 1 per 1d")]


def test_a_cap_reads_the_messages_of_the_customers_at_risk_through_their_index(
        db: Engine, project_config: ProjectConfig) -> None:
    """The ranking UPDATE reads the tick's messages of the customers its counts put at risk
    through the occurrences' (customer, fired_at) index, not every message of the tick through
    the tick's index (PostgreSQL: with sequential scans off, as on a base too large for them)."""
    policy = limits(DAILY)
    clock = FixedClock(datetime(2026, 3, 3, 18, 0))
    ing = customer(db, clock)
    ev = Evaluator(db, config(project_config, policy),
                   [on_visit("promo", channel="email"), on_visit("invite", channel="email")],
                   clock)
    plans: list[str] = []

    def explain(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        if not ranks(statement):
            return
        if db.dialect.name == "sqlite":
            cursor.execute(f"EXPLAIN QUERY PLAN {statement}", params)
            plans.append("\n".join(row[3] for row in cursor.fetchall()))
        else:
            cursor.execute("SET enable_seqscan = off")
            cursor.execute(f"EXPLAIN {statement}", params)
            plans.append("\n".join(row[0] for row in cursor.fetchall()))
            cursor.execute("RESET enable_seqscan")

    visit(ing, clock)
    listening(db, "before_cursor_execute", explain, ev.tick)
    assert decisions(db) == [("promo", "skipped", "email", "lower_priority than invite"),
                             ("invite", "message", "email", None)]  # a tie: the trigger id
    assert len(plans) == 1
    if db.dialect.name == "sqlite":
        assert ("SEARCH occurrences USING INDEX ix_occurrences_customer_id_fired_at "
                "(customer_id=? AND fired_at=?)") in plans[0]
    else:
        assert "Index Scan using ix_occurrences_customer_id_fired_at" in plans[0]
        assert "ix_occurrences_tick_id" not in plans[0]


def test_a_single_firing_is_capped_by_earlier_messages_in_the_longest_window(
        db: Engine, project_config: ProjectConfig) -> None:
    """One marketing message per tick: only the messages already sent can fill a cap, here
    the 7-day one after the 1-day one has passed."""
    policy = limits(DAILY, FrequencyCap(max=2, per=timedelta(days=7)))
    clock = FixedClock(datetime(2026, 3, 3, 18, 0))
    ing = customer(db, clock)
    ev = Evaluator(db, config(project_config, policy), [on_visit("class-invite", "email")],
                   clock)
    for hours in (0, 12, 36, 60):
        clock.set(datetime(2026, 3, 3, 18, 0) + timedelta(hours=hours))
        visit(ing, clock)
        ev.tick()
    assert [(d[1], d[3]) for d in decisions(db)] == [
        ("message", None), ("skipped", "frequency_cap 1 per 1d"), ("message", None),
        ("skipped", "frequency_cap 2 per 7d")]


def test_ties_in_priority_are_broken_by_trigger_id(db: Engine,
                                                   project_config: ProjectConfig) -> None:
    policy = limits(DAILY)
    clock = FixedClock(datetime(2026, 3, 3, 18, 0))
    ing = customer(db, clock)
    triggers = [on_visit("zeta", channel="email"), on_visit("alpha", channel="email")]
    visit(ing, clock)
    Evaluator(db, config(project_config, policy), triggers, clock).tick()
    assert sorted(decisions(db)) == [("alpha", "message", "email", None),
                                     ("zeta", "skipped", "email", "lower_priority than alpha")]


def test_the_sixteenth_marketing_contact_of_a_cycle_is_skipped(
        db: Engine, project_config: ProjectConfig) -> None:
    policy = limits(cycle_budget=15)
    clock = FixedClock(datetime(2026, 3, 3, 18, 0))
    ing = customer(db, clock)
    ev = Evaluator(db, config(project_config, policy),
                   [on_visit("thanks", channel="email"),
                    on_visit("receipt", channel="email", purpose="transactional")], clock)
    for _ in range(16):
        visit(ing, clock)
        ev.tick()
        clock.advance(timedelta(days=2))
    thanks = [d for d in decisions(db) if d[0] == "thanks"]
    assert [d[1] for d in thanks] == ["message"] * 15 + ["skipped"]
    assert thanks[-1][3] == "cycle_budget 15/15"
    assert [d[1] for d in decisions(db) if d[0] == "receipt"] == ["message"] * 16
    # a new membership is a new cycle: the budget starts again
    today = clock.now().date()
    ing.memberships([MembershipIn(external_id="m-ann-2", customer_external_id="ann",
                                  starts_on=today, ends_on=today + timedelta(days=365))])
    visit(ing, clock)
    ev.tick()
    assert decisions(db)[-2][:2] == ("thanks", "message")


def test_several_occurrences_of_one_trigger_in_a_tick_count_against_the_budget(
        db: Engine, project_config: ProjectConfig) -> None:
    policy = limits(cycle_budget=2)
    clock = FixedClock(datetime(2026, 3, 3, 18, 0))
    ing = customer(db, clock)
    for _ in range(3):
        visit(ing, clock)
    Evaluator(db, config(project_config, policy), [on_visit("thanks", channel="email")],
              clock).tick()
    assert [d[1:] for d in decisions(db)] == [("message", "email", None)] * 2 + [
        ("skipped", "email", "cycle_budget 2/2")]


def test_failed_messages_do_not_count_and_deferred_ones_do(db: Engine,
                                                           project_config: ProjectConfig) -> None:
    policy = PolicyFile(consent=ConsentDefaults(marketing_otherwise="granted"),
                        frequency_caps=[FrequencyCap(max=1, per=timedelta(days=1))],
                        cycle_budget=None)
    clock = FixedClock(datetime(2026, 3, 3, 6, 0))  # 22:00 PST: SMS waits until 08:00
    ing = customer(db, clock)
    ev = Evaluator(db, config(project_config, policy), [on_visit("thanks")], clock)
    visit(ing, clock)
    ev.tick()
    clock.advance(timedelta(hours=1))
    visit(ing, clock)
    ev.tick()
    assert [d[1] for d in decisions(db)] == ["message", "skipped"]
    with db.begin() as conn:  # the deferred message failed in the end: it was no contact
        conn.execute(Message.__table__.update().values(status="failed"))
    clock.advance(timedelta(hours=1))
    visit(ing, clock)
    ev.tick()
    assert [d[1] for d in decisions(db)] == ["message", "skipped", "message"]


def test_a_renewal_starts_a_new_budget_but_not_a_new_cap_window(
        db: Engine, project_config: ProjectConfig) -> None:
    """The cycle budget counts the current membership's messages; a frequency cap counts every
    message in its window, those sent under the membership before a renewal included."""
    policy = limits(DAILY, cycle_budget=1)
    clock = FixedClock(datetime(2026, 3, 3, 18, 0))
    ing = customer(db, clock)
    ev = Evaluator(db, config(project_config, policy), [on_visit("promo", channel="email")],
                   clock)
    visit(ing, clock)
    ev.tick()
    clock.advance(timedelta(hours=2))
    today = clock.now().date()
    ing.memberships([MembershipIn(external_id="m-ann-2", customer_external_id="ann",
                                  starts_on=today, ends_on=today + timedelta(days=365))])
    for hours in (1, 24, 24):
        clock.advance(timedelta(hours=hours))
        visit(ing, clock)
        ev.tick()
    assert [d[1:] for d in decisions(db)] == [
        ("message", "email", None), ("skipped", "email", "frequency_cap 1 per 1d"),
        ("message", "email", None), ("skipped", "email", "cycle_budget 1/1")]


def test_a_customer_without_a_membership_has_one_cycle_of_their_earlier_messages(
        db: Engine, project_config: ProjectConfig) -> None:
    """A customer without a membership counts their messages without one against the cycle
    budget, across ticks; a membership started later is a new cycle, and the cap counts the
    messages without one in its window."""
    policy = limits(FrequencyCap(max=2, per=timedelta(days=7)), cycle_budget=2)
    clock = FixedClock(datetime(2026, 3, 3, 18, 0))
    ing = Ingestor(db, clock)
    ing.customers([CustomerIn(external_id="bob", first_name="Bob", email="bob@example.com",
                              timezone=LA)])
    ev = Evaluator(db, config(project_config, policy), [on_visit("promo", channel="email")],
                   clock)
    for days in (0, 8, 1):
        clock.advance(timedelta(days=days))
        visit(ing, clock, "bob")
        ev.tick()
    today = clock.now().date()
    ing.memberships([MembershipIn(external_id="m-bob", customer_external_id="bob",
                                  starts_on=today, ends_on=today + timedelta(days=365))])
    for _ in range(2):
        clock.advance(timedelta(hours=1))
        visit(ing, clock, "bob")
        ev.tick()
    assert [d[1:] for d in decisions(db)] == [
        ("message", "email", None), ("message", "email", None),
        ("skipped", "email", "cycle_budget 2/2"),
        # the new cycle's first message, then what would be the third in the cap's week, with
        # the second, sent without a membership the day before
        ("message", "email", None), ("skipped", "email", "frequency_cap 2 per 7d")]


def test_a_membership_current_again_counts_its_earlier_messages(
        db: Engine, project_config: ProjectConfig) -> None:
    """A renewal imported ahead of its start is the current membership at once; when a
    correction makes the earlier membership current again, its messages of weeks before count
    against its budget again."""
    policy = limits(cycle_budget=2)
    clock = FixedClock(datetime(2026, 3, 3, 18, 0))
    ing = customer(db, clock)
    ev = Evaluator(db, config(project_config, policy), [on_visit("promo", channel="email")],
                   clock)

    def renewal(starts_in: int) -> None:
        starts = clock.now().date() + timedelta(days=starts_in)
        ing.memberships([MembershipIn(external_id="m-ann-2", customer_external_id="ann",
                                      starts_on=starts, ends_on=starts + timedelta(days=365))])

    for step in range(4):
        if step == 2:
            renewal(starts_in=10)
        if step == 3:
            renewal(starts_in=-400)  # the renewal's start was wrong: the first is current
        visit(ing, clock)
        ev.tick()
        clock.advance(timedelta(days=14))
    assert [d[1:] for d in decisions(db)] == [("message", "email", None)] * 3 + [
        ("skipped", "email", "cycle_budget 2/2")]


def test_the_counts_read_earlier_messages_through_the_outbox_customer_indexes_or_once(
        db: Engine, project_config: ProjectConfig) -> None:
    """SQLite: the counts read a customer's messages of the current membership and of the cap's
    window through the outbox's (customer, membership) and (customer, due_at) indexes, not
    every message the customer was ever sent. PostgreSQL: in one join, which reads the outbox
    once (its planner passes over the whole outbox for a join of many customers either way)."""
    policy = limits(DAILY, cycle_budget=15)
    clock = FixedClock(datetime(2026, 3, 3, 18, 0))
    ing = customer(db, clock)
    ev = Evaluator(db, config(project_config, policy), [on_visit("promo", channel="email")],
                   clock)
    plans: list[str] = []

    def explain(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        if not statement.startswith("UPDATE policy_at_risk"):
            return
        if db.dialect.name == "sqlite":
            cursor.execute(f"EXPLAIN QUERY PLAN {statement}", params)
            plans.append("\n".join(row[3] for row in cursor.fetchall()))
        else:
            cursor.execute(f"EXPLAIN {statement}", params)
            plans.append("\n".join(row[0] for row in cursor.fetchall()))

    visit(ing, clock)
    listening(db, "before_cursor_execute", explain, ev.tick)
    assert len(plans) == 1
    if db.dialect.name == "sqlite":
        assert ("USING INDEX ix_outbox_customer_id_membership_id "
                "(customer_id=? AND membership_id=?)") in plans[0]
        assert "USING INDEX ix_outbox_customer_id_due_at (customer_id=? AND due_at>?)" \
            in plans[0]
    else:
        assert len(re.findall(r" on outbox\b", plans[0])) == 1, plans[0]


def test_the_policy_writes_costs_and_the_tick_reports_what_it_stopped(
        db: Engine, project_config: ProjectConfig) -> None:
    policy = limits(DAILY, cost={"email": 0.002, "sms": 0.08})
    clock = FixedClock(datetime(2026, 3, 3, 18, 0))
    ing = customer(db, clock)
    visit(ing, clock)
    result = Evaluator(db, config(project_config, policy),
                       [on_visit("a", priority=60), on_visit("b", channel="email")], clock).tick()
    assert (result.messages, result.skipped, result.stopped) == (1, 1, {"frequency_cap": 1})
    with db.connect() as conn:
        assert conn.execute(select(Message.channel, Message.cost)).all() == [("sms", 0.08)]


def test_an_evaluator_switched_between_policy_and_none_decides_by_the_current_one(
        db: Engine, project_config: ProjectConfig) -> None:
    """The evaluator keeps each trigger's channel and status expressions from tick to tick; they
    belong to the policy they were built with (the benchmark switches it off and on)."""
    policy = limits()
    clock = FixedClock(datetime(2026, 3, 3, 18, 0))
    ing = customer(db, clock, email=None)  # nothing for the email-only trigger to go out on
    customer(db, clock, external_id="bob")
    visit(ing, clock)
    visit(ing, clock, "bob")
    ev = Evaluator(db, config(project_config, policy), [on_visit("a", channel="email")], clock)
    policy_on = ev.policy
    seen = []
    for current in (policy_on, None, policy_on):
        ev.policy = current
        result = ev.tick(dry_run=True)
        seen.append((result.messages, result.skipped, result.stopped))
    assert seen == [(1, 1, {"channel": 1}), (1, 1, {}), (1, 1, {"channel": 1})]


def test_without_the_policy_nothing_is_stopped(db: Engine, project_config: ProjectConfig) -> None:
    clock = FixedClock(datetime(2026, 3, 3, 6, 0))
    ing = customer(db, clock)
    visit(ing, clock)
    policy = PolicyFile()  # the defaults: SMS consent required, quiet hours, caps
    result = Evaluator(db, config(project_config, policy), [on_visit("a"), on_visit("b")], clock,
                       policy=False).tick()
    assert result.messages == 2 and result.stopped == {}
    assert [due for _, _, due in outbox(db)] == [clock.now()] * 2
