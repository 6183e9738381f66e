"""Phase 6 backends: which one trains, how it loads the model, and the TRL trainer it runs in.

``trl``: ``AutoModelForCausalLM`` (fp32 on the CPU, bf16/fp16 on CUDA; 4-bit NF4 through
``BitsAndBytesConfig`` + ``prepare_model_for_kbit_training`` when ``load_in_4bit``, on CUDA or, with
bitsandbytes' CPU kernels, on the CPU) and PEFT LoRA; 8-bit AdamW from bitsandbytes likewise.
``unsloth`` (imported lazily): ``FastLanguageModel.from_pretrained`` + ``get_peft_model``. ``auto``
picks Unsloth on CUDA when it is installed; asked for by name on a CPU, Unsloth's own CPU fallback
runs (slowly, and it swaps 8-bit optimizers for AdamW), which is how the tests exercise this path.

Either way the trainer is TRL's ``SFTTrainer`` on the pre-tokenized rows (``skip_prepare_dataset``),
with validation loss every ``eval_steps``, ``EarlyStoppingCallback`` with ``load_best_model_at_end``
when ``early_stopping_patience`` > 0, and checkpoints every ``save_steps`` under
``{student}/checkpoints/``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from floorplan_ft.training.config import TrainConfig, TrainConfigError, resolve_base_model, unsloth_available
from floorplan_ft.training.data import EncodedSplit, to_dataset

log = logging.getLogger(__name__)

LogFn = Callable[[dict[str, Any]], None]

# bitsandbytes' CPU inference kernel repacks NF4 weights in blocks of 64 input features (evaluation
# steps run it); a narrower layer fails there with a reshape error, so refuse it before training.
CPU_4BIT_MIN_FEATURES = 64


def selection_warnings(config: TrainConfig, device: str, backend: str) -> list[str]:
    """What the run should know about the backend it got."""
    if config.backend == "auto" and device == "cuda" and backend == "trl" and not unsloth_available():
        log.info("unsloth is not installed: training with TRL + PEFT")
    if backend == "unsloth" and device == "cpu":
        fallback = (
            "finetune.backend=unsloth on the CPU: Unsloth's CPU fallback trains (slowly, and with "
            "AdamW in place of 8-bit optimizers); finetune.backend=auto picks TRL here"
        )
        return [fallback]
    return []


@dataclass
class LoadedModel:
    """The base model with its adapter set-up, its tokenizer, and where it was loaded from."""

    model: Any
    tokenizer: Any
    peft_config: Any  # PEFT's LoraConfig for the trainer to apply (None: the backend applied it)
    base_path: str
    hub_id: str | None


def load_model(config: TrainConfig, backend: str, device: str) -> LoadedModel:
    """Resolve the base model (local directory or the local HF cache), check its projections on the
    meta device, then load it with the backend's loader; the tokenizer pads with EOS when it has no pad."""
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
    return LoadedModel(model, tokenizer, peft_config, base_path, hub_id)


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


def _trl_load_kwargs(config: TrainConfig, device: str, trust_remote_code: bool) -> dict[str, Any]:
    """``from_pretrained`` arguments: the compute dtype, and NF4 quantisation when ``load_in_4bit``."""
    import torch

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
    return kwargs


def _load_trl(config: TrainConfig, base_path: str, device: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    kwargs = _trl_load_kwargs(config, device, trust_remote_code)
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


def sft_config(config: TrainConfig, device: str, backend: str, has_val: bool):
    """TRL's ``SFTConfig`` of the run."""
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


def build_trainer(
    config: TrainConfig,
    loaded: LoadedModel,
    device: str,
    backend: str,
    train: EncodedSplit,
    val: EncodedSplit,
    *,
    on_log: LogFn | None = None,
    callbacks: Sequence[Any] = (),
):
    """The ``SFTTrainer`` on the encoded rows; its records go to the logger (and ``on_log``), not stdout."""
    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer

    has_val = bool(val.examples)
    args = sft_config(config, device, backend, has_val)
    cbs = [*callbacks, _log_relay(on_log)]
    if has_val and config.early_stopping_patience > 0:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    trainer = SFTTrainer(
        model=loaded.model,
        args=args,
        train_dataset=to_dataset(train.examples),
        eval_dataset=to_dataset(val.examples) if has_val else None,
        processing_class=loaded.tokenizer,
        peft_config=loaded.peft_config,
        callbacks=cbs,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer
