"""What a failed, crashed or timed-out run tells people: a log line on the run that says what
happened and how to resume, and, with `alerts.notify_block`, the same words through a Prefect
notification block (Slack, a webhook, email)."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("ft_pipeline.alerts")

FLOW_TIMEOUT_S = 48 * 3600.0  # ft-pipeline: labeling 2,000 plans twice and a 5-hour fine-tune, with room
CV_TIMEOUT_S = 24 * 3600.0  # cv-batch: 10-20 s per image, 2,000 images = 6-11 h

RESUME = (
    "Finished work is kept in the data root: run it again with the same parameters and it skips what "
    "is done (the sample, fresh graphs and contexts, cached answers) and resumes training from its last "
    "checkpoint."
)


def failure_message(flow: Any, flow_run: Any, state: Any) -> str:
    """The words of the alert: which run, how it ended and why, and how to resume."""
    ended = state.name or str(state.type)
    why = (state.message or "").strip() or "no message"
    if state.is_crashed():
        why += (
            " (the process running it stopped: a killed worker or pod reads 'Execution was aborted by "
            "Python system exit call')"
        )
    return f"{flow.name} run '{flow_run.name}' ({flow_run.id}) ended {ended}: {why}. {RESUME}"


def on_run_failed(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect's on_failure / on_crashed hook of the pipeline flows."""
    from prefect.logging.loggers import flow_run_logger

    message = failure_message(flow, flow_run, state)
    flow_run_logger(flow_run, flow).error(message)
    block = _notify_block(flow_run)
    if block:
        try:
            from prefect.blocks.core import Block

            Block.load(block).notify(message, subject=f"{flow.name}: run {flow_run.name} {state.name}")
        except Exception as exc:  # noqa: BLE001 - an alert that cannot be sent must not hide the failure
            flow_run_logger(flow_run, flow).error("alerts.notify_block %r: could not notify (%s)", block, exc)


def _notify_block(flow_run: Any) -> str | None:
    """`alerts.notify_block` of the run's own settings (its config file, profile and overrides)."""
    from tasks.common import settings_for_run

    params = flow_run.parameters or {}
    try:
        settings = settings_for_run(params.get("config_file"), params.get("profile"), params.get("overrides"))
    except Exception as exc:  # noqa: BLE001 - the settings may be what failed
        logger.warning("no alert block: the run's settings do not load (%s)", exc)
        return None
    return settings.alerts.notify_block
