"""Phase 0 task: stratified sample of the image directory."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from floorplan_ft.sampling import list_images, sample_images
from floorplan_ft.settings import Settings
from tasks.common import artifact_key, store_for


# Sampling is milliseconds of work and must rewrite its output when it was deleted, so it is not
# cached; the result is still persisted for the run record.
@task(name="sample-plans", cache_policy=NO_CACHE, persist_result=True)
def sample_plans(settings: Settings) -> dict:
    """Select `sampling.sample_size` plans, write sampled_images.json, publish the group table."""
    logger = get_run_logger()
    cfg = settings.sampling
    files = list_images(settings.image_dir())
    result = sample_images(
        files,
        n=cfg.sample_size,
        seed=cfg.seed,
        pattern=cfg.group_pattern,
        prefix_len=cfg.group_prefix_len,
        low_pct=cfg.size_low_pct,
        high_pct=cfg.size_high_pct,
    )
    for warning in result.warnings:
        logger.warning(warning)
    store = store_for(settings)
    path = store.write_json(store.layout.run_file("sample"), result.to_dict())
    create_table_artifact(
        key=artifact_key("phase0-sample"),
        table=[
            {
                "group": g.group,
                "population": g.population,
                "eligible": g.eligible,
                "sampled": g.sampled,
                "population_share": round(g.population_share, 4),
                "sample_share": round(g.sample_share, 4),
            }
            for g in result.groups
        ],
        description=(
            f"Phase 0: {len(result.stems)} of {len(files)} plans from {len(result.groups)} groups, "
            f"seed {result.seed}; {len(result.excluded)} left out by file size."
        ),
    )
    logger.info("sampled %d plans from %d groups → %s", len(result.stems), len(result.groups), path)
    return {
        "status": "done",
        "sampled": len(result.stems),
        "population": len(files),
        "groups": len(result.groups),
        "excluded": len(result.excluded),
        "warnings": result.warnings,
        "output": path,
    }
