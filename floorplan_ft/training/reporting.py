"""Phase 6 reporting: what a run did, as ``train_result.json``, the training log and chart, the
adapter's model card (README.md) and the markdown the flow publishes."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from floorplan_ft.charts import chart_font
from floorplan_ft.store import ArtifactStore
from floorplan_ft.training.config import TrainConfig
from floorplan_ft.training.memory import describe_peak

if TYPE_CHECKING:
    from floorplan_ft.training.sft import Prepared

RESULT_FORMAT_VERSION = 1


@dataclass
class TrainResult:
    student_dir: str
    adapter_dir: str
    checkpoints_dir: str
    log_path: str
    curves_path: str
    card_path: str
    base_model: str
    backend: str
    device: str
    fingerprint: str
    data: dict[str, Any]
    parameters: dict[str, Any]
    global_step: int
    max_steps: int
    epoch: float | None
    train_loss: float | None
    first_loss: float | None
    last_loss: float | None
    best_eval_loss: float | None
    last_eval_loss: float | None
    best_checkpoint: str | None
    stopped_early: bool
    resumed_from: str | None
    runtime_s: float
    memory: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)
    merged_dir: str | None = None
    peak_memory: dict[str, Any] | None = None  # measured: CUDA allocator peaks, or the process's max RSS
    reused: bool = False
    created_at: str = ""
    vllm_serve: str | None = None  # the `vllm serve ... --lora-modules NAME=adapter_model` line
    model: Any = field(default=None, repr=False, compare=False)  # the trained model (keep_model=True)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "model"}
        out["format_version"] = RESULT_FORMAT_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainResult:
        names = set(cls.__dataclass_fields__) - {"model"}
        return cls(**{k: v for k, v in data.items() if k in names})

    def markdown(self) -> str:
        def f(v: float | None) -> str:
            return "—" if v is None else f"{v:.4f}"

        lines = [
            "## Phase 6: student fine-tune",
            "",
            f"Base model `{self.base_model}` · backend **{self.backend}** on **{self.device}** · "
            f"{self.global_step}/{self.max_steps} steps in {self.runtime_s:.0f} s"
            + (f" · resumed from `{Path(self.resumed_from).name}`" if self.resumed_from else "")
            + (" · stopped early" if self.stopped_early else "")
            + (" · reused a finished run" if self.reused else ""),
            "",
            "| | value |",
            "|---|---|",
            f"| train rows / val rows | {self.data.get('train_rows')} / {self.data.get('val_rows')} |",
            f"| first → last train loss | {f(self.first_loss)} → {f(self.last_loss)} |",
            f"| best / last val loss | {f(self.best_eval_loss)} / {f(self.last_eval_loss)} |",
            f"| adapter | `{self.adapter_dir}` |",
            f"| loss curves | `{self.curves_path}` (chart), `{self.log_path}` (JSON) |",
            f"| merged model | `{self.merged_dir or '(not written)'}` |",
        ]
        if self.memory:
            lines.append(f"| memory estimate | {self.memory.get('total_gib')} GiB |")
        if self.peak_memory:
            lines.append(f"| measured peak | {describe_peak(self.peak_memory)} |")
        if self.warnings:
            lines += ["", "Warnings:"] + [f"- {w}" for w in self.warnings]
        return "\n".join(lines) + "\n"


def train_result(
    config: TrainConfig,
    prep: Prepared,
    output: Any,
    records: Sequence[dict[str, Any]],
    *,
    resume_from: str | None,
    runtime_s: float,
    peak: dict[str, Any],
    vllm_serve: str,
) -> TrainResult:
    """The result of a finished ``trainer.train()``: ``output`` is its return value, ``records`` the
    log history as ``history_records`` made it."""
    state = prep.trainer.state
    losses = [r["loss"] for r in records if r["loss"] is not None]
    evals = [r["eval_loss"] for r in records if r["eval_loss"] is not None]
    stopped_early = bool(
        config.early_stopping_patience > 0 and prep.val.examples and state.global_step < state.max_steps
    )
    train_loss = output.metrics.get("train_loss") if output and output.metrics else None
    adapter_dir = Path(config.adapter_dir)
    return TrainResult(
        student_dir=config.student_dir,
        adapter_dir=str(adapter_dir),
        checkpoints_dir=config.checkpoints_dir,
        log_path=config.log_path,
        curves_path=config.curves_path,
        card_path=str(adapter_dir / "README.md"),
        base_model=config.base_model,
        backend=prep.backend,
        device=prep.device,
        fingerprint=prep.fingerprint,
        data=dict(prep.data),
        parameters=config.training_parameters(),
        global_step=int(state.global_step),
        max_steps=int(state.max_steps),
        epoch=round(float(state.epoch), 4) if state.epoch is not None else None,
        train_loss=float(train_loss) if isinstance(train_loss, int | float) else None,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        best_eval_loss=min(evals) if evals else None,
        last_eval_loss=evals[-1] if evals else None,
        best_checkpoint=state.best_model_checkpoint,
        stopped_early=stopped_early,
        resumed_from=resume_from,
        runtime_s=runtime_s,
        memory=prep.memory.to_dict() if prep.memory else None,
        peak_memory=peak,
        warnings=list(prep.warnings),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        vllm_serve=vllm_serve,
    )


def write_reports(
    config: TrainConfig, store: ArtifactStore, result: TrainResult, records: Sequence[dict[str, Any]]
) -> None:
    """training_log.json, training_curves.png, then train_result.json (last: its existence means done)."""
    store.write_json(
        config.log_path,
        {
            "base_model": config.base_model,
            "backend": result.backend,
            "device": result.device,
            "fingerprint": result.fingerprint,
            "global_step": result.global_step,
            "max_steps": result.max_steps,
            "best_eval_loss": result.best_eval_loss,
            "best_checkpoint": result.best_checkpoint,
            "resumed_from": result.resumed_from,
            "history": list(records),
        },
    )
    store.write_bytes(
        config.curves_path,
        curves_png(records, f"{config.student_name}: {Path(config.base_model).name}, {result.global_step} steps"),
    )
    store.write_json(config.result_path, result.to_dict())


def history_records(log_history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per logged step: step, epoch, loss, eval_loss, learning_rate, grad_norm."""
    by_step: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        step = int(entry.get("step", 0))
        if not any(k in entry for k in ("loss", "eval_loss")):
            continue
        rec = by_step.setdefault(
            step,
            {"step": step, "epoch": None, "loss": None, "eval_loss": None, "learning_rate": None, "grad_norm": None},
        )
        for src, dst in (
            ("loss", "loss"),
            ("eval_loss", "eval_loss"),
            ("learning_rate", "learning_rate"),
            ("grad_norm", "grad_norm"),
            ("epoch", "epoch"),
        ):
            v = entry.get(src)
            if isinstance(v, int | float) and math.isfinite(v):
                rec[dst] = float(v)
    return [by_step[s] for s in sorted(by_step)]


