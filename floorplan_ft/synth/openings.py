"""Doors, windows, open connections and walls on the boundaries of the pixel plan's spaces.

Every boundary two spaces share, and every stretch of a space's edge that no other space shares
(the exterior), gets its openings here; what is left of it becomes wall.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from floorplan_ft.synth.geometry import Segment, edges, shared_segment, side_of, subtract
from floorplan_ft.synth.model import Cell, Opening, Retry, SynthSpace, WallSegment

# role -> the roles its door may lead to, by preference
_DOOR_PARTNERS: dict[str, tuple[str, ...]] = {
    "bedroom": ("corridor", "living"),
    "bath": ("corridor", "living"),
    "dress": ("corridor", "living"),
    "alpha": ("living", "corridor"),
    "pantry": ("kitchen", "corridor", "living"),
    "utility": ("kitchen", "corridor", "living"),
}


@dataclass
class Boundaries:
    """The spaces' shared and exterior boundaries, and the openings placed on them so far."""

    rng: np.random.Generator
    spaces: list[SynthSpace]
    scale: float  # pixels per meter
    margin: int  # clearance between an opening and the end of its boundary
    shared: dict[tuple[int, int], Segment]
    exterior: dict[int, dict[str, list[tuple[int, int]]]]  # space -> side -> free stretches
    openings: list[Opening] = field(default_factory=list)

    @classmethod
    def of(cls, rng: np.random.Generator, spaces: list[SynthSpace], scale: float, margin: int) -> Boundaries:
        n = len(spaces)
        shared: dict[tuple[int, int], Segment] = {}
        for i in range(n):
            for j in range(i + 1, n):
                seg = shared_segment(spaces[i].rect, spaces[j].rect)
                if seg is not None:
                    shared[(i, j)] = seg
        exterior: dict[int, dict[str, list[tuple[int, int]]]] = {}
        for i in range(n):
            exterior[i] = {}
            for side, (o, line, lo, hi) in edges(spaces[i].rect).items():
                cuts = []
                for (a, b), (o2, l2, lo2, hi2) in shared.items():
                    if i in (a, b) and o2 == o and l2 == line:
                        cuts.append((lo2, hi2))
                exterior[i][side] = subtract(lo, hi, cuts)
        return cls(rng, spaces, scale, margin, shared, exterior)

    def segment(self, i: int, j: int) -> Segment | None:
        return self.shared.get((min(i, j), max(i, j)))

    def by_role(self, role: str) -> list[int]:
        return [sp.idx for sp in self.spaces if sp.role == role]

    def add(
        self, kind: str, i: int, j: int | None, seg: Segment, lo: int, hi: int, subtype: str | None = None
    ) -> Opening:
        o, line = seg[0], seg[1]
        idxs = (i,) if j is None else (i, j)
        sides = tuple(side_of(self.spaces[k].rect, o, line) for k in idxs)
        op = Opening(kind, o, line, lo, hi, idxs, sides, subtype)
        self.openings.append(op)
        return op

    def place(self, seg: Segment, length: int, centred: bool = False) -> tuple[int, int] | None:
        """Where an opening of ``length`` goes on ``seg`` (random, or near the middle), if it fits."""
        _o, _line, lo, hi = seg
        free = (hi - lo) - length - 2 * self.margin
        if free < 0:
            return None
        if centred:
            off = free // 2 + int(self.rng.integers(-(free // 6), free // 6 + 1)) if free >= 6 else free // 2
        else:
            off = int(self.rng.integers(0, free + 1))
        a = lo + self.margin + off
        return a, a + length

    def door(self, i: int, partners: tuple[str, ...], length_m: float, subtype: str) -> None:
        """A door from space ``i`` on its longest boundary with the first partner role that has room."""
        length = round(length_m * self.scale)
        for role in partners:
            cands = []
            for j in self.by_role(role):
                if j == i:
                    continue
                seg = self.segment(i, j)
                if seg is not None and seg[3] - seg[2] >= length + 2 * self.margin:
                    cands.append((seg[3] - seg[2], j, seg))
            if cands:
                cands.sort(key=lambda c: (-c[0], c[1]))
                _, j, seg = cands[0]
                lo, hi = self.place(seg, length)  # type: ignore[misc]
                self.add("door", i, j, seg, lo, hi, subtype)
                return
        raise Retry(f"no door for {self.spaces[i].role}")

    def open_connection(self, i: int, j: int, stubs: bool) -> None:
        """An open connection along the whole shared boundary (with short wall stubs, maybe)."""
        seg = self.segment(i, j)
        assert seg is not None
        s = self.scale
        lo, hi = seg[2], seg[3]
        if stubs and hi - lo > int(2.6 * s) and self.rng.random() < 0.55:
            lo += round(float(self.rng.uniform(0.2, 0.5)) * s)
        if stubs and hi - lo > int(2.4 * s) and self.rng.random() < 0.55:
            hi -= round(float(self.rng.uniform(0.2, 0.5)) * s)
        self.add("open", i, j, seg, lo, hi)


