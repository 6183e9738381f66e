"""Build `topology_graph.json` from the detections of one plan (DOMAIN.md, docs/data-formats.md).

Rules DOMAIN.md leaves open, fixed here (bump `BUILDER_VERSION` when any of them changes):

* Node order: spaces sorted by (vocab category order, min y, min x, annotation id); node ids
  `space_{i}` follow that order.
* Naming: the OCR boxes whose centre lies in a space (a box inside several overlapping spaces goes
  to the smallest) name it. The label is the OCR text that agrees with the category (same
  canonical name), else the OCR text with a known canonical name nearest the centroid, else the
  OCR text nearest the centroid, else the category suffix. The space's canonical name is the
  label's when that is a known class (`vocab.SPACE_CLASS`), else the category's; the canonical
  name gives space_type, is_outside (외부공간) and every count and ratio.
* Objects belong to the (smallest) space containing their bbox centre.
* Structures belong to each space their rectangle overlaps by more than
  max(1 px², min(0.375·t², rect area / 4)), t = the rectangle's thickness (short side). A
  structure centred on a boundary overlaps each side by t/2 along its length; the t/2 × t/2
  corner bits of a wall that runs past a corner stay below the threshold.
* door/window edge: the structure overlaps spaces on both sides of its long axis; the edge joins
  the space with the largest overlap on each side (a long façade window touching two rooms on
  the same side joins nothing).
* open edge: one per pair of spaces whose shared boundary (edges parallel and within
  `SHARED_EDGE_TOL` px) has an uncovered run at least max(`MIN_OPEN_PX`, 3 × median wall
  thickness) long; a run is covered by any wall, door or window rectangle grown by `COVER_TOL` px.
* Window direction: w >= h counts as "wider than tall" (S below the centroid, else N), otherwise
  E right of the centroid, else W. Main window = longest side, ties: larger area, then lower
  annotation order (min y, min x, id).
* The living room / kitchen / master bedroom are the largest inside space of that canonical
  name (ties: node order). bay_count counts every living room plus the bedrooms whose main window
  faces the reference living room's main direction.
* structure_type, in the team aggregator's order: 혼합형 without a living room; 타워형 if the
  living room has windows on two perpendicular sides (whatever the kitchen); 혼합형 when it
  cannot be decided (no living-room window, no kitchen); 타워형 if the kitchen has no window or
  faces the living room's way; 판상형 if the main windows face opposite ways; else 혼합형
  (perpendicular).
* Ratios are % of the inside area (outside spaces excluded), rounded to 2 decimals; windowless
  ratio over inside spaces whose canonical name is not 기타; 0 when nothing to count.
"""

from __future__ import annotations

import math
import statistics as pystats
from dataclasses import dataclass, field

from floorplan_ft import vocab
from floorplan_ft.cv import geometry as geo
from floorplan_ft.cv.detections import Detection, Detections
from floorplan_ft.schemas import (
    ContainedObject,
    ContainedStructure,
    Contains,
    Edge,
    ImageInfo,
    SpaceNode,
    SpaceTypeCount,
    Structures,
    TopologyGraph,
    TopologyStatistics,
)

BUILDER_VERSION = "cv-topology/1.2"  # 1.2: 타워형 before 판상형, the team's order

SHARED_EDGE_TOL = 2.0  # px: two boundary edges closer than this are one shared boundary
COVER_TOL = 1.0  # px: structure rectangles are grown by this much when covering a boundary
MIN_OPEN_PX = 20.0  # px: shortest uncovered run that makes an `open` edge
OPEN_WALL_FACTOR = 3.0  # × median wall thickness, when larger than MIN_OPEN_PX
MIN_OVERLAP_PX2 = 1.0  # px²: smallest structure/space overlap that counts
MIN_STRUCT_THICKNESS = 2.0  # px: zero-thickness structure boxes are grown to this

OUTSIDE_NAMES = frozenset(n for n, c in vocab.SPACE_CLASS.items() if c == vocab.OUTSIDE)
LIVING = "거실"
BEDROOM = "침실"
KITCHEN = "주방"
BATHROOM = "화장실"
BALCONY = "발코니"
EXCLUDED_FROM_WINDOWLESS = "기타"

