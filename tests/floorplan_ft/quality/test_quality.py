"""Phase 4: metrics on hand-made answers, the winner rule, the report, the review page."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_prepared
from plans import prepare_plans

from floorplan_ft.quality import (
    CHECKS,
    METRICS,
    NoQualifiedTeacher,
    PreferencesError,
    QualityError,
    compare_teachers,
    decide,
    export_review_page,
    load_preferences,
    quality_markdown,
    read_selection,
    score_answer,
    write_outputs,
)
from floorplan_ft.schemas import TopologyGraph
from floorplan_ft.settings import load_settings
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.reference import reference_analysis

N_PLANS = 24


def prepare(root: Path, count: int, complexes: int, seed: int) -> list[str]:
    """Synthetic plans with topologies and retrieval contexts, as phases 1-2 leave them."""
    return prepare_plans(root, count, complexes, seed)[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality") / "data"
    stems = prepare(root, N_PLANS, complexes=4, seed=7)
    return root, stems


@pytest.fixture
def data(base, tmp_path, no_dotenv):
    root, stems = base
    return copy_prepared(root, tmp_path), list(stems)


def graph_of(store: ArtifactStore, stem: str) -> TopologyGraph:
    return TopologyGraph.model_validate_json(store.read_text(store.layout.topology(stem)))


def reference_dict(store: ArtifactStore, stem: str) -> dict:
    g = graph_of(store, stem)
    return reference_analysis(g.image_info.file_name, g).model_dump(mode="json")


def write_teacher(store, stems, name, cost, mutate=None, failures=None):
    """Answers of a fake teacher: the reference answer, optionally changed per plan by
    ``mutate(i, answer) -> dict | str | None`` (None: no answer), with a cost sidecar."""
    for i, stem in enumerate(stems):
        answer = reference_dict(store, stem)
        out = mutate(i, answer) if mutate else answer
        if out is None:
            continue
        text = out if isinstance(out, str) else json.dumps(out, ensure_ascii=False)
        store.write_text(store.layout.analysis(stem, name), text)
        store.write_json(
            store.layout.analysis_meta(stem, name), {"cost_usd": cost, "input_tokens": 3000, "output_tokens": 1500}
        )
    if failures:
        store.write_json(store.layout.label_failures(name), {"teacher": name, "failures": failures})


# =========================================================================== one answer


@pytest.fixture(scope="module")
def plan(base):
    """A plan whose reference fails ≥ 2 criteria (not 불합격) and scores 1 on analysis_depth."""
    root, stems = base
    store = ArtifactStore(root)
    for stem in stems:
        g = graph_of(store, stem)
        ref = reference_analysis(g.image_info.file_name, g)
        cats = {i.category for i in ref.compliance.non_compliant_items}
        if (
            ref.compliance.overall_grade != "불합격"
            and len(cats) >= 2
            and ref.bay_count <= 5
            and score_answer(ref.model_dump_json(), g, ref).metrics["analysis_depth"] == 1.0
        ):
            return g, ref
    pytest.fail("no suitable plan in the synthetic set")


def scores_of(plan, answer):
    graph, ref = plan
    return score_answer(json.dumps(answer, ensure_ascii=False), graph, ref)


def test_the_reference_answer_scores_full_marks(plan):
    graph, ref = plan
    s = score_answer(ref.model_dump_json(), graph, ref)
    assert s.status == "ok" and s.valid
    assert all(s.metrics[m] == 1.0 for m in METRICS), s.metrics
    assert all(s.checks[c] == 1.0 for c in CHECKS if c != "korean_text"), s.checks
    assert 0.95 < s.checks["korean_text"] < 1.0  # "LDK" is not Hangul
    assert s.weighted(load_settings().quality.weights) == pytest.approx(1.0)


@pytest.mark.parametrize(("delta", "expected"), [(1, 0.5), (2, 0.25), (-1, 0.5)])
def test_a_wrong_bay_count_lowers_exactly_that_metric(plan, delta, expected):
    graph, ref = plan
    good = scores_of(plan, ref.model_dump(mode="json"))
    answer = ref.model_dump(mode="json")
    answer["bay_count"] = graph.statistics.bay_count + delta
    bad = scores_of(plan, answer)
    assert bad.valid
    assert bad.metrics["bay_count_consistency"] == expected
    assert {m: v for m, v in bad.metrics.items() if m != "bay_count_consistency"} == {
        m: v for m, v in good.metrics.items() if m != "bay_count_consistency"
    }
    assert bad.checks["bay_count_agreement"] == 0.0
    assert {c: v for c, v in bad.checks.items() if c != "bay_count_agreement"} == {
        c: v for c, v in good.checks.items() if c != "bay_count_agreement"
    }


@pytest.mark.parametrize(
    "raw", [None, '{"image_name": "x.png", "bay_count": 3', "[1, 2]", "```json\n{}\n```", b"\xff\xfe"]
)
def test_missing_or_unparseable_answers_score_zero_on_everything(plan, raw):
    graph, ref = plan
    s = score_answer(raw, graph, ref)
    assert s.status == ("missing" if raw is None else "invalid_json") and not s.valid
    assert all(v == 0.0 for v in s.metrics.values())
    assert all(v == 0.0 for v in s.checks.values())


def test_a_schema_violation_costs_schema_compliance_not_the_rest(plan):
    _, ref = plan
    answer = ref.model_dump(mode="json")
    answer["ventilation_quality"] = "excellent"  # not one of the enum values
    s = scores_of(plan, answer)
    assert s.status == "schema_invalid" and s.detail and "ventilation_quality" in s.detail
    assert s.metrics["json_validity"] == 1.0 and s.metrics["schema_compliance"] == 0.0
    assert all(s.metrics[m] == 1.0 for m in METRICS if m != "schema_compliance")


def test_missing_optional_sections_lower_completeness(plan):
    _, ref = plan
    no_design = ref.model_dump(mode="json") | {"design_evaluation": None}
    s = scores_of(plan, no_design)
    assert s.metrics["field_completeness"] == pytest.approx(0.8)
    # depth: summary 1, design 0, comments 1, specificity 1/5 (only the summary quotes a figure)
    assert s.metrics["analysis_depth"] == pytest.approx((1 + 0 + 1 + 0.2) / 4)

    no_recs = ref.model_dump(mode="json") | {"recommendations": None}
    s = scores_of(plan, no_recs)
    assert s.metrics["field_completeness"] == pytest.approx(0.8)
    assert s.metrics["recommendation_quality"] == 0.0  # needed: the plan fails criteria

    no_compliance = ref.model_dump(mode="json") | {"compliance": None}
    s = scores_of(plan, no_compliance)
    assert s.metrics["field_completeness"] == pytest.approx(0.8)
    assert s.metrics["compliance_reasoning"] == 0.0 and s.checks["grade_agreement"] == 0.0

    bare = ref.model_dump(mode="json") | {"design_evaluation": None, "recommendations": None, "compliance": None}
    assert scores_of(plan, bare).metrics["field_completeness"] == pytest.approx(0.4)
    assert all(scores_of(plan, a).valid for a in (no_design, no_recs, no_compliance, bare))


def test_space_counts_and_names(plan):
    graph, ref = plan
    inside = graph.statistics.inside_space_count
    answer = ref.model_dump(mode="json")
    answer["total_spaces"] = inside - 3
    assert scores_of(plan, answer).metrics["space_count_accuracy"] == pytest.approx((1 - 3 / inside + 1 + 1) / 3)

    answer = ref.model_dump(mode="json")
    claimed = sum(len(s["connected_spaces"]) for s in answer["spaces"])
    answer["spaces"].append(
        {
            "space_name": "침실9",
            "space_type": "특화공간",
            "area_ratio": 2.0,
            "has_window": False,
            "features": ["무창"],
            "connected_spaces": ["거실"],
            "evaluation_comment": "평면에 없는 공간을 지어낸 예시입니다.",
        }
    )
    s = scores_of(plan, answer)
    n = len(answer["spaces"])
    assert s.checks["spaces_exist"] == pytest.approx((n - 1) / n)
    assert s.checks["connections_exist"] == pytest.approx(claimed / (claimed + 1))
    assert s.metrics["space_count_accuracy"] == pytest.approx((1 + (1 - 1 / n) + 1) / 3)


def test_compliance_reasoning_and_recommendations(plan):
    _, ref = plan
    k = len(ref.compliance.non_compliant_items)
    # A grade that contradicts the answer's own items (≥ 2 criteria failed but 최우수).
    answer = ref.model_dump(mode="json")
    answer["compliance"]["overall_grade"] = "최우수"
    s = scores_of(plan, answer)
    assert s.metrics["compliance_reasoning"] == pytest.approx(0.5)
    assert s.checks["grade_agreement"] == 0.0
    # One item without a reason: that item scores 2/3 of its reasoning part.
    answer = ref.model_dump(mode="json")
    answer["compliance"]["non_compliant_items"][0]["reason"] = ""
    s = scores_of(plan, answer)
    assert s.metrics["compliance_reasoning"] == pytest.approx(((k - 1 / 3) / k + 1) / 2)
    # A duplicated recommendation: only the uniqueness part drops.
    answer = ref.model_dump(mode="json")
    recs = answer["recommendations"]
    answer["recommendations"] = [*recs, recs[0]]
    s = scores_of(plan, answer)
    assert s.metrics["recommendation_quality"] == pytest.approx((3 + len(recs) / (len(recs) + 1)) / 4)
    # Vague recommendations that address nothing.
    answer = ref.model_dump(mode="json")
    answer["recommendations"] = ["개선이 필요합니다."]
    assert scores_of(plan, answer).metrics["recommendation_quality"] == pytest.approx((1 + 0 + 1 + 0) / 4)


def test_any_json_object_scores_within_bounds(plan):
    graph, ref = plan
    rnd = random.Random(3)
    junk = [None, 0, -3, 2.5, float("nan"), "x", "", [], {}, True, [None, "a", {}], {"a": 1}]
    base = ref.model_dump(mode="json")
    keys = [*base, *[("spaces", k) for k in base["spaces"][0]], *[("compliance", k) for k in base["compliance"]]]
    for _ in range(150):
        answer = copy.deepcopy(base)
        for key in rnd.sample(keys, 3):
            if isinstance(key, tuple):
                target = answer[key[0]]
                if key[0] == "spaces":
                    target = target[0] if isinstance(target, list) and target else None
                if isinstance(target, dict):
                    target[key[1]] = rnd.choice(junk)
            else:
                answer[key] = rnd.choice(junk)
        s = score_answer(answer, graph, ref)
        assert all(0.0 <= v <= 1.0 for v in s.metrics.values()), s.metrics
        assert all(v is None or 0.0 <= v <= 1.0 for v in s.checks.values()), s.checks


def test_korean_share(plan):
    _, ref = plan
    answer = ref.model_dump(mode="json")
    good = scores_of(plan, answer).checks["korean_text"]
    answer["summary"] = "This is a tower-type plan with four bays and a poor ventilation grade overall."
    assert scores_of(plan, answer).checks["korean_text"] < good


# =========================================================================== the rule


RULE = {"tie_margin": 0.05, "min_schema_compliance": 0.95}


def test_decide_tie_goes_to_the_cheaper_teacher():
    d = decide({"a": 0.90, "b": 0.87}, {"a": 1.0, "b": 1.0}, {"a": 0.02, "b": 0.01}, **RULE)
    assert (d.winner, d.rule) == ("b", "tie_cheaper") and "cheaper" in d.reason
    d = decide({"a": 0.90, "b": 0.84}, {"a": 1.0, "b": 1.0}, {"a": 0.02, "b": 0.01}, **RULE)
    assert (d.winner, d.rule) == ("a", "higher_total")
    d = decide({"a": 0.90, "b": 0.88}, {"a": 1.0, "b": 1.0}, {"a": 0.01, "b": 0.01}, **RULE)
    assert d.winner == "a" and "equal cost" in d.reason


def test_decide_compliance_floor_and_force():
    d = decide({"a": 0.95, "b": 0.70}, {"a": 0.94, "b": 0.99}, {"a": 0.01, "b": 0.05}, **RULE)
    assert d.winner == "b" and "a" in d.disqualified and "min_schema_compliance" in d.disqualified["a"]
    assert d.rule == "single_teacher" and "cannot win" in d.reason
    d = decide({"a": 0.95, "b": 0.70}, {"a": 0.94, "b": 0.99}, {"a": 0.01, "b": 0.05}, **RULE, force_teacher="a")
    assert (d.winner, d.rule) == ("a", "forced") and d.automatic["winner"] == "b"
    assert "force_teacher" in d.reason and "would pick b" in d.reason
    d = decide({"a": 0.9}, {"a": 0.5}, {"a": 0.0}, **RULE)
    assert d.winner is None and d.rule == "none_qualified"
    with pytest.raises(QualityError, match="force_teacher"):
        decide({"a": 0.9}, {"a": 1.0}, {"a": 0.0}, **RULE, force_teacher="zz")


# =========================================================================== the comparison


def test_close_totals_go_to_the_cheaper_teacher_and_outputs_are_written(data):
    store, stems = data
    write_teacher(store, stems, "a", 0.02)

    def some_bays_off(i, a):
        if i % 4 == 0:
            a["bay_count"] += 1
        return a

    write_teacher(store, stems, "b", 0.01, some_bays_off)
    settings = load_settings(quality={"sample_size": 12, "bootstrap_samples": 300})
    report = compare_teachers(store, stems, ["a", "b"], settings)
    a, b = report.teacher_stats["a"], report.teacher_stats["b"]
    assert a["weighted_total"]["mean"] > b["weighted_total"]["mean"]
    assert report.winner == "b" and report.decision.rule == "tie_cheaper"
    assert b["cost"]["per_valid_item_usd"] == pytest.approx(0.01) and b["cost"]["answers"] == N_PLANS
    # Stratified by complex: every complex of the synthetic set is in the sample.
    assert report.sample["used"] == 12 and len(report.sample["groups"]) == 4
    for stat in (a, b):
        for s in [*stat["metrics"].values(), stat["weighted_total"]]:
            assert s["ci_low"] <= s["mean"] <= s["ci_high"]
    assert b["metrics"]["bay_count_consistency"]["ci_low"] < b["metrics"]["bay_count_consistency"]["ci_high"]

    again = compare_teachers(store, stems, ["a", "b"], settings)
    assert again.to_dict() | {"created_at": None} == report.to_dict() | {"created_at": None}

    paths = write_outputs(store, report)
    saved = json.loads(Path(paths["quality_report"]).read_text())
    assert saved["selected"] == "b" and saved["decision"]["reason"] == report.decision.reason
    assert Path(paths["selected_model"]).read_text() == "b\n" and read_selection(store) == "b"
    assert Path(paths["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = quality_markdown(report)
    assert "Selected: `b`" in md and "weighted total" in md and "bay_count_agreement" in md


def test_a_clear_gap_beats_a_lower_price(data):
    store, stems = data
    write_teacher(store, stems, "a", 0.02)

    def worse(i, a):
        a["bay_count"] += 2
        return a

    write_teacher(store, stems, "b", 0.001, worse)
    report = compare_teachers(store, stems, ["a", "b"], load_settings(quality={"bootstrap_samples": 200}))
    assert report.winner == "a" and report.decision.rule == "higher_total"
    assert any("all of them are compared" in n for n in report.notes)  # 24 < sample_size 100
    assert report.sample["used"] == N_PLANS


def test_a_teacher_under_the_compliance_floor_cannot_win(data):
    store, stems = data

    def two_cut_off(i, a):
        return json.dumps(a, ensure_ascii=False)[:500] if i in (3, 9) else a

    def bare(i, a):
        return a | {"design_evaluation": None, "recommendations": None, "compliance": None}

    write_teacher(store, stems, "c", 0.01, two_cut_off)
    write_teacher(store, stems, "d", 0.01, bare)
    report = compare_teachers(store, stems, ["c", "d"], load_settings(quality={"bootstrap_samples": 200}))
    c, d = report.teacher_stats["c"], report.teacher_stats["d"]
    assert c["weighted_total"]["mean"] > d["weighted_total"]["mean"]
    assert c["metrics"]["schema_compliance"]["mean"] == pytest.approx(22 / 24)
    assert c["invalid_reasons"] == {"invalid_json": 2}
    assert report.winner == "d" and "c" in report.decision.disqualified and "c cannot win" in report.decision.reason

    forced = compare_teachers(
        store, stems, ["c", "d"], load_settings(quality={"bootstrap_samples": 200, "force_teacher": "c"})
    )
    assert forced.winner == "c" and forced.decision.rule == "forced"
    assert forced.decision.automatic["winner"] == "d"


def test_failures_count_as_invalid_and_skipped_plans_are_left_out(data):
    store, stems = data
    write_teacher(
        store,
        stems,
        "a",
        0.02,
        lambda i, a: None if i == 0 else a,
        failures={stems[0]: {"reason": "refusal", "cost_usd": 0.005}},
    )
    write_teacher(
        store,
        stems,
        "b",
        0.01,
        lambda i, a: None if i == 1 else a,
        failures={stems[1]: {"reason": "budget", "cost_usd": 0.0}},
    )
    report = compare_teachers(store, stems, ["a", "b"], load_settings(quality={"bootstrap_samples": 200}))
    assert report.sample["eligible"] == N_PLANS - 1 and report.sample["excluded"] == {"not_labeled_by_all": 1}
    assert stems[1] not in report.sample["stems"] and stems[0] in report.sample["stems"]
    a = report.teacher_stats["a"]
    assert a["invalid_reasons"] == {"missing": 1} and a["labeling_failures"] == {"refusal": 1}
    assert a["cost"]["per_valid_item_usd"] == pytest.approx((0.02 * 23 + 0.005) / 23)
    row = next(r for r in report.items if r["stem"] == stems[0])
    assert row["teachers"]["a"]["detail"] == "labeling failed: refusal" and row["teachers"]["a"]["weighted"] == 0.0


def test_bad_inputs_give_clear_errors(data):
    store, stems = data
    settings = load_settings(quality={"bootstrap_samples": 100})
    write_teacher(store, stems, "a", 0.01)
    with pytest.raises(QualityError, match=r"\['gemini'\] have no answers"):
        compare_teachers(store, stems, ["a", "gemini"], settings)
    write_teacher(store, stems, "bad", 0.01, lambda i, a: "{" if i % 2 else a)
    with pytest.raises(NoQualifiedTeacher, match="min_schema_compliance") as err:
        compare_teachers(store, stems, ["bad"], settings)
    assert err.value.report.decision.rule == "none_qualified"
    with pytest.raises(QualityError, match="sample is empty"):
        compare_teachers(store, [], ["a"], settings)


def test_bootstrap_depends_only_on_the_seed(data):
    store, stems = data
    write_teacher(store, stems, "a", 0.01, lambda i, a: a | {"bay_count": a["bay_count"] + (i % 3)})
    runs = [
        compare_teachers(store, stems, ["a"], load_settings(quality={"bootstrap_samples": 400, "seed": s}))
        for s in (1, 1, 2)
    ]
    ci = [r.teacher_stats["a"]["metrics"]["bay_count_consistency"] for r in runs]
    assert ci[0] == ci[1]
    assert runs[0].winner == "a" and runs[0].decision.rule == "single_teacher"
    values = [r["teachers"]["a"]["metrics"]["bay_count_consistency"] for r in runs[0].items]
    assert ci[0]["mean"] == pytest.approx(np.mean(values), abs=1e-4)
    assert ci[0]["ci_low"] < ci[0]["mean"] < ci[0]["ci_high"]


# =========================================================================== manual review


def test_review_page_and_preferences(data):
    store, stems = data
    write_teacher(store, stems, "a", 0.02)
    write_teacher(store, stems, "b", 0.01, lambda i, a: a | {"bay_count": a["bay_count"] + 2})
    path = export_review_page(store, stems, ["a", "b"], 6)
    page = Path(path).read_text()
    assert path.endswith("review/review.html")
    assert page.count("<section class='plan'") == 6
    assert page.count("class='diff' data-field='bay_count'") == 6  # the perturbed field, every plan
    assert "class='diff' data-field='structure_type'" not in page  # agreeing fields are not highlighted
    assert "value='a'" in page and "value='b'" in page and "value='tie'" in page
    assert "Download preferences JSON" in page and "<script>" in page and "preferences.json" in page
    shown = [s for s in stems if f"data-stem='{s}'" in page]
    assert len(shown) == 6

    assert load_preferences(store) == {}
    prefs = {
        "format": "ftp-review-preferences/1",
        "teachers": ["a", "b"],
        "reviewer": "kim",
        "preferences": {shown[0]: "a", shown[1]: "a", shown[2]: "b", shown[3]: "tie"},
        "notes": {shown[2]: "?"},
    }
    store.write_json(store.path("review", "preferences.json"), prefs)
    report = compare_teachers(store, stems, ["a", "b"], load_settings(quality={"bootstrap_samples": 100}))
    p = report.preferences
    assert report.winner == "a"
    assert p["counts"] == {"a": 2, "b": 1, "tie": 1} and p["decisive"] == 3
    assert p["winner_share"] == pytest.approx(2 / 3)
    assert p["agreement_with_scores"] == pytest.approx(2 / 4) and p["compared_with_scores"] == 4
    assert "Human review" in quality_markdown(report)

    broken = copy.deepcopy(prefs)
    broken["preferences"][shown[0]] = "c"
    store.write_json(store.path("review", "preferences.json"), broken)
    with pytest.raises(PreferencesError, match=r"preferences\.json.*'c'"):
        load_preferences(store)
    store.write_text(store.path("review", "preferences.json"), "{not json")
    with pytest.raises(PreferencesError, match=r"preferences\.json: not valid JSON"):
        compare_teachers(store, stems, ["a", "b"], load_settings())
