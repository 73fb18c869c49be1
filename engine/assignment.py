"""Deterministic holdout and variant assignment per customer, trigger and cycle.

The hash is plain integer arithmetic modulo 2^31-1 (a mix of the ids and a salt from the trigger
id, squared twice so consecutive ids do not fall on a lattice, then one MINSTD step) so that
SQLite, PostgreSQL and Python compute the same bucket, set-wise in SQL and
one at a time in `explain` and the tests.
"""

from __future__ import annotations

import zlib
from typing import Any

from sqlalchemy import ColumnElement, case, func, literal

__all__ = ["BUCKETS", "bucket_py", "bucket_sql", "pick_variant_py", "pick_variant_sql", "salt",
           "variant_cutoffs"]

BUCKETS = 10_000
_P = 2_147_483_647  # 2^31 - 1
_G = 48_271


def salt(trigger_id: str, purpose: str) -> int:
    return zlib.crc32(f"{purpose}:{trigger_id}".encode()) % _P


def bucket_py(customer_id: int, membership_id: int | None, seed: int) -> int:
    """The bucket in [0, BUCKETS) for one customer and cycle."""
    h = (customer_id * 1_000_003 + (membership_id or 0) * 7_919 + seed) % _P
    h = (h * h + 12_345) % _P
    h = (h * h + seed) % _P
    h = (h * _G) % _P
    return h % BUCKETS


def bucket_sql(customer_id: ColumnElement[Any], membership_id: ColumnElement[Any],
               seed: int) -> ColumnElement[Any]:
    h = (customer_id * 1_000_003 + func.coalesce(membership_id, 0) * 7_919 + seed) % _P
    h = (h * h + 12_345) % _P
    h = (h * h + seed) % _P
    h = (h * _G) % _P
    return h % BUCKETS


def pick_variant_sql(bucket: ColumnElement[Any],
                     cutoffs: list[tuple[str, int]]) -> ColumnElement[Any]:
    """CASE over cumulative bucket cutoffs: [(variant, upper bound exclusive), ...]."""
    whens = [(bucket < bound, literal(name)) for name, bound in cutoffs[:-1]]
    if not whens:
        return literal(cutoffs[-1][0])
    return case(*whens, else_=literal(cutoffs[-1][0]))


def variant_cutoffs(weights: dict[str, float]) -> list[tuple[str, int]]:
    """Cumulative cutoffs over BUCKETS for variants in their declared order."""
    total = sum(weights.values())
    acc, out = 0.0, []
    for name, weight in weights.items():
        acc += weight
        out.append((name, round(acc / total * BUCKETS)))
    return out


def pick_variant_py(bucket: int, cutoffs: list[tuple[str, int]]) -> str:
    for name, bound in cutoffs[:-1]:
        if bucket < bound:
            return name
    return cutoffs[-1][0]
