"""The club's configuration in `config/`: the club, its lifecycle stages and its channels.

    config/club.yaml       name, default time zone, declared customer attributes
    config/lifecycle.yaml  stages in order; the first whose conditions all hold is the stage
    config/channels.yaml   channel names used by rule files -> adapter, contact point, settings

The models are strict like the rule-file models; `engine.loader` reads them with positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ChannelConfig",
    "ChannelsFile",
    "ClubFile",
    "LifecycleFile",
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


@dataclass(frozen=True)
class ProjectConfig:
    """The three configuration files, validated."""

    club: ClubFile
    lifecycle: LifecycleFile
    channels: ChannelsFile

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.lifecycle.stages)
