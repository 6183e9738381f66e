"""Phase 4: compare the teachers' answers with evidence and pick one.

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

Decision: the higher weighted total wins; a gap under ``quality.tie_margin`` goes to the teacher
that is cheaper per valid (schema-compliant) answer, from the sidecars' cost_usd plus recorded
failed attempts; a teacher under ``quality.min_schema_compliance`` cannot win;
``quality.force_teacher`` overrides. No qualified teacher → ``NoQualifiedTeacher``.

Manual review: ``export_review_page`` writes ``review/review.html`` (blind side-by-side answers,
structured fields that disagree highlighted, a form whose choices download as JSON); the person
saves the file as ``review/preferences.json``; ``load_preferences`` validates it and
``compare_teachers`` reports it beside the decision (it does not change the decision).
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from pydantic import ValidationError

from floorplan_ft import vocab
from floorplan_ft.charts import chart_font
from floorplan_ft.criteria import CRITERIA
from floorplan_ft.sampling import allocate, group_key, stable_hash
from floorplan_ft.schemas import FloorPlanAnalysis, TopologyGraph
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.reference import reference_analysis

REPORT_FORMAT_VERSION = 1
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
# Labeling outcomes that say nothing about a teacher's quality: the run stopped before the item.
SKIP_REASONS = frozenset({"budget", "auth"})
PREFERENCES_FORMAT = "ftp-review-preferences/1"
NON_TEACHER_CHOICES = ("tie", "both_bad")

_SUMMARY_TARGET, _DESIGN_TARGET, _COMMENT_TARGET = 60, 25, 20
_REASON_MIN, _RECOMMENDATION_MIN = 10, 15


class QualityError(ValueError):
    """Phase 4 cannot proceed; the message says what to fix."""


class NoQualifiedTeacher(QualityError):
    """No teacher passes the schema-compliance floor. ``report`` holds the full comparison."""

    def __init__(self, message: str, report: QualityReport):
        super().__init__(message)
        self.report = report


class PreferencesError(QualityError):
    """The human preferences file is malformed; the message names the file."""


# =========================================================================== one answer


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
        w = _weights_dict(weights)
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


def _pct_or_unknown(value: float | None) -> str:
    return "미상" if value is None else f"{value:.1f}%"


def _weights_dict(weights: Mapping[str, float] | Any) -> dict[str, float]:
    w = dict(weights) if isinstance(weights, Mapping) else weights.model_dump()
    missing = [m for m in METRICS if m not in w]
    if missing:
        raise QualityError(f"quality.weights lacks {missing}")
    return {m: float(w[m]) for m in METRICS}


def _zero(status: str, detail: str | None) -> AnswerScores:
    return AnswerScores(status, {m: 0.0 for m in METRICS}, {c: 0.0 for c in CHECKS}, detail)


# ----------------------------------------------------------------------- lenient accessors


def _text(v: Any) -> str:
    return v.strip() if isinstance(v, str) else ""


def _chars(v: Any) -> int:
    return sum(1 for c in _text(v) if not c.isspace())


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _int(v: Any) -> int | None:
    n = _num(v)
    return int(n) if n is not None and float(n).is_integer() else None


def _list(v: Any) -> list:
    return v if isinstance(v, list) else []


def _dict(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def _texts(v: Any) -> list[str]:
    return [t for t in (_text(x) for x in _list(v)) if t]


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
    top = (sum(bool(_text(obj.get(k))) for k in _TOP_TEXT) + sum(_num(obj.get(k)) is not None for k in _TOP_NUM)) / 10

    spaces = _list(obj.get("spaces"))
    if spaces:
        per_space = []
        for s in spaces:
            s = _dict(s)
            connected = bool(_texts(s.get("connected_spaces")))
            if not connected and isinstance(s.get("connected_spaces"), list):
                nodes = topo.nodes_for(_text(s.get("space_name")))
                connected = bool(nodes) and nodes <= topo.isolated
            filled = [
                bool(_text(s.get("space_name"))),
                bool(_text(s.get("space_type"))),
                _num(s.get("area_ratio")) is not None,
                isinstance(s.get("has_window"), bool),
                bool(_texts(s.get("features"))),
                connected,
                bool(_text(s.get("evaluation_comment"))),
            ]
            per_space.append(sum(filled) / len(filled))
        spaces_part = sum(per_space) / len(per_space)
    else:
        spaces_part = 0.0

    design = _dict(obj.get("design_evaluation"))
    design_part = sum(bool(_text(design.get(k))) for k in _DESIGN_KEYS) / len(_DESIGN_KEYS)

    recs_part = 1.0 if _texts(obj.get("recommendations")) or not ref_needs_recs else 0.0

    comp = obj.get("compliance")
    if isinstance(comp, dict):
        items = _list(comp.get("non_compliant_items"))
        item_fill = (
            sum(sum(bool(_text(_dict(it).get(f))) for f in _ITEM_FIELDS) / 4 for it in items) / len(items)
            if items
            else 1.0
        )
        listed = bool(_list(comp.get("compliant_items")) or items)
        comp_part = (bool(_text(comp.get("overall_grade"))) + bool(_text(comp.get("summary"))) + listed + item_fill) / 4
    else:
        comp_part = 0.0
    return (top + spaces_part + design_part + recs_part + comp_part) / 5


def _space_count_accuracy(obj: dict, topo: _Topo) -> float:
    st = topo.st
    spaces = obj.get("spaces")
    listed = float(len(spaces)) if isinstance(spaces, list) else None
    parts = [
        _closeness(_num(obj.get("total_spaces")), st.inside_space_count),
        _closeness(listed, st.inside_space_count),
        _closeness(_num(obj.get("room_count")), st.room_count),
    ]
    return sum(parts) / 3


def _bay_count_consistency(obj: dict, topo: _Topo) -> float:
    bays = _int(obj.get("bay_count"))
    return 0.0 if bays is None else 0.5 ** abs(bays - topo.st.bay_count)


def _failed_criteria(items: list) -> set[str]:
    out = set()
    for it in items:
        category = _text(_dict(it).get("category"))
        out.update(c for c in CRITERIA if c in category)
    return out


def _expected_grade(failed: int) -> str:
    return {0: "최우수", 1: "우수", 2: "보통"}.get(failed, "미흡")


def _compliance_reasoning(obj: dict) -> float:
    comp = obj.get("compliance")
    if not isinstance(comp, dict):
        return 0.0
    items = _list(comp.get("non_compliant_items"))
    scores = []
    for it in items:
        it = _dict(it)
        reason, rec = _text(it.get("reason")), _text(it.get("recommendation"))
        both = reason + " " + rec
        scores.append(
            (
                (_chars(reason) >= _REASON_MIN)
                + (_chars(rec) >= _REASON_MIN and _norm(rec) != _norm(reason))
                + (_has_digit(both) or _cites_term(both))
            )
            / 3
        )
    reasoning = sum(scores) / len(scores) if scores else 1.0

    grade = _text(comp.get("overall_grade"))
    if grade == "불합격":
        consistency = 1.0 if items else 0.0
    elif grade in GRADE_ORDER:
        gap = abs(GRADE_ORDER.index(grade) - GRADE_ORDER.index(_expected_grade(len(_failed_criteria(items)))))
        consistency = {0: 1.0, 1: 0.5}.get(gap, 0.0)
    else:
        consistency = 0.0
    return (reasoning + consistency) / 2


def _analysis_depth(obj: dict) -> float:
    summary = _text(obj.get("summary"))
    design = _dict(obj.get("design_evaluation"))
    design_texts = [_text(design.get(k)) for k in _DESIGN_KEYS]
    spaces = [_dict(s) for s in _list(obj.get("spaces"))]
    summary_part = min(1.0, _chars(summary) / _SUMMARY_TARGET)
    design_part = sum(min(1.0, _chars(t) / _DESIGN_TARGET) for t in design_texts) / 4
    comments = (
        sum(min(1.0, _chars(s.get("evaluation_comment")) / _COMMENT_TARGET) for s in spaces) / len(spaces)
        if spaces
        else 0.0
    )
    specificity = sum(_has_digit(t) for t in [summary, *design_texts]) / 5
    return (summary_part + design_part + comments + specificity) / 4


def _item_tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[\s()\[\]·,./:;-]+", name) if len(t) >= 2]


def _recommendation_quality(obj: dict, topo: _Topo, ref_needs_recs: bool) -> float:
    recs = _texts(obj.get("recommendations"))
    items = [_dict(it) for it in _list(_dict(obj.get("compliance")).get("non_compliant_items"))]
    if not recs:
        return 0.0 if (items or ref_needs_recs) else 1.0
    specific = sum(
        _chars(r) >= _RECOMMENDATION_MIN and (_has_digit(r) or _cites_term(r) or topo.names_a_space(r)) for r in recs
    ) / len(recs)
    unique = len({_norm(r) for r in recs}) / len(recs)

    def addressed(item: dict) -> bool:
        item_rec = _norm(_text(item.get("recommendation")))
        category = _text(item.get("category"))
        cats = [c for c in CRITERIA if c in category]
        tokens = _item_tokens(_text(item.get("item")))
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
    out = [_text(obj.get("summary"))]
    for s in _list(obj.get("spaces")):
        s = _dict(s)
        out.append(_text(s.get("evaluation_comment")))
        out.extend(_texts(s.get("features")))
    out.extend(_text(v) for v in _dict(obj.get("design_evaluation")).values())
    out.extend(_texts(obj.get("recommendations")))
    comp = _dict(obj.get("compliance"))
    out.append(_text(comp.get("summary")))
    out.extend(_texts(comp.get("compliant_items")))
    for it in _list(comp.get("non_compliant_items")):
        out.extend(_text(_dict(it).get(f)) for f in _ITEM_FIELDS)
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

    spaces = [_dict(s) for s in _list(obj.get("spaces"))]
    named = [_text(s.get("space_name")) for s in spaces]
    exist = [bool(topo.nodes_for(n)) for n in named]
    claimed = found = 0
    for s, name in zip(spaces, named, strict=True):
        here = topo.nodes_for(name)
        for other in _texts(s.get("connected_spaces")):
            claimed += 1
            there = topo.nodes_for(other)
            found += any(frozenset((a, b)) in topo.edges for a in here for b in there if a != b)
    grade = _text(_dict(obj.get("compliance")).get("overall_grade")) or None
    ref_grade = reference.compliance.overall_grade if reference.compliance else None
    return {
        "structure_type_agreement": equal(_text(obj.get("structure_type")), st.structure_type),
        "room_count_agreement": equal(_int(obj.get("room_count")), st.room_count),
        "bathroom_count_agreement": equal(_int(obj.get("bathroom_count")), st.bathroom_count),
        "bay_count_agreement": equal(_int(obj.get("bay_count")), st.bay_count),
        "windowless_ratio_agreement": near(_num(obj.get("windowless_ratio")), st.windowless_ratio),
        "balcony_ratio_agreement": near(_num(obj.get("balcony_ratio")), st.balcony_ratio),
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


# =========================================================================== comparison


@dataclass
class Decision:
    winner: str | None
    rule: str  # forced | single_teacher | higher_total | tie_cheaper | none_qualified
    reason: str
    qualified: list[str] = field(default_factory=list)
    disqualified: dict[str, str] = field(default_factory=dict)
    automatic: dict[str, Any] | None = None  # the rule's own pick when forced


def _usd(v: float | None) -> str:
    return "unknown" if v is None else f"${v:.4f}"


def decide(
    totals: Mapping[str, float],
    schema_compliance: Mapping[str, float],
    cost_per_valid: Mapping[str, float | None],
    *,
    tie_margin: float,
    min_schema_compliance: float,
    force_teacher: str | None = None,
) -> Decision:
    """The winner rule, on per-teacher numbers (pure; ``compare_teachers`` feeds it)."""
    teachers = list(totals)
    disqualified = {
        t: f"schema compliance {schema_compliance[t]:.3f} < quality.min_schema_compliance {min_schema_compliance}"
        for t in teachers
        if schema_compliance[t] < min_schema_compliance - 1e-12
    }
    qualified = [t for t in teachers if t not in disqualified]

    def cost_key(t: str) -> float:
        c = cost_per_valid.get(t)
        return math.inf if c is None else c

    if force_teacher is not None:
        if force_teacher not in teachers:
            raise QualityError(f"quality.force_teacher={force_teacher!r} is not among the compared teachers {teachers}")
        auto = None
        if qualified:
            a = decide(
                totals,
                schema_compliance,
                cost_per_valid,
                tie_margin=tie_margin,
                min_schema_compliance=min_schema_compliance,
            )
            auto = {"winner": a.winner, "rule": a.rule, "reason": a.reason}
        note = f" (the automatic rule would pick {auto['winner']})" if auto and auto["winner"] != force_teacher else ""
        warn = f"; note: {disqualified[force_teacher]}" if force_teacher in disqualified else ""
        return Decision(
            force_teacher,
            "forced",
            f"forced by quality.force_teacher={force_teacher!r}{note}{warn}",
            qualified,
            disqualified,
            auto,
        )
    if not qualified:
        return Decision(
            None,
            "none_qualified",
            "no teacher qualifies: " + "; ".join(f"{t}: {r}" for t, r in disqualified.items()),
            qualified,
            disqualified,
        )
    ranked = sorted(qualified, key=lambda t: (-totals[t], cost_key(t), t))
    top = ranked[0]
    dq = "".join(f"; {t} cannot win ({r})" for t, r in disqualified.items())
    if len(ranked) == 1:
        lone = "the only teacher compared" if len(teachers) == 1 else "the only teacher that qualifies"
        return Decision(
            top, "single_teacher", f"{top} is {lone} (weighted total {totals[top]:.3f}){dq}", qualified, disqualified
        )
    contenders = [t for t in ranked if round(totals[top] - totals[t], 9) < tie_margin]
    if len(contenders) == 1:
        second = ranked[1]
        return Decision(
            top,
            "higher_total",
            f"{top} has the higher weighted total: {totals[top]:.3f} vs {second} {totals[second]:.3f} "
            f"(gap {totals[top] - totals[second]:.3f} ≥ tie margin {tie_margin}){dq}",
            qualified,
            disqualified,
        )
    cheapest = min(contenders, key=lambda t: (cost_key(t), -totals[t], t))
    others = [t for t in contenders if t != cheapest]
    gaps = ", ".join(f"{t} {totals[t]:.3f}" for t in contenders)
    costs = ", ".join(f"{t} {_usd(cost_per_valid.get(t))}" for t in contenders)
    if all(cost_key(o) == cost_key(cheapest) for o in others):
        why = f"equal cost per valid item ({costs}), so the higher total decides"
    else:
        why = f"{cheapest} is cheaper per valid item ({costs})"
    return Decision(
        cheapest,
        "tie_cheaper",
        f"weighted totals within the tie margin {tie_margin} ({gaps}): {why}{dq}",
        qualified,
        disqualified,
    )


@dataclass
class QualityReport:
    teachers: list[str]
    settings: dict[str, Any]
    sample: dict[str, Any]
    teacher_stats: dict[str, dict[str, Any]]
    pairwise: list[dict[str, Any]]
    decision: Decision
    preferences: dict[str, Any] | None
    items: list[dict[str, Any]]
    notes: list[str]
    created_at: str

    @property
    def winner(self) -> str | None:
        return self.decision.winner

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; floats rounded to 6 decimals (the decision used the exact values)."""
        return _rounded(
            {
                "format_version": REPORT_FORMAT_VERSION,
                "created_at": self.created_at,
                "teachers": self.teachers,
                "selected": self.decision.winner,
                "decision": asdict(self.decision),
                "settings": self.settings,
                "sample": self.sample,
                "metrics_order": list(METRICS),
                "checks_order": list(CHECKS),
                "teacher_stats": self.teacher_stats,
                "pairwise": self.pairwise,
                "preferences": self.preferences,
                "notes": self.notes,
                "items": self.items,
            }
        )


