"""Statistics on constructed data with answers computed by hand, and the interval's coverage."""

from __future__ import annotations

import math
import random
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, insert

from engine.models import Customer, Event, Membership, Message, Occurrence, table
from engine.stats import Goal, compare, compute_stats, render_csv, render_json, render_table

ROOT = Path(__file__).resolve().parents[1]
FIRED = datetime(2026, 1, 20, 10, 0)
AS_OF = datetime(2026, 3, 1, 12, 0)
GOALS = {"t": Goal("membership_renewed", timedelta(days=10)),
         "u": Goal("membership_renewed", timedelta(days=10))}


def _wilson(x: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = x / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def _newcomb(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """Newcomb's hybrid score interval (method 10), from the two Wilson intervals."""
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = _wilson(x1, n1)
    l2, u2 = _wilson(x2, n2)
    d = p1 - p2
    return (d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
            d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def _score_p(x1: int, n1: int, x2: int, n2: int) -> float:
    """Two-sided score test of equal proportions (pooled variance, Miettinen-Nurminen n/(n-1))."""
    n = n1 + n2
    pooled = (x1 + x2) / n
    var = pooled * (1 - pooled) * (1 / n1 + 1 / n2) * n / (n - 1)
    z = (x1 / n1 - x2 / n2) / math.sqrt(var)
    return math.erfc(abs(z) / math.sqrt(2))


@pytest.mark.parametrize("counts", [(30, 100, 20, 100), (212, 700, 81, 300), (5, 40, 9, 35),
                                    (0, 50, 3, 60)])
def test_compare_matches_the_textbook(counts: tuple[int, int, int, int]) -> None:
    x1, n1, x2, n2 = counts
    result = compare(x1, n1, x2, n2)
    assert result is not None
    assert result.lift == pytest.approx(x1 / n1 - x2 / n2)
    low, high = _newcomb(x1, n1, x2, n2)
    assert result.ci_low == pytest.approx(low, abs=1e-9)
    assert result.ci_high == pytest.approx(high, abs=1e-9)
    assert result.p_value == pytest.approx(_score_p(x1, n1, x2, n2), rel=1e-6)


def test_compare_without_a_holdout_or_without_variation() -> None:
    assert compare(3, 10, 0, 0) is None
    same = compare(0, 50, 0, 50)
    assert same is not None and same.lift == 0 and same.p_value is None
    assert same.ci_low < 0 < same.ci_high


def test_interval_covers_the_true_lift_about_95_percent_of_the_time() -> None:
    rng = random.Random(11)
    covered = trials = 0
    for _ in range(600):
        p_h = rng.uniform(0.1, 0.7)
        lift = rng.choice([-0.05, 0.0, 0.03, 0.08])
        n_t, n_h = rng.choice([(700, 300), (300, 120), (1500, 600)])
        x_t = sum(rng.random() < p_h + lift for _ in range(n_t))
        x_h = sum(rng.random() < p_h for _ in range(n_h))
        result = compare(x_t, n_t, x_h, n_h)
        assert result is not None
        trials += 1
        covered += result.ci_low <= lift <= result.ci_high
    assert 0.93 <= covered / trials <= 0.975


# --- compute_stats on a constructed history --------------------------------------------------


def _history(db: Engine) -> None:
    """Trigger t: customers 1-10 treated (1 fired twice in the cycle, 10 never sent),
    11-15 held out, 16 treated late (window open, cycle running). Trigger u: customer 2 only."""
    now = datetime(2026, 1, 1)
    customers = [{"id": i, "external_id": f"C{i}", "created_at": now, "updated_at": now,
                  "segment": "A" if i <= 5 else "B"} for i in range(1, 17)]
    memberships = [{"id": i, "external_id": f"C{i}-1", "customer_id": i,
                    "starts_on": date(2026, 1, 1),
                    "ends_on": date(2026, 3, 31) if i == 16 else date(2026, 1, 31),
                    "created_at": now, "updated_at": now} for i in range(1, 17)]
    occurrences: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []

    def fire(trigger: str, cid: int, at: datetime, arm: str, sent: bool, key: str) -> None:
        oid = len(occurrences) + 1
        occurrences.append({
            "id": oid, "trigger_id": trigger, "customer_id": cid, "scope_key": key,
            "membership_id": cid, "tick_id": 1, "fired_at": at, "stage": "renewal_due",
            "arm": arm, "variant": ("a" if cid % 2 else "b") if trigger == "t" else None,
            "channel": "email", "rule_file_version_id": None,
            "status": "held_out" if arm == "holdout" else ("message" if sent else "skipped")})
        if sent:
            messages.append({"occurrence_id": oid, "customer_id": cid, "trigger_id": trigger,
                             "channel": "email", "template": "x", "status": "sent",
                             "due_at": at, "created_at": at, "sent_at": at})

    for cid in range(1, 11):
        fire("t", cid, FIRED, "treatment", sent=cid != 10, key="a")
    fire("t", 1, FIRED + timedelta(days=1), "treatment", sent=True, key="b")
    for cid in range(11, 16):
        fire("t", cid, FIRED, "holdout", sent=False, key="a")
    fire("t", 16, datetime(2026, 2, 25, 10), "treatment", sent=True, key="a")
    fire("u", 2, FIRED + timedelta(days=1), "treatment", sent=True, key="a")
    renewed = {1: 2, 2: 2, 3: 2, 4: 15, 11: 1}  # customer -> days after FIRED
    events = [{"customer_id": cid, "kind": "membership_renewed",
               "occurred_at": FIRED + timedelta(days=d), "received_at": now}
              for cid, d in renewed.items()]
    events.append({"customer_id": 5, "kind": "visit", "occurred_at": FIRED + timedelta(days=1),
                   "received_at": now})
    with db.begin() as conn:
        conn.execute(insert(table(Customer)), customers)
        conn.execute(insert(table(Membership)), memberships)
        conn.execute(insert(table(Occurrence)), occurrences)
        conn.execute(insert(table(Message)), messages)
        conn.execute(insert(table(Event)), events)


def test_counts_lift_and_attribution_on_a_known_history(db: Engine) -> None:
    _history(db)
    stats = compute_stats(db, GOALS, as_of=AS_OF)
    t = stats.row("t")
    assert t is not None
    # customer 1 fired twice in one cycle: one unit; customer 16: window open, cycle running
    assert (t.n_treatment, t.n_holdout, t.unscored) == (10, 5, 1)
    assert (t.conversions_treatment, t.conversions_holdout) == (3, 1)  # 4 renewed on day 15
    assert t.sent == 10 and t.share_sent == pytest.approx(10 / 11)
    assert t.rate_treatment == pytest.approx(0.3) and t.rate_holdout == pytest.approx(0.2)
    assert t.lift == pytest.approx(0.1)
    assert t.relative_lift == pytest.approx(0.5)
    low, high = _newcomb(3, 10, 1, 5)
    assert (t.ci_low, t.ci_high) == (pytest.approx(low), pytest.approx(high))
    assert t.lift_per_sent == pytest.approx(0.1 / (10 / 11))
    assert t.p_value == pytest.approx(_score_p(3, 10, 1, 5), rel=1e-6)
    # any-touch: 1, 2, 3 renewed within 10 days of a sent t; last-touch: u was later for 2
    assert (t.any_touch, t.last_touch) == (3, 2)
    u = stats.row("u")
    assert u is not None and (u.any_touch, u.last_touch) == (1, 1)
    assert (u.n_treatment, u.n_holdout, u.lift) == (1, 0, None)
    # variants: odd customers a, even b, each against every holdout unit
    a, b = stats.row("t", "a"), stats.row("t", "b")
    assert a is not None and b is not None
    assert (a.n_treatment, a.conversions_treatment, a.n_holdout) == (5, 2, 5)  # 1, 3 of 1,3,5,7,9
    assert (b.n_treatment, b.conversions_treatment) == (5, 1)  # 2 of 2,4,6,8,10
    # breakdowns partition the units
    seg = {r.group: r for r in stats.rows if r.trigger_id == "t" and r.breakdown == "segment"}
    assert (seg["A"].n_treatment, seg["A"].conversions_treatment) == (5, 3)
    assert (seg["B"].n_treatment, seg["B"].n_holdout, seg["B"].conversions_holdout) == (5, 5, 1)
    for dim in ("stage", "channel", "version"):
        rows = [r for r in stats.rows if r.trigger_id == "t" and r.breakdown == dim]
        assert sum(r.n_treatment for r in rows) == 10 and sum(r.n_holdout for r in rows) == 5


def test_rescoring_with_another_window_and_as_of(db: Engine) -> None:
    _history(db)
    wide = compute_stats(db, GOALS, as_of=AS_OF, window_days=20)
    t = wide.row("t")
    assert t is not None and wide.window_days == 20
    assert (t.conversions_treatment, t.conversions_holdout) == (4, 1)
    assert t.any_touch == 4
    # before the windows closed and before the cycles ended, nothing is decided yet
    early = compute_stats(db, GOALS, as_of=FIRED + timedelta(days=5))
    e = early.row("t")
    assert e is not None and (e.n_treatment, e.n_holdout, e.unscored) == (0, 0, 16)
    # once the cycle ended (31 Jan + 2 days), units are decided though a 40-day window is open
    settled = compute_stats(db, GOALS, as_of=datetime(2026, 2, 3), window_days=40)
    s = settled.row("t")
    assert s is not None and (s.n_treatment, s.n_holdout) == (10, 5)
    # conversions are recorded once, however often the stats are computed
    again = compute_stats(db, GOALS, as_of=AS_OF).row("t")
    assert again is not None and again.conversions_treatment == 3


def test_outputs(db: Engine) -> None:
    _history(db)
    stats = compute_stats(db, GOALS, as_of=AS_OF)
    csv_text = render_csv(stats)
    assert csv_text.splitlines()[0].startswith("trigger_id,variant,breakdown,group,n,")
    assert len(csv_text.splitlines()) == len(stats.rows) + 1
    assert '"trigger_id": "t"' in render_json(stats)
    assert render_table(stats).row_count == len([r for r in stats.rows if r.breakdown is None])


def test_stats_over_the_api_behind_the_key(db: Engine, tmp_path: Path) -> None:
    from engine.api import create_app
    from engine.clock import FixedClock
    from engine.runtime import Runtime
    from engine.settings import Settings
    from tests.test_api import serve

    _history(db)
    settings = Settings(_env_file=None, database_url="sqlite://", api_key="k" * 32,
                        rules_dir=ROOT / "rules", templates_dir=ROOT / "templates",
                        config_dir=ROOT / "config")
    runtime = Runtime.load(settings, FixedClock(AS_OF), engine=db)
    with serve(create_app(runtime)) as url, \
            httpx.Client(base_url=url, trust_env=False, timeout=30) as client:
        assert client.get("/v1/stats").status_code == 401
        response = client.get("/v1/stats", params={"window_days": 20},
                              headers={"X-API-Key": "k" * 32})
        assert response.status_code == 200
        body = response.json()
        assert body["window_days"] == 20 and isinstance(body["rows"], list)
        assert client.get("/v1/stats", params={"window_days": 0},
                          headers={"X-API-Key": "k" * 32}).status_code == 422
