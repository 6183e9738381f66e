"""The rows of one layout in meters: the north row packed into the spans the south row leaves
free, the south row and the corridor above its shallow rooms.

The south row's cells are given as kinds: ``L`` living room, ``K`` deep kitchen, ``B`` bedroom,
``MS`` shallow master, ``MD`` deep master (the shallow ones, ``B`` and ``MS``, have the corridor
above them). The north row spans between the fixed segments above the deep cells (the kitchen
above the living room, the deep kitchen, the en-suite above ``MD``) are shared among `Item`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from floorplan_ft.synth.model import Cell, Retry

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
_SHALLOW = ("B", "MS")
_WIDTH_CAPS = {"B": 4.0, "MS": 4.8, "L": 6.0}  # how far a south cell may widen for the north row

Span = tuple[float, float]


@dataclass
class Item:
    """A room of the north row being sized."""

    role: str
    minw: float
    maxw: float
    weight: float
    width: float = 0.0
    x0: float = 0.0
    tag: str = ""  # "kitchen-end", "near-kitchen", "combo"
    optional: bool = False


def new_item(rng: np.random.Generator, role: str, tag: str = "", optional: bool = False) -> Item:
    lo, hi, wt = _NSPEC[role]
    return Item(role, lo * float(rng.uniform(1.0, 1.08)), hi, wt, tag=tag, optional=optional)


@dataclass
class Rows:
    """What the rows are laid out around: the south row (kinds and widths, west to east), the
    kitchen above the living room, the rooms above the deep cells and the rows' y lines."""

    kinds: list[str]
    widths: list[float]  # widened in place when the north row needs room
    kitchen_above: bool
    kitchen_width: float  # of the kitchen above the living room, before it is fitted
    kitchen_anchor: str  # "W" or "E": the end of the living room's top edge the kitchen sits at
    deep_kitchen_item: str | None  # the room above a deep kitchen, if any
    ensuite: list[str]  # rooms above the deep master, west to east
    kitchen_end: int | None  # the south cell at whose end the MB kitchen goes
    ys: tuple[float, float, float, float, float]  # north, corridor top, south top, balcony top, bottom

    @property
    def living(self) -> int:
        return self.kinds.index("L")

    @property
    def deep_kitchen(self) -> int | None:
        return self.kinds.index("K") if "K" in self.kinds else None

    @property
    def deep_master(self) -> int | None:
        return self.kinds.index("MD") if "MD" in self.kinds else None

    @property
    def shallow(self) -> list[bool]:
        return [c in _SHALLOW for c in self.kinds]

    def xs(self) -> list[float]:
        xs = [0.0]
        for w in self.widths:
            xs.append(xs[-1] + w)
        return xs

    def kitchen_range(self, xs: list[float]) -> Span | None:
        """Where the kitchen above the living room goes, if there is one."""
        if not self.kitchen_above:
            return None
        li = self.living
        lx0, lx1 = xs[li], xs[li + 1]
        kw = min(self.kitchen_width, lx1 - lx0)
        # the remainder of the living room's top edge (on the side away from the anchor) joins
        # the neighbouring free span; with no shallow neighbour there, the kitchen takes it all
        nbi = li + 1 if self.kitchen_anchor == "W" else li - 1
        if (lx1 - lx0) - kw < 1.6 and not (0 <= nbi < len(self.kinds) and self.shallow[nbi]):
            kw = lx1 - lx0
        return (lx0, lx0 + kw) if self.kitchen_anchor == "W" else (lx1 - kw, lx1)

    def spans(self, xs: list[float]) -> list[Span]:
        """The free spans of the north row (between the fixed segments above deep cells)."""
        fixed = []
        if self.deep_master is not None:
            fixed.append((xs[self.deep_master], xs[self.deep_master + 1]))
        if self.deep_kitchen is not None:
            fixed.append((xs[self.deep_kitchen], xs[self.deep_kitchen + 1]))
        ka = self.kitchen_range(xs)
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


