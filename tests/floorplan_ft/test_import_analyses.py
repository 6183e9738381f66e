"""`ft-pipeline import analyses`: the team's stored analyses (their export's shape, written here
from our own reference answers) read leniently, written as teacher `production`, and compared by
phase 4 beside the labeled teachers without ever being selected or labeled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import copy_prepared
from plans import prepare_plans
from typer.testing import CliRunner

from floorplan_ft.schemas import FloorPlanAnalysis
from floorplan_ft.settings import load_settings
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.reference import reference_analysis
from floorplan_ft.team_analyses import (
    IMPORTED_TEACHER,
    import_analyses,
    iter_records,
    lenient_analysis,
    read_record,
)

ENGLISH = {"채광": "lighting", "환기": "ventilation", "가족융화": "family_harmony", "수납": "storage"}
runner = CliRunner()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("import-analyses") / "data"
    _, stems = prepare_plans(root, 8, complexes=2, seed=5)
    return root, stems


@pytest.fixture
def data(base, tmp_path, no_dotenv):
    root, stems = base
    return copy_prepared(root, tmp_path), list(stems)


def reference_of(store: ArtifactStore, stem: str) -> FloorPlanAnalysis:
    graph = store.read_topology(stem)
    return reference_analysis(graph.image_info.file_name, graph)


def team_dialect(answer: FloorPlanAnalysis, *, bad_ventilation: bool = False) -> dict:
    """One of our answers as their looser model stores it: English design keys, lists left out
    (their defaults), has_window left out, 불량 for a poor ventilation."""
    a = answer.model_dump(mode="json")
    a["design_evaluation"] = {ENGLISH[k]: v for k, v in a["design_evaluation"].items()}
    for space in a["spaces"]:
        del space["features"], space["connected_spaces"], space["has_window"]
    del a["compliance"]["compliant_items"]
    if bad_ventilation:
        a["ventilation_quality"] = "불량"
    return a


def chroma_record(image_name: str, document: str, **metadata) -> dict:
    return {
        "document_id": image_name,
        "metadata": {"image_name": image_name, **metadata},
        "document": document,
        "embedding": {"dimension": 4, "first_10_values": [0.1, 0.2, 0.3, 0.4]},
    }


def write_export(store: ArtifactStore, stems: list[str], path: Path) -> dict:
    """Their ChromaDB export: JSON documents for most plans, one natural-language document, and
    three broken records (bad JSON, an unmappable grade, a plan that is not in the data root)."""
    records = []
    for i, stem in enumerate(stems[:5]):
        doc = team_dialect(reference_of(store, stem), bad_ventilation=i % 2 == 0)
        records.append(
            chroma_record(
                f"{stem}.PNG", json.dumps(doc, ensure_ascii=False), compliance_grade=doc["compliance"]["overall_grade"]
            )
        )
    ref = reference_of(store, stems[5])
    nl = (
        f"{ref.summary} lighting은(는) 우수. ventilation은(는) 미흡. family_harmony은(는) 보통. "
        f"storage은(는) 미흡. 거실: 거실은 넓고 밝습니다. 욕실: 욕실은 창이 없습니다. "
        f"사내 기준 적합성: 보통. 수납이 부족합니다. 부적합(수납): 수납 공간 - 팬트리를 둘 것"
    )
    records.append(
        chroma_record(
            f"{stems[5]}.PNG",
            nl,
            structure_type=ref.structure_type,
            bay_count=ref.bay_count,
            room_count=ref.room_count,
            bathroom_count=ref.bathroom_count,
            balcony_ratio=ref.balcony_ratio,
            windowless_ratio=ref.windowless_ratio,
            ventilation_quality="불량",
            compliance_grade="보통",
        )
    )
    records.append(chroma_record(f"{stems[6]}.PNG", '{"summary": "잘림'))
    bad_grade = team_dialect(reference_of(store, stems[7]))
    bad_grade["compliance"]["overall_grade"] = "A+"
    records.append(chroma_record(f"{stems[7]}.PNG", json.dumps(bad_grade, ensure_ascii=False)))
    stranger = team_dialect(reference_of(store, stems[0]))
    records.append(chroma_record("APT_FP_OBJ_000000001.PNG", json.dumps(stranger, ensure_ascii=False)))
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return {"json": stems[:5], "natural": stems[5], "broken": stems[6:8]}


# =========================================================================== the lenient reader


def test_their_looser_analysis_maps_onto_ours_with_every_change_named(data):
    store, stems = data
    ours = reference_of(store, stems[0])
    theirs = team_dialect(ours, bad_ventilation=True)
    analysis, notes = lenient_analysis(theirs, f"{stems[0]}.PNG")
    assert analysis.design_evaluation == ours.design_evaluation
    assert analysis.ventilation_quality == "미흡"
    assert [s.space_name for s in analysis.spaces] == [s.space_name for s in ours.spaces]
    assert all(s.features == [] and s.connected_spaces == [] and s.has_window for s in analysis.spaces)
    assert analysis.compliance.compliant_items == []
    assert analysis.compliance.non_compliant_items == ours.compliance.non_compliant_items
    assert "design_evaluation key lighting → 채광" in notes and "design_evaluation key storage → 수납" in notes
    assert "ventilation_quality: '불량' → 미흡" in notes
    assert "spaces[].has_window: missing → true (their default)" in notes
    assert notes.count("spaces[].features: missing → []") == len(ours.spaces)

    # Free strings map where one reading exists, and fail with the field named where none does.
    loose = dict(theirs, structure_type="판상형 구조", ventilation_quality="양호 (맞통풍)", bay_count="3")
    analysis, notes = lenient_analysis(loose, "x.png")
    assert (analysis.structure_type, analysis.ventilation_quality, analysis.bay_count) == ("판상형", "양호", 3)
    for field, value, message in (
        ("structure_type", "판상 타워 혼용", "ambiguous"),
        ("ventilation_quality", "최악", "unknown"),
    ):
        with pytest.raises(ValueError, match=f"{field} .*{message}"):
            lenient_analysis(dict(theirs, **{field: value}), "x.png")


def test_the_natural_language_rendering_is_read_back_with_metadata():
    doc = (
        "채광이 좋은 3베이 평면입니다. lighting은(는) 우수. ventilation은(는) 불량 (욕실 창 없음). "
        "family_harmony은(는) 보통. storage은(는) 미흡. 거실: 거실은 남향입니다. 주방/식당: 환기창이 있습니다. "
        "사내 기준 적합성: 미흡. 수납이 모자랍니다. 부적합(수납): 수납 공간 - 팬트리 추가 "
        "부적합(환기): 욕실 환기창 - 욕실에 창을 둘 것"
    )
    meta = {
        "image_name": "APT_FP_OBJ_000000007.PNG",
        "structure_type": "타워형",
        "bay_count": 3,
        "room_count": 3,
        "bathroom_count": 2,
        "balcony_ratio": 12.5,
        "windowless_ratio": 40.0,
        "ventilation_quality": "불량",
    }
    analysis, notes, form = read_record(meta["image_name"], doc, meta)
    assert form == "natural-language"
    assert analysis.summary == "채광이 좋은 3베이 평면입니다."
    assert analysis.design_evaluation.환기 == "불량 (욕실 창 없음)" and analysis.design_evaluation.수납 == "미흡"
    assert [(s.space_name, s.evaluation_comment) for s in analysis.spaces] == [
        ("거실", "거실은 남향입니다."),
        ("주방/식당", "환기창이 있습니다."),
    ]
    assert analysis.compliance.overall_grade == "미흡" and analysis.compliance.summary == "수납이 모자랍니다."
    assert [(i.category, i.item, i.recommendation) for i in analysis.compliance.non_compliant_items] == [
        ("수납", "수납 공간", "팬트리 추가"),
        ("환기", "욕실 환기창", "욕실에 창을 둘 것"),
    ]
    assert (analysis.structure_type, analysis.bay_count, analysis.ventilation_quality) == ("타워형", 3, "미흡")
    assert "structure_type: from metadata" in notes


def test_the_three_export_shapes_give_the_same_records():
    analysis = {"image_name": "A.PNG", "summary": "s"}
    chroma = [{"document_id": "A.PNG", "metadata": {"image_name": "A.PNG"}, "document": "{}"}]
    columnar = {"ids": ["A.PNG"], "documents": ["{}"], "metadatas": [{"image_name": "A.PNG"}]}
    assert [r[0] for r in iter_records(chroma, "f")] == [r[0] for r in iter_records(columnar, "f")] == ["A.PNG"]
    assert iter_records({"A.PNG": analysis}, "f") == [("A.PNG", analysis, {})]
    assert iter_records([analysis], "f") == [("A.PNG", analysis, {})]


# =========================================================================== the command


def test_import_analyses_cli_writes_production_answers_and_reports_each_mapping(data, tmp_path):
    from ft_pipeline.cli import app

    store, stems = data
    export = tmp_path / "chromadb_content.json"
    parts = write_export(store, stems, export)
    result = runner.invoke(app, ["import", "analyses", str(export), "--set", f"paths.data_root={store.root}"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "9 records → 6 imported as teacher 'production', 3 rejected" in out
    assert "design_evaluation key lighting → 채광" in out and "ventilation_quality: '불량' → 미흡" in out
    # The summary table counts records per mapping: 3 of the 5 JSON records said 불량, plus the
    # natural-language one through its metadata.
    row = next(line for line in out.splitlines() if line.startswith("ventilation_quality: '불량' → 미흡"))
    assert row.split()[-1] == "4"
    assert f"({parts['broken'][0]}.PNG): document looks like JSON but does not parse" in out
    assert "compliance.overall_grade 'A+' is unknown" in out
    assert "no plan named 'APT_FP_OBJ_000000001.PNG'" in out

    for stem in [*parts["json"], parts["natural"]]:
        answer = FloorPlanAnalysis.model_validate_json(store.read_text(store.layout.analysis(stem, IMPORTED_TEACHER)))
        assert answer.image_name == f"{stem}.PNG"
        meta = store.read_json(store.layout.analysis_meta(stem, IMPORTED_TEACHER))
        assert meta["imported"] is True and meta["teacher"] == "production" and meta["provider"] == "imported"
        assert meta["source_file"] == str(export) and meta["mappings"]
    assert (
        store.read_json(store.layout.analysis_meta(parts["natural"], "production"))["source_form"] == "natural-language"
    )
    json_answer = FloorPlanAnalysis.model_validate_json(
        store.read_text(store.layout.analysis(parts["json"][1], "production"))
    )
    assert json_answer.design_evaluation == reference_of(store, parts["json"][1]).design_evaluation
    for stem in parts["broken"]:
        assert not store.exists(store.layout.analysis(stem, "production"))
    summary = store.read_json(store.path("import_analyses_production.json"))
    assert summary["imported"] == 6 and len(summary["rejects"]) == 3

    missing = runner.invoke(
        app, ["import", "analyses", str(tmp_path / "nope.json"), "--set", f"paths.data_root={store.root}"]
    )
    assert missing.exit_code == 2 and "nope.json: no such file" in missing.output
    clash = runner.invoke(
        app, ["import", "analyses", str(export), "--teacher", "openai", "--set", f"paths.data_root={store.root}"]
    )
    assert clash.exit_code == 2 and "teacher 'openai' is labeled in phase 3" in clash.output


# =========================================================================== phase 4


def _write_labeled(store: ArtifactStore, stems: list[str], teacher: str, cost: float) -> None:
    for stem in stems:
        store.write_text(store.layout.analysis(stem, teacher), reference_of(store, stem).model_dump_json())
        store.write_json(store.layout.analysis_meta(stem, teacher), {"teacher": teacher, "cost_usd": cost})


@pytest.mark.prefect
def test_phase_4_compares_production_beside_the_labeled_teachers_and_never_picks_it(prefect_api, data, tmp_path):
    from flows.ft_pipeline import ft_pipeline

    store, stems = data
    store.write_json(store.layout.run_file("sample"), {"stems": stems, "n": len(stems)})
    _write_labeled(store, stems, "reference", 0.0)
    _write_labeled(store, stems, "local", 0.0)
    export = tmp_path / "export.json"
    parts = write_export(store, stems, export)
    import_analyses(store, export)

    overrides = {
        "paths.data_root": str(store.root),
        "quality.sample_size": 6,
        "quality.review_plans": 0,
        "quality.bootstrap_samples": 100,
        "quality.extra_teachers": ["production"],
    }
    result = ft_pipeline(steps="4", profile="demo", overrides=overrides)
    assert result["4"]["status"] == "done"
    report = json.loads(Path(store.path("quality_report.json")).read_text())
    assert report["teachers"] == ["reference", "local", "production"]
    assert report["settings"]["extra_teachers"] == ["production"]
    production = report["teacher_stats"]["production"]
    assert production["n"] == report["sample"]["used"] == 6  # the plans production answered
    assert set(report["sample"]["stems"]) == {*parts["json"], parts["natural"]}
    assert 0 < production["weighted_total"]["mean"] < report["teacher_stats"]["reference"]["weighted_total"]["mean"]
    assert report["selected"] in ("reference", "local")
    # Phase 3 never labels with it: there is no such teacher to build.
    from floorplan_ft.teachers.factory import make_teacher

    with pytest.raises(ValueError, match="quality.extra_teachers"):
        make_teacher(load_settings(), "production")
