"""The parent flow: the plan's phase list, run in order, each phase only if selected."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from blocks.secrets import apply_block_secrets
from floorplan_ft.settings import ProfileName, Settings
from floorplan_ft.steps import ALL_STEPS, STEP_TITLES, parse_steps
from flows.cv_batch import cv_batch_with_concurrency
from flows.orchestrate import run_cv_on_local_gpu, split_cv_steps
from tasks.common import artifact_key, settings_for_run
from tasks.finetune import evaluate_task, finetune_task
from tasks.labeling import label_with_teacher
from tasks.quality import build_training_data_task, compare_teachers_task
from tasks.retrieval import retrieve_for_plans
from tasks.sampling import sample_plans

RunArgs = dict[str, Any]


def _phase0(settings: Settings, run: RunArgs) -> dict:
    return sample_plans(settings)


def _phase1(settings: Settings, run: RunArgs) -> dict:
    return cv_batch_with_concurrency(settings.cv.concurrency)(scope="sample", **run)


TEACHER_STEPS = ("3a", "3b")


def _teacher_for(settings: Settings, step: str) -> str | None:
    names = settings.teachers.teachers
    index = TEACHER_STEPS.index(step)
    return names[index] if index < len(names) else None


def _label(settings: Settings, steps: list[str]) -> dict[str, dict]:
    """3a and 3b side by side: one task per teacher, submitted together."""
    futures, report = {}, {}
    for step in steps:
        name = _teacher_for(settings, step)
        if name is None:
            report[step] = {"status": "not configured", "reason": f"teachers.teachers lists no teacher for step {step}"}
        else:
            futures[step] = label_with_teacher.submit(settings, name)
    for step, future in futures.items():
        report[step] = future.result()
    return report


def _phase2(settings: Settings, run: RunArgs) -> dict:
    return retrieve_for_plans(settings)


def _phase4(settings: Settings, run: RunArgs) -> dict:
    return compare_teachers_task(settings)


def _phase5(settings: Settings, run: RunArgs) -> dict:
    return build_training_data_task(settings)


def _phase6(settings: Settings, run: RunArgs) -> dict:
    trained = finetune_task(settings)
    evaluated = evaluate_task(settings)
    summary = evaluated.get("summary", {})
    return {
        "status": "done",
        "steps": trained.get("global_step"),
        "first_loss": trained.get("first_loss"),
        "last_loss": trained.get("last_loss"),
        "merged": trained.get("merged_dir"),
        "eval_report": evaluated.get("path"),
        "schema_compliance": summary.get("schema_compliance"),
        "quality_vs_teacher": (summary.get("quality") or {}).get("ratio"),
        "device": evaluated.get("device"),
    }


# Built phases. A step missing here is reported as not available, never faked.
PHASES: dict[str, Callable[[Settings, RunArgs], dict]] = {
    "0": _phase0,
    "1": _phase1,
    "2": _phase2,
    "4": _phase4,
    "5": _phase5,
    "6": _phase6,
}


@flow(name="ft-pipeline")
def ft_pipeline(
    steps: str = ",".join(ALL_STEPS),
    config_file: str | None = None,
    profile: ProfileName | None = None,
    overrides: dict[str, Any] | None = None,
    cv_deployment: str | None = None,
) -> dict[str, dict]:
    """Run the selected phases (e.g. "0,1,2,3a,3b,4,5,6", "all", "2-6") on one data root.

    `overrides` takes dotted setting names, e.g. {"sampling.sample_size": 500}. With
    `cv_deployment` (e.g. "ft-pipeline/local-gpu"), steps 0-1 run there, on the GPU workstation's
    pool, and this run waits for them: both read and write the same data root.
    """
    logger = get_run_logger()
    settings = apply_block_secrets(settings_for_run(config_file, profile, overrides))
    run_args: RunArgs = {"config_file": config_file, "profile": profile, "overrides": overrides}
    report: dict[str, dict] = {}
    selected = parse_steps(steps)
    if cv_deployment:
        remote, selected = split_cv_steps(selected)
        report.update(run_cv_on_local_gpu(remote, config_file, profile, overrides, deployment=cv_deployment))
    for step in selected:
        if step in TEACHER_STEPS:
            if step not in report:
                report.update(_label(settings, [s for s in TEACHER_STEPS if s in selected]))
            continue
        runner = PHASES.get(step)
        if runner is None:
            logger.warning("step %s (%s) is not available yet: skipped", step, STEP_TITLES[step])
            report[step] = {"status": "not available"}
            continue
        logger.info("step %s: %s", step, STEP_TITLES[step])
        report[step] = runner(settings, run_args)
    create_markdown_artifact(
        key=artifact_key("ft-pipeline-summary"),
        markdown=_summary_markdown(settings, report),
        description="What each selected step did",
    )
    return report


def _summary_markdown(settings: Settings, report: dict[str, dict]) -> str:
    lines = [
        "# ft-pipeline run",
        f"Data root: `{settings.paths.data_root}` · profile: `{settings.profile or 'default'}`",
        "",
        "| step | phase | status | details |",
        "|---|---|---|---|",
    ]
    for step, outcome in report.items():
        details = ", ".join(
            f"{k}={v}" for k, v in outcome.items() if k not in {"status"} and not isinstance(v, list | dict)
        )
        lines.append(f"| {step} | {STEP_TITLES[step]} | {outcome.get('status')} | {details} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ft_pipeline()