def _rounded(value: Any, digits: int = 6) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v, digits) for v in value]
    return value


def stratified_pick(stems: Sequence[str], n: int, seed: int, pattern: Any = None, prefix_len: int = 3) -> list[str]:
    """``n`` of ``stems`` allocated over complexes (largest remainder) and drawn per complex with
    ``default_rng(seed + crc32(complex))``, as the phase-0 sampler does. Sorted."""
    stems = sorted(set(stems))
    n = min(n, len(stems))
    groups: dict[str, list[str]] = {}
    for s in stems:
        groups.setdefault(group_key(s, pattern, prefix_len), []).append(s)
    alloc = allocate({g: len(m) for g, m in groups.items()}, n)
    out: list[str] = []
    for g in sorted(groups):
        if alloc[g]:
            rng = np.random.default_rng(seed + stable_hash(g))
            out.extend(groups[g][i] for i in rng.choice(len(groups[g]), size=alloc[g], replace=False))
    return sorted(out)


def _ci(values: np.ndarray, idx: np.ndarray) -> dict[str, float]:
    """Mean and percentile-bootstrap 95 % interval of ``values`` (NaN = not applicable)."""
    ok = ~np.isnan(values)
    if not ok.any():
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    mean = float(values[ok].mean())
    if ok.all():
        boot = values[idx].mean(axis=1)
    else:
        taken = values[idx]
        counts = (~np.isnan(taken)).sum(axis=1)
        sums = np.nansum(taken, axis=1)
        boot = sums[counts > 0] / counts[counts > 0]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    # Percentile rounding can land a hair outside [min, max] of the data; clamp to the data.
    lo, hi = max(float(lo), float(values[ok].min())), min(float(hi), float(values[ok].max()))
    return {"mean": mean, "ci_low": min(lo, mean), "ci_high": max(hi, mean), "n": int(ok.sum())}


