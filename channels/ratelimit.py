"""Pacing sends per (channel, sender): a token bucket that makes a burst wait instead of failing.

Providers cap throughput per sender (a Twilio long code takes about 1 message a second, a
toll-free number 3, a short code 100); sending faster only earns 429s. Each caller reserves a
token under the lock and sleeps outside it, so concurrent senders queue up in arrival order and
the lock is never held while sleeping.

The buckets live in this process unless a `BucketStore` is set (`RateLimiter.store`): several
dispatcher processes sending for the same sender then reserve from one bucket in the store (the
dispatcher's is a row in the database), so together they keep to the sender's rate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Protocol

__all__ = ["BucketStore", "RateLimiter"]

_shared: dict[tuple[float, int], RateLimiter] = {}
_shared_lock = threading.Lock()


class BucketStore(Protocol):
    """Token buckets kept outside the process, shared by every process that uses the store."""

    def reserve(self, key: Hashable, rate_per_second: float, burst: int) -> float:
        """Take one token for `key` now; the seconds the caller must wait before using it."""
        ...


class RateLimiter:
    """A thread-safe token bucket per key, refilled at `rate_per_second`, holding up to `burst`."""

    def __init__(self, rate_per_second: float, burst: int = 1, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate_per_second <= 0:
            raise ValueError(f"rate_per_second must be positive, got {rate_per_second}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self.rate = float(rate_per_second)
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        # key -> (tokens, at); tokens go negative while callers wait for reserved tokens
        self._buckets: dict[Hashable, tuple[float, float]] = {}
        self.store: BucketStore | None = None  # set: the buckets are shared through it

    @classmethod
    def shared(cls, rate_per_second: float, burst: int = 1) -> RateLimiter:
        """The process-wide limiter for these parameters, so channels built twice share buckets."""
        with _shared_lock:
            key = (float(rate_per_second), burst)
            if key not in _shared:
                _shared[key] = cls(rate_per_second, burst)
            return _shared[key]

    def reserve(self, key: Hashable) -> float:
        """Take one token for `key` now; the seconds the caller must wait before using it."""
        if self.store is not None:
            return self.store.reserve(key, self.rate, self.burst)
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate) - 1.0
            self._buckets[key] = (tokens, now)
        return -tokens / self.rate if tokens < 0 else 0.0

    def acquire(self, key: Hashable) -> float:
        """Wait until `key` may send once more; the seconds waited."""
        wait = self.reserve(key)
        if wait > 0:
            self._sleep(wait)
        return wait
