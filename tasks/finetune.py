"""Phase 6 tasks: fine-tune the student (resumable), then evaluate it against the teacher."""

from __future__ import annotations

import json

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from floorplan_ft.settings import Settings
from floorplan_ft.training.evaluate import run_evaluation
from floorplan_ft.training.sft import run_finetune
from tasks.common import artifact_key, store_for


# The training code keeps its own content fingerprint (parameters + data hashes) beside the
# checkpoints in the data root: a finished run is reused, a crashed one resumes from its last
# checkpoint, on whichever pod picks it up. Prefect's cache would know neither.
@task(name="fine-tune-student", cache_policy=NO_CACHE, persist_result=True)
def finetune_task(settings: Settings) -> dict:
    logger = get_run_logger()

    def log(record: dict) -> None:
        logger.info("train %s", {k: record[k] for k in sorted(record) if k in ("step", "loss", "eval_loss", "learning_rate")})

    store = store_for(settings)
    result = run_finetune(settings, store, on_log=log)
    create_markdown_artifact(key=artifact_key("phase6-training"), markdown=result.pop("markdown"),
                             description="Phase 6: fine-tune (loss curves, adapter, model card)")
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
    create_markdown_artifact(key=artifact_key("phase6-evaluation"), markdown=result.pop("markdown"),
                             description="Phase 6: student vs teacher")
    return result
