"""Runs that span both pools: the parent on `runpod` hands the CV steps to the `local-gpu`
deployment and waits, passing references (config file path, profile, dotted overrides), never
data. Both pools read and write the same data root, so the parent picks up the topologies the
child wrote as soon as the child is Completed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from floorplan_ft.steps import parse_steps

LOCAL_GPU_DEPLOYMENT = "ft-pipeline/local-gpu"
CV_STEPS: tuple[str, ...] = ("0", "1")
DEFAULT_TIMEOUT_S = 24 * 3600.0  # the plan's CV: 10-20 s per image, 2,000 images ≈ 6-11 h


class RemoteRunFailed(RuntimeError):
    """The child deployment's run ended in a state other than Completed (or did not end in time)."""


def _logger() -> Any:
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("ft_pipeline.orchestrate")


def split_cv_steps(steps: str | list[str]) -> tuple[list[str], list[str]]:
    """(CV steps for the local-gpu pool, the rest) of a step selection, each in pipeline order."""
    selected = parse_steps(steps)
    return [s for s in selected if s in CV_STEPS], [s for s in selected if s not in CV_STEPS]


def run_cv_on_local_gpu(
    steps: str | list[str] = "0,1",
    config_file: str | None = None,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    deployment: str = LOCAL_GPU_DEPLOYMENT,
    data_root: str | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    poll_interval_s: float = 10.0,
    raise_on_failure: bool = True,
) -> dict[str, dict]:
    """Start `deployment` (default ft-pipeline/local-gpu) for the CV steps among `steps` and wait.

    Parameters go by reference: `config_file` must be a path valid on the worker machine (relative
    paths are relative to the project root there), `overrides` are the parent's dotted overrides.
    Each pool brings its own `paths.data_root` (the same store, spelled per machine: /workspace/...
    in a pod, s3://... on the workstation); pass `data_root` only to force one spelling on the child.

    Returns one report entry per CV step, like the parent flow's report:
    {"0": {"status": "done", "deployment": ..., "flow_run": ..., ...}, "1": {...}}.
    Inside a flow the child shows as a subflow run of it. Raises RemoteRunFailed when the child does
    not complete (unless raise_on_failure=False: then the entries have status "failed").
    """
    from prefect.deployments import run_deployment

    cv_steps, _ = split_cv_steps(steps)
    if not cv_steps:
        return {}
    child_overrides = dict(overrides or {})
    if data_root:
        child_overrides["paths.data_root"] = data_root
    parameters: dict[str, Any] = {
        "steps": ",".join(cv_steps),
        "config_file": config_file,
        "profile": profile,
        "overrides": child_overrides or None,
    }
    logger = _logger()
    logger.info("steps %s: starting deployment %s and waiting for it", ",".join(cv_steps), deployment)
    started = time.monotonic()
    flow_run = run_deployment(
        name=deployment,
        parameters=parameters,
        timeout=timeout_s,
        poll_interval=poll_interval_s,
        tags=["ft-pipeline", "cross-pool"],
    )
    state = flow_run.state
    entry = {
        "deployment": deployment,
        "flow_run": flow_run.name,
        "flow_run_id": str(flow_run.id),
        "state": state.name if state else "unknown",
        "seconds": round(time.monotonic() - started, 1),
    }
    if state is not None and state.is_completed():
        logger.info("deployment %s run %s completed", deployment, flow_run.name)
        return {step: {"status": "done", **entry} for step in cv_steps}
    reason = (
        f"deployment {deployment} run {flow_run.name} ended {entry['state']}"
        if state is not None and state.is_final()
        else f"deployment {deployment} run {flow_run.name} still {entry['state']} after {timeout_s} s "
        "(is a worker polling the pool?)"
    )
    if raise_on_failure:
        raise RemoteRunFailed(reason)
    logger.error(reason)
    return {step: {"status": "failed", "reason": reason, **entry} for step in cv_steps}
