"""One apartment layout in meters (north is up): which rooms exist and where they are.

Layout::

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
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from floorplan_ft.synth.model import Cell, Retry, pick
from floorplan_ft.synth.rows import Item, Rows, new_item, solve_rows

STRUCTURE_TYPES = ("판상형", "타워형", "혼합형")

# south-row cell kind -> width range, meters
_BASE_WIDTHS = {
    "L": (3.9, 5.0),
    "K": (3.0, 3.6),
    "B": (2.8, 3.4),
    "MS": (3.5, 4.1),
    "MD": (3.3, 4.0),
}


@dataclass
class _Unit:
    """The kind of unit drawn first: structure type, layout variant, bays and bedrooms."""

    structure: str
    variant: str  # P (판상형); T1, T2, T3 (타워형); MA, MB (혼합형)
    bay: int
    n_bed: int
    master_north: bool
    kitchen_deep: bool

    @property
    def south_bedrooms(self) -> int:
        return self.bay - 1


def sample_layout(rng: np.random.Generator) -> tuple[list[Cell], dict[str, Any]]:
    """One layout in meters. Raises Retry when the draw does not work out."""
    unit = _draw_unit(rng)
    kinds, variant, living_end, kend = _arrange_south_row(rng, unit)
    unit.variant = variant  # MB may have fallen back to MA
    kinds = _place_master(rng, kinds, kend, unit.master_north)
    widths = [float(rng.uniform(*_BASE_WIDTHS[c])) for c in kinds]
    ys = _draw_depths(rng)

    kitchen_above = variant in ("P", "MA", "T3") or (variant == "T1" and not unit.kitchen_deep)
    kitchen_width = float(rng.uniform(2.9, 3.6))
    anchor = _kitchen_anchor(rng, kinds, living_end)
    deep_kitchen_item: str | None = None
    if unit.kitchen_deep:
        deep_kitchen_item = pick(rng, [("utility", 0.35), ("pantry", 0.25), ("", 0.4)]) or None
    ensuite = _draw_ensuite(rng) if "MD" in kinds else []
    items, fillers = _north_items(rng, unit, deep_kitchen_item, ensuite)

    rows = Rows(kinds, widths, kitchen_above, kitchen_width, anchor, deep_kitchen_item, ensuite, kend, ys)
    cells_out, info = _solve_with_largest_master(rng, unit, rows, items, fillers)
    cells_out += _balconies(rng, cells_out, ys[3], ys[4])
    cells_out += _core(rng, cells_out, ys[0], unit.master_north)
    info.update(
        structure=unit.structure,
        variant=variant,
        bay_count=unit.bay,
        bedrooms=unit.n_bed,
        master_north=unit.master_north,
    )
    return cells_out, info


def _draw_unit(rng: np.random.Generator) -> _Unit:
    structure = str(rng.choice(STRUCTURE_TYPES, p=[0.5, 0.3, 0.2]))
    if structure == "판상형":
        variant = "P"
    elif structure == "타워형":
        variant = pick(rng, [("T1", 0.4), ("T2", 0.3), ("T3", 0.3)])
    else:
        variant = pick(rng, [("MA", 0.55), ("MB", 0.45)])
    bay = int(rng.choice([2, 3, 4, 5], p=[0.17, 0.38, 0.33, 0.12]))
    k_s = bay - 1  # bedrooms in the south row
    lo = max(2, k_s)
    n_bed = min(4, lo + int(rng.random() < 0.4))
    master_north = n_bed > k_s and rng.random() < 0.25
    kitchen_deep = variant == "T2" or (variant == "T1" and rng.random() < 0.5)
    return _Unit(structure, variant, bay, n_bed, master_north, kitchen_deep)


def _arrange_south_row(rng: np.random.Generator, unit: _Unit) -> tuple[list[str], str, bool, int | None]:
    """The south row's cell kinds west to east, the variant (MB falls back to MA when no bedroom
    is at an end of the row for its kitchen), whether the living room is at an end, and the
    bedroom at whose end the MB kitchen goes."""
    variant = unit.variant
    k_s = unit.south_bedrooms
    for _attempt in range(2):
        living_end = variant in ("MA", "T1")
        end_side = "W" if rng.random() < 0.5 else "E"
        if living_end:
            n_w = 0 if end_side == "W" else k_s
        else:
            n_w = int(rng.binomial(k_s, 0.5))
        block = ["L"]
        if unit.kitchen_deep:
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
        return cells, variant, living_end, kend
    raise Retry("arrangement")  # pragma: no cover - MA always works


def _place_master(rng: np.random.Generator, cells: list[str], kend: int | None, master_north: bool) -> list[str]:
    """Make one south bedroom the master: deep (MD) at an end of the row, or shallow (MS)."""
    last = len(cells) - 1

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
    return cells


def _draw_depths(rng: np.random.Generator) -> tuple[float, float, float, float, float]:
    """The rows' y lines: north row top, corridor top, south row top, balcony top, bottom."""
    dN = float(rng.uniform(2.9, 3.5))
    dC = float(rng.uniform(1.45, 1.8))
    dS = float(rng.uniform(3.3, 4.0))
    dB = float(rng.uniform(1.3, 1.7))
    Y0, Y1 = 0.0, dN
    Y2 = Y1 + dC
    Y3 = Y2 + dS
    Y4 = Y3 + dB
    return (Y0, Y1, Y2, Y3, Y4)