OPPOSITE = {"N": "S", "S": "N", "E": "W", "W": "E"}
AXIS = {"N": "NS", "S": "NS", "E": "EW", "W": "EW"}
_EDGE_TYPE_ORDER = {"door": 0, "window": 1, "open": 2}


def _r(x: float, nd: int = 2) -> float:
    """Round for output; never emit -0.0."""
    return round(x, nd) + 0.0


def _id_key(v: int | str) -> tuple[int, int | str]:
    return (0, v) if isinstance(v, int) else (1, str(v))


def _det_key(d: Detection) -> tuple:
    x, y, _, _ = d.bbox
    return (vocab.CATEGORY_IDS[d.category_name], y, x, _id_key(d.id))


@dataclass
class _Space:
    det: Detection
    poly: list[tuple[float, float]]
    area: float
    centroid: tuple[float, float]
    bounds: geo.Rect
    node_id: str = ""
    index: int = 0
    label: str = ""
    canonical: str = ""
    space_type: str = vocab.UNCLASSIFIED
    is_outside: bool = False
    ocr: list[Detection] = field(default_factory=list)
    objects: list[Detection] = field(default_factory=list)
    doors: list[Detection] = field(default_factory=list)
    windows: list[Detection] = field(default_factory=list)
    walls: list[Detection] = field(default_factory=list)


def _structure_rect(d: Detection) -> geo.Rect:
    x0, y0, x1, y1 = geo.bbox_rect(d.bbox)
    if x1 - x0 < MIN_STRUCT_THICKNESS:
        cx = (x0 + x1) / 2
        x0, x1 = cx - MIN_STRUCT_THICKNESS / 2, cx + MIN_STRUCT_THICKNESS / 2
    if y1 - y0 < MIN_STRUCT_THICKNESS:
        cy = (y0 + y1) / 2
        y0, y1 = cy - MIN_STRUCT_THICKNESS / 2, cy + MIN_STRUCT_THICKNESS / 2
    return (x0, y0, x1, y1)


def _overlap_threshold(rect: geo.Rect) -> float:
    w, h = rect[2] - rect[0], rect[3] - rect[1]
    t = min(w, h)
    return max(MIN_OVERLAP_PX2, min(0.375 * t * t, w * h / 4.0))


def _smallest_containing(pt: tuple[float, float], spaces: list[_Space]) -> _Space | None:
    hits = [
        s
        for s in spaces
        if s.bounds[0] <= pt[0] <= s.bounds[2]
        and s.bounds[1] <= pt[1] <= s.bounds[3]
        and geo.point_in_polygon(pt, s.poly)
    ]
    if not hits:
        return None
    return min(hits, key=lambda s: (s.area, s.index))


def window_direction(window: Detection, space_centroid: tuple[float, float]) -> str:
    """N/S/E/W side of the space's centroid on which a window lies (DOMAIN.md)."""
    return bbox_direction(window.bbox, space_centroid)


def bbox_direction(bbox, space_centroid) -> str:
    """Direction of a window given its [x, y, w, h] box and its space's centroid."""
    x, y, w, h = bbox
    cx, cy = x + w / 2.0, y + h / 2.0
    if w >= h:
        return "S" if cy > space_centroid[1] else "N"
    return "E" if cx > space_centroid[0] else "W"


def _main_window(space: _Space) -> Detection | None:
    if not space.windows:
        return None
    return min(
        space.windows,
        key=lambda d: (-max(d.bbox[2], d.bbox[3]), -(d.bbox[2] * d.bbox[3]), _det_key(d)),
    )


def _main_direction(space: _Space | None) -> str | None:
    if space is None:
        return None
    mw = _main_window(space)
    return None if mw is None else window_direction(mw, space.centroid)


