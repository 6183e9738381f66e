"""Phase 6 tasks: fine-tune the student (resumable), then evaluate it against the teacher."""

from __future__ import annotations

import json

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from floorplan_ft.progress import Progress
from floorplan_ft.settings import Settings
from floorplan_ft.training.evaluate import run_evaluation
from floorplan_ft.training.sft import run_finetune
from tasks.common import artifact_key, step_progress, store_for


# The training code keeps its own content fingerprint (parameters + data hashes) beside the
# checkpoints in the data root: a finished run is reused, a crashed one resumes from its last
# checkpoint, on whichever pod picks it up. Prefect's cache would know neither.
@task(name="fine-tune-student", cache_policy=NO_CACHE, persist_result=True)
def finetune_task(settings: Settings) -> dict:
    progress: list[Progress] = []  # made at the first record, when the step count is known
    latest: dict = {}

    def log(record: dict) -> None:
        if not progress:
            progress.append(
                step_progress("phase 6 fine-tune", int(record.get("max_steps") or 0), "phase6-progress", unit="steps")
            )
        latest.update({k: round(record[k], 4) for k in ("loss", "eval_loss") if isinstance(record.get(k), float)})
        progress[0].update(int(record.get("step") or 0), **latest)

    store = store_for(settings)
    try:
        result = run_finetune(settings, store, on_log=log)
    finally:
        if progress:
            progress[0].close()
    create_markdown_artifact(
        key=artifact_key("phase6-training"),
        markdown=result.pop("markdown"),
        description="Phase 6: fine-tune (loss curves, adapter, model card)",
    )
    history = json.loads(store.read_text(result["log_path"])).get("history", [])
    if history:
        create_table_artifact(
            key=artifact_key("phase6-loss-curve"),
            table=[{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in history],
            description="Phase 6: train and validation loss per logged step (training_log.json)",
        )
    return result


@task(name="evaluate-student", cache_policy=NO_CACHE, persist_result=True)
def evaluate_task(settings: Settings) -> dict:
    result = run_evaluation(settings, store_for(settings))
    create_markdown_artifact(
        key=artifact_key("phase6-evaluation"),
        markdown=result.pop("markdown"),
        description="Phase 6: student vs teacher",
    )
    return result


def student_result(trained: dict, evaluated: dict) -> dict:
    """Step 6's report row from the fine-tune and the evaluation."""
    summary = evaluated.get("summary", {})
    return {
        "status": "done",
        "steps": trained.get("global_step"),
        "first_loss": trained.get("first_loss"),
        "last_loss": trained.get("last_loss"),
        "merged": trained.get("merged_dir"),
        "eval_report": evaluated.get("path"),
        "schema_compliance": summary.get("schema_compliance"),
        "quality_vs_teacher": (summary.get("quality") or {}).get("ratio"),
        "device": evaluated.get("device"),
    }