def _kitchen_anchor(rng: np.random.Generator, cells: list[str], living_end: bool) -> str:
    """The end ("W"/"E") of the living room's top edge that the kitchen above it sits at."""
    li = cells.index("L")
    if living_end:
        return "W" if li == 0 else "E"
    run_w = 0
    while li - run_w - 1 >= 0 and cells[li - run_w - 1] in ("B", "MS"):
        run_w += 1
    run_e = 0
    while li + run_e + 1 < len(cells) and cells[li + run_e + 1] in ("B", "MS"):
        run_e += 1
    if run_w and run_e:
        # remainder (away from the anchor) faces the shorter run
        return "W" if run_e < run_w else "E" if run_w < run_e else pick(rng, [("W", 1), ("E", 1)])
    if run_e:
        return "W"
    if run_w:
        return "E"
    return pick(rng, [("W", 1), ("E", 1)])


def _draw_ensuite(rng: np.random.Generator) -> list[str]:
    """The rooms above a deep master, west to east."""
    ensuite = list([["dress", "bath"], ["bath"], ["dress"]][int(rng.choice(3, p=[0.5, 0.3, 0.2]))])
    if len(ensuite) == 2 and rng.random() < 0.5:
        ensuite.reverse()
    return ensuite


def _north_items(
    rng: np.random.Generator, unit: _Unit, deep_kitchen_item: str | None, ensuite: list[str]
) -> tuple[list[Item], list[str]]:
    """The rooms the north row must hold, and the fillers for spans with slack left."""
    ensuite_bath = "bath" in ensuite
    if ensuite_bath:
        common_baths = 1
    elif unit.n_bed >= 3:
        common_baths = 2 if rng.random() < 0.7 else 1
    else:
        common_baths = 2 if rng.random() < 0.25 else 1

    items: list[Item] = []
    if unit.master_north:
        items.append(new_item(rng, "entrance", "combo"))
        items.append(new_item(rng, "master", "combo"))
    else:
        items.append(new_item(rng, "entrance"))
    items += [new_item(rng, "bath", optional=k > 0) for k in range(common_baths)]
    items += [new_item(rng, "bedroom") for _ in range(unit.n_bed - unit.south_bedrooms - int(unit.master_north))]
    if unit.variant == "MB":
        items.append(new_item(rng, "kitchen", "kitchen-end"))
    used = {it.role for it in items}
    if deep_kitchen_item:
        used.add(deep_kitchen_item)
    if ensuite:
        used.add("dress")
    for role, p in (("pantry", 0.35), ("utility", 0.3), ("alpha", 0.25), ("dress", 0.2)):
        if role not in used and rng.random() < p:
            tag = "near-kitchen" if role == "pantry" else ""
            items.append(new_item(rng, role, tag, optional=True))
            used.add(role)
    fillers = [r for r in ("alpha", "dress", "utility", "pantry") if r not in used]
    rng.shuffle(fillers)
    if common_baths + int(ensuite_bath) < 2:
        fillers.append("bath")
    fillers += ["bedroom"] * (4 - unit.n_bed)
    return items, fillers


