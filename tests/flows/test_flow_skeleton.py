"""The parent flow on a real Prefect API: selected steps run, unbuilt ones are reported."""

import asyncio
import json

import pytest
from prefect.client.orchestration import get_client

from flows.ft_pipeline import ft_pipeline

pytestmark = pytest.mark.prefect


def _images(root, n=24):
    images = root / "images"
    images.mkdir(parents=True)
    for i in range(n):
        (images / f"C0{i % 3}_{i:04d}.png").write_bytes(b"x" * (100 + i))
    return root


def test_selected_steps_run_and_unconfigured_are_reported(prefect_api, tmp_path):
    root = _images(tmp_path / "data")
    report = ft_pipeline(
        steps="0,3b",
        overrides={
            "paths.data_root": str(root),
            "sampling.sample_size": 6,
            "sampling.size_low_pct": 0,
            "sampling.size_high_pct": 100,
            "teachers.teachers": ["reference"],
        },
    )
    assert list(report) == ["0", "3b"]
    assert report["0"]["status"] == "done" and report["0"]["sampled"] == 6
    assert report["3b"]["status"] == "not configured"  # one teacher listed: nothing for step 3b
    sample = json.loads((root / "sampled_images.json").read_text())
    assert len(sample["stems"]) == 6 and {g["group"] for g in sample["groups"]} == {"C00", "C01", "C02"}


def test_flow_publishes_artifacts(prefect_api, tmp_path):
    root = _images(tmp_path / "data2")
    ft_pipeline(
        steps="0",
        overrides={
            "paths.data_root": str(root),
            "sampling.sample_size": 3,
            "sampling.size_low_pct": 0,
            "sampling.size_high_pct": 100,
        },
    )
    assert {a.key for a in asyncio.run(_artifacts(["phase0-sample", "ft-pipeline-summary"]))} == {
        "phase0-sample",
        "ft-pipeline-summary",
    }


async def _artifacts(keys):
    # The client's read_artifacts sends explicit nulls that this server version rejects (422),
    # so the filter is posted as the API documents it.
    from prefect.client.schemas.objects import Artifact

    async with get_client() as client:
        response = await client._client.post(
            "/artifacts/filter",
            json={"artifacts": {"key": {"any_": keys}}, "limit": 50, "offset": 0, "sort": "CREATED_DESC"},
        )
        return [Artifact.model_validate(a) for a in response.json()]


def test_bad_steps_fail_before_any_work(prefect_api, tmp_path):
    with pytest.raises(ValueError, match="unknown step"):
        ft_pipeline(steps="0,9", overrides={"paths.data_root": str(tmp_path)})
    assert not (tmp_path / "sampled_images.json").exists()
