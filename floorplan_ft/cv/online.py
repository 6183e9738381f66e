"""One uploaded plan → its topology, for the service's ``POST /analyze`` (multipart ``file``).

`topology_from_image(settings, image_bytes, filename)` runs the configured CV source (``runpod``,
``team-pipeline`` or ``plugin``) on the bytes and returns the graph as the source produced it, an
overlay picture and the source's name. `ImageError` (→ HTTP 400): the bytes are not a decodable
PNG/JPEG. `CVUnavailable` (→ 5xx): the source failed or is not configured; its message names the
setting or the endpoint, never a key.
"""

from __future__ import annotations

import io
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from floorplan_ft.cv.sources import CVConfigError, ImageError


class CVUnavailable(RuntimeError):
    """The CV source could not produce a topology for this image (endpoint down, refused key,
    invalid output, not configured). `retry_later`: the same request may work later (timeouts,
    an unreachable or overloaded endpoint), as opposed to a failed job or a configuration error."""

    def __init__(self, message: str, *, retry_later: bool = False):
        super().__init__(message)
        self.retry_later = retry_later


@dataclass(frozen=True)
class OnlineCVResult:
    topology: dict  # as the source returned it (the team's aggregator format for runpod/team-pipeline)
    overlay_png: bytes | None
    source: str  # the source's identity, e.g. "runpod:https://api.runpod.ai/v2/abc"


ONLINE_SOURCES = ("runpod", "team-pipeline", "plugin")


def topology_from_image(settings: Any, image_bytes: bytes, filename: str) -> OnlineCVResult:
    size = decode_check(image_bytes, filename)
    kind = settings.cv.source
    if kind not in ONLINE_SOURCES:
        raise CVUnavailable(
            f"cv.source = {kind!r} cannot analyse an uploaded image: set cv.source to one of "
            f"{', '.join(ONLINE_SOURCES)}"
        )
    name = _safe_name(filename)
    try:
        if kind == "runpod":
            return _runpod(settings, image_bytes, name)
        if kind == "team-pipeline":
            return _team_pipeline(settings, image_bytes, name)
        return _plugin(settings, image_bytes, name, size)
    except (CVConfigError, ValueError) as exc:
        raise CVUnavailable(str(exc)) from None


def decode_check(image_bytes: bytes, filename: str) -> tuple[int, int]:
    """(width, height) of a decodable image, else ImageError naming the upload."""
    from PIL import Image, UnidentifiedImageError

    if not image_bytes:
        raise ImageError(f"{filename}: empty upload")
    try:
        with Image.open(io.BytesIO(image_bytes)) as im:
            im.load()  # decode the pixels: a truncated file fails here, not in the detectors
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{filename}: not a decodable image ({exc})") from None


def _safe_name(filename: str) -> str:
    base = Path(filename or "upload.png").name
    stem = re.sub(r"[^\w.-]+", "_", Path(base).stem)[:100] or "upload"
    return f"{stem}.png"


def _runpod(settings: Any, image_bytes: bytes, name: str) -> OnlineCVResult:
    from floorplan_ft.cv.runpod import (
        RunPodError,
        endpoint_from_settings,
        finished_from_output,
        get_client,
        register_key,
    )

    endpoint = endpoint_from_settings(settings)
    client = get_client(endpoint, register_key(settings.runpod_api_key))
    png = _as_png(image_bytes)
    try:
        output = client.cv_inference(png, name)
    except RunPodError as exc:  # the auth error included: both are the service's 5xx
        raise CVUnavailable(str(exc), retry_later=exc.retry_later) from None
    finished = finished_from_output(output, f"{name} from {endpoint.url}")
    overlay = finished.overlay_png or _render(finished.graph, png)
    return OnlineCVResult(topology=finished.graph, overlay_png=overlay, source=endpoint.identity)


_TEAM_LOCK = threading.Lock()


def _team_pipeline(settings: Any, image_bytes: bytes, name: str) -> OnlineCVResult:
    from floorplan_ft.cv.team_pipeline import (
        finished_from_result,
        load_team_pipeline,
        run_team_pipeline,
    )

    pipeline, identity = load_team_pipeline(settings.paths.team_code)
    png = _as_png(image_bytes)
    with tempfile.TemporaryDirectory(prefix="ftp-cv-") as tmp:
        path = Path(tmp) / name  # their run() reads a file path and names the graph after it
        path.write_bytes(png)
        result = run_team_pipeline(pipeline, path, _TEAM_LOCK)
    finished = finished_from_result(result, f"{name} from InferencePipeline")
    return OnlineCVResult(topology=finished.graph, overlay_png=_render(finished.graph, png), source=identity)


def _plugin(settings: Any, image_bytes: bytes, name: str, size: tuple[int, int]) -> OnlineCVResult:
    import numpy as np
    from PIL import Image

    from floorplan_ft.cv.detections import Detections, detections_from_coco
    from floorplan_ft.cv.sources import load_plugin
    from floorplan_ft.cv.topology import BUILDER_VERSION, build_topology

    if not settings.cv.plugin:
        raise CVUnavailable("cv.source is 'plugin' but setting cv.plugin is empty")
    model = load_plugin(settings.cv.plugin, settings.cv.device)
    with Image.open(io.BytesIO(image_bytes)) as im:
        array = np.asarray(im.convert("RGB"))
    result = model.predict(array)
    if isinstance(result, dict):
        if "images" not in result:
            result = {**result, "images": [{"id": 1, "file_name": name, "width": size[0], "height": size[1]}]}
        result = detections_from_coco(result, None, strict_categories=settings.cv.strict_categories)
    if not isinstance(result, Detections):
        raise CVUnavailable(f"plugin {settings.cv.plugin} returned {type(result).__name__}, expected detections")
    graph = build_topology(result)
    graph.builder_version = BUILDER_VERSION
    topology = graph.model_dump(mode="json")
    return OnlineCVResult(
        topology=topology, overlay_png=_render(topology, _as_png(image_bytes)), source=f"plugin:{settings.cv.plugin}"
    )


def _as_png(image_bytes: bytes) -> bytes:
    """The upload as PNG bytes (the endpoint's contract); a PNG is passed through untouched."""
    if image_bytes[:8] == b"\x89PNG\r\n\x1a\n":
        return image_bytes
    from PIL import Image

    buf = io.BytesIO()
    with Image.open(io.BytesIO(image_bytes)) as im:
        im.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _render(graph: dict, png: bytes) -> bytes | None:
    """Our overlay renderer over the plan; None when the graph cannot be drawn (never fatal)."""
    from floorplan_ft.cv.overlay import render_overlay

    with tempfile.TemporaryDirectory(prefix="ftp-overlay-") as tmp:
        image = Path(tmp) / "plan.png"
        image.write_bytes(png)
        out = Path(tmp) / "overlay.png"
        try:
            render_overlay(graph, image, out)
        except (ValueError, OSError, KeyError, TypeError):
            return None
        return out.read_bytes()
