"""Phase 3 task: one run per teacher (3a and 3b side by side), async inside
(`floorplan_ft.teachers.phase.run`)."""

from __future__ import annotations

from prefect import task

from floorplan_ft.phase import PhaseResult
from floorplan_ft.settings import Settings
from floorplan_ft.teachers import phase
from tasks.common import PERSIST_THIS_RUN, publish, step_progress, store_for


# Answers are cached per item by content in the data root (on any machine), not by Prefect.
@task(
    name="label-with-teacher", cache_policy=PERSIST_THIS_RUN, persist_result=True, task_run_name="label-{teacher_name}"
)
def label_with_teacher(settings: Settings, teacher_name: str) -> PhaseResult:
    """Label every sampled plan with one teacher."""

    def start_progress(label: str, total: int):
        return step_progress(label, total, f"phase3-progress-{teacher_name}")

    result = phase.run(settings, store_for(settings), teacher_name, start_progress=start_progress)
    return publish(result, teacher=teacher_name)
