"""Data integrity in phases 1-2: file modes follow the umask, unreadable or stale graphs never
flow downstream, failure ledgers show the current state."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from floorplan_ft.sampling import SampleResult, write_sample
from floorplan_ft.schemas import TopologyGraph
from floorplan_ft.store import ArtifactStore, atomic_write
from floorplan_ft.synth import write_dataset


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test and put the old one back."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield os.umask
    os.umask(saved)


def _sample() -> SampleResult:
    return SampleResult(stems=["C00_0001"], groups=[], excluded=[], warnings=[], seed=0, n=1, parameters={})


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_every_writer_follows_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    store = ArtifactStore(tmp_path / "root")
    written = [
        Path(store.write_json(store.layout.run_file("cv_failures"), {"failures": {}})),
        Path(store.write_text(store.layout.topology("C00_0001"), "{}\n")),
        write_sample(_sample(), tmp_path / "root" / "sampled_images.json"),
        atomic_write(tmp_path / "plain.bin", b"x"),
    ]
    write_dataset(tmp_path / "synth", count=1, complexes=1, seed=3)
    written += sorted((tmp_path / "synth").rglob("*.*"))
    assert len(written) >= 7
    assert {p.name: _mode(p) for p in written} == {p.name: expected for p in written}
    assert list(tmp_path.rglob(".*.tmp")) == []  # no temporary file left behind


def test_a_file_written_0600_before_gets_the_umask_mode_when_rewritten(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "cv_failures.json"
    target.write_text("{}")
    target.chmod(0o600)  # what the old mkstemp writer left behind
    ArtifactStore(tmp_path).write_json(str(target), {"failures": {}})
    assert _mode(target) == 0o644 and target.read_text() == '{\n  "failures": {}\n}\n'


# --------------------------------------------------------------------------- phases 1-2, end to end


def _pipeline(root: Path, steps: str) -> dict:
    from flows.ft_pipeline import ft_pipeline

    overrides = {
        "paths.data_root": str(root),
        "sampling.sample_size": 6,
        "sampling.size_low_pct": 0,
        "sampling.size_high_pct": 100,
    }
    return ft_pipeline(steps=steps, profile="demo", overrides=overrides)


def _ledger(root: Path, name: str) -> dict:
    path = root / name
    return json.loads(path.read_text())["failures"] if path.exists() else {}


def _meta(root: Path, stem: str) -> dict:
    return json.loads((root / "output" / stem / "topology_graph.meta.json").read_text())


@pytest.fixture
def built(prefect_api, tmp_path, no_dotenv):
    """Six synthetic plans through steps 0-2: every graph and context written."""
    root = tmp_path / "data"
    write_dataset(root, count=6, complexes=2, seed=11)
    report = _pipeline(root, "0,1,2")
    stems = json.loads((root / "sampled_images.json").read_text())["stems"]
    assert report["1"]["built"] == len(stems) == 6 and report["2"]["written"] == 6
    assert _ledger(root, "cv_failures.json") == {} and _ledger(root, "retrieval_failures.json") == {}
    return root, sorted(stems)


@pytest.mark.prefect
def test_unreadable_graphs_are_rebuilt_and_failing_inputs_mark_the_old_graph_stale(built):
    from floorplan_ft.teachers.items import build_items

    root, stems = built
    out = root / "output"
    (out / stems[0] / "topology_graph.json").write_text('{"nodes": [')  # hand-edited, truncated
    (out / stems[1] / "topology_graph.json").write_text('{"nodes": "none"}')  # JSON, not a graph
    image = root / "images" / f"{stems[2]}.png"
    original = image.read_bytes()
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)  # its input now fails
    old_graph = (out / stems[2] / "topology_graph.json").read_bytes()

    report = _pipeline(root, "1,2")
    one, two = report["1"], report["2"]
    # The two unreadable graphs had a matching sidecar key: rebuilt, not "cached".
    assert (one["built"], one["cached"], one["failed"], one["stale"]) == (2, 3, 1, 1)
    for stem in stems[:2]:
        assert TopologyGraph.model_validate_json((out / stem / "topology_graph.json").read_text())
    cv = _ledger(root, "cv_failures.json")
    assert set(cv) == {stems[2]} and cv[stems[2]]["stale_graph"] is True
    assert f"{stems[2]}.png" in cv[stems[2]]["reason"]
    # The old graph stays, marked stale; phase 2 and phase 3 skip it with the reason.
    assert (out / stems[2] / "topology_graph.json").read_bytes() == old_graph
    mark = _meta(root, stems[2])["stale"]
    assert mark["error_type"] and f"{stems[2]}.png" in mark["reason"]
    assert (two["status"], two["contexts"], two["skipped"]) == ("done with failures", 5, 1)
    retrieval = _ledger(root, "retrieval_failures.json")
    assert set(retrieval) == {stems[2]} and retrieval[stems[2]]["reason"] == "stale_topology"
    assert str(out / stems[2] / "topology_graph.json") in retrieval[stems[2]]["detail"]
    store = ArtifactStore(root)
    items, missing = build_items(store, stems)
    assert [(m.stem, m.reason) for m in missing] == [(stems[2], "stale_topology")]
    assert sorted(i.stem for i in items) == sorted(set(stems) - {stems[2]})

    # The input restored as it was: the graph is current again (same key), the mark and both
    # ledger entries go, and nothing is rebuilt.
    image.write_bytes(original)
    report = _pipeline(root, "1,2")
    assert (report["1"]["built"], report["1"]["cached"], report["1"]["failed"]) == (0, 6, 0)
    assert "stale" not in _meta(root, stems[2])
    assert _ledger(root, "cv_failures.json") == {} and _ledger(root, "retrieval_failures.json") == {}
    assert (report["2"]["status"], report["2"]["contexts"], report["2"]["skipped"]) == ("done", 6, 0)
    items, missing = build_items(store, stems)
    assert missing == [] and len(items) == 6


@pytest.mark.prefect
def test_phase_two_names_an_unreadable_graph_skips_that_plan_and_forgets_it_once_fixed(built):
    root, stems = built
    graph = root / "output" / stems[4] / "topology_graph.json"
    good = graph.read_bytes()
    graph.write_text("{not json")

    report = _pipeline(root, "2")["2"]  # phase 2 alone: the others go on
    assert (report["status"], report["contexts"], report["skipped"]) == ("done with failures", 5, 1)
    assert report["failure_ledger"] == str(root / "retrieval_failures.json")
    entry = _ledger(root, "retrieval_failures.json")[stems[4]]
    assert entry["reason"] == "bad_topology"
    assert entry["detail"].startswith(f"{graph}: ") and "not valid JSON" in entry["detail"]

    graph.write_bytes(good)
    report = _pipeline(root, "2")["2"]
    assert (report["status"], report["contexts"], report["skipped"]) == ("done", 6, 0)
    assert _ledger(root, "retrieval_failures.json") == {}


def test_a_second_ledger_run_keeps_entries_of_plans_outside_the_run(tmp_path):
    from floorplan_ft.retrieval.retrieve import update_retrieval_ledger

    store = ArtifactStore(tmp_path)
    update_retrieval_ledger(
        store,
        {"A": {"reason": "bad_topology", "detail": "a: bad"}, "B": {"reason": "missing_topology", "detail": "b: none"}},
        done=[],
    )
    ledger = update_retrieval_ledger(store, {}, done=["A"])
    assert set(ledger) == {"B"} and set(_ledger(tmp_path, "retrieval_failures.json")) == {"B"}


def test_an_imported_graph_that_no_longer_reads_is_not_done_and_says_why(tmp_path):
    from floorplan_ft.cv.runner import process_image, stale_stems, update_failure_ledger
    from floorplan_ft.cv.sources import SourceConfig

    root = tmp_path / "data"
    stems = write_dataset(root, count=2, complexes=1, seed=5)
    store = ArtifactStore(root)
    config = SourceConfig(image_dir=str(root / "images"), annotation_dir=str(root / "annotations"))
    for stem in stems:  # two imported graphs; the first has no image to rebuild from
        assert process_image(store, config, stem).status == "built"
        store.write_json(store.layout.topology_meta(stem), {"key": "import:x", "source": "import"})
    (root / "images" / f"{stems[0]}.png").unlink()
    assert stale_stems(store, config, stems) == (stems, [])  # both read: done, no image needed

    for stem in stems:
        Path(store.layout.topology(stem)).write_text('{"nodes": 3}')
    assert stale_stems(store, config, stems) == ([], stems)
    lost, rebuilt = (process_image(store, config, s) for s in stems)
    assert rebuilt.status == "built" and store.topology_problem(stems[1]) is None
    assert lost.status == "failed" and lost.stale_graph
    assert lost.reason.startswith(f"{store.layout.topology(stems[0])}: ") and "rebuilding it:" in lost.reason
    assert store.topology_stale(stems[0])["reason"] == lost.reason
    ledger = update_failure_ledger(store, [lost, rebuilt])
    assert set(ledger) == {stems[0]} and ledger[stems[0]]["stale_graph"] is True


def test_freshness_checks_the_graph_by_its_hash_and_validates_an_edited_one(tmp_path):
    from floorplan_ft.cv.runner import process_image, stale_stems
    from floorplan_ft.cv.sources import SourceConfig

    root = tmp_path / "data"
    stems = write_dataset(root, count=3, complexes=1, seed=9)
    store = ArtifactStore(root)
    config = SourceConfig(image_dir=str(root / "images"), annotation_dir=str(root / "annotations"))
    for stem in stems:
        assert process_image(store, config, stem).status == "built"
    meta = json.loads(Path(store.layout.topology_meta(stems[0])).read_text())
    graph_file = Path(store.layout.topology(stems[0]))
    assert meta["graph_sha256"] == hashlib.sha256(graph_file.read_bytes()).hexdigest()

    # Re-indented by hand: a different file that still validates is kept (nothing rebuilt) ...
    graph_file.write_text(json.dumps(json.loads(graph_file.read_text()), ensure_ascii=False))
    # ... a sidecar from before the hash is checked by reading the graph ...
    old = json.loads(Path(store.layout.topology_meta(stems[1])).read_text())
    del old["graph_sha256"]
    store.write_json(store.layout.topology_meta(stems[1]), old)
    assert stale_stems(store, config, stems) == (stems, [])
    # ... and a valid-JSON file that is no topology graph is rebuilt, under either sidecar.
    for stem in stems[:2]:
        Path(store.layout.topology(stem)).write_text('{"nodes": [{"node_id": "x"}]}')
    assert stale_stems(store, config, stems) == ([stems[2]], stems[:2])
    assert [process_image(store, config, s).status for s in stems] == ["built", "built", "fresh"]
