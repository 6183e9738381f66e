"""Will the fine-tune fit? An estimate made before any weight is loaded, and advice when it won't.

The model's shape comes from its ``config.json`` (a local directory or the local Hugging Face cache)
or, for the profiles' models, from a small table (``KNOWN_MODELS``). The estimate adds up:

weights
    4-bit (QLoRA): the linear layers at NF4 with double quantisation (~4.13 bits per parameter),
    embeddings / LM head / norms at the compute dtype, plus one dequantised linear layer. Otherwise every
    parameter at the compute dtype (bf16 on CUDA, fp32 on the CPU).
lora
    the adapter parameters (rank x (in + out) per targeted projection per layer) in fp32, their
    gradients (fp32) and the optimizer state (AdamW: 8 bytes per parameter; 8-bit AdamW: 2).
activations
    with gradient checkpointing: one hidden state per layer and token, plus one layer's working set
    (attention and MLP intermediates, LoRA dropout copies) recomputed during backward; without it,
    every layer's working set. Attention is FlashAttention/SDPA-style (no seq^2 term).
logits
    TRL's default ``chunked_nll`` loss and Unsloth's fused cross-entropy compute the LM head on
    chunks of tokens; counted as 1,024 tokens of fp32 logits and their gradient.
overhead
    CUDA context and allocator slack (0.5 GiB + 10 %), or 0.5 GiB of process overhead on the CPU.

It is a planning figure, not a measurement: the plan measured ~25-30 GB for Qwen3-8B QLoRA
(r 64, batch 2, 4,096 tokens) on an A100, which includes PyTorch's cached-but-free blocks; this
model says ~15 GiB of live memory for the same run. ``check_memory`` refuses when the estimate
exceeds 95 % of the device's memory (CUDA) or the available RAM (CPU), and suggests settings and
profiles that fit. After the run, ``measure_peak_memory`` records what it really used.
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from floorplan_ft.training.config import TrainConfig, TrainConfigError, is_local_model_dir

GiB = 1024**3
NF4_BYTES_PER_PARAM = 4.127 / 8  # NF4 + double-quantised absmax
LOGIT_CHUNK_TOKENS = 1024
CUDA_CONTEXT_BYTES = GiB // 2
CUDA_SLACK = 0.10
CPU_OVERHEAD_BYTES = GiB // 2
USABLE_CUDA_SHARE = 0.95


class MemoryCheckError(TrainConfigError):
    """The profile cannot fit on this device; the message says what would."""

    def __init__(self, message: str, estimate: MemoryEstimate, device: DeviceInfo):
        super().__init__(message)
        self.estimate = estimate
        self.device = device


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool = False
    qk_norm: bool = False  # Qwen3 normalises queries and keys per head
    source: str = "table"  # table | config.json | parameters

    @property
    def params(self) -> int:
        norms = self.layers * (2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)) + self.hidden
        return self.embedding_params + self.layers * self.linear_params_per_layer + norms

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def linear_params_per_layer(self) -> int:
        return sum(i * o for i, o in self.projections().values())

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of one decoder layer (Llama/Qwen naming)."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


def _shape(
    name: str,
    layers: int,
    hidden: int,
    intermediate: int,
    vocab: int,
    heads: int,
    kv: int,
    head_dim: int | None = None,
    tied: bool = False,
) -> ModelShape:
    return ModelShape(
        name,
        layers,
        hidden,
        intermediate,
        vocab,
        heads,
        kv,
        head_dim or hidden // heads,
        tied,
        qk_norm=name.startswith("Qwen/Qwen3"),
    )


# The profiles' models and their neighbours (public config.json values).
KNOWN_MODELS: dict[str, ModelShape] = {
    s.name.lower(): s
    for s in (
        _shape("Qwen/Qwen3-8B", 36, 4096, 12288, 151936, 32, 8, 128),  # ~8.2B
        _shape("Qwen/Qwen3-4B", 36, 2560, 9728, 151936, 32, 8, 128, tied=True),
        _shape("Qwen/Qwen3-1.7B", 28, 2048, 6144, 151936, 16, 8, 128, tied=True),
        _shape("Qwen/Qwen3-0.6B", 28, 1024, 3072, 151936, 16, 8, 128, tied=True),
        # EXAONE's config says "num_layers"; counted with an untied head (~2.7B, conservative).
        _shape("LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct", 30, 2560, 7168, 102400, 32, 8, 80),
        _shape("LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct", 32, 4096, 14336, 102400, 32, 8, 128),
    )
}
_LOCAL_8GB = "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct"
# Other architectures' names for the same projections (EXAONE 3.5: attention.out_proj, mlp.c_fc_0/1, c_proj).
MODULE_ALIASES = {"out_proj": "o_proj", "c_fc_0": "gate_proj", "c_fc_1": "up_proj", "c_proj": "down_proj"}


def shape_from_config(config: dict[str, Any], name: str = "model") -> ModelShape:
    """A shape from a transformers ``config.json`` (also EXAONE's and GPT-style key names)."""
    cfg = config.get("text_config") or config

    def first(*keys: str, default: Any = None) -> Any:
        for k in keys:
            if cfg.get(k) is not None:
                return cfg[k]
        return default

    hidden = first("hidden_size", "n_embd", "d_model")
    layers = first("num_hidden_layers", "num_layers", "n_layer")
    vocab = first("vocab_size")
    if not (hidden and layers and vocab):
        raise ValueError(f"{name}: config.json lacks hidden_size / num_hidden_layers / vocab_size")
    heads = first("num_attention_heads", "n_head", default=max(1, hidden // 128))
    return ModelShape(
        name=name,
        layers=int(layers),
        hidden=int(hidden),
        intermediate=int(first("intermediate_size", "ffn_dim", "n_inner", default=4 * hidden)),
        vocab=int(vocab),
        heads=int(heads),
        kv_heads=int(first("num_key_value_heads", default=heads)),
        head_dim=int(first("head_dim", default=hidden // heads)),
        tied_embeddings=bool(config.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
        qk_norm=str(cfg.get("model_type", config.get("model_type", ""))).startswith("qwen3"),
        source="config.json",
    )


def shape_from_params(params: int, name: str = "model") -> ModelShape:
    """A Llama-like shape of about ``params`` parameters (when only the count is known)."""
    layers = 32 if params > 3e9 else 28
    vocab = 150_000
    # params ~ 2 * vocab * h + layers * 12 * h^2 (4h^2 attention + 3 * h * 3h... MLP ~ 8h^2): solve for h.
    a, b, c = 12 * layers, 2 * vocab, -params
    hidden = int((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a))
    hidden = max(64, hidden - hidden % 64)
    heads = max(1, hidden // 128)
    return ModelShape(
        name, layers, hidden, int(hidden * 8 / 3), vocab, heads, heads, hidden // heads, source="parameters"
    )


def _cached_config(repo_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - bad id, hub library missing
        return None
    return path if isinstance(path, str) else None


def model_shape(base_model: str) -> ModelShape:
    """The shape of ``base_model``: its config.json (local directory or HF cache), else the table."""
    path: str | None = None
    if is_local_model_dir(base_model):
        path = str(Path(base_model).expanduser() / "config.json")
    elif not Path(base_model).expanduser().exists():
        path = _cached_config(base_model)
    if path:
        try:
            return shape_from_config(json.loads(Path(path).read_text(encoding="utf-8")), base_model)
        except (OSError, ValueError):
            pass
    known = KNOWN_MODELS.get(base_model.lower())
    if known is not None:
        return known
    raise TrainConfigError(
        f"finetune.base_model={base_model!r}: cannot read its config.json (not a local directory, not in the "
        f"Hugging Face cache) and it is not one of the known models ({', '.join(s.name for s in KNOWN_MODELS.values())}), "
        "so its memory cannot be estimated. Download it first, or set finetune.base_model to a local directory"
    )


# ----------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # cuda | cpu
    name: str
    total_bytes: int
    available_bytes: int | None = None

    @property
    def usable_bytes(self) -> int:
        if self.kind == "cuda":
            return int(self.total_bytes * USABLE_CUDA_SHARE)
        return int(self.available_bytes if self.available_bytes is not None else self.total_bytes)

    def describe(self) -> str:
        avail = "" if self.available_bytes is None else f", {self.available_bytes / GiB:.1f} GiB available"
        return f"{self.name} ({self.kind}, {self.total_bytes / GiB:.1f} GiB{avail})"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "CPU"


def device_info(device: str = "auto") -> DeviceInfo:
    """The training device as torch sees it (CUDA device 0), or the CPU and its RAM (psutil)."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        try:
            free, _ = torch.cuda.mem_get_info(0)
        except RuntimeError:
            free = None
        return DeviceInfo("cuda", props.name, int(props.total_memory), free)
    import os

    import psutil

    vm = psutil.virtual_memory()
    return DeviceInfo("cpu", f"{cpu_name()} x{os.cpu_count()}", int(vm.total), int(vm.available))


# ----------------------------------------------------------------------------- estimate


@dataclass
class MemoryEstimate:
    total_bytes: int
    parts: dict[str, int]
    shape: ModelShape
    assumptions: dict[str, Any] = field(default_factory=dict)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GiB

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_gib": round(self.total_gib, 2),
            "parts_gib": {k: round(v / GiB, 3) for k, v in self.parts.items()},
            "model": {**asdict(self.shape), "params": self.shape.params},
            "assumptions": self.assumptions,
        }

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in self.parts.items())
        return f"~{self.total_gib:.1f} GiB ({parts} GiB)"


def memory_breakdown(
    model: ModelShape | TrainConfig | str | int,
    *,
    load_in_4bit: bool | None = None,
    lora_r: int | None = None,
    batch: int | None = None,
    max_length: int | None = None,
    device: str | None = None,
    target_modules: tuple[str, ...] | list[str] | None = None,
    optim: str | None = None,
    gradient_checkpointing: bool | None = None,
) -> MemoryEstimate:
    """The estimate, part by part. ``model``: a shape, a ``TrainConfig`` (its values are the
    defaults of the keyword arguments), a model id/directory, or a parameter count."""
    cfg = model if isinstance(model, TrainConfig) else None
    if cfg is not None:
        shape = model_shape(cfg.base_model)
        device = device or cfg.resolved_device()
        load_in_4bit = cfg.load_in_4bit if load_in_4bit is None else load_in_4bit
        lora_r = lora_r or cfg.lora_r
        batch = batch or cfg.batch_size
        max_length = max_length or cfg.max_length
        target_modules = target_modules or cfg.target_modules
        optim = optim or cfg.optim
        if gradient_checkpointing is None:
            gradient_checkpointing = cfg.gradient_checkpointing
    elif isinstance(model, ModelShape):
        shape = model
    elif isinstance(model, int):
        shape = shape_from_params(model)
    else:
        shape = model_shape(str(model))
    device = device or "cuda"
    load_in_4bit = bool(load_in_4bit)
    lora_r = lora_r or 16
    batch = batch or 1
    max_length = max_length or 2048
    optim = optim or "adamw_torch"
    if gradient_checkpointing is None:
        gradient_checkpointing = device == "cuda"
    targets = [MODULE_ALIASES.get(m, m) for m in (target_modules or shape.projections())]
    dtype_bytes = 2 if device == "cuda" else 4

    proj = shape.projections()
    linear = shape.layers * shape.linear_params_per_layer
    other = shape.params - linear
    if load_in_4bit:
        biggest = max(i * o for i, o in proj.values())
        # bitsandbytes keeps the rest (embeddings, norms) at the compute dtype: bf16 on CUDA, fp32 on the CPU
        weights = int(linear * NF4_BYTES_PER_PARAM + other * dtype_bytes + biggest * dtype_bytes)
    else:
        weights = shape.params * dtype_bytes

    lora_params = shape.layers * sum(lora_r * (proj[m][0] + proj[m][1]) for m in targets if m in proj)
    optimizer_bytes = 2 if "8bit" in optim else (0 if optim == "sgd" else 8)
    lora = lora_params * (4 + 4 + optimizer_bytes)

    tokens = batch * max_length
    h, i = shape.hidden, shape.intermediate
    layer_working = tokens * (14 * h + 5 * i) * dtype_bytes
    lora_inputs = tokens * (6 * h + i) * dtype_bytes  # dropout copies of the adapters' inputs
    if gradient_checkpointing:
        activations = shape.layers * tokens * h * dtype_bytes + layer_working + lora_inputs
    else:
        activations = shape.layers * (layer_working + lora_inputs)
    logits = min(tokens, LOGIT_CHUNK_TOKENS) * shape.vocab * 4 * 2

    parts = {"weights": weights, "lora": lora, "activations": activations, "logits": logits}
    subtotal = sum(parts.values())
    if device == "cuda":
        parts["overhead"] = int(CUDA_CONTEXT_BYTES + CUDA_SLACK * subtotal)
    else:
        parts["overhead"] = CPU_OVERHEAD_BYTES
    return MemoryEstimate(
        total_bytes=int(sum(parts.values())),
        parts=parts,
        shape=shape,
        assumptions={
            "device": device,
            "load_in_4bit": load_in_4bit,
            "lora_r": lora_r,
            "batch": batch,
            "max_length": max_length,
            "optim": optim,
            "gradient_checkpointing": gradient_checkpointing,
            "lora_params": lora_params,
            "target_modules": targets,
        },
    )


def estimate_memory(
    model: ModelShape | TrainConfig | str | int,
    load_in_4bit: bool | None = None,
    lora_r: int | None = None,
    batch: int | None = None,
    max_length: int | None = None,
    **kwargs: Any,
) -> int:
    """Estimated peak training memory in bytes (see the module docstring for the model)."""
    return memory_breakdown(
        model, load_in_4bit=load_in_4bit, lora_r=lora_r, batch=batch, max_length=max_length, **kwargs
    ).total_bytes


def _local_8gb_estimate(device: str) -> MemoryEstimate:
    from floorplan_ft.settings import PROFILES

    ft = PROFILES["local-8gb"]["finetune"]
    return memory_breakdown(
        KNOWN_MODELS[_LOCAL_8GB.lower()],
        load_in_4bit=True,
        lora_r=ft["lora_r"],
        batch=ft["batch_size"],
        max_length=ft["max_length"],
        device=device,
        optim="adamw_8bit",
        gradient_checkpointing=True,
    )


def check_memory(
    config: TrainConfig,
    device: DeviceInfo | None = None,
    *,
    shape: ModelShape | None = None,
) -> MemoryEstimate:
    """The estimate when it fits on ``device`` (default: the one present); otherwise raise
    ``MemoryCheckError`` with the settings or profile that would fit."""
    device = device or device_info(config.resolved_device())
    shape = shape or model_shape(config.base_model)
    kw = {
        "load_in_4bit": config.load_in_4bit,
        "lora_r": config.lora_r,
        "batch": config.batch_size,
        "max_length": config.max_length,
        "device": device.kind,
        "target_modules": config.target_modules,
        "optim": config.optim,
        "gradient_checkpointing": config.gradient_checkpointing
        if config.gradient_checkpointing is not None
        else device.kind == "cuda",
    }
    est = memory_breakdown(shape, **kw)
    usable = device.usable_bytes
    if est.total_bytes <= usable:
        return est

    options: list[str] = []
    if device.kind == "cuda" and not config.load_in_4bit:
        e = memory_breakdown(shape, **{**kw, "load_in_4bit": True})
        if e.total_bytes <= usable:
            options.append(f"set finetune.load_in_4bit=true (QLoRA, ~{e.total_gib:.1f} GiB)")
    if device.kind == "cuda" and not kw["gradient_checkpointing"]:
        e = memory_breakdown(shape, **{**kw, "gradient_checkpointing": True})
        if e.total_bytes <= usable:
            options.append(f"set finetune.gradient_checkpointing=true (~{e.total_gib:.1f} GiB)")
    for b in sorted({1, max(1, config.batch_size // 2)}):
        if b >= config.batch_size:
            continue
        four = {"load_in_4bit": True} if device.kind == "cuda" else {}
        e = memory_breakdown(shape, **{**kw, **four, "batch": b})
        if e.total_bytes <= usable:
            accum = config.grad_accum * config.batch_size // b
            extra = " and finetune.load_in_4bit=true" if four and not config.load_in_4bit else ""
            options.append(
                f"set finetune.batch_size={b} with finetune.grad_accum={accum}{extra} "
                f"(same effective batch, ~{e.total_gib:.1f} GiB)"
            )
            break
    if shape.name.lower() != _LOCAL_8GB.lower() and device.kind == "cuda":
        e = _local_8gb_estimate(device.kind)
        if e.total_bytes <= usable:
            options.append(
                f"use the local-8gb profile (EXAONE 2.4B QLoRA, --profile local-8gb, ~{e.total_gib:.1f} GiB)"
            )
    if device.kind == "cpu":
        options.append("train on a CUDA machine (the production profile targets an A100 80 GB)")
    if not options:
        options.append(
            "use a larger GPU (the production profile targets an A100 80 GB) or a smaller finetune.base_model"
        )
    mode = "4-bit QLoRA" if kw["load_in_4bit"] else ("bf16" if device.kind == "cuda" else "fp32")
    raise MemoryCheckError(
        f"finetune.base_model={config.base_model} ({shape.params / 1e9:.1f}B parameters, {mode}, LoRA r "
        f"{config.lora_r}, batch {config.batch_size} x {config.max_length} tokens) needs {est.describe()} "
        f"to train, but {device.describe()} offers {usable / GiB:.1f} GiB. Options: " + "; ".join(options),
        est,
        device,
    )


# ----------------------------------------------------------------------------------- measured


def reset_peak_memory(device: str) -> None:
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


def free_memory() -> None:
    """Collect what a finished run left behind, and hand CUDA's cached blocks back."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
