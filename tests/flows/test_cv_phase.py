"""Phase 1 end to end on a real Prefect API: build, rerun, rebuild one, bad inputs, plugins."""

import json
import sys
import textwrap

import pytest

from floorplan_ft.cv import BUILDER_VERSION
from floorplan_ft.cv.runner import process_image
from floorplan_ft.cv.sources import SourceConfig, load_plugin
from floorplan_ft.schemas import TopologyGraph
from floorplan_ft.store import ArtifactStore
from floorplan_ft.synth import write_dataset
from flows.cv_batch import cv_batch
from flows.ft_pipeline import ft_pipeline

pytestmark = pytest.mark.prefect


@pytest.fixture
def plans(tmp_path):
    root = tmp_path / "data"
    stems = write_dataset(root, count=12, complexes=3, seed=7)
    return root, stems


def _overrides(root, **extra):
    base = {"paths.data_root": str(root), "sampling.size_low_pct": 0, "sampling.size_high_pct": 100}
    return {**base, **extra}


def _mtimes(root, stems):
    return {s: (root / "output" / s / "topology_graph.json").stat().st_mtime_ns for s in stems}


def test_steps_0_1_build_every_sampled_topology_and_rerun_does_no_work(prefect_api, plans):
    root, _ = plans
    report = ft_pipeline(steps="0,1", overrides=_overrides(root, **{"sampling.sample_size": 8}))
    sample = json.loads((root / "sampled_images.json").read_text())["stems"]
    assert len(sample) == 8 and report["1"]["built"] == 8 and report["1"]["failed"] == 0
    for stem in sample:
        graph = TopologyGraph.model_validate_json((root / "output" / stem / "topology_graph.json").read_text())
        assert graph.builder_version == BUILDER_VERSION and graph.image_info.file_name == f"{stem}.png"
        truth = json.loads((root / "truth" / f"{stem}.json").read_text())
        assert graph.statistics.room_count == truth["room_count"]
        assert graph.statistics.structure_type == truth["structure_type"]
    before = _mtimes(root, sample)

    again = ft_pipeline(steps="0,1", overrides=_overrides(root, **{"sampling.sample_size": 8}))
    assert again["1"]["built"] == 0 and again["1"]["cached"] == 8
    assert _mtimes(root, sample) == before  # nothing rewritten

    # A deleted topology is rebuilt alone.
    (root / "output" / sample[0] / "topology_graph.json").unlink()
    third = ft_pipeline(steps="1", overrides=_overrides(root))
    assert third["1"]["built"] == 1 and third["1"]["cached"] == 7
    after = _mtimes(root, sample)
    assert {s for s in sample if after[s] != before.get(s)} == {sample[0]}


def test_changed_annotation_makes_that_topology_stale(prefect_api, plans):
    root, stems = plans
    cv_batch(scope="all", overrides=_overrides(root))
    ann = root / "annotations" / f"{stems[3]}.json"
    coco = json.loads(ann.read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] != 17]  # drop objects
    ann.write_text(json.dumps(coco, ensure_ascii=False))
    report = cv_batch(scope="all", overrides=_overrides(root))
    assert (report["built"], report["cached"]) == (1, len(stems) - 1)


