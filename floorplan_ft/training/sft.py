"""Phase 6a: LoRA fine-tune of the student on the phase-5 rows (TRL + PEFT, or Unsloth on CUDA).

Data. Each row ``{"messages": [system, user, assistant]}`` is split with ``to_prompt_completion``;
the prompt is rendered with the base model's chat template exactly as the serving client renders it
(``add_generation_prompt=True``, ``enable_thinking=False``: Qwen3's template then pre-fills an empty
think block) and the completion is the answer's JSON followed by the tokenizer's EOS token. Both are
tokenized here, so ``labels`` are -100 on every prompt token and equal to the input on the answer
and its EOS: the loss covers the answer only, with any chat template. (TRL's own conversational
prompt/completion path renders prompt+completion through the template and starts the completion
where the two token sequences diverge: with a template whose finished assistant turn differs from
its generation prompt — the tiny test template drops the empty think block — TRL warns and trains
on a context the model never sees when served, plus the template's trailing newline.) Rows longer than
``finetune.max_length`` are named in a warning and cut (prompt first, so the answer's end is lost);
a row left with no answer token is dropped, and a configuration that drops every row is refused.

Training. ``SFTTrainer`` with the pre-tokenized rows (``skip_prepare_dataset``), validation loss
every ``eval_steps``, ``EarlyStoppingCallback`` with ``load_best_model_at_end`` when
``early_stopping_patience`` > 0, checkpoints every ``save_steps`` under
``{student}/checkpoints/``. A rerun resumes from the last checkpoint when the run's fingerprint
(training parameters + data hashes, in ``checkpoints/run.json``) is unchanged; a changed run moves
the old checkpoints aside. A rerun after a finished run with the same fingerprint reuses
``train_result.json`` (``force=True`` retrains).

Backends. ``trl``: ``AutoModelForCausalLM`` (fp32 on the CPU, bf16/fp16 on CUDA; 4-bit NF4 through
``BitsAndBytesConfig`` + ``prepare_model_for_kbit_training`` when ``load_in_4bit``, on CUDA or, with
bitsandbytes' CPU kernels, on the CPU) and PEFT LoRA; 8-bit AdamW from bitsandbytes likewise.
``unsloth`` (imported lazily): ``FastLanguageModel.from_pretrained`` + ``get_peft_model``. ``auto``
picks Unsloth on CUDA when it is installed; asked for by name on a CPU, Unsloth's own CPU fallback
runs (slowly, and it swaps 8-bit optimizers for AdamW), which is how the tests exercise this path.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from floorplan_ft.charts import chart_font
from floorplan_ft.dataset import to_prompt_completion
from floorplan_ft.store import ArtifactStore
from floorplan_ft.training.config import (
    TrainConfig,
    TrainConfigError,
    is_local_model_dir,
    resolve_base_model,
    unsloth_available,
)
from floorplan_ft.training.memory import MemoryEstimate, check_memory, device_info

log = logging.getLogger(__name__)

RESULT_FORMAT_VERSION = 1
RUN_FILE = "run.json"
MERGE_FILE = "merged_from.json"
IGNORE_INDEX = -100
LogFn = Callable[[dict[str, Any]], None]


# ============================================================================= data


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], enable_thinking: bool = False) -> str:
    """The prompt as the serving client renders it (generation prompt, thinking off)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TrainConfigError(
            f"the tokenizer of finetune.base_model ({getattr(tokenizer, 'name_or_path', '?')}) has no chat "
            "template: use an instruct/chat model, or a base model directory whose tokenizer_config.json has one"
        )
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, enable_thinking=enable_thinking
    )


def encode_row(tokenizer: Any, row: dict[str, Any], enable_thinking: bool = False) -> tuple[list[int], list[int], int]:
    """(input_ids, labels, prompt token count) of one conversational row: labels are -100 on the
    prompt, the answer's tokens and EOS after it."""
    pc = to_prompt_completion(row)
    if not pc["completion"] or pc["completion"][0].get("role") != "assistant":
        raise ValueError("the row's last message is not the assistant's answer")
    prompt = render_prompt(tokenizer, pc["prompt"], enable_thinking)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TrainConfigError("the base model's tokenizer has no eos_token: the student could never stop")
    p_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    c_ids = list(tokenizer(pc["completion"][0]["content"], add_special_tokens=False)["input_ids"]) + [eos]
    return p_ids + c_ids, [IGNORE_INDEX] * len(p_ids) + c_ids, len(p_ids)


