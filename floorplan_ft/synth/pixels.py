"""The meter layout as a pixel plan: image size and scale, spaces, openings, walls, fixtures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from floorplan_ft.synth.furnish import furnish
from floorplan_ft.synth.labels import space_labels
from floorplan_ft.synth.model import Cell, Retry, SynthPlan, SynthSpace
from floorplan_ft.synth.openings import (
    Boundaries,
    add_entrance_doors,
    add_open_connections,
    add_room_doors,
    add_windows,
    build_walls,
)


@dataclass
class _Frame:
    """Image size and where the layout goes in it: ``scale`` pixels per meter, the layout's
    (``minx``, ``miny``) corner at pixel (``ox``, ``oy``)."""

    width: int
    height: int
    scale: float
    ox: float
    oy: float
    minx: float
    miny: float
    wall: int  # wall thickness, even
    margin: int  # clearance between an opening and the end of its boundary

    def rect(self, c: Cell) -> tuple[int, int, int, int]:
        s = self.scale

        def px(v: float, o: float, m0: float) -> int:
            return round(o + s * (v - m0))

        return (
            px(c.x0, self.ox, self.minx),
            px(c.y0, self.oy, self.miny),
            px(c.x1, self.ox, self.minx),
            px(c.y1, self.oy, self.miny),
        )


def build_plan(rng: np.random.Generator, stem: str, cells: list[Cell], info: dict[str, Any]) -> SynthPlan:
    """The pixel plan of one meter layout (``info`` from `sample_layout`). Raises Retry when a space
    comes out too small or an opening finds no place."""
    frame = _draw_frame(rng, cells)
    spaces = _place_spaces(rng, cells, frame)
    bounds = Boundaries.of(rng, spaces, frame.scale, frame.margin)
    add_open_connections(bounds, cells)
    add_entrance_doors(bounds)
    add_room_doors(bounds, cells)
    add_windows(bounds, cells, info)
    walls = build_walls(bounds)
    objects, ocr = furnish(rng, spaces, frame.scale, frame.wall)
    intended = {
        "structure_type": info["structure"],
        "bay_count": info["bay_count"],
        "variant": info["variant"],
        "bedrooms": info["bedrooms"],
        "master_north": info["master_north"],
    }
    return SynthPlan(
        stem=stem,
        width=frame.width,
        height=frame.height,
        wall_thickness=frame.wall,
        scale=round(frame.scale, 4),
        spaces=spaces,
        openings=bounds.openings,
        walls=walls,
        objects=objects,
        ocr=ocr,
        intended=intended,
    )


def _draw_frame(rng: np.random.Generator, cells: list[Cell]) -> _Frame:
    """A random image size (1200-2400 px wide, aspect 1.3-1.5) and the layout scaled into it with a
    random margin and offset."""
    width = int(rng.integers(1200, 2401))
    aspect = float(rng.uniform(1.3, 1.5))
    height = round(width / aspect)
    minx = min(c.x0 for c in cells)
    maxx = max(c.x1 for c in cells)
    miny = min(c.y0 for c in cells)
    maxy = max(c.y1 for c in cells)
    pw, ph = maxx - minx, maxy - miny
    mx = width * float(rng.uniform(0.04, 0.09))
    my = height * float(rng.uniform(0.04, 0.09))
    s = min((width - 2 * mx) / pw, (height - 2 * my) / ph)
    ox = mx + float(rng.uniform(0, max(0.0, width - 2 * mx - s * pw)))
    oy = my + float(rng.uniform(0, max(0.0, height - 2 * my - s * ph)))
    t = max(6, 2 * round(0.1 * s))
    margin = max(t, round(0.15 * s))
    return _Frame(width, height, s, ox, oy, minx, miny, t, margin)


def _place_spaces(rng: np.random.Generator, cells: list[Cell], frame: _Frame) -> list[SynthSpace]:
    """One labelled space per cell, in pixels."""
    t = frame.wall
    labels = space_labels(rng, cells)
    spaces: list[SynthSpace] = []
    for i, c in enumerate(cells):
        rect = frame.rect(c)
        if rect[2] - rect[0] < 3 * t or rect[3] - rect[1] < 3 * t:
            raise Retry("degenerate space")
        cat, lab, has_ocr = labels[i]
        spaces.append(
            SynthSpace(
                idx=i,
                role=c.role,
                category=cat,
                label=lab,
                rect=rect,
                is_outside=c.role in ("hall", "stair"),
                has_ocr=has_ocr,
                is_master=c.is_master,
            )
        )
    return spaces