def _solve_with_largest_master(
    rng: np.random.Generator, unit: _Unit, rows: Rows, items: list[Item], fillers: list[str]
) -> tuple[list[Cell], dict[str, Any]]:
    """Lay out the rows until the master is the largest bedroom by a clear margin, widening the
    master (its south cell, or its north-row minimum width) between tries."""
    widths = rows.widths  # each try lays out a copy
    for _solve in range(6):
        cells_out, info = solve_rows(rng, replace(rows, widths=list(widths)), items, fillers)
        beds = [c for c in cells_out if c.role == "bedroom"]
        master = next(c for c in beds if c.is_master)
        other = max((c.w * (c.y1 - c.y0) for c in beds if not c.is_master), default=0.0)
        area = master.w * (master.y1 - master.y0)
        if area >= 1.04 * other:
            return cells_out, info
        need = other * 1.06 / area
        if unit.master_north:
            for it in items:
                if it.role == "master":
                    it.minw = max(it.minw, master.w * need)
                    it.maxw = max(it.maxw, it.minw + 0.5)
                    if it.minw > 5.5:
                        raise Retry("north master too wide")
        else:
            mi = rows.deep_master if rows.deep_master is not None else rows.kinds.index("MS")
            widths[mi] *= need
    raise Retry("master not largest")


def _balconies(rng: np.random.Generator, cells: list[Cell], Y3: float, Y4: float) -> list[Cell]:
    south = sorted(
        [c for c in cells if abs(c.y1 - Y3) < 1e-9 and c.role in ("living", "bedroom", "kitchen")],
        key=lambda c: c.x0,
    )
    p = {"living": 0.85, "kitchen": 0.5, "bedroom": 0.5}
    flags = [rng.random() < (0.65 if c.is_master else p[c.role]) for c in south]
    out: list[Cell] = []
    groups: list[list[Cell]] = []
    cur: list[Cell] = []
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
                out.append(Cell("ac", x1 - wac, Y3, x1, Y4, wins=[("S", "main")], win_subtype="fixed"))
                x1 = x1 - wac
                ac_done = True
            elif g[0].w - wac >= 1.8:
                out.append(Cell("ac", x0, Y3, x0 + wac, Y4, wins=[("S", "main")], win_subtype="fixed"))
                x0 = x0 + wac
                ac_done = True
        out.append(Cell("balcony", x0, Y3, x1, Y4, wins=[("S", "main")]))
    return out


def _core(rng: np.random.Generator, cells: list[Cell], Y0: float, master_north: bool) -> list[Cell]:
    """엘리베이터홀 north of the 현관, 계단실 beside it (over a windowless-tolerant room or the
    windowless master) or north of it."""
    ent = next(c for c in cells if c.role == "entrance")
    dH = float(rng.uniform(2.0, 2.5))
    hall = Cell("hall", ent.x0, Y0 - dH, ent.x1, Y0)
    north = sorted([c for c in cells if abs(c.y0 - Y0) < 1e-9 and c is not ent], key=lambda c: c.x0)
    left = [c for c in north if abs(c.x1 - ent.x0) < 1e-9]
    right = [c for c in north if abs(c.x0 - ent.x1) < 1e-9]
    if master_north:
        m = [c for c in left + right if c.is_master]
        if not m:
            raise Retry("master not beside entrance")
        m0 = m[0]
        return [hall, Cell("stair", m0.x0, Y0 - dH, m0.x1, Y0)]
    tolerant = ("bath", "pantry", "dress", "utility")
    opts = [(c, "L") for c in left if c.role in tolerant and c.w >= 2.2]
    opts += [(c, "R") for c in right if c.role in tolerant and c.w >= 2.2]
    if opts and rng.random() < 0.6:
        c, side = opts[int(rng.integers(len(opts)))]
        sw = min(c.w, float(rng.uniform(2.2, 2.9)))
        if side == "L":
            return [hall, Cell("stair", ent.x0 - sw, Y0 - dH, ent.x0, Y0)]
        return [hall, Cell("stair", ent.x1, Y0 - dH, ent.x1 + sw, Y0)]
    sw = max(ent.w + 0.6, float(rng.uniform(2.4, 3.2)))
    sd = float(rng.uniform(2.4, 3.0))
    cx = (ent.x0 + ent.x1) / 2.0
    return [hall, Cell("stair", cx - sw / 2, Y0 - dH - sd, cx + sw / 2, Y0 - dH)]
