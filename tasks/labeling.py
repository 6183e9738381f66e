"""Phase 3 tasks: one task per teacher (3a and 3b run side by side), async inside."""

from __future__ import annotations

import asyncio
import threading

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from floorplan_ft.sampling import read_sample
from floorplan_ft.settings import Settings
from floorplan_ft.teachers.factory import make_teacher
from floorplan_ft.teachers.items import build_items
from floorplan_ft.teachers.labeling import LabelingRun, TeacherRunSummary
from tasks.common import artifact_key, store_for


class _ProgressPublisher:
    """Pushes the latest counts to a progress artifact every few seconds from a side thread, so
    the labeling event loop never waits on the Prefect API."""

    def __init__(self, teacher: str, total: int):
        self.teacher, self.total = teacher, max(total, 1)
        self.latest: tuple[TeacherRunSummary, int] | None = None
        self.artifact = create_progress_artifact(
            0.0, key=artifact_key("phase3-progress", teacher), description=f"{teacher}: starting"
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def __call__(self, summary: TeacherRunSummary, done: int) -> None:
        self.latest = (summary, done)

    def _push(self) -> None:
        if self.latest is None:
            return
        s, done = self.latest
        update_progress_artifact(
            self.artifact,
            100.0 * done / self.total,
            description=(
                f"{self.teacher}: {done}/{self.total} · labeled {s.labeled} · cached {s.cached} · "
                f"failed {s.failed} · ${s.cost_usd:.4f} this run"
            ),
        )

    def _loop(self) -> None:
        while not self._stop.wait(3.0):
            self._push()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._push()


@task(name="label-with-teacher", cache_policy=NO_CACHE, persist_result=True, task_run_name="label-{teacher_name}")
def label_with_teacher(settings: Settings, teacher_name: str) -> dict:
    """Label every sampled plan with one teacher. Answers are cached per item in the data root
    (content-addressed sidecars), which is what makes a rerun free, on any machine."""
    logger = get_run_logger()
    store = store_for(settings)
    # The teacher first: a missing key or an unreachable server stops here, before any work.
    teacher = make_teacher(settings, teacher_name)
    stems = read_sample(store.run_file("sample"))
    items, missing = build_items(store, stems, settings)
    for m in missing[:20]:
        logger.warning("%s: not labeled (%s)", m.stem, m.reason)
    if teacher_name == "reference":
        logger.info("teacher 'reference' is the rule-based analyst (no LLM, no cost)")
    if settings.teachers.use_batch_api and teacher_name in ("openai", "gemini"):
        return _label_in_batches(settings, teacher_name, items, missing, store, len(stems))
    progress = _ProgressPublisher(teacher_name, len(items))
    try:
        summary = asyncio.run(LabelingRun(teacher, store, settings.teachers, on_progress=progress).run(items))
    finally:
        progress.close()
    create_markdown_artifact(
        key=artifact_key("phase3-summary", teacher_name),
        markdown=_markdown(summary, missing),
        description=f"Phase 3: labels from {teacher_name}",
    )
    if summary.stopped:
        logger.warning("teacher %s stopped early: %s; %d plans unlabeled", teacher_name, summary.stopped, len(summary.unlabeled))
    return {
        "status": "done" if not (summary.failed or summary.skipped_budget or missing) else "done with failures",
        "teacher": teacher_name,
        "model": summary.model,
        "plans": len(stems),
        "labeled": summary.labeled,
        "cached": summary.cached,
        "failed": summary.failed,
        "skipped_budget": summary.skipped_budget,
        "missing_inputs": len(missing),
        "cost_usd": summary.cost_usd,
        "total_spent_usd": summary.total_spent_usd,
    }


def _label_in_batches(settings: Settings, teacher_name: str, items, missing, store, plans: int) -> dict:
    """Half price through the provider's batch API; jobs persist in the data root, so a rerun
    polls instead of resubmitting, and whatever the batch did not answer is finished online."""
    from floorplan_ft.teachers.batch import label_in_batches

    t = settings.teachers
    outcome = asyncio.run(
        label_in_batches(teacher_name, settings, items, store,
                         poll_interval_s=t.batch_poll_interval_s, max_wait_s=t.batch_max_wait_s)
    )
    result = outcome.as_dict()
    create_markdown_artifact(
        key=artifact_key("phase3-summary", teacher_name),
        markdown=(
            f"# Phase 3: teacher `{teacher_name}` through the batch API\n\n"
            f"status **{outcome.status}** · labeled {outcome.labeled} · cached {outcome.cached} · "
            f"waiting in jobs {outcome.waiting} · finished online {outcome.finished_online} · "
            f"failed {len(outcome.failed)} · ${outcome.cost_usd:.4f} this run · "
            f"${outcome.total_spent_usd:.4f} in all"
        ),
        description=f"Phase 3: batch labels from {teacher_name}",
    )
    return {
        "status": (
            "pending batch jobs" if outcome.status == "pending"
            else "done" if not (outcome.failed or missing) else "done with failures"
        ),
        "teacher": teacher_name,
        "plans": plans,
        "labeled": result["labeled"],
        "cached": result["cached"],
        "waiting": result["waiting"],
        "failed": len(result["failed"]),
        "missing_inputs": len(missing),
        "cost_usd": result["cost_usd"],
        "total_spent_usd": result["total_spent_usd"],
    }


def _markdown(s: TeacherRunSummary, missing) -> str:
    lines = [
        f"# Phase 3: teacher `{s.teacher}` ({s.provider} · {s.model})",
        "",
        "| plans | labeled now | cached | failed | skipped (budget) | requests | 429s | tokens in/out | $ this run | $ total / budget |",
        "|---|---|---|---|---|---|---|---|---|---|",
        (
            f"| {s.items} | {s.labeled} | {s.cached} | {s.failed} | {s.skipped_budget} | {s.requests} | "
            f"{s.rate_limited} | {s.input_tokens}/{s.output_tokens} | {s.cost_usd:.4f} | "
            f"{s.total_spent_usd:.4f} / {s.budget_usd:.2f} |"
        ),
    ]
    if s.stopped:
        lines += ["", f"**Stopped early: {s.stopped}.** Unlabeled plans are listed below and in the failure ledger."]
    if s.failures:
        lines += ["", "| plan | reason | attempts | detail |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['reason']} | {v['attempts']} | {(v.get('detail') or '')[:120].replace('|', '/')} |"
                  for k, v in list(s.failures.items())[:200]]
    if missing:
        lines += ["", f"{len(missing)} plans lacked inputs: " + ", ".join(f"{m.stem} ({m.reason})" for m in missing[:50])]
    return "\n".join(lines)
