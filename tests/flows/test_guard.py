"""A second pipeline run on a data root another live run holds fails before any work, naming the
holder; once the holder is gone, the run goes ahead (issue 16)."""

from __future__ import annotations

import time

import pytest

from floorplan_ft.lease import LeaseHeld
from floorplan_ft.store import ArtifactStore
from flows.ft_pipeline import ft_pipeline

pytestmark = pytest.mark.prefect


def test_a_run_on_a_held_data_root_fails_naming_the_holder(prefect_api, tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    for i in range(6):
        (root / "images" / f"C0{i % 2}_{i:04d}.png").write_bytes(b"x" * (100 + i))
    store = ArtifactStore(root)
    holder = {
        "owner": "flow run 'busy-otter' (42)",
        "token": "other",
        "host": "pod-3",
        "acquired_at": "2026-12-02T01:00:00+00:00",
        "heartbeat": time.time(),
        "ttl_s": 600,
    }
    store.write_json(store.layout.lease(), holder)
    overrides = {
        "paths.data_root": str(root),
        "sampling.sample_size": 4,
        "sampling.size_low_pct": 0,
        "sampling.size_high_pct": 100,
    }

    with pytest.raises(LeaseHeld, match=r"in use by flow run 'busy-otter' \(42\)"):
        ft_pipeline(steps="0", overrides=overrides)
    assert not (root / "sampled_images.json").exists()

    store.delete(store.layout.lease())  # the holder finished
    report = ft_pipeline(steps="0", overrides=overrides)
    assert report["0"]["sampled"] == 4 and not (root / ".ft-pipeline.lease.json").exists()
