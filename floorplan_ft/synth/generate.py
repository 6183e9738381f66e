"""One synthetic plan from a random generator: a meter layout, then its pixel plan, self-checked."""

from __future__ import annotations

import numpy as np

from floorplan_ft.synth.check import self_check
from floorplan_ft.synth.layout import sample_layout
from floorplan_ft.synth.model import Retry, SynthPlan
from floorplan_ft.synth.pixels import build_plan


def generate_plan(rng: np.random.Generator, stem: str) -> SynthPlan:
    """One synthetic plan from ``rng`` (the same generator state gives the same plan)."""
    last: Exception | None = None
    for _attempt in range(60):
        try:
            cells, info = sample_layout(rng)
            plan = build_plan(rng, stem, cells, info)
        except Retry as exc:
            last = exc
            continue
        problems = self_check(plan)
        if problems:
            raise AssertionError(f"{stem}: inconsistent synthetic plan: {problems[:5]}")
        return plan
    raise RuntimeError(f"could not lay out a plan for {stem}: {last}")
