"""Phase 6 checkpoints: resume a run, or reuse a finished one.

A rerun resumes from the last complete checkpoint when the run's fingerprint (training parameters +
data hashes, in ``checkpoints/run.json``) is unchanged; a changed run moves the old checkpoints
aside. A rerun after a finished run with the same fingerprint reuses ``train_result.json``
(``force=True`` retrains).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from floorplan_ft.store import ArtifactStore
from floorplan_ft.training.config import TrainConfig
from floorplan_ft.training.data import split_hashes
from floorplan_ft.training.reporting import TrainResult

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


def reusable_result(config: TrainConfig, store: ArtifactStore) -> TrainResult | None:
    """The finished run's result when its adapter is there and its fingerprint is this config's on
    this data (marked ``reused``); None otherwise."""
    path = Path(config.result_path)
    if not path.is_file() or not (Path(config.adapter_dir) / "adapter_config.json").is_file():
        return None
    try:
        previous = TrainResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
        hashes = split_hashes(config, store)
    except (ValueError, TypeError, OSError):
        return None
    if previous.fingerprint != config.fingerprint(hashes):
        return None
    previous.reused = True
    return previous


def _previous_fingerprint(run_file: Path) -> str | None:
    if not run_file.is_file():
        return None
    try:
        return json.loads(run_file.read_text()).get("fingerprint")
    except ValueError:
        return None


def prepare_checkpoints(config: TrainConfig, fingerprint: str, resume: bool) -> str | None:
    """The checkpoint to resume from (None: start fresh). Checkpoints of another run (other
    parameters or data) are moved aside, never mixed."""
    ckpt = Path(config.checkpoints_dir)
    run_file = ckpt / RUN_FILE
    if ckpt.is_dir() and any(ckpt.iterdir()):
        previous = _previous_fingerprint(run_file)
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
