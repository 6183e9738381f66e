"""Lenient accessors over an answer that may not fit the schema: a wrong type reads as empty."""

from __future__ import annotations

import math
from typing import Any


def as_text(v: Any) -> str:
    """The string stripped; '' for anything else."""
    return v.strip() if isinstance(v, str) else ""


def char_count(v: Any) -> int:
    """Non-whitespace characters of the text."""
    return sum(1 for c in as_text(v) if not c.isspace())


def as_number(v: Any) -> float | None:
    """A finite int or float (not a bool) as float; None otherwise."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def as_int(v: Any) -> int | None:
    """A whole number as int; None otherwise."""
    n = as_number(v)
    return int(n) if n is not None and float(n).is_integer() else None


def as_list(v: Any) -> list:
    return v if isinstance(v, list) else []


def as_dict(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def as_texts(v: Any) -> list[str]:
    """The non-empty strings of a list, stripped."""
    return [t for t in (as_text(x) for x in as_list(v)) if t]
