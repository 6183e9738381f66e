"""Phase 1 per image: detections → topology_graph.json, with a provenance sidecar.

The sidecar (`topology_graph.meta.json`) is written after the graph and records the key the graph
was built from: source identity, builder version and the content hash of the inputs. A graph is
fresh when its sidecar's key matches the key computed now, so a rerun skips it, a deleted graph is
rebuilt, and a changed image, annotation, detector or builder rebuilds exactly what it touches.
The check lives in the data root, so it holds across machines and work pools.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from floorplan_ft.cv.sources import (
    DetectionSource,
    FinishedTopology,
    SourceConfig,
    find_image,
    get_source,
)
from floorplan_ft.cv.topology import BUILDER_VERSION, build_topology
from floorplan_ft.store import ArtifactStore

SIDECAR = "topology_graph.meta.json"
IMPORT_SOURCE = "import"  # sidecar `source` of a graph from `ft-pipeline import topologies`
OVERLAY = "topology_overlay.png"
LOW_RESULT = "low_result.json"  # the team CV's merged detections, kept for provenance


class ImageOutcome(BaseModel):
    stem: str
    status: str  # built | fresh | failed
    reason: str | None = None
    error_type: str | None = None
    seconds: float = 0.0


def topology_key(source: DetectionSource, stem: str) -> tuple[str, str]:
    """(cache key, input hash) of a stem's topology under this source and builder."""
    input_hash = source.input_hash(stem)
    key = hashlib.sha256(f"{source.identity}|{BUILDER_VERSION}|{input_hash}".encode()).hexdigest()
    return key, input_hash


def sidecar_path(store: ArtifactStore, stem: str) -> str:
    return store.path("output", stem, SIDECAR)


def is_fresh(store: ArtifactStore, stem: str, key: str) -> bool:
    meta_path = sidecar_path(store, stem)
    if not (store.exists(meta_path) and store.exists(store.topology_path(stem))):
        return False
    try:
        return store.read_json(meta_path).get("key") == key
    except (ValueError, OSError):
        return False


def is_imported(store: ArtifactStore, stem: str) -> bool:
    """An imported graph (sidecar source "import") is done: never rebuilt, never a missing image."""
    try:
        return store.exists(store.topology_path(stem)) and (
            store.read_json(sidecar_path(store, stem)).get("source") == IMPORT_SOURCE)
    except (ValueError, OSError, AttributeError):
        return False


def process_image(
    store: ArtifactStore, config: SourceConfig, stem: str, *, overlay: bool = False, force: bool = False
) -> ImageOutcome:
    """Build one topology unless it is fresh. Bad input returns a failed outcome naming the
    file and the problem; unexpected errors propagate so the orchestrator can retry them."""
    start = time.perf_counter()
    source = get_source(config)
    if not force and is_imported(store, stem):
        return ImageOutcome(stem=stem, status="fresh", seconds=time.perf_counter() - start)
    try:
        key, input_hash = topology_key(source, stem)
        if not force and is_fresh(store, stem, key):
            return ImageOutcome(stem=stem, status="fresh", seconds=time.perf_counter() - start)
        if getattr(source, "finished_topology", False):
            finished = source.topology(stem)
            extra = _write_finished(store, stem, finished)
            graph_for_overlay = finished.graph
        else:
            detections = source.detections(stem)
            graph = build_topology(detections)
            graph.builder_version = BUILDER_VERSION
            store.write_text(store.topology_path(stem), graph.model_dump_json(indent=1) + "\n")
            extra = {"skipped_annotations": detections.skipped_summary()}
            graph_for_overlay, finished = graph, None
    except ValueError as exc:  # AnnotationError, ImageError, bad plugin output, a failed CV job
        return ImageOutcome(
            stem=stem, status="failed", reason=str(exc), error_type=type(exc).__name__,
            seconds=time.perf_counter() - start,
        )
    if overlay:
        overlay_path = store.path("output", stem, OVERLAY)
        if finished is not None and finished.overlay_png:
            store.write_bytes(overlay_path, finished.overlay_png)
        else:
            from floorplan_ft.cv.overlay import render_overlay

            render_overlay(graph_for_overlay, find_image(config.image_dir, stem), Path(overlay_path))
    store.write_json(
        sidecar_path(store, stem),
        {
            "key": key,
            "source": source.identity,
            "builder_version": BUILDER_VERSION,
            "input_hash": input_hash,
            **extra,
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    return ImageOutcome(stem=stem, status="built", seconds=time.perf_counter() - start)


def _write_finished(store: ArtifactStore, stem: str, finished: FinishedTopology) -> dict:
    """A graph the team's CV built: stored exactly as it came, its detections beside it."""
    store.write_text(store.topology_path(stem), finished.text)
    extra: dict = {"format": "team"}
    if finished.low_result is not None:
        store.write_json(store.path("output", stem, LOW_RESULT), finished.low_result, indent=None)
        extra["low_result"] = LOW_RESULT
    return extra


def stale_stems(store: ArtifactStore, config: SourceConfig, stems: list[str]) -> tuple[list[str], list[str]]:
    """Split stems into (fresh, to_build). A stem whose inputs cannot even be hashed is "to build",
    so its failure is recorded with a reason by `process_image`."""
    source = get_source(config)
    fresh, todo = [], []
    for stem in stems:
        if is_imported(store, stem):
            fresh.append(stem)
            continue
        try:
            key, _ = topology_key(source, stem)
        except (ValueError, OSError):
            todo.append(stem)
            continue
        (fresh if is_fresh(store, stem, key) else todo).append(stem)
    return fresh, todo


def update_failure_ledger(store: ArtifactStore, outcomes: list[ImageOutcome]) -> dict[str, dict]:
    """Merge this run's results into cv_failures.json: failures added, successes cleared."""
    path = store.run_file("cv_failures")
    ledger: dict[str, dict] = {}
    if store.exists(path):
        try:
            ledger = dict(store.read_json(path).get("failures", {}))
        except (ValueError, AttributeError):
            ledger = {}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    for o in outcomes:
        if o.status == "failed":
            ledger[o.stem] = {"reason": o.reason, "error_type": o.error_type, "at": now}
        else:
            ledger.pop(o.stem, None)
    store.write_text(path, json.dumps({"failures": dict(sorted(ledger.items()))}, ensure_ascii=False, indent=1) + "\n")
    return ledger
