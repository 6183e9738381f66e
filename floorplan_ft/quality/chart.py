"""The phase-4 chart: the metrics per teacher with their 95 % intervals, as a PNG."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

from floorplan_ft.charts import chart_font
from floorplan_ft.quality.metrics import METRICS
from floorplan_ft.store import ArtifactStore

if TYPE_CHECKING:
    from floorplan_ft.quality.report import QualityReport

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