def _resolve_name(space: _Space) -> None:
    """Set label, canonical name, space_type and is_outside from category and OCR."""
    cat_canon = vocab.canonical_name(space.det.category_name)
    suffix = space.det.category_name[len(vocab.SPACE_PREFIX) :]
    texts = [d for d in space.ocr if d.text]

    def dist(d: Detection) -> float:
        return math.dist(d.center, space.centroid)

    agree = [d for d in texts if vocab.canonical_name(d.text) == cat_canon]
    known = [d for d in texts if vocab.canonical_name(d.text) in vocab.SPACE_CLASS]
    chosen: Detection | None = None
    for pool in (agree, known, texts):
        if pool:
            chosen = min(pool, key=lambda d: (dist(d), _det_key(d)))
            break
    if chosen is not None:
        space.label = chosen.text
        ocr_canon = vocab.canonical_name(chosen.text)
        space.canonical = ocr_canon if ocr_canon in vocab.SPACE_CLASS else cat_canon
    else:
        space.label = suffix
        space.canonical = cat_canon
    space.space_type = vocab.SPACE_CLASS.get(space.canonical, vocab.UNCLASSIFIED)
    space.is_outside = space.canonical in OUTSIDE_NAMES


def _contained_structure(d: Detection) -> ContainedStructure:
    return ContainedStructure(
        structure_id=str(d.id),
        category_name=d.category_name,
        bbox=[_r(v) for v in d.bbox],
        subtype=d.subtype,
    )


def _open_threshold(walls: list[Detection]) -> float:
    if not walls:
        return MIN_OPEN_PX
    thickness = pystats.median(min(d.bbox[2], d.bbox[3]) for d in walls)
    return max(MIN_OPEN_PX, OPEN_WALL_FACTOR * thickness)


def _longest_uncovered(seg: tuple[tuple[float, float], tuple[float, float]], covers: list[geo.Rect]) -> float:
    p, q = seg
    length = math.dist(p, q)
    lo, hi = min(p[0], q[0]), max(p[0], q[0])
    ylo, yhi = min(p[1], q[1]), max(p[1], q[1])
    covered: list[tuple[float, float]] = []
    for r in covers:
        if r[2] < lo or r[0] > hi or r[3] < ylo or r[1] > yhi:
            continue
        iv = geo.segment_in_rect(p, q, r)
        if iv is not None and iv[1] > iv[0]:
            covered.append((iv[0] * length, iv[1] * length))
    best = 0.0
    pos = 0.0
    for a, b in geo.merge_intervals(covered):
        best = max(best, a - pos)
        pos = max(pos, b)
    return max(best, length - pos)


def _separated_pair(rect: geo.Rect, hits: list[tuple[float, _Space]]) -> tuple[int, int] | None:
    """The two spaces a door/window separates: the largest overlap on each side of its long axis.

    A structure straddling a boundary has one space on each side; a long window on the outer
    wall that runs past a room corner touches two spaces on the same side and joins nothing.
    """
    x0, y0, x1, y1 = rect
    if x1 - x0 >= y1 - y0:
        cy = (y0 + y1) / 2
        halves = ((x0, y0, x1, cy), (x0, cy, x1, y1))
    else:
        cx = (x0 + x1) / 2
        halves = ((x0, y0, cx, y1), (cx, y0, x1, y1))
    sides: list[list[tuple[float, int]]] = [[], []]
    for _, s in hits:
        ov = [geo.rect_polygon_overlap(h, s.poly, s.bounds) for h in halves]
        side = 0 if ov[0] >= ov[1] else 1
        sides[side].append((ov[side], s.index))
    if not sides[0] or not sides[1]:
        return None
    a = min(sides[0], key=lambda t: (-t[0], t[1]))[1]
    b = min(sides[1], key=lambda t: (-t[0], t[1]))[1]
    return (min(a, b), max(a, b))


