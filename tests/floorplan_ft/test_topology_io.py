"""The one topology reader: our graphs, the team aggregator's and their frontend's."""

import copy
import json

import pytest
from service_helpers import sample_graphs
from team_format import TEAM_STATISTICS, to_frontend_graph, to_team_graph

from floorplan_ft.criteria import assess
from floorplan_ft.retrieval.retrieve import build_query
from floorplan_ft.store import ArtifactStore
from floorplan_ft.topology_io import (
    TopologyFormatError,
    detect_topology_format,
    read_topology_bytes,
    read_topology_dict,
)


@pytest.fixture(scope="module")
def graphs():
    return sample_graphs()


def test_project_graph_reads_back_unchanged(graphs):
    for g in graphs:
        data = g.model_dump(mode="json")
        assert detect_topology_format(data) == "project"
        assert read_topology_dict(data, origin="ours.json") == g


def test_team_graph_normalises_to_our_numbers(graphs):
    for g in graphs:
        team = to_team_graph(g)
        assert detect_topology_format(team) == "team"
        assert "ldk_ratio" not in team["statistics"]
        got = read_topology_dict(team, origin="theirs.json")
        for key in TEAM_STATISTICS:
            assert getattr(got.statistics, key) == getattr(g.statistics, key), key
        # Recomputed from the nodes with our vocabulary: the same as our builder's.
        assert got.statistics.ldk_ratio == g.statistics.ldk_ratio
        assert got.statistics.storage_ratio == g.statistics.storage_ratio
        assert got.statistics.master_bedroom_has_window == g.statistics.master_bedroom_has_window
        for mine, theirs in zip(g.nodes, got.nodes, strict=True):
            if mine.is_outside:
                assert theirs.area_ratio == 0.0  # null → 0, for outside spaces only
            else:
                assert theirs.area_ratio == pytest.approx(mine.area_ratio, abs=0.01)  # fraction → %
        assert sum(n.area_ratio for n in got.nodes) == pytest.approx(100.0, abs=0.1)
        doors = [d for n in got.nodes for d in n.contains.structures.doors]
        assert doors and all(d.category_name == "구조_출입문" and d.structure_id.startswith("str_") for d in doors)


def test_type_or_category_name_and_extra_keys(graphs):
    team = to_team_graph(graphs[0])
    node = next(n for n in team["nodes"] if n["contains"]["structures"]["windows"])
    window = node["contains"]["structures"]["windows"][0]
    window["type"] = "고정창"
    node["contains"]["structures"]["doors"] = [
        {"structure_id": "str_900", "category_name": "구조_출입문", "subtype": "미닫이", "bbox": [1, 2, 3, 4]}
    ]
    team["version"] = "x"
    team["nodes"][0]["confidence"] = 0.9
    team["statistics"]["floor_plan_type"] = "4룸"
    team["edges"][0]["traversable"] = True
    got = read_topology_dict(team, origin="t.json")
    idx = team["nodes"].index(node)
    assert got.nodes[idx].contains.structures.windows[0].subtype == "고정창"
    assert got.nodes[idx].contains.structures.windows[0].category_name == "구조_창호"
    assert got.nodes[idx].contains.structures.doors[0].subtype == "미닫이"


def test_null_ratio_of_an_inside_space_is_recomputed(graphs):
    g = graphs[0]
    team = to_team_graph(g)
    i = next(k for k, n in enumerate(team["nodes"]) if not n["is_outside"])
    team["nodes"][i]["area_ratio"] = None
    got = read_topology_dict(team, origin="t.json")
    assert got.nodes[i].area_ratio == pytest.approx(g.nodes[i].area_ratio, abs=0.01)


def test_ratios_that_cannot_be_computed_are_unknown_not_zero(graphs):
    team = to_team_graph(graphs[0])
    for n in team["nodes"]:  # every space outside: no inside area to take a share of
        n["is_outside"], n["area_ratio"] = True, None
    team["nodes"] = [n for n in team["nodes"] if n["category_name"] != "공간_침실"]
    got = read_topology_dict(team, origin="t.json")
    st = got.statistics
    assert st.ldk_ratio is None and st.storage_ratio is None and st.master_bedroom_has_window is None
    # Consumers leave an unknown ratio out instead of reading 0.
    query = build_query(st)
    assert "LDK" not in query and "수납" not in query
    findings = {f.item for f in assess(got).findings}
    assert "LDK 비율" not in findings and "수납 비율" not in findings


def test_frontend_graph_keeps_the_team_definitions(graphs):
    for g in graphs:
        front = to_frontend_graph(g)
        assert detect_topology_format(front) == "team-frontend"
        got = read_topology_dict(front, origin="ann/APT_FP_OBJ_1_topology.json")
        st = got.statistics
        assert got.image_info.file_name == "APT_FP_OBJ_1.png" and st.total_image_area is None
        assert (st.room_count, st.bathroom_count, st.balcony_count, st.bay_count) == (
            g.statistics.room_count,
            g.statistics.bathroom_count,
            g.statistics.balcony_count,
            g.statistics.bay_count,
        )
        assert st.space_count == len(g.nodes)
        assert sum(n.area_ratio for n in got.nodes) == pytest.approx(100.0, abs=0.1)
        assert all(
            n.contains.structures.windows
            for n in got.nodes
            if next(m for m in g.nodes if m.node_id == n.node_id).contains.structures.windows
        )
    # 엘베홀 is inside for the team (their outside test matches 엘리베이터홀 literally), outside for us.
    g = graphs[3]
    assert any(n.label == "엘베홀" and n.is_outside for n in g.nodes)
    got = read_topology_dict(to_frontend_graph(g), origin="x.json")
    assert any(n.label == "엘베홀" and not n.is_outside and n.space_type == "미분류" for n in got.nodes)
    assert got.statistics.inside_space_count == g.statistics.inside_space_count + 1


def test_bad_files_name_the_file_and_the_field(graphs, tmp_path):
    team = to_team_graph(graphs[0])
    del team["statistics"]["bay_count"]
    with pytest.raises(TopologyFormatError, match=r"^bad\.json: statistics\.bay_count: Field required"):
        read_topology_dict(team, origin="bad.json")
    broken = copy.deepcopy(to_team_graph(graphs[0]))
    broken["nodes"][2]["area"] = "big"
    with pytest.raises(TopologyFormatError, match=r"b2\.json: nodes\[2\]\.area"):
        read_topology_dict(broken, origin="b2.json")
    with pytest.raises(TopologyFormatError, match=r"^x\.json: not valid JSON"):
        read_topology_bytes(b"{nope", origin="x.json")
    with pytest.raises(TopologyFormatError, match=r"^y\.json: not a topology graph"):
        read_topology_dict([1, 2], origin="y.json")
    front = to_frontend_graph(graphs[0])
    front["nodes"][1]["class_id"], front["nodes"][1]["class_name"] = 99, "옥상정원"
    with pytest.raises(TopologyFormatError, match=r"f\.json: nodes\[1\]\.class_id: unknown space class 99"):
        read_topology_dict(front, origin="f.json")


def test_store_reads_normalised_and_raw(graphs, tmp_path):
    store = ArtifactStore(tmp_path)
    team = to_team_graph(graphs[1])
    raw = json.dumps(team, ensure_ascii=False, indent=3).encode()
    store.write_bytes(store.layout.topology("S1"), raw)
    assert store.read_topology_raw("S1") == team  # as stored: fractions, nulls, `type`
    assert store.read_topology("S1").statistics.ldk_ratio == graphs[1].statistics.ldk_ratio
    store.write_bytes(store.layout.topology("S2"), b"[]")
    assert store.read_topology("S2") is None
    with pytest.raises(TopologyFormatError, match="S2"):
        store.load_topology("S2")
    with pytest.raises(FileNotFoundError, match="S3"):
        store.read_topology_raw("S3")
