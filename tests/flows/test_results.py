"""Every phase task's result is committed to result storage and readable afterwards with
`state.result()` (a task persisted without a cache key never wrote its file: issue 16)."""

from __future__ import annotations

import asyncio

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

from floorplan_ft.phase import PhaseResult
from flows.ft_pipeline import ft_pipeline

pytestmark = pytest.mark.prefect


def test_phase_results_are_written_where_any_machine_can_read_them(prefect_api, tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    for i in range(6):
        (root / "images" / f"C0{i % 2}_{i:04d}.png").write_bytes(b"x" * (100 + i))
    storage = tmp_path / "results"  # the pools put it beside the data root
    overrides = {
        "paths.data_root": str(root),
        "sampling.sample_size": 4,
        "sampling.size_low_pct": 0,
        "sampling.size_high_pct": 100,
    }
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: storage}):
        state = ft_pipeline(steps="0", overrides=overrides, return_state=True)
        assert state.is_completed()

        async def task_states():
            async with get_client() as client:
                runs = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
                )
                return {r.name.rsplit("-", 1)[0]: r.state for r in runs}

        states = asyncio.run(task_states())
        sampled = states["sample-plans"]
        result = sampled.result()  # read back from storage by its key, as another machine would
        assert isinstance(result, PhaseResult) and result.counts["sampled"] == 4
        key = sampled.data.storage_key
        assert key.startswith(str(storage)) and (storage / key.rsplit("/", 1)[-1]).is_file()

        # A second run makes a new result, not a reuse of the first one's.
        again = ft_pipeline(steps="0", overrides=overrides, return_state=True)
        assert again.is_completed() and len(list(storage.iterdir())) >= 2
