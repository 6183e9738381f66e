"""The parent flow, `ft-pipeline`: the plan's phases top to bottom, each run when selected.

Each line is one task (or the CV subflow); the work is in the phase's domain entry point, one hop
away: `floorplan_ft.sampling.run`, `floorplan_ft.cv.runner`, `floorplan_ft.retrieval.phase.run`,
`floorplan_ft.teachers.phase.run`, `floorplan_ft.quality`, `floorplan_ft.dataset.run`,
`floorplan_ft.training`. Every phase returns a `PhaseResult`; the flow's report holds their rows.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from blocks.secrets import apply_block_secrets
from floorplan_ft.lease import DataRootLease
from floorplan_ft.phase import PhaseResult, not_configured
from floorplan_ft.settings import ProfileName, Settings
from floorplan_ft.steps import STEP_TITLES, TEACHER_STEPS, parse_steps
from floorplan_ft.training import phase as phase6
from flows.cv_batch import cv_batch_with_concurrency
from flows.hooks import FLOW_TIMEOUT_S, on_run_failed
from flows.orchestrate import run_cv_on_local_gpu, split_cv_steps
from tasks.common import DEFAULT_STEPS, Steps, artifact_key, run_owner, settings_for_run, store_for
from tasks.finetune import evaluate_task, finetune_task
from tasks.labeling import label_with_teacher
from tasks.quality import build_training_data_task, compare_teachers_task
from tasks.retrieval import retrieve_criteria
from tasks.sampling import sample_plans


@flow(name="ft-pipeline", timeout_seconds=FLOW_TIMEOUT_S, on_failure=[on_run_failed], on_crashed=[on_run_failed])
def ft_pipeline(
    steps: Steps = DEFAULT_STEPS,
    config_file: str | None = None,
    profile: ProfileName | None = None,
    overrides: dict[str, Any] | None = None,
    cv_deployment: str | None = None,
) -> dict[str, dict]:
    """Run the selected phases of the plan on one data root.

    Args:
        steps: Steps to run, in pipeline order whatever the order given: "all", a comma list
            ("0,1,3a"), "3" for both teachers, ranges ("2-6"). 0 sample, 1 CV, 2 criteria,
            3a/3b the two teachers, 4 compare, 5 JSONL, 6 fine-tune and evaluate.
        config_file: A TOML settings file, as a path on the machine that runs the flow (relative
            paths: to the project root there).
        profile: A settings profile (demo, production, local-8gb): the defaults of one set-up.
        overrides: Settings by dotted name, e.g. {"sampling.sample_size": 500}. Never keys or
            passwords: those come from blocks or the environment, and a secret here is refused.
        cv_deployment: Run steps 0-1 on this deployment (e.g. ft-pipeline/local-gpu, the GPU
            workstation's pool) and wait for it; both pools share the data root. Empty: every
            step runs here.
    """
    settings = apply_block_secrets(settings_for_run(config_file, profile, overrides))
    selected = parse_steps(steps)  # a bad selection fails here, before any work
    done: dict[str, PhaseResult | dict] = {}

    if cv_deployment:
        remote, selected = split_cv_steps(selected)
        done |= run_cv_on_local_gpu(remote, config_file, profile, overrides, deployment=cv_deployment)
    with DataRootLease(store_for(settings), owner=run_owner()):  # one writer per data root
        if "0" in selected:  # sample representative plans
            done["0"] = sample_plans(settings)
        if "1" in selected:  # CV → topology_graph.json per plan (a subflow: its own task runner)
            cv = cv_batch_with_concurrency(settings.cv.concurrency)
            done["1"] = cv(scope="sample", config_file=config_file, profile=profile, overrides=overrides)
        if "2" in selected:  # retrieve the relevant criteria per plan
            done["2"] = retrieve_criteria(settings)
        done |= label_side_by_side(settings, [s for s in TEACHER_STEPS if s in selected])  # 3a and 3b
        if "4" in selected:  # compare the teachers, pick one
            done["4"] = compare_teachers_task(settings)
        if "5" in selected:  # chat-format train/val JSONL
            done["5"] = build_training_data_task(settings)
        if "6" in selected:  # fine-tune the student, then evaluate it against the teacher
            done["6"] = phase6.student(finetune_task(settings), evaluate_task(settings))

    report = {step: r.report() if isinstance(r, PhaseResult) else r for step, r in done.items()}
    create_markdown_artifact(
        key=artifact_key("ft-pipeline-summary"),
        markdown=_summary_markdown(settings, report),
        description="What each selected step did",
    )
    return report


def label_side_by_side(settings: Settings, steps: list[str]) -> dict[str, PhaseResult]:
    """Steps 3a and 3b: one task per teacher of `teachers.teachers`, submitted together."""
    names = settings.teachers.teachers
    futures, results = {}, {}
    for step in steps:
        index = TEACHER_STEPS.index(step)
        if index < len(names):
            futures[step] = label_with_teacher.submit(settings, names[index])
        else:
            results[step] = not_configured(step, f"teachers.teachers lists no teacher for step {step}")
    for step, future in futures.items():
        results[step] = replace(future.result(), step=step)
    return {step: results[step] for step in steps}


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
