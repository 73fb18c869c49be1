"""Touchpoints: lifecycle rule files evaluated set-wise in SQL, dispatched through channels."""

__version__ = "0.1.0"
