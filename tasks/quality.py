"""Phase 4 (compare the teachers, pick one) and phase 5 (train/val JSONL) tasks."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from floorplan_ft import dataset
from floorplan_ft.phase import PhaseResult
from floorplan_ft.quality import (
    NoQualifiedTeacher,
    compare_teachers,
    compared_teachers,
    export_review_page,
    quality_markdown,
    write_outputs,
)
from floorplan_ft.sampling import read_sample
from floorplan_ft.settings import Settings
from tasks.common import PERSIST_THIS_RUN, artifact_key, publish, store_for


# Both phases are seconds of work over files in the data root and must reflect the answers as
# they are now (a rerun after more labels must recompare), so they are not cached.
@task(name="compare-teachers", cache_policy=PERSIST_THIS_RUN, persist_result=True)
def compare_teachers_task(settings: Settings) -> dict:
    logger = get_run_logger()
    store = store_for(settings)
    stems = read_sample(store.layout.run_file("sample"))
    teachers = compared_teachers(settings)
    try:
        report = compare_teachers(store, stems, teachers, settings)
    except NoQualifiedTeacher as exc:
        write_outputs(store, exc.report)
        create_markdown_artifact(
            key=artifact_key("phase4-quality"),
            markdown=quality_markdown(exc.report),
            description="Phase 4: no teacher qualified",
        )
        raise
    paths = write_outputs(store, report)
    review = None
    if settings.quality.review_plans:
        review = export_review_page(
            store,
            stems,
            teachers,
            settings.quality.review_plans,
            seed=settings.quality.seed,
            group_pattern=settings.sampling.group_pattern,
            group_prefix_len=settings.sampling.group_prefix_len,
        )
    markdown = quality_markdown(report) + (f"\n\nChart: `{paths.get('chart')}` · review page: `{review}`")
    create_markdown_artifact(
        key=artifact_key("phase4-quality"), markdown=markdown, description="Phase 4: teacher comparison and decision"
    )
    logger.info("phase 4: selected %s (%s)", report.winner, report.decision.reason)
    return {
        "status": "done",
        "selected": report.winner,
        "reason": report.decision.reason,
        "report": paths["quality_report"],
        "review_page": review,
    }


@task(name="build-training-data", cache_policy=PERSIST_THIS_RUN, persist_result=True)
def build_training_data_task(settings: Settings) -> PhaseResult:
    return publish(dataset.run(settings, store_for(settings)))
