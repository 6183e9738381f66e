"""Phase 3 through the providers' batch APIs: the same labels at the batch discount (half price),
answered within the providers' 24 h window instead of seconds.

`label_in_batches` makes the teacher and its provider's runner (`batch_runners`: OpenAI Batch API,
Gemini batch mode) and runs the job state machine (`batch_state.BatchLabeling`: submit within the
budget and the enqueued-token limit, poll, ingest, finish the rest online), which resumes the jobs
earlier runs left.
"""

from __future__ import annotations

from collections.abc import Callable

from floorplan_ft.providers.base import ConfigError
from floorplan_ft.settings import Settings
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.batch_runners import BATCH_TEACHERS, make_runner
from floorplan_ft.teachers.batch_state import BatchLabeling, BatchOutcome
from floorplan_ft.teachers.labeling import LabelItem, LLMTeacher


async def label_in_batches(
    teacher_name: str,
    settings: Settings,
    items: list[LabelItem],
    store: ArtifactStore,
    *,
    poll_interval_s: float = 60.0,
    max_wait_s: float = 25 * 3600.0,
    finish_online: bool = True,
    max_requests_per_job: int | None = None,
    max_bytes_per_job: int | None = None,
    max_enqueued_tokens: int | None = None,
    on_progress: Callable[[BatchOutcome], None] | None = None,
) -> BatchOutcome:
    """Label `items` with teacher ``openai`` or ``gemini`` through its batch API.

    Polls the jobs earlier runs left, submits what is neither answered nor waiting (within the
    budget), and polls every `poll_interval_s` until all jobs ended or `max_wait_s` passed
    (``max_wait_s=0``: submit and return). Then the items the batch could not label are finished
    online with `LabelingRun` (unless `finish_online` is False). Returns ``status="pending"`` while
    jobs are still running: they stay recorded and the next call resumes polling them.
    """
    from floorplan_ft.teachers.factory import make_teacher

    if teacher_name not in BATCH_TEACHERS:
        raise ConfigError(
            f"teacher {teacher_name!r}: batch mode exists for {', '.join(BATCH_TEACHERS)} only; "
            "set teachers.use_batch_api=false for it"
        )
    teacher = make_teacher(settings, teacher_name)
    assert isinstance(teacher, LLMTeacher)
    try:
        runner = make_runner(teacher, max_requests=max_requests_per_job, max_bytes=max_bytes_per_job)
    except BaseException:
        await teacher.aclose()
        raise
    run = BatchLabeling(
        teacher,
        runner,
        store,
        settings.teachers,
        poll_interval_s=poll_interval_s,
        max_wait_s=max_wait_s,
        finish_online=finish_online,
        max_enqueued_tokens=max_enqueued_tokens,
        on_progress=on_progress,
    )
    return await run.run(items)