def solve_rows(
    rng: np.random.Generator, rows: Rows, items_in: list[Item], fillers_in: list[str]
) -> tuple[list[Cell], dict[str, Any]]:
    """The cells of the three rows: north row items, south row, corridors, kitchen above."""
    items = [Item(i.role, i.minw, i.maxw, i.weight, tag=i.tag, optional=i.optional) for i in items_in]
    fillers = list(fillers_in)
    xs = rows.xs()
    spans = rows.spans(xs)
    if not spans:
        raise Retry("no free span")
    assign = _assign_items(spans, items, xs, rows.kitchen_range(xs), rows.kitchen_end)
    _make_room(rows, assign, spans)
    xs = rows.xs()
    spans = rows.spans(xs)
    ka = rows.kitchen_range(xs)
    _add_fillers(rng, assign, spans, fillers)
    if any(not assign[si] for si in range(len(spans))):
        raise Retry("empty span")

    Y0, Y1 = rows.ys[0], rows.ys[1]
    out: list[Cell] = []
    for si, (a, b) in enumerate(spans):
        flat = _order_span(rng, assign[si], a, b, ka, rows.kitchen_end)
        _size_items(flat, b - a)
        _snap_to_below(flat, _below_changes(rows.kinds, xs, a, b, ka), a)
        for k, it in enumerate(flat):
            x1 = b if k == len(flat) - 1 else flat[k + 1].x0
            role = "bedroom" if it.role == "master" else it.role
            out.append(Cell(role, it.x0, Y0, x1, Y1, is_master=it.role == "master"))
    out += _south_cells(rng, rows, xs)
    out += _corridors(rows, xs)
    if ka is not None:
        out.append(Cell("kitchen", ka[0], Y0, ka[1], Y1, key="above"))
    return out, {"cells": list(rows.kinds)}


def _assign_items(
    spans: list[Span], items: list[Item], xs: list[float], ka: Span | None, kend: int | None
) -> dict[int, list[Item]]:
    """Items per span: the constrained ones where they must go, the rest by free width."""

    # which span touches the kitchen (for the pantry) / the unit end (for the MB kitchen)
    def span_touching(x: float) -> int | None:
        for si, (a, b) in enumerate(spans):
            if abs(a - x) < 1e-6 or abs(b - x) < 1e-6:
                return si
        return None

    assign: dict[int, list[Item]] = {si: [] for si in range(len(spans))}
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
            raise Retry("MB kitchen span")
    # the 현관 + north master combo travels together
    combo = [it for it in pending if it.tag == "combo"]
    for it in combo:
        pending.remove(it)
    groups: list[list[Item]] = ([combo] if combo else []) + [[it] for it in pending]
    groups.sort(key=lambda g: -sum(i.minw for i in g))

    def load(si: int) -> float:
        a, b = spans[si]
        return (b - a) - sum(i.minw for i in assign[si])

    for g in groups:
        si = max(range(len(spans)), key=lambda s: (load(s), -s))
        assign[si].extend(g)
    return assign


def _make_room(rows: Rows, assign: dict[int, list[Item]], spans: list[Span]) -> None:
    """Where the north row needs more: first drop optional rooms, then widen the south-row cells
    below the span (and the living room when its top edge reaches the span)."""
    n = len(rows.kinds)
    shallow = rows.shallow
    li = rows.living
    widths = rows.widths
    for _it in range(24):
        xs = rows.xs()
        spans_now = rows.spans(xs)
        if len(spans_now) != len(spans):
            raise Retry("span structure changed")
        spans = spans_now
        ka = rows.kitchen_range(xs)
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
            elif (rows.kitchen_anchor == "W" and abs(a - ka[1]) < 1e-6) or (
                rows.kitchen_anchor == "E" and abs(b - ka[0]) < 1e-6
            ):
                cand.append(li)
            if not cand:
                raise Retry("cannot widen")
            _widen(widths, [rows.kinds[c] for c in cand], cand, delta)
            break
        if not changed:
            return
    raise Retry("widening did not converge")


def _widen(widths: list[float], kinds: list[str], cand: list[int], delta: float) -> None:
    """Add ``delta`` to the widths of ``cand``: up to their caps by free room, the rest by width."""
    room = {c: max(0.0, _WIDTH_CAPS[kind] - widths[c]) for c, kind in zip(cand, kinds)}
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