def _read_failures(store: ArtifactStore, teacher: str) -> dict[str, dict]:
    path = store.layout.label_failures(teacher)
    if not store.exists(path):
        return {}
    data = store.read_json(path)
    return dict(data.get("failures", {})) if isinstance(data, dict) else {}


def _read_answer(store: ArtifactStore, stem: str, teacher: str) -> str | None:
    path = store.layout.analysis(stem, teacher)
    if not store.exists(path):
        return None
    try:
        return store.read_text(path)
    except UnicodeDecodeError:
        return "\ufffd"  # unreadable bytes score as invalid JSON


def _load_graph(store: ArtifactStore, stem: str) -> TopologyGraph | None:
    return store.read_topology(stem)


def _cost_stats(store: ArtifactStore, stems: Sequence[str], teacher: str, failures: dict[str, dict]) -> dict[str, Any]:
    total = 0.0
    answers = valid = without_cost = 0
    for stem in stems:
        raw = _read_answer(store, stem, teacher)
        if raw is None:
            continue
        answers += 1
        try:
            FloorPlanAnalysis.model_validate_json(raw)
            valid += 1
        except ValueError:
            pass
        mpath = store.layout.analysis_meta(stem, teacher)
        try:
            meta = store.read_json(mpath) if store.exists(mpath) else None
        except ValueError:
            meta = None
        cost = _num(meta.get("cost_usd")) if isinstance(meta, dict) else None
        if cost is None:
            without_cost += 1
        else:
            total += cost
    stem_set = set(stems)
    failed_cost = sum(_num(f.get("cost_usd")) or 0.0 for s, f in failures.items() if s in stem_set)
    ledger = None
    if store.exists(store.layout.cost_ledger(teacher)):
        try:
            ledger = _num(store.read_json(store.layout.cost_ledger(teacher)).get("cost_usd"))
        except (ValueError, AttributeError):
            ledger = None
    spent = total + failed_cost
    return {
        "answers": answers,
        "valid_answers": valid,
        "answers_without_cost": without_cost,
        "answers_usd": total,
        "failed_attempts_usd": failed_cost,
        "total_usd": spent,
        "per_valid_item_usd": spent / valid if valid else None,
        "ledger_usd": ledger,
    }


