"""Phase 0 task: stratified sample of the image directory (`floorplan_ft.sampling.run`)."""

from __future__ import annotations

from prefect import task

from floorplan_ft import sampling
from floorplan_ft.phase import PhaseResult
from floorplan_ft.settings import Settings
from tasks.common import PERSIST_THIS_RUN, publish, store_for


# Sampling is milliseconds of work and must rewrite its output when it was deleted, so it is not
# cached; the result is still persisted for the run record.
@task(name="sample-plans", cache_policy=PERSIST_THIS_RUN, persist_result=True)
def sample_plans(settings: Settings) -> PhaseResult:
    """Select `sampling.sample_size` plans, write sampled_images.json, publish the group table."""
    return publish(sampling.run(settings, store_for(settings)))
