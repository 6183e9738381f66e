"""Phase 6 configuration: one typed, validated view of ``settings.finetune`` plus the data paths.

``TrainConfig.from_settings(settings, store)`` copies the ``finetune`` group and the store's
``train.jsonl`` / ``val.jsonl`` paths. The fields that are ``finetune`` settings take their defaults
and help texts from ``FinetuneSettings`` (written once, there). ``validate()`` fails early, before anything is loaded, with
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from floorplan_ft.settings import FinetuneSettings
from floorplan_ft.store import ArtifactStore, Layout

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


def _setting(name: str, convert: Callable[[Any], Any] | None = None, *, required: bool = False) -> Any:
    """A field whose default and help text are ``FinetuneSettings.{name}``'s (one place for both);
    ``required``: the help text only."""
    info = FinetuneSettings.model_fields[name]
    metadata = {"setting": f"finetune.{name}", "help": info.description}
    if required:
        return field(metadata=metadata)
    default = info.get_default(call_default_factory=True)
    return field(default=convert(default) if convert else default, metadata=metadata)


def _run(help_text: str, **default: Any) -> Any:
    """A field of the run itself (paths, serving name), not a ``finetune`` setting."""
    return field(metadata={"help": help_text}, **default)


@dataclass(frozen=True)
class TrainConfig:
    """``settings.finetune`` for one run, plus its data paths. A field made with ``_setting`` is the
    ``finetune`` setting of that name: its default and help text are ``FinetuneSettings``' and
    ``from_settings`` copies it; ``_run`` fields belong to the run (paths, serving name)."""

    base_model: str = _setting("base_model", required=True)  # a run names its base model
    data_root: str = _run("The data root (paths.data_root): the student's outputs go under it.")
    train_path: str = _run("train.jsonl (phase 5).")
    val_path: str = _run("val.jsonl (phase 5).")
    stats_path: str | None = _run("stats_report.json (phase 5): the split's plan stems and provenance.", default=None)
    student_name: str = _setting("student_name")
    backend: str = _setting("backend")
    device: str = _setting("device")
    load_in_4bit: bool = _setting("load_in_4bit")
    lora_r: int = _setting("lora_r")
    lora_alpha: int = _setting("lora_alpha")
    lora_dropout: float = _setting("lora_dropout")
    target_modules: tuple[str, ...] = _setting("target_modules", tuple)
    learning_rate: float = _setting("learning_rate")
    lr_scheduler: str = _setting("lr_scheduler")
    warmup_ratio: float = _setting("warmup_ratio")
    epochs: float = _setting("epochs", float)
    max_steps: int = _setting("max_steps")
    batch_size: int = _setting("batch_size")
    grad_accum: int = _setting("grad_accum")
    max_length: int = _setting("max_length")
    logging_steps: int = _setting("logging_steps")
    eval_steps: int = _setting("eval_steps")
    save_steps: int = _setting("save_steps")
    early_stopping_patience: int = _setting("early_stopping_patience")
    optim: str = _setting("optim")
    merge: bool = _setting("merge")
    seed: int = _setting("seed")
    gradient_checkpointing: bool | None = _setting("gradient_checkpointing")
    enable_thinking: bool = _run("Qwen3 students train and serve in non-thinking mode.", default=False)
    save_total_limit: int = _setting("save_total_limit")
    cpu_threads: int | None = _setting("cpu_threads")
    eval_limit: int | None = _setting("eval_limit")
    trust_remote_code: bool = _setting("trust_remote_code")
    vllm_max_lora_rank: int = _setting("vllm_max_lora_rank")
    eval_max_tokens: int = _setting("eval_max_tokens")
    lora_module_name: str = _run(
        "The name the adapter is served under (--lora-modules NAME=...); finetune.eval_model when set.",
        default="cv_agent",
    )

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_settings(cls, settings: Any, store: Any = None, **overrides: Any) -> TrainConfig:
        """The config of ``settings.finetune``; data paths from ``store`` (else ``paths.data_root``)."""
        ft = settings.finetune
        store = store or ArtifactStore(settings.paths.data_root)
        values: dict[str, Any] = {
            "data_root": store.root,
            "train_path": store.layout.run_file("train"),
            "val_path": store.layout.run_file("val"),
            "stats_path": store.layout.run_file("stats_report"),
            **{name: getattr(ft, name) for name in setting_fields()},
        }
        values["target_modules"] = tuple(values["target_modules"])
        values["epochs"] = float(values["epochs"])
        if ft.eval_model:
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
        return Layout(self.data_root.rstrip("/")).student_dir(self.student_name, *parts)

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
        errors = [
            *self._device_errors(cuda),
            *self._backend_errors(device, unsloth),
            *self._bitsandbytes_errors(device, bnb_version),
            *self._value_errors(),
            *self._location_errors(),
        ]
        from floorplan_ft.training.preflight import vllm_lora_errors

        errors += vllm_lora_errors(self)  # the adapter must be servable by the team's vLLM
        if errors:
            raise TrainConfigError("invalid fine-tune configuration: " + "; ".join(errors))

    def _device_errors(self, cuda: bool) -> list[str]:
        errors = []
        if self.device not in ("auto", "cpu", "cuda"):
            errors.append(f"finetune.device={self.device!r} is not one of auto, cpu, cuda")
        if self.device == "cuda" and not cuda:
            errors.append(
                "finetune.device=cuda but CUDA is not available here (no GPU or a CPU-only torch). "
                "Set finetune.device=cpu or auto, or use a profile made for this machine (--profile demo on a CPU)"
            )
        return errors

    def _backend_errors(self, device: str, unsloth: Any = _PROBE) -> list[str]:
        """``unsloth``: the installed unsloth version (None: not installed; default: this machine's)."""
        if self.backend not in ("auto", "trl", "unsloth"):
            return [f"finetune.backend={self.backend!r} is not one of auto, trl, unsloth"]
        if self.backend != "unsloth":
            return []
        installed = unsloth_version() if unsloth is _PROBE else unsloth
        if installed is None:
            return [
                (
                    "finetune.backend=unsloth but unsloth is not installed. Install the gpu extra "
                    "(pip install 'ft-pipeline[gpu]') or set finetune.backend=trl (or auto)"
                )
            ]
        if device != "cuda" and (
            _version_tuple(installed) < UNSLOTH_CPU_MIN or os.environ.get("UNSLOTH_DISABLE_CPU_FALLBACK") == "1"
        ):
            return [
                (
                    f"finetune.backend=unsloth on the CPU needs Unsloth's CPU fallback (unsloth >= "
                    f"{'.'.join(map(str, UNSLOTH_CPU_MIN))}, UNSLOTH_DISABLE_CPU_FALLBACK unset); unsloth {installed} "
                    "is installed. Set finetune.backend=trl (or auto, which picks TRL on the CPU)"
                )
            ]
        return []

    def _bitsandbytes_errors(self, device: str, bnb_version: Any = _PROBE) -> list[str]:
        """4-bit loading and 8-bit optimizers need bitsandbytes (``bnb_version``: as in ``validate``)."""
        bnb_optim = "8bit" in self.optim or "bnb" in self.optim or "paged" in self.optim
        if not (self.load_in_4bit or bnb_optim):
            return []
        version = bitsandbytes_version() if bnb_version is _PROBE else bnb_version
        what = "finetune.load_in_4bit=true" if self.load_in_4bit else f"finetune.optim={self.optim!r}"
        off = "set finetune.load_in_4bit=false and finetune.optim=adamw_torch (the demo profile does)"
        if version is None:
            return [
                (
                    f"{what} needs bitsandbytes, which is not installed: install the gpu extra "
                    f"(pip install 'ft-pipeline[gpu]'), or {off}"
                )
            ]
        if device != "cuda" and _version_tuple(version) < BNB_CPU_MIN:
            return [
                (
                    f"{what} on the CPU needs bitsandbytes >= {'.'.join(map(str, BNB_CPU_MIN))} (CPU kernels), "
                    f"but {version} is installed: upgrade it, run on a CUDA machine, or {off}"
                )
            ]
        return []

    def _value_errors(self) -> list[str]:
        """Schedule, sizes and ranges (the checks ``FinetuneSettings`` makes too, for a config built by hand)."""
        errors = []
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
        return errors + self._early_stopping_errors()

    def _early_stopping_errors(self) -> list[str]:
        if self.early_stopping_patience < 0:
            return [f"finetune.early_stopping_patience={self.early_stopping_patience} must be 0 (off) or more"]
        if self.early_stopping_patience > 0 and self.eval_steps > 0 and self.save_steps % self.eval_steps:
            fixed = max(self.eval_steps, (self.save_steps // self.eval_steps) * self.eval_steps)
            return [
                (
                    f"finetune.save_steps={self.save_steps} must be a multiple of finetune.eval_steps={self.eval_steps} "
                    "when early stopping keeps the best checkpoint (load_best_model_at_end). "
                    f"Set finetune.save_steps={fixed}, or finetune.early_stopping_patience=0"
                )
            ]
        return []

    def _location_errors(self) -> list[str]:
        errors = []
        if not str(self.base_model).strip():
            errors.append("finetune.base_model is empty: set a hub id (e.g. Qwen/Qwen3-8B) or a local model directory")
        if "://" in self.data_root and not self.data_root.startswith("file://"):
            errors.append(
                f"paths.data_root={self.data_root!r} is remote: training writes checkpoints with the local "
                "filesystem. Mount the bucket (or a network volume) and set paths.data_root to the local path"
            )
        return errors

    def check_data(self) -> None:
        """The training files exist (written by step 5)."""
        for key, path in (("train", self.train_path), ("val", self.val_path)):
            if not Path(path).is_file():
                raise TrainConfigError(
                    f"{path} ({key}.jsonl) does not exist: run step 5 (build the training data) first, "
                    "or point paths.data_root at the data root that holds it"
                )


def setting_fields() -> tuple[str, ...]:
    """The ``TrainConfig`` fields that are ``finetune`` settings of the same name (``from_settings``
    copies them; their defaults and help texts are ``FinetuneSettings``')."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if "setting" in f.metadata)


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
