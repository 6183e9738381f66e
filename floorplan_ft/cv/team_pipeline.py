"""Phase 1 through the team's `InferencePipeline`, in this process.

Their repository's ``python/`` folder (``paths.team_code``) goes on the import path;
``CV.cv_inference.pipeline.InferencePipeline()`` is built and ``load_models()`` called once per
worker process; ``run(image_path)`` (a file path: it reads the image itself, BGR) returns
``{"topology_graph", "low_result", "source_result"}``. Its graph is stored as it came. Their
pipeline is not known to be thread-safe and holds the GPU: calls are serialised.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import threading
from pathlib import Path
from typing import Any

from floorplan_ft.cv.sources import (
    CVConfigError,
    FinishedTopology,
    SourceConfig,
    check_png,
    find_image,
    sha256_file,
)

PIPELINE_MODULE = "CV.cv_inference.pipeline"

_PIPELINES: dict[str, tuple[Any, str]] = {}
_LOAD_LOCK = threading.Lock()


def load_team_pipeline(team_code: str | None) -> tuple[Any, str]:
    """(the loaded InferencePipeline, its identity) for `team_code`, once per process."""
    if not team_code:
        raise CVConfigError(
            "cv.source is 'team-pipeline' but paths.team_code is not set: point it at the team "
            "repository's python/ folder"
        )
    root = Path(team_code).expanduser().resolve()
    key = str(root)
    with _LOAD_LOCK:
        if key in _PIPELINES:
            return _PIPELINES[key]
        if not (root / "CV" / "cv_inference").is_dir():
            raise CVConfigError(
                f"paths.team_code = {team_code}: no CV/cv_inference package under {root} "
                "(expected the team repository's python/ folder)"
            )
        if key not in sys.path:
            sys.path.insert(0, key)
        try:
            module = importlib.import_module(PIPELINE_MODULE)
            pipeline = module.InferencePipeline()
        except Exception as exc:  # noqa: BLE001 - their import chain (cv2, torch, weights) may fail anywhere
            raise CVConfigError(
                f"paths.team_code = {team_code}: cannot import {PIPELINE_MODULE}.InferencePipeline "
                f"({type(exc).__name__}: {exc})"
            ) from None
        try:
            pipeline.load_models()
        except Exception as exc:  # noqa: BLE001
            raise CVConfigError(
                f"paths.team_code = {team_code}: InferencePipeline.load_models() failed ({type(exc).__name__}: {exc})"
            ) from None
        source_file = Path(getattr(module, "__file__", "") or "")
        digest = sha256_file(source_file)[:16] if source_file.is_file() else "unknown"
        version = getattr(module, "__version__", None) or getattr(pipeline, "version", None) or digest
        _PIPELINES[key] = (pipeline, f"team-pipeline:{PIPELINE_MODULE}:{version}")
        return _PIPELINES[key]


def run_team_pipeline(pipeline: Any, image_path: Path, lock: threading.Lock) -> dict:
    """One image through their pipeline, without letting it write its own files."""
    kwargs: dict[str, bool] = {}
    params = inspect.signature(pipeline.run).parameters
    for flag in ("save_json", "save_visualization"):
        if flag in params:
            kwargs[flag] = False
    with lock:
        result = pipeline.run(str(image_path), **kwargs)
    if not isinstance(result, dict):
        raise ValueError(  # noqa: TRY004 - bad CV output is a per-image failure, ledgered like bad input
            f"{image_path}: InferencePipeline.run returned {type(result).__name__}, expected a dict"
        )
    return result


class TeamPipelineSource:
    """The team's detectors and aggregator in process: their `topology_graph` per image."""

    finished_topology = True

    def __init__(self, config: SourceConfig):
        self.config = config
        self.pipeline, self.identity = load_team_pipeline(config.team_code)
        self._lock = threading.Lock()

    def input_hash(self, stem: str) -> str:
        return sha256_file(find_image(self.config.image_dir, stem))

    def topology(self, stem: str) -> FinishedTopology:
        path = find_image(self.config.image_dir, stem)
        check_png(path)
        try:
            result = run_team_pipeline(self.pipeline, path, self._lock)
        except ValueError as exc:
            raise ValueError(f"{path}: InferencePipeline.run failed: {exc}") from None
        return finished_from_result(result, f"{path.name} from InferencePipeline")


def finished_from_result(result: dict, where: str) -> FinishedTopology:
    from floorplan_ft.cv.runpod import validate_team_topology

    graph = result.get("topology_graph")
    if not isinstance(graph, dict):
        raise ValueError(f"{where}: no topology_graph object in the result")  # noqa: TRY004
    validate_team_topology(graph, where)
    text = json.dumps(graph, ensure_ascii=False, indent=1) + "\n"
    return FinishedTopology(text=text, graph=graph, low_result=result.get("low_result"))
