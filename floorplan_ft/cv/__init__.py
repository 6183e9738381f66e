"""CV phase: detections (COCO) → topology graph. No orchestration imports here."""

from floorplan_ft.cv.detections import (
    AnnotationError,
    Detection,
    Detections,
    DetImage,
    detections_from_coco,
)
from floorplan_ft.cv.overlay import render_overlay
from floorplan_ft.cv.topology import BUILDER_VERSION, build_topology, window_direction

__all__ = [
    "BUILDER_VERSION",
    "AnnotationError",
    "DetImage",
    "Detection",
    "Detections",
    "build_topology",
    "detections_from_coco",
    "render_overlay",
    "window_direction",
]
