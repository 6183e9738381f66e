"""Helpers shared by the task modules: settings per run, the store, artifact keys."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Annotated, Any

from prefect.cache_policies import CachePolicy
from pydantic import Field

from floorplan_ft.phase import PhaseResult
from floorplan_ft.progress import Progress
from floorplan_ft.settings import Settings, check_no_secret_overrides, load_settings
from floorplan_ft.steps import ALL_STEPS, STEPS_PATTERN
from floorplan_ft.store import ArtifactStore


def _run_api_handler() -> logging.Handler:
    """Prefect's API log handler, sending only inside a flow or task run (elsewhere, e.g. the CLI's
    import commands or the service, it stays silent instead of warning about a missing run)."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging.handlers import APILogHandler

    class RunAPILogHandler(APILogHandler):
        def emit(self, record: logging.LogRecord) -> None:
            if FlowRunContext.get() is None and TaskRunContext.get() is None:
                return
            super().emit(record)

    return RunAPILogHandler()


def route_domain_logs(level: int = logging.INFO) -> None:
    """Make the domain packages' standard-library log lines (`floorplan_ft.*`, `ft_pipeline.*`)
    visible at INFO: on the console through the root handlers, as before, and in the Prefect UI
    beside the run's own lines (what `PREFECT_LOGGING_EXTRA_LOGGERS` would do, without its warning
    outside runs). Idempotent."""
    for name in ("floorplan_ft", "ft_pipeline"):
        logger = logging.getLogger(name)
        if any(getattr(h, "_ftp_router", False) for h in logger.handlers):
            continue
        if logger.level == logging.NOTSET:
            logger.setLevel(level)
        handler = _run_api_handler()
        handler._ftp_router = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


route_domain_logs()

# Seconds between progress lines of a long step (FTP_PROGRESS_INTERVAL_S; the tests shorten it).
PROGRESS_INTERVAL_S = float(os.environ.get("FTP_PROGRESS_INTERVAL_S", "5"))


def in_run() -> bool:
    """True inside a Prefect flow or task run (a task called through `.fn()` is not in one)."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger (console and UI) inside a run, the `ft_pipeline.tasks` logger outside."""
    if not in_run():
        return logging.getLogger("ft_pipeline.tasks")
    from prefect import get_run_logger

    return get_run_logger()


def step_progress(label: str, total: int, key: str, *, unit: str = "plans") -> Progress:
    """A progress reporter for one long step of a task: lines through the run's logger (the
    console and the UI's logs), the same figures on the progress artifact `key` (inside a run)."""
    publish = None
    if in_run():
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        artifact = create_progress_artifact(0.0, key=artifact_key(key), description=f"{label}: starting")

        def publish(percent: float, line: str) -> None:
            update_progress_artifact(artifact, percent, description=line)

    return Progress(label, total, unit=unit, interval_s=PROGRESS_INTERVAL_S, publish=publish, logger=run_logger())


# The flows' `steps` parameter. Its pattern is in the parameter schema, so the server refuses a
# deployment run with a malformed selection when the run is created (from the UI or the CLI), not on
# a worker; a direct call reaches `parse_steps`, whose error names the unknown step. The
# descriptions of all parameters are the flows' docstrings (Prefect reads their Args sections).
Steps = Annotated[str, Field(json_schema_extra={"pattern": STEPS_PATTERN})]
DEFAULT_STEPS = ",".join(ALL_STEPS)


def nest_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """{"sampling.sample_size": 10} → {"sampling": {"sample_size": 10}}."""
    nested: dict[str, Any] = {}
    for dotted, value in (overrides or {}).items():
        parts = dotted.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def settings_for_run(
    config_file: str | None = None,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """The settings of one flow run. Its `overrides` are flow parameters (stored by Prefect and
    shown in the UI), so one naming a secret is refused with where to put it instead."""
    check_no_secret_overrides(overrides, "overrides")
    return load_settings(config_file, profile, **nest_overrides(overrides))


def store_for(settings: Settings) -> ArtifactStore:
    return ArtifactStore(settings.paths.data_root)


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    key = "-".join(parts).lower()
    return re.sub(r"[^a-z0-9-]+", "-", key).strip("-")[:100]


def publish(result: PhaseResult, *, teacher: str | None = None) -> PhaseResult:
    """Log a phase's warnings and one summary line, and publish its artifacts to the run (outside a
    run, e.g. a task called through `.fn()`, they stay on the result). The artifact keys are the
    phase's (one per teacher in phase 3: `teacher` is appended)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    logger = run_logger()
    for line in result.warnings:
        logger.warning(line)
    for artifact in result.artifacts if in_run() else ():
        key = artifact_key(artifact.key, *([teacher] if teacher else []))
        if artifact.kind == "markdown":
            create_markdown_artifact(key=key, markdown=artifact.markdown, description=artifact.description)
        else:
            create_table_artifact(key=key, table=artifact.table, description=artifact.description)
    figures = ", ".join(f"{k}={v}" for k, v in {**result.counts, **result.outputs}.items())
    logger.info("step %s: %s (%s)", result.step, result.status, figures)
    return result


def run_owner() -> str:
    """How a lease names this run: the flow run's name and id (the process, outside a run)."""
    if in_run():
        from prefect.runtime import flow_run

        return f"flow run '{flow_run.name}' ({flow_run.id})"
    return f"process {os.getpid()}"


@dataclass
class ThisRunOnly(CachePolicy):
    """A result key unique to one task run: the result is committed to result storage (readable
    with `state.result()` afterwards, from any machine that sees the storage), and never reused by
    another run. Prefect's NO_CACHE gives a result no key, so a persisted result was never written.
    The phases keep their own content-keyed caches in the data root; Prefect's would know neither
    a deleted file nor changed inputs."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        return f"{task_ctx.task.name}-{task_ctx.task_run.id}"


PERSIST_THIS_RUN = ThisRunOnly()
