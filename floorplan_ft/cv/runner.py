"""Phase 1 per image: detections → topology_graph.json, with a provenance sidecar.

The sidecar (`topology_graph.meta.json`) is written after the graph and records the key the graph
was built from: source identity, builder version and the content hash of the inputs. A graph is
fresh when its sidecar's key matches the key computed now, so a rerun skips it, a deleted graph is
rebuilt, and a changed image, annotation, detector or builder rebuilds exactly what it touches.
The check lives in the data root, so it holds across machines and work pools.

A graph is only fresh when it also reads and validates (`ArtifactStore.topology_problem`): a
hand-edited or truncated file is rebuilt, never "cached". When a plan's inputs stop building (the
image or annotation became unreadable), its old graph stays on disk but its sidecar gets a
``stale`` mark (reason, error type, time): phases 2 and 3 skip it (`ArtifactStore.topology_stale`),
and the mark goes when the plan builds (or is found fresh) again. `cv_failures.json` holds the
current state: a plan that builds, or is fresh, leaves it.
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
from floorplan_ft.phase import DONE, DONE_WITH_FAILURES, Artifact, Failure, PhaseResult
from floorplan_ft.store import TOPOLOGY_SIDECAR, ArtifactStore, Layout

SIDECAR = TOPOLOGY_SIDECAR
IMPORT_SOURCE = "import"  # sidecar `source` of a graph from `ft-pipeline import topologies`
LOW_RESULT = Layout.LOW_RESULT  # named in the sidecar


class ImageOutcome(BaseModel):
    stem: str
    status: str  # built | fresh | failed
    reason: str | None = None
    error_type: str | None = None
    stale_graph: bool = False  # failed, and an older graph of the plan is kept, marked stale
    seconds: float = 0.0


def topology_key(source: DetectionSource, stem: str) -> tuple[str, str]:
    """(cache key, input hash) of a stem's topology under this source and builder."""
    input_hash = source.input_hash(stem)
    key = hashlib.sha256(f"{source.identity}|{BUILDER_VERSION}|{input_hash}".encode()).hexdigest()
    return key, input_hash


def sidecar_path(store: ArtifactStore, stem: str) -> str:
    return store.layout.topology_meta(stem)


def _read_meta(store: ArtifactStore, stem: str) -> dict | None:
    path = sidecar_path(store, stem)
    try:
        meta = store.read_json(path) if store.exists(path) else None
    except (ValueError, OSError):
        return None
    return meta if isinstance(meta, dict) else None


def _graph_ok(store: ArtifactStore, stem: str, meta: dict) -> bool:
    """Whether the graph file reads and validates. Fast path: the file is byte for byte what was
    written and checked then (the sidecar's `graph_sha256`, or an import's `sha256`); otherwise
    (edited by hand, or a sidecar from before the hash) it is read and validated."""
    expected = meta.get("graph_sha256") or meta.get("sha256")
    if isinstance(expected, str):
        try:
            if hashlib.sha256(store.read_bytes(store.layout.topology(stem))).hexdigest() == expected:
                return True
        except OSError:
            return False
    return store.topology_problem(stem) is None


def _fresh_meta(store: ArtifactStore, stem: str, key: str) -> dict | None:
    """The sidecar when the graph is fresh: its key is `key` and the graph reads and validates."""
    meta = _read_meta(store, stem)
    if meta is None or meta.get("key") != key:
        return None
    return meta if _graph_ok(store, stem, meta) else None


def is_fresh(store: ArtifactStore, stem: str, key: str) -> bool:
    return _fresh_meta(store, stem, key) is not None


def mark_stale(store: ArtifactStore, stem: str, reason: str | None, error_type: str | None) -> bool:
    """Mark the plan's existing graph stale in its sidecar (its inputs no longer build); False
    when there is no graph to mark."""
    if not store.exists(store.layout.topology(stem)):
        return False
    meta = _read_meta(store, stem) or {}
    meta["stale"] = {"reason": reason, "error_type": error_type, "at": datetime.now(UTC).isoformat(timespec="seconds")}
    store.write_json(sidecar_path(store, stem), meta)
    return True


