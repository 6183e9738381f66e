"""Deterministic generator of synthetic Korean apartment floor plans.

The plans serve as demo data and as ground truth for the topology builder. Every plan comes
from an explicit *layout model* (which rooms exist, where they are, which walls carry which
window and which way each window faces by construction); the annotations, the rendered image
and the truth statistics are all derived from that one model.

Layout (meters first, then pixels; north is the top of the image)::

              [계단실]                         outside core (엘리베이터홀 north of 현관,
              [EV홀 ]                          계단실 beside it or north of it)
    N row   | 침실3 | 현관 | 욕실 |  주방   | 드레스 | 부부욕실 |    kitchen, bedrooms, baths, …
    C row   |    복도(기타)      |         |      안방        |    corridor between the rows
    S row   | 침실2 |   침실4   |  거실    |                  |    bay rooms facing south
            |   발코니1         | 발코니2  |    발코니3       |    balconies in front

* The south row holds the bay rooms (거실 + south bedrooms). The living room and a "deep" master
  bedroom (and, in some tower plans, the kitchen) span the corridor row too; the other south
  bedrooms are shallow and open onto a corridor (``공간_기타``, no OCR label, so its label is
  ``기타``) that runs above them and opens onto the living room.
* The north row is packed with the kitchen (above the living room, open to it), an en-suite
  dress room/bath above a deep master, and the remaining rooms (현관, bathrooms, north bedrooms,
  pantry, 다용도실, 알파룸, …), each with a door onto the corridor or living room below it.
* Structure types by construction: 판상형 = living room faces south, kitchen window on the north
  exterior wall; 혼합형 = kitchen at the east/west end with its only window on the side wall;
  타워형 = corner living room with south + side windows, or a windowless kitchen, or a kitchen in
  the south row facing south.

Geometry conventions (docs/data-formats.md): integer pixel coordinates; every space is an
axis-aligned rectangle and neighbours share boundary segments exactly; walls, doors and windows
are rectangles of thickness ``wall_thickness`` (even) centred on a boundary line, so they overlap
every space they separate; an open connection is a shared segment with no wall/door/window on it.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from floorplan_ft import vocab

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

STRUCTURE_TYPES = ("판상형", "타워형", "혼합형")
_OPPOSITE = {"S": "N", "N": "S", "E": "W", "W": "E"}


# --------------------------------------------------------------------------- model


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


class _Retry(Exception):
    """The sampled layout does not work out; draw another one."""


# --------------------------------------------------------------------------- labels


def _pick(rng: np.random.Generator, options: list[tuple[str, float]]) -> str:
    p = np.array([w for _, w in options], dtype=float)
    return options[int(rng.choice(len(options), p=p / p.sum()))][0]


# --------------------------------------------------------------------------- meter layout


@dataclass
class _Cell:
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


# role -> (min width, max width, weight for slack) in the north row, meters.
_NSPEC: dict[str, tuple[float, float, float]] = {
    "entrance": (1.6, 2.5, 1.0),
    "bath": (1.8, 2.8, 1.0),
    "bedroom": (2.8, 4.0, 3.0),
    "master": (3.4, 5.5, 3.0),
    "pantry": (1.35, 2.0, 0.4),
    "utility": (1.45, 2.4, 0.6),
    "alpha": (2.3, 3.4, 2.0),
    "dress": (1.6, 2.6, 1.0),
    "kitchen": (3.0, 4.2, 2.0),
}


@dataclass
class _Item:
    role: str
    minw: float
    maxw: float
    weight: float
    width: float = 0.0
    x0: float = 0.0
    tag: str = ""  # "kitchen-end", "near-kitchen", "combo"
    optional: bool = False


def _new_item(rng: np.random.Generator, role: str, tag: str = "", optional: bool = False) -> _Item:
    lo, hi, wt = _NSPEC[role]
    return _Item(role, lo * float(rng.uniform(1.0, 1.08)), hi, wt, tag=tag, optional=optional)


def _sample_layout(rng: np.random.Generator) -> tuple[list[_Cell], dict[str, Any]]:
    """One layout in meters. Raises _Retry when the draw does not work out."""
    structure = str(rng.choice(STRUCTURE_TYPES, p=[0.5, 0.3, 0.2]))
    if structure == "판상형":
        variant = "P"
    elif structure == "타워형":
        variant = _pick(rng, [("T1", 0.4), ("T2", 0.3), ("T3", 0.3)])
    else:
        variant = _pick(rng, [("MA", 0.55), ("MB", 0.45)])
    bay = int(rng.choice([2, 3, 4, 5], p=[0.17, 0.38, 0.33, 0.12]))
    k_s = bay - 1  # bedrooms in the south row
    lo = max(2, k_s)
    n_bed = min(4, lo + int(rng.random() < 0.4))
    master_north = n_bed > k_s and rng.random() < 0.25
    kitchen_deep = variant == "T2" or (variant == "T1" and rng.random() < 0.5)

    # ---- south row arrangement
    for _attempt in range(2):
        living_end = variant in ("MA", "T1")
        end_side = "W" if rng.random() < 0.5 else "E"
        if living_end:
            n_w = 0 if end_side == "W" else k_s
        else:
            n_w = int(rng.binomial(k_s, 0.5))
        block = ["L"]
        if kitchen_deep:
            if living_end:
                block = ["L", "K"] if end_side == "W" else ["K", "L"]
            else:
                block = ["L", "K"] if rng.random() < 0.5 else ["K", "L"]
        cells = ["B"] * n_w + block + ["B"] * (k_s - n_w)
        last = len(cells) - 1
        kend: int | None = None
        if variant == "MB":
            kends = [e for e in (0, last) if cells[e] == "B"]
            if not kends:
                variant = "MA"
                continue
            kend = kends[int(rng.integers(len(kends)))]
        break
    else:  # pragma: no cover - MA always works
        raise _Retry("arrangement")

    def nb(e: int) -> int:
        return 1 if e == 0 else e - 1

    if not master_north:
        md_ends = [e for e in (0, last) if cells[e] == "B" and cells[nb(e)] in ("B", "L") and e != kend]
        if md_ends and rng.random() < 0.55:
            cells[md_ends[int(rng.integers(len(md_ends)))]] = "MD"
        else:
            bs = [i for i, c in enumerate(cells) if c == "B"]
            cells[bs[int(rng.integers(len(bs)))]] = "MS"
    if not any(c in ("B", "MS") for c in cells):
        cells = ["MS" if c == "MD" else c for c in cells]

    base_w = {
        "L": (3.9, 5.0),
        "K": (3.0, 3.6),
        "B": (2.8, 3.4),
        "MS": (3.5, 4.1),
        "MD": (3.3, 4.0),
    }
    widths = [float(rng.uniform(*base_w[c])) for c in cells]
    dN = float(rng.uniform(2.9, 3.5))
    dC = float(rng.uniform(1.45, 1.8))
    dS = float(rng.uniform(3.3, 4.0))
    dB = float(rng.uniform(1.3, 1.7))
    Y0, Y1 = 0.0, dN
    Y2 = Y1 + dC
    Y3 = Y2 + dS
    Y4 = Y3 + dB
    li = cells.index("L")
    ki = cells.index("K") if "K" in cells else None
    mdi = cells.index("MD") if "MD" in cells else None

    # ---- north row contents
    kitchen_above = variant in ("P", "MA", "T3") or (variant == "T1" and not kitchen_deep)
    kw0 = float(rng.uniform(2.9, 3.6))
    if living_end:
        ka_anchor = "W" if li == 0 else "E"
    else:
        run_w = 0
        while li - run_w - 1 >= 0 and cells[li - run_w - 1] in ("B", "MS"):
            run_w += 1
        run_e = 0
        while li + run_e + 1 < len(cells) and cells[li + run_e + 1] in ("B", "MS"):
            run_e += 1
        if run_w and run_e:
            # remainder (away from the anchor) faces the shorter run
            ka_anchor = "W" if run_e < run_w else "E" if run_w < run_e else _pick(rng, [("W", 1), ("E", 1)])
        elif run_e:
            ka_anchor = "W"
        elif run_w:
            ka_anchor = "E"
        else:
            ka_anchor = _pick(rng, [("W", 1), ("E", 1)])
    kd_item: str | None = None
    if kitchen_deep:
        kd_item = _pick(rng, [("utility", 0.35), ("pantry", 0.25), ("", 0.4)]) or None
    ensuite: list[str] = []
    if mdi is not None:
        ensuite = list([["dress", "bath"], ["bath"], ["dress"]][int(rng.choice(3, p=[0.5, 0.3, 0.2]))])
        if len(ensuite) == 2 and rng.random() < 0.5:
            ensuite.reverse()
    ensuite_bath = "bath" in ensuite
    if ensuite_bath:
        common_baths = 1
    elif n_bed >= 3:
        common_baths = 2 if rng.random() < 0.7 else 1
    else:
        common_baths = 2 if rng.random() < 0.25 else 1

    items: list[_Item] = []
    if master_north:
        items.append(_new_item(rng, "entrance", "combo"))
        items.append(_new_item(rng, "master", "combo"))
    else:
        items.append(_new_item(rng, "entrance"))
    items += [_new_item(rng, "bath", optional=k > 0) for k in range(common_baths)]
    items += [_new_item(rng, "bedroom") for _ in range(n_bed - k_s - int(master_north))]
    if variant == "MB":
        items.append(_new_item(rng, "kitchen", "kitchen-end"))
    used = {it.role for it in items}
    if kd_item:
        used.add(kd_item)
    if ensuite:
        used.add("dress")
    for role, p in (("pantry", 0.35), ("utility", 0.3), ("alpha", 0.25), ("dress", 0.2)):
        if role not in used and rng.random() < p:
            tag = "near-kitchen" if role == "pantry" else ""
            items.append(_new_item(rng, role, tag, optional=True))
            used.add(role)
    fillers = [r for r in ("alpha", "dress", "utility", "pantry") if r not in used]
    rng.shuffle(fillers)
    if common_baths + int(ensuite_bath) < 2:
        fillers.append("bath")
    fillers += ["bedroom"] * (4 - n_bed)

    for _solve in range(6):
        ws = list(widths)
        cells_out, info = _solve_rows(
            rng,
            cells,
            ws,
            items,
            fillers,
            kitchen_above,
            kw0,
            ka_anchor,
            kd_item,
            ensuite,
            variant,
            kend,
            li,
            ki,
            mdi,
            (Y0, Y1, Y2, Y3, Y4),
        )
        # master must be the largest bedroom by a clear margin
        beds = [c for c in cells_out if c.role == "bedroom"]
        master = next(c for c in beds if c.is_master)
        other = max((c.w * (c.y1 - c.y0) for c in beds if not c.is_master), default=0.0)
        area = master.w * (master.y1 - master.y0)
        if area >= 1.04 * other:
            break
        need = other * 1.06 / area
        if master_north:
            for it in items:
                if it.role == "master":
                    it.minw = max(it.minw, master.w * need)
                    it.maxw = max(it.maxw, it.minw + 0.5)
                    if it.minw > 5.5:
                        raise _Retry("north master too wide")
        else:
            mi = cells.index("MD") if "MD" in cells else cells.index("MS")
            widths[mi] *= need
    else:
        raise _Retry("master not largest")

    cells_out += _balconies(rng, cells_out, Y3, Y4)
    cells_out += _core(rng, cells_out, Y0, master_north)
    info.update(
        structure=structure,
        variant=variant,
        bay_count=bay,
        bedrooms=n_bed,
        master_north=master_north,
    )
    return cells_out, info


def _solve_rows(
    rng: np.random.Generator,
    cells: list[str],
    widths: list[float],
    items_in: list[_Item],
    fillers_in: list[str],
    kitchen_above: bool,
    kw0: float,
    ka_anchor: str,
    kd_item: str | None,
    ensuite: list[str],
    variant: str,
    kend: int | None,
    li: int,
    ki: int | None,
    mdi: int | None,
    ys: tuple[float, float, float, float, float],
) -> tuple[list[_Cell], dict[str, Any]]:
    Y0, Y1, Y2, Y3, _Y4 = ys
    items = [_Item(i.role, i.minw, i.maxw, i.weight, tag=i.tag, optional=i.optional) for i in items_in]
    fillers = list(fillers_in)
    n = len(cells)
    shallow = [c in ("B", "MS") for c in cells]

    def xs_of() -> list[float]:
        xs = [0.0]
        for w in widths:
            xs.append(xs[-1] + w)
        return xs

    def ka_range(xs: list[float]) -> tuple[float, float] | None:
        if not kitchen_above:
            return None
        lx0, lx1 = xs[li], xs[li + 1]
        kw = min(kw0, lx1 - lx0)
        # the remainder of the living room's top edge (on the side away from the anchor) joins
        # the neighbouring free span; with no shallow neighbour there, the kitchen takes it all
        nbi = li + 1 if ka_anchor == "W" else li - 1
        if (lx1 - lx0) - kw < 1.6 and not (0 <= nbi < n and shallow[nbi]):
            kw = lx1 - lx0
        return (lx0, lx0 + kw) if ka_anchor == "W" else (lx1 - kw, lx1)

    def spans_of(xs: list[float]) -> list[tuple[float, float]]:
        fixed = []
        if mdi is not None:
            fixed.append((xs[mdi], xs[mdi + 1]))
        if ki is not None:
            fixed.append((xs[ki], xs[ki + 1]))
        ka = ka_range(xs)
        if ka is not None:
            fixed.append(ka)
        fixed.sort()
        out, cur = [], 0.0
        for a, b in fixed:
            if a - cur > 1e-6:
                out.append((cur, a))
            cur = max(cur, b)
        if xs[-1] - cur > 1e-6:
            out.append((cur, xs[-1]))
        return out

    xs = xs_of()
    spans = spans_of(xs)
    if not spans:
        raise _Retry("no free span")
    ka = ka_range(xs)

    # which span touches the kitchen (for the pantry) / the unit end (for the MB kitchen)
    def span_touching(x: float) -> int | None:
        for si, (a, b) in enumerate(spans):
            if abs(a - x) < 1e-6 or abs(b - x) < 1e-6:
                return si
        return None

    assign: dict[int, list[_Item]] = {si: [] for si in range(len(spans))}
    pending = list(items)
    # constrained items first
    for it in list(pending):
        si = None
        if it.tag == "kitchen-end":
            si = span_touching(0.0 if kend == 0 else xs[-1])
        elif it.tag == "near-kitchen" and ka is not None:
            si = span_touching(ka[0]) if span_touching(ka[0]) is not None else span_touching(ka[1])
        if si is not None:
            assign[si].append(it)
            pending.remove(it)
        elif it.tag == "kitchen-end":
            raise _Retry("MB kitchen span")
    # the 현관 + north master combo travels together
    combo = [it for it in pending if it.tag == "combo"]
    for it in combo:
        pending.remove(it)
    groups: list[list[_Item]] = ([combo] if combo else []) + [[it] for it in pending]
    groups.sort(key=lambda g: -sum(i.minw for i in g))

    def load(si: int) -> float:
        a, b = spans[si]
        return (b - a) - sum(i.minw for i in assign[si])

    for g in groups:
        si = max(range(len(spans)), key=lambda s: (load(s), -s))
        assign[si].extend(g)

    # make room where the north row needs more: first drop optional rooms, then widen the
    # south-row cells below the span (and the living room when its top edge reaches the span)
    caps = {"B": 4.0, "MS": 4.8, "L": 6.0}
    for _it in range(24):
        xs = xs_of()
        spans_now = spans_of(xs)
        if len(spans_now) != len(spans):
            raise _Retry("span structure changed")
        spans = spans_now
        ka = ka_range(xs)
        changed = False
        for si, (a, b) in enumerate(spans):
            need = sum(i.minw for i in assign[si])
            if need <= (b - a) + 1e-9:
                continue
            changed = True
            optional = [i for i in assign[si] if i.optional]
            if optional:
                assign[si].remove(max(optional, key=lambda i: i.minw))
                break
            delta = need - (b - a) + 1e-6
            cand = [c for c in range(n) if shallow[c] and xs[c] >= a - 1e-6 and xs[c + 1] <= b + 1e-6]
            if ka is None:
                if xs[li] >= a - 1e-6 and xs[li + 1] <= b + 1e-6:
                    cand.append(li)
            elif (ka_anchor == "W" and abs(a - ka[1]) < 1e-6) or (ka_anchor == "E" and abs(b - ka[0]) < 1e-6):
                cand.append(li)
            if not cand:
                raise _Retry("cannot widen")
            room = {c: max(0.0, caps[cells[c]] - widths[c]) for c in cand}
            total = sum(room.values())
            if total >= delta:
                for c in cand:
                    widths[c] += delta * room[c] / total
            else:
                for c in cand:
                    widths[c] += room[c]
                rest = delta - total
                wsum = sum(widths[c] for c in cand)
                for c in cand:
                    widths[c] += rest * widths[c] / wsum
            break
        if not changed:
            break
    else:
        raise _Retry("widening did not converge")
    xs = xs_of()
    spans = spans_of(xs)
    ka = ka_range(xs)

    # fillers for spans with a lot of slack (or none at all)
    for _f in range(6):
        worst, worst_si = 0.0, None
        for si, (a, b) in enumerate(spans):
            room = sum(i.maxw - i.minw for i in assign[si])
            excess = (b - a) - sum(i.minw for i in assign[si]) - room
            if not assign[si]:
                excess = max(excess, 99.0)
            if excess > 0.6 and excess > worst:
                worst, worst_si = excess, si
        if worst_si is None:
            break
        a, b = spans[worst_si]
        free = (b - a) - sum(i.minw for i in assign[worst_si])
        placed = False
        for r in list(fillers):
            cand = _new_item(rng, r)
            if cand.minw <= free:
                assign[worst_si].append(cand)
                fillers.remove(r)
                placed = True
                break
        if not placed:
            break
    if any(not assign[si] for si in range(len(spans))):
        raise _Retry("empty span")

    # order and size the items of each span
    out: list[_Cell] = []
    for si, (a, b) in enumerate(spans):
        its = assign[si]
        first = [i for i in its if i.tag == "kitchen-end" and kend == 0]
        last = [i for i in its if i.tag == "kitchen-end" and kend != 0]
        near = [i for i in its if i.tag == "near-kitchen"]
        combo_items = [i for i in its if i.tag == "combo"]
        rest = [i for i in its if i not in first + last + near + combo_items]
        order_idx = rng.permutation(len(rest))
        rest = [rest[k] for k in order_idx]
        if combo_items:
            if rng.random() < 0.5:
                combo_items.reverse()
            rest.insert(int(rng.integers(len(rest) + 1)), combo_items)  # type: ignore[arg-type]
        seq: list[Any] = list(rest)
        # pantry next to the kitchen
        if near:
            if ka is not None and abs(b - ka[0]) < 1e-6:
                seq = seq + near
            elif (ka is not None and abs(a - ka[1]) < 1e-6) or first:
                seq = near + seq
            elif last:
                seq = seq + near
            else:
                seq = seq + near
        seq = first + seq + last
        flat: list[_Item] = []
        for s in seq:
            flat.extend(s if isinstance(s, list) else [s])
        _size_items(flat, b - a)
        # snap item boundaries onto changes of what lies below (corridor / living / kitchen)
        below = _below_changes(cells, xs, a, b, ka)
        x = a
        for k, it in enumerate(flat):
            it.x0 = x
            x += it.width
        for k in range(1, len(flat)):
            bnd = flat[k].x0
            if not below:
                break
            p = min(below, key=lambda q: abs(q - bnd))
            d = p - bnd
            if 1e-6 < abs(d) < 0.95:
                left, right = flat[k - 1], flat[k]
                if left.width + d >= left.minw - 1e-9 and right.width - d >= right.minw - 1e-9:
                    left.width += d
                    right.width -= d
                    right.x0 = p
        for k, it in enumerate(flat):
            x1 = b if k == len(flat) - 1 else flat[k + 1].x0
            role = "bedroom" if it.role == "master" else it.role
            out.append(_Cell(role, it.x0, Y0, x1, Y1, is_master=it.role == "master"))

    # south row, corridor and fixed north segments
    k_role_deep = None
    for c in range(n):
        x0, x1 = xs[c], xs[c + 1]
        kind = cells[c]
        if kind == "L":
            out.append(_Cell("living", x0, Y1, x1, Y3))
        elif kind == "K":
            top = Y0 if kd_item is None else Y1
            k_role_deep = _Cell("kitchen", x0, top, x1, Y3, key="deep")
            out.append(k_role_deep)
            if kd_item is not None:
                out.append(_Cell(kd_item, x0, Y0, x1, Y1))
        elif kind == "MD":
            out.append(_Cell("bedroom", x0, Y1, x1, Y3, is_master=True, key="south", deep=True))
            # en-suite above
            if len(ensuite) == 1:
                out.append(_Cell(ensuite[0], x0, Y0, x1, Y1, key="ensuite"))
            else:
                frac = float(rng.uniform(0.42, 0.58))
                xm = x0 + (x1 - x0) * frac
                out.append(_Cell(ensuite[0], x0, Y0, xm, Y1, key="ensuite"))
                out.append(_Cell(ensuite[1], xm, Y0, x1, Y1, key="ensuite"))
        else:
            out.append(_Cell("bedroom", x0, Y2, x1, Y3, is_master=kind == "MS", key="south"))
    # corridors: maximal runs of shallow cells
    c = 0
    while c < n:
        if shallow[c]:
            d = c
            while d + 1 < n and shallow[d + 1]:
                d += 1
            out.append(_Cell("corridor", xs[c], Y1, xs[d + 1], Y2))
            c = d + 1
        else:
            c += 1
    if ka is not None:
        out.append(_Cell("kitchen", ka[0], Y0, ka[1], Y1, key="above"))
    return out, {"cells": list(cells)}


def _size_items(items: list[_Item], width: float) -> None:
    """Share ``width`` among ``items``: minimum widths plus slack by weight, capped at maxw."""
    for it in items:
        it.width = it.minw
    slack = width - sum(i.minw for i in items)
    for _ in range(10):
        if slack <= 1e-9:
            break
        open_items = [i for i in items if i.width < i.maxw - 1e-9]
        if not open_items:
            break
        wsum = sum(i.weight for i in open_items)
        spent = 0.0
        for it in open_items:
            add = min(slack * it.weight / wsum, it.maxw - it.width)
            it.width += add
            spent += add
        slack -= spent
    if slack > 1e-9:  # everything at its cap: spread the rest by weight anyway
        wsum = sum(i.weight for i in items)
        for it in items:
            it.width += slack * it.weight / wsum


def _below_changes(
    cells: list[str], xs: list[float], a: float, b: float, ka: tuple[float, float] | None
) -> list[float]:
    """x positions inside (a, b) where what lies below the north row changes."""
    kinds = ["corr" if kind in ("B", "MS") else kind for kind in cells]
    out = []
    for c in range(1, len(cells)):
        if kinds[c] != kinds[c - 1] and a + 1e-6 < xs[c] < b - 1e-6:
            out.append(xs[c])
    if ka is not None:
        for x in ka:
            if a + 1e-6 < x < b - 1e-6:
                out.append(x)
    return out


def _balconies(rng: np.random.Generator, cells: list[_Cell], Y3: float, Y4: float) -> list[_Cell]:
    south = sorted(
        [c for c in cells if abs(c.y1 - Y3) < 1e-9 and c.role in ("living", "bedroom", "kitchen")],
        key=lambda c: c.x0,
    )
    p = {"living": 0.85, "kitchen": 0.5, "bedroom": 0.5}
    flags = [rng.random() < (0.65 if c.is_master else p[c.role]) for c in south]
    out: list[_Cell] = []
    groups: list[list[_Cell]] = []
    cur: list[_Cell] = []
    for c, f in zip(south, flags):
        if f and cur and rng.random() < 0.6:
            cur.append(c)
        elif f:
            if cur:
                groups.append(cur)
            cur = [c]
        else:
            if cur:
                groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    ac_done = rng.random() >= 0.35
    for g in groups:
        x0, x1 = g[0].x0, g[-1].x1
        if not ac_done:
            wac = float(rng.uniform(0.8, 1.1))
            if rng.random() < 0.5 and g[-1].w - wac >= 1.8:
                out.append(_Cell("ac", x1 - wac, Y3, x1, Y4, wins=[("S", "main")], win_subtype="fixed"))
                x1 = x1 - wac
                ac_done = True
            elif g[0].w - wac >= 1.8:
                out.append(_Cell("ac", x0, Y3, x0 + wac, Y4, wins=[("S", "main")], win_subtype="fixed"))
                x0 = x0 + wac
                ac_done = True
        out.append(_Cell("balcony", x0, Y3, x1, Y4, wins=[("S", "main")]))
    return out


def _core(rng: np.random.Generator, cells: list[_Cell], Y0: float, master_north: bool) -> list[_Cell]:
    """엘리베이터홀 north of the 현관, 계단실 beside it (over a windowless-tolerant room or the
    windowless master) or north of it."""
    ent = next(c for c in cells if c.role == "entrance")
    dH = float(rng.uniform(2.0, 2.5))
    hall = _Cell("hall", ent.x0, Y0 - dH, ent.x1, Y0)
    north = sorted([c for c in cells if abs(c.y0 - Y0) < 1e-9 and c is not ent], key=lambda c: c.x0)
    left = [c for c in north if abs(c.x1 - ent.x0) < 1e-9]
    right = [c for c in north if abs(c.x0 - ent.x1) < 1e-9]
    if master_north:
        m = [c for c in left + right if c.is_master]
        if not m:
            raise _Retry("master not beside entrance")
        m0 = m[0]
        return [hall, _Cell("stair", m0.x0, Y0 - dH, m0.x1, Y0)]
    tolerant = ("bath", "pantry", "dress", "utility")
    opts = [(c, "L") for c in left if c.role in tolerant and c.w >= 2.2]
    opts += [(c, "R") for c in right if c.role in tolerant and c.w >= 2.2]
    if opts and rng.random() < 0.6:
        c, side = opts[int(rng.integers(len(opts)))]
        sw = min(c.w, float(rng.uniform(2.2, 2.9)))
        if side == "L":
            return [hall, _Cell("stair", ent.x0 - sw, Y0 - dH, ent.x0, Y0)]
        return [hall, _Cell("stair", ent.x1, Y0 - dH, ent.x1 + sw, Y0)]
    sw = max(ent.w + 0.6, float(rng.uniform(2.4, 3.2)))
    sd = float(rng.uniform(2.4, 3.0))
    cx = (ent.x0 + ent.x1) / 2.0
    return [hall, _Cell("stair", cx - sw / 2, Y0 - dH - sd, cx + sw / 2, Y0 - dH)]


# --------------------------------------------------------------------------- labels/categories


def _labels(rng: np.random.Generator, cells: list[_Cell]) -> list[tuple[str, str, bool]]:
    """(category, label, has_ocr) for each cell."""
    out: list[tuple[str, str, bool]] = [("", "", True)] * len(cells)
    order = sorted(range(len(cells)), key=lambda i: (cells[i].x0, cells[i].y0))
    beds = [i for i in order if cells[i].role == "bedroom"]
    baths = [i for i in order if cells[i].role == "bath"]
    balconies = [i for i in order if cells[i].role == "balcony"]
    # bedrooms: master is 침실1
    k = 2
    for i in beds:
        if cells[i].is_master:
            lab = _pick(rng, [("침실1", 0.6), ("안방", 0.3), ("마스터룸", 0.1)])
        else:
            stem = _pick(rng, [("침실", 0.88), ("방", 0.08), ("룸", 0.04)])
            lab = f"{stem}{k}"
            k += 1
        out[i] = ("공간_침실", lab, True)
    for n, i in enumerate(baths, start=1):
        if cells[i].key == "ensuite":
            lab = _pick(
                rng,
                [("부부욕실", 0.3), ("안방욕실", 0.15), (f"욕실{n}", 0.2), (f"화장실{n}", 0.35)],
            )
        elif len(baths) == 1:
            lab = _pick(rng, [("화장실", 0.5), ("욕실", 0.25), ("공용욕실", 0.1), ("화장실1", 0.15)])
        else:
            lab = _pick(rng, [(f"화장실{n}", 0.55), (f"욕실{n}", 0.3), ("공용욕실", 0.15)])
        out[i] = ("공간_화장실", lab, True)
    for n, i in enumerate(balconies, start=1):
        if len(balconies) == 1:
            lab = _pick(rng, [("발코니", 0.7), ("베란다", 0.2), ("발코니1", 0.1)])
        else:
            lab = _pick(rng, [(f"발코니{n}", 0.8), ("베란다", 0.1), ("서비스발코니", 0.1)])
        out[i] = ("공간_발코니", lab, True)
    for i, c in enumerate(cells):
        r = c.role
        if r in ("bedroom", "bath", "balcony"):
            continue
        if r == "living":
            out[i] = ("공간_거실", "거실", True)
        elif r == "kitchen":
            cat = "공간_주방및식당" if rng.random() < 0.6 else "공간_주방"
            lab = _pick(rng, [("주방", 0.45), ("주방및식당", 0.2), ("키친", 0.2), ("식당", 0.15)])
            out[i] = (cat, lab, True)
        elif r == "entrance":
            out[i] = ("공간_현관", "현관", True)
        elif r == "dress":
            lab = _pick(rng, [("드레스룸", 0.7), ("옷방", 0.2), ("워크인클로짓", 0.1)])
            out[i] = ("공간_드레스룸", lab, True)
        elif r == "pantry":
            cat = "공간_다목적공간" if rng.random() < 0.5 else "공간_기타"
            out[i] = (cat, "팬트리", True)
        elif r == "utility":
            out[i] = ("공간_다목적공간", _pick(rng, [("다용도실", 0.7), ("세탁실", 0.3)]), True)
        elif r == "alpha":
            out[i] = ("공간_다목적공간", "알파룸", True)
        elif r == "ac":
            lab = _pick(rng, [("실외기실", 0.7), ("실외기룸", 0.15), ("에어컨실", 0.15)])
            out[i] = ("공간_실외기실", lab, True)
        elif r == "corridor":
            out[i] = ("공간_기타", "기타", False)
        elif r == "hall":
            lab = _pick(rng, [("엘리베이터홀", 0.55), ("EV홀", 0.2), ("엘베홀", 0.15), ("승강기홀", 0.1)])
            out[i] = ("공간_엘리베이터홀", lab, True)
        elif r == "stair":
            out[i] = ("공간_계단실", "계단실", True)
        else:  # pragma: no cover
            raise ValueError(r)
    return out


# --------------------------------------------------------------------------- pixel stage


def _shared(a: tuple[int, int, int, int], b: tuple[int, int, int, int]):
    """The boundary segment two touching rectangles share: (orient, line, lo, hi) or None."""
    if a[3] == b[1] or a[1] == b[3]:
        y = a[3] if a[3] == b[1] else a[1]
        lo, hi = max(a[0], b[0]), min(a[2], b[2])
        if hi > lo:
            return ("h", y, lo, hi)
    if a[2] == b[0] or a[0] == b[2]:
        x = a[2] if a[2] == b[0] else a[0]
        lo, hi = max(a[1], b[1]), min(a[3], b[3])
        if hi > lo:
            return ("v", x, lo, hi)
    return None


def _side_of(rect: tuple[int, int, int, int], orient: str, line: int) -> str:
    if orient == "h":
        return "S" if rect[3] == line else "N"
    return "E" if rect[2] == line else "W"


def _subtract(lo: int, hi: int, cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    cur = lo
    for a, b in sorted(cuts):
        if b <= cur:
            continue
        if a > cur:
            out.append((cur, min(a, hi)))
        cur = max(cur, b)
        if cur >= hi:
            break
    if cur < hi:
        out.append((cur, hi))
    return [(a, b) for a, b in out if b > a]


def _edges(rect: tuple[int, int, int, int]) -> dict[str, tuple[str, int, int, int]]:
    x0, y0, x1, y1 = rect
    return {
        "N": ("h", y0, x0, x1),
        "S": ("h", y1, x0, x1),
        "W": ("v", x0, y0, y1),
        "E": ("v", x1, y0, y1),
    }


_DOOR_PARTNERS: dict[str, tuple[str, ...]] = {
    "bedroom": ("corridor", "living"),
    "bath": ("corridor", "living"),
    "dress": ("corridor", "living"),
    "alpha": ("living", "corridor"),
    "pantry": ("kitchen", "corridor", "living"),
    "utility": ("kitchen", "corridor", "living"),
}


def _build_pixels(rng: np.random.Generator, stem: str, cells: list[_Cell], info: dict[str, Any]) -> SynthPlan:
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

    def px(v: float, o: float, m0: float) -> int:
        return round(o + s * (v - m0))

    labels = _labels(rng, cells)
    spaces: list[SynthSpace] = []
    for i, c in enumerate(cells):
        rect = (px(c.x0, ox, minx), px(c.y0, oy, miny), px(c.x1, ox, minx), px(c.y1, oy, miny))
        if rect[2] - rect[0] < 3 * t or rect[3] - rect[1] < 3 * t:
            raise _Retry("degenerate space")
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
    n = len(spaces)
    ux0 = min(sp.rect[0] for sp in spaces if not sp.is_outside)
    ux1 = max(sp.rect[2] for sp in spaces if not sp.is_outside)

    shared: dict[tuple[int, int], tuple[str, int, int, int]] = {}
    for i in range(n):
        for j in range(i + 1, n):
            seg = _shared(spaces[i].rect, spaces[j].rect)
            if seg is not None:
                shared[(i, j)] = seg

    def seg_of(i: int, j: int):
        return shared.get((min(i, j), max(i, j)))

    exterior: dict[int, dict[str, list[tuple[int, int]]]] = {}
    for i in range(n):
        exterior[i] = {}
        for side, (o, line, lo, hi) in _edges(spaces[i].rect).items():
            cuts = []
            for (a, b), (o2, l2, lo2, hi2) in shared.items():
                if i in (a, b) and o2 == o and l2 == line:
                    cuts.append((lo2, hi2))
            exterior[i][side] = _subtract(lo, hi, cuts)

    openings: list[Opening] = []

    def add(kind: str, i: int, j: int | None, seg, lo: int, hi: int, subtype: str | None = None):
        o, line = seg[0], seg[1]
        idxs = (i,) if j is None else (i, j)
        sides = tuple(_side_of(spaces[k].rect, o, line) for k in idxs)
        op = Opening(kind, o, line, lo, hi, idxs, sides, subtype)
        openings.append(op)
        return op

    def place(seg, length: int, centred: bool = False) -> tuple[int, int] | None:
        _o, _line, lo, hi = seg
        free = (hi - lo) - length - 2 * margin
        if free < 0:
            return None
        if centred:
            off = free // 2 + int(rng.integers(-(free // 6), free // 6 + 1)) if free >= 6 else free // 2
        else:
            off = int(rng.integers(0, free + 1))
        a = lo + margin + off
        return a, a + length

    def by_role(role: str) -> list[int]:
        return [sp.idx for sp in spaces if sp.role == role]

    def door(i: int, partners: tuple[str, ...], length_m: float, subtype: str) -> None:
        length = round(length_m * s)
        for role in partners:
            cands = []
            for j in by_role(role):
                if j == i:
                    continue
                seg = seg_of(i, j)
                if seg is not None and seg[3] - seg[2] >= length + 2 * margin:
                    cands.append((seg[3] - seg[2], j, seg))
            if cands:
                cands.sort(key=lambda c: (-c[0], c[1]))
                _, j, seg = cands[0]
                lo, hi = place(seg, length)  # type: ignore[misc]
                add("door", i, j, seg, lo, hi, subtype)
                return
        raise _Retry(f"no door for {spaces[i].role}")

    def open_conn(i: int, j: int, stubs: bool) -> None:
        seg = seg_of(i, j)
        assert seg is not None
        lo, hi = seg[2], seg[3]
        if stubs and hi - lo > int(2.6 * s) and rng.random() < 0.55:
            lo += round(float(rng.uniform(0.2, 0.5)) * s)
        if stubs and hi - lo > int(2.4 * s) and rng.random() < 0.55:
            hi -= round(float(rng.uniform(0.2, 0.5)) * s)
        add("open", i, j, seg, lo, hi)

    living = by_role("living")[0]
    kitchen = by_role("kitchen")[0]
    # --- open connections
    kcell = cells[kitchen]
    if kcell.key in ("above", "deep"):
        if seg_of(kitchen, living) is None:
            raise _Retry("kitchen not beside living")
        open_conn(kitchen, living, stubs=True)
    else:  # MB: kitchen in the north row, open onto what lies below it
        cands = []
        for role in ("corridor", "living"):
            for j in by_role(role):
                seg = seg_of(kitchen, j)
                if seg is not None and seg[0] == "h" and seg[3] - seg[2] >= int(1.4 * s):
                    cands.append((seg[3] - seg[2], j))
        if not cands:
            raise _Retry("MB kitchen not open")
        cands.sort(key=lambda c: (-c[0], c[1]))
        open_conn(kitchen, cands[0][1], stubs=True)
    for c in by_role("corridor"):
        for j in by_role("living") + by_role("kitchen"):
            seg = seg_of(c, j)
            if seg is not None and seg[0] == "v":
                add("open", c, j, seg, seg[2], seg[3])
    # --- entrance
    ent = by_role("entrance")[0]
    stair = by_role("stair")[0]
    door(ent, ("hall",), float(rng.uniform(0.95, 1.05)), "여닫이")
    cands = []
    for role in ("corridor", "living"):
        for j in by_role(role):
            seg = seg_of(ent, j)
            if seg is not None and seg[3] - seg[2] >= int(1.1 * s) + 2 * margin:
                cands.append((seg[3] - seg[2], j, seg))
    if not cands:
        raise _Retry("entrance not reachable")
    cands.sort(key=lambda c: (-c[0], c[1]))
    _, j, seg = cands[0]
    if rng.random() < 0.5:
        add("open", ent, j, seg, seg[2], seg[3])
    else:
        lo_hi = place(seg, round(float(rng.uniform(0.9, 1.1)) * s))
        assert lo_hi is not None
        add("door", ent, j, seg, lo_hi[0], lo_hi[1], "미닫이")
    door(stair, ("hall",), float(rng.uniform(0.85, 0.95)), "여닫이")
    # --- room doors
    master = next(sp.idx for sp in spaces if sp.is_master)
    for sp in spaces:
        r = sp.role
        c = cells[sp.idx]
        if r == "bedroom" and c.deep:
            door(sp.idx, ("living", "corridor"), float(rng.uniform(0.85, 0.95)), "여닫이")
        elif r in ("bath", "dress") and c.key == "ensuite":
            length = float(rng.uniform(0.75, 0.85))
            ln = round(length * s)
            seg = seg_of(sp.idx, master)
            if seg is None or seg[3] - seg[2] < ln + 2 * margin:
                raise _Retry("ensuite door")
            lo, hi = place(seg, ln)  # type: ignore[misc]
            add("door", sp.idx, master, seg, lo, hi, "여닫이" if r == "bath" else "미닫이")
        elif r in _DOOR_PARTNERS:
            sub = "미닫이" if r in ("pantry", "utility", "dress") else "여닫이"
            door(sp.idx, _DOOR_PARTNERS[r], float(rng.uniform(0.8, 0.9)), sub)
        elif r == "ac":
            door(sp.idx, ("balcony",), float(rng.uniform(0.65, 0.75)), "여닫이")

    # --- windows
    for sp in spaces:
        c = cells[sp.idx]
        wins = list(c.wins)
        r = sp.role
        at_w = sp.rect[0] == ux0
        at_e = sp.rect[2] == ux1
        end_sides = (["W"] if at_w else []) + (["E"] if at_e else [])
        variant = info["variant"]
        if r == "living":
            wins = [("S", "main")]
            if variant == "T1":
                wins.append((end_sides[0], "minor"))
        elif r == "kitchen":
            if c.key == "deep":
                wins = [("S", "main")]
            elif variant == "P":
                wins = [("N", "main")]
            elif variant in ("MA", "MB"):
                if not end_sides:
                    raise _Retry("mixed kitchen not at the end")
                wins = [(end_sides[0], "main")]
            else:
                wins = []
        elif r == "bedroom":
            if sp.is_master and info["master_north"]:
                wins = []
            else:
                wins = [("S" if c.key == "south" else "N", "main")]
                if end_sides and rng.random() < (0.3 if sp.is_master else 0.25):
                    wins.append((end_sides[0], "minor"))
        elif r == "bath":
            if rng.random() < (0.4 if c.key == "ensuite" else 0.5):
                wins = [("N", "main")]
        elif r == "dress":
            if rng.random() < 0.15:
                wins = [("N", "main")]
        elif r == "utility":
            if rng.random() < 0.7:
                wins = [("N", "main")]
        elif r == "alpha" and rng.random() < 0.85:
            wins = [("N", "main")]
        main_len = None
        for side, kind in wins:
            segs: list[tuple[Any, int | None]] = []
            if side == "S" and r in ("living", "bedroom", "kitchen"):
                for b in by_role("balcony"):
                    seg = seg_of(sp.idx, b)
                    if seg is not None and seg[0] == "h" and seg[1] == sp.rect[3]:
                        segs.append((seg, b))
            if not segs:
                o, line, _lo, _hi = _edges(sp.rect)[side]
                ext = exterior[sp.idx][side]
                if ext:
                    lo, hi = max(ext, key=lambda e: (e[1] - e[0], -e[0]))
                    segs = [((o, line, lo, hi), None)]
            for seg, other in segs:
                seg_len = seg[3] - seg[2]
                if other is not None:
                    frac = float(rng.uniform(0.6, 0.85))
                elif r == "balcony" or r == "ac":
                    frac = float(rng.uniform(0.7, 0.9))
                elif r in ("bath", "dress", "pantry", "utility"):
                    frac = float(rng.uniform(0.35, 0.6))
                else:
                    frac = float(rng.uniform(0.45, 0.7))
                length = int(frac * (seg_len - 2 * margin))
                if kind == "minor":
                    if main_len is None:
                        continue
                    length = min(length, int(0.6 * main_len))
                if length < int((0.3 if r == "ac" else 0.5) * s):
                    continue
                lo_hi = place(seg, length, centred=True)
                if lo_hi is None:
                    continue
                sub = c.win_subtype
                if r == "bath" and rng.random() < 0.5:
                    sub = "fixed"
                add("window", sp.idx, other, seg, lo_hi[0], lo_hi[1], sub)
                if kind == "main":
                    main_len = max(main_len or 0, length)

    # --- walls: every shared / exterior segment minus its openings
    walls: list[WallSegment] = []
    for (i, j), (o, line, lo, hi) in sorted(shared.items()):
        cuts = [(op.lo, op.hi) for op in openings if op.orient == o and op.line == line and set(op.spaces) == {i, j}]
        for a, b in _subtract(lo, hi, cuts):
            walls.append(WallSegment(o, line, a, b, (i, j)))
    for i in range(n):
        for side in ("N", "E", "S", "W"):
            o, line, _lo, _hi = _edges(spaces[i].rect)[side]
            for lo, hi in exterior[i][side]:
                cuts = [(op.lo, op.hi) for op in openings if op.orient == o and op.line == line and op.spaces == (i,)]
                for a, b in _subtract(lo, hi, cuts):
                    walls.append(WallSegment(o, line, a, b, (i,)))

    objects, ocr = _furnish(rng, spaces, cells, s, t)
    intended = {
        "structure_type": info["structure"],
        "bay_count": info["bay_count"],
        "variant": info["variant"],
        "bedrooms": info["bedrooms"],
        "master_north": info["master_north"],
    }
    return SynthPlan(
        stem=stem,
        width=width,
        height=height,
        wall_thickness=t,
        scale=round(s, 4),
        spaces=spaces,
        openings=openings,
        walls=walls,
        objects=objects,
        ocr=ocr,
        intended=intended,
    )


def _text_units(text: str) -> float:
    return sum(1.0 if ord(ch) >= 0x1100 else 0.62 for ch in text)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def _furnish(
    rng: np.random.Generator, spaces: list[SynthSpace], cells: list[_Cell], s: float, t: int
) -> tuple[list[PlacedBox], list[PlacedBox]]:
    objects: list[PlacedBox] = []
    ocr: list[PlacedBox] = []
    pad = t // 2 + max(3, round(0.08 * s))
    for sp in spaces:
        x0, y0, x1, y1 = sp.rect
        ix0, iy0, ix1, iy1 = x0 + pad, y0 + pad, x1 - pad, y1 - pad
        iw, ih = ix1 - ix0, iy1 - iy0
        mine: list[tuple[str, tuple[int, int, int, int], bool]] = []  # (cat, rect, optional)

        def box(w_m: float, h_m: float) -> tuple[int, int]:
            return round(w_m * s), round(h_m * s)

        if sp.role == "bath":
            tw, th = box(0.42, 0.68)
            sw, sh = box(0.55, 0.45)
            if tw + sw + int(0.1 * s) <= iw and th <= ih // 2:
                if rng.random() < 0.5:
                    mine.append(("객체_변기", (ix0, iy0, ix0 + tw, iy0 + th), False))
                    mine.append(("객체_세면대", (ix1 - sw, iy0, ix1, iy0 + sh), False))
                else:
                    mine.append(("객체_세면대", (ix0, iy0, ix0 + sw, iy0 + sh), False))
                    mine.append(("객체_변기", (ix1 - tw, iy0, ix1, iy0 + th), False))
            bw, bh = box(1.5, 0.72)
            if bw <= iw and ih >= int(2.3 * s) and rng.random() < 0.6:
                bx = ix0 if rng.random() < 0.5 else ix1 - bw
                mine.append(("객체_욕조", (bx, iy1 - bh, bx + bw, iy1), True))
        elif sp.role == "kitchen":
            kw_, kh = box(min(1.9, iw / s * 0.55), 0.6)
            gw, gh = box(0.6, 0.58)
            if kw_ + gw + 4 <= iw and kh <= ih // 3:
                if rng.random() < 0.5:
                    mine.append(("객체_싱크대", (ix0, iy0, ix0 + kw_, iy0 + kh), False))
                    mine.append(
                        (
                            "객체_가스레인지",
                            (ix0 + kw_ + 4, iy0, ix0 + kw_ + 4 + gw, iy0 + gh),
                            True,
                        )
                    )
                else:
                    mine.append(("객체_싱크대", (ix1 - kw_, iy0, ix1, iy0 + kh), False))
                    mine.append(
                        (
                            "객체_가스레인지",
                            (ix1 - kw_ - 4 - gw, iy0, ix1 - kw_ - 4, iy0 + gh),
                            True,
                        )
                    )
        # OCR box at the centre of what is left
        if sp.has_ocr:
            fs = round(min(max(0.3 * s, 12), 40))
            units = _text_units(sp.label)
            while fs > 8 and (units * fs > 0.9 * iw or 1.3 * fs > 0.5 * ih):
                fs -= 1
            bw_, bh_ = math.ceil(units * fs), math.ceil(1.3 * fs)
            cx, cy = (ix0 + ix1) // 2, (iy0 + iy1) // 2
            tops = [r for _, r, _ in mine if r[1] == iy0]
            if tops:  # keep clear of the fixtures along the top wall
                cy = max(cy, max(r[3] for r in tops) + bh_ // 2 + 4)
            orect = (cx - bw_ // 2, cy - bh_ // 2, cx - bw_ // 2 + bw_, cy - bh_ // 2 + bh_)
            if orect[3] > iy1:
                orect = (orect[0], iy1 - bh_, orect[2], iy1)
            mine = [m for m in mine if not (m[2] and _overlaps(m[1], orect))]
            if any(_overlaps(m[1], orect) for m in mine):
                mine = []
            ocr.append(PlacedBox(vocab.OCR_CATEGORY, sp.idx, orect, sp.label))
        for cat, r, _opt in mine:
            objects.append(PlacedBox(cat, sp.idx, r))
    return objects, ocr


# --------------------------------------------------------------------------- public: generate


def generate_plan(rng: np.random.Generator, stem: str) -> SynthPlan:
    """One synthetic plan from ``rng`` (the same generator state gives the same plan)."""
    last: Exception | None = None
    for _attempt in range(60):
        try:
            cells, info = _sample_layout(rng)
            plan = _build_pixels(rng, stem, cells, info)
        except _Retry as exc:
            last = exc
            continue
        problems = self_check(plan)
        if problems:
            raise AssertionError(f"{stem}: inconsistent synthetic plan: {problems[:5]}")
        return plan
    raise RuntimeError(f"could not lay out a plan for {stem}: {last}")


# --------------------------------------------------------------------------- truth


def _structure_type(living: dict | None, kitchen: dict | None) -> tuple[str, set[str]]:
    """Structure type by the team aggregator's order (a living room open on two perpendicular
    sides is 타워형 before the kitchen is looked at); also the set of types any rule ordering
    could give."""
    if living is None or living["main"] is None:
        return "혼합형", {"혼합형"}
    L = living["main"]
    K = None if kitchen is None else kitchen["main"]
    dirs = set(living["dirs"])
    two_sides = bool(dirs & {"N", "S"}) and bool(dirs & {"E", "W"})
    hits = set()
    if kitchen is not None and K is not None and _OPPOSITE[L] == K:
        hits.add("판상형")
    if two_sides or (kitchen is not None and (K is None or K == L)):
        hits.add("타워형")
    if kitchen is not None and K is not None and K != L and _OPPOSITE[L] != K:
        hits.add("혼합형")
    if two_sides:
        return "타워형", hits
    if kitchen is None:
        return "혼합형", {"혼합형"}
    return next(iter(hits)), hits  # without two open sides exactly one rule applies


def truth_statistics(plan: SynthPlan) -> dict[str, Any]:
    """True statistics from the generator's own layout model (not re-derived from polygons).

    ``spaces`` are in the order of the space annotations (``annotation_id`` links them).
    """
    spaces_out: list[dict[str, Any]] = []
    ann_id = 1
    for sp in plan.spaces:
        wins = plan.windows_of(sp.idx)
        dirs: list[str] = []
        for _o, side in wins:
            if side not in dirs:
                dirs.append(side)
        spaces_out.append(
            {
                "annotation_id": ann_id,
                "name": sp.name,
                "label": sp.label,
                "category": sp.category,
                "space_type": vocab.space_class(sp.name),
                "is_outside": sp.is_outside,
                "area": float(sp.area),
                "bbox": [sp.rect[0], sp.rect[1], sp.rect[2] - sp.rect[0], sp.rect[3] - sp.rect[1]],
                "has_window": bool(wins),
                "window_count": len(wins),
                "window_directions": dirs,
                "main_window_direction": wins[0][1] if wins else None,
                "is_master_bedroom": False,
            }
        )
        ann_id += 1
    inside = [d for d in spaces_out if not d["is_outside"]]
    inside_area = sum(d["area"] for d in inside)

    def pct(x: float) -> float:
        return round(100.0 * x / inside_area, 2) if inside_area else 0.0

    bedrooms = [d for d in spaces_out if d["name"] == "침실"]
    master = max(bedrooms, key=lambda d: d["area"]) if bedrooms else None
    if master is not None:
        master["is_master_bedroom"] = True
    livings = [d for d in spaces_out if d["name"] == "거실"]
    kitchens = [d for d in spaces_out if d["name"] == "주방"]

    def main_info(ds: list[dict]) -> dict | None:
        if not ds:
            return None
        d = ds[0]
        return {"main": d["main_window_direction"], "dirs": d["window_directions"]}

    if not livings:
        bay = 0
    elif livings[0]["main_window_direction"] is None:
        bay = len(livings)
    else:
        lm = livings[0]["main_window_direction"]
        bay = sum(1 for d in spaces_out if d["name"] in ("거실", "침실") and d["main_window_direction"] == lm)
    structure, _hits = _structure_type(main_info(livings), main_info(kitchens))
    counted = [d for d in inside if d["name"] != "기타"]
    windowless = [d for d in counted if not d["has_window"]]
    type_count: dict[str, int] = {}
    for d in spaces_out:
        type_count[d["space_type"]] = type_count.get(d["space_type"], 0) + 1
    connections = []
    for o in plan.openings:
        if len(o.spaces) == 2:
            a, b = o.spaces
            connections.append(
                {
                    "source": a,
                    "target": b,
                    "source_label": plan.spaces[a].label,
                    "target_label": plan.spaces[b].label,
                    "connection_type": o.kind,
                }
            )
    return {
        "stem": plan.stem,
        "image": {"file_name": plan.file_name, "width": plan.width, "height": plan.height},
        "room_count": len(bedrooms),
        "bathroom_count": sum(1 for d in spaces_out if d["name"] == "화장실"),
        "balcony_count": sum(1 for d in spaces_out if d["name"] == "발코니"),
        "bay_count": bay,
        "structure_type": structure,
        "space_count": len(spaces_out),
        "inside_space_count": len(inside),
        "windowless_ratio": round(100.0 * len(windowless) / len(counted), 2) if counted else 0.0,
        "balcony_ratio": pct(sum(d["area"] for d in inside if d["name"] == "발코니")),
        "ldk_ratio": pct(sum(d["area"] for d in inside if d["name"] in vocab.LDK_NAMES)),
        "storage_ratio": pct(sum(d["area"] for d in inside if d["name"] in vocab.STORAGE_NAMES)),
        "master_bedroom_has_window": bool(master and master["has_window"]),
        "space_type_count": dict(sorted(type_count.items())),
        "total_inside_area": float(inside_area),
        "wall_thickness": plan.wall_thickness,
        "pixels_per_meter": plan.scale,
        "layout_variant": plan.intended.get("variant"),
        "spaces": spaces_out,
        "connections": connections,
    }


def load_truth(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``truth/{stem}.json`` file."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# --------------------------------------------------------------------------- self check


def self_check(plan: SynthPlan) -> list[str]:
    """Consistency of the layout model with the geometric conventions; [] when all is well."""
    problems: list[str] = []
    t = plan.wall_thickness
    rects = [sp.rect for sp in plan.spaces]
    for i in range(len(rects)):
        for j in range(i + 1, len(rects)):
            if _overlaps(rects[i], rects[j]):
                problems.append(f"spaces {i},{j} overlap")
    for k, o in enumerate(plan.openings):
        if o.kind == "open":
            continue
        r = o.rect(t)
        hit = tuple(sp.idx for sp in plan.spaces if _overlaps(r, sp.rect))
        if set(hit) != set(o.spaces):
            problems.append(f"{o.kind} {k} overlaps {hit}, expected {o.spaces}")
        if o.kind == "window":
            w, h = r[2] - r[0], r[3] - r[1]
            for i, side in zip(o.spaces, o.sides):
                cx, cy = plan.spaces[i].centroid
                wx, wy = (r[0] + r[2]) / 2, (r[1] + r[3]) / 2
                if w > h:
                    geo = "S" if wy > cy else "N"
                    if abs(wy - cy) < t:
                        problems.append(f"window {k} near centroid line")
                else:
                    geo = "E" if wx > cx else "W"
                    if abs(wx - cx) < t:
                        problems.append(f"window {k} near centroid line")
                if geo != side:
                    problems.append(f"window {k} faces {geo} by geometry, {side} by construction")
    for wseg in plan.walls:
        r = wseg.rect(t)
        hit = tuple(sp.idx for sp in plan.spaces if _overlaps(r, sp.rect))
        if set(hit) != set(wseg.spaces):
            problems.append(f"wall {wseg} overlaps {hit}")
    for b in plan.objects + plan.ocr:
        x0, y0, x1, y1 = plan.spaces[b.space].rect
        if not (x0 <= b.rect[0] < b.rect[2] <= x1 and y0 <= b.rect[1] < b.rect[3] <= y1):
            problems.append(f"{b.category} outside its space {b.space}")
    truth = truth_statistics(plan)
    sp_truth = truth["spaces"]
    livings = [d for d in sp_truth if d["name"] == "거실"]
    kitchens = [d for d in sp_truth if d["name"] == "주방"]
    _st, hits = _structure_type(
        {"main": livings[0]["main_window_direction"], "dirs": livings[0]["window_directions"]} if livings else None,
        {"main": kitchens[0]["main_window_direction"], "dirs": kitchens[0]["window_directions"]} if kitchens else None,
    )
    if len(hits) != 1:
        problems.append(f"structure type ambiguous: {sorted(hits)}")
    if truth["structure_type"] != plan.intended.get("structure_type"):
        problems.append(f"structure {truth['structure_type']} != intended {plan.intended.get('structure_type')}")
    if truth["bay_count"] != plan.intended.get("bay_count"):
        problems.append(f"bay {truth['bay_count']} != intended {plan.intended.get('bay_count')}")
    # main windows must be unambiguous (strictly widest) for living room, kitchen and bedrooms
    for sp in plan.spaces:
        if sp.name in ("거실", "주방", "침실"):
            wins = plan.windows_of(sp.idx)
            if len(wins) > 1 and wins[0][0].length <= wins[1][0].length:
                problems.append(f"space {sp.idx} has no strictly widest window")
            if len(wins) > 1 and wins[0][0].orient != "h":
                problems.append(f"space {sp.idx} main window is vertical beside a horizontal one")
    masters = [sp for sp in plan.spaces if sp.is_master]
    beds = [sp for sp in plan.spaces if sp.name == "침실"]
    if len(masters) != 1 or max(beds, key=lambda b: b.area) is not masters[0]:
        problems.append("designated master is not the largest bedroom")
    return problems


# --------------------------------------------------------------------------- COCO


def _supercategory(name: str) -> str:
    return name.split("_", 1)[0]


def plan_to_coco(plan: SynthPlan) -> dict[str, Any]:
    """One COCO file for the plan (docs/data-formats.md)."""
    t = plan.wall_thickness
    anns: list[dict[str, Any]] = []

    def rect_ann(cat: str, r: tuple[int, int, int, int], attrs: dict[str, Any]) -> None:
        x0, y0, x1, y1 = r
        anns.append(
            {
                "id": len(anns) + 1,
                "image_id": 1,
                "category_id": vocab.CATEGORY_IDS[cat],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                "area": float((x1 - x0) * (y1 - y0)),
                "iscrowd": 0,
                "attributes": attrs,
            }
        )

    for sp in plan.spaces:
        rect_ann(sp.category, sp.rect, {})
    for w in plan.walls:
        rect_ann(vocab.WALL, w.rect(t), {})
    for o in plan.openings:
        if o.kind == "door":
            rect_ann(vocab.DOOR, o.rect(t), {"subtype": o.subtype} if o.subtype else {})
    for o in plan.openings:
        if o.kind == "window":
            rect_ann(vocab.WINDOW, o.rect(t), {"subtype": o.subtype} if o.subtype else {})
    for b in plan.objects:
        rect_ann(b.category, b.rect, {})
    for b in plan.ocr:
        rect_ann(vocab.OCR_CATEGORY, b.rect, {"text": b.text})
    return {
        "info": {"description": "ft-pipeline synthetic floor plan", "version": "1"},
        "images": [{"id": 1, "file_name": plan.file_name, "width": plan.width, "height": plan.height}],
        "categories": [
            {"id": vocab.CATEGORY_IDS[name], "name": name, "supercategory": _supercategory(name)}
            for name in vocab.ALL_CATEGORIES
        ],
        "annotations": anns,
    }


# --------------------------------------------------------------------------- rendering

_PALETTE: list[tuple[int, int, int]] = [
    (255, 255, 255),  # 0 background
    (0, 0, 0),  # 1 wall
    (255, 236, 200),  # 2 거실
    (214, 232, 255),  # 3 침실
    (255, 214, 210),  # 4 주방
    (200, 240, 240),  # 5 화장실
    (222, 242, 208),  # 6 발코니
    (236, 224, 248),  # 7 현관
    (244, 232, 210),  # 8 드레스룸 / 수납
    (226, 226, 226),  # 9 실외기실
    (250, 248, 238),  # 10 복도/기타
    (205, 205, 205),  # 11 외부공간
    (120, 190, 255),  # 12 window fill
    (25, 80, 190),  # 13 window line
    (196, 126, 60),  # 14 door
    (110, 110, 110),  # 15 object line
    (250, 250, 250),  # 16 object fill
    (40, 40, 40),  # 17 text
    (238, 236, 212),  # 18 알파룸/다목적
]
_FILL = {
    "거실": 2,
    "침실": 3,
    "주방": 4,
    "화장실": 5,
    "발코니": 6,
    "현관": 7,
    "드레스룸": 8,
    "팬트리": 8,
    "세탁실": 8,
    "실외기실": 9,
    "기타": 10,
    "엘리베이터홀": 11,
    "계단실": 11,
    "알파룸": 18,
}
_FLAT_PALETTE = [v for rgb in _PALETTE for v in rgb] + [0] * (768 - 3 * len(_PALETTE))

_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/nanum/NanumGothic.ttf",
    "/usr/share/fonts/truetype/nanum/NanumBarunGothic.ttf",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/noto/NotoSansKR-Regular.ttf",
    "/usr/share/fonts/truetype/unfonts-core/UnDotum.ttf",
    "/usr/share/fonts/truetype/baekmuk/gulim.ttf",
    "/System/Library/Fonts/AppleSDGothicNeo.ttc",
    "/Library/Fonts/AppleGothic.ttf",
    "C:/Windows/Fonts/malgun.ttf",
)


@lru_cache(maxsize=1)
def _font_path() -> str | None:
    for p in _FONT_CANDIDATES:
        if p and os.path.isfile(p):
            return p
    return None


@lru_cache(maxsize=64)
def _font(size: int):
    from PIL import ImageFont

    path = _font_path()
    if path is None:
        return None
    try:
        return ImageFont.truetype(path, size)
    except OSError:
        return None


def render_plan(plan: SynthPlan, draw_text: bool = False):
    """The plan as a palette-mode PIL image (white background, light room fills, black walls,
    blue windows, brown doors, grey fixtures, OCR text when a Korean font is available)."""
    from PIL import Image, ImageDraw

    img = Image.new("P", (plan.width, plan.height), 0)
    img.putpalette(_FLAT_PALETTE)
    d = ImageDraw.Draw(img)
    t = plan.wall_thickness
    h = t // 2
    for sp in plan.spaces:
        x0, y0, x1, y1 = sp.rect
        d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=_FILL.get(sp.name, 10))
    for w in plan.walls:  # drawn a half thickness longer so that corners close
        x0, y0, x1, y1 = w.rect(t)
        if w.orient == "h":
            x0, x1 = x0 - h, x1 + h
        else:
            y0, y1 = y0 - h, y1 + h
        d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=1)
    for o in plan.openings:
        if o.kind == "window":
            x0, y0, x1, y1 = o.rect(t)
            d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=12, outline=13)
            if o.orient == "h":
                d.line([x0, o.line, x1 - 1, o.line], fill=13)
            else:
                d.line([o.line, y0, o.line, y1 - 1], fill=13)
        elif o.kind == "door":
            x0, y0, x1, y1 = o.rect(t)
            d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=0)
            if o.orient == "h":
                d.rectangle([x0, o.line - 1, x1 - 1, o.line + 1], fill=14)
                d.line([x0, y0, x0, y1 - 1], fill=14, width=2)
                d.line([x1 - 1, y0, x1 - 1, y1 - 1], fill=14, width=2)
            else:
                d.rectangle([o.line - 1, y0, o.line + 1, y1 - 1], fill=14)
                d.line([x0, y0, x1 - 1, y0], fill=14, width=2)
                d.line([x0, y1 - 1, x1 - 1, y1 - 1], fill=14, width=2)
    for b in plan.objects:
        x0, y0, x1, y1 = b.rect
        d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=16, outline=15, width=2)
        if b.category in ("객체_변기", "객체_세면대", "객체_욕조"):
            d.ellipse([x0 + 4, y0 + 4, x1 - 5, y1 - 5], outline=15)
    if draw_text and _font_path() is not None:
        for b in plan.ocr:
            x0, y0, x1, y1 = b.rect
            fs = max(8, round((y1 - y0) / 1.3))
            font = _font(fs)
            if font is None:
                break
            d.text((x0, y0 + (y1 - y0 - fs) // 2), b.text or "", fill=17, font=font)
    return img


def png_bytes(plan: SynthPlan) -> bytes:
    """Deterministic PNG bytes (no metadata chunks, fixed compression). Text is not drawn: the
    fonts differ between machines and the same seed must give the same bytes everywhere; the OCR
    boxes are in the annotations."""
    buf = io.BytesIO()
    render_plan(plan).save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- dataset


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, sort_keys=True, indent=1) + "\n").encode("utf-8")


def _atomic_write(path: Path, data: bytes) -> None:
    """Atomic, mode from the process umask (`store.atomic_write`); no fsync: a dataset is
    regenerated, not recovered."""
    from floorplan_ft.store import atomic_write

    atomic_write(path, data, fsync=False)


def complex_sizes(count: int, complexes: int, seed: int) -> list[int]:
    """How many plans each complex gets: uneven (log-normal weights), at least one each when
    ``count >= complexes``."""
    if not 1 <= complexes <= 100:
        raise ValueError("complexes must be between 1 and 100 (prefixes C00..C99)")
    if count < 0:
        raise ValueError("count must be >= 0")
    rng = np.random.default_rng([seed, 0xC0FFEE])
    weights = rng.lognormal(0.0, 0.9, complexes)
    weights = weights / weights.sum()
    if count >= complexes:
        sizes = np.ones(complexes, dtype=int) + rng.multinomial(count - complexes, weights)
    else:
        sizes = rng.multinomial(count, weights)
    return [int(v) for v in sizes]


def write_dataset(out_dir: Path, count: int, complexes: int, seed: int) -> list[str]:
    """Write ``count`` plans spread over ``complexes`` complexes; returns the stems.

    For each stem: ``images/{stem}.png``, ``annotations/{stem}.json`` (COCO) and
    ``truth/{stem}.json``. Same arguments give byte-identical files.
    """
    if count > 10000:
        raise ValueError("count must be <= 10000 (4-digit index)")
    out_dir = Path(out_dir)
    sizes = complex_sizes(count, complexes, seed)
    stems: list[str] = []
    idx = 0
    for c, size in enumerate(sizes):
        for _ in range(size):
            stems.append(f"C{c:02d}_{idx:04d}")
            idx += 1
    for i, stem in enumerate(stems):
        plan = generate_plan(np.random.default_rng([seed, i]), stem)
        _atomic_write(out_dir / "images" / f"{stem}.png", png_bytes(plan))
        _atomic_write(out_dir / "annotations" / f"{stem}.json", _json_bytes(plan_to_coco(plan)))
        _atomic_write(out_dir / "truth" / f"{stem}.json", _json_bytes(truth_statistics(plan)))
    return stems
