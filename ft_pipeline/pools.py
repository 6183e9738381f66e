"""`ft-pipeline pools create`: the two work pools from deployments/pools/*.json, idempotently.

Each JSON file is a complete process-worker base job template (usable as is with
`prefect work-pool create NAME --type process --base-job-template FILE`); its `env` default is the
environment of every flow run in that pool. `--data-root` rewrites the data root and, for a local
path, the cache and result directories beside it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ft_pipeline.deploy_steps import project_root

POOLS: tuple[str, ...] = ("local-gpu", "runpod")
POOL_TYPE = "process"
# One GPU on the workstation: one flow run at a time (cv-batch and a CV child run queue rather than
# share 18-20 GB of GPU memory). A pod runs what it is given; start more pods for more runs.
CONCURRENCY: dict[str, int | None] = {"local-gpu": 1, "runpod": None}
DESCRIPTIONS = {
    "local-gpu": "The workstation's GPU: CV inference (phases 0-1) and the nightly cv-batch.",
    "runpod": "RunPod pods (A100): retrieval, labeling and fine-tuning (phases 2-6).",
}


def template_path(pool: str, root: Path | None = None) -> Path:
    if pool not in POOLS:
        raise ValueError(f"unknown work pool {pool!r} (choose from {', '.join(POOLS)})")
    return (root or project_root()) / "deployments" / "pools" / f"{pool}.json"


def load_template(pool: str, root: Path | None = None) -> dict[str, Any]:
    return json.loads(template_path(pool, root).read_text(encoding="utf-8"))


def template_env(template: dict[str, Any]) -> dict[str, str]:
    return dict(template["variables"]["properties"]["env"].get("default") or {})


def customise(
    template: dict[str, Any],
    data_root: str | None = None,
    cache_root: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A copy of `template` with the data root, cache root and extra variables applied.

    A local data root also moves the caches (`{root}/.cache`) and Prefect's results
    (`{root}/.prefect/results`) beside it; for a URL data root they stay where the template (or
    `cache_root`) puts them, since Prefect's local result storage needs a local path."""
    out = copy.deepcopy(template)
    values = template_env(out)
    if data_root:
        if "://" not in data_root:
            data_root = str(Path(data_root).expanduser().resolve())
            values["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = f"{data_root}/.prefect/results"
            cache_root = cache_root or f"{data_root}/.cache"
        values["FTP_PATHS__DATA_ROOT"] = data_root
    if cache_root:
        cache_root = str(Path(cache_root).expanduser().resolve())
        values["HF_HOME"] = f"{cache_root}/huggingface"
        values["TORCH_HOME"] = f"{cache_root}/torch"
        if not data_root or "://" in data_root:
            values["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = f"{cache_root}/prefect-results"
    values.update(env or {})
    out["variables"]["properties"]["env"]["default"] = values
    return out


def create_or_update(
    pools: list[str] | tuple[str, ...] = POOLS,
    data_root: str | None = None,
    cache_root: str | None = None,
    env: dict[str, str] | None = None,
) -> list[tuple[str, str, dict[str, str]]]:
    """Create each pool, or update its base job template if it differs.
    Returns (pool, 'created' | 'updated' | 'unchanged', flow-run env)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    root = project_root()
    results = []
    with get_client(sync_client=True) as client:
        for pool in pools:
            template = customise(load_template(pool, root), data_root, cache_root, env)
            try:
                existing = client.read_work_pool(pool)
            except ObjectNotFound:
                existing = None
            if existing is None:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=pool,
                        type=POOL_TYPE,
                        base_job_template=template,
                        description=DESCRIPTIONS[pool],
                        concurrency_limit=CONCURRENCY[pool],
                    )
                )
                status = "created"
            elif existing.type != POOL_TYPE:
                raise ValueError(
                    f"work pool {pool!r} exists with type {existing.type!r}, not {POOL_TYPE!r}: "
                    f"delete it (prefect work-pool delete {pool}) and run this again"
                )
            elif (existing.base_job_template, existing.description, existing.concurrency_limit) == (
                template,
                DESCRIPTIONS[pool],
                CONCURRENCY[pool],
            ):
                status = "unchanged"
            else:
                client.update_work_pool(
                    pool,
                    WorkPoolUpdate(
                        base_job_template=template, description=DESCRIPTIONS[pool], concurrency_limit=CONCURRENCY[pool]
                    ),
                )
                status = "updated"
            results.append((pool, status, template_env(template)))
    return results