def compared_teachers(settings: Any) -> list[str]:
    """The teachers phase 4 compares: teachers.teachers (labeled in phase 3), then
    quality.extra_teachers (answer sets imported into the data root, compared, never selected)."""
    labeled = list(dict.fromkeys(settings.teachers.teachers))
    extra = getattr(settings.quality, "extra_teachers", None) or ()
    return labeled + [t for t in dict.fromkeys(extra) if t not in labeled]


def compare_teachers(
    store: ArtifactStore, stems: Sequence[str], teachers: Sequence[str], settings: Any
) -> QualityReport:
    """Score every teacher on a stratified sample of plans they were all asked to label and decide.

    A plan is eligible when its topology exists and every teacher either answered it or failed it
    for a reason other than the run stopping (``SKIP_REASONS``): a failed answer scores 0, so a
    teacher that fails often is not flattered by comparing only the plans it managed.
    Raises ``QualityError`` on unusable input and ``NoQualifiedTeacher`` (with ``.report``) when no
    teacher passes ``quality.min_schema_compliance``.
    """
    q = settings.quality
    teachers = list(dict.fromkeys(teachers))
    stems = list(dict.fromkeys(stems))
    if not teachers:
        raise QualityError("no teachers to compare (setting teachers.teachers is empty)")
    if not stems:
        raise QualityError("no plans to compare: the sample is empty (run step 0)")
    weights = _weights_dict(q.weights)
    pattern, prefix_len = settings.sampling.group_pattern, settings.sampling.group_prefix_len
    notes: list[str] = []
    stem_set = set(stems)

    failures = {t: _read_failures(store, t) for t in teachers}
    answered = {t: {s for s in stems if store.exists(store.layout.analysis(s, t))} for t in teachers}
    absent = [t for t in teachers if not answered[t]]
    if absent:
        if q.force_teacher and q.force_teacher not in absent:
            notes.append(f"teachers without any answer left out of the comparison: {absent}")
            teachers = [t for t in teachers if t not in absent]
        else:
            raise QualityError(
                f"teacher(s) {absent} have no answers for the {len(stems)} sampled plans "
                f"(output/<stem>/llm_analysis_<teacher>.json): run their labeling step (3a/3b) first "
                f"(an extra teacher: `ft-pipeline import analyses`), or remove them from "
                f"teachers.teachers / quality.extra_teachers"
            )

    excluded: Counter[str] = Counter()
    eligible = []
    for s in stems:
        if not store.exists(store.layout.topology(s)):
            excluded["no_topology"] += 1
            continue
        attempted = all(
            s in answered[t] or (s in failures[t] and failures[t][s].get("reason") not in SKIP_REASONS)
            for t in teachers
        )
        if not attempted:
            excluded["not_labeled_by_all"] += 1
            continue
        eligible.append(s)
    if not eligible:
        raise QualityError(
            f"no plan of {len(stems)} was labeled by all teachers {teachers} (excluded: {dict(excluded)}): "
            "finish the labeling steps first"
        )
    requested = q.sample_size
    if len(eligible) < requested:
        notes.append(
            f"only {len(eligible)} plans were labeled by all teachers (quality.sample_size={requested}): "
            "all of them are compared"
        )
    sample = stratified_pick(eligible, requested, q.seed, pattern, prefix_len)

    # ------------------------------------------------------------------ score
    per_teacher: dict[str, list[AnswerScores]] = {t: [] for t in teachers}
    items: list[dict[str, Any]] = []
    unscored: list[str] = []
    for s in sample:
        graph = _load_graph(store, s)
        if graph is None:
            unscored.append(s)
            continue
        ref = reference_analysis(graph.image_info.file_name, graph)
        row: dict[str, Any] = {
            "stem": s,
            "group": group_key(s, pattern, prefix_len),
            "reference_grade": ref.compliance.overall_grade if ref.compliance else None,
            "teachers": {},
        }
        for t in teachers:
            sc = score_answer(_read_answer(store, s, t), graph, ref)
            if sc.status == "missing":
                sc.detail = f"labeling failed: {failures[t].get(s, {}).get('reason', 'unknown')}"
            per_teacher[t].append(sc)
            row["teachers"][t] = sc.to_dict(weights)
        items.append(row)
    if unscored:
        notes.append(f"{len(unscored)} sampled plans have an unreadable topology and were skipped: {unscored[:10]}")
        sample = [s for s in sample if s not in set(unscored)]
    if not sample:
        raise QualityError("no sampled plan has a readable topology graph (rerun step 1)")

    n = len(sample)
    rng = np.random.default_rng(q.seed)
    idx = rng.integers(0, n, size=(q.bootstrap_samples, n))
    stats: dict[str, dict[str, Any]] = {}
    weighted: dict[str, np.ndarray] = {}
    for t in teachers:
        scores = per_teacher[t]
        m = np.array([[sc.metrics[k] for k in METRICS] for sc in scores], dtype=float)
        c = np.array([[np.nan if sc.checks[k] is None else sc.checks[k] for k in CHECKS] for sc in scores], dtype=float)
        w = m @ np.array([weights[k] for k in METRICS])
        weighted[t] = w
        statuses = Counter(sc.status for sc in scores)
        stats[t] = {
            "n": n,
            "valid": statuses.get("ok", 0),
            "invalid": n - statuses.get("ok", 0),
            "invalid_reasons": {k: v for k, v in sorted(statuses.items()) if k != "ok"},
            "metrics": {k: _ci(m[:, i], idx) for i, k in enumerate(METRICS)},
            "weighted_total": _ci(w, idx),
            "checks": {k: _ci(c[:, i], idx) for i, k in enumerate(CHECKS)},
            "cost": _cost_stats(store, stems, t, failures[t]),
            "labeling_failures": dict(
                Counter(f.get("reason", "unknown") for s, f in failures[t].items() if s in stem_set)
            ),
        }
    pairwise = []
    for i, a in enumerate(teachers):
        for b in teachers[i + 1 :]:
            gap = _ci(weighted[a] - weighted[b], idx)
            pairwise.append({"a": a, "b": b, "gap_a_minus_b": gap})

    # Extra teachers (imported answer sets such as 'production') are scored beside the others
    # but never selected: nothing of theirs was labeled with this pipeline's prompt.
    extras = [
        t
        for t in teachers
        if t in set(getattr(q, "extra_teachers", None) or ()) and t not in set(settings.teachers.teachers)
    ]
    candidates = [t for t in teachers if t not in extras] or teachers
    decision = decide(
        {t: stats[t]["weighted_total"]["mean"] for t in candidates},
        {t: stats[t]["metrics"]["schema_compliance"]["mean"] for t in candidates},
        {t: stats[t]["cost"]["per_valid_item_usd"] for t in candidates},
        tie_margin=q.tie_margin,
        min_schema_compliance=q.min_schema_compliance,
        force_teacher=q.force_teacher,
    )

    prefs = load_preferences(store)
    pref_summary = (
        _preference_summary(prefs, decision.winner, {it["stem"]: it for it in items}, store, weights) if prefs else None
    )
    if pref_summary and pref_summary.get("winner_share") is not None and pref_summary["winner_share"] < 0.5:
        notes.append(
            f"human reviewers preferred the automatic winner in only {pref_summary['winner_share']:.0%} of "
            f"{pref_summary['decisive']} decisive reviews: look at review/review.html before training"
        )

    groups = Counter(group_key(s, pattern, prefix_len) for s in sample)
    report = QualityReport(
        teachers=teachers,
        settings={
            "sample_size": q.sample_size,
            "seed": q.seed,
            "bootstrap_samples": q.bootstrap_samples,
            "tie_margin": q.tie_margin,
            "min_schema_compliance": q.min_schema_compliance,
            "force_teacher": q.force_teacher,
            "weights": weights,
            "extra_teachers": extras,
            "group_pattern": pattern,
            "group_prefix_len": prefix_len if pattern is None else None,
            "ratio_tolerance_pp": RATIO_TOLERANCE,
        },
        sample={
            "requested": requested,
            "plans_given": len(stems),
            "eligible": len(eligible),
            "used": n,
            "excluded": dict(excluded),
            "groups": dict(sorted(groups.items())),
            "stems": sample,
        },
        teacher_stats=stats,
        pairwise=pairwise,
        decision=decision,
        preferences=pref_summary,
        items=items,
        notes=notes,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    if decision.winner is None:
        raise NoQualifiedTeacher(
            f"no teacher can be selected: {decision.reason}. Fix the labels (see label_failures_<teacher>.json "
            "and quality_report.json), lower quality.min_schema_compliance, or set quality.force_teacher",
            report,
        )
    return report


# =========================================================================== outputs


def write_report(store: ArtifactStore, report: QualityReport) -> str:
    return store.write_json(store.layout.run_file("quality_report"), report.to_dict())


def write_selection(store: ArtifactStore, report: QualityReport) -> str:
    if not report.winner:
        raise QualityError("no teacher selected: nothing to write to selected_model.txt")
    return store.write_text(store.layout.run_file("selected_model"), report.winner + "\n")


def read_selection(store: ArtifactStore) -> str | None:
    """The teacher named in ``selected_model.txt``; None when the file does not exist."""
    path = store.layout.run_file("selected_model")
    if not store.exists(path):
        return None
    name = store.read_text(path).strip()
    if not name or len(name.splitlines()) != 1:
        raise QualityError(f"{path}: expected one teacher name, got {name!r}")
    return name


def write_outputs(store: ArtifactStore, report: QualityReport) -> dict[str, str]:
    """quality_report.json, selected_model.txt and the chart; returns their paths."""
    return {
        "quality_report": write_report(store, report),
        "selected_model": write_selection(store, report),
        "chart": write_chart(store, report),
    }


def _fmt_ci(s: Mapping[str, Any]) -> str:
    if s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def quality_markdown(report: QualityReport) -> str:
    """The phase-4 artifact: metrics with intervals, checks, cost and the decision with its reason."""
    ts, teachers = report.teacher_stats, report.teachers
    w = report.settings["weights"]
    head = "| | " + " | ".join(teachers) + " |\n|---|" + "---|" * len(teachers) + "\n"
    lines = [
        "## Phase 4: teacher comparison",
        "",
        f"**Selected: `{report.winner}`** ({report.decision.rule}): {report.decision.reason}",
        "",
        (
            f"Compared on {report.sample['used']} plans (stratified by complex, seed {report.settings['seed']}; "
            f"{report.sample['eligible']} labeled by all teachers). Mean [bootstrap 95% CI, "
            f"{report.settings['bootstrap_samples']} resamples]."
        ),
        "",
        "### Weighted metrics",
        "",
        head.rstrip("\n"),
    ]
    for m in METRICS:
        lines.append(f"| {m} ({w[m]:.2f}) | " + " | ".join(_fmt_ci(ts[t]["metrics"][m]) for t in teachers) + " |")
    lines.append(
        "| **weighted total** | " + " | ".join(f"**{_fmt_ci(ts[t]['weighted_total'])}**" for t in teachers) + " |"
    )
    lines.append(
        "| valid / invalid answers | "
        + " | ".join(
            f"{ts[t]['valid']} / {ts[t]['invalid']}" + (f" {ts[t]['invalid_reasons']}" if ts[t]["invalid"] else "")
            for t in teachers
        )
        + " |"
    )
    lines.append(
        "| cost per valid item | "
        + " | ".join(
            f"{_usd(ts[t]['cost']['per_valid_item_usd'])} (total {_usd(ts[t]['cost']['total_usd'])})" for t in teachers
        )
        + " |"
    )
    lines += ["", "### Checks against the topology and the rules (not in the weighted total)", "", head.rstrip("\n")]
    for c in CHECKS:
        lines.append(f"| {c} | " + " | ".join(_fmt_ci(ts[t]["checks"][c]) for t in teachers) + " |")
    if report.pairwise:
        lines += [
            "",
            "Weighted-total gaps: "
            + "; ".join(f"{p['a']} − {p['b']} = {_fmt_ci(p['gap_a_minus_b'])}" for p in report.pairwise),
        ]
    if report.decision.disqualified:
        lines += ["", "Cannot win: " + "; ".join(f"{t} ({r})" for t, r in report.decision.disqualified.items())]
    p = report.preferences
    if p:
        lines += [
            "",
            "### Human review",
            "",
            f"{p['reviewed']} plans reviewed; choices {p['counts']}; "
            + (
                f"the automatic winner was preferred in {p['winner_share']:.0%} of {p['decisive']} decisive reviews; "
                if p.get("winner_share") is not None
                else ""
            )
            + (
                f"agreement with the per-plan scores {p['agreement_with_scores']:.0%} "
                f"({p['compared_with_scores']} plans)."
                if p.get("agreement_with_scores") is not None
                else ""
            ),
        ]
    if report.notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- chart

_SHORT = {
    "schema_compliance": "schema",
    "field_completeness": "complete",
    "space_count_accuracy": "spaces",
    "bay_count_consistency": "bays",
    "compliance_reasoning": "reasoning",
    "analysis_depth": "depth",
    "recommendation_quality": "recs",
    "json_validity": "json",
    "weighted_total": "TOTAL",
}
_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]


