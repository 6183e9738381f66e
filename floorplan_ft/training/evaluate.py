"""Phase 6b: the student against the teacher on the validation rows.

For every val row the student answers the row's own prompt (system + user turns) through
``LocalChatClient`` with schema-constrained decoding (or, with ``finetune.eval_base_url``, through
the OpenAI-compatible server, e.g. vLLM, that serves it: the latency is then the serving latency); the answer is scored with phase 4's metrics
and checks (``quality.score_answer``) against the plan's topology and the rule-based reference, and
compared with the teacher's answer (the row's assistant turn):

schema compliance
    share of answers that validate as ``FloorPlanAnalysis`` (target ``quality.min_schema_compliance``,
    0.95). A cut-off or unparseable answer counts as non-compliant.
quality relative to the teacher
    mean weighted score (``quality.weights``) of the student / the same for the teacher's answers on
    the same rows. The plan expects 0.70-0.80 for a ~2.4B student and 0.85-0.95 for 7.8B-8B.
field agreement
    exact-match share over the scalar fields (``SCALAR_FIELDS``; floats within 0.05) and ROUGE-L F1
    over the text fields (``TEXT_FIELDS``), at character level with whitespace removed (Korean has
    no reliable word boundaries for this); a field missing on one side scores 0, on both sides it
    is skipped.
latency
    wall time per answer (p50, p95, against the 30-second target) and output tokens per second.

Writes ``{student}/eval_report.json``; ``EvalReport.markdown()`` is the summary artifact.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from floorplan_ft.dataset import read_rows
from floorplan_ft.quality import CHECKS, METRICS, score_answer
from floorplan_ft.schemas import FloorPlanAnalysis, TopologyGraph
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.reference import reference_analysis
from floorplan_ft.training.config import TrainConfig

REPORT_FORMAT_VERSION = 1
LATENCY_TARGET_S = 30.0
COMPLIANCE_TARGET = 0.95
SCALAR_FIELDS: tuple[str, ...] = (
    "image_name",
    "structure_type",
    "bay_count",
    "total_spaces",
    "room_count",
    "bathroom_count",
    "balcony_ratio",
    "windowless_ratio",
    "ventilation_quality",
    "compliance.overall_grade",
)
TEXT_FIELDS: tuple[str, ...] = (
    "summary",
    "design_evaluation.채광",
    "design_evaluation.환기",
    "design_evaluation.가족융화",
    "design_evaluation.수납",
    "recommendations",
    "compliance.summary",
)
FLOAT_TOLERANCE = 0.05
# (largest parameter count, expected student/teacher quality band, what the plan said)
EXPECTED_BANDS: tuple[tuple[float, tuple[float, float], str], ...] = (
    (1.0e9, (0.0, 1.0), "no expectation for a model under 1B parameters"),
    (4.0e9, (0.70, 0.80), "the plan expects 70-80% of the teacher for a ~2.4B student"),
    (10.0e9, (0.85, 0.95), "the plan expects 85-95% of the teacher for a 7.8B-8B student"),
)


# ============================================================================= text metrics


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    if len(b) > len(a):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 at character level, whitespace ignored (1.0 for two empty texts)."""
    c = [ch for ch in candidate if not ch.isspace()]
    r = [ch for ch in reference if not ch.isspace()]
    if not c and not r:
        return 1.0
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _as_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v.strip() or None
    if isinstance(v, list):
        texts = [x.strip() for x in v if isinstance(x, str) and x.strip()]
        return "\n".join(texts) or None
    return None


