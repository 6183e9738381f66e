"""Detection sources for phase 1: COCO annotation files, or the team's CV model as a plugin.

A source turns a stem into `Detections` and states two things the cache needs: its `identity`
(what kind of detector, which version) and `input_hash(stem)` (the content of everything it reads
for that stem). Synthetic plans from `ft-pipeline synth` come with COCO files, so the demo uses the
annotation source.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from floorplan_ft.cv.detections import AnnotationError, Detections, detections_from_coco


class ImageError(ValueError):
    """The plan image is missing or not a readable PNG; the message names the file."""


class CVConfigError(RuntimeError):
    """A source cannot work at all (no key, a refused key, the team's code missing): phase 1 stops
    with this message instead of failing every image."""


class SourceConfig(BaseModel):
    """What a worker needs to rebuild a source (small: it travels with every mapped task)."""

    model_config = ConfigDict(frozen=True)

    kind: str = "annotations"
    image_dir: str
    annotation_dir: str | None = None
    annotation_file: str | None = None
    plugin: str | None = None
    device: str = "auto"
    clear_cache_every: int = 50
    strict_categories: bool = False
    concurrency: int = 1
    # cv.source = "runpod": the endpoint, and a reference to the key kept in this process (the key
    # itself never travels in task parameters: they show in the Prefect UI).
    runpod_endpoint_id: str | None = None
    runpod_base_url: str = "https://api.runpod.ai/v2"
    runpod_timeout_s: float = 300.0
    runpod_poll_interval_s: float = 2.0
    runpod_max_attempts: int = 3
    runpod_key_ref: str | None = None
    # cv.source = "team-pipeline": the team's repository python/ folder.
    team_code: str | None = None


class DetectionSource(Protocol):
    identity: str

    def input_hash(self, stem: str) -> str: ...

    def detections(self, stem: str) -> Detections: ...


@dataclass(frozen=True)
class FinishedTopology:
    """What a source that builds the graph itself returns (the team's endpoint or pipeline):
    `text` is stored as the stem's topology_graph.json exactly, `low_result` beside it."""

    text: str
    graph: dict
    low_result: Any = None
    overlay_png: bytes | None = None


class TopologySource(Protocol):
    """A source whose output is a finished topology graph (no Detections, no builder)."""

    identity: str
    finished_topology: bool

    def input_hash(self, stem: str) -> str: ...

    def topology(self, stem: str) -> FinishedTopology: ...


def find_image(image_dir: str, stem: str) -> Path:
    """The PNG of a stem, whatever the case of its extension."""
    base = Path(image_dir)
    for suffix in (".png", ".PNG", ".Png"):
        candidate = base / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    matches = [p for p in base.glob(f"{stem}.*") if p.suffix.lower() == ".png"]
    if matches:
        return matches[0]
    raise ImageError(f"{base / (stem + '.png')}: image not found (setting paths.image_dir)")


def check_png(path: Path) -> tuple[int, int]:
    """Verify the PNG's structure without decoding its pixels; returns (width, height)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise ImageError(f"{path}: not a PNG (found {im.format})")
            size = im.size
            im.verify()
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: corrupt or unreadable PNG ({exc})") from None
    return size


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class AnnotationSource:
    """COCO annotation files: `{annotation_dir}/{stem}.json`, or one file for the whole set."""

    identity = "coco-annotations/1"

    def __init__(self, config: SourceConfig):
        if not config.annotation_dir and not config.annotation_file:
            raise ValueError("annotation source: set paths.annotation_dir or paths.annotation_file")
        self.config = config

    def annotation_path(self, stem: str) -> Path:
        if self.config.annotation_file:
            return Path(self.config.annotation_file)
        return Path(self.config.annotation_dir) / f"{stem}.json"

    def input_hash(self, stem: str) -> str:
        image = find_image(self.config.image_dir, stem)
        ann = self.annotation_path(stem)
        if not ann.is_file():
            raise AnnotationError(f"{ann}: annotation file not found (setting paths.annotation_dir)")
        return hashlib.sha256(f"{sha256_file(image)}:{sha256_file(ann)}".encode()).hexdigest()

    def detections(self, stem: str) -> Detections:
        image = find_image(self.config.image_dir, stem)
        width, height = check_png(image)
        ann = self.annotation_path(stem)
        coco = _load_coco(str(ann), ann.stat().st_mtime_ns) if ann.is_file() else None
        if coco is None:
            raise AnnotationError(f"{ann}: annotation file not found (setting paths.annotation_dir)")
        try:
            det = detections_from_coco(
                coco,
                image.name if self.config.annotation_file else None,
                strict_categories=self.config.strict_categories,
            )
        except AnnotationError as exc:
            raise AnnotationError(f"{ann}: {exc}") from None
        if (det.image.width, det.image.height) != (width, height):
            raise AnnotationError(
                f"{ann}: image size {det.image.width}x{det.image.height} does not match {image.name} ({width}x{height})"
            )
        return det


@lru_cache(maxsize=4)
def _load_coco(path: str, mtime_ns: int) -> dict[str, Any]:
    # A whole-set COCO file is parsed once per process (per version of the file), not per image.
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}: not valid JSON ({exc})") from None


# ----------------------------------------------------------------------------- plugin

_PLUGINS: dict[tuple[str, str], Any] = {}
_PLUGIN_LOCK = threading.Lock()


def load_plugin(spec: str, device: str = "auto") -> Any:
    """Import `package.module:factory`, call it once per process and keep the model."""
    key = (spec, device)
    with _PLUGIN_LOCK:
        if key in _PLUGINS:
            return _PLUGINS[key]
        module_name, sep, attr = spec.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(f"setting cv.plugin: expected 'package.module:factory', got {spec!r}")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"setting cv.plugin: cannot load {spec!r}: {exc}") from None
        kwargs = {"device": device} if "device" in inspect.signature(factory).parameters else {}
        model = factory(**kwargs)
        if not callable(getattr(model, "predict", None)):
            raise TypeError(f"setting cv.plugin: {spec!r} returned an object without predict(image)")
        _PLUGINS[key] = model
        return model


class PluginSource:
    """The team's own detectors: `predict(image) -> Detections | COCO dict` on an RGB array."""

    def __init__(self, config: SourceConfig):
        if not config.plugin:
            raise ValueError("cv.source is 'plugin' but setting cv.plugin is empty")
        self.config = config
        self.model = load_plugin(config.plugin, config.device)
        version = getattr(self.model, "version", None) or getattr(
            importlib.import_module(config.plugin.partition(":")[0]), "__version__", "0"
        )
        self.identity = f"plugin:{config.plugin}:{version}"
        self._count = 0
        self._lock = threading.Lock()

    def input_hash(self, stem: str) -> str:
        return sha256_file(find_image(self.config.image_dir, stem))

    def detections(self, stem: str) -> Detections:
        import numpy as np
        from PIL import Image

        path = find_image(self.config.image_dir, stem)
        check_png(path)
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
        result = self.model.predict(array)
        self._after_prediction()
        if isinstance(result, Detections):
            return result
        if isinstance(result, dict):
            if "images" not in result:
                result = {
                    **result,
                    "images": [{"id": 1, "file_name": path.name, "width": array.shape[1], "height": array.shape[0]}],
                }
            return detections_from_coco(result, None, strict_categories=self.config.strict_categories)
        raise AnnotationError(
            f"{path}: plugin {self.config.plugin} returned {type(result).__name__}, expected Detections or a COCO dict"
        )

    def _after_prediction(self) -> None:
        # The team's four detectors hold ~18-20 GB; freeing the CUDA cache every N images keeps a
        # long overnight batch from fragmenting memory.
        with self._lock:
            self._count += 1
            due = self._count % self.config.clear_cache_every == 0
        if due:
            try:
                import torch
            except ImportError:
                return
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


_SOURCES: dict[SourceConfig, DetectionSource | TopologySource] = {}
_SOURCES_LOCK = threading.Lock()


def get_source(config: SourceConfig) -> DetectionSource | TopologySource:
    """One source object per configuration per process (plugins and the team's pipeline load their
    models once)."""
    with _SOURCES_LOCK:
        if config not in _SOURCES:
            if config.kind == "annotations":
                _SOURCES[config] = AnnotationSource(config)
            elif config.kind == "plugin":
                _SOURCES[config] = PluginSource(config)
            elif config.kind == "runpod":
                from floorplan_ft.cv.runpod import RunPodSource

                _SOURCES[config] = RunPodSource(config)
            elif config.kind == "team-pipeline":
                from floorplan_ft.cv.team_pipeline import TeamPipelineSource

                _SOURCES[config] = TeamPipelineSource(config)
            else:
                raise ValueError(f"setting cv.source: unknown detection source {config.kind!r}")
        return _SOURCES[config]
