"""Phase 3: label every sampled plan with one teacher (`run`); 3a and 3b are two calls side by
side. Answers are cached per item in the data root (content-addressed sidecars), which is what
makes a rerun free, on any machine."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from floorplan_ft.phase import DONE, DONE_WITH_FAILURES, Artifact, Failure, PhaseResult
from floorplan_ft.progress import Progress, summarize
from floorplan_ft.sampling import read_sample
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.factory import make_teacher
from floorplan_ft.teachers.items import MissingInput, build_items
from floorplan_ft.teachers.labeling import LabelingRun, TeacherRunSummary

BATCH_PROVIDERS = ("openai", "gemini")

# Made once the number of plans is known: (label, total) -> a progress reporter.
StartProgress = Callable[[str, int], Progress]


def run(
    settings: Any, store: ArtifactStore, teacher_name: str, *, start_progress: StartProgress | None = None
) -> PhaseResult:
    """Phase 3 with `teacher_name`: online (async, paced, budgeted), or through the provider's batch
    API when `teachers.use_batch_api` is set and the teacher is OpenAI or Gemini."""
    # The teacher first: a missing key or an unreachable server stops here, before any work.
    teacher = make_teacher(settings, teacher_name)
    stems = read_sample(store.layout.run_file("sample"))
    items, missing = build_items(store, stems, settings)
    notes = _missing_lines(missing)
    if settings.teachers.use_batch_api and teacher_name in BATCH_PROVIDERS:
        return _in_batches(settings, store, teacher_name, items, missing, len(stems), notes)
    progress = start_progress(f"phase 3 {teacher_name}", len(items)) if start_progress else None
    engine = LabelingRun(teacher, store, settings.teachers, on_progress=_progress_hook(progress) if progress else None)
    try:
        summary = asyncio.run(engine.run(items))
    finally:
        if progress is not None:
            progress.close()
    if summary.stopped:
        notes.append(
            f"teacher {teacher_name} stopped early: {summary.stopped}; {len(summary.unlabeled)} plans unlabeled"
        )
    return PhaseResult(
        step="3",
        status=DONE_WITH_FAILURES if (summary.failed or summary.skipped_budget or missing) else DONE,
        counts={
            "plans": len(stems),
            "labeled": summary.labeled,
            "cached": summary.cached,
            "failed": summary.failed,
            "skipped_budget": summary.skipped_budget,
            "missing_inputs": len(missing),
            "requests": summary.requests,
            "rate_limited": summary.rate_limited,
        },
        details={
            "teacher": teacher_name,
            "model": summary.model,
            "cost_usd": summary.cost_usd,
            "total_spent_usd": summary.total_spent_usd,
            # After a crash: attempts counted at their worst case, and answers that may be paid twice.
            "unsettled_requests": summary.unsettled_requests,
            "possibly_paid_twice": summary.possibly_paid_twice,
        },
        failures=[Failure(k, v["reason"], v.get("detail") or "") for k, v in summary.failures.items()]
        + [Failure(m.stem, m.reason) for m in missing],
        warnings=notes,
        artifacts=[
            Artifact(
                key="phase3-summary",
                markdown=_markdown(summary, missing),
                description=f"Phase 3: labels from {teacher_name}",
            )
        ],
    )


def _progress_hook(progress: Progress) -> Callable[[TeacherRunSummary, int], None]:
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


def _missing_lines(missing: list[MissingInput]) -> list[str]:
    """Plans without inputs, summarised per reason (never thousands of lines)."""
    by_reason: dict[str, list[str]] = {}
    for m in missing:
        by_reason.setdefault(m.reason, []).append(m.stem)
    return [f"{len(s)} plans not labeled ({reason}): {summarize(s)}" for reason, s in sorted(by_reason.items())]


def _in_batches(
    settings: Any,
    store: ArtifactStore,
    teacher_name: str,
    items: list,
    missing: list[MissingInput],
    plans: int,
    notes: list[str],
) -> PhaseResult:
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
    if outcome.record_problem:
        notes.append(f"batch job record: {outcome.record_problem}")
    notes += [
        f"batch submission of {f['items']} plan(s) made no job ({f['reason']}): {f['detail']}"
        for f in outcome.submissions_failed[:20]
    ]
    if outcome.status == "pending":
        status = "pending batch jobs"  # batch failures finished online count as done; unlabeled plans do not
    else:
        status = DONE if not (outcome.unlabeled or missing) else DONE_WITH_FAILURES
    return PhaseResult(
        step="3",
        status=status,
        counts={
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
            "missing_inputs": len(missing),
        },
        details={
            "teacher": teacher_name,
            "record_problem": result["record_problem"],
            "cost_usd": result["cost_usd"],
            "reserved_usd": result["reserved_usd"],
            "total_spent_usd": result["total_spent_usd"],
        },
        failures=[Failure(m.stem, m.reason) for m in missing],
        warnings=notes,
        artifacts=[
            Artifact(
                key="phase3-summary",
                markdown=_batch_markdown(teacher_name, outcome),
                description=f"Phase 3: batch labels from {teacher_name}",
            )
        ],
    )


def _batch_markdown(teacher_name: str, outcome: Any) -> str:
    return (
        f"# Phase 3: teacher `{teacher_name}` through the batch API\n\n"
        f"status **{outcome.status}** · labeled {outcome.labeled} · cached {outcome.cached} · "
        f"waiting in jobs {len(outcome.waiting)} · queued {len(outcome.queued)} · "
        f"finished online {len(outcome.finished_online)} · "
        f"submissions without a job {len(outcome.submissions_failed)} · "
        f"failed {len(outcome.failed)} · ${outcome.cost_usd:.4f} this run · "
        f"${outcome.total_spent_usd:.4f} in all · ${outcome.reserved_usd:.4f} reserved by running jobs"
        + (f"\n\n**Job record:** {outcome.record_problem}" if outcome.record_problem else "")
    )


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