def test_bad_images_are_listed_with_reasons_and_the_run_goes_on(prefect_api, plans):
    root, stems = plans
    bad = {
        stems[0]: "corrupt",
        stems[1]: "missing annotation",
        stems[2]: "malformed json",
        stems[4]: "degenerate polygon",
    }
    (root / "images" / f"{stems[0]}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (root / "annotations" / f"{stems[1]}.json").unlink()
    (root / "annotations" / f"{stems[2]}.json").write_text("{not json")
    coco = json.loads((root / "annotations" / f"{stems[3]}.json").read_text())
    coco["categories"].append({"id": 999, "name": "공간_펜트하우스", "supercategory": "공간"})
    coco["annotations"][0]["category_id"] = 999
    (root / "annotations" / f"{stems[3]}.json").write_text(json.dumps(coco, ensure_ascii=False))
    coco = json.loads((root / "annotations" / f"{stems[4]}.json").read_text())
    space = next(a for a in coco["annotations"] if a["category_id"] <= 13)
    space["segmentation"] = [[10, 10, 20, 20, 30, 30]]  # collinear: zero area
    (root / "annotations" / f"{stems[4]}.json").write_text(json.dumps(coco, ensure_ascii=False))

    report = cv_batch(scope="all", overrides=_overrides(root))
    assert report["failed"] == 4 and report["built"] == len(stems) - 4
    ledger = json.loads((root / "cv_failures.json").read_text())["failures"]
    assert set(ledger) == set(bad)
    assert "PNG" in ledger[stems[0]]["reason"] and f"{stems[0]}.png" in ledger[stems[0]]["reason"]
    assert "annotation file not found" in ledger[stems[1]]["reason"]
    assert "not valid JSON" in ledger[stems[2]]["reason"] and f"{stems[2]}.json" in ledger[stems[2]]["reason"]
    # An unknown category is skipped and counted in the sidecar (cv.strict_categories = false).
    meta = json.loads((root / "output" / stems[3] / "topology_graph.meta.json").read_text())
    assert meta["skipped_annotations"] == {"count": 1, "by_category": {"공간_펜트하우스": 1}}
    assert "degenerate polygon" in ledger[stems[4]]["reason"]
    for stem in bad:
        assert not (root / "output" / stem / "topology_graph.json").exists()

    # Fixing one input clears it from the ledger on the next run; good work is not redone.
    write_dataset(root / "fresh", count=12, complexes=3, seed=7)
    (root / "annotations" / f"{stems[1]}.json").write_bytes(
        (root / "fresh" / "annotations" / f"{stems[1]}.json").read_bytes()
    )
    report = cv_batch(scope="all", overrides=_overrides(root))
    assert (report["built"], report["failed"], report["cached"]) == (1, 3, len(stems) - 4)
    assert stems[1] not in json.loads((root / "cv_failures.json").read_text())["failures"]


PLUGIN = """
import json
from pathlib import Path

CALLS = {"factory": 0, "predict": 0}


class Detector:
    version = "team-cv-2.3"

    def __init__(self, annotations, device):
        self.annotations = annotations
        self.device = device

    def predict(self, image):
        CALLS["predict"] += 1
        height, width = image.shape[:2]
        # A real model would run four detectors here; this one looks the plan up by its size.
        for path in sorted(Path(self.annotations).glob("*.json")):
            coco = json.loads(path.read_text())
            info = coco["images"][0]
            if (info["width"], info["height"]) == (width, height):
                return {"categories": coco["categories"], "annotations": coco["annotations"]}
        raise ValueError("no detections")


def make_detector(device="cpu"):
    CALLS["factory"] += 1
    return Detector(ANNOTATIONS, device)
"""


def test_plugin_source_loads_once_and_builds(tmp_path, monkeypatch):
    root = tmp_path / "data"
    stems = write_dataset(root, count=4, complexes=2, seed=11)
    # Plans of equal size would be ambiguous for this toy detector: keep the distinct ones.
    sizes = {}
    for stem in stems:
        info = json.loads((root / "annotations" / f"{stem}.json").read_text())["images"][0]
        sizes.setdefault((info["width"], info["height"]), stem)
    module = tmp_path / "team_cv_plugin.py"
    module.write_text(textwrap.dedent(PLUGIN).replace("ANNOTATIONS", repr(str(root / "annotations"))))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = SourceConfig(
        kind="plugin",
        image_dir=str(root / "images"),
        plugin="team_cv_plugin:make_detector",
        device="cpu",
        clear_cache_every=2,
    )
    store = ArtifactStore(root / "out")
    outcomes = [process_image(store, config, stem) for stem in sizes.values()]
    assert all(o.status == "built" for o in outcomes), outcomes
    plugin = sys.modules["team_cv_plugin"]
    assert plugin.CALLS == {"factory": 1, "predict": len(sizes)}
    assert load_plugin("team_cv_plugin:make_detector", "cpu").device == "cpu"
    meta = json.loads((root / "out" / "output" / outcomes[0].stem / "topology_graph.meta.json").read_text())
    assert meta["source"] == "plugin:team_cv_plugin:make_detector:team-cv-2.3"
    # Fresh on the second pass: the model is not even asked again.
    assert process_image(store, config, outcomes[0].stem).status == "fresh"
    assert plugin.CALLS["predict"] == len(sizes)


@pytest.mark.parametrize("spec, message", [("nocolon", "package.module:factory"), ("no_such_mod:f", "cannot load")])
def test_bad_plugin_setting_names_it(spec, message):
    with pytest.raises(ValueError, match=message) as exc:
        load_plugin(spec)
    assert "cv.plugin" in str(exc.value)


def test_overlay_is_written_when_asked(tmp_path):
    root = tmp_path / "data"
    stems = write_dataset(root, count=1, complexes=1, seed=3)
    config = SourceConfig(image_dir=str(root / "images"), annotation_dir=str(root / "annotations"))
    outcome = process_image(ArtifactStore(root), config, stems[0], overlay=True)
    assert outcome.status == "built"
    png = root / "output" / stems[0] / "topology_overlay.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_coco_file_for_the_whole_set(tmp_path):
    root = tmp_path / "data"
    stems = write_dataset(root, count=3, complexes=1, seed=9)
    merged = {"images": [], "annotations": [], "categories": None}
    next_id = 1
    for image_id, stem in enumerate(stems, start=1):
        coco = json.loads((root / "annotations" / f"{stem}.json").read_text())
        merged["categories"] = coco["categories"]
        merged["images"].append({**coco["images"][0], "id": image_id})
        for ann in coco["annotations"]:
            merged["annotations"].append({**ann, "id": next_id, "image_id": image_id})
            next_id += 1
    whole = tmp_path / "all.json"
    whole.write_text(json.dumps(merged, ensure_ascii=False))
    config = SourceConfig(image_dir=str(root / "images"), annotation_file=str(whole))
    store = ArtifactStore(tmp_path / "out")
    for stem in stems:
        assert process_image(store, config, stem).status == "built"
        graph = TopologyGraph.model_validate_json(
            (tmp_path / "out" / "output" / stem / "topology_graph.json").read_text()
        )
        truth = json.loads((root / "truth" / f"{stem}.json").read_text())
        assert graph.statistics.bay_count == truth["bay_count"]


FLAKY_PLUGIN = """
import json
from pathlib import Path

CALLS = {"predict": 0}


class Detector:
    def predict(self, image):
        CALLS["predict"] += 1
        height, width = image.shape[:2]
        for path in sorted(Path(ANNOTATIONS).glob("*.json")):
            coco = json.loads(path.read_text())
            info = coco["images"][0]
            if (info["width"], info["height"]) == (width, height):
                if path.stem == BROKEN:
                    raise RuntimeError("CUDA error: device-side assert (simulated)")
                return {"categories": coco["categories"], "annotations": coco["annotations"]}
        raise ValueError("no detections")


def make():
    return Detector()
"""


def test_unexpected_errors_are_retried_then_listed(prefect_api, tmp_path, monkeypatch):
    import tasks.cv as cv_tasks

    root = tmp_path / "data"
    stems = write_dataset(root, count=3, complexes=1, seed=31)
    module = tmp_path / "flaky_cv_plugin.py"
    module.write_text(
        textwrap.dedent(FLAKY_PLUGIN)
        .replace("ANNOTATIONS", repr(str(root / "annotations")))
        .replace("BROKEN", repr(stems[1]))
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        cv_tasks, "build_topology_task", cv_tasks.build_topology_task.with_options(retry_delay_seconds=0)
    )
    report = cv_batch(
        scope="all",
        overrides={
            "paths.data_root": str(root),
            "cv.source": "plugin",
            "cv.plugin": "flaky_cv_plugin:make",
            "cv.chunk_size": 3,
        },
    )
    assert (report["built"], report["failed"]) == (2, 1)
    ledger = json.loads((root / "cv_failures.json").read_text())["failures"]
    assert list(ledger) == [stems[1]] and "device-side assert" in ledger[stems[1]]["reason"]
    # 3 images, then two retries of the chunk that only redo the stale image: 3 + 1 + 1 calls.
    assert sys.modules["flaky_cv_plugin"].CALLS["predict"] == 5
