"""Synthetic fitness-club data for the tick benchmark, written with the plain database driver.

N customers, each with a chain of memberships (monthly, annual and corporate plans; renewals,
lapses and comebacks; join dates spread over three years so every lifecycle stage occurs), and a
year of visits while a membership runs: a per-member habit of about 0-3 visits a week, fading for
some. The denormalised customer columns (last_visit_at, visit_count, recent_visits,
lifetime_value, current_membership_id and its membership's columns, change_seq) are filled
consistently with the generated rows, as ingestion would have left them. The stage columns are
left empty: the first tick assigns them.

Rows go in with `executemany` (SQLite) or `COPY` (PostgreSQL), in chunks, never through the ORM.
The output is deterministic for a given N and GENERATOR_VERSION.
"""

from __future__ import annotations

import json
import math
import random
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from engine.models import RECENT_VISITS

__all__ = ["GENERATOR_VERSION", "NOW", "Batch", "batches", "load_postgres", "load_sqlite"]

GENERATOR_VERSION = 3
# The instant of the first tick: a Monday evening in Berlin, morning on the US west coast,
# already Tuesday in Tokyo; the steady-state tick runs 24 hours later.
NOW = datetime(2026, 3, 2, 17, 30)
TODAY = NOW.date()
YEAR_AGO = TODAY - timedelta(days=365)
CHUNK = 5_000  # customers per batch

ZONES = [(None, 0.55), ("Europe/Berlin", 0.08), ("Europe/London", 0.10),
         ("America/New_York", 0.10), ("America/Los_Angeles", 0.09), ("Asia/Tokyo", 0.08)]
SEGMENTS = [("A", 0.2), ("B", 0.3), ("C", 0.3), ("D", 0.2)]
# plan, term in days, price of one term, share of new memberships
PLANS = [("monthly", 182, 234.0, 0.55), ("annual", 365, 399.0, 0.35), ("corporate", 365, 0.0, 0.10)]
GOALS = ["strength", "cardio", "mobility", "weight"]
FIRST_NAMES = ["Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gia", "Hugo", "Ida", "Jon", "Kim",
               "Lea", "Max", "Nora", "Otto", "Pia"]
LAST_NAMES = ["Berg", "Fischer", "Klein", "Lang", "Meyer", "Roth", "Schulz", "Weber", "Wolf"]


def _cumulative(items: list[tuple[Any, float]]) -> tuple[list[Any], list[float]]:
    values, cum, acc = [], [], 0.0
    for value, weight in items:
        acc += weight
        values.append(value)
        cum.append(acc)
    return values, cum


_ZONE_VALUES, _ZONE_CUM = _cumulative(ZONES)
_SEG_VALUES, _SEG_CUM = _cumulative(SEGMENTS)
_PLAN_VALUES, _PLAN_CUM = _cumulative([((p, t, c), w) for p, t, c, w in PLANS])


@dataclass
class Batch:
    """Rows for a chunk of customers, as tuples in the column order of COLUMNS."""

    customers: list[tuple[Any, ...]]
    memberships: list[tuple[Any, ...]]
    events: list[tuple[Any, ...]]


COLUMNS = {
    "customers": ("id", "external_id", "first_name", "last_name", "email", "phone", "chat_id",
                  "timezone", "locale", "segment", "attributes", "created_at", "updated_at",
                  "last_visit_at", "visit_count", "recent_visits", "lifetime_value",
                  "current_membership_id", "membership_plan", "membership_price",
                  "membership_starts_on", "membership_ends_on", "membership_status",
                  "change_seq"),
    "memberships": ("id", "external_id", "customer_id", "plan", "price", "starts_on", "ends_on",
                    "status", "created_at", "updated_at"),
    "events": ("id", "customer_id", "kind", "occurred_at", "received_at", "properties"),
}

# Timestamps as SQLAlchemy stores them in SQLite (and as PostgreSQL's COPY reads them).
_DAY0 = YEAR_AGO - timedelta(days=1)
_DAY_TEXT = [(_DAY0 + timedelta(days=i)).isoformat() for i in range(368)]
_TODAY_INDEX = (TODAY - _DAY0).days
_DAY0_EPOCH = (_DAY0 - date(1970, 1, 1)).days * 86400  # whole seconds, as recent_visits keeps
_NOW_SECONDS = NOW.hour * 3600 + NOW.minute * 60


