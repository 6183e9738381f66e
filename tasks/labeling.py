"""Phase 3 tasks: one task per teacher (3a and 3b run side by side), async inside."""

from __future__ import annotations

import asyncio

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from floorplan_ft.progress import Progress, summarize
from floorplan_ft.sampling import read_sample
from floorplan_ft.settings import Settings
from floorplan_ft.teachers.factory import make_teacher
from floorplan_ft.teachers.items import build_items
from floorplan_ft.teachers.labeling import LabelingRun, TeacherRunSummary
from tasks.common import artifact_key, step_progress, store_for


def _progress_callback(progress: Progress):
    """The engine's on_progress hook: hands the latest counts to the throttled reporter."""

    def update(s: TeacherRunSummary, done: int) -> None:
        progress.update(
            done,
            failed=s.failed,
            dollars=s.cost_usd,
            labeled=s.labeled,
            cached=s.cached,
            **({"429s": s.rate_limited} if s.rate_limited else {}),
        )

    return update


def _log_missing(logger, missing) -> None:
    """Plans without inputs, summarised per reason (never thousands of lines)."""
    if not missing:
        return
    by_reason: dict[str, list[str]] = {}
    for m in missing:
        by_reason.setdefault(m.reason, []).append(m.stem)
    for reason, stems in sorted(by_reason.items()):
        logger.warning("%d plans not labeled (%s): %s", len(stems), reason, summarize(stems))


@task(name="label-with-teacher", cache_policy=NO_CACHE, persist_result=True, task_run_name="label-{teacher_name}")
def label_with_teacher(settings: Settings, teacher_name: str) -> dict:
    """Label every sampled plan with one teacher. Answers are cached per item in the data root
    (content-addressed sidecars), which is what makes a rerun free, on any machine."""
    logger = get_run_logger()
    store = store_for(settings)
    # The teacher first: a missing key or an unreachable server stops here, before any work.
    teacher = make_teacher(settings, teacher_name)
    stems = read_sample(store.layout.run_file("sample"))
    items, missing = build_items(store, stems, settings)
    _log_missing(logger, missing)
    if teacher_name == "reference":
        logger.info("teacher 'reference' is the rule-based analyst (no LLM, no cost)")
    if settings.teachers.use_batch_api and teacher_name in ("openai", "gemini"):
        return _label_in_batches(settings, teacher_name, items, missing, store, len(stems))
    progress = step_progress(f"phase 3 {teacher_name}", len(items), f"phase3-progress-{teacher_name}")
    try:
        summary = asyncio.run(
            LabelingRun(teacher, store, settings.teachers, on_progress=_progress_callback(progress)).run(items)
        )
    finally:
        progress.close()
    create_markdown_artifact(
        key=artifact_key("phase3-summary", teacher_name),
        markdown=_markdown(summary, missing),
        description=f"Phase 3: labels from {teacher_name}",
    )
    if summary.stopped:
        logger.warning(
            "teacher %s stopped early: %s; %d plans unlabeled", teacher_name, summary.stopped, len(summary.unlabeled)
        )
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
        "requests": summary.requests,
        "rate_limited": summary.rate_limited,
        "cost_usd": summary.cost_usd,
        "total_spent_usd": summary.total_spent_usd,
        # After a crash: attempts counted at their worst case, and answers that may be paid twice.
        "unsettled_requests": summary.unsettled_requests,
        "possibly_paid_twice": summary.possibly_paid_twice,
    }


def _label_in_batches(settings: Settings, teacher_name: str, items, missing, store, plans: int) -> dict:
    """Half price through the provider's batch API; jobs persist in the data root, so a rerun
    polls instead of resubmitting, and whatever the batch did not answer is finished online."""
    from floorplan_ft.teachers.batch import label_in_batches

    t = settings.teachers
    outcome = asyncio.run(
        label_in_batches(
            teacher_name, settings, items, store, poll_interval_s=t.batch_poll_interval_s, max_wait_s=t.batch_max_wait_s
        )
    )
    result = outcome.as_dict()
    create_markdown_artifact(
        key=artifact_key("phase3-summary", teacher_name),
        markdown=(
            f"# Phase 3: teacher `{teacher_name}` through the batch API\n\n"
            f"status **{outcome.status}** · labeled {outcome.labeled} · cached {outcome.cached} · "
            f"waiting in jobs {len(outcome.waiting)} · queued {len(outcome.queued)} · "
            f"finished online {len(outcome.finished_online)} · "
            f"submissions without a job {len(outcome.submissions_failed)} · "
            f"failed {len(outcome.failed)} · ${outcome.cost_usd:.4f} this run · "
            f"${outcome.total_spent_usd:.4f} in all · ${outcome.reserved_usd:.4f} reserved by running jobs"
            + (f"\n\n**Job record:** {outcome.record_problem}" if outcome.record_problem else "")
        ),
        description=f"Phase 3: batch labels from {teacher_name}",
    )
    logger = get_run_logger()
    if outcome.record_problem:
        logger.error("batch job record: %s", outcome.record_problem)
    for failure in outcome.submissions_failed[:20]:
        logger.warning(
            "batch submission of %d plan(s) made no job (%s): %s",
            failure["items"],
            failure["reason"],
            failure["detail"],
        )
    return {
        # Batch failures finished online count as done; what is still unlabeled does not.
        "status": (
            "pending batch jobs"
            if outcome.status == "pending"
            else "done"
            if not (outcome.unlabeled or missing)
            else "done with failures"
        ),
        "teacher": teacher_name,
        "plans": plans,
        "labeled": result["labeled"],
        "cached": result["cached"],
        "waiting": result["waiting"],
        "queued": len(result["queued"]),
        "failed": len(result["failed"]),
        "finished_online": len(result["finished_online"]),
        "labeled_online": (result["online"] or {}).get("labeled", 0),
        "submissions_failed": len(result["submissions_failed"]),
        "unlabeled": len(result["unlabeled"]),
        "record_problem": result["record_problem"],
        "missing_inputs": len(missing),
        "cost_usd": result["cost_usd"],
        "reserved_usd": result["reserved_usd"],
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
    lines += [
        "",
        (
            f"Retries of bad answers: {s.reasked} re-asks quoting the error, {s.larger_budget} with a "
            f"larger output budget, {s.fresh_asks} fresh asks."
        ),
    ]
    if s.unsettled_requests or s.possibly_paid_twice:
        lines += [
            "",
            (
                f"Spend ledger: {s.unsettled_requests} requests of interrupted runs are counted at their "
                f"worst case (the provider may have billed them); {s.possibly_paid_twice} answers may have "
                "been paid twice."
            ),
        ]
    if s.stopped:
        lines += ["", f"**Stopped early: {s.stopped}.** Unlabeled plans are listed below and in the failure ledger."]
    if s.failures:
        lines += ["", "| plan | reason | attempts | detail |", "|---|---|---|---|"]
        lines += [
            f"| {k} | {v['reason']} | {v['attempts']} | {(v.get('detail') or '')[:120].replace('|', '/')} |"
            for k, v in list(s.failures.items())[:200]
        ]
    if missing:
        lines += [
            "",
            f"{len(missing)} plans lacked inputs: " + ", ".join(f"{m.stem} ({m.reason})" for m in missing[:50]),
        ]
    return "\n".join(lines)
