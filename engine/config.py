"""The club's configuration in `config/`: the club, its lifecycle stages and its channels.

    config/club.yaml       name, default time zone, declared customer attributes
    config/lifecycle.yaml  stages in order; the first whose conditions all hold is the stage
    config/channels.yaml   channel names used by rule files -> adapter, contact point, settings
    config/policy.yaml     the contact policy (optional; without it, `PolicyFile` defaults)

The models are strict like the rule-file models; `engine.loader` reads them with positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import time, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from engine.rulefile import Duration, TimeOfDay

__all__ = [
    "ChannelConfig",
    "ChannelsFile",
    "ClubFile",
    "ConsentDefaults",
    "FrequencyCap",
    "LifecycleFile",
    "PolicyFile",
    "QuietHours",
    "SegmentPolicy",
    "ProjectConfig",
    "StageDef",
    "valid_timezone",
]


def valid_timezone(name: str) -> str:
    """`name` if it is an IANA time zone, else ValueError."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA time zone {name!r}") from None
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class ClubFile(_Strict):
    """`config/club.yaml`."""

    version: Literal[1]
    name: str = "Touchpoints club"
    timezone: str = "UTC"
    attributes: dict[str, Literal["text", "number", "bool"]] = Field(default_factory=dict)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        return valid_timezone(value)


class StageDef(_Strict):
    """One lifecycle stage; `conditions` use the rule-file condition language."""

    id: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    description: str = ""
    conditions: list[str] = Field(default_factory=list)


class LifecycleFile(_Strict):
    """`config/lifecycle.yaml`: stages in order of precedence; the last one has no conditions."""

    version: Literal[1]
    stages: list[StageDef] = Field(min_length=1, max_length=20)

    @model_validator(mode="after")
    def _last_is_catch_all(self) -> LifecycleFile:
        if self.stages[-1].conditions:
            raise ValueError(f"the last stage ({self.stages[-1].id}) must have no conditions: "
                             "it takes every customer no earlier stage took")
        ids = [s.id for s in self.stages]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate stage ids: {', '.join(dupes)}")
        return self


class ChannelConfig(_Strict):
    """One channel as rule files name it."""

    adapter: str = Field(min_length=1)
    contact: Literal["email", "phone", "chat_id"]
    settings: dict[str, Any] = Field(default_factory=dict)


class ChannelsFile(_Strict):
    """`config/channels.yaml`."""

    version: Literal[1]
    channels: dict[str, ChannelConfig] = Field(min_length=1)


def _parse_window(value: Any) -> Any:
    if isinstance(value, str):
        start, sep, end = value.partition("-")
        if not sep:
            raise ValueError(f'expected a local time window as "HH:MM-HH:MM", got {value!r}')
        return {"start": start.strip(), "end": end.strip()}
    return value


class QuietHours(_Strict):
    """The local hours a channel may send in: `08:00-21:00`; a window may wrap past midnight."""

    start: TimeOfDay
    end: TimeOfDay

    @model_validator(mode="after")
    def _not_empty(self) -> QuietHours:
        if self.start == self.end:
            raise ValueError("the window is empty: start and end are the same time")
        return self

    def is_open(self, local: time) -> bool:
        """Whether a message may go at local time `local`."""
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end


Window = Annotated[QuietHours, BeforeValidator(_parse_window)]


class FrequencyCap(_Strict):
    """At most `max` marketing messages per customer in any rolling `per` (on one channel if
    `channel` is set)."""

    max: int = Field(ge=0, strict=True)
    per: Duration
    channel: str | None = None

    @field_validator("per")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("the window must be longer than zero")
        return value

    @property
    def label(self) -> str:
        days = self.per / timedelta(days=1)
        span = f"{days:g}d" if days >= 1 else f"{self.per.total_seconds() / 3600:g}h"
        return f"{self.max} per {span}" + (f" on {self.channel}" if self.channel else "")


class SegmentPolicy(_Strict):
    """What a customer segment may receive: its channels, and per-channel caps per cycle."""

    channels: list[str] | None = None
    max_per_cycle: dict[str, int] = Field(default_factory=dict)


class ConsentDefaults(_Strict):
    """Whether a customer with no consent entry for a channel and purpose may be contacted."""

    marketing: dict[str, Literal["granted", "required"]] = Field(default_factory=dict)
    transactional: Literal["granted", "required"] = "granted"
    # a channel not named under `marketing` needs an explicit grant
    marketing_otherwise: Literal["granted", "required"] = "required"

    def granted_by_default(self, channel: str, purpose: str) -> bool:
        if purpose == "transactional":
            return self.transactional == "granted"
        return self.marketing.get(channel, self.marketing_otherwise) == "granted"


def _default_quiet_hours() -> dict[str, QuietHours]:
    window = QuietHours(start=time(8), end=time(21))
    return {"sms": window, "chat": window}


class PolicyFile(_Strict):
    """`config/policy.yaml`: consent defaults, quiet hours, caps, budgets, costs, segments."""

    version: Literal[1] = 1
    consent: ConsentDefaults = Field(default_factory=ConsentDefaults)
    # channel -> the local hours it may send in; a channel not listed sends at any hour
    quiet_hours: dict[str, Window] = Field(default_factory=_default_quiet_hours)
    # whether transactional messages wait for quiet hours to end too
    transactional_quiet_hours: bool = Field(default=True, strict=True)
    frequency_caps: list[FrequencyCap] = Field(
        default_factory=lambda: [FrequencyCap(max=1, per=timedelta(days=1)),
                                 FrequencyCap(max=3, per=timedelta(days=7))], max_length=20)
    # marketing messages per customer per membership cycle; None: no budget
    cycle_budget: int | None = Field(default=15, ge=0, strict=True)
    # cost per message, in the club's currency
    cost: dict[str, float] = Field(default_factory=dict)
    segments: dict[str, SegmentPolicy] = Field(default_factory=dict)

    def channel_names(self) -> set[str]:
        """Every channel this policy names (to check against channels.yaml)."""
        names = set(self.quiet_hours) | set(self.cost) | set(self.consent.marketing)
        names |= {c.channel for c in self.frequency_caps if c.channel}
        for seg in self.segments.values():
            names |= set(seg.channels or []) | set(seg.max_per_cycle)
        return names


@dataclass(frozen=True)
class ProjectConfig:
    """The configuration files, validated."""

    club: ClubFile
    lifecycle: LifecycleFile
    channels: ChannelsFile
    policy: PolicyFile = field(default_factory=PolicyFile)

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.lifecycle.stages)