def _add_fillers(
    rng: np.random.Generator, assign: dict[int, list[Item]], spans: list[Span], fillers: list[str]
) -> None:
    """Fillers for spans with a lot of slack (or none at all)."""
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
            cand = new_item(rng, r)
            if cand.minw <= free:
                assign[worst_si].append(cand)
                fillers.remove(r)
                placed = True
                break
        if not placed:
            break


def _order_span(
    rng: np.random.Generator, its: list[Item], a: float, b: float, ka: Span | None, kend: int | None
) -> list[Item]:
    """The items of one span west to east: the MB kitchen at its end of the unit, the pantry next to
    the kitchen, the 현관 + north master combo together, the rest shuffled."""
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
    if near:
        kitchen_east = ka is not None and abs(b - ka[0]) < 1e-6  # the span ends where the kitchen begins
        kitchen_west = ka is not None and abs(a - ka[1]) < 1e-6
        seq = near + seq if not kitchen_east and (kitchen_west or first) else seq + near
    seq = first + seq + last
    flat: list[Item] = []
    for s in seq:
        flat.extend(s if isinstance(s, list) else [s])
    return flat


def _snap_to_below(flat: list[Item], below: list[float], a: float) -> None:
    """Place the sized items from ``a`` on, their boundaries snapped onto changes of what lies
    below (corridor / living / kitchen) where the minimum widths allow."""
    x = a
    for it in flat:
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


def _south_cells(rng: np.random.Generator, rows: Rows, xs: list[float]) -> list[Cell]:
    """The south row and the fixed north segments above its deep cells."""
    Y0, Y1, Y2, Y3, _Y4 = rows.ys
    out: list[Cell] = []
    for c, kind in enumerate(rows.kinds):
        x0, x1 = xs[c], xs[c + 1]
        if kind == "L":
            out.append(Cell("living", x0, Y1, x1, Y3))
        elif kind == "K":
            top = Y0 if rows.deep_kitchen_item is None else Y1
            out.append(Cell("kitchen", x0, top, x1, Y3, key="deep"))
            if rows.deep_kitchen_item is not None:
                out.append(Cell(rows.deep_kitchen_item, x0, Y0, x1, Y1))
        elif kind == "MD":
            out.append(Cell("bedroom", x0, Y1, x1, Y3, is_master=True, key="south", deep=True))
            out += _ensuite_cells(rng, rows.ensuite, x0, x1, Y0, Y1)
        else:
            out.append(Cell("bedroom", x0, Y2, x1, Y3, is_master=kind == "MS", key="south"))
    return out


def _ensuite_cells(
    rng: np.random.Generator, ensuite: list[str], x0: float, x1: float, y0: float, y1: float
) -> list[Cell]:
    if len(ensuite) == 1:
        return [Cell(ensuite[0], x0, y0, x1, y1, key="ensuite")]
    frac = float(rng.uniform(0.42, 0.58))
    xm = x0 + (x1 - x0) * frac
    return [Cell(ensuite[0], x0, y0, xm, y1, key="ensuite"), Cell(ensuite[1], xm, y0, x1, y1, key="ensuite")]


def _corridors(rows: Rows, xs: list[float]) -> list[Cell]:
    """One corridor over each maximal run of shallow cells."""
    Y1, Y2 = rows.ys[1], rows.ys[2]
    shallow = rows.shallow
    n = len(shallow)
    out: list[Cell] = []
    c = 0
    while c < n:
        if shallow[c]:
            d = c
            while d + 1 < n and shallow[d + 1]:
                d += 1
            out.append(Cell("corridor", xs[c], Y1, xs[d + 1], Y2))
            c = d + 1
        else:
            c += 1
    return out


def _size_items(items: list[Item], width: float) -> None:
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


def _below_changes(kinds_in: list[str], xs: list[float], a: float, b: float, ka: Span | None) -> list[float]:
    """x positions inside (a, b) where what lies below the north row changes."""
    kinds = ["corr" if kind in _SHALLOW else kind for kind in kinds_in]
    out = []
    for c in range(1, len(kinds_in)):
        if kinds[c] != kinds[c - 1] and a + 1e-6 < xs[c] < b - 1e-6:
            out.append(xs[c])
    if ka is not None:
        for x in ka:
            if a + 1e-6 < x < b - 1e-6:
                out.append(x)
    return out
