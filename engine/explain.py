"""`explain`: the story of one customer, evaluated one customer at a time in Python.

This is deliberately a second, independent implementation of evaluation: it loads the customer's
rows and applies the Python side of every metric and condition (`engine.metrics`), so the
differential test can hold it against the set-wise SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, select

from engine.conditions import Condition
from engine.config import PolicyFile
from engine.lifecycle import Lifecycle
from engine.metrics import Facts
from engine.models import (
    ConsentEntry,
    Customer,
    Event,
    Membership,
    Message,
    Occurrence,
    Outcome,
    StageChange,
)
from engine.rulefile import Anchor, EventWhen, RelativeWhen, ScheduleWhen, StageWhen, Trigger

__all__ = ["explain_customer", "load_facts", "local_today"]

EVENT_KINDS = ("visit", "booking", "purchase")


def local_today(tz: str, now: datetime) -> tuple[Any, datetime]:
    local = now.replace(tzinfo=ZoneInfo("UTC")).astimezone(ZoneInfo(tz)).replace(tzinfo=None)
    return local.date(), local


def load_facts(conn: Connection, customer_id: int, now: datetime, default_tz: str) -> Facts:
    """Everything the metrics read about one customer, loaded row by row."""
    customer = dict(conn.execute(select(Customer.__table__).where(Customer.id == customer_id))
                    .mappings().one())
    membership = None
    if customer["current_membership_id"] is not None:
        row = conn.execute(select(Membership.__table__).where(
            Membership.id == customer["current_membership_id"])).mappings().first()
        membership = dict(row) if row else None
    events: dict[str, list[datetime]] = {k: [] for k in EVENT_KINDS}
    for kind, at in conn.execute(select(Event.kind, Event.occurred_at).where(
            Event.customer_id == customer_id, Event.kind.in_(EVENT_KINDS))):
        events[kind].append(at)
    today, _ = local_today(customer["timezone"] or default_tz, now)
    return Facts(customer=customer, membership=membership, local_today=today, now=now,
                 events=events)


def _conditions(conds: Sequence[Condition], facts: Facts) -> list[dict[str, Any]]:
    return [{"condition": c.text, "passed": c.py(facts), "values": c.values(facts)}
            for c in conds]


def _when(trigger: Trigger, facts: Facts, tz: str, history: list[dict[str, Any]]) -> dict[str, Any]:
    when = trigger.when
    if isinstance(when, RelativeWhen):
        if facts.membership is None:
            return {"kind": "date-relative", "due": False, "detail": "no membership"}
        column = "ends_on" if when.anchor is Anchor.MEMBERSHIP_ENDS else "starts_on"
        fire_date = facts.membership[column] + timedelta(days=when.offset_days)
        _, local_now = local_today(tz, facts.now)
        fire_at = datetime.combine(fire_date, when.at)
        due = fire_at <= local_now < fire_at + timedelta(days=1)
        return {"kind": "date-relative", "fires_at_local": fire_at.isoformat(), "time_zone": tz,
                "due": due}
    if isinstance(when, StageWhen):
        entries = [h for h in history if h["stage"] == when.stage_entered]
        return {"kind": "stage entered", "stage": when.stage_entered,
                "entered": [h["entered_at"].isoformat() for h in entries],
                "due": bool(entries) and facts.customer.get("stage") == when.stage_entered}
    if isinstance(when, EventWhen):
        times = sorted(facts.events.get(when.event, []))
        return {"kind": "event", "event": when.event,
                "last": times[-1].isoformat() if times else None, "due": bool(times)}
    assert isinstance(when, ScheduleWhen)
    return {"kind": "schedule", "schedule": when.schedule, "time_zone": tz, "due": True}


def _consent(conn: Connection, cid: int, policy: PolicyFile | None,
             channels: Sequence[str]) -> list[dict[str, Any]]:
    """Each channel's current consent per purpose: the latest entry, else the policy default."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for row in conn.execute(select(ConsentEntry.__table__).where(ConsentEntry.customer_id == cid)
                            .order_by(ConsentEntry.id)).mappings():
        latest[(row["channel"], row["purpose"])] = dict(row)
    out = []
    for channel in channels:
        for purpose in ("marketing", "transactional"):
            entry = latest.get((channel, purpose))
            if entry is not None:
                out.append({"channel": channel, "purpose": purpose, "granted": entry["granted"],
                            "since": entry["occurred_at"], "source": entry["source"]})
            elif policy is not None:
                out.append({"channel": channel, "purpose": purpose,
                            "granted": policy.consent.granted_by_default(channel, purpose),
                            "since": None, "source": "policy default"})
    return out


