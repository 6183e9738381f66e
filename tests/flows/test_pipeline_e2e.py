"""Steps 0-5 through the parent flow on a real Prefect API, offline (the demo's set-up), twice."""

import json

import pytest

from floorplan_ft.synth import write_dataset
from floorplan_ft.training.tiny import bias_towards_short_json, build_tiny_causal_lm
from flows.ft_pipeline import ft_pipeline

pytestmark = pytest.mark.prefect


def test_steps_0_to_5_offline_then_a_rerun_does_no_work(prefect_api, tmp_path, no_dotenv):
    import torch

    root = tmp_path / "data"
    write_dataset(root, count=16, complexes=4, seed=3)
    teacher = root / "models" / "tiny-teacher"
    model, tokenizer = build_tiny_causal_lm(teacher, seed=0)
    bias_towards_short_json(model, tokenizer, teacher)
    overrides = {
        "paths.data_root": str(root),
        "sampling.sample_size": 12,
        "teachers.local_model_path": str(teacher),
        "quality.sample_size": 8,
        "quality.review_plans": 4,
    }
    threads = torch.get_num_threads()
    try:
        first = ft_pipeline(steps="0-5", profile="demo", overrides=overrides)
        second = ft_pipeline(steps="0-5", profile="demo", overrides=overrides)
    finally:
        torch.set_num_threads(threads)

    assert [first[s]["status"] for s in ("0", "1", "2", "3a", "3b", "4", "5")] == ["done"] * 7
    assert first["1"]["built"] == 12 and first["2"]["written"] == 12
    assert first["3a"]["labeled"] == 12 and first["3b"]["labeled"] == 12
    assert first["4"]["selected"] == "reference"
    assert first["5"]["train_rows"] + first["5"]["val_rows"] == 12
    for stem in json.loads((root / "sampled_images.json").read_text())["stems"]:
        out = root / "output" / stem
        for name in (
            "topology_graph.json",
            "rag_context.json",
            "llm_analysis_reference.json",
            "llm_analysis_local.json",
        ):
            assert (out / name).is_file(), out / name
    assert (root / "selected_model.txt").read_text().strip() == "reference"
    assert (root / "review" / "review.html").is_file() and (root / "quality_chart.png").is_file()

    # The rerun: nothing is rebuilt, re-embedded or re-labeled.
    assert second["1"]["built"] == 0 and second["1"]["cached"] == 12
    assert second["2"]["written"] == 0
    assert second["3a"]["cached"] == 12 and second["3b"]["cached"] == 12
    assert second["3a"]["labeled"] == second["3b"]["labeled"] == 0
    rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    assert all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"] for r in rows)
