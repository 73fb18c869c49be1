"""`explain`: for a customer who got nothing, each trigger names what stopped it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

from sqlalchemy import Engine

from engine.clock import FixedClock
from engine.config import ProjectConfig
from engine.evaluation import Evaluator
from engine.explain import explain_customer
from engine.ingest import EventIn
from tests.conftest import ROOT, make_trigger
from tests.test_evaluation import seed


def test_explain_names_the_failed_condition(db: Engine, clock: FixedClock,
                                            project_config: ProjectConfig) -> None:
    ing = seed(db, clock)
    ing.events([EventIn(customer_external_id="bob", kind="visit",
                        occurred_at=clock.now() - timedelta(days=3))])
    triggers = [
        make_trigger(id="reminder", stage="renewal_due", conditions=["visits_30d >= 4"],
                     when={"before": "membership.ends_at", "days": 14, "at": "09:00"}),
        make_trigger(id="welcome", stage="onboarding", when={"stage_entered": "onboarding"}),
    ]
    ev = Evaluator(db, project_config, triggers, clock)
    assert ev.tick().occurrences == {"reminder": 0, "welcome": 1}  # ann; nothing for bob
    with db.connect() as conn:
        report = explain_customer(conn, "bob", triggers, ev.lifecycle,
                                  project_config.club.timezone, clock.now())
    verdicts = {t["trigger"]: t for t in report["triggers"]}
    assert report["stage"]["recorded"] == "renewal_due"
    assert verdicts["reminder"]["verdict"] == "condition failed: visits_30d >= 4"
    assert verdicts["reminder"]["conditions"] == [
        {"condition": "visits_30d >= 4", "passed": False, "values": {"visits_30d": 1}}]
    assert verdicts["reminder"]["when"]["due"] is True
    assert verdicts["welcome"]["verdict"] == "not in stage onboarding (customer is renewal_due)"


def test_explain_cli_json(db: Engine, clock: FixedClock) -> None:
    seed(db, clock)
    env = {**os.environ, "TOUCHPOINTS_DATABASE_URL": db.url.render_as_string(hide_password=False),
           "TOUCHPOINTS_RULES_DIR": str(ROOT / "rules"),
           "TOUCHPOINTS_TEMPLATES_DIR": str(ROOT / "templates"),
           "TOUCHPOINTS_CONFIG_DIR": str(ROOT / "config")}
    now = clock.now().isoformat()
    subprocess.run([sys.executable, "-m", "engine.cli", "tick", "--now", now], env=env,
                   check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-m", "engine.cli", "explain", "cat", "--json",
                          "--now", now], env=env, check=True, capture_output=True, text=True)
    report = json.loads(out.stdout)
    verdicts = {t["trigger"]: t["verdict"] for t in report["triggers"]}
    assert report["stage"]["recorded"] == "lapsed"
    assert verdicts["welcome"] == "not in stage onboarding (customer is lapsed)"
    assert verdicts["win-back"].startswith("not due now")
    missing = subprocess.run([sys.executable, "-m", "engine.cli", "explain", "nobody"], env=env,
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "unknown customer 'nobody'" in missing.stderr