def _clear_stale(store: ArtifactStore, stem: str, meta: dict | None = None) -> None:
    """Drop a stale mark from a graph found fresh again (its inputs were restored)."""
    meta = _read_meta(store, stem) if meta is None else meta
    if meta is not None and "stale" in meta:
        meta = {k: v for k, v in meta.items() if k != "stale"}
        store.write_json(sidecar_path(store, stem), meta)


def is_imported(store: ArtifactStore, stem: str) -> bool:
    """An imported graph (sidecar source "import") is done: never rebuilt, never a missing image."""
    try:
        return store.exists(store.layout.topology(stem)) and (
            store.read_json(sidecar_path(store, stem)).get("source") == IMPORT_SOURCE
        )
    except (ValueError, OSError, AttributeError):
        return False


def process_image(
    store: ArtifactStore, config: SourceConfig, stem: str, *, overlay: bool = False, force: bool = False
) -> ImageOutcome:
    """Build one topology unless it is fresh. Bad input returns a failed outcome naming the
    file and the problem; unexpected errors propagate so the orchestrator can retry them."""
    start = time.perf_counter()
    source = get_source(config)
    imported_problem = None
    if not force and is_imported(store, stem):
        meta = _read_meta(store, stem) or {}
        imported_problem = None if _graph_ok(store, stem, meta) else store.topology_problem(stem)
        if imported_problem is None:
            _clear_stale(store, stem, meta)
            return ImageOutcome(stem=stem, status="fresh", seconds=time.perf_counter() - start)
        # An imported graph that no longer reads: rebuilt from the plan's image if it has one.
    try:
        key, input_hash = topology_key(source, stem)
        meta = None if force else _fresh_meta(store, stem, key)
        if meta is not None:
            _clear_stale(store, stem, meta)
            return ImageOutcome(stem=stem, status="fresh", seconds=time.perf_counter() - start)
        if getattr(source, "finished_topology", False):
            finished = source.topology(stem)
            extra = _write_finished(store, stem, finished)
            graph_for_overlay = finished.graph
            written = finished.text.encode("utf-8")
        else:
            detections = source.detections(stem)
            graph = build_topology(detections)
            graph.builder_version = BUILDER_VERSION
            written = (graph.model_dump_json(indent=1) + "\n").encode("utf-8")
            store.write_bytes(store.layout.topology(stem), written)
            extra = {"skipped_annotations": detections.skipped_summary()}
            graph_for_overlay, finished = graph, None
    except ValueError as exc:  # AnnotationError, ImageError, bad plugin output, a failed CV job
        reason = str(exc) if imported_problem is None else f"{imported_problem}; rebuilding it: {exc}"
        return ImageOutcome(
            stem=stem,
            status="failed",
            reason=reason,
            error_type=type(exc).__name__,
            stale_graph=mark_stale(store, stem, reason, type(exc).__name__),
            seconds=time.perf_counter() - start,
        )
    if overlay:
        overlay_path = store.layout.overlay(stem)
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
            "graph_sha256": hashlib.sha256(written).hexdigest(),  # the validated file, as written
            **extra,
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    return ImageOutcome(stem=stem, status="built", seconds=time.perf_counter() - start)


def _write_finished(store: ArtifactStore, stem: str, finished: FinishedTopology) -> dict:
    """A graph the team's CV built: stored exactly as it came, its detections beside it."""
    store.write_text(store.layout.topology(stem), finished.text)
    extra: dict = {"format": "team"}
    if finished.low_result is not None:
        store.write_json(store.layout.low_result(stem), finished.low_result, indent=None)
        extra["low_result"] = LOW_RESULT
    return extra


