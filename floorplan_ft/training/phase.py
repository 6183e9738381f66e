"""Phase 6: fine-tune the student (`finetune`), evaluate it against the teacher (`evaluate`), and
the step's one result (`student`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from floorplan_ft.phase import Artifact, PhaseResult
from floorplan_ft.progress import Progress
from floorplan_ft.store import ArtifactStore
from floorplan_ft.training.evaluate import run_evaluation
from floorplan_ft.training.sft import run_finetune

# Made at the first training log record, when the step count is known: (label, total) -> reporter.
StartProgress = Callable[[str, int], Progress]


def finetune(settings: Any, store: ArtifactStore, *, start_progress: StartProgress | None = None) -> PhaseResult:
    """Train (resuming from the last checkpoint, or reusing a finished run with the same
    fingerprint), then merge when `finetune.merge`."""
    progress: list[Progress] = []
    latest: dict[str, float] = {}

    def log(record: dict) -> None:
        if start_progress is None:
            return
        if not progress:
            progress.append(start_progress("phase 6 fine-tune", int(record.get("max_steps") or 0)))
        latest.update({k: round(record[k], 4) for k in ("loss", "eval_loss") if isinstance(record.get(k), float)})
        progress[0].update(int(record.get("step") or 0), **latest)

    try:
        result = run_finetune(settings, store, on_log=log)
    finally:
        if progress:
            progress[0].close()
    artifacts = [
        Artifact(
            key="phase6-training",
            markdown=result.pop("markdown"),
            description="Phase 6: fine-tune (loss curves, adapter, model card)",
        )
    ]
    history = json.loads(store.read_text(result["log_path"])).get("history", [])
    if history:
        artifacts.append(
            Artifact(
                key="phase6-loss-curve",
                table=[{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in history],
                description="Phase 6: train and validation loss per logged step (training_log.json)",
            )
        )
    return PhaseResult(
        step="6",
        counts={"steps": result.get("global_step")},
        details={k: result.get(k) for k in ("first_loss", "last_loss", "backend", "device", "reused")},
        outputs={"adapter": result.get("adapter_dir"), "merged": result.get("merged_dir"), "log": result["log_path"]},
        artifacts=artifacts,
    )


def evaluate(settings: Any, store: ArtifactStore) -> PhaseResult:
    """The trained (or served) student on the validation rows, scored against the teacher."""
    result = run_evaluation(settings, store)
    summary = result.get("summary", {})
    return PhaseResult(
        step="6",
        details={
            "schema_compliance": summary.get("schema_compliance"),
            "quality_vs_teacher": (summary.get("quality") or {}).get("ratio"),
            "device": result.get("device"),
            "summary": summary,
        },
        outputs={"eval_report": result.get("path"), "model_dir": result.get("model_dir")},
        artifacts=[
            Artifact(key="phase6-evaluation", markdown=result["markdown"], description="Phase 6: student vs teacher")
        ],
    )


def student(trained: PhaseResult, evaluated: PhaseResult) -> PhaseResult:
    """Step 6's report row: the training's steps and losses, the evaluation's scores."""
    return PhaseResult(
        step="6",
        counts=dict(trained.counts),
        details={
            "first_loss": trained.details.get("first_loss"),
            "last_loss": trained.details.get("last_loss"),
            "schema_compliance": evaluated.details.get("schema_compliance"),
            "quality_vs_teacher": evaluated.details.get("quality_vs_teacher"),
            "device": evaluated.details.get("device"),
        },
        outputs={"merged": trained.outputs.get("merged"), "eval_report": evaluated.outputs.get("eval_report")},
    )
