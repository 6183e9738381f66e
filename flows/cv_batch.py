"""cv-batch: topology graphs for every image that lacks a fresh one (the overnight job)."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from blocks.secrets import apply_block_secrets
from floorplan_ft.lease import DataRootLease
from floorplan_ft.sampling import list_images, read_sample
from floorplan_ft.settings import ProfileName
from flows.hooks import CV_TIMEOUT_S, on_run_failed
from tasks.common import run_owner, settings_for_run, store_for
from tasks.cv import build_topologies

Scope = Literal["all", "sample"]


@flow(name="cv-batch", timeout_seconds=CV_TIMEOUT_S, on_failure=[on_run_failed], on_crashed=[on_run_failed])
def cv_batch(
    scope: Scope = "all",
    config_file: str | None = None,
    profile: ProfileName | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict:
    """Phase 1: a topology graph for every plan of `scope` that lacks a fresh one.

    Args:
        scope: "all": every image of the image directory (the nightly batch: only new or changed
            plans do work); "sample": the phase-0 sample (sampled_images.json).
        config_file: A TOML settings file, as a path on the machine that runs the flow (relative
            paths: to the project root there).
        profile: A settings profile (demo, production, local-8gb): the defaults of one set-up.
        overrides: Settings by dotted name, e.g. {"sampling.sample_size": 500}. Never keys or
            passwords: those come from blocks or the environment, and a secret here is refused.
    """
    settings = apply_block_secrets(settings_for_run(config_file, profile, overrides))
    if scope == "sample":
        stems = read_sample(store_for(settings).layout.run_file("sample"))
    else:
        stems = [f.stem for f in list_images(settings.image_dir())]
    with DataRootLease(store_for(settings), owner=run_owner()):  # one writer per data root
        return build_topologies(settings, stems).report()


def cv_batch_with_concurrency(concurrency: int):
    """The flow with a task runner bounded by cv.concurrency (1 on a single GPU)."""
    return cv_batch.with_options(task_runner=ThreadPoolTaskRunner(max_workers=concurrency))