def stale_stems(store: ArtifactStore, config: SourceConfig, stems: list[str]) -> tuple[list[str], list[str]]:
    """Split stems into (fresh, to_build). A stem whose inputs cannot even be hashed is "to build",
    so its failure is recorded with a reason by `process_image`; so is a graph that does not read
    or validate, even with a matching key. A fresh graph loses any stale mark."""
    source = get_source(config)
    fresh, todo = [], []
    for stem in stems:
        if is_imported(store, stem):
            meta = _read_meta(store, stem) or {}
            if _graph_ok(store, stem, meta):
                _clear_stale(store, stem, meta)
                fresh.append(stem)
            else:
                todo.append(stem)
            continue
        try:
            key, _ = topology_key(source, stem)
        except (ValueError, OSError):
            todo.append(stem)
            continue
        meta = _fresh_meta(store, stem, key)
        if meta is None:
            todo.append(stem)
        else:
            _clear_stale(store, stem, meta)
            fresh.append(stem)
    return fresh, todo


def update_failure_ledger(
    store: ArtifactStore, outcomes: list[ImageOutcome], fresh: list[str] | tuple[str, ...] = ()
) -> dict[str, dict]:
    """Merge this run's results into cv_failures.json: failures added (with whether an older graph
    is kept, marked stale), successes cleared, and so are the `fresh` stems (found current without
    a build, e.g. their inputs were restored): the ledger is the current state."""
    path = store.layout.run_file("cv_failures")
    ledger: dict[str, dict] = {}
    if store.exists(path):
        try:
            ledger = dict(store.read_json(path).get("failures", {}))
        except (ValueError, AttributeError):
            ledger = {}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    for o in outcomes:
        if o.status == "failed":
            ledger[o.stem] = {"reason": o.reason, "error_type": o.error_type, "at": now, "stale_graph": o.stale_graph}
        else:
            ledger.pop(o.stem, None)
    for stem in fresh:
        ledger.pop(stem, None)
    store.write_text(path, json.dumps({"failures": dict(sorted(ledger.items()))}, ensure_ascii=False, indent=1) + "\n")
    return ledger


def phase_result(
    store: ArtifactStore, stems: list[str], fresh: list[str], outcomes: list[ImageOutcome], seconds: float
) -> PhaseResult:
    """Phase 1's result over `stems`: the failure ledger updated from this run's `outcomes` (the
    images built or failed) and the `fresh` ones (current without a build), and the summary."""
    ledger = update_failure_ledger(store, outcomes, fresh=fresh)
    built = sum(o.status == "built" for o in outcomes)
    failed = sorted((o for o in outcomes if o.status == "failed"), key=lambda o: o.stem)
    stale = sum(o.stale_graph for o in failed)
    ledger_path = store.layout.run_file("cv_failures")
    return PhaseResult(
        step="1",
        status=DONE_WITH_FAILURES if failed else DONE,
        counts={"images": len(stems), "built": built, "cached": len(fresh), "failed": len(failed), "stale": stale},
        outputs={"failure_ledger": ledger_path if ledger else None},
        details={"seconds": seconds},
        failures=[Failure(o.stem, o.error_type or "failed", o.reason or "") for o in failed],
        warnings=(
            [f"phase 1: {stale} failed plans keep an older graph, marked stale: phases 2-3 skip them"] if stale else []
        ),
        artifacts=[
            Artifact(
                key="phase1-summary",
                markdown=_summary_markdown(len(stems), len(fresh), built, failed, seconds, ledger_path),
                description="Phase 1: CV inference → topology graphs",
            )
        ],
    )


def _summary_markdown(
    total: int, fresh: int, built: int, failed: list[ImageOutcome], seconds: float, ledger: str
) -> str:
    lines = [
        "# Phase 1: topology graphs",
        f"{total} images: **{built} built**, {fresh} already fresh (skipped), **{len(failed)} failed**, {seconds} s.",
    ]
    if failed:
        note = (
            f"Failure ledger: `{ledger}`. An older graph marked *stale* is kept on disk but skipped by phases 2 and 3."
        )
        lines += ["", note, "", "| image | reason | older graph |", "|---|---|---|"]
        lines += [
            f"| {o.stem} | {(o.reason or '').replace('|', '/')} | {'stale' if o.stale_graph else ''} |"
            for o in failed[:200]
        ]
    return "\n".join(lines)