def _longest_boundary(b: Boundaries, i: int, roles: tuple[str, ...], min_length: int) -> tuple[int, Segment] | None:
    """(j, segment) of the longest boundary of space ``i`` with a space of ``roles`` that is at least
    ``min_length`` long (the lower index on ties)."""
    cands = []
    for role in roles:
        for j in b.by_role(role):
            seg = b.segment(i, j)
            if seg is not None and seg[3] - seg[2] >= min_length:
                cands.append((seg[3] - seg[2], j, seg))
    if not cands:
        return None
    cands.sort(key=lambda c: (-c[0], c[1]))
    return cands[0][1], cands[0][2]


def add_open_connections(b: Boundaries, cells: list[Cell]) -> None:
    """The kitchen open onto the living room (or, MB, onto what lies below it), the corridors open
    onto the living room and kitchen at their ends."""
    s = b.scale
    living = b.by_role("living")[0]
    kitchen = b.by_role("kitchen")[0]
    if cells[kitchen].key in ("above", "deep"):
        if b.segment(kitchen, living) is None:
            raise Retry("kitchen not beside living")
        b.open_connection(kitchen, living, stubs=True)
    else:  # MB: kitchen in the north row, open onto what lies below it
        cands = []
        for role in ("corridor", "living"):
            for j in b.by_role(role):
                seg = b.segment(kitchen, j)
                if seg is not None and seg[0] == "h" and seg[3] - seg[2] >= int(1.4 * s):
                    cands.append((seg[3] - seg[2], j))
        if not cands:
            raise Retry("MB kitchen not open")
        cands.sort(key=lambda c: (-c[0], c[1]))
        b.open_connection(kitchen, cands[0][1], stubs=True)
    for c in b.by_role("corridor"):
        for j in b.by_role("living") + b.by_role("kitchen"):
            seg = b.segment(c, j)
            if seg is not None and seg[0] == "v":
                b.add("open", c, j, seg, seg[2], seg[3])


def add_entrance_doors(b: Boundaries) -> None:
    """현관: a door to the 엘리베이터홀, open or a sliding door onto the corridor or living room;
    the 계단실's door to the hall."""
    rng, s = b.rng, b.scale
    ent = b.by_role("entrance")[0]
    stair = b.by_role("stair")[0]
    b.door(ent, ("hall",), float(rng.uniform(0.95, 1.05)), "여닫이")
    inner = _longest_boundary(b, ent, ("corridor", "living"), int(1.1 * s) + 2 * b.margin)
    if inner is None:
        raise Retry("entrance not reachable")
    j, seg = inner
    if rng.random() < 0.5:
        b.add("open", ent, j, seg, seg[2], seg[3])
    else:
        lo_hi = b.place(seg, round(float(rng.uniform(0.9, 1.1)) * s))
        assert lo_hi is not None
        b.add("door", ent, j, seg, lo_hi[0], lo_hi[1], "미닫이")
    b.door(stair, ("hall",), float(rng.uniform(0.85, 0.95)), "여닫이")


def add_room_doors(b: Boundaries, cells: list[Cell]) -> None:
    """One door per room: the deep master onto the living room or corridor, the en-suite rooms into
    the master, the other rooms by `_DOOR_PARTNERS`, the 실외기실 onto its balcony."""
    rng = b.rng
    master = next(sp.idx for sp in b.spaces if sp.is_master)
    for sp in b.spaces:
        r = sp.role
        c = cells[sp.idx]
        if r == "bedroom" and c.deep:
            b.door(sp.idx, ("living", "corridor"), float(rng.uniform(0.85, 0.95)), "여닫이")
        elif r in ("bath", "dress") and c.key == "ensuite":
            length = float(rng.uniform(0.75, 0.85))
            ln = round(length * b.scale)
            seg = b.segment(sp.idx, master)
            if seg is None or seg[3] - seg[2] < ln + 2 * b.margin:
                raise Retry("ensuite door")
            lo, hi = b.place(seg, ln)  # type: ignore[misc]
            b.add("door", sp.idx, master, seg, lo, hi, "여닫이" if r == "bath" else "미닫이")
        elif r in _DOOR_PARTNERS:
            sub = "미닫이" if r in ("pantry", "utility", "dress") else "여닫이"
            b.door(sp.idx, _DOOR_PARTNERS[r], float(rng.uniform(0.8, 0.9)), sub)
        elif r == "ac":
            b.door(sp.idx, ("balcony",), float(rng.uniform(0.65, 0.75)), "여닫이")


# --------------------------------------------------------------------------- windows


def add_windows(b: Boundaries, cells: list[Cell], info: dict[str, Any]) -> None:
    """The windows of every space: which sides get one by construction (the structure type follows
    from the living room's and kitchen's), then where on that side."""
    inside = [sp for sp in b.spaces if not sp.is_outside]
    ux0 = min(sp.rect[0] for sp in inside)
    ux1 = max(sp.rect[2] for sp in inside)
    for sp in b.spaces:
        at_w = sp.rect[0] == ux0
        at_e = sp.rect[2] == ux1
        end_sides = (["W"] if at_w else []) + (["E"] if at_e else [])
        wins = _wanted_windows(b.rng, sp, cells[sp.idx], info, end_sides)
        _place_windows(b, sp, cells[sp.idx], wins)