def _same_scalar(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(float(a) - float(b)) <= FLOAT_TOLERANCE
    return a == b


def field_agreement(student: Any, teacher: Any) -> dict[str, Any]:
    """Scalar exact matches and text ROUGE-L between two answers (dicts; anything else: no fields)."""
    s = student if isinstance(student, dict) else {}
    t = teacher if isinstance(teacher, dict) else {}
    scalars = {
        f: float(_same_scalar(_get(s, f), _get(t, f))) if _get(t, f) is not None or _get(s, f) is not None else None
        for f in SCALAR_FIELDS
    }
    texts: dict[str, float | None] = {}
    for f in TEXT_FIELDS:
        a, b = _as_text(_get(s, f)), _as_text(_get(t, f))
        texts[f] = None if a is None and b is None else (rouge_l(a or "", b or "") if a and b else 0.0)
    sv = [v for v in scalars.values() if v is not None]
    tv = [v for v in texts.values() if v is not None]
    return {
        "scalar_exact_match": float(np.mean(sv)) if sv else None,
        "rouge_l": float(np.mean(tv)) if tv else None,
        "scalars": scalars,
        "texts": {k: (None if v is None else round(v, 4)) for k, v in texts.items()},
    }


# ============================================================================= report


@dataclass
class EvalReport:
    model_dir: str
    base_model: str | None
    params: int | None
    device: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    created_at: str = ""
    path: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": REPORT_FORMAT_VERSION,
            "created_at": self.created_at,
            "model_dir": self.model_dir,
            "base_model": self.base_model,
            "params": self.params,
            "device": self.device,
            "summary": self.summary,
            "warnings": self.warnings,
            "rows": self.rows,
        }

    def markdown(self) -> str:
        s = self.summary

        def pct(v: float | None) -> str:
            return "—" if v is None else f"{v:.1%}"

        def num(v: float | None, fmt: str = "{:.3f}") -> str:
            return "—" if v is None else fmt.format(v)

        def mark(ok: bool | None) -> str:
            return "" if ok is None else (" ✅" if ok else " ❌")

        q, lat = s["quality"], s["latency"]
        band = q.get("expected_band")
        lines = [
            "## Phase 6: student evaluation",
            "",
            (
                f"Student `{self.model_dir}` (base `{self.base_model}`) on {s['rows']} validation plans · "
                f"device {self.device.get('kind')} ({self.device.get('name')})"
            ),
            "",
            "| measure | student | target / teacher |",
            "|---|---|---|",
            (
                f"| schema compliance | {pct(s['schema_compliance'])}{mark(s['meets_compliance_target'])} | "
                f"≥ {pct(s['compliance_target'])} |"
            ),
            f"| JSON validity | {pct(s['json_validity'])} | |",
            f"| weighted quality | {num(q['student'])} | teacher {num(q['teacher'])} |",
            f"| quality relative to the teacher | {pct(q['ratio'])}{mark(q.get('meets_expected_band'))} | "
            + (f"{pct(band[0])}–{pct(band[1])} expected" if band else "—")
            + " |",
            f"| scalar fields equal to the teacher's | {pct(s['field_agreement']['scalar_exact_match'])} | |",
            f"| ROUGE-L (char) on text fields | {num(s['field_agreement']['rouge_l'])} | |",
            (
                f"| latency p50 / p95 | {num(lat['p50_s'], '{:.2f}')} / {num(lat['p95_s'], '{:.2f}')} s"
                f"{mark(lat['meets_target'])} | ≤ {lat['target_s']:.0f} s |"
            ),
            f"| output tokens / s | {num(lat['tokens_per_s'], '{:.1f}')} | |",
        ]
        if q.get("note"):
            lines += ["", q["note"]]
        errors = s.get("errors") or {}
        if errors:
            lines += ["", "Failures: " + ", ".join(f"{k} {v}" for k, v in errors.items())]
        if self.warnings:
            lines += ["", "Warnings:"] + [f"- {w}" for w in self.warnings]
        return "\n".join(lines) + "\n"


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.array(values, dtype=float), q)) if values else None


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def describe_device(kind: str | None) -> dict[str, Any]:
    import os

    import torch

    if kind == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {
            "kind": "cuda",
            "name": props.name,
            "memory_gib": round(props.total_memory / 1024**3, 1),
            "torch": torch.__version__,
        }
    from floorplan_ft.training.memory import cpu_name

    return {
        "kind": "cpu",
        "name": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "torch": torch.__version__,
    }


