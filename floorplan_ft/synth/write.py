"""A synthetic dataset on disk: ``images/``, ``annotations/`` and ``truth/``, one file each per plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from floorplan_ft.store import atomic_write
from floorplan_ft.synth.annotations import plan_to_coco
from floorplan_ft.synth.generate import generate_plan
from floorplan_ft.synth.render import png_bytes
from floorplan_ft.synth.truth import truth_statistics


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, sort_keys=True, indent=1) + "\n").encode("utf-8")


def complex_sizes(count: int, complexes: int, seed: int) -> list[int]:
    """How many plans each complex gets: uneven (log-normal weights), at least one each when
    ``count >= complexes``."""
    if not 1 <= complexes <= 100:
        raise ValueError("complexes must be between 1 and 100 (prefixes C00..C99)")
    if count < 0:
        raise ValueError("count must be >= 0")
    rng = np.random.default_rng([seed, 0xC0FFEE])
    weights = rng.lognormal(0.0, 0.9, complexes)
    weights = weights / weights.sum()
    if count >= complexes:
        sizes = np.ones(complexes, dtype=int) + rng.multinomial(count - complexes, weights)
    else:
        sizes = rng.multinomial(count, weights)
    return [int(v) for v in sizes]


def write_dataset(out_dir: Path, count: int, complexes: int, seed: int) -> list[str]:
    """Write ``count`` plans spread over ``complexes`` complexes; returns the stems.

    For each stem: ``images/{stem}.png``, ``annotations/{stem}.json`` (COCO) and
    ``truth/{stem}.json``. Same arguments give byte-identical files.
    """
    if count > 10000:
        raise ValueError("count must be <= 10000 (4-digit index)")
    out_dir = Path(out_dir)
    sizes = complex_sizes(count, complexes, seed)
    stems: list[str] = []
    idx = 0
    for c, size in enumerate(sizes):
        for _ in range(size):
            stems.append(f"C{c:02d}_{idx:04d}")
            idx += 1
    # no fsync: a dataset is regenerated, not recovered
    for i, stem in enumerate(stems):
        plan = generate_plan(np.random.default_rng([seed, i]), stem)
        atomic_write(out_dir / "images" / f"{stem}.png", png_bytes(plan), fsync=False)
        atomic_write(out_dir / "annotations" / f"{stem}.json", _json_bytes(plan_to_coco(plan)), fsync=False)
        atomic_write(out_dir / "truth" / f"{stem}.json", _json_bytes(truth_statistics(plan)), fsync=False)
    return stems
