"""Integer rectangle geometry of the pixel plan: shared boundary segments, edges, overlaps."""

from __future__ import annotations

Rect = tuple[int, int, int, int]
Segment = tuple[str, int, int, int]  # (orient, line, lo, hi): "h" is y = line, "v" is x = line


def shared_segment(a: Rect, b: Rect) -> Segment | None:
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


def side_of(rect: Rect, orient: str, line: int) -> str:
    """The side (N/S/E/W) of ``rect`` that lies on the boundary line."""
    if orient == "h":
        return "S" if rect[3] == line else "N"
    return "E" if rect[2] == line else "W"


def subtract(lo: int, hi: int, cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``[lo, hi]`` that no cut covers."""
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


def edges(rect: Rect) -> dict[str, Segment]:
    x0, y0, x1, y1 = rect
    return {
        "N": ("h", y0, x0, x1),
        "S": ("h", y1, x0, x1),
        "W": ("v", x0, y0, y1),
        "E": ("v", x1, y0, y1),
    }


def overlaps(a: Rect, b: Rect) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])
