"""The layout model: rooms in meters (`Cell`), then the plan in pixels (`SynthPlan` and its parts).

Everything a plan's files say (annotations, image, truth) is derived from a `SynthPlan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from floorplan_ft import vocab


class Retry(Exception):
    """The sampled layout does not work out; draw another one."""


def pick(rng: np.random.Generator, options: list[tuple[str, float]]) -> str:
    """One of the options, drawn by weight."""
    p = np.array([w for _, w in options], dtype=float)
    return options[int(rng.choice(len(options), p=p / p.sum()))][0]


# --------------------------------------------------------------------------- meters


@dataclass
class Cell:
    """One room of the meter layout (north is up, y grows southwards)."""

    role: str
    x0: float
    y0: float
    x1: float
    y1: float
    wins: list[tuple[str, str]] = field(default_factory=list)  # (side, "main"|"minor")
    win_subtype: str = "미닫이"
    is_master: bool = False
    key: str = ""  # "south" (south row), "deep" (kitchen), "above", "ensuite"
    deep: bool = False  # spans the corridor row too

    @property
    def w(self) -> float:
        return self.x1 - self.x0


# --------------------------------------------------------------------------- pixels


@dataclass
class SynthSpace:
    """One space of the layout model (pixel rectangle ``x0, y0, x1, y1``, half-open)."""

    idx: int
    role: str  # living kitchen bedroom bath dress pantry utility alpha entrance corridor
    #            balcony ac hall stair
    category: str  # e.g. "공간_침실"
    label: str  # OCR text shown in the space, or the category suffix when it has none
    rect: tuple[int, int, int, int]
    is_outside: bool = False
    has_ocr: bool = True
    is_master: bool = False

    @property
    def name(self) -> str:
        return vocab.canonical_name(self.label)

    @property
    def area(self) -> int:
        x0, y0, x1, y1 = self.rect
        return (x1 - x0) * (y1 - y0)

    @property
    def centroid(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.rect
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)


@dataclass
class Opening:
    """A door, window or open connection on a boundary line.

    ``orient`` "h": the boundary is the horizontal line ``y = line`` between ``lo <= x <= hi``;
    "v": the vertical line ``x = line``. ``sides[k]`` is the side of ``spaces[k]`` the opening
    lies on (S/N/E/W), i.e. the direction a window faces from that space, by construction.
    """

    kind: str  # door | window | open
    orient: str
    line: int
    lo: int
    hi: int
    spaces: tuple[int, ...]
    sides: tuple[str, ...]
    subtype: str | None = None

    @property
    def length(self) -> int:
        return self.hi - self.lo

    def rect(self, t: int) -> tuple[int, int, int, int]:
        h = t // 2
        if self.orient == "h":
            return (self.lo, self.line - h, self.hi, self.line + h)
        return (self.line - h, self.lo, self.line + h, self.hi)


@dataclass
class WallSegment:
    orient: str
    line: int
    lo: int
    hi: int
    spaces: tuple[int, ...]

    def rect(self, t: int) -> tuple[int, int, int, int]:
        h = t // 2
        if self.orient == "h":
            return (self.lo, self.line - h, self.hi, self.line + h)
        return (self.line - h, self.lo, self.line + h, self.hi)


@dataclass
class PlacedBox:
    """An object (category ``객체_*``) or an OCR box (``text`` set) inside a space."""

    category: str
    space: int
    rect: tuple[int, int, int, int]
    text: str | None = None


@dataclass
class SynthPlan:
    stem: str
    width: int
    height: int
    wall_thickness: int
    scale: float  # pixels per meter
    spaces: list[SynthSpace]
    openings: list[Opening]
    walls: list[WallSegment]
    objects: list[PlacedBox]
    ocr: list[PlacedBox]
    intended: dict[str, Any] = field(default_factory=dict)

    @property
    def file_name(self) -> str:
        return f"{self.stem}.png"

    def windows_of(self, idx: int) -> list[tuple[Opening, str]]:
        """(window, side) pairs of space ``idx``, widest first (stable on ties)."""
        out = [(o, side) for o in self.openings if o.kind == "window" for i, side in zip(o.spaces, o.sides) if i == idx]
        out.sort(key=lambda w: -w[0].length)
        return out