def _wanted_windows(
    rng: np.random.Generator, sp: SynthSpace, c: Cell, info: dict[str, Any], end_sides: list[str]
) -> list[tuple[str, str]]:
    """(side, "main"|"minor") of the windows space ``sp`` gets; ``end_sides`` are its sides on the
    unit's west/east ends."""
    r = sp.role
    variant = info["variant"]
    if r == "living":
        return [("S", "main")] + ([(end_sides[0], "minor")] if variant == "T1" else [])
    if r == "kitchen":
        return _kitchen_windows(c, variant, end_sides)
    if r == "bedroom":
        if sp.is_master and info["master_north"]:
            return []
        wins = [("S" if c.key == "south" else "N", "main")]
        if end_sides and rng.random() < (0.3 if sp.is_master else 0.25):
            wins.append((end_sides[0], "minor"))
        return wins
    north_window = {
        "bath": 0.4 if c.key == "ensuite" else 0.5,
        "dress": 0.15,
        "utility": 0.7,
        "alpha": 0.85,
    }
    if r in north_window and rng.random() < north_window[r]:
        return [("N", "main")]
    return list(c.wins)


def _kitchen_windows(c: Cell, variant: str, end_sides: list[str]) -> list[tuple[str, str]]:
    """판상형: north; 혼합형: the side wall at the unit's end; 타워형: south when deep, else none."""
    if c.key == "deep":
        return [("S", "main")]
    if variant == "P":
        return [("N", "main")]
    if variant in ("MA", "MB"):
        if not end_sides:
            raise Retry("mixed kitchen not at the end")
        return [(end_sides[0], "main")]
    return []


def _window_segments(b: Boundaries, sp: SynthSpace, side: str) -> list[tuple[Segment, int | None]]:
    """Where a window on ``side`` of ``sp`` may go: the boundaries with the balconies in front of a
    south room, else the longest exterior stretch of that side (other space None)."""
    segs: list[tuple[Segment, int | None]] = []
    if side == "S" and sp.role in ("living", "bedroom", "kitchen"):
        for bi in b.by_role("balcony"):
            seg = b.segment(sp.idx, bi)
            if seg is not None and seg[0] == "h" and seg[1] == sp.rect[3]:
                segs.append((seg, bi))
    if not segs:
        o, line, _lo, _hi = edges(sp.rect)[side]
        ext = b.exterior[sp.idx][side]
        if ext:
            lo, hi = max(ext, key=lambda e: (e[1] - e[0], -e[0]))
            segs = [((o, line, lo, hi), None)]
    return segs


def _window_fraction(rng: np.random.Generator, role: str, other: int | None) -> float:
    """How much of its boundary a window takes."""
    if other is not None:
        return float(rng.uniform(0.6, 0.85))
    if role == "balcony" or role == "ac":
        return float(rng.uniform(0.7, 0.9))
    if role in ("bath", "dress", "pantry", "utility"):
        return float(rng.uniform(0.35, 0.6))
    return float(rng.uniform(0.45, 0.7))


def _place_windows(b: Boundaries, sp: SynthSpace, c: Cell, wins: list[tuple[str, str]]) -> None:
    """The wanted windows on their boundaries; a minor window is at most 0.6 of the main one, and
    only where a main one was placed."""
    rng, r = b.rng, sp.role
    main_len = None
    for side, kind in wins:
        for seg, other in _window_segments(b, sp, side):
            frac = _window_fraction(rng, r, other)
            length = int(frac * (seg[3] - seg[2] - 2 * b.margin))
            if kind == "minor":
                if main_len is None:
                    continue
                length = min(length, int(0.6 * main_len))
            if length < int((0.3 if r == "ac" else 0.5) * b.scale):
                continue
            lo_hi = b.place(seg, length, centred=True)
            if lo_hi is None:
                continue
            sub = c.win_subtype
            if r == "bath" and rng.random() < 0.5:
                sub = "fixed"
            b.add("window", sp.idx, other, seg, lo_hi[0], lo_hi[1], sub)
            if kind == "main":
                main_len = max(main_len or 0, length)


# --------------------------------------------------------------------------- walls


def build_walls(b: Boundaries) -> list[WallSegment]:
    """Every shared and exterior boundary minus the openings on it."""
    walls: list[WallSegment] = []
    for (i, j), (o, line, lo, hi) in sorted(b.shared.items()):
        cuts = [(op.lo, op.hi) for op in b.openings if op.orient == o and op.line == line and set(op.spaces) == {i, j}]
        for a, c in subtract(lo, hi, cuts):
            walls.append(WallSegment(o, line, a, c, (i, j)))
    for i in range(len(b.spaces)):
        for side in ("N", "E", "S", "W"):
            o, line, _lo, _hi = edges(b.spaces[i].rect)[side]
            for lo, hi in b.exterior[i][side]:
                cuts = [(op.lo, op.hi) for op in b.openings if op.orient == o and op.line == line and op.spaces == (i,)]
                for a, c in subtract(lo, hi, cuts):
                    walls.append(WallSegment(o, line, a, c, (i,)))
    return walls
