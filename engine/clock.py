"""Injected clocks: every time-dependent part of the engine asks one of these for `now`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol

__all__ = ["Clock", "FixedClock", "SystemClock", "utc_naive"]


def utc_naive(moment: datetime) -> datetime:
    """Normalise to naive UTC, the form every timestamp is stored in."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment


class Clock(Protocol):
    """Something that tells the current instant as naive UTC."""

    def now(self) -> datetime: ...


class SystemClock:
    """The wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC).replace(tzinfo=None)


class FixedClock:
    """A clock that only moves when told to: tests, backtests and the demo's virtual time."""

    def __init__(self, start: datetime) -> None:
        self._now = utc_naive(start)

    def now(self) -> datetime:
        return self._now

    def set(self, moment: datetime) -> None:
        self._now = utc_naive(moment)

    def advance(self, delta: timedelta) -> datetime:
        self._now += delta
        return self._now
