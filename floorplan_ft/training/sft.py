"""Phase 6a: LoRA fine-tune of the student on the phase-5 rows (TRL + PEFT, or Unsloth on CUDA).

``run_finetune`` is the phase: ``train`` (reusing a finished run, resuming an interrupted one), then
``merge_adapter`` when ``finetune.merge``. ``train`` reads as the run: ``prepare`` validates, checks
memory, loads the model and encodes the rows (``data``, ``backends``), ``checkpoints`` decides where
to start, the trainer runs, and the adapter, its model card, the training log and chart and
``train_result.json`` are written (``reporting``), the adapter folder appearing complete or not at all.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from floorplan_ft.store import ArtifactStore
from floorplan_ft.training.backends import LogFn, build_trainer, load_model, selection_warnings
from floorplan_ft.training.checkpoints import prepare_checkpoints, reusable_result
from floorplan_ft.training.config import TrainConfig
from floorplan_ft.training.data import EncodedSplit, data_summary, encode_splits, read_splits, split_summary
from floorplan_ft.training.memory import (
    MemoryEstimate,
    check_memory,
    describe_peak,
    device_info,
    free_memory,
    measure_peak_memory,
    reset_peak_memory,
)
from floorplan_ft.training.merge import merge_adapter
from floorplan_ft.training.reporting import TrainResult, history_records, model_card, train_result, write_reports

log = logging.getLogger(__name__)


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
    device, backend = config.resolved_device(), config.resolved_backend()
    warnings = selection_warnings(config, device, backend)
    data = data_summary(config, store)
    train_rows, val_rows = read_splits(config, store)
    fingerprint = config.fingerprint({"train": data["train_sha256"], "val": data["val_sha256"]})
    memory = check_memory(config, device_info(device)) if check_memory_first else None  # before any weight
    loaded = load_model(config, backend, device)
    train_split, val_split, split_warnings = encode_splits(config, loaded.tokenizer, train_rows, val_rows)
    warnings += split_warnings
    data.update(split_summary(train_split, val_split))
    for msg in warnings:
        log.warning(msg)
    trainer = build_trainer(config, loaded, device, backend, train_split, val_split, on_log=on_log, callbacks=callbacks)
    return Prepared(
        config,
        trainer,
        loaded.tokenizer,
        backend,
        device,
        loaded.base_path,
        loaded.hub_id,
        train_split,
        val_split,
        data,
        fingerprint,
        memory,
        warnings,
    )


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
        reused = reusable_result(config, store)
        if reused is not None:
            log.info(
                "finished run %s found in %s: reused (force=True retrains)", reused.fingerprint, config.result_path
            )
            return reused
    started = time.perf_counter()
    Path(config.result_path).unlink(missing_ok=True)  # a result of another run must not outlive its adapter
    prep = prepare(config, store, on_log=on_log, callbacks=callbacks)
    resume_from = prepare_checkpoints(config, prep.fingerprint, resume)
    if resume_from:
        log.info("resuming from %s", resume_from)
    output, peak = _run_trainer(prep, resume_from)
    records = _history(prep)
    staging, serve_line = _save_adapter(config, prep)
    result = train_result(
        config,
        prep,
        output,
        records,
        resume_from=resume_from,
        runtime_s=round(time.perf_counter() - started, 2),
        peak=peak,
        vllm_serve=serve_line,
    )
    (staging / "README.md").write_text(model_card(config, result, prep.data), encoding="utf-8")
    _publish_adapter(staging, Path(config.adapter_dir))
    write_reports(config, store, result, records)
    if keep_model:
        result.model = prep.trainer.model
    prep = output = None
    free_memory()
    return result


def _run_trainer(prep: Prepared, resume_from: str | None) -> tuple[Any, dict[str, Any]]:
    """``trainer.train()`` and the peak memory it measured."""
    reset_peak_memory(prep.device)
    output = prep.trainer.train(resume_from_checkpoint=resume_from)
    peak = measure_peak_memory(prep.device)
    if prep.memory:
        log.info("memory: estimated %.1f GiB, measured %s", prep.memory.total_gib, describe_peak(peak))
    return output, peak


def _history(prep: Prepared) -> list[dict[str, Any]]:
    """The log records; one validation loss is recorded for the card when no eval step was reached."""
    state = prep.trainer.state
    records = history_records(state.log_history)
    if prep.val.examples and not any(r["eval_loss"] is not None for r in records):
        prep.trainer.evaluate()
        records = history_records(state.log_history)
    return records


def _save_adapter(config: TrainConfig, prep: Prepared) -> tuple[Path, str]:
    """The adapter, tokenizer and chat template (what vLLM loads) in a staging folder beside the
    adapter's, pointing at the base by hub id when it has one; and the ``vllm serve`` line for it."""
    from floorplan_ft.training.preflight import finish_adapter, vllm_serve_command

    adapter_dir = Path(config.adapter_dir)
    staging = adapter_dir.with_name(adapter_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model = prep.trainer.model
    base_ref = prep.hub_id or prep.base_path
    for peft_cfg in getattr(model, "peft_config", {}).values():
        peft_cfg.base_model_name_or_path = base_ref
    model.save_pretrained(str(staging))
    prep.tokenizer.save_pretrained(str(staging))
    finish_adapter(staging, prep.tokenizer)
    return staging, vllm_serve_command(config, base_ref, adapter_dir)


def _publish_adapter(staging: Path, adapter_dir: Path) -> None:
    """Swap the staged adapter in: the adapter folder appears complete or not at all."""
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    staging.rename(adapter_dir)


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
