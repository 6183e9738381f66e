import json
import re

import pytest

from floorplan_ft.criteria import assess
from floorplan_ft.cv import build_topology, detections_from_coco
from floorplan_ft.schemas import FloorPlanAnalysis
from floorplan_ft.synth import write_dataset
from floorplan_ft.teachers.reference import reference_analysis


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    stems = write_dataset(root, count=80, complexes=4, seed=5)
    out = []
    for stem in stems:
        coco = json.loads((root / "annotations" / f"{stem}.json").read_text())
        truth = json.loads((root / "truth" / f"{stem}.json").read_text())
        out.append((stem, build_topology(detections_from_coco(coco)), truth))
    return out


def test_every_answer_validates_and_agrees_with_the_topology(plans):
    for stem, graph, truth in plans:
        answer = reference_analysis(f"{stem}.png", graph)
        again = FloorPlanAnalysis.model_validate_json(answer.model_dump_json())
        st = graph.statistics
        assert (again.structure_type, again.bay_count, again.room_count, again.bathroom_count) == (
            st.structure_type,
            st.bay_count,
            st.room_count,
            st.bathroom_count,
        )
        assert again.total_spaces == st.inside_space_count == len(again.spaces)
        assert {s.space_name for s in again.spaces} == {n.label for n in graph.nodes if not n.is_outside}
        assert again.design_evaluation is not None and again.compliance is not None


def test_master_bedroom_without_window_fails_the_plan(plans):
    windowless = [(s, g) for s, g, t in plans if t["master_bedroom_has_window"] is False]
    with_window = [(s, g) for s, g, t in plans if t["master_bedroom_has_window"]]
    assert windowless and with_window
    for stem, graph in windowless:
        answer = reference_analysis(stem, graph)
        assert answer.compliance.overall_grade == "불합격"
        assert any("안방" in item.item for item in answer.compliance.non_compliant_items)
    assert all(reference_analysis(s, g).compliance.overall_grade != "불합격" for s, g in with_window)


def test_grades_follow_the_number_of_criteria_met(plans):
    grades = set()
    for stem, graph, _ in plans:
        a = assess(graph)
        grade = reference_analysis(stem, graph).compliance.overall_grade
        grades.add(grade)
        if not a.mandatory_failed:
            assert grade == {4: "최우수", 3: "우수", 2: "보통"}.get(a.met_count, "미흡")
        # Non-compliant items are exactly the unmet findings, each with a reason and a fix.
        answer = reference_analysis(stem, graph)
        assert len(answer.compliance.non_compliant_items) == sum(not f.met for f in a.findings)
        assert all(i.reason and i.recommendation for i in answer.compliance.non_compliant_items)
    assert len(grades) >= 3  # the synthetic set exercises several grades


def test_deterministic_and_korean(plans):
    stem, graph, _ = plans[0]
    one = reference_analysis(stem, graph).model_dump_json()
    assert one == reference_analysis(stem, graph).model_dump_json()
    hangul = len(re.findall(r"[가-힣]", one))
    assert hangul > 200
