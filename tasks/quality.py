"""Phase 4 (compare the teachers, pick one: `floorplan_ft.quality.phase.run`) and phase 5
(train/val JSONL: `floorplan_ft.dataset.run`) tasks."""

from __future__ import annotations

from prefect import task

from floorplan_ft import dataset
from floorplan_ft.phase import PhaseResult
from floorplan_ft.quality import NoQualifiedTeacher
from floorplan_ft.quality import phase as quality_phase
from floorplan_ft.settings import Settings
from tasks.common import PERSIST_THIS_RUN, publish, store_for


# Both phases are seconds of work over files in the data root and must reflect the answers as
# they are now (a rerun after more labels must recompare): each run computes afresh.
@task(name="compare-teachers", cache_policy=PERSIST_THIS_RUN, persist_result=True)
def compare_teachers_task(settings: Settings) -> PhaseResult:
    try:
        return publish(quality_phase.run(settings, store_for(settings)))
    except NoQualifiedTeacher as exc:
        publish(exc.result)  # the report and why no teacher qualified, on the failed run
        raise


@task(name="build-training-data", cache_policy=PERSIST_THIS_RUN, persist_result=True)
def build_training_data_task(settings: Settings) -> PhaseResult:
    return publish(dataset.run(settings, store_for(settings)))