def build_topology(det: Detections) -> TopologyGraph:
    """The topology graph of one plan, deterministic for a given input."""
    # ------------------------------------------------------------------ spaces
    spaces: list[_Space] = []
    for d in sorted(det.spaces, key=_det_key):
        poly = geo.simplify(list(d.polygon or ()))
        if len(poly) < 3:
            poly = list(d.polygon or ())
        spaces.append(
            _Space(
                det=d,
                poly=poly,
                area=geo.area(poly),
                centroid=geo.centroid(poly),
                bounds=geo.bounds(poly),
            )
        )
    spaces.sort(
        key=lambda s: (
            vocab.CATEGORY_IDS[s.det.category_name],
            s.bounds[1],
            s.bounds[0],
            _id_key(s.det.id),
        )
    )
    for i, s in enumerate(spaces):
        s.index = i
        s.node_id = f"space_{i}"

    # ------------------------------------------------------------------ OCR and objects
    for d in sorted(det.ocr, key=_det_key):
        s = _smallest_containing(d.center, spaces)
        if s is not None:
            s.ocr.append(d)
    for d in sorted(det.objects, key=_det_key):
        s = _smallest_containing(d.center, spaces)
        if s is not None:
            s.objects.append(d)
    for s in spaces:
        _resolve_name(s)

    # ------------------------------------------------------------------ structures
    edges: list[tuple[int, int, str, str | None]] = []
    structures = sorted(det.structures, key=_det_key)
    for d in structures:
        rect = _structure_rect(d)
        thr = _overlap_threshold(rect)
        hits: list[tuple[float, _Space]] = []
        for s in spaces:
            ov = geo.rect_polygon_overlap(rect, s.poly, s.bounds)
            if ov > thr:
                hits.append((ov, s))
        for _, s in hits:
            {vocab.DOOR: s.doors, vocab.WINDOW: s.windows, vocab.WALL: s.walls}[d.category_name].append(d)
        if d.category_name in (vocab.DOOR, vocab.WINDOW) and len(hits) >= 2:
            pair = _separated_pair(rect, hits)
            if pair is not None:
                kind = "door" if d.category_name == vocab.DOOR else "window"
                edges.append((*pair, kind, str(d.id)))

    # ------------------------------------------------------------------ open edges
    walls = [d for d in structures if d.category_name == vocab.WALL]
    min_open = _open_threshold(walls)
    covers = []
    for d in structures:
        x0, y0, x1, y1 = _structure_rect(d)
        covers.append((x0 - COVER_TOL, y0 - COVER_TOL, x1 + COVER_TOL, y1 + COVER_TOL))
    for i, a in enumerate(spaces):
        for b in spaces[i + 1 :]:
            if not geo.rects_touch(a.bounds, b.bounds, SHARED_EDGE_TOL):
                continue
            segs = geo.shared_segments(a.poly, b.poly, SHARED_EDGE_TOL)
            if any(_longest_uncovered(seg, covers) >= min_open for seg in segs):
                edges.append((a.index, b.index, "open", None))

    edges.sort(key=lambda e: (e[0], e[1], _EDGE_TYPE_ORDER[e[2]], e[3] is not None, _id_str_key(e[3])))
    edge_models = [
        Edge(
            edge_id=f"edge_{k}",
            source_node=spaces[a].node_id,
            target_node=spaces[b].node_id,
            connection_type=kind,
            connection_id=cid,
        )
        for k, (a, b, kind, cid) in enumerate(edges)
    ]

    # ------------------------------------------------------------------ nodes
    inside = [s for s in spaces if not s.is_outside]
    total_inside = sum(s.area for s in inside)
    nodes = []
    for s in spaces:
        ratio = 0.0 if s.is_outside or total_inside <= 0 else s.area / total_inside * 100.0
        x0, y0, x1, y1 = s.bounds
        nodes.append(
            SpaceNode(
                node_id=s.node_id,
                category_id=vocab.CATEGORY_IDS[s.det.category_name],
                category_name=s.det.category_name,
                label=s.label,
                space_type=s.space_type,
                is_outside=s.is_outside,
                bbox=[_r(x0), _r(y0), _r(x1 - x0), _r(y1 - y0)],
                segmentation=[[_r(v) for p in s.poly for v in p]],
                area=_r(s.area),
                area_ratio=_r(ratio),
                centroid=[_r(s.centroid[0]), _r(s.centroid[1])],
                contains=Contains(
                    objects=[
                        ContainedObject(
                            object_id=str(o.id),
                            category_name=o.category_name,
                            bbox=[_r(v) for v in o.bbox],
                        )
                        for o in s.objects
                    ],
                    ocr_labels=[o.text for o in s.ocr if o.text],
                    structures=Structures(
                        doors=[_contained_structure(d) for d in s.doors],
                        windows=[_contained_structure(d) for d in s.windows],
                        walls=[_contained_structure(d) for d in s.walls],
                    ),
                ),
            )
        )

    stats = _statistics(det, spaces, inside, total_inside)
    return TopologyGraph(
        image_info=ImageInfo(file_name=det.image.file_name, width=det.image.width, height=det.image.height),
        nodes=nodes,
        edges=edge_models,
        statistics=stats,
        builder_version=BUILDER_VERSION,
    )