def _base_of(model_dir: Path) -> str | None:
    adapter = model_dir / "adapter_config.json"
    if adapter.is_file():
        return json.loads(adapter.read_text()).get("base_model_name_or_path")
    merged = model_dir / "merged_from.json"
    if merged.is_file():
        return json.loads(merged.read_text()).get("base_model")
    return str(model_dir) if (model_dir / "config.json").is_file() else None


def _params_of(base: str | None) -> int | None:
    if not base:
        return None
    from floorplan_ft.training.memory import model_shape

    try:
        return model_shape(base).params
    except ValueError:
        return None


def expected_band(params: int | None) -> tuple[tuple[float, float] | None, str | None]:
    if params is None:
        return None, None
    for limit, band, note in EXPECTED_BANDS:
        if params <= limit:
            return (None, note) if band == (0.0, 1.0) else (band, note)
    return None, "no expectation from the plan for a model over 10B parameters"


def _load_graph(store: ArtifactStore, stem: str) -> TopologyGraph | None:
    return store.read_topology(stem)


def _rows_to_evaluate(
    store: ArtifactStore,
    config: TrainConfig,
    rows: Sequence[dict[str, Any]] | None,
    stems: Sequence[str] | None,
    limit: int | None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The val rows (default: val.jsonl) with their stems (default: from stats_report.json), the
    first ``limit`` of them (default: ``finetune.eval_limit``)."""
    rows = list(read_rows(store, "val") if rows is None else rows)
    if stems is None:
        from floorplan_ft.training.data import split_stems

        stems = split_stems(config, "val", len(rows))
    stems = list(stems)
    if len(stems) != len(rows):
        raise ValueError(f"{len(stems)} stems for {len(rows)} rows")
    limit = limit if limit is not None else config.eval_limit
    if limit:
        rows, stems = rows[:limit], stems[:limit]
    if not rows:
        raise ValueError("no validation rows to evaluate: build the training data (step 5) first")
    return rows, stems


def _parse_answer(text: str | None) -> tuple[Any, bool]:
    """(the answer's JSON or None, whether it is a valid ``FloorPlanAnalysis``)."""
    try:
        obj = json.loads(text) if text else None
    except json.JSONDecodeError:
        obj = None
    schema_ok = False
    if isinstance(obj, dict):
        try:
            FloorPlanAnalysis.model_validate(obj)
            schema_ok = True
        except ValueError:
            schema_ok = False
    return obj, schema_ok


def _evaluate_row(
    store: ArtifactStore, client: Any, stem: str, row: dict[str, Any], *, max_new: int, weights: Any
) -> dict[str, Any]:
    """One val row: the student's answer, its validity, both answers' scores and their agreement."""
    from floorplan_ft.providers.base import LLMError

    messages = row["messages"]
    prompt, teacher_text = messages[:-1], messages[-1]["content"]
    entry: dict[str, Any] = {"stem": stem}
    text, error, usage = None, None, None
    try:
        result = client.chat(prompt, FloorPlanAnalysis, max_tokens=max_new)
        text, usage = result.text, result.usage
    except LLMError as exc:
        error = type(exc).__name__
        text = getattr(exc, "text", None)
        usage = getattr(exc, "usage", None)
        entry["error_detail"] = str(exc)[:300]
    entry["error"] = error
    entry["answer"] = text
    if usage is not None:
        entry["latency_s"] = round(float(usage.latency_s or 0.0), 4)
        entry["input_tokens"] = usage.input_tokens
        entry["output_tokens"] = usage.output_tokens
    graph = _load_graph(store, stem)
    obj, schema_ok = _parse_answer(text)
    entry["json_valid"] = isinstance(obj, dict)
    entry["schema_valid"] = schema_ok
    if graph is not None:
        reference = reference_analysis(graph.image_info.file_name, graph)
        student_scores = score_answer(text, graph, reference)
        teacher_scores = score_answer(teacher_text, graph, reference)
        entry["student"] = student_scores.to_dict(weights)
        entry["teacher"] = teacher_scores.to_dict(weights)
    else:
        entry["student"] = entry["teacher"] = None
    try:
        teacher_obj = json.loads(teacher_text)
    except json.JSONDecodeError:
        teacher_obj = None
    entry["agreement"] = field_agreement(obj, teacher_obj)
    return entry


def evaluate_student(
    store: ArtifactStore,
    model_dir: str | Path,
    rows: Sequence[dict[str, Any]] | None = None,
    settings: Any = None,
    *,
    stems: Sequence[str] | None = None,
    client: Any = None,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    write: bool = True,
) -> EvalReport:
    """Generate, score and compare the student's answers on the val rows (default: val.jsonl with
    its stems from stats_report.json); writes ``{student}/eval_report.json`` when ``write``."""
    from floorplan_ft.providers.local_client import LocalChatClient

    if settings is None:
        from floorplan_ft.settings import load_settings

        settings = load_settings()
    config = TrainConfig.from_settings(settings, store)
    rows, stems = _rows_to_evaluate(store, config, rows, stems, limit)
    model_dir = Path(model_dir)
    max_new = max_new_tokens or settings.serving.max_new_tokens
    own_client = client is None
    if own_client:
        client = LocalChatClient(
            model_dir,
            device=config.device,
            load_in_4bit=False,
            max_new_tokens=max_new,
            enable_thinking=config.enable_thinking,
            path_setting="finetune.student_name",
            cpu_threads=config.cpu_threads or settings.serving.cpu_threads,
        )
    weights = settings.quality.weights
    warnings: list[str] = []
    out_rows: list[dict[str, Any]] = []
    try:
        for stem, row in zip(stems, rows, strict=True):
            out_rows.append(_evaluate_row(store, client, stem, row, max_new=max_new, weights=weights))
    finally:
        if own_client:
            client.close()
    missing_graph = [r["stem"] for r in out_rows if r["student"] is None]
    if missing_graph:
        warnings.append(f"{len(missing_graph)} rows have no topology graph (no quality score): {missing_graph[:10]}")

    base = _base_of(model_dir) or config.base_model
    params = _params_of(base)
    band, note = expected_band(params)
    scored = [r for r in out_rows if r["student"] is not None]
    s_mean = _mean([r["student"]["weighted"] for r in scored])
    t_mean = _mean([r["teacher"]["weighted"] for r in scored])
    ratio = s_mean / t_mean if s_mean is not None and t_mean else None
    latencies = [r["latency_s"] for r in out_rows if r.get("latency_s") is not None]
    tokens = sum(r.get("output_tokens") or 0 for r in out_rows if r.get("latency_s") is not None)
    compliance = float(np.mean([r["schema_valid"] for r in out_rows]))
    target = float(getattr(settings.quality, "min_schema_compliance", COMPLIANCE_TARGET))
    errors: dict[str, int] = {}
    for r in out_rows:
        if r["error"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    summary = {
        "rows": len(out_rows),
        "schema_compliance": round(compliance, 4),
        "compliance_target": target,
        "meets_compliance_target": compliance >= target,
        "json_validity": round(float(np.mean([r["json_valid"] for r in out_rows])), 4),
        "errors": errors,
        "quality": {
            "student": None if s_mean is None else round(s_mean, 4),
            "teacher": None if t_mean is None else round(t_mean, 4),
            "ratio": None if ratio is None else round(ratio, 4),
            "expected_band": list(band) if band else None,
            "meets_expected_band": None if band is None or ratio is None else band[0] <= ratio,
            "note": note,
            "rows_scored": len(scored),
            "student_metrics": {m: _round(_mean([r["student"]["metrics"][m] for r in scored])) for m in METRICS},
            "teacher_metrics": {m: _round(_mean([r["teacher"]["metrics"][m] for r in scored])) for m in METRICS},
            "student_checks": {c: _round(_mean([r["student"]["checks"].get(c) for r in scored])) for c in CHECKS},
            "teacher_checks": {c: _round(_mean([r["teacher"]["checks"].get(c) for r in scored])) for c in CHECKS},
        },
        "field_agreement": {
            "scalar_exact_match": _round(_mean([r["agreement"]["scalar_exact_match"] for r in out_rows])),
            "rouge_l": _round(_mean([r["agreement"]["rouge_l"] for r in out_rows])),
            "scalars": {f: _round(_mean([r["agreement"]["scalars"][f] for r in out_rows])) for f in SCALAR_FIELDS},
            "texts": {f: _round(_mean([r["agreement"]["texts"][f] for r in out_rows])) for f in TEXT_FIELDS},
        },
        "latency": {
            "p50_s": _round(_pct(latencies, 50)),
            "p95_s": _round(_pct(latencies, 95)),
            "mean_s": _round(_mean(latencies)),
            "max_s": _round(max(latencies) if latencies else None),
            "target_s": LATENCY_TARGET_S,
            "meets_target": None if not latencies else (_pct(latencies, 95) or 0.0) <= LATENCY_TARGET_S,
            "tokens_per_s": _round(tokens / sum(latencies)) if latencies and sum(latencies) > 0 else None,
            "max_new_tokens": max_new,
        },
    }
    server = getattr(client, "base_url", None) if getattr(client, "provider", None) == "openai-compatible" else None
    if server:
        device = {
            "kind": "server",
            "name": f"OpenAI-compatible server at {server}",
            "model": getattr(client, "model", None),
        }
    else:
        try:
            kind = client.describe().get("device") or config.resolved_device()
        except Exception:  # noqa: BLE001 - a stand-in client without describe()
            kind = config.resolved_device()
        device = describe_device(kind)
    report = EvalReport(
        model_dir=str(model_dir),
        base_model=base,
        params=params,
        device=device,
        rows=out_rows,
        summary=summary,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        warnings=warnings,
    )
    if write:
        report.path = store.write_json(config.eval_report_path, report.to_dict())
    return report


def _round(v: float | None, digits: int = 4) -> float | None:
    return None if v is None else round(float(v), digits)


def student_model_dir(config: TrainConfig) -> Path:
    """The merged model when it was made from the current adapter, else the adapter."""
    from floorplan_ft.training.merge import MERGE_FILE, adapter_hash

    merged, adapter = Path(config.merged_dir), Path(config.adapter_dir)
    has_adapter = (adapter / "adapter_config.json").is_file()
    if (merged / "config.json").is_file() and (merged / MERGE_FILE).is_file():
        made_from = json.loads((merged / MERGE_FILE).read_text()).get("adapter_sha256")
        if not has_adapter or made_from == adapter_hash(adapter):
            return merged
    if has_adapter:
        return adapter
    raise FileNotFoundError(f"no trained student in {config.student_dir}: run the fine-tune (step 6) first")


def run_evaluation(settings: Any, store: ArtifactStore | None = None) -> dict[str, Any]:
    """Step 6b: evaluate the trained student on the val rows; the report and its markdown."""
    store = store or ArtifactStore(settings.paths.data_root)
    config = TrainConfig.from_settings(settings, store)
    client = None
    if settings.finetune.eval_base_url:
        # The student served by vLLM (or any OpenAI-compatible server): schema-constrained through
        # the server's json_schema response format, Qwen3 thinking off, the key never sent.
        from floorplan_ft.providers.factory import make_chat_client

        client = make_chat_client(
            settings,
            "openai-compatible",
            settings.finetune.eval_model,
            base_url=settings.finetune.eval_base_url,
            max_tokens=settings.finetune.eval_max_tokens,  # the team client's 8000
            enable_thinking=config.enable_thinking,
        )  # as trained, whatever its name
    try:
        try:
            model_dir = student_model_dir(config)
        except FileNotFoundError:
            if client is None:
                raise
            model_dir = Path(config.student_dir)  # served from elsewhere: the report names the base model
        report = evaluate_student(
            store,
            model_dir,
            settings=settings,
            client=client,
            max_new_tokens=settings.finetune.eval_max_tokens if client is not None else None,
        )
    finally:
        if client is not None:
            client.close()
    return {
        "path": report.path,
        "summary": report.summary,
        "device": report.device,
        "model_dir": report.model_dir,
        "markdown": report.markdown(),
    }
