"""cv.source = "team-pipeline": the team's InferencePipeline in process, found through
paths.team_code (here tests/fixtures/team_code, a module with their interface and our own tiny
implementation that answers their aggregator's format)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from floorplan_ft.cv import sources, team_pipeline
from floorplan_ft.cv.online import CVUnavailable, topology_from_image
from floorplan_ft.cv.sources import CVConfigError
from floorplan_ft.synth import write_dataset
from floorplan_ft.topology_io import read_topology_bytes
from tasks.common import nest_overrides

TEAM_CODE = Path(__file__).resolve().parents[2] / "fixtures" / "team_code"


@pytest.fixture
def fresh_pipeline(monkeypatch, tmp_path):
    """A process in which the team pipeline was never loaded, counting its calls."""
    monkeypatch.setattr(team_pipeline, "_PIPELINES", {})
    monkeypatch.setattr(sources, "_SOURCES", {})
    root = tmp_path / "data"
    stems = write_dataset(root, count=5, complexes=2, seed=5)
    monkeypatch.setenv("FIXTURE_TEAM_ANNOTATIONS", str(root / "annotations"))
    monkeypatch.setenv("FIXTURE_TEAM_OUTPUT", str(tmp_path / "their-output"))
    module = _fixture_module()
    monkeypatch.setattr(module, "LOAD_CALLS", 0)
    monkeypatch.setattr(module, "RUN_CALLS", [])
    return root, stems, module


def _fixture_module():
    if str(TEAM_CODE) not in sys.path:
        sys.path.insert(0, str(TEAM_CODE))
    import CV.cv_inference.pipeline as module

    return module


def _overrides(root, **extra):
    return {
        "paths.data_root": str(root),
        "cv.source": "team-pipeline",
        "paths.team_code": str(TEAM_CODE),
        "sampling.size_low_pct": 0,
        "sampling.size_high_pct": 100,
        **extra,
    }


@pytest.mark.prefect
def test_phase1_keeps_their_graph_and_loads_models_once(prefect_api, fresh_pipeline):
    from flows.ft_pipeline import ft_pipeline

    root, stems, module = fresh_pipeline
    report = ft_pipeline(
        steps="0,1", overrides=_overrides(root, **{"sampling.sample_size": 5, "cv.concurrency": 2, "cv.chunk_size": 2})
    )
    assert report["1"]["built"] == 5 and report["1"]["failed"] == 0, report
    assert module.LOAD_CALLS == 1 and sorted(module.RUN_CALLS) == sorted(f"{s}.png" for s in stems)
    assert not (root.parent / "their-output").exists()  # their run() was told not to write files
    for stem in stems:
        out = root / "output" / stem
        graph = json.loads((out / "topology_graph.json").read_text())
        assert graph["nodes"][0]["area_ratio"] is None or graph["nodes"][0]["area_ratio"] <= 1  # their format
        assert all(
            s["structure_id"].startswith("str_") for n in graph["nodes"] for s in n["contains"]["structures"]["doors"]
        )
        read_topology_bytes((out / "topology_graph.json").read_bytes(), origin=stem)
        assert json.loads((out / "low_result.json").read_text())["annotations"]
        meta = json.loads((out / "topology_graph.meta.json").read_text())
        assert meta["source"] == "team-pipeline:CV.cv_inference.pipeline:fixture-1"
    again = ft_pipeline(steps="1", overrides=_overrides(root))
    assert again["1"]["cached"] == 5 and len(module.RUN_CALLS) == 5


def test_a_bad_image_is_ledgered_by_the_runner(fresh_pipeline):
    from prefect.logging import disable_run_logger

    from floorplan_ft.settings import load_settings
    from tasks.cv import build_topology_task, source_config

    root, stems, module = fresh_pipeline
    (root / "images" / f"{stems[0]}.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    config = source_config(load_settings(**nest_overrides(_overrides(root))))
    with disable_run_logger():
        outcomes = {o["stem"]: o for o in build_topology_task.fn(stems, config, str(root))}
    assert outcomes[stems[0]]["status"] == "failed" and f"{stems[0]}.png" in outcomes[stems[0]]["reason"]
    assert [outcomes[s]["status"] for s in stems[1:]] == ["built"] * 4 and module.LOAD_CALLS == 1


def test_missing_team_code_is_a_clear_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr(team_pipeline, "_PIPELINES", {})
    with pytest.raises(CVConfigError, match="paths.team_code is not set"):
        team_pipeline.load_team_pipeline(None)
    with pytest.raises(CVConfigError, match=f"paths.team_code = {tmp_path}: no CV/cv_inference"):
        team_pipeline.load_team_pipeline(str(tmp_path))
    broken = tmp_path / "broken"
    (broken / "CV" / "cv_inference").mkdir(parents=True)
    (broken / "CV" / "__init__.py").write_text("")
    (broken / "CV" / "cv_inference" / "__init__.py").write_text("")
    (broken / "CV" / "cv_inference" / "pipeline.py").write_text("import cv2_not_installed_here\n")
    monkeypatch.delitem(sys.modules, "CV.cv_inference.pipeline", raising=False)
    monkeypatch.delitem(sys.modules, "CV.cv_inference", raising=False)
    monkeypatch.delitem(sys.modules, "CV", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(CVConfigError) as err:
        team_pipeline.load_team_pipeline(str(broken))
    assert "cannot import CV.cv_inference.pipeline" in str(err.value) and "cv2_not_installed_here" in str(err.value)


def test_online_upload_through_their_pipeline(fresh_pipeline):
    from floorplan_ft.settings import load_settings

    root, stems, module = fresh_pipeline
    settings = load_settings(**nest_overrides(_overrides(root)))
    png = (root / "images" / f"{stems[1]}.png").read_bytes()
    result = topology_from_image(settings, png, f"{stems[1]}.png")
    assert result.topology["image_info"]["file_name"] == f"{stems[1]}.png"
    assert result.overlay_png[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.source.startswith("team-pipeline:") and module.LOAD_CALLS == 1
    with pytest.raises(CVUnavailable, match="paths.team_code"):
        topology_from_image(
            load_settings(**nest_overrides({"paths.data_root": str(root), "cv.source": "team-pipeline"})), png, "x.png"
        )
