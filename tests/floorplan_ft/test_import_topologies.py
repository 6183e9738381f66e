"""`ft-pipeline import topologies`: a folder mixing the three layouts and dialects, one bad file,
the sample list extended, then phases 1 and 2 run on the imported stems."""

import hashlib
import json

import pytest
from service_helpers import sample_graphs
from team_format import to_frontend_graph, to_team_graph
from typer.testing import CliRunner

from flows.ft_pipeline import ft_pipeline
from ft_pipeline.cli import app


@pytest.fixture
def team_folder(tmp_path):
    g = sample_graphs()
    src = tmp_path / "team"
    (src / "APT_FP_OBJ_000000002").mkdir(parents=True)
    files = {
        "APT_FP_OBJ_000000001": src / "APT_FP_OBJ_000000001_topology.json",
        "APT_FP_OBJ_000000002": src / "APT_FP_OBJ_000000002" / "topology_graph.json",
        "APT_FP_OBJ_000000003": src / "APT_FP_OBJ_000000003.json",
    }
    bodies = [to_team_graph(g[0]), to_frontend_graph(g[1]), g[2].model_dump(mode="json")]
    for path, body in zip(files.values(), bodies, strict=True):
        path.write_text(json.dumps(body, ensure_ascii=False, indent=1), encoding="utf-8")
    broken = to_team_graph(g[3])
    del broken["statistics"]["structure_type"]
    (src / "APT_FP_OBJ_000000004_topology.json").write_text(json.dumps(broken, ensure_ascii=False))
    return src, files


def _import(*args):
    return CliRunner().invoke(app, ["import", "topologies", *map(str, args)])


def test_import_mixed_folder_then_phase_1_and_2_run_on_it(prefect_api, team_folder, tmp_path, no_dotenv):
    src, files = team_folder
    root = tmp_path / "data"
    root.mkdir()
    (root / "sampled_images.json").write_text(json.dumps({"n": 1, "stems": ["OLD_0001"]}))
    result = _import(src, "--profile", "demo", "--set", f"paths.data_root={root}")
    assert result.exit_code == 0, result.output
    assert "3 imported, 1 failed" in result.output
    # The bad file is reported with its name and field; the others import.
    bad_line = next(line for line in result.output.splitlines() if "APT_FP_OBJ_000000004" in line)
    assert "failed" in bad_line and "_topology.json" in bad_line and "statistics.structure_type" in bad_line
    formats = {}
    for stem, path in files.items():
        out = root / "output" / stem / "topology_graph.json"
        assert out.read_bytes() == path.read_bytes()  # kept as the team wrote it
        meta = json.loads((root / "output" / stem / "topology_graph.meta.json").read_text())
        assert meta["source"] == "import" and meta["origin"] == str(path.resolve())
        assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and meta["imported_at"]
        formats[stem] = meta["format"]
    assert sorted(formats.values()) == ["project", "team", "team-frontend"]
    assert not (root / "output" / "APT_FP_OBJ_000000004").exists()
    sample = json.loads((root / "sampled_images.json").read_text())
    assert sample["stems"][0] == "OLD_0001" and set(sample["stems"][1:]) == set(files)
    assert sample["n"] == 4

    # Only the sample list's imported stems (no images anywhere): phase 1 leaves them alone,
    # phase 2 retrieves for them.
    sample["stems"], sample["n"] = sample["stems"][1:], 3
    (root / "sampled_images.json").write_text(json.dumps(sample))
    overrides = {"paths.data_root": str(root)}
    report = ft_pipeline(steps="1,2", profile="demo", overrides=overrides)
    assert report["1"]["failed"] == 0 and report["1"]["built"] == 0 and report["1"]["cached"] == 3
    assert (
        not (root / "cv_failures.json").exists()
        or json.loads((root / "cv_failures.json").read_text())["failures"] == {}
    )
    assert report["2"]["status"] == "done" and report["2"]["written"] == 3
    for stem, path in files.items():
        ctx = json.loads((root / "output" / stem / "rag_context.json").read_text())
        assert ctx["chunks"] and ctx["query"]
        assert (root / "output" / stem / "topology_graph.json").read_bytes() == path.read_bytes()


def test_import_nothing_valid_exits_non_zero(tmp_path):
    bad = tmp_path / "x_topology.json"
    bad.write_text("{not json")
    result = _import(bad, "--set", f"paths.data_root={tmp_path / 'data'}")
    assert result.exit_code == 1
    assert "0 imported, 1 failed" in result.output and "not valid JSON" in result.output