def curves_png(records: Sequence[dict[str, Any]], title: str = "Student fine-tune") -> bytes:
    """Train and validation loss against the step (and the learning rate, scaled), drawn with Pillow."""
    from PIL import Image, ImageDraw

    W, H, left, right, top, bottom = 900, 420, 70, 70, 40, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = chart_font(13)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    lrs = [(r["step"], r["learning_rate"]) for r in records if r.get("learning_rate") is not None]
    steps = [s for s, _ in train + val] or [0, 1]
    losses = [v for _, v in train + val] or [0.0, 1.0]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    lo, hi = min(losses), max(losses)
    pad = (hi - lo) * 0.08 or 0.5
    lo, hi = lo - pad, hi + pad
    pw, ph = W - left - right, H - top - bottom

    def X(s: float) -> float:
        return left + pw * (s - x0) / (x1 - x0)

    def Y(v: float) -> float:
        return top + ph * (1 - (v - lo) / (hi - lo))

    for k in range(6):
        v = lo + (hi - lo) * k / 5
        d.line([(left, Y(v)), (W - right, Y(v))], fill="#e3e3e3")
        d.text((6, Y(v) - 7), f"{v:.3f}", fill="black", font=font)
    for k in range(6):
        s = x0 + (x1 - x0) * k / 5
        d.text((X(s) - 10, top + ph + 6), f"{s:.0f}", fill="black", font=font)
    d.rectangle([left, top, W - right, top + ph], outline="black")
    if lrs:
        lr_max = max(v for _, v in lrs) or 1.0
        pts = [(X(s), top + ph * (1 - v / lr_max)) for s, v in lrs]
        if len(pts) > 1:
            d.line(pts, fill="#b0b0b0", width=1)
        d.text((W - right + 4, top - 4), f"lr {lr_max:.1e}", fill="#808080", font=font)
    for series, color in ((train, "#1f77b4"), (val, "#ff7f0e")):
        pts = [(X(s), Y(v)) for s, v in series]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for px, py in pts:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
    d.text((left, 12), title, fill="black", font=font)
    legend = [("train loss", "#1f77b4"), ("val loss", "#ff7f0e"), ("learning rate (scaled)", "#b0b0b0")]
    for k, (label, color) in enumerate(legend):
        lx = left + k * 200
        d.rectangle([lx, H - 22, lx + 12, H - 10], fill=color)
        d.text((lx + 18, H - 24), label, fill="black", font=font)
    d.text((W // 2 - 15, H - 42), "step", fill="black", font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def model_card(config: TrainConfig, result: TrainResult, data: dict[str, Any]) -> str:
    """README.md of the adapter: base model, data hashes, parameters, final metrics, how to serve."""
    params = config.training_parameters()

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    rows = "\n".join(f"| {k} | {json.dumps(v, ensure_ascii=False)} |" for k, v in params.items())
    base = config.base_model
    return f"""---
base_model: {base}
library_name: peft
pipeline_tag: text-generation
tags: [lora, sft, trl, floor-plan-analysis, korean]
---

# {config.student_name}: floor-plan analysis student (LoRA)

A LoRA adapter on **{base}** trained to write `FloorPlanAnalysis` JSON (Korean) from a floor plan's
topology graph and the retrieved evaluation criteria, on the answers of teacher `{data.get("teacher") or "unknown"}`.

## Data
| split | rows | sha256 |
|---|---|---|
| train.jsonl | {data.get("train_rows")} | `{data.get("train_sha256")}` |
| val.jsonl | {data.get("val_rows")} | `{data.get("val_sha256")}` |

Prompt version `{data.get("prompt_version")}`, schema `{data.get("schema_hash")}`. Loss on the answer tokens only;
prompts rendered with the base model's chat template, `enable_thinking={config.enable_thinking}`.
Longest row {data.get("longest_tokens")} tokens (max_length {config.max_length}; {len(data.get("overlong", []))} rows cut).

## Training
Backend `{result.backend}` on `{result.device}`, {result.global_step} of {result.max_steps} optimizer steps
(epoch {result.epoch}), {result.runtime_s:.0f} s{", stopped early on the validation loss" if result.stopped_early else ""}.

| parameter | value |
|---|---|
{rows}

## Metrics
| metric | value |
|---|---|
| train loss (mean over the run) | {f(result.train_loss)} |
| first / last logged train loss | {f(result.first_loss)} / {f(result.last_loss)} |
| best validation loss | {f(result.best_eval_loss)} |
| last validation loss | {f(result.last_eval_loss)} |
| best checkpoint | {Path(result.best_checkpoint).name if result.best_checkpoint else "n/a"} |
| memory: estimated / measured peak | {(result.memory or {}).get("total_gib", "n/a")} GiB / {describe_peak(result.peak_memory) if result.peak_memory else "n/a"} |

Run fingerprint `{result.fingerprint}`. Student evaluation: `eval_report.json` beside this folder.

## Serving
Render prompts with `enable_thinking=False` (Qwen3), exactly as in training, and decode with the
`FloorPlanAnalysis` JSON schema. In-process: `LocalChatClient("{config.adapter_dir}")`. vLLM: serve
`merged_model/` (or the base with `--enable-lora --lora-modules {config.student_name}=adapter_model/`) and send
`chat_template_kwargs={{"enable_thinking": false}}` with a `json_schema` response format.

The team's vLLM, serving this adapter by name beside the base (rank fits `--max-lora-rank`):

```
{result.vllm_serve or "(see train_result.json)"}
```
"""