def _chart_series(report: QualityReport) -> tuple[list[str], dict[str, list[tuple[float, float, float]]]]:
    keys = [*METRICS, "weighted_total"]
    series = {}
    for t in report.teachers:
        st = report.teacher_stats[t]
        vals = []
        for k in keys:
            s = st["weighted_total"] if k == "weighted_total" else st["metrics"][k]
            vals.append((s["mean"] or 0.0, s["ci_low"] or 0.0, s["ci_high"] or 0.0))
        series[t] = vals
    return keys, series


def chart_png(report: QualityReport) -> bytes:
    """PNG bar chart of the metrics per teacher with 95 % intervals. Matplotlib (Agg) when it is
    installed, else drawn with Pillow; neither needs a display."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return _chart_pillow(report)
    keys, series = _chart_series(report)
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    width = 0.8 / max(1, len(series))
    for i, (t, vals) in enumerate(series.items()):
        xs = np.arange(len(keys)) + (i - (len(series) - 1) / 2) * width
        means = np.array([v[0] for v in vals])
        err = np.array([[v[0] - v[1] for v in vals], [v[2] - v[0] for v in vals]]).clip(min=0)
        ax.bar(xs, means, width, yerr=err, capsize=2, label=t, color=_COLORS[i % len(_COLORS)])
    ax.set_xticks(np.arange(len(keys)), [_SHORT[k] for k in keys])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (0-1), 95% CI")
    ax.set_title(f"Teacher comparison on {report.sample['used']} plans - selected: {report.winner}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=max(1, len(series)), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _chart_pillow(report: QualityReport) -> bytes:
    from PIL import Image, ImageDraw

    keys, series = _chart_series(report)
    W, H, left, right, top, bottom = 1000, 460, 60, 20, 40, 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = chart_font(13)
    ph, pw = H - top - bottom, W - left - right

    def y(v: float) -> float:
        return top + ph * (1 - max(0.0, min(1.0, v)))

    for g in range(0, 11, 2):
        v = g / 10
        d.line([(left, y(v)), (W - right, y(v))], fill="#dddddd")
        d.text((8, y(v) - 7), f"{v:.1f}", fill="black", font=font)
    d.line([(left, top), (left, top + ph)], fill="black")
    d.line([(left, top + ph), (W - right, top + ph)], fill="black")
    slot = pw / len(keys)
    bw = slot * 0.8 / max(1, len(series))
    for i, (t, vals) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        for k, (mean, lo, hi) in enumerate(vals):
            x0 = left + k * slot + slot * 0.1 + i * bw
            d.rectangle([x0, y(mean), x0 + bw - 2, top + ph], fill=color)
            cx = x0 + (bw - 2) / 2
            d.line([(cx, y(hi)), (cx, y(lo))], fill="black", width=1)
            d.line([(cx - 3, y(hi)), (cx + 3, y(hi))], fill="black")
            d.line([(cx - 3, y(lo)), (cx + 3, y(lo))], fill="black")
        d.rectangle([left + 10 + i * 160, H - 22, left + 22 + i * 160, H - 10], fill=color)
        d.text((left + 28 + i * 160, H - 24), t, fill="black", font=font)
    for k, key in enumerate(keys):
        label = _SHORT[key]
        d.text(
            (left + (k + 0.5) * slot - d.textlength(label, font=font) / 2, top + ph + 8), label, fill="black", font=font
        )
    d.text(
        (left, 12),
        f"Teacher comparison on {report.sample['used']} plans (95% CI) - selected: {report.winner}",
        fill="black",
        font=font,
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_chart(store: ArtifactStore, report: QualityReport) -> str:
    return store.write_bytes(store.layout.quality_chart(), chart_png(report))


# =========================================================================== manual review


_REVIEW_FIELDS: tuple[tuple[str, str], ...] = (
    ("structure_type", "구조 유형"),
    ("bay_count", "베이 수"),
    ("total_spaces", "내부 공간 수"),
    ("room_count", "침실 수"),
    ("bathroom_count", "화장실 수"),
    ("balcony_ratio", "발코니 비율 %"),
    ("windowless_ratio", "무창실 비율 %"),
    ("ventilation_quality", "환기 품질"),
    ("overall_grade", "종합 등급"),
    ("spaces", "공간 목록"),
    ("non_compliant", "부적합 항목"),
    ("recommendation_count", "개선 제안 수"),
)
_TEXT_FIELDS: tuple[tuple[str, str], ...] = (
    ("summary", "요약"),
    ("채광", "채광"),
    ("환기", "환기"),
    ("가족융화", "가족융화"),
    ("수납", "수납"),
    ("recommendations", "개선 제안"),
    ("compliance_summary", "기준 종합"),
)


def _review_values(raw: str | None) -> tuple[dict[str, Any], str | None]:
    """Comparable field values of one answer (structured and text), or an error text."""
    if raw is None:
        return {}, "no answer"
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        return {}, f"not JSON: {exc}"
    if not isinstance(obj, dict):
        return {}, "not a JSON object"
    comp = _dict(obj.get("compliance"))
    design = _dict(obj.get("design_evaluation"))
    vals: dict[str, Any] = {
        k: obj.get(k)
        for k in (
            "structure_type",
            "bay_count",
            "total_spaces",
            "room_count",
            "bathroom_count",
            "balcony_ratio",
            "windowless_ratio",
            "ventilation_quality",
        )
    }
    vals["overall_grade"] = comp.get("overall_grade")
    vals["spaces"] = sorted(_text(_dict(s).get("space_name")) for s in _list(obj.get("spaces")))
    vals["non_compliant"] = sorted(
        f"{_text(_dict(i).get('category'))}: {_text(_dict(i).get('item'))}"
        for i in _list(comp.get("non_compliant_items"))
    )
    recs = _texts(obj.get("recommendations"))
    vals["recommendation_count"] = len(recs)
    vals["summary"] = _text(obj.get("summary"))
    for k in CRITERIA:
        vals[k] = _text(design.get(k))
    vals["recommendations"] = recs
    vals["compliance_summary"] = _text(comp.get("summary"))
    try:
        FloorPlanAnalysis.model_validate(obj)
        err = None
    except ValidationError as exc:
        err = f"schema: {exc.errors()[0]['loc']} {exc.errors()[0]['msg']}"
    return vals, err


def _same(a: Any, b: Any) -> bool:
    if (
        isinstance(a, float | int)
        and isinstance(b, float | int)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return abs(a - b) < 0.05
    return a == b


def _topology_truth(graph: TopologyGraph, ref: FloorPlanAnalysis) -> dict[str, Any]:
    st = graph.statistics
    return {
        "structure_type": st.structure_type,
        "bay_count": st.bay_count,
        "total_spaces": st.inside_space_count,
        "room_count": st.room_count,
        "bathroom_count": st.bathroom_count,
        "balcony_ratio": st.balcony_ratio,
        "windowless_ratio": st.windowless_ratio,
        "overall_grade": ref.compliance.overall_grade if ref.compliance else None,
        "spaces": sorted(s.space_name for s in ref.spaces),
    }


def _cell(v: Any) -> str:
    if isinstance(v, list):
        return "<br>".join(html.escape(str(x)) for x in v) if v else "<i>(none)</i>"
    if v is None or v == "":
        return "<i>(none)</i>"
    return html.escape(str(v))


_PAGE_CSS = """
body{font-family:system-ui,'Noto Sans KR','Malgun Gothic',sans-serif;margin:1.5em;max-width:1400px}
table{border-collapse:collapse;width:100%;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 6px;
vertical-align:top;text-align:left;font-size:14px}th{background:#f3f3f3}tr.diff td{background:#fff3b0}
td.off{color:#b00020;font-weight:600}section.plan{border-top:3px solid #333;margin-top:2em;padding-top:.5em}
.err{color:#b00020}.topo{font-size:13px;color:#333}fieldset{margin:.5em 0}#bar{position:sticky;top:0;
background:#fff;padding:.5em 0;border-bottom:1px solid #ccc}
"""

_PAGE_JS = """
const KEY='ftp-review:'+document.body.dataset.pageId;
function collect(){const prefs={},notes={};
 document.querySelectorAll('section.plan').forEach(s=>{const stem=s.dataset.stem;
  const c=s.querySelector('input[type=radio]:checked');if(c)prefs[stem]=c.value;
  const n=s.querySelector('textarea').value.trim();if(n)notes[stem]=n;});
 return {format:document.body.dataset.format,created_at:new Date().toISOString(),
  reviewer:document.getElementById('reviewer').value.trim()||null,
  teachers:JSON.parse(document.body.dataset.teachers),plans:JSON.parse(document.body.dataset.plans),
  preferences:prefs,notes:notes};}
function save(){const d=collect();localStorage.setItem(KEY,JSON.stringify(d));
 document.getElementById('count').textContent=Object.keys(d.preferences).length;}
function restore(){const raw=localStorage.getItem(KEY);if(!raw)return;const d=JSON.parse(raw);
 document.getElementById('reviewer').value=d.reviewer||'';
 document.querySelectorAll('section.plan').forEach(s=>{const stem=s.dataset.stem;
  s.querySelectorAll('input[type=radio]').forEach(r=>{r.checked=(d.preferences[stem]===r.value);});
  s.querySelector('textarea').value=(d.notes&&d.notes[stem])||'';});save();}
function download(){const blob=new Blob([JSON.stringify(collect(),null,1)],{type:'application/json'});
 const a=document.createElement('a');a.href=URL.createObjectURL(blob);a.download='preferences.json';
 document.body.appendChild(a);a.click();a.remove();}
document.addEventListener('change',save);document.addEventListener('input',save);
document.getElementById('download').addEventListener('click',download);restore();
"""


def export_review_page(
    store: ArtifactStore,
    stems: Sequence[str],
    teachers: Sequence[str],
    n: int,
    *,
    seed: int = 42,
    group_pattern: Any = None,
    group_prefix_len: int = 3,
) -> str:
    """Write ``review/review.html``: ``n`` plans (stratified by complex, seeded) answered by every
    teacher, side by side and blind (columns A, B … in a per-plan random order), structured fields
    that disagree between the answers highlighted and values that contradict the topology in red.
    A radio choice per plan (a teacher, tie or both bad) and a note are kept in the browser and
    downloaded as ``preferences.json``, to be saved as ``review/preferences.json``."""
    teachers = list(dict.fromkeys(teachers))
    if not teachers:
        raise QualityError("export_review_page: no teachers given")
    candidates = [
        s
        for s in stems
        if store.exists(store.layout.topology(s)) and all(store.exists(store.layout.analysis(s, t)) for t in teachers)
    ]
    if not candidates:
        raise QualityError(f"no plan has a topology and an answer from every teacher {teachers}: nothing to review")
    plans = stratified_pick(candidates, max(1, n), seed, group_pattern, group_prefix_len)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    sections = []
    for p_i, stem in enumerate(plans):
        graph = _load_graph(store, stem)
        if graph is None:
            continue
        ref = reference_analysis(graph.image_info.file_name, graph)
        truth = _topology_truth(graph, ref)
        order = list(teachers)
        np.random.default_rng(seed + stable_hash(stem)).shuffle(order)
        answers = {t: _review_values(_read_answer(store, stem, t)) for t in order}
        st = graph.statistics
        labels = ", ".join(html.escape(nd.label) + (" (외부)" if nd.is_outside else "") for nd in graph.nodes)
        topo = (
            f"<p class='topo'><b>위상 그래프</b>: {html.escape(st.structure_type)}, {st.bay_count}베이, "
            f"내부 공간 {st.inside_space_count}, 침실 {st.room_count}, 화장실 {st.bathroom_count}, "
            f"발코니 {st.balcony_count} · 무창실 {st.windowless_ratio:.1f}%, 발코니 비율 {st.balcony_ratio:.1f}%, "
            f"LDK {_pct_or_unknown(st.ldk_ratio)}, 수납 {_pct_or_unknown(st.storage_ratio)} · 연결 {len(graph.edges)}개 · "
            f"규칙 기반 등급 <b>{html.escape(str(truth['overall_grade']))}</b><br>공간: {labels}</p>"
        )
        head = (
            "<tr><th>항목</th><th>위상 그래프</th>"
            + "".join(f"<th>답변 {letters[i]}</th>" for i in range(len(order)))
            + "</tr>"
        )
        rows = []
        errs = "".join(
            f"<p class='err'>답변 {letters[i]}: {html.escape(answers[t][1])}</p>"
            for i, t in enumerate(order)
            if answers[t][1]
        )
        for key, title in _REVIEW_FIELDS:
            vals = [answers[t][0].get(key) for t in order]
            differ = any(not _same(vals[0], v) for v in vals[1:])
            cells = []
            for v in vals:
                off = key in truth and v is not None and not _same(v, truth[key])
                cells.append(
                    f"<td class='off' title='위상 그래프와 다름'>{_cell(v)}</td>" if off else f"<td>{_cell(v)}</td>"
                )
            rows.append(
                f"<tr class='{'diff' if differ else 'same'}' data-field='{key}'><th>{title}</th>"
                f"<td>{_cell(truth.get(key, ''))}</td>{''.join(cells)}</tr>"
            )
        for key, title in _TEXT_FIELDS:
            vals = [answers[t][0].get(key) for t in order]
            rows.append(
                f"<tr class='text' data-field='{key}'><th>{title}</th><td></td>"
                + "".join(f"<td>{_cell(v)}</td>" for v in vals)
                + "</tr>"
            )
        sid = f"p{p_i}"
        radios = "".join(
            f"<label><input type='radio' name='{sid}' value='{html.escape(t, quote=True)}'> 답변 {letters[i]}</label> "
            for i, t in enumerate(order)
        ) + (
            f"<label><input type='radio' name='{sid}' value='tie'> 비슷함</label> "
            f"<label><input type='radio' name='{sid}' value='both_bad'> 둘 다 부족</label>"
        )
        sections.append(
            f"<section class='plan' data-stem='{html.escape(stem, quote=True)}'><h2>{p_i + 1}. {html.escape(stem)}</h2>"
            f"{topo}{errs}<table>{head}{''.join(rows)}</table>"
            f"<fieldset><legend>어느 답변이 더 좋습니까?</legend>{radios}<br>"
            f"<textarea rows='2' cols='100' placeholder='메모 (선택)'></textarea></fieldset></section>"
        )
    page_id = f"{stable_hash(json.dumps([plans, teachers], ensure_ascii=False)):08x}"
    doc = (
        "<!DOCTYPE html><html lang='ko'><head><meta charset='utf-8'><title>Teacher review</title>"
        f"<style>{_PAGE_CSS}</style></head>"
        f"<body data-page-id='{page_id}' data-format='{PREFERENCES_FORMAT}' "
        f"data-teachers='{html.escape(json.dumps(teachers, ensure_ascii=False), quote=True)}' "
        f"data-plans='{html.escape(json.dumps(plans, ensure_ascii=False), quote=True)}'>"
        "<h1>Teacher answers: side-by-side review</h1>"
        "<p>Answers are shown blind (A, B … in a random order per plan). Highlighted rows: the answers "
        "disagree; red values: they contradict the topology graph. Choose the better answer per plan, then "
        "press <b>Download preferences JSON</b> and save the file as <code>review/preferences.json</code> "
        "under the data root; the next phase-4 run reports it. Choices are kept in this browser meanwhile.</p>"
        "<div id='bar'>Reviewer: <input id='reviewer' size='20'> · chosen: <span id='count'>0</span>/"
        f"{len(sections)} · <button id='download' type='button'>Download preferences JSON</button></div>"
        + "".join(sections)
        + f"<script>{_PAGE_JS}</script></body></html>\n"
    )
    return store.write_text(store.layout.review_page(), doc)


def load_preferences(store: ArtifactStore) -> dict[str, Any]:
    """The validated ``review/preferences.json``; {} when there is none. Raises
    ``PreferencesError`` naming the file when it is malformed."""
    path = store.layout.review_preferences()
    if not store.exists(path):
        return {}
    try:
        data = json.loads(store.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PreferencesError(f"{path}: not valid JSON ({exc})") from None

    def bad(msg: str) -> PreferencesError:
        return PreferencesError(f"{path}: {msg} (download it again from review/review.html)")

    if not isinstance(data, dict):
        raise bad("expected a JSON object")
    teachers = data.get("teachers")
    if not isinstance(teachers, list) or not teachers or not all(isinstance(t, str) and t for t in teachers):
        raise bad("'teachers' must be a non-empty list of teacher names")
    prefs = data.get("preferences")
    if not isinstance(prefs, dict):
        raise bad("'preferences' must be an object {plan stem: choice}")
    allowed = set(teachers) | set(NON_TEACHER_CHOICES)
    for stem, choice in prefs.items():
        if not isinstance(choice, str) or choice not in allowed:
            raise bad(f"plan {stem!r}: choice {choice!r} is not one of {sorted(allowed)}")
    notes = data.get("notes") or {}
    if not isinstance(notes, dict) or not all(isinstance(v, str) for v in notes.values()):
        raise bad("'notes' must be an object {plan stem: text}")
    reviewer = data.get("reviewer")
    if reviewer is not None and not isinstance(reviewer, str):
        raise bad("'reviewer' must be a string")
    return {
        "path": path,
        "reviewer": reviewer,
        "teachers": list(teachers),
        "preferences": dict(prefs),
        "notes": dict(notes),
    }


def _preference_summary(
    prefs: dict[str, Any],
    winner: str | None,
    scored: dict[str, dict],
    store: ArtifactStore,
    weights: Mapping[str, float],
) -> dict[str, Any]:
    choices = prefs["preferences"]
    counts = Counter(choices.values())
    decisive = {s: c for s, c in choices.items() if c not in NON_TEACHER_CHOICES}
    winner_share = (sum(c == winner for c in decisive.values()) / len(decisive)) if decisive and winner else None
    agree = compared = 0
    for stem, choice in choices.items():
        row = scored.get(stem)
        if row is None:  # reviewed but not in the sample: score it now
            graph = _load_graph(store, stem)
            if graph is None:
                continue
            ref = reference_analysis(graph.image_info.file_name, graph)
            row = {
                "teachers": {
                    t: score_answer(_read_answer(store, stem, t), graph, ref).to_dict(weights)
                    for t in prefs["teachers"]
                }
            }
        w = {t: v["weighted"] for t, v in row["teachers"].items() if t in prefs["teachers"]}
        if len(w) < 2:
            continue
        best = max(w.values())
        top = [t for t, v in w.items() if best - v < 1e-9]
        auto = top[0] if len(top) == 1 else "tie"
        compared += 1
        agree += (choice == auto) or (choice == "both_bad" and best < 0.5)
    return {
        "path": prefs["path"],
        "reviewer": prefs["reviewer"],
        "reviewed": len(choices),
        "counts": dict(sorted(counts.items())),
        "decisive": len(decisive),
        "winner": winner,
        "winner_share": winner_share,
        "compared_with_scores": compared,
        "agreement_with_scores": agree / compared if compared else None,
        "notes": prefs["notes"],
    }
