"""The phase tasks called through `.fn()`: the domain entry point's typed result, without a run
(the artifacts stay on the result; the flow tests publish them on a real Prefect API)."""

from __future__ import annotations

import pytest
from plans import prepare_plans

from floorplan_ft.phase import PhaseResult
from floorplan_ft.sampling import read_sample
from floorplan_ft.settings import load_settings
from tasks.labeling import label_with_teacher
from tasks.quality import build_training_data_task
from tasks.sampling import sample_plans

N_PLANS = 8


@pytest.fixture
def prepared(tmp_path, no_dotenv):
    root = tmp_path / "data"
    store, stems = prepare_plans(root, N_PLANS, 2, seed=5)
    settings = load_settings(
        paths={"data_root": str(root)},
        sampling={"sample_size": N_PLANS, "size_low_pct": 0, "size_high_pct": 100},
        teachers={"teachers": ["reference"]},
    )
    return settings, store, stems


def test_sample_label_and_build_through_fn(prepared):
    settings, store, stems = prepared

    sampled = sample_plans.fn(settings)
    assert isinstance(sampled, PhaseResult) and sampled.step == "0" and sampled.ok
    assert sampled.counts == {"sampled": N_PLANS, "population": N_PLANS, "groups": 2, "excluded": 0}
    assert sampled.outputs["output"] == store.layout.run_file("sample")
    assert sorted(read_sample(store.layout.run_file("sample"))) == sorted(stems)
    (table,) = sampled.artifacts
    assert table.key == "phase0-sample" and table.kind == "table"
    assert sum(row["sampled"] for row in table.table) == N_PLANS
    assert sampled.report()["sampled"] == N_PLANS and sampled.report()["status"] == "done"

    labeled = label_with_teacher.fn(settings, "reference")
    assert labeled.ok and labeled.failures == []
    assert labeled.counts["labeled"] == N_PLANS and labeled.details["teacher"] == "reference"
    assert "| plans | labeled now |" in labeled.markdown()
    again = label_with_teacher.fn(settings, "reference")
    assert again.counts["labeled"] == 0 and again.counts["cached"] == N_PLANS

    store.write_text(store.layout.run_file("selected_model"), "reference\n")
    data = build_training_data_task.fn(settings)
    rows = data.counts["train_rows"] + data.counts["val_rows"]
    assert data.ok and data.details["teacher"] == "reference" and rows + data.counts["excluded"] == N_PLANS
    assert rows > 0 and all(store.exists(path) for path in data.details["files"].values())
    assert data.artifacts[0].key == "phase5-dataset" and "Phase 5" in data.markdown()


def test_a_plan_without_inputs_is_a_named_failure_not_a_failed_task(prepared):
    settings, store, stems = prepared
    sample_plans.fn(settings)
    lost = min(stems)
    store.delete(store.layout.topology(lost))

    labeled = label_with_teacher.fn(settings, "reference")
    assert labeled.status == "done with failures"
    assert labeled.counts["labeled"] == N_PLANS - 1 and labeled.counts["missing_inputs"] == 1
    assert [(f.item, f.reason) for f in labeled.failures] == [(lost, "missing_topology")]
    assert any(lost in line and "missing_topology" in line for line in labeled.warnings)