def _ts(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


def _clock_text(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}.000000"


def batches(n: int, seed: int = 20260302) -> Iterator[Batch]:
    """All rows for n customers, CHUNK customers at a time; ids are 1-based and dense."""
    rng = random.Random(seed)
    rand, choices = rng.random, rng.choices
    clock_cache: dict[int, str] = {}
    membership_id = 0
    event_id = 0
    for first in range(1, n + 1, CHUNK):
        batch = Batch([], [], [])
        for cid in range(first, min(first + CHUNK, n + 1)):
            # --- memberships: a chain of terms from a join date in the last three years
            memberships = []
            if rand() >= 0.03:  # 3% are prospects who never joined
                start = TODAY - timedelta(days=int(rand() * 3 * 365))
                plan = choices(_PLAN_VALUES, cum_weights=_PLAN_CUM)[0]
                while start <= TODAY:
                    name, term, price = plan
                    end = start + timedelta(days=term - 1)
                    memberships.append((name, price, start, end))
                    if end >= TODAY:
                        break
                    if rand() < 0.65:  # renews straight away
                        start = end + timedelta(days=1)
                        if rand() < 0.15:
                            plan = choices(_PLAN_VALUES, cum_weights=_PLAN_CUM)[0]
                    elif rand() < 0.2:  # comes back after a break
                        start = end + timedelta(days=30 + int(rand() * 170))
                    else:
                        break
            zone = choices(_ZONE_VALUES, cum_weights=_ZONE_CUM)[0]
            created = datetime.combine(memberships[0][2] if memberships
                                       else TODAY - timedelta(days=int(rand() * 700)),
                                       datetime.min.time()) + timedelta(hours=9)
            current = None
            mirror: tuple[Any, ...] = (None,) * 5  # the current membership's columns
            lifetime = 0.0
            for name, price, start, end in memberships:
                membership_id += 1
                current = membership_id
                lifetime += price
                if end < TODAY:
                    status = "ended"
                else:
                    r = rand()
                    status = "cancelled" if r < 0.03 else "frozen" if r < 0.04 else "active"
                stamp = _ts(datetime.combine(start, datetime.min.time()) - timedelta(days=3))
                batch.memberships.append((
                    membership_id, f"m{membership_id}", cid, name, price, start.isoformat(),
                    end.isoformat(), status, stamp, stamp))
                mirror = (name, price, start.isoformat(), end.isoformat(), status)

            # --- visits in the last year while a membership ran: a habit, fading for some
            habit = rand()
            per_week = 0.2 if habit < 0.25 else 1.0 + rand() if habit < 0.7 else 2.0 + rand()
            fade_half_life = 30 + rand() * 120 if rand() < 0.35 else 0.0
            favourite_hour = 6 + int(rand() * 15)
            stamps: list[tuple[str, int]] = []
            for _, _, start, end in memberships:
                lo = max(start, YEAR_AGO)
                hi = min(end, TODAY)
                if hi < lo:
                    continue
                day = float((lo - _DAY0).days)
                last_day = (hi - _DAY0).days
                origin = (start - _DAY0).days
                rate = per_week / 7
                while True:
                    day += rng.expovariate(rate)
                    d = int(day)
                    if d > last_day:
                        break
                    if fade_half_life and rand() > 0.5 ** ((d - origin) / fade_half_life):
                        continue
                    seconds = (favourite_hour + int(rand() * 3) - 1) * 3600 + int(rand() * 3600)
                    if d == _TODAY_INDEX and seconds > _NOW_SECONDS:
                        continue
                    clock = clock_cache.get(seconds)
                    if clock is None:
                        clock = clock_cache[seconds] = _clock_text(seconds)
                    stamp = f"{_DAY_TEXT[d]} {clock}"
                    event_id += 1
                    stamps.append((stamp, _DAY0_EPOCH + d * 86400 + seconds))
                    batch.events.append((event_id, cid, "visit", stamp, stamp, "{}"))

            # the latest visits, newest first, as ingestion keeps them
            latest = sorted(stamps, reverse=True)[:RECENT_VISITS]
            goal = rand()
            attributes = json.dumps({"goal": GOALS[int(goal * 8)]} if goal < 0.5 else {})
            batch.customers.append((
                cid, f"c{cid}", FIRST_NAMES[cid % len(FIRST_NAMES)],
                LAST_NAMES[cid % len(LAST_NAMES)],
                f"c{cid}@example.com" if rand() < 0.85 else None,
                f"+4915{cid:09d}" if rand() < 0.6 else None,
                str(100_000_000 + cid) if rand() < 0.3 else None,
                zone, "de" if zone is None or zone == "Europe/Berlin" else "en",
                choices(_SEG_VALUES, cum_weights=_SEG_CUM)[0], attributes,
                _ts(created), _ts(created), latest[0][0] if latest else None, len(stamps),
                json.dumps([seconds for _, seconds in latest]), lifetime, current, *mirror, 1))
        yield batch


def _insert_sql(table: str, marker: str) -> str:
    cols = COLUMNS[table]
    return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join([marker] * len(cols))})"


def load_sqlite(path: str, n: int, progress: Callable[[int, int], None]) -> dict[str, int]:
    """Fill a migrated, empty SQLite database at `path`; returns row counts."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-1000000")
    counts = {"customers": 0, "memberships": 0, "events": 0}
    conn.execute("BEGIN")
    for batch in batches(n):
        for table in ("customers", "memberships", "events"):
            rows = getattr(batch, table)
            conn.executemany(_insert_sql(table, "?"), rows)
            counts[table] += len(rows)
        progress(counts["customers"], n)
    conn.execute("INSERT INTO counters (name, value) VALUES ('change', 1)")
    conn.execute("COMMIT")
    # No ANALYZE: the engine never analyses a SQLite database, so the tick is measured with the
    # plans a club's own database gets (statistics from generation, when every stage was still
    # NULL, had hidden a plan that read date triggers through the stage index).
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    return counts


def _copy_text(value: Any) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, str):
        return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return str(value)


def load_postgres(conn: Any, n: int, progress: Callable[[int, int], None]) -> dict[str, int]:
    """Fill a migrated, empty PostgreSQL database through a psycopg connection, with COPY."""
    counts = {"customers": 0, "memberships": 0, "events": 0}
    with conn.cursor() as cur:
        for batch in batches(n):
            for table in ("customers", "memberships", "events"):
                rows = getattr(batch, table)
                text = "".join("\t".join(map(_copy_text, row)) + "\n" for row in rows)
                with cur.copy(f"COPY {table} ({', '.join(COLUMNS[table])}) FROM STDIN") as copy:
                    copy.write(text)
                counts[table] += len(rows)
            progress(counts["customers"], n)
        for table in ("customers", "memberships", "events"):
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"greatest((SELECT max(id) FROM {table}), 1))")
        cur.execute("INSERT INTO counters (name, value) VALUES ('change', 1)")
    conn.commit()
    return counts

