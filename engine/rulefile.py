"""The rule-file model: what a marketer may write in `rules/*.yaml`, validated strictly.

Every block is a pydantic model with `extra="forbid"`; `when` and `once` choose their schema by
the key that is present, so an error says which keys were expected. Positions are attached to
errors by `engine.loader`, which owns reading YAML.
"""

from __future__ import annotations

import re
from datetime import time, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

__all__ = [
    "Action",
    "Anchor",
    "Duration",
    "EventWhen",
    "Goal",
    "Once",
    "RelativeWhen",
    "RuleFile",
    "ScheduleWhen",
    "Scope",
    "StageWhen",
    "Trigger",
    "Variant",
    "When",
    "parse_duration",
]

FORMAT_VERSION = 1
TRIGGER_ID = r"^[a-z0-9][a-z0-9_.-]{0,127}$"
_DURATION = re.compile(r"^(\d+)\s*([mhdw])$")
_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1),
          "w": timedelta(weeks=1)}


def parse_duration(value: Any) -> timedelta:
    """`30d`, `12h`, `2w`, `90m` -> timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, str):
        match = _DURATION.match(value.strip())
        if match:
            return int(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f"expected a duration such as 30d, 12h, 2w or 90m, got {value!r}")


def _parse_time_of_day(value: Any) -> time:
    if isinstance(value, time):
        return value
    if isinstance(value, str) and re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value.strip()):
        hours, minutes = value.strip().split(":")
        return time(int(hours), int(minutes))
    raise ValueError(f'expected a local time of day as "HH:MM" (00:00-23:59), got {value!r}')


def _parse_share(value: Any) -> float:
    original = value
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"expected a percentage such as 10%, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a share such as 10% or 0.1, got {value!r}")
    if not 0 <= value < 1:
        raise ValueError(f"a holdout share must be at least 0% and below 100%, got {original!r}")
    return float(value)


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
TimeOfDay = Annotated[time, BeforeValidator(_parse_time_of_day)]
Share = Annotated[float, BeforeValidator(_parse_share)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Anchor(StrEnum):
    """Dates a date-relative trigger can count from."""

    MEMBERSHIP_STARTS = "membership.starts_at"
    MEMBERSHIP_ENDS = "membership.ends_at"


class EventWhen(Strict):
    """Fires when an event of this kind is received."""

    event: str = Field(min_length=1, max_length=64)
    within: Duration = Field(default=timedelta(days=2),
                             description="ignore events older than this when they arrive")


class StageWhen(Strict):
    """Fires when the customer enters the stage (once per membership cycle and stage)."""

    stage_entered: str = Field(min_length=1)


class RelativeWhen(Strict):
    """Fires N days before or after a membership date, at a local time of the customer's day."""

    before: Anchor | None = None
    after: Anchor | None = None
    days: int = Field(ge=0, le=3650, strict=True)
    at: TimeOfDay = time(10, 0)

    @model_validator(mode="after")
    def _one_anchor(self) -> RelativeWhen:
        if (self.before is None) == (self.after is None):
            raise ValueError("give exactly one of before: or after:")
        return self

    @property
    def anchor(self) -> Anchor:
        return self.before or self.after  # type: ignore[return-value]

    @property
    def offset_days(self) -> int:
        """Days to add to the anchor date to get the firing date."""
        return -self.days if self.before is not None else self.days


class ScheduleWhen(Strict):
    """Fires on a cron-like schedule evaluated in each customer's local time."""

    schedule: str = Field(description='five-field cron expression, e.g. "0 10 * * mon"')

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value)
        except ValueError as exc:
            raise ValueError(f"not a cron expression ({exc})") from None
        return value


_WHEN_KEYS = {"event": "event", "stage_entered": "stage", "before": "relative",
              "after": "relative", "schedule": "schedule"}


def _when_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        for key in value:
            if key in _WHEN_KEYS:
                return _WHEN_KEYS[key]
        return None
    if isinstance(value, BaseModel):
        return {EventWhen: "event", StageWhen: "stage", RelativeWhen: "relative",
                ScheduleWhen: "schedule"}.get(type(value))
    return None


When = Annotated[
    Annotated[EventWhen, Tag("event")]
    | Annotated[StageWhen, Tag("stage")]
    | Annotated[RelativeWhen, Tag("relative")]
    | Annotated[ScheduleWhen, Tag("schedule")],
    Discriminator(
        _when_kind,
        custom_error_type="when_kind",
        custom_error_message=(
            "expected a mapping with one of: event, stage_entered, before, after, schedule"
        ),
    ),
]


class Scope(StrEnum):
    """Re-entry scopes that need no parameter."""

    PER_CYCLE = "per_cycle"
    EVER = "ever"
    PER_EVENT = "per_event"  # each event (event triggers) or each slot (schedule triggers)


class EveryScope(Strict):
    """At most once every this long."""

    every: Duration


Once = Scope | EveryScope


class Action(Strict):
    """What to send: a channel, a template, and channels to fall back to in order."""

    channel: str = Field(min_length=1, max_length=32)
    template: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")
    fallback: list[str] = Field(default_factory=list, max_length=5)
    # in the channel's quiet hours: wait for them to end, or go on the first fallback open now
    in_quiet_hours: Literal["wait", "fallback"] = "wait"


class Variant(Strict):
    """A variant overrides the action's template or channel and takes a share by weight."""

    template: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")
    channel: str | None = None
    weight: float = Field(default=1.0, gt=0)


class Goal(Strict):
    """The conversion a trigger is meant to cause, and how long after the message it counts."""

    event: str = Field(min_length=1, max_length=64)
    within: Duration = timedelta(days=30)


class Trigger(Strict):
    """One trigger: when it fires, for whom, and what it sends."""

    id: str = Field(pattern=TRIGGER_ID)
    description: str = ""
    stage: str | list[str] | None = Field(
        default=None, description="lifecycle stage(s) the customer must be in; omit for any")
    when: When
    conditions: list[str] = Field(default_factory=list, max_length=50)
    action: Action
    once: Once = Scope.PER_CYCLE
    priority: int = Field(default=50, ge=0, le=100, strict=True)
    holdout: Share = 0.0
    variants: dict[str, Variant] = Field(default_factory=dict, max_length=20)
    goal: Goal | None = None
    purpose: Literal["marketing", "transactional"] = "marketing"
    enabled: bool = Field(default=True, strict=True)  # "NO" or "off" is text, not false

    @property
    def stages(self) -> tuple[str, ...]:
        if self.stage is None:
            return ()
        return (self.stage,) if isinstance(self.stage, str) else tuple(self.stage)

    @model_validator(mode="after")
    def _per_event_needs_event(self) -> Trigger:
        if self.once == Scope.PER_EVENT and not isinstance(self.when, EventWhen | ScheduleWhen):
            raise ValueError("once: per_event needs when: {event: ...} or {schedule: ...}")
        return self


class RuleFile(Strict):
    """A rule file: a format version and a list of triggers."""

    version: Literal[1]
    triggers: list[Trigger] = Field(default_factory=list, max_length=1000)
