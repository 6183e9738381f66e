"""Phase 4, one answer: the eight weighted metrics and the checks beside them.

Every answer is scored on the plan's eight metrics (DOMAIN.md, weights in ``quality.weights``),
each normalised to 0..1 per answer; a teacher's metric is the mean over the compared plans, with a
seeded bootstrap 95 % interval. Definitions (``t`` = the topology's statistics, "text" = a string
after stripping; "chars" = its non-whitespace characters):

json_validity
    1 if the raw text parses with ``json.loads`` into a JSON *object*, else 0 (a fenced or
    chatty answer, a bare list, a cut-off answer: 0).
schema_compliance
    1 if the object validates as ``FloorPlanAnalysis`` (types, enums, bounds, no extra keys), else 0.
    Its mean is the compliance rate that ``quality.min_schema_compliance`` is compared with.
field_completeness
    Mean of five equally weighted sections, each the share of its fields filled (a number for
    numeric fields, a non-empty text, a non-empty list):
    (1) the ten top-level scalars (image_name … summary);
    (2) spaces: mean over listed spaces of the share of space_name, space_type, area_ratio,
    has_window, features, connected_spaces, evaluation_comment (an empty connected_spaces counts
    as filled when the space is isolated in the topology); no spaces → 0. ``area_m2`` is left out on
    purpose: the topology is in pixels with no scale, so a filled area_m2 can only be invented;
    (3) design_evaluation: share of its four keys filled (absent → 0);
    (4) recommendations: 1 if at least one non-empty recommendation, or if none is needed (the
    rule-based reference finds every criterion met); else 0;
    (5) compliance: mean of overall_grade, summary, "some item listed" (compliant or not) and the
    completeness of the non-compliant items (category, item, reason, recommendation); absent → 0.
space_count_accuracy
    Mean of three closeness scores ``1 - |a - b| / max(a, b, 1)`` (clipped to 0..1): total_spaces
    vs t.inside_space_count, the number of listed spaces vs t.inside_space_count, room_count vs
    t.room_count. A missing number scores 0 for its part.
bay_count_consistency
    ``0.5 ** |bay_count - t.bay_count|``: 1 when equal, halved per bay of difference; 0 if missing.
compliance_reasoning
    Mean of (a) reasoning: per non-compliant item the share of {reason has ≥ 10 chars,
    recommendation has ≥ 10 chars and differs from the reason, reason or recommendation cites a
    figure (a digit) or a criterion term (채광, 환기, 베이, 무창, 맞통풍, LDK, 외기창, 창, 비율 …)},
    averaged over items (no items → 1); and (b) grade consistency with the answer's own items:
    the criteria failed = distinct categories among 채광/환기/가족융화/수납 named by the items;
    expected grade 0 → 최우수, 1 → 우수, 2 → 보통, ≥ 3 → 미흡; 1 if the grade equals it, 0.5 if
    one rank away, else 0; 불합격 is consistent (1) iff at least one item is listed. No compliance
    section → 0. (Whether the grade is *right* is the separate grade_agreement check.)
analysis_depth
    Mean of four parts: summary length ``min(1, chars/60)``; design_evaluation: mean over the four
    keys of ``min(1, chars/25)`` (absent → 0); per-space comments: mean over listed spaces of
    ``min(1, chars/20)`` (no spaces → 0); specificity: share of the five texts (summary and the
    four design_evaluation texts) that quote a figure (contain a digit).
recommendation_quality
    When no recommendation is given: 1 if none is needed (neither the answer nor the reference
    lists a non-compliant item), else 0. Otherwise the mean of four parts: present (1); specific:
    share of recommendations with ≥ 15 chars that name a space of the plan, a criterion term or a
    figure; unique: distinct recommendations (whitespace and case ignored) / all; coverage: share of
    the answer's non-compliant items addressed by some recommendation (it contains the item's
    recommendation or vice versa, names the item's criterion, or a word of ≥ 2 characters of the
    item's name; no items → 1).

A JSON object that fails the schema is still scored leniently on the other metrics (its
schema_compliance is 0); a missing answer (labeling failed) or an unparseable one scores 0 on
everything and counts as invalid.

Checks beside the weighted score (not in it), per answer 1/0 unless noted, averaged over the plans
where they apply: structure_type, room_count, bathroom_count, bay_count agreement with the
topology; windowless_ratio and balcony_ratio within ``RATIO_TOLERANCE`` percentage points;
spaces_exist (share of listed space names found among the topology's labels, exactly, or for a
name without digits after folding synonyms: 안방 → 침실, while 침실5 must be a label);
connections_exist (share of claimed connections that are edges between nodes with those
names); grade_agreement (overall_grade equals the rule-based reference teacher's grade,
``floorplan_ft.criteria``); korean_text (share of Hangul among the letters of all free text,
continuous 0..1).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from floorplan_ft import vocab
from floorplan_ft.criteria import CRITERIA
from floorplan_ft.quality.errors import QualityError
from floorplan_ft.quality.lenient import as_dict, as_int, as_list, as_number, as_text, as_texts, char_count
from floorplan_ft.schemas import FloorPlanAnalysis, TopologyGraph
from floorplan_ft.teachers.reference import reference_analysis

METRICS: tuple[str, ...] = (
    "schema_compliance",
    "field_completeness",
    "space_count_accuracy",
    "bay_count_consistency",
    "compliance_reasoning",
    "analysis_depth",
    "recommendation_quality",
    "json_validity",
)
CHECKS: tuple[str, ...] = (
    "structure_type_agreement",
    "room_count_agreement",
    "bathroom_count_agreement",
    "bay_count_agreement",
    "windowless_ratio_agreement",
    "balcony_ratio_agreement",
    "spaces_exist",
    "connections_exist",
    "grade_agreement",
    "korean_text",
)
RATIO_TOLERANCE = 1.0  # percentage points
GRADE_ORDER: tuple[str, ...] = ("최우수", "우수", "보통", "미흡")
CRITERIA_TERMS: tuple[str, ...] = (
    *CRITERIA,
    "베이",
    "무창",
    "맞통풍",
    "통풍",
    "판상형",
    "타워형",
    "혼합형",
    "LDK",
    "외기창",
    "창",
    "비율",
    "면적",
    "남향",
    "북향",
    "동향",
    "서향",
    "채광창",
)

_SUMMARY_TARGET, _DESIGN_TARGET, _COMMENT_TARGET = 60, 25, 20
_REASON_MIN, _RECOMMENDATION_MIN = 10, 15


@dataclass
class AnswerScores:
    status: str  # ok | schema_invalid | invalid_json | missing
    metrics: dict[str, float]
    checks: dict[str, float | None]
    detail: str | None = None

    @property
    def valid(self) -> bool:
        return self.status == "ok"

    def weighted(self, weights: Mapping[str, float] | Any) -> float:
        w = weights_dict(weights)
        return float(sum(w[m] * self.metrics[m] for m in METRICS))

    def to_dict(self, weights: Mapping[str, float] | Any | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status,
            "metrics": {k: round(v, 4) for k, v in self.metrics.items()},
            "checks": {k: (None if v is None else round(v, 4)) for k, v in self.checks.items()},
        }
        if weights is not None:
            out["weighted"] = round(self.weighted(weights), 4)
        if self.detail:
            out["detail"] = self.detail
        return out


def weights_dict(weights: Mapping[str, float] | Any) -> dict[str, float]:
    w = dict(weights) if isinstance(weights, Mapping) else weights.model_dump()
    missing = [m for m in METRICS if m not in w]
    if missing:
        raise QualityError(f"quality.weights lacks {missing}")
    return {m: float(w[m]) for m in METRICS}


def _zero(status: str, detail: str | None) -> AnswerScores:
    return AnswerScores(status, {m: 0.0 for m in METRICS}, {c: 0.0 for c in CHECKS}, detail)


def _has_digit(s: str) -> bool:
    return any(c.isdigit() for c in s)


def _cites_term(s: str) -> bool:
    return any(term in s for term in CRITERIA_TERMS)


def _norm(s: str) -> str:
    return re.sub(r"\s+", "", s).lower()


def _closeness(a: float | None, b: float) -> float:
    if a is None:
        return 0.0
    return min(1.0, max(0.0, 1.0 - abs(a - b) / max(a, b, 1.0)))


def _is_hangul(c: str) -> bool:
    o = ord(c)
    return 0xAC00 <= o <= 0xD7A3 or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F


class _Topo:
    """What the metrics need from one topology graph, computed once."""

    def __init__(self, graph: TopologyGraph):
        self.graph = graph
        self.st = graph.statistics
        self.by_label: dict[str, set[str]] = {}
        self.by_canon: dict[str, set[str]] = {}
        for n in graph.nodes:
            self.by_label.setdefault(n.label, set()).add(n.node_id)
            for key in {vocab.canonical_name(n.label), vocab.canonical_name(n.category_name)}:
                self.by_canon.setdefault(key, set()).add(n.node_id)
        self.edges = {frozenset((e.source_node, e.target_node)) for e in graph.edges}
        linked = {x for e in graph.edges for x in (e.source_node, e.target_node)}
        self.isolated = {n.node_id for n in graph.nodes if n.node_id not in linked}
        self.names = {x for x in (set(self.by_label) | set(self.by_canon) | set(vocab.SPACE_CLASS)) if len(x) >= 2}

    def nodes_for(self, name: str) -> set[str]:
        name = name.strip()
        if not name:
            return set()
        if name in self.by_label:
            return self.by_label[name]
        if _has_digit(name):  # a numbered name (침실5) must be a label: folding would hide inventions
            return set()
        return self.by_canon.get(vocab.canonical_name(name), set())

    def names_a_space(self, text: str) -> bool:
        return any(n in text for n in self.names)


# ----------------------------------------------------------------------- the metrics

_TOP_TEXT = ("image_name", "structure_type", "ventilation_quality", "summary")
_TOP_NUM = ("bay_count", "total_spaces", "room_count", "bathroom_count", "balcony_ratio", "windowless_ratio")
_DESIGN_KEYS = CRITERIA
_ITEM_FIELDS = ("category", "item", "reason", "recommendation")


def _field_completeness(obj: dict, topo: _Topo, ref_needs_recs: bool) -> float:
    top = (
        sum(bool(as_text(obj.get(k))) for k in _TOP_TEXT) + sum(as_number(obj.get(k)) is not None for k in _TOP_NUM)
    ) / 10

    spaces = as_list(obj.get("spaces"))
    if spaces:
        per_space = []
        for s in spaces:
            s = as_dict(s)
            connected = bool(as_texts(s.get("connected_spaces")))
            if not connected and isinstance(s.get("connected_spaces"), list):
                nodes = topo.nodes_for(as_text(s.get("space_name")))
                connected = bool(nodes) and nodes <= topo.isolated
            filled = [
                bool(as_text(s.get("space_name"))),
                bool(as_text(s.get("space_type"))),
                as_number(s.get("area_ratio")) is not None,
                isinstance(s.get("has_window"), bool),
                bool(as_texts(s.get("features"))),
                connected,
                bool(as_text(s.get("evaluation_comment"))),
            ]
            per_space.append(sum(filled) / len(filled))
        spaces_part = sum(per_space) / len(per_space)
    else:
        spaces_part = 0.0

    design = as_dict(obj.get("design_evaluation"))
    design_part = sum(bool(as_text(design.get(k))) for k in _DESIGN_KEYS) / len(_DESIGN_KEYS)

    recs_part = 1.0 if as_texts(obj.get("recommendations")) or not ref_needs_recs else 0.0

    comp = obj.get("compliance")
    if isinstance(comp, dict):
        items = as_list(comp.get("non_compliant_items"))
        item_fill = (
            sum(sum(bool(as_text(as_dict(it).get(f))) for f in _ITEM_FIELDS) / 4 for it in items) / len(items)
            if items
            else 1.0
        )
        listed = bool(as_list(comp.get("compliant_items")) or items)
        comp_part = (
            bool(as_text(comp.get("overall_grade"))) + bool(as_text(comp.get("summary"))) + listed + item_fill
        ) / 4
    else:
        comp_part = 0.0
    return (top + spaces_part + design_part + recs_part + comp_part) / 5


def _space_count_accuracy(obj: dict, topo: _Topo) -> float:
    st = topo.st
    spaces = obj.get("spaces")
    listed = float(len(spaces)) if isinstance(spaces, list) else None
    parts = [
        _closeness(as_number(obj.get("total_spaces")), st.inside_space_count),
        _closeness(listed, st.inside_space_count),
        _closeness(as_number(obj.get("room_count")), st.room_count),
    ]
    return sum(parts) / 3


def _bay_count_consistency(obj: dict, topo: _Topo) -> float:
    bays = as_int(obj.get("bay_count"))
    return 0.0 if bays is None else 0.5 ** abs(bays - topo.st.bay_count)


def _failed_criteria(items: list) -> set[str]:
    out = set()
    for it in items:
        category = as_text(as_dict(it).get("category"))
        out.update(c for c in CRITERIA if c in category)
    return out


def _expected_grade(failed: int) -> str:
    return {0: "최우수", 1: "우수", 2: "보통"}.get(failed, "미흡")


def _compliance_reasoning(obj: dict) -> float:
    comp = obj.get("compliance")
    if not isinstance(comp, dict):
        return 0.0
    items = as_list(comp.get("non_compliant_items"))
    scores = []
    for it in items:
        it = as_dict(it)
        reason, rec = as_text(it.get("reason")), as_text(it.get("recommendation"))
        both = reason + " " + rec
        scores.append(
            (
                (char_count(reason) >= _REASON_MIN)
                + (char_count(rec) >= _REASON_MIN and _norm(rec) != _norm(reason))
                + (_has_digit(both) or _cites_term(both))
            )
            / 3
        )
    reasoning = sum(scores) / len(scores) if scores else 1.0

    grade = as_text(comp.get("overall_grade"))
    if grade == "불합격":
        consistency = 1.0 if items else 0.0
    elif grade in GRADE_ORDER:
        gap = abs(GRADE_ORDER.index(grade) - GRADE_ORDER.index(_expected_grade(len(_failed_criteria(items)))))
        consistency = {0: 1.0, 1: 0.5}.get(gap, 0.0)
    else:
        consistency = 0.0
    return (reasoning + consistency) / 2


def _analysis_depth(obj: dict) -> float:
    summary = as_text(obj.get("summary"))
    design = as_dict(obj.get("design_evaluation"))
    design_texts = [as_text(design.get(k)) for k in _DESIGN_KEYS]
    spaces = [as_dict(s) for s in as_list(obj.get("spaces"))]
    summary_part = min(1.0, char_count(summary) / _SUMMARY_TARGET)
    design_part = sum(min(1.0, char_count(t) / _DESIGN_TARGET) for t in design_texts) / 4
    comments = (
        sum(min(1.0, char_count(s.get("evaluation_comment")) / _COMMENT_TARGET) for s in spaces) / len(spaces)
        if spaces
        else 0.0
    )
    specificity = sum(_has_digit(t) for t in [summary, *design_texts]) / 5
    return (summary_part + design_part + comments + specificity) / 4


def _item_tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[\s()\[\]·,./:;-]+", name) if len(t) >= 2]


def _recommendation_quality(obj: dict, topo: _Topo, ref_needs_recs: bool) -> float:
    recs = as_texts(obj.get("recommendations"))
    items = [as_dict(it) for it in as_list(as_dict(obj.get("compliance")).get("non_compliant_items"))]
    if not recs:
        return 0.0 if (items or ref_needs_recs) else 1.0
    specific = sum(
        char_count(r) >= _RECOMMENDATION_MIN and (_has_digit(r) or _cites_term(r) or topo.names_a_space(r))
        for r in recs
    ) / len(recs)
    unique = len({_norm(r) for r in recs}) / len(recs)

    def addressed(item: dict) -> bool:
        item_rec = _norm(as_text(item.get("recommendation")))
        category = as_text(item.get("category"))
        cats = [c for c in CRITERIA if c in category]
        tokens = _item_tokens(as_text(item.get("item")))
        for r in recs:
            nr = _norm(r)
            if item_rec and (item_rec in nr or nr in item_rec):
                return True
            if any(c in r for c in cats) or any(t in r for t in tokens):
                return True
        return False

    coverage = sum(addressed(it) for it in items) / len(items) if items else 1.0
    return (1.0 + specific + unique + coverage) / 4


# ----------------------------------------------------------------------- the checks


def _free_texts(obj: dict) -> list[str]:
    out = [as_text(obj.get("summary"))]
    for s in as_list(obj.get("spaces")):
        s = as_dict(s)
        out.append(as_text(s.get("evaluation_comment")))
        out.extend(as_texts(s.get("features")))
    out.extend(as_text(v) for v in as_dict(obj.get("design_evaluation")).values())
    out.extend(as_texts(obj.get("recommendations")))
    comp = as_dict(obj.get("compliance"))
    out.append(as_text(comp.get("summary")))
    out.extend(as_texts(comp.get("compliant_items")))
    for it in as_list(comp.get("non_compliant_items")):
        out.extend(as_text(as_dict(it).get(f)) for f in _ITEM_FIELDS)
    return [t for t in out if t]


def korean_share(texts: Sequence[str]) -> float | None:
    """Share of Hangul among the letters of ``texts``; None when there are no letters."""
    letters = hangul = 0
    for t in texts:
        for c in t:
            if c.isalpha():
                letters += 1
                hangul += _is_hangul(c)
    return hangul / letters if letters else None


def _checks(obj: dict, topo: _Topo, reference: FloorPlanAnalysis) -> dict[str, float | None]:
    st = topo.st

    def equal(a: Any, b: Any) -> float:
        return float(a is not None and a == b)

    def near(a: float | None, b: float) -> float:
        return float(a is not None and abs(a - b) <= RATIO_TOLERANCE)

    spaces = [as_dict(s) for s in as_list(obj.get("spaces"))]
    named = [as_text(s.get("space_name")) for s in spaces]
    exist = [bool(topo.nodes_for(n)) for n in named]
    claimed = found = 0
    for s, name in zip(spaces, named, strict=True):
        here = topo.nodes_for(name)
        for other in as_texts(s.get("connected_spaces")):
            claimed += 1
            there = topo.nodes_for(other)
            found += any(frozenset((a, b)) in topo.edges for a in here for b in there if a != b)
    grade = as_text(as_dict(obj.get("compliance")).get("overall_grade")) or None
    ref_grade = reference.compliance.overall_grade if reference.compliance else None
    return {
        "structure_type_agreement": equal(as_text(obj.get("structure_type")), st.structure_type),
        "room_count_agreement": equal(as_int(obj.get("room_count")), st.room_count),
        "bathroom_count_agreement": equal(as_int(obj.get("bathroom_count")), st.bathroom_count),
        "bay_count_agreement": equal(as_int(obj.get("bay_count")), st.bay_count),
        "windowless_ratio_agreement": near(as_number(obj.get("windowless_ratio")), st.windowless_ratio),
        "balcony_ratio_agreement": near(as_number(obj.get("balcony_ratio")), st.balcony_ratio),
        "spaces_exist": sum(exist) / len(exist) if exist else None,
        "connections_exist": found / claimed if claimed else None,
        "grade_agreement": None if ref_grade is None else equal(grade, ref_grade),
        "korean_text": korean_share(_free_texts(obj)),
    }


def score_answer(
    raw: str | bytes | Mapping | FloorPlanAnalysis | None,
    graph: TopologyGraph,
    reference: FloorPlanAnalysis | None = None,
) -> AnswerScores:
    """Score one answer (its raw text as the teacher returned it; None when there is none) against
    the plan's topology and the rule-based reference answer (computed when not given)."""
    if raw is None:
        return _zero("missing", "no answer")
    if isinstance(raw, FloorPlanAnalysis):
        raw = raw.model_dump_json()
    if isinstance(raw, Mapping):
        obj: Any = dict(raw)
    else:
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            obj = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _zero("invalid_json", f"not JSON: {exc}"[:300])
    if not isinstance(obj, dict):
        return _zero("invalid_json", f"JSON {type(obj).__name__}, not an object")
    if reference is None:
        reference = reference_analysis(graph.image_info.file_name, graph)
    detail = None
    try:
        FloorPlanAnalysis.model_validate(obj)
        schema_ok = 1.0
    except ValidationError as exc:
        schema_ok = 0.0
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])[:500]
    topo = _Topo(graph)
    ref_needs_recs = bool(reference.compliance and reference.compliance.non_compliant_items)
    metrics = {
        "schema_compliance": schema_ok,
        "field_completeness": _field_completeness(obj, topo, ref_needs_recs),
        "space_count_accuracy": _space_count_accuracy(obj, topo),
        "bay_count_consistency": _bay_count_consistency(obj, topo),
        "compliance_reasoning": _compliance_reasoning(obj),
        "analysis_depth": _analysis_depth(obj),
        "recommendation_quality": _recommendation_quality(obj, topo, ref_needs_recs),
        "json_validity": 1.0,
    }
    return AnswerScores("ok" if schema_ok else "schema_invalid", metrics, _checks(obj, topo, reference), detail)
