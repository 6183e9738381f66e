"""The phase-4 report: the QualityReport, its markdown, and the files it leaves (report, selection, chart)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from floorplan_ft.quality.chart import write_chart
from floorplan_ft.quality.errors import QualityError
from floorplan_ft.quality.metrics import CHECKS, METRICS
from floorplan_ft.store import ArtifactStore

if TYPE_CHECKING:
    from floorplan_ft.quality.compare import Decision

REPORT_FORMAT_VERSION = 1


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


def format_usd(v: float | None) -> str:
    return "unknown" if v is None else f"${v:.4f}"


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
            f"{format_usd(ts[t]['cost']['per_valid_item_usd'])} (total {format_usd(ts[t]['cost']['total_usd'])})"
            for t in teachers
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
