"""Small pure-Python planar geometry for the topology builder (no shapely).

Polygons are sequences of (x, y) points without a repeated closing point; rectangles are
(x0, y0, x1, y1) with x0 <= x1 and y0 <= y1. Image coordinates: y grows downward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Point = tuple[float, float]
Rect = tuple[float, float, float, float]


def signed_area(poly: Sequence[Point]) -> float:
    n = len(poly)
    s = 0.0
    for i in range(n):
        x1, y1 = poly[i]
        x2, y2 = poly[(i + 1) % n]
        s += x1 * y2 - x2 * y1
    return s / 2.0


def area(poly: Sequence[Point]) -> float:
    return abs(signed_area(poly))


def centroid(poly: Sequence[Point]) -> Point:
    """Area centroid; the vertex mean for a (near-)degenerate polygon."""
    a = signed_area(poly)
    n = len(poly)
    if abs(a) < 1e-9:
        return (sum(p[0] for p in poly) / n, sum(p[1] for p in poly) / n)
    cx = cy = 0.0
    for i in range(n):
        x1, y1 = poly[i]
        x2, y2 = poly[(i + 1) % n]
        c = x1 * y2 - x2 * y1
        cx += (x1 + x2) * c
        cy += (y1 + y2) * c
    return (cx / (6.0 * a), cy / (6.0 * a))


def bounds(poly: Sequence[Point]) -> Rect:
    xs = [p[0] for p in poly]
    ys = [p[1] for p in poly]
    return (min(xs), min(ys), max(xs), max(ys))


def bbox_rect(bbox: Sequence[float]) -> Rect:
    x, y, w, h = bbox
    return (x, y, x + w, y + h)


def rects_touch(a: Rect, b: Rect, tol: float = 0.0) -> bool:
    return not (a[2] + tol < b[0] or b[2] + tol < a[0] or a[3] + tol < b[1] or b[3] + tol < a[1])


def point_in_polygon(pt: Point, poly: Sequence[Point]) -> bool:
    """Even-odd ray casting; points on the boundary may go either way."""
    x, y = pt
    inside = False
    n = len(poly)
    j = n - 1
    for i in range(n):
        xi, yi = poly[i]
        xj, yj = poly[j]
        if (yi > y) != (yj > y):
            x_cross = xi + (y - yi) * (xj - xi) / (yj - yi)
            if x < x_cross:
                inside = not inside
        j = i
    return inside


def simplify(poly: Sequence[Point], eps: float = 1e-6) -> list[Point]:
    """Drop repeated points and vertices that lie on the line through their neighbours."""
    pts: list[Point] = []
    for p in poly:
        if not pts or math.dist(p, pts[-1]) > eps:
            pts.append(p)
    if len(pts) > 1 and math.dist(pts[0], pts[-1]) <= eps:
        pts.pop()
    changed = True
    while changed and len(pts) > 3:
        changed = False
        for i in range(len(pts)):
            a, b, c = pts[i - 1], pts[i], pts[(i + 1) % len(pts)]
            cross = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
            span = math.dist(a, c)
            if span <= eps or abs(cross) / span <= eps:
                # b is collinear with a and c (or a spike back onto a): drop it.
                del pts[i]
                changed = True
                break
    return pts


def clip_polygon_to_rect(poly: Sequence[Point], rect: Rect) -> list[Point]:
    """Sutherland-Hodgman clip of any simple polygon by an axis-aligned rectangle."""
    x0, y0, x1, y1 = rect

    def clip(pts: list[Point], inside, intersect) -> list[Point]:
        out: list[Point] = []
        n = len(pts)
        for i in range(n):
            cur, prev = pts[i], pts[i - 1]
            cin, pin = inside(cur), inside(prev)
            if cin:
                if not pin:
                    out.append(intersect(prev, cur))
                out.append(cur)
            elif pin:
                out.append(intersect(prev, cur))
        return out

    def at_x(x: float):
        def f(p: Point, q: Point) -> Point:
            t = (x - p[0]) / (q[0] - p[0])
            return (x, p[1] + t * (q[1] - p[1]))

        return f

    def at_y(y: float):
        def f(p: Point, q: Point) -> Point:
            t = (y - p[1]) / (q[1] - p[1])
            return (p[0] + t * (q[0] - p[0]), y)

        return f

    pts = list(poly)
    for inside, inter in (
        (lambda p: p[0] >= x0, at_x(x0)),
        (lambda p: p[0] <= x1, at_x(x1)),
        (lambda p: p[1] >= y0, at_y(y0)),
        (lambda p: p[1] <= y1, at_y(y1)),
    ):
        if not pts:
            break
        pts = clip(pts, inside, inter)
    return pts


def rect_polygon_overlap(rect: Rect, poly: Sequence[Point], poly_bounds: Rect | None = None) -> float:
    """Area of the intersection of an axis-aligned rectangle and a simple polygon."""
    if poly_bounds is not None and not rects_touch(rect, poly_bounds):
        return 0.0
    if rect[2] <= rect[0] or rect[3] <= rect[1]:
        return 0.0
    clipped = clip_polygon_to_rect(poly, rect)
    return area(clipped) if len(clipped) >= 3 else 0.0


def segment_in_rect(p: Point, q: Point, rect: Rect) -> tuple[float, float] | None:
    """Liang-Barsky: the parameter interval [t0, t1] (0..1) of segment p->q inside `rect`."""
    x0, y0, x1, y1 = rect
    dx, dy = q[0] - p[0], q[1] - p[1]
    t0, t1 = 0.0, 1.0
    for pk, qk in ((-dx, p[0] - x0), (dx, x1 - p[0]), (-dy, p[1] - y0), (dy, y1 - p[1])):
        if abs(pk) < 1e-12:
            if qk < 0:
                return None
            continue
        t = qk / pk
        if pk < 0:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
        if t0 > t1:
            return None
    return (t0, t1)


def shared_segments(a: Sequence[Point], b: Sequence[Point], tol: float) -> list[tuple[Point, Point]]:
    """Boundary pieces of polygon `a` that run along the boundary of polygon `b`.

    Two edges are shared where they are parallel, lie within `tol` of each other and their
    projections overlap. Overlapping pieces on the same edge of `a` are merged. Returns segments
    (start, end) of positive length in a deterministic order (edges of `a` in order).
    """
    out: list[tuple[Point, Point]] = []
    nb = len(b)
    for i in range(len(a)):
        p, q = a[i], a[(i + 1) % len(a)]
        length = math.dist(p, q)
        if length <= 1e-9:
            continue
        ux, uy = (q[0] - p[0]) / length, (q[1] - p[1]) / length
        intervals: list[tuple[float, float]] = []
        for j in range(nb):
            r, s = b[j], b[(j + 1) % nb]
            # distance of r and s from the line through p, q
            dr = (r[0] - p[0]) * uy - (r[1] - p[1]) * ux
            ds = (s[0] - p[0]) * uy - (s[1] - p[1]) * ux
            if abs(dr) > tol or abs(ds) > tol:
                continue
            tr = (r[0] - p[0]) * ux + (r[1] - p[1]) * uy
            ts = (s[0] - p[0]) * ux + (s[1] - p[1]) * uy
            lo, hi = max(0.0, min(tr, ts)), min(length, max(tr, ts))
            if hi - lo > 1e-6:
                intervals.append((lo, hi))
        for lo, hi in merge_intervals(intervals):
            out.append(((p[0] + ux * lo, p[1] + uy * lo), (p[0] + ux * hi, p[1] + uy * hi)))
    return out


def merge_intervals(intervals: list[tuple[float, float]], gap: float = 1e-6) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for lo, hi in sorted(intervals):
        if merged and lo <= merged[-1][1] + gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged
