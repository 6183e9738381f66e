"""`ft-pipeline train-plan`: what step 6 will do with a profile, before a pod is paid for.

For the profile's settings and the data root's ``train.jsonl`` (or, before step 5, the planned
sample): optimizer steps, evaluations and checkpoints; training tokens (counted with the base
model's tokenizer when it is on this machine, otherwise estimated from the text); the memory
estimate on the GPUs the team uses (``memory.py``, with its verdict); and a time range.

The time range is arithmetic, not a measurement: a LoRA step costs about 8 FLOPs per base-model
parameter per token (forward 2, backward 4, and 2 more for recomputing the forward under gradient
checkpointing; the adapters add ~1%), and a QLoRA run reaches 25-45 % of the GPU's dense bf16
peak (dequantising the NF4 weights costs the rest; Unsloth's kernels sit at the high end). The
bounds are those two utilisation figures.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from floorplan_ft.store import ArtifactStore
from floorplan_ft.training.config import TrainConfig, TrainConfigError, resolve_base_model
from floorplan_ft.training.memory import (
    DeviceInfo,
    GiB,
    MemoryCheckError,
    check_memory,
    model_shape,
)

FLOPS_PER_PARAM_TOKEN = 8.0
UTILISATION = (0.25, 0.45)
# Dense bf16 tensor-core peaks from the vendors' data sheets (FP32 accumulate for the GeForce cards).
GPUS: tuple[tuple[DeviceInfo, float], ...] = (
    (DeviceInfo("cuda", "NVIDIA A100 80GB", 80 * GiB), 312e12),
    (DeviceInfo("cuda", "NVIDIA H100 80GB SXM", 80 * GiB), 989e12),
    (DeviceInfo("cuda", "NVIDIA RTX 4090 24GB", 24 * GiB), 165e12),
    (DeviceInfo("cuda", "NVIDIA RTX 3070 8GB", 8 * GiB), 40e12),
)
# bench/bench_training.py measured up to 1.24x the estimate's live memory (QLoRA on the CPU); a fit
# with less headroom than that is flagged as tight.
TIGHT_MARGIN = 1.25
# DOMAIN.md: ~3K prompt tokens per plan and ~1.5K answer tokens (the teacher's output).
PLAN_PROMPT_TOKENS = 3000
PLAN_ROW_TOKENS = PLAN_PROMPT_TOKENS + 1500


@dataclass
class GpuPlan:
    device: str
    memory_gib: float
    fits: bool
    advice: str | None
    tight: bool
    hours: tuple[float, float] | None


@dataclass
class TrainPlan:
    base_model: str
    parameters_b: float
    load_in_4bit: bool
    rows: int
    rows_source: str
    tokens_per_epoch: int
    tokens_source: str
    longest_row: int | None
    rows_over_max_length: int | None
    epochs: float
    effective_batch: int
    steps_per_epoch: int
    total_steps: int
    evaluations: int
    checkpoints: int
    gpus: list[GpuPlan] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def tokens_total(self) -> int:
        return int(self.tokens_per_epoch * self.epochs)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tokens_total"] = self.tokens_total
        return out

    def markdown(self) -> str:
        lines = [
            (
                f"Base model {self.base_model} ({self.parameters_b:.1f}B parameters, "
                f"{'4-bit QLoRA' if self.load_in_4bit else '16-bit LoRA'})"
            ),
            f"Rows: {self.rows} ({self.rows_source}); tokens per epoch: {self.tokens_per_epoch:,} ({self.tokens_source})"
            + (f"; longest row {self.longest_row}" if self.longest_row is not None else ""),
            (
                f"{self.epochs:g} epochs x {self.steps_per_epoch} optimizer steps (effective batch {self.effective_batch})"
                f" = {self.total_steps} steps, {self.evaluations} validation passes, {self.checkpoints} checkpoints; "
                f"{self.tokens_total:,} training tokens"
            ),
        ]
        lines += [f"Warning: {w}" for w in self.warnings]
        lines += ["", "| GPU | memory estimate | fits | hours (25-45 % of bf16 peak) |", "|---|---|---|---|"]
        for g in self.gpus:
            hours = "-" if g.hours is None else f"{g.hours[0]:.1f}-{g.hours[1]:.1f}"
            fits = ("yes, tight (less than 25 % headroom)" if g.tight else "yes") if g.fits else f"no: {g.advice}"
            lines.append(f"| {g.device} | {g.memory_gib:.1f} GiB | {fits} | {hours} |")
        return "\n".join(lines) + "\n"


def _row_tokens(config: TrainConfig, rows: list[dict[str, Any]]) -> tuple[list[int], str]:
    """Tokens per row with the base model's tokenizer and chat template when it is on this machine,
    else the text estimate the labeling phase uses."""
    try:
        base_path, _ = resolve_base_model(config.base_model)
        from transformers import AutoTokenizer

        from floorplan_ft.training.data import encode_row

        tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=config.trust_remote_code)
        return [len(encode_row(tokenizer, r, config.enable_thinking)[0]) for r in rows], "counted with the tokenizer"
    except (TrainConfigError, OSError, ValueError):
        from floorplan_ft.teachers.labeling import messages_tokens

        return [messages_tokens(r["messages"]) for r in rows], "estimated from the text (tokenizer not on this machine)"


def plan_training(settings: Any, store: ArtifactStore | None = None) -> TrainPlan:
    store = store or ArtifactStore(settings.paths.data_root)
    config = TrainConfig.from_settings(settings, store)
    train_path = Path(config.train_path)
    longest = over = None
    if train_path.is_file():
        rows = [json.loads(line) for line in train_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        lengths, tokens_source = _row_tokens(config, rows)
        n_rows, rows_source = len(rows), str(train_path)
        longest = max(lengths, default=0)
        over = sum(1 for n in lengths if n > config.max_length)
        tokens_per_epoch = sum(min(n, config.max_length) for n in lengths)
    else:
        n_rows = int(settings.sampling.sample_size * settings.dataset.train_ratio)
        rows_source = f"planned: sampling.sample_size x dataset.train_ratio; no {train_path.name} yet"
        tokens_per_epoch = n_rows * min(PLAN_ROW_TOKENS, config.max_length)
        tokens_source = f"the plan's ~{PLAN_ROW_TOKENS:,} tokens per row, capped at max_length"
    effective = config.batch_size * config.grad_accum
    batches = math.ceil(n_rows / config.batch_size)
    per_epoch = max(1, math.ceil(batches / config.grad_accum))
    total = config.max_steps if config.max_steps > 0 else math.ceil(per_epoch * config.epochs)
    shape = model_shape(config.base_model)
    plan = TrainPlan(
        base_model=config.base_model,
        parameters_b=shape.params / 1e9,
        load_in_4bit=config.load_in_4bit,
        rows=n_rows,
        rows_source=rows_source,
        tokens_per_epoch=int(tokens_per_epoch),
        tokens_source=tokens_source,
        longest_row=longest,
        rows_over_max_length=over,
        epochs=config.epochs,
        effective_batch=effective,
        steps_per_epoch=per_epoch,
        total_steps=total,
        evaluations=total // config.eval_steps,
        checkpoints=total // config.save_steps,
    )
    if over:
        plan.warnings.append(
            f"{over} of {n_rows} rows exceed finetune.max_length={config.max_length} (longest {longest} tokens) and "
            "will be cut, losing the end of their answers: raise finetune.max_length or set dataset.drop_overlong=true"
        )
    elif not train_path.is_file() and PLAN_ROW_TOKENS > config.max_length:
        what = (
            "the prompt alone (~3,000) leaves no room for the answer, so such rows would be dropped"
            if PLAN_PROMPT_TOKENS >= config.max_length
            else "their answers would be cut"
        )
        plan.warnings.append(
            f"the plan's rows (~{PLAN_ROW_TOKENS:,} tokens) are longer than finetune.max_length={config.max_length}: "
            f"{what}. Measure real rows after step 5 (this command counts them) before training"
        )
    tokens = plan.tokens_total if config.max_steps <= 0 else total * effective * (tokens_per_epoch / max(n_rows, 1))
    gpu_config = config.replace(device="cuda")
    for device, peak in GPUS:
        try:
            est, advice, fits = check_memory(gpu_config, device, shape=shape), None, True
        except MemoryCheckError as exc:
            est, fits = exc.estimate, False
            advice = str(exc).split("Options: ", 1)[-1]
        flops = FLOPS_PER_PARAM_TOKEN * shape.params * tokens
        hours = (flops / (peak * UTILISATION[1]) / 3600, flops / (peak * UTILISATION[0]) / 3600) if fits else None
        tight = fits and est.total_bytes * TIGHT_MARGIN > device.usable_bytes
        plan.gpus.append(
            GpuPlan(
                device.name,
                round(est.total_gib, 1),
                fits,
                advice,
                tight,
                None if hours is None else (round(hours[0], 2), round(hours[1], 2)),
            )
        )
    return plan
