"""Phase 4: compare the teachers' answers with metrics and pick one (`run`)."""

from __future__ import annotations

from typing import Any

from floorplan_ft.phase import Artifact, PhaseResult
from floorplan_ft.quality.compare import NoQualifiedTeacher, compare_teachers, compared_teachers
from floorplan_ft.quality.report import quality_markdown, write_outputs
from floorplan_ft.quality.review import export_review_page
from floorplan_ft.sampling import read_sample
from floorplan_ft.store import ArtifactStore


def run(settings: Any, store: ArtifactStore) -> PhaseResult:
    """Phase 4 over the sampled plans: the metrics per teacher, the decision and its reason, the
    report, the chart and (with `quality.review_plans`) the manual review page. When no teacher
    qualifies, the report is still written and `NoQualifiedTeacher` raised (its `result` carries
    the artifact), so the run fails with the reason and the evidence."""
    stems = read_sample(store.layout.run_file("sample"))
    teachers = compared_teachers(settings)
    try:
        report = compare_teachers(store, stems, teachers, settings)
    except NoQualifiedTeacher as exc:
        write_outputs(store, exc.report)
        exc.result = PhaseResult(
            step="4",
            status="failed",
            details={"reason": str(exc)},
            artifacts=[
                Artifact(
                    key="phase4-quality",
                    markdown=quality_markdown(exc.report),
                    description="Phase 4: no teacher qualified",
                )
            ],
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
    markdown = quality_markdown(report) + f"\n\nChart: `{paths.get('chart')}` · review page: `{review}`"
    return PhaseResult(
        step="4",
        details={"selected": report.winner, "reason": report.decision.reason},
        outputs={"report": paths["quality_report"], "review_page": review},
        artifacts=[
            Artifact(key="phase4-quality", markdown=markdown, description="Phase 4: teacher comparison and decision")
        ],
    )
