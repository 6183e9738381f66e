"""Deterministic generator of synthetic Korean apartment floor plans.

The plans serve as demo data and as ground truth for the topology builder. Every plan comes
from an explicit *layout model* (which rooms exist, where they are, which walls carry which
window and which way each window faces by construction); the annotations, the rendered image
and the truth statistics are all derived from that one model.

The stages, in order: `layout` (rooms in meters; `rows` packs the rows), `pixels` (the plan in
pixels: `labels`, `openings` for doors, windows and walls, `furnish` for fixtures and OCR boxes),
`check` (the self check); then `annotations` (COCO), `render` (PNG), `truth` (true statistics)
and `write` (a dataset on disk). `generate` draws one plan; `model` holds the data types.

Geometry conventions (docs/data-formats.md): integer pixel coordinates; every space is an
axis-aligned rectangle and neighbours share boundary segments exactly; walls, doors and windows
are rectangles of thickness ``wall_thickness`` (even) centred on a boundary line, so they overlap
every space they separate; an open connection is a shared segment with no wall/door/window on it.
"""

from floorplan_ft.synth.annotations import plan_to_coco
from floorplan_ft.synth.check import self_check
from floorplan_ft.synth.generate import generate_plan
from floorplan_ft.synth.model import Opening, PlacedBox, SynthPlan, SynthSpace, WallSegment
from floorplan_ft.synth.render import _font as _font  # the font caches, which tests clear
from floorplan_ft.synth.render import _font_path as _font_path
from floorplan_ft.synth.render import png_bytes, render_plan
from floorplan_ft.synth.truth import load_truth, truth_statistics
from floorplan_ft.synth.write import complex_sizes, write_dataset

__all__ = [
    "Opening",
    "PlacedBox",
    "SynthPlan",
    "SynthSpace",
    "WallSegment",
    "complex_sizes",
    "generate_plan",
    "load_truth",
    "plan_to_coco",
    "png_bytes",
    "render_plan",
    "self_check",
    "truth_statistics",
    "write_dataset",
]
