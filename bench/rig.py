"""What every benchmark phase shares: the repository's config, the triggers, the instants."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from generate import NOW
from ruamel.yaml import YAML
from triggers import TRIGGERS

from engine.conditions import Condition, compile_condition
from engine.config import ChannelsFile, ClubFile, LifecycleFile, PolicyFile, ProjectConfig
from engine.rulefile import Trigger

__all__ = ["AFTER", "FIRST", "INCREMENTAL", "INGEST_AT", "REPEATED", "STEADY", "WARMUP", "Loaded",
           "load_config", "load_triggers"]

ROOT = Path(__file__).resolve().parents[1]
FIRST = NOW                                       # the first full tick
STEADY = NOW + timedelta(days=1)                  # the same instant the next day
WARMUP = STEADY + timedelta(minutes=5)            # a few visits, the process's first tick
INGEST_AT = STEADY + timedelta(minutes=10)        # 10,000 visits arrive
INCREMENTAL = STEADY + timedelta(minutes=15)      # the incremental tick after them
AFTER = INCREMENTAL + timedelta(minutes=1)        # the next full tick: 10,000 changed since STEADY
REPEATED = AFTER + timedelta(minutes=1)           # the scheduler's next full tick, a minute later


@dataclass
class Loaded:
    """A trigger as the loader hands it to the evaluator (as tests/conftest.py builds them)."""

    trigger: Trigger
    conditions: list[Condition]
    path: str = "bench/triggers.py"
    sha256: str = "0" * 64


def _yaml(path: Path) -> Any:
    return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))


def load_config() -> ProjectConfig:
    """The repository's own config/ directory, validated by the models."""
    cfg = ROOT / "config"
    return ProjectConfig(
        club=ClubFile.model_validate(_yaml(cfg / "club.yaml")),
        lifecycle=LifecycleFile.model_validate(_yaml(cfg / "lifecycle.yaml")),
        channels=ChannelsFile.model_validate(_yaml(cfg / "channels.yaml")),
        policy=PolicyFile.model_validate(_yaml(cfg / "policy.yaml")),
    )


def load_triggers() -> list[Loaded]:
    out = []
    for data in TRIGGERS:
        trig = Trigger.model_validate(data)
        out.append(Loaded(trig, [compile_condition(c) for c in trig.conditions]))
    return out


def at(moment: datetime) -> str:
    return moment.isoformat(sep=" ")
