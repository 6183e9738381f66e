"""Helpers shared by the task modules: settings per run, the store, artifact keys."""

from __future__ import annotations

import os
import re
from typing import Any

from floorplan_ft.progress import Progress
from floorplan_ft.settings import Settings, check_no_secret_overrides, load_settings
from floorplan_ft.store import ArtifactStore

# Seconds between progress lines of a long step (FTP_PROGRESS_INTERVAL_S; the tests shorten it).
PROGRESS_INTERVAL_S = float(os.environ.get("FTP_PROGRESS_INTERVAL_S", "5"))


def step_progress(label: str, total: int, key: str, *, unit: str = "plans") -> Progress:
    """A progress reporter for one long step of a task: lines through the run's logger (the
    console and the UI's logs), the same figures on the progress artifact `key`."""
    from prefect import get_run_logger
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    artifact = create_progress_artifact(0.0, key=artifact_key(key), description=f"{label}: starting")

    def publish(percent: float, line: str) -> None:
        update_progress_artifact(artifact, percent, description=line)

    return Progress(label, total, unit=unit, interval_s=PROGRESS_INTERVAL_S, publish=publish,
                    logger=get_run_logger())


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
