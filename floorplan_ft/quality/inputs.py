"""What phase 4 reads from the data root: answers, labeling failures, and the stratified sample."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from floorplan_ft.sampling import allocate, group_key, stable_hash
from floorplan_ft.store import ArtifactStore


def stratified_pick(stems: Sequence[str], n: int, seed: int, pattern: Any = None, prefix_len: int = 3) -> list[str]:
    """``n`` of ``stems`` allocated over complexes (largest remainder) and drawn per complex with
    ``default_rng(seed + crc32(complex))``, as the phase-0 sampler does. Sorted."""
    stems = sorted(set(stems))
    n = min(n, len(stems))
    groups: dict[str, list[str]] = {}
    for s in stems:
        groups.setdefault(group_key(s, pattern, prefix_len), []).append(s)
    alloc = allocate({g: len(m) for g, m in groups.items()}, n)
    out: list[str] = []
    for g in sorted(groups):
        if alloc[g]:
            rng = np.random.default_rng(seed + stable_hash(g))
            out.extend(groups[g][i] for i in rng.choice(len(groups[g]), size=alloc[g], replace=False))
    return sorted(out)


def read_failures(store: ArtifactStore, teacher: str) -> dict[str, dict]:
    path = store.layout.label_failures(teacher)
    if not store.exists(path):
        return {}
    data = store.read_json(path)
    return dict(data.get("failures", {})) if isinstance(data, dict) else {}


def read_answer(store: ArtifactStore, stem: str, teacher: str) -> str | None:
    path = store.layout.analysis(stem, teacher)
    if not store.exists(path):
        return None
    try:
        return store.read_text(path)
    except UnicodeDecodeError:
        return "\ufffd"  # unreadable bytes score as invalid JSON
