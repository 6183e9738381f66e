"""Phase 1 tasks: one topology per image, mapped; freshness decided by provenance sidecars."""

from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.utilities.annotations import unmapped

from floorplan_ft.cv.runner import (
    ImageOutcome,
    mark_stale,
    phase_result,
    process_image,
    stale_stems,
)
from floorplan_ft.cv.runpod import register_key
from floorplan_ft.cv.sources import CVConfigError, SourceConfig
from floorplan_ft.phase import PhaseResult
from floorplan_ft.settings import Settings
from floorplan_ft.store import ArtifactStore
from tasks.common import PERSIST_THIS_RUN, publish, step_progress, store_for


def source_config(settings: Settings) -> SourceConfig:
    cv = settings.cv
    remote = cv.source == "runpod"
    return SourceConfig(
        kind=cv.source,
        image_dir=settings.image_dir(),
        annotation_dir=None if settings.paths.annotation_file else settings.annotation_dir(),
        annotation_file=settings.paths.annotation_file,
        plugin=cv.plugin,
        device=cv.device,
        clear_cache_every=cv.clear_cache_every,
        strict_categories=cv.strict_categories,
        concurrency=cv.concurrency,
        runpod_endpoint_id=cv.runpod_endpoint_id if remote else None,
        runpod_base_url=cv.runpod_base_url,
        runpod_timeout_s=cv.runpod_timeout_s,
        runpod_poll_interval_s=cv.runpod_poll_interval_s,
        runpod_max_attempts=cv.runpod_max_attempts,
        # The key stays in this process; the task parameters (shown in the UI) carry a reference.
        runpod_key_ref=register_key(settings.runpod_api_key) if remote else None,
        team_code=settings.paths.team_code if cv.source == "team-pipeline" else None,
    )


def _not_config_error(task, task_run, state) -> bool:
    """No retry for a source that cannot work at all (a refused key, missing team code)."""
    try:
        state.result(raise_on_failure=True)
    except CVConfigError:
        return False
    except Exception:  # noqa: BLE001
        return True
    return True


# Not Prefect-cached on purpose: the output is a file in the shared data root, and Prefect's result
# cache cannot see that file deleted or its inputs changed. The content-keyed sidecar can, on every
# machine, so the flow only submits stale images and this task rebuilds what it is given.
# One task run covers a chunk of `cv.chunk_size` images: a task run costs ~10-30 ms of engine and
# API work on this class of machine (more than building a topology), and a server without Redis
# drops run history past a few thousand task runs per burst. Bad inputs fail per image inside the
# chunk; an unexpected error fails the chunk after its other images are done, and the retry only
# redoes what is still stale.
@task(
    name="build-topologies",
    cache_policy=PERSIST_THIS_RUN,
    persist_result=True,
    retries=2,
    retry_delay_seconds=[2, 8],
    retry_condition_fn=_not_config_error,
    task_run_name="topologies-{stems[0]}+{chunk_len}",
)
def build_topology_task(
    stems: list[str], config: SourceConfig, data_root: str, overlay: bool = False, chunk_len: int = 0
) -> list[dict]:
    store = ArtifactStore(data_root)
    outcomes, errors = [], []
    for stem, outcome in _process_chunk(store, config, stems, overlay):
        if isinstance(outcome, CVConfigError):
            raise outcome
        if isinstance(outcome, Exception):  # transient or unexpected: retried with the chunk
            errors.append(f"{stem}: {type(outcome).__name__}: {outcome}")
            continue
        if outcome.status == "failed":
            get_run_logger().warning("%s: %s", stem, outcome.reason)
        elif outcome.status == "fresh":  # built by an earlier attempt of this chunk
            outcome.status = "built"
        outcomes.append(outcome.model_dump())
    if errors:
        raise RuntimeError("; ".join(errors[:5]))
    return outcomes


def _process_chunk(store: ArtifactStore, config: SourceConfig, stems: list[str], overlay: bool):
    """(stem, outcome or exception) per image. A remote source (the RunPod endpoint) works on up
    to cv.concurrency images of the chunk at once (its client bounds requests in flight per
    process); local detectors go one by one. A configuration error stops the chunk."""

    def one(stem: str):
        try:
            return stem, process_image(store, config, stem, overlay=overlay)
        except Exception as exc:  # noqa: BLE001
            return stem, exc

    if config.kind != "runpod" or config.concurrency == 1:
        for stem in stems:
            result = one(stem)
            yield result
            if isinstance(result[1], CVConfigError):
                return
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=config.concurrency) as pool:
        yield from pool.map(one, stems)


@task(name="plan-cv-work", cache_policy=NO_CACHE)
def plan_cv_work(stems: list[str], config: SourceConfig, data_root: str) -> dict:
    fresh, todo = stale_stems(ArtifactStore(data_root), config, stems)
    return {"fresh": fresh, "todo": todo}


def build_topologies(settings: Settings, stems: list[str]) -> PhaseResult:
    """Submit one task per stale image, track progress, record failures, publish a summary.
    Call inside a flow; concurrency is that flow's task runner's."""
    logger = get_run_logger()
    started = time.perf_counter()
    store = store_for(settings)
    config = source_config(settings)
    plan = plan_cv_work(stems, config, store.root)
    todo = plan["todo"]
    logger.info("phase 1: %d images, %d fresh, %d to build", len(stems), len(plan["fresh"]), len(todo))

    outcomes: list[ImageOutcome] = []
    if todo:
        progress = step_progress("phase 1 CV", len(todo), "phase1-progress", unit="images")
        size = settings.cv.chunk_size
        chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
        futures = build_topology_task.map(
            chunks,
            config=unmapped(config),
            data_root=unmapped(store.root),
            overlay=unmapped(settings.cv.overlay),
            chunk_len=[len(c) for c in chunks],
        )
        chunk_of = {id(f): chunk for f, chunk in zip(futures, chunks, strict=True)}
        done = 0
        for future in as_completed(futures):
            chunk = chunk_of[id(future)]
            result = future.result(raise_on_failure=False)
            if isinstance(result, CVConfigError):
                # The source cannot work at all (e.g. the endpoint refused the key): stop the phase.
                logger.error("phase 1 stopped: %s", result)
                progress.close()
                raise CVConfigError(str(result))
            if isinstance(result, BaseException):
                # Retries exhausted: every image of the chunk without a fresh graph is a failure.
                fresh, stale = stale_stems(store, config, chunk)
                outcomes += [ImageOutcome(stem=s, status="built") for s in fresh]
                reason, error_type = f"{type(result).__name__}: {result}", type(result).__name__
                outcomes += [
                    ImageOutcome(
                        stem=s,
                        status="failed",
                        reason=reason,
                        error_type=error_type,
                        stale_graph=mark_stale(store, s, reason, error_type),
                    )
                    for s in stale
                ]
            else:
                outcomes += [ImageOutcome.model_validate(r) for r in result]
            done += len(chunk)
            progress.update(done, failed=sum(o.status == "failed" for o in outcomes))
        progress.close()
    return publish(phase_result(store, stems, plan["fresh"], outcomes, round(time.perf_counter() - started, 2)))