def explain_customer(conn: Connection, external_id: str, triggers: Sequence[Any],
                     lifecycle: Lifecycle, default_tz: str, now: datetime,
                     only: str | None = None, *, policy: PolicyFile | None = None,
                     channels: Sequence[str] = ()) -> dict[str, Any]:
    """Stage, stage history, and for each trigger the verdict with every condition's values;
    consent per channel; every policy decision with its reason; every message with outcomes."""
    cid = conn.execute(select(Customer.id).where(Customer.external_id == external_id)).scalar()
    if cid is None:
        raise LookupError(f"unknown customer {external_id!r}")
    facts = load_facts(conn, cid, now, default_tz)
    tz = facts.customer["timezone"] or default_tz
    stage_now = lifecycle.stage_py(facts)
    history = [dict(r) for r in conn.execute(
        select(StageChange.stage, StageChange.previous_stage, StageChange.entered_at,
               StageChange.membership_id)
        .where(StageChange.customer_id == cid).order_by(StageChange.id)).mappings()]
    occurrences = [dict(r) for r in conn.execute(
        select(Occurrence.trigger_id, Occurrence.scope_key, Occurrence.fired_at, Occurrence.arm,
               Occurrence.variant, Occurrence.channel, Occurrence.status, Occurrence.reason,
               Occurrence.not_before)
        .where(Occurrence.customer_id == cid).order_by(Occurrence.id)).mappings()]
    messages = []
    for msg in conn.execute(select(Message.__table__).where(Message.customer_id == cid)
                            .order_by(Message.id)).mappings():
        outcomes = [dict(o) for o in conn.execute(
            select(Outcome.status, Outcome.occurred_at, Outcome.source, Outcome.detail)
            .where(Outcome.message_id == msg["id"]).order_by(Outcome.id)).mappings()]
        messages.append({"id": msg["id"], "trigger": msg["trigger_id"], "channel": msg["channel"],
                         "template": msg["template"], "status": msg["status"],
                         "created_at": msg["created_at"], "due_at": msg["due_at"],
                         "last_error": msg["last_error"], "outcomes": outcomes})
    # the contact policy's decisions: what it skipped, held out or deferred, and why
    decisions = [{"trigger": o["trigger_id"], "at": o["fired_at"], "status": o["status"],
                  "channel": o["channel"], "reason": o["reason"], "until": o["not_before"]}
                 for o in occurrences if o["reason"]]
    report_triggers = []
    for loaded in triggers:
        trig: Trigger = loaded.trigger
        if only is not None and trig.id != only:
            continue
        in_stage = not trig.stages or stage_now in trig.stages
        when = _when(trig, facts, tz, history)
        conds = _conditions(loaded.conditions, facts)
        fired = [o for o in occurrences if o["trigger_id"] == trig.id]
        failed = [c["condition"] for c in conds if not c["passed"]]
        if not in_stage:
            verdict = f"not in stage {' or '.join(trig.stages)} (customer is {stage_now})"
        elif failed:
            verdict = f"condition failed: {failed[0]}"
        elif not when["due"]:
            verdict = "not due now"
        else:
            verdict = "matches now"
        if fired:
            last = fired[-1]
            verdict += (f"; fired {len(fired)}x, last {last['fired_at']:%Y-%m-%d %H:%M} "
                        f"({last['status']}{': ' + last['reason'] if last['reason'] else ''})")
        report_triggers.append({"trigger": trig.id, "stage": list(trig.stages),
                                "in_stage": in_stage, "when": when, "conditions": conds,
                                "occurrences": fired, "verdict": verdict})
    customer = {k: facts.customer[k] for k in (
        "external_id", "first_name", "email", "phone", "chat_id", "timezone", "segment",
        "lifetime_value", "visit_count", "last_visit_at")}
    return {
        "customer": customer, "now": now, "time_zone": tz,
        "membership": facts.membership and {k: facts.membership[k] for k in (
            "external_id", "plan", "price", "starts_on", "ends_on", "status")},
        "stage": {"recorded": facts.customer["stage"], "computed_now": stage_now,
                  "trace": lifecycle.trace(facts), "history": history},
        "consent": _consent(conn, cid, policy, channels),
        "triggers": report_triggers, "decisions": decisions, "messages": messages,
    }


