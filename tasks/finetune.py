"""Phase 6 tasks: fine-tune the student (resumable), then evaluate it against the teacher
(`floorplan_ft.training.phase`)."""

from __future__ import annotations

from prefect import task

from floorplan_ft.phase import PhaseResult
from floorplan_ft.settings import Settings
from floorplan_ft.training import phase
from tasks.common import PERSIST_THIS_RUN, publish, step_progress, store_for


# The training code keeps its own content fingerprint (parameters + data hashes) beside the
# checkpoints in the data root: a finished run is reused, a crashed one resumes from its last
# checkpoint, on whichever pod picks it up. Prefect's cache would know neither.
@task(name="fine-tune-student", cache_policy=PERSIST_THIS_RUN, persist_result=True)
def finetune_task(settings: Settings) -> PhaseResult:
    def start_progress(label: str, total: int):
        return step_progress(label, total, "phase6-progress", unit="steps")

    return publish(phase.finetune(settings, store_for(settings), start_progress=start_progress))


@task(name="evaluate-student", cache_policy=PERSIST_THIS_RUN, persist_result=True)
def evaluate_task(settings: Settings) -> PhaseResult:
    return publish(phase.evaluate(settings, store_for(settings)))
