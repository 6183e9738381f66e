"""The base error of phase 4."""

from __future__ import annotations


class QualityError(ValueError):
    """Phase 4 cannot proceed; the message says what to fix."""