@dataclass
class EncodedSplit:
    name: str
    examples: list[dict[str, list[int]]]
    stems: list[str]
    lengths: dict[str, int]
    overlong: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def longest(self) -> int:
        return max(self.lengths.values(), default=0)


def split_stems(config: TrainConfig, split: str, count: int) -> list[str]:
    """The plan stems of a split in row order (from stats_report.json), else ``{split}-{i}``."""
    if config.stats_path and Path(config.stats_path).is_file():
        try:
            stems = json.loads(Path(config.stats_path).read_text(encoding="utf-8"))["split"][split]["stems"]
            if isinstance(stems, list) and len(stems) == count:
                return [str(s) for s in stems]
        except (ValueError, KeyError, TypeError):
            pass
    return [f"{split}-{i}" for i in range(count)]


def encode_split(
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    stems: Sequence[str],
    max_length: int,
    *,
    name: str = "train",
    enable_thinking: bool = False,
) -> tuple[EncodedSplit, list[str]]:
    """Tokenized rows cut to ``max_length`` and the warnings naming the rows that were longer."""
    examples, lengths, overlong, dropped, kept = [], {}, [], [], []
    for stem, row in zip(stems, rows, strict=True):
        ids, labels, _ = encode_row(tokenizer, row, enable_thinking)
        lengths[stem] = len(ids)
        if len(ids) > max_length:
            overlong.append(stem)
            ids, labels = ids[:max_length], labels[:max_length]
            if all(t == IGNORE_INDEX for t in labels):
                dropped.append(stem)
                continue
        examples.append({"input_ids": ids, "labels": labels})
        kept.append(stem)
    warnings: list[str] = []
    if overlong:
        detail = ", ".join(f"{s} ({lengths[s]})" for s in overlong[:20])
        more = f" and {len(overlong) - 20} more" if len(overlong) > 20 else ""
        warnings.append(
            f"{len(overlong)} of {len(rows)} {name} rows are longer than finetune.max_length={max_length} tokens "
            f"and are cut (the end of their answer is lost): {detail}{more}. Longest: {max(lengths.values())} "
            f"tokens; set finetune.max_length >= {max(lengths.values())} (or dataset.drop_overlong=true)"
        )
    if dropped:
        warnings.append(
            f"{len(dropped)} {name} rows keep no answer token within finetune.max_length={max_length} and are "
            f"left out: {', '.join(dropped[:20])}"
        )
    return EncodedSplit(name, examples, kept, lengths, overlong, dropped), warnings


# ============================================================================= results


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


