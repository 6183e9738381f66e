"""Phase 6 configuration: one typed, validated view of ``settings.finetune`` plus the data paths.

``TrainConfig.from_settings(settings, store)`` copies the ``finetune`` group (and, when present,
the optional ``finetune.cpu_threads`` / ``finetune.eval_limit`` settings) and the store's
``train.jsonl`` / ``val.jsonl`` paths. ``validate()`` fails early, before anything is loaded, with
a message that names the setting and the fix (the way TRL's config errors read), e.g.::

    finetune.device=cuda but CUDA is not available here (no GPU or a CPU-only torch). Set
    finetune.device=cpu or auto, or use a profile made for this machine (--profile demo on a CPU)

Output layout under the data root (``{student}`` = ``finetune.student_name``)::

    {student}/checkpoints/checkpoint-N/   every save_steps; the last one is resumed automatically
    {student}/adapter_model/              LoRA adapter + tokenizer + README.md (model card)
    {student}/merged_model/               optional: base + adapter merged (bf16 on CUDA, fp32 on CPU)
    {student}/training_log.json           loss curves (step, loss, eval_loss, learning_rate)
    {student}/training_curves.png         the same as a chart
    {student}/train_result.json           what the run did (reused by a rerun with the same inputs)
    {student}/eval_report.json            the student evaluation
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# transformers' SchedulerType values (kept here so validation needs no heavy import).
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)
CPU_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop")
# bitsandbytes ships CPU kernels (NF4 4-bit layers, 8-bit optimizers) in this release and later: the
# QLoRA path of the production profile then runs on a CPU too (slowly; the tests use it on tiny models).
BNB_CPU_MIN = (0, 50)
# Unsloth falls back to a CPU implementation of FastLanguageModel (plain transformers + PEFT + TRL)
# from this release on, instead of refusing to import without a GPU.
UNSLOTH_CPU_MIN = (2026, 10, 9)
_PROBE = object()


class TrainConfigError(ValueError):
    """The fine-tune cannot start as configured; the message names the setting and the fix."""


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return False
    return bool(torch.cuda.is_available())


def unsloth_available() -> bool:
    """Unsloth is installed (the ``gpu`` extra). Importing it is left to the backend: it patches
    transformers/TRL on import. ``auto`` picks it on CUDA only."""
    return importlib.util.find_spec("unsloth") is not None


def _dist_version(module: str, dist: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:  # pragma: no cover - importable but without metadata
        return "0"


def unsloth_version() -> str | None:
    """The installed unsloth version (None: not installed), without importing it (it patches
    transformers and TRL on import)."""
    return _dist_version("unsloth", "unsloth")


def bitsandbytes_version() -> str | None:
    """The installed bitsandbytes version (None: not installed), read from the package metadata:
    importing bitsandbytes is slow and noisy."""
    return _dist_version("bitsandbytes", "bitsandbytes")


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def is_local_model_dir(name: str) -> bool:
    p = Path(name).expanduser()
    return p.is_dir() and (p / "config.json").is_file()


@dataclass(frozen=True)
class TrainConfig:
    base_model: str
    data_root: str
    train_path: str
    val_path: str
    stats_path: str | None = None
    student_name: str = "student"
    backend: str = "auto"  # auto | trl | unsloth
    device: str = "auto"  # auto | cpu | cuda
    load_in_4bit: bool = True
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    epochs: float = 3.0
    max_steps: int = -1
    batch_size: int = 2
    grad_accum: int = 8
    max_length: int = 4096
    logging_steps: int = 10
    eval_steps: int = 100
    save_steps: int = 100
    early_stopping_patience: int = 3
    optim: str = "adamw_8bit"
    merge: bool = False
    seed: int = 42
    gradient_checkpointing: bool | None = None  # None: on for CUDA, off on the CPU
    enable_thinking: bool = False  # Qwen3 students train and serve in non-thinking mode
    save_total_limit: int = 2
    cpu_threads: int | None = None
    eval_limit: int | None = None  # evaluate only the first N val rows (None: all)
    trust_remote_code: bool = False  # models whose code is not in transformers (EXAONE 3.5)
    vllm_max_lora_rank: int = 64  # the serving vLLM's --max-lora-rank (the adapter's r must fit)
    eval_max_tokens: int = 8000  # max_tokens of one request to that server
    lora_module_name: str = "cv_agent"  # the name the adapter is served under (--lora-modules NAME=...)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_settings(cls, settings: Any, store: Any = None, **overrides: Any) -> TrainConfig:
        """The config of ``settings.finetune``; data paths from ``store`` (else ``paths.data_root``)."""
        ft = settings.finetune
        if store is None:
            from floorplan_ft.store import ArtifactStore

            store = ArtifactStore(settings.paths.data_root)
        values: dict[str, Any] = {
            "base_model": ft.base_model,
            "data_root": store.root,
            "train_path": store.layout.run_file("train"),
            "val_path": store.layout.run_file("val"),
            "stats_path": store.layout.run_file("stats_report"),
            "student_name": ft.student_name,
            "backend": ft.backend,
            "device": ft.device,
            "load_in_4bit": ft.load_in_4bit,
            "lora_r": ft.lora_r,
            "lora_alpha": ft.lora_alpha,
            "lora_dropout": ft.lora_dropout,
            "target_modules": tuple(ft.target_modules),
            "learning_rate": ft.learning_rate,
            "lr_scheduler": ft.lr_scheduler,
            "warmup_ratio": ft.warmup_ratio,
            "epochs": float(ft.epochs),
            "max_steps": ft.max_steps,
            "batch_size": ft.batch_size,
            "grad_accum": ft.grad_accum,
            "max_length": ft.max_length,
            "logging_steps": ft.logging_steps,
            "eval_steps": ft.eval_steps,
            "save_steps": ft.save_steps,
            "early_stopping_patience": ft.early_stopping_patience,
            "optim": ft.optim,
            "merge": ft.merge,
            "seed": getattr(ft, "seed", getattr(settings.dataset, "seed", 42)),
        }
        # Settings this module reads when they exist (asked for; absent in older settings files).
        for name in (
            "gradient_checkpointing",
            "cpu_threads",
            "eval_limit",
            "save_total_limit",
            "trust_remote_code",
            "vllm_max_lora_rank",
            "eval_max_tokens",
        ):
            if hasattr(ft, name):
                values[name] = getattr(ft, name)
        if getattr(ft, "eval_model", None):
            values["lora_module_name"] = ft.eval_model
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ derived

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if _cuda_available() else "cpu"
        return self.device

    def resolved_backend(self) -> str:
        """``auto``: Unsloth on CUDA when the ``gpu`` extra is installed, else TRL."""
        if self.backend != "auto":
            return self.backend
        return "unsloth" if self.resolved_device() == "cuda" and unsloth_available() else "trl"

    def use_gradient_checkpointing(self) -> bool:
        if self.gradient_checkpointing is not None:
            return self.gradient_checkpointing
        return self.resolved_device() == "cuda"

    def _out(self, *parts: str) -> str:
        return "/".join([self.data_root.rstrip("/"), self.student_name, *parts])

    @property
    def student_dir(self) -> str:
        return self._out()

    @property
    def checkpoints_dir(self) -> str:
        return self._out("checkpoints")

    @property
    def adapter_dir(self) -> str:
        return self._out("adapter_model")

    @property
    def merged_dir(self) -> str:
        return self._out("merged_model")

    @property
    def log_path(self) -> str:
        return self._out("training_log.json")

    @property
    def curves_path(self) -> str:
        return self._out("training_curves.png")

    @property
    def result_path(self) -> str:
        return self._out("train_result.json")

    @property
    def eval_report_path(self) -> str:
        return self._out("eval_report.json")

    def training_parameters(self) -> dict[str, Any]:
        """What determines the trained weights (the model card's parameters and the resume key)."""
        keys = (
            "base_model",
            "load_in_4bit",
            "lora_r",
            "lora_alpha",
            "lora_dropout",
            "target_modules",
            "learning_rate",
            "lr_scheduler",
            "warmup_ratio",
            "epochs",
            "max_steps",
            "batch_size",
            "grad_accum",
            "max_length",
            "optim",
            "seed",
            "enable_thinking",
            "eval_steps",
            "early_stopping_patience",
        )
        out = {k: getattr(self, k) for k in keys}
        out["target_modules"] = list(self.target_modules)
        return out

    def fingerprint(self, data_hashes: dict[str, str]) -> str:
        payload = {"parameters": self.training_parameters(), "data": data_hashes}
        text = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ validation

    def validate(self, *, cuda_available: bool | None = None, bnb_version: Any = _PROBE, unsloth: Any = _PROBE) -> None:
        """Raise ``TrainConfigError`` naming the setting and the fix; loads nothing.

        ``cuda_available`` / ``bnb_version`` / ``unsloth`` replace what this machine has (tests):
        a version string, or None for "not installed"."""
        cuda = _cuda_available() if cuda_available is None else cuda_available
        device = self.device if self.device != "auto" else ("cuda" if cuda else "cpu")
        errors: list[str] = []
        if self.device not in ("auto", "cpu", "cuda"):
            errors.append(f"finetune.device={self.device!r} is not one of auto, cpu, cuda")
        if self.device == "cuda" and not cuda:
            errors.append(
                "finetune.device=cuda but CUDA is not available here (no GPU or a CPU-only torch). "
                "Set finetune.device=cpu or auto, or use a profile made for this machine (--profile demo on a CPU)"
            )
        if self.backend not in ("auto", "trl", "unsloth"):
            errors.append(f"finetune.backend={self.backend!r} is not one of auto, trl, unsloth")
        if self.backend == "unsloth":
            installed = unsloth_version() if unsloth is _PROBE else unsloth
            if installed is None:
                errors.append(
                    "finetune.backend=unsloth but unsloth is not installed. Install the gpu extra "
                    "(pip install 'ft-pipeline[gpu]') or set finetune.backend=trl (or auto)"
                )
            elif device != "cuda" and (
                _version_tuple(installed) < UNSLOTH_CPU_MIN or os.environ.get("UNSLOTH_DISABLE_CPU_FALLBACK") == "1"
            ):
                errors.append(
                    f"finetune.backend=unsloth on the CPU needs Unsloth's CPU fallback (unsloth >= "
                    f"{'.'.join(map(str, UNSLOTH_CPU_MIN))}, UNSLOTH_DISABLE_CPU_FALLBACK unset); unsloth {installed} "
                    "is installed. Set finetune.backend=trl (or auto, which picks TRL on the CPU)"
                )
        bnb_optim = "8bit" in self.optim or "bnb" in self.optim or "paged" in self.optim
        if self.load_in_4bit or bnb_optim:
            what = "finetune.load_in_4bit=true" if self.load_in_4bit else f"finetune.optim={self.optim!r}"
            version = bitsandbytes_version() if bnb_version is _PROBE else bnb_version
            off = "set finetune.load_in_4bit=false and finetune.optim=adamw_torch (the demo profile does)"
            if version is None:
                errors.append(
                    f"{what} needs bitsandbytes, which is not installed: install the gpu extra "
                    f"(pip install 'ft-pipeline[gpu]'), or {off}"
                )
            elif device != "cuda" and _version_tuple(version) < BNB_CPU_MIN:
                errors.append(
                    f"{what} on the CPU needs bitsandbytes >= {'.'.join(map(str, BNB_CPU_MIN))} (CPU kernels), "
                    f"but {version} is installed: upgrade it, run on a CUDA machine, or {off}"
                )
        if self.lr_scheduler not in LR_SCHEDULERS:
            errors.append(
                f"finetune.lr_scheduler={self.lr_scheduler!r} is unknown; use one of {', '.join(LR_SCHEDULERS)}"
            )
        if self.max_steps == 0 or self.max_steps < -1:
            errors.append(f"finetune.max_steps={self.max_steps}: use a positive number, or -1 to train by epochs")
        for name in (
            "lora_r",
            "lora_alpha",
            "batch_size",
            "grad_accum",
            "max_length",
            "logging_steps",
            "eval_steps",
            "save_steps",
        ):
            if getattr(self, name) <= 0:
                errors.append(f"finetune.{name}={getattr(self, name)} must be positive")
        if not 0 <= self.lora_dropout < 1:
            errors.append(f"finetune.lora_dropout={self.lora_dropout} must be in [0, 1)")
        if not 0 <= self.warmup_ratio < 1:
            errors.append(f"finetune.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if not self.target_modules:
            errors.append(
                "finetune.target_modules is empty: list the projections that get adapters "
                "(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
            )
        if self.early_stopping_patience < 0:
            errors.append(f"finetune.early_stopping_patience={self.early_stopping_patience} must be 0 (off) or more")
        if self.early_stopping_patience > 0 and self.eval_steps > 0 and self.save_steps % self.eval_steps:
            fixed = max(self.eval_steps, (self.save_steps // self.eval_steps) * self.eval_steps)
            errors.append(
                f"finetune.save_steps={self.save_steps} must be a multiple of finetune.eval_steps={self.eval_steps} "
                "when early stopping keeps the best checkpoint (load_best_model_at_end). "
                f"Set finetune.save_steps={fixed}, or finetune.early_stopping_patience=0"
            )
        if not str(self.base_model).strip():
            errors.append("finetune.base_model is empty: set a hub id (e.g. Qwen/Qwen3-8B) or a local model directory")
        if "://" in self.data_root and not self.data_root.startswith("file://"):
            errors.append(
                f"paths.data_root={self.data_root!r} is remote: training writes checkpoints with the local "
                "filesystem. Mount the bucket (or a network volume) and set paths.data_root to the local path"
            )
        from floorplan_ft.training.preflight import vllm_lora_errors

        errors += vllm_lora_errors(self)  # the adapter must be servable by the team's vLLM
        if errors:
            raise TrainConfigError("invalid fine-tune configuration: " + "; ".join(errors))

    def check_data(self) -> None:
        """The training files exist (written by step 5)."""
        for key, path in (("train", self.train_path), ("val", self.val_path)):
            if not Path(path).is_file():
                raise TrainConfigError(
                    f"{path} ({key}.jsonl) does not exist: run step 5 (build the training data) first, "
                    "or point paths.data_root at the data root that holds it"
                )


def resolve_base_model(name: str) -> tuple[str, str | None]:
    """(local directory to load, hub id or None). A local directory is used as is; a hub id only
    from the local Hugging Face cache (this pipeline never downloads weights at training time)."""
    if is_local_model_dir(name):
        return str(Path(name).expanduser().resolve()), None
    if Path(name).expanduser().exists():
        raise TrainConfigError(
            f"finetune.base_model={name!r} is a directory without config.json: point it at a model directory "
            "(config.json and weights), or at a hub id that is in the local Hugging Face cache"
        )
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(name, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - not cached, bad id, hub library missing
        raise TrainConfigError(
            f"finetune.base_model={name!r} is neither a local model directory nor in the local Hugging Face cache "
            f"({type(exc).__name__}). Download it once where there is network (`hf download {name}`, with "
            "HF_HOME pointing at the cache this machine uses), or set finetune.base_model to a local directory"
        ) from None
    if not (Path(path) / "config.json").is_file():
        raise TrainConfigError(f"finetune.base_model={name!r}: the cached snapshot {path} has no config.json")
    return path, name