def _id_str_key(v: str | None) -> tuple[int, int | str]:
    if v is None:
        return (0, 0)
    try:
        return (0, int(v))
    except ValueError:
        return (1, v)


def _largest(spaces: list[_Space], name: str) -> _Space | None:
    cands = [s for s in spaces if s.canonical == name]
    if not cands:
        return None
    return min(cands, key=lambda s: (-s.area, s.index))


def structure_type(living: _Space | None, kitchen: _Space | None) -> str:
    """The team aggregator's order: a living room open on two perpendicular sides is 타워형
    before anything about the kitchen is looked at."""
    if living is None:
        return "혼합형"  # cannot be decided
    living_axes = {AXIS[window_direction(w, living.centroid)] for w in living.windows}
    if len(living_axes) == 2:
        return "타워형"
    ld = _main_direction(living)
    if ld is None or kitchen is None:
        return "혼합형"  # cannot be decided
    kd = _main_direction(kitchen)
    if kd is None or kd == ld:
        return "타워형"
    if OPPOSITE[ld] == kd:
        return "판상형"
    return "혼합형"  # perpendicular


def _pct(part: float, whole: float) -> float:
    return _r(part / whole * 100.0) if whole > 0 else 0.0


def _statistics(det: Detections, spaces: list[_Space], inside: list[_Space], total_inside: float) -> TopologyStatistics:
    living = _largest(inside, LIVING)
    kitchen = _largest(inside, KITCHEN)
    master = _largest(inside, BEDROOM)

    livings = [s for s in inside if s.canonical == LIVING]
    bedrooms = [s for s in inside if s.canonical == BEDROOM]
    if living is None:
        bay_count = 0
    else:
        ref = _main_direction(living)
        if ref is None:
            bay_count = len(livings)
        else:
            bay_count = len(livings) + sum(1 for s in bedrooms if _main_direction(s) == ref)

    counted = [s for s in inside if s.canonical != EXCLUDED_FROM_WINDOWLESS]
    windowless = sum(1 for s in counted if not s.windows)

    type_count = {t: 0 for t in vocab.SPACE_TYPES}
    for s in spaces:
        type_count[s.space_type] = type_count.get(s.space_type, 0) + 1

    def area_of(names) -> float:
        return sum(s.area for s in inside if s.canonical in names)

    return TopologyStatistics(
        total_image_area=_r(float(det.image.width * det.image.height)),
        total_space_area=_r(sum(s.area for s in spaces)),
        total_inside_area=_r(total_inside),
        space_count=len(spaces),
        inside_space_count=len(inside),
        room_count=len(bedrooms),
        bathroom_count=sum(1 for s in inside if s.canonical == BATHROOM),
        balcony_count=sum(1 for s in inside if s.canonical == BALCONY),
        bay_count=bay_count,
        space_type_count=SpaceTypeCount(**type_count),
        structure_type=structure_type(living, kitchen),
        balcony_ratio=_pct(area_of({BALCONY}), total_inside),
        windowless_ratio=_pct(windowless, len(counted)),
        ldk_ratio=_pct(area_of(vocab.LDK_NAMES), total_inside),
        storage_ratio=_pct(area_of(vocab.STORAGE_NAMES), total_inside),
        master_bedroom_has_window=None if master is None else bool(master.windows),
    )