def _reset_peak_memory(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def measure_peak_memory(device: str) -> dict[str, Any]:
    """What training really used: on CUDA the caching allocator's peaks (allocated = live tensors,
    comparable with the estimate; reserved ~ what nvidia-smi shows), on the CPU the process's max RSS."""
    if device == "cuda":
        import torch

        return {
            "device": "cuda",
            "allocated_gib": round(torch.cuda.max_memory_allocated() / 1024**3, 2),
            "reserved_gib": round(torch.cuda.max_memory_reserved() / 1024**3, 2),
        }
    import resource

    return {"device": "cpu", "max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)}


def describe_peak(peak: dict[str, Any]) -> str:
    if peak.get("device") == "cuda":
        return f"{peak['allocated_gib']} GiB allocated, {peak['reserved_gib']} GiB reserved (CUDA)"
    return f"{peak.get('max_rss_gib')} GiB max RSS of the process (CPU)"


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


# ============================================================================= preparation


@dataclass
class Prepared:
    """Everything `train` builds before it starts the trainer (tests inspect it)."""

    config: TrainConfig
    trainer: Any
    tokenizer: Any
    backend: str
    device: str
    base_path: str
    hub_id: str | None
    train: EncodedSplit
    val: EncodedSplit
    data: dict[str, Any]
    fingerprint: str
    memory: MemoryEstimate | None
    warnings: list[str]


def _log_relay(fn: LogFn | None):
    """A TrainerCallback that logs every record (instead of transformers' stdout printer) and
    forwards it, with its step, to ``fn``."""
    from transformers import TrainerCallback

    class LogRelay(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs:
                return
            record = {"step": state.global_step, "max_steps": state.max_steps, **logs}
            log.info(
                "step %s/%s: %s",
                state.global_step,
                state.max_steps,
                {k: round(v, 6) if isinstance(v, float) else v for k, v in logs.items()},
            )
            if fn is not None:
                fn(record)

    return LogRelay()


def data_summary(config: TrainConfig, store: ArtifactStore) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    if config.stats_path and Path(config.stats_path).is_file():
        try:
            stats = json.loads(Path(config.stats_path).read_text(encoding="utf-8"))
        except ValueError:
            stats = {}
    return {
        "train_path": config.train_path,
        "val_path": config.val_path,
        "train_sha256": store.file_hash(config.train_path),
        "val_sha256": store.file_hash(config.val_path),
        "teacher": stats.get("teacher"),
        "prompt_version": stats.get("prompt_version"),
        "schema_hash": stats.get("schema_hash"),
    }


def _read_split(store: ArtifactStore, path: str) -> list[dict[str, Any]]:
    text = store.read_text(path)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _check_targets(model: Any, targets: Sequence[str]) -> None:
    import torch

    linear = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    missing = [t for t in targets if t not in linear]
    if missing:
        raise TrainConfigError(
            f"finetune.target_modules names projections this model does not have: {missing}. Its linear layers "
            f"are {sorted(linear)}; set finetune.target_modules to those of attention and MLP "
            "(EXAONE 3.5: q_proj, k_proj, v_proj, out_proj, c_fc_0, c_fc_1, c_proj)"
        )


# bitsandbytes' CPU inference kernel repacks NF4 weights in blocks of 64 input features (evaluation
# steps run it); a narrower layer fails there with a reshape error, so refuse it before training.
CPU_4BIT_MIN_FEATURES = 64


def _check_cpu_4bit(model: Any) -> None:
    narrow = {
        name.rsplit(".", 1)[-1]: mod.in_features
        for name, mod in model.named_modules()
        if type(mod).__name__ == "Linear4bit" and mod.in_features < CPU_4BIT_MIN_FEATURES
    }
    if narrow:
        raise TrainConfigError(
            f"finetune.load_in_4bit=true on the CPU: bitsandbytes' CPU kernels need layers with at least "
            f"{CPU_4BIT_MIN_FEATURES} input features, and this model has narrower ones {narrow}. "
            "Set finetune.load_in_4bit=false for this model"
        )


def _load_trl(config: TrainConfig, base_path: str, device: str, trust_remote_code: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if device == "cuda":
        kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        kwargs["dtype"] = torch.float32
    if config.load_in_4bit:
        from transformers import BitsAndBytesConfig

        # NF4 with double quantisation; compute in bf16/fp16 on CUDA, fp32 on the CPU (bitsandbytes'
        # CPU kernels: the same code path, slower, used by the tests on tiny models).
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=kwargs["dtype"],
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device() if device == "cuda" else "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise TrainConfigError(
                f"finetune.base_model={config.base_model!r} needs its own modelling code (not built into "
                "transformers; EXAONE 3.5 is such a model). Review the code in the model directory, then set "
                "finetune.trust_remote_code=true"
            ) from None
        raise
    _check_targets(model, config.target_modules)
    if config.load_in_4bit and device == "cpu":
        _check_cpu_4bit(model)
    if config.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.use_gradient_checkpointing(),
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    from peft import LoraConfig

    peft_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return model, tokenizer, peft_config


def _load_unsloth(config: TrainConfig, base_path: str, trust_remote_code: bool):
    try:
        import unsloth  # noqa: F401 - patches transformers/TRL; import before them where possible
        from unsloth import FastLanguageModel
    except Exception as exc:  # noqa: BLE001 - missing extra, no CUDA, incompatible versions
        raise TrainConfigError(
            f"finetune.backend=unsloth: importing unsloth failed ({type(exc).__name__}: {exc}). Install the gpu "
            "extra on a CUDA machine, or set finetune.backend=trl"
        ) from None
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=base_path,
        max_seq_length=config.max_length,
        dtype=None,
        load_in_4bit=config.load_in_4bit,
        trust_remote_code=trust_remote_code,
    )
    _check_targets(model, config.target_modules)
    model = FastLanguageModel.get_peft_model(
        model,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        use_gradient_checkpointing="unsloth" if config.use_gradient_checkpointing() else False,
        random_state=config.seed,
        max_seq_length=config.max_length,
    )
    return model, tokenizer, None


def _dataset(examples: list[dict[str, list[int]]]):
    from datasets import Dataset

    return Dataset.from_list(examples)


def _sft_config(config: TrainConfig, device: str, backend: str, has_val: bool):
    import torch
    from trl import SFTConfig

    cuda = device == "cuda"
    bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    best = has_val and config.early_stopping_patience > 0
    return SFTConfig(
        output_dir=config.checkpoints_dir,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float < 1 is a ratio (warmup_ratio is gone)
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_val else "no",
        eval_steps=config.eval_steps if has_val else None,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=best,
        metric_for_best_model="eval_loss" if best else None,
        greater_is_better=False if best else None,
        optim=config.optim,
        use_cpu=not cuda,
        bf16=bf16,
        fp16=bool(cuda and not bf16),
        # Unsloth checkpoints inside its own patched model; TRL's default (True) is slow and pointless on a CPU.
        gradient_checkpointing=config.use_gradient_checkpointing() and backend == "trl",
        gradient_checkpointing_kwargs={"use_reentrant": False},  # as prepare_model_for_kbit_training sets it
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        max_length=config.max_length,
        dataset_kwargs={"skip_prepare_dataset": True},  # rows are tokenized and cut here
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_pin_memory=cuda,
        save_only_model=False,  # optimizer and scheduler state are needed to resume
    )


def prepare(
    config: TrainConfig,
    store: ArtifactStore | None = None,
    *,
    on_log: LogFn | None = None,
    callbacks: Sequence[Any] = (),
    check_memory_first: bool = True,
) -> Prepared:
    """Validate, check memory, load tokenizer and model, encode the rows and build the trainer."""
    config.validate()
    config.check_data()
    store = store or ArtifactStore(config.data_root)
    device = config.resolved_device()
    backend = config.resolved_backend()
    warnings: list[str] = []
    if config.backend == "auto" and device == "cuda" and backend == "trl" and not unsloth_available():
        log.info("unsloth is not installed: training with TRL + PEFT")
    if backend == "unsloth" and device == "cpu":
        warnings.append(
            "finetune.backend=unsloth on the CPU: Unsloth's CPU fallback trains (slowly, and with "
            "AdamW in place of 8-bit optimizers); finetune.backend=auto picks TRL here"
        )

    data = data_summary(config, store)
    train_rows = _read_split(store, config.train_path)
    val_rows = _read_split(store, config.val_path)
    if not train_rows:
        raise TrainConfigError(f"{config.train_path} has no rows: rebuild the training data (step 5)")
    data_hashes = {"train": data["train_sha256"], "val": data["val_sha256"]}
    fingerprint = config.fingerprint(data_hashes)

    # Before any weight is loaded: will it fit?
    memory = None
    if check_memory_first:
        memory = check_memory(config, device_info(device))
    base_path, hub_id = resolve_base_model(config.base_model)
    from floorplan_ft.training.preflight import check_target_modules

    check_target_modules(config, base_path)  # from config.json on the meta device: before any weight
    if device == "cpu" and config.cpu_threads:
        import torch

        torch.set_num_threads(config.cpu_threads)
    from transformers import set_seed

    set_seed(config.seed)
    trust = config.trust_remote_code
    if backend == "unsloth":
        model, tokenizer, peft_config = _load_unsloth(config, base_path, trust)
    else:
        model, tokenizer, peft_config = _load_trl(config, base_path, device, trust)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    train_split, w = encode_split(
        tokenizer,
        train_rows,
        split_stems(config, "train", len(train_rows)),
        config.max_length,
        name="train",
        enable_thinking=config.enable_thinking,
    )
    warnings += w
    val_split, w = encode_split(
        tokenizer,
        val_rows,
        split_stems(config, "val", len(val_rows)),
        config.max_length,
        name="val",
        enable_thinking=config.enable_thinking,
    )
    warnings += w
    longest = max(train_split.longest, val_split.longest)
    if not train_split.examples:
        raise TrainConfigError(
            f"no train row keeps any answer token within finetune.max_length={config.max_length} "
            f"(longest row: {longest} tokens with this tokenizer): set finetune.max_length >= {longest}"
        )
    data.update(
        {
            "train_rows": len(train_split.examples),
            "val_rows": len(val_split.examples),
            "longest_tokens": longest,
            "overlong": train_split.overlong + val_split.overlong,
            "dropped": train_split.dropped + val_split.dropped,
        }
    )

    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer

    has_val = bool(val_split.examples)
    if not has_val:
        warnings.append("val.jsonl has no usable rows: no validation loss and no early stopping")
    for msg in warnings:
        log.warning(msg)
    args = _sft_config(config, device, backend, has_val)
    cbs = [*callbacks, _log_relay(on_log)]
    if has_val and config.early_stopping_patience > 0:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=_dataset(train_split.examples),
        eval_dataset=_dataset(val_split.examples) if has_val else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=cbs,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # records go to the logger (and on_log) instead of stdout
    return Prepared(
        config,
        trainer,
        tokenizer,
        backend,
        device,
        base_path,
        hub_id,
        train_split,
        val_split,
        data,
        fingerprint,
        memory,
        warnings,
    )


# ============================================================================= checkpoints


def _prepare_checkpoints(config: TrainConfig, fingerprint: str, resume: bool) -> str | None:
    """The checkpoint to resume from (None: start fresh). Checkpoints of another run (other
    parameters or data) are moved aside, never mixed."""
    ckpt = Path(config.checkpoints_dir)
    run_file = ckpt / RUN_FILE
    if ckpt.is_dir() and any(ckpt.iterdir()):
        previous = None
        if run_file.is_file():
            try:
                previous = json.loads(run_file.read_text()).get("fingerprint")
            except ValueError:
                previous = None
        if previous != fingerprint:
            aside = ckpt.with_name(f"checkpoints.{previous or 'unknown'}.{int(time.time())}")
            log.warning(
                "checkpoints in %s belong to another run (fingerprint %s, now %s): moved to %s",
                ckpt,
                previous,
                fingerprint,
                aside,
            )
            ckpt.rename(aside)
    ckpt.mkdir(parents=True, exist_ok=True)
    run_file.write_text(
        json.dumps(
            {"fingerprint": fingerprint, "parameters": config.training_parameters()},
            ensure_ascii=False,
            indent=2,
            default=str,
        )
    )
    if not resume:
        for old in ckpt.glob("checkpoint-*"):
            shutil.rmtree(old, ignore_errors=True)
        return None
    return last_complete_checkpoint(ckpt, remove_incomplete=True)


def _complete(checkpoint: Path) -> bool:
    """A checkpoint a resume can use: trainer state, weights and optimizer state all written (a pod
    killed in the middle of a save leaves a partial folder behind)."""
    names = {p.name for p in checkpoint.iterdir()} if checkpoint.is_dir() else set()
    weights = any(n.startswith(("adapter_model.", "model.", "model-")) for n in names)
    optimizer = any(n.startswith("optimizer.") for n in names)
    return "trainer_state.json" in names and weights and optimizer


def last_complete_checkpoint(checkpoints_dir: str | Path, *, remove_incomplete: bool = False) -> str | None:
    """The newest complete ``checkpoint-N`` folder (None when there is none); newer incomplete
    ones are skipped (and deleted with ``remove_incomplete``, so the trainer can save that step again)."""
    found = []
    for p in Path(checkpoints_dir).glob("checkpoint-*"):
        suffix = p.name.rsplit("-", 1)[-1]
        if suffix.isdigit():
            found.append((int(suffix), p))
    for _, p in sorted(found, reverse=True):
        if _complete(p):
            return str(p)
        log.warning(
            "checkpoint %s is incomplete (interrupted while saving): %s",
            p,
            "removed" if remove_incomplete else "skipped",
        )
        if remove_incomplete:
            shutil.rmtree(p, ignore_errors=True)
    return None


def _free() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


# ============================================================================= train


def _reusable(config: TrainConfig, store: ArtifactStore) -> TrainResult | None:
    path = Path(config.result_path)
    if not path.is_file() or not (Path(config.adapter_dir) / "adapter_config.json").is_file():
        return None
    try:
        previous = TrainResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
        hashes = {"train": store.file_hash(config.train_path), "val": store.file_hash(config.val_path)}
    except (ValueError, TypeError, OSError):
        return None
    if previous.fingerprint != config.fingerprint(hashes):
        return None
    previous.reused = True
    return previous


def train(
    config: TrainConfig,
    store: ArtifactStore | None = None,
    *,
    resume: bool = True,
    on_log: LogFn | None = None,
    callbacks: Sequence[Any] = (),
    force: bool = False,
    keep_model: bool = False,
) -> TrainResult:
    """Fine-tune, save the adapter, the model card, the loss curves and ``train_result.json``.

    ``resume``: continue from the last checkpoint of the same run (automatic after a crash or a
    pre-empted pod). ``on_log``: called with every log record (``{"step", "loss", ...}``).
    ``callbacks``: extra ``transformers.TrainerCallback``s. ``force``: train again even when a
    finished run with the same parameters and data exists. ``keep_model``: return the trained model
    in ``result.model`` (tests)."""
    store = store or ArtifactStore(config.data_root)
    config.validate()
    config.check_data()
    if not force and not keep_model:
        reused = _reusable(config, store)
        if reused is not None:
            log.info(
                "finished run %s found in %s: reused (force=True retrains)", reused.fingerprint, config.result_path
            )
            return reused
    started = time.perf_counter()
    Path(config.result_path).unlink(missing_ok=True)  # a result of another run must not outlive its adapter
    prep = prepare(config, store, on_log=on_log, callbacks=callbacks)
    trainer = prep.trainer
    resume_from = _prepare_checkpoints(config, prep.fingerprint, resume)
    if resume_from:
        log.info("resuming from %s", resume_from)
    _reset_peak_memory(prep.device)
    output = trainer.train(resume_from_checkpoint=resume_from)
    peak = measure_peak_memory(prep.device)
    if prep.memory:
        log.info("memory: estimated %.1f GiB, measured %s", prep.memory.total_gib, describe_peak(peak))
    state = trainer.state

    records = history_records(state.log_history)
    if prep.val.examples and not any(r["eval_loss"] is not None for r in records):
        trainer.evaluate()  # no eval step was reached: record one validation loss for the card
        records = history_records(state.log_history)
    losses = [r["loss"] for r in records if r["loss"] is not None]
    evals = [r["eval_loss"] for r in records if r["eval_loss"] is not None]
    stopped_early = bool(
        config.early_stopping_patience > 0 and prep.val.examples and state.global_step < state.max_steps
    )

    # Outputs: adapter (+ tokenizer, card), log, chart.
    adapter_dir = Path(config.adapter_dir)
    staging = adapter_dir.with_name(adapter_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model = trainer.model
    base_ref = prep.hub_id or prep.base_path
    for peft_cfg in getattr(model, "peft_config", {}).values():
        peft_cfg.base_model_name_or_path = base_ref
    model.save_pretrained(str(staging))
    prep.tokenizer.save_pretrained(str(staging))
    from floorplan_ft.training.preflight import finish_adapter, vllm_serve_command

    finish_adapter(staging, prep.tokenizer)  # config, weights, tokenizer, chat template: what vLLM loads
    serve_line = vllm_serve_command(config, base_ref, adapter_dir)

    train_loss = output.metrics.get("train_loss") if output and output.metrics else None
    result = TrainResult(
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
        runtime_s=round(time.perf_counter() - started, 2),
        memory=prep.memory.to_dict() if prep.memory else None,
        peak_memory=peak,
        warnings=list(prep.warnings),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        vllm_serve=serve_line,
    )
    (staging / "README.md").write_text(model_card(config, result, prep.data), encoding="utf-8")
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    staging.rename(adapter_dir)  # the adapter folder appears complete or not at all
    store.write_json(
        config.log_path,
        {
            "base_model": config.base_model,
            "backend": prep.backend,
            "device": prep.device,
            "fingerprint": prep.fingerprint,
            "global_step": result.global_step,
            "max_steps": result.max_steps,
            "best_eval_loss": result.best_eval_loss,
            "best_checkpoint": result.best_checkpoint,
            "resumed_from": resume_from,
            "history": records,
        },
    )
    store.write_bytes(
        config.curves_path,
        curves_png(records, f"{config.student_name}: {Path(config.base_model).name}, {result.global_step} steps"),
    )
    store.write_json(config.result_path, result.to_dict())
    if keep_model:
        result.model = model
    model = trainer = prep = output = None
    _free()
    return result


# ============================================================================= merge


def adapter_hash(adapter_dir: str | Path) -> str:
    """Content hash of an adapter (config + weights): what a merged model was made from."""
    adapter = Path(adapter_dir)
    h = hashlib.sha256((adapter / "adapter_config.json").read_bytes())
    for w in sorted(adapter.glob("adapter_model.*")):
        h.update(w.read_bytes())
    return h.hexdigest()


def merge_adapter(
    config: TrainConfig, adapter_dir: str | None = None, out_dir: str | None = None, *, force: bool = False
) -> str:
    """Base + adapter merged into full weights (``PeftModel.merge_and_unload``) for vLLM: loaded
    unquantised (bf16 on CUDA, fp32 on the CPU), never on the 4-bit training model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = Path(adapter_dir or config.adapter_dir)
    out = Path(out_dir or config.merged_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise TrainConfigError(f"no adapter in {adapter}: train first (step 6)")
    digest = adapter_hash(adapter)
    marker = out / MERGE_FILE
    if not force and marker.is_file():
        try:
            if json.loads(marker.read_text()).get("adapter_sha256") == digest:
                return str(out)
        except ValueError:
            pass
    base_ref = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    base_path = base_ref if is_local_model_dir(base_ref) else resolve_base_model(base_ref)[0]
    device = config.resolved_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    trust = config.trust_remote_code
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, trust_remote_code=trust)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    if out.exists():
        shutil.rmtree(out)
    merged.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(str(out))
    card = adapter / "README.md"
    if card.is_file():
        shutil.copyfile(card, out / "README.md")
    marker.write_text(
        json.dumps(
            {
                "adapter": str(adapter),
                "adapter_sha256": digest,
                "base_model": base_ref,
                "dtype": str(dtype).replace("torch.", ""),
            },
            indent=2,
        )
    )
    base = merged = None
    _free()
    return str(out)


# ============================================================================= demo and entry


def ensure_demo_base(path: str | Path, *, seed: int = 0, short_json: bool = True) -> str:
    """The demo's tiny student base (a random 2-layer Qwen3 + byte-level tokenizer), built once.
    ``short_json`` biases it towards closing JSON early so its constrained answers stay short."""
    path = Path(path)
    if not (path / "config.json").is_file():
        from floorplan_ft.training.tiny import bias_towards_short_json, build_tiny_causal_lm

        model, tokenizer = build_tiny_causal_lm(path, seed=seed)
        if short_json:
            bias_towards_short_json(model, tokenizer, path)
    return str(path)


def run_finetune(
    settings: Any, store: ArtifactStore | None = None, *, on_log: LogFn | None = None, force: bool = False
) -> dict[str, Any]:
    """Step 6a: train (resuming or reusing when possible), then merge when ``finetune.merge``."""
    store = store or ArtifactStore(settings.paths.data_root)
    config = TrainConfig.from_settings(settings, store)
    result = train(config, store, on_log=on_log, force=force)
    if config.merge:
        result.merged_dir = merge_adapter(config, force=force and not result.reused)
        store.write_json(config.result_path, result.to_dict())
    out = result.to_dict()
    out["markdown"] = result.markdown()
    return out
