"""Phase 4, the comparison: every teacher scored on a stratified sample, then the decision.

Decision: the higher weighted total wins; a gap under ``quality.tie_margin`` goes to the teacher
that is cheaper per valid (schema-compliant) answer, from the sidecars' cost_usd plus recorded
failed attempts; a teacher under ``quality.min_schema_compliance`` cannot win;
``quality.force_teacher`` overrides. No qualified teacher → ``NoQualifiedTeacher``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from floorplan_ft.quality.errors import QualityError
from floorplan_ft.quality.inputs import read_answer, read_failures, stratified_pick
from floorplan_ft.quality.lenient import as_number
from floorplan_ft.quality.metrics import CHECKS, METRICS, RATIO_TOLERANCE, AnswerScores, score_answer, weights_dict
from floorplan_ft.quality.report import QualityReport, format_usd
from floorplan_ft.quality.review import load_preferences, preference_summary
from floorplan_ft.sampling import group_key
from floorplan_ft.schemas import FloorPlanAnalysis
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.reference import reference_analysis

# Labeling outcomes that say nothing about a teacher's quality: the run stopped before the item.
SKIP_REASONS = frozenset({"budget", "auth"})


class NoQualifiedTeacher(QualityError):
    """No teacher passes the schema-compliance floor. ``report`` holds the full comparison."""

    def __init__(self, message: str, report: QualityReport):
        super().__init__(message)
        self.report = report
        self.result: Any = None  # the failed phase's PhaseResult, set by quality.phase.run


@dataclass
class Decision:
    winner: str | None
    rule: str  # forced | single_teacher | higher_total | tie_cheaper | none_qualified
    reason: str
    qualified: list[str] = field(default_factory=list)
    disqualified: dict[str, str] = field(default_factory=dict)
    automatic: dict[str, Any] | None = None  # the rule's own pick when forced


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
    costs = ", ".join(f"{t} {format_usd(cost_per_valid.get(t))}" for t in contenders)
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


def _cost_stats(store: ArtifactStore, stems: Sequence[str], teacher: str, failures: dict[str, dict]) -> dict[str, Any]:
    total = 0.0
    answers = valid = without_cost = 0
    for stem in stems:
        raw = read_answer(store, stem, teacher)
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
        cost = as_number(meta.get("cost_usd")) if isinstance(meta, dict) else None
        if cost is None:
            without_cost += 1
        else:
            total += cost
    stem_set = set(stems)
    failed_cost = sum(as_number(f.get("cost_usd")) or 0.0 for s, f in failures.items() if s in stem_set)
    ledger = None
    if store.exists(store.layout.cost_ledger(teacher)):
        try:
            ledger = as_number(store.read_json(store.layout.cost_ledger(teacher)).get("cost_usd"))
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
    weights = weights_dict(q.weights)
    pattern, prefix_len = settings.sampling.group_pattern, settings.sampling.group_prefix_len
    notes: list[str] = []
    stem_set = set(stems)

    failures = {t: read_failures(store, t) for t in teachers}
    answered = {t: {s for s in stems if store.exists(store.layout.analysis(s, t))} for t in teachers}
    teachers = _drop_unanswered(teachers, answered, len(stems), q.force_teacher, notes)
    eligible, excluded = _eligible_plans(store, stems, teachers, answered, failures)
    requested = q.sample_size
    if len(eligible) < requested:
        notes.append(
            f"only {len(eligible)} plans were labeled by all teachers (quality.sample_size={requested}): "
            "all of them are compared"
        )
    sample = stratified_pick(eligible, requested, q.seed, pattern, prefix_len)

    per_teacher, items, unscored = _score_sample(store, sample, teachers, failures, weights, pattern, prefix_len)
    if unscored:
        notes.append(f"{len(unscored)} sampled plans have an unreadable topology and were skipped: {unscored[:10]}")
        sample = [s for s in sample if s not in set(unscored)]
    if not sample:
        raise QualityError("no sampled plan has a readable topology graph (rerun step 1)")

    n = len(sample)
    idx = np.random.default_rng(q.seed).integers(0, n, size=(q.bootstrap_samples, n))
    stats: dict[str, dict[str, Any]] = {}
    weighted: dict[str, np.ndarray] = {}
    for t in teachers:
        stats[t], weighted[t] = _teacher_stats(per_teacher[t], weights, idx)
        stats[t]["cost"] = _cost_stats(store, stems, t, failures[t])
        stats[t]["labeling_failures"] = dict(
            Counter(f.get("reason", "unknown") for s, f in failures[t].items() if s in stem_set)
        )

    extras = _extra_teachers(teachers, settings)
    candidates = [t for t in teachers if t not in extras] or teachers
    decision = decide(
        {t: stats[t]["weighted_total"]["mean"] for t in candidates},
        {t: stats[t]["metrics"]["schema_compliance"]["mean"] for t in candidates},
        {t: stats[t]["cost"]["per_valid_item_usd"] for t in candidates},
        tie_margin=q.tie_margin,
        min_schema_compliance=q.min_schema_compliance,
        force_teacher=q.force_teacher,
    )
    pref_summary = _review_summary(store, decision, items, weights, notes)

    groups = Counter(group_key(s, pattern, prefix_len) for s in sample)
    report = QualityReport(
        teachers=teachers,
        settings=_report_settings(q, weights, extras, pattern, prefix_len),
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
        pairwise=_pairwise(teachers, weighted, idx),
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


def _drop_unanswered(
    teachers: list[str], answered: Mapping[str, set[str]], plans: int, force_teacher: str | None, notes: list[str]
) -> list[str]:
    """The teachers with at least one answer. A teacher without any is an error (its labeling
    step has not run) unless another teacher is forced: then it is left out with a note."""
    absent = [t for t in teachers if not answered[t]]
    if not absent:
        return teachers
    if force_teacher and force_teacher not in absent:
        notes.append(f"teachers without any answer left out of the comparison: {absent}")
        return [t for t in teachers if t not in absent]
    raise QualityError(
        f"teacher(s) {absent} have no answers for the {plans} sampled plans "
        f"(output/<stem>/llm_analysis_<teacher>.json): run their labeling step (3a/3b) first "
        f"(an extra teacher: `ft-pipeline import analyses`), or remove them from "
        f"teachers.teachers / quality.extra_teachers"
    )


def _eligible_plans(
    store: ArtifactStore,
    stems: Sequence[str],
    teachers: Sequence[str],
    answered: Mapping[str, set[str]],
    failures: Mapping[str, dict[str, dict]],
) -> tuple[list[str], Counter[str]]:
    """The plans with a topology that every teacher answered or failed for a reason of its own
    (not ``SKIP_REASONS``), and how many were excluded for which reason."""
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
    return eligible, excluded


def _score_sample(
    store: ArtifactStore,
    sample: Sequence[str],
    teachers: Sequence[str],
    failures: Mapping[str, dict[str, dict]],
    weights: Mapping[str, float],
    pattern: Any,
    prefix_len: int,
) -> tuple[dict[str, list[AnswerScores]], list[dict[str, Any]], list[str]]:
    """Every teacher's answer to every sampled plan scored against its topology and the reference:
    the scores per teacher, one report row per plan, and the plans whose topology is unreadable."""
    per_teacher: dict[str, list[AnswerScores]] = {t: [] for t in teachers}
    items: list[dict[str, Any]] = []
    unscored: list[str] = []
    for s in sample:
        graph = store.read_topology(s)
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
            sc = score_answer(read_answer(store, s, t), graph, ref)
            if sc.status == "missing":
                sc.detail = f"labeling failed: {failures[t].get(s, {}).get('reason', 'unknown')}"
            per_teacher[t].append(sc)
            row["teachers"][t] = sc.to_dict(weights)
        items.append(row)
    return per_teacher, items, unscored


def _teacher_stats(
    scores: Sequence[AnswerScores], weights: Mapping[str, float], idx: np.ndarray
) -> tuple[dict[str, Any], np.ndarray]:
    """One teacher's answer counts and its metrics, weighted total and checks with bootstrap
    intervals; also its weighted total per plan, for the pairwise gaps."""
    n = len(scores)
    m = np.array([[sc.metrics[k] for k in METRICS] for sc in scores], dtype=float)
    c = np.array([[np.nan if sc.checks[k] is None else sc.checks[k] for k in CHECKS] for sc in scores], dtype=float)
    w = m @ np.array([weights[k] for k in METRICS])
    statuses = Counter(sc.status for sc in scores)
    stats = {
        "n": n,
        "valid": statuses.get("ok", 0),
        "invalid": n - statuses.get("ok", 0),
        "invalid_reasons": {k: v for k, v in sorted(statuses.items()) if k != "ok"},
        "metrics": {k: _ci(m[:, i], idx) for i, k in enumerate(METRICS)},
        "weighted_total": _ci(w, idx),
        "checks": {k: _ci(c[:, i], idx) for i, k in enumerate(CHECKS)},
    }
    return stats, w


def _pairwise(teachers: Sequence[str], weighted: Mapping[str, np.ndarray], idx: np.ndarray) -> list[dict[str, Any]]:
    """The weighted-total gap of every pair of teachers, per plan, with its bootstrap interval."""
    return [
        {"a": a, "b": b, "gap_a_minus_b": _ci(weighted[a] - weighted[b], idx)}
        for i, a in enumerate(teachers)
        for b in teachers[i + 1 :]
    ]


def _extra_teachers(teachers: Sequence[str], settings: Any) -> list[str]:
    """The compared teachers that are extra (imported answer sets such as 'production'): scored
    beside the others but never selected, as nothing of theirs was labeled with this pipeline's prompt."""
    extra = set(getattr(settings.quality, "extra_teachers", None) or ())
    labeled = set(settings.teachers.teachers)
    return [t for t in teachers if t in extra and t not in labeled]


def _review_summary(
    store: ArtifactStore,
    decision: Decision,
    items: list[dict[str, Any]],
    weights: Mapping[str, float],
    notes: list[str],
) -> dict[str, Any] | None:
    """The human review (``review/preferences.json``) beside the decision; None when there is none.
    A note when the reviewers mostly preferred another answer than the winner's."""
    prefs = load_preferences(store)
    if not prefs:
        return None
    summary = preference_summary(prefs, decision.winner, {it["stem"]: it for it in items}, store, weights)
    if summary.get("winner_share") is not None and summary["winner_share"] < 0.5:
        notes.append(
            f"human reviewers preferred the automatic winner in only {summary['winner_share']:.0%} of "
            f"{summary['decisive']} decisive reviews: look at review/review.html before training"
        )
    return summary


def _report_settings(
    q: Any, weights: Mapping[str, float], extras: list[str], pattern: Any, prefix_len: int
) -> dict[str, Any]:
    """The settings the comparison ran with, as the report records them."""
    return {
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
    }
