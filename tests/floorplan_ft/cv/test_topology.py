"""Topology builder on hand-built COCO fixtures (DOMAIN.md definitions)."""

from __future__ import annotations

import copy
import json
import random

import pytest

from floorplan_ft import vocab
from floorplan_ft.cv import (
    BUILDER_VERSION,
    build_topology,
    detections_from_coco,
    render_overlay,
)
from floorplan_ft.schemas import TopologyGraph

T = 10  # wall thickness, px


class Plan:
    """Tiny COCO builder: rectangles in image coordinates (y down)."""

    def __init__(self, file_name: str = "T01_0001.png", width: int = 800, height: int = 600):
        self.image = {"id": 1, "file_name": file_name, "width": width, "height": height}
        self.anns: list[dict] = []

    def _add(self, cat, bbox, seg=None, **attrs) -> int:
        ann_id = len(self.anns) + 1
        ann = {
            "id": ann_id,
            "image_id": 1,
            "category_id": vocab.CATEGORY_IDS[cat],
            "bbox": [float(v) for v in bbox],
            "area": float(bbox[2] * bbox[3]),
            "attributes": attrs,
        }
        if seg is not None:
            ann["segmentation"] = seg
        self.anns.append(ann)
        return ann_id

    def space(self, name, x0, y0, x1, y1, ocr: str | None = None) -> int:
        seg = [[x0, y0, x1, y0, x1, y1, x0, y1]]
        ann_id = self._add(f"공간_{name}", [x0, y0, x1 - x0, y1 - y0], seg)
        if ocr is not None:
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            self._add(vocab.OCR_CATEGORY, [cx - 20, cy - 8, 40, 16], text=ocr)
        return ann_id

    def poly_space(self, name, pts) -> int:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        seg = [[v for p in pts for v in p]]
        return self._add(f"공간_{name}", [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)], seg)

    def _struct(self, cat, x0, y0, x1, y1, extend=0.0, **attrs) -> int:
        """A thin rectangle centred on the segment (x0,y0)-(x1,y1) (horizontal or vertical),
        `extend` px longer at both ends."""
        if y0 == y1:
            box = [x0 - extend, y0 - T / 2, x1 - x0 + 2 * extend, T]
        else:
            box = [x0 - T / 2, y0 - extend, T, y1 - y0 + 2 * extend]
        x, y, w, h = box
        return self._add(cat, box, [[x, y, x + w, y, x + w, y + h, x, y + h]], **attrs)

    def window(self, *seg) -> int:
        return self._struct(vocab.WINDOW, *seg, subtype="fixed")

    def door(self, *seg) -> int:
        return self._struct(vocab.DOOR, *seg, subtype="여닫이")

    def wall(self, *seg) -> int:
        # walls run T/2 past their ends, so they overlap the corners of neighbouring spaces
        return self._struct(vocab.WALL, *seg, extend=T / 2)

    def obj(self, name, cx, cy) -> int:
        return self._add(f"객체_{name}", [cx - 10, cy - 10, 20, 20])

    def coco(self) -> dict:
        return {
            "images": [self.image],
            "categories": [
                {"id": i, "name": n, "supercategory": n.split("_")[0]} for n, i in vocab.CATEGORY_IDS.items()
            ],
            "annotations": copy.deepcopy(self.anns),
        }

    def build(self):
        return build_topology(detections_from_coco(self.coco(), self.image["file_name"]))


def node_by_label(graph, label):
    hits = [n for n in graph.nodes if n.label == label]
    assert len(hits) == 1, [n.label for n in graph.nodes]
    return hits[0]


def edges_between(graph, a, b):
    ids = {a.node_id, b.node_id}
    return [e for e in graph.edges if {e.source_node, e.target_node} == ids]


# --------------------------------------------------------------------------- fixtures


def flat_plan() -> Plan:
    """판상형: kitchen faces N, living room faces S; two S bays.

    y 0..200:   주방(0-300) N window | 화장실(300-450) | 침실2(450-600) N window
    y 200..400: 거실(0-300) S window | 침실1(300-600) S window
    The kitchen and living room are open to each other; everything else is walled.
    """
    p = Plan()
    p.space("주방및식당", 0, 0, 300, 200, ocr="주방")
    p.space("화장실", 300, 0, 450, 200, ocr="욕실")
    p.space("침실", 450, 0, 600, 200, ocr="침실2")
    p.space("거실", 0, 200, 300, 400, ocr="거실")
    p.space("침실", 300, 200, 600, 400, ocr="안방")
    p.window(50, 0, 250, 0)
    p.window(480, 0, 570, 0)
    p.window(50, 400, 250, 400)
    p.window(350, 400, 550, 400)
    # inner walls
    p.wall(300, 0, 300, 200)
    p.wall(450, 0, 450, 200)
    p.wall(300, 200, 600, 200)
    p.wall(300, 200, 300, 300)
    p.door(300, 300, 300, 380)  # living ↔ 침실1
    p.door(340, 200, 420, 200)  # bathroom ↔ 침실1
    p.obj("변기", 350, 60)
    p.obj("세면대", 420, 60)
    p.obj("싱크대", 150, 40)
    return p


def tower_plan() -> Plan:
    """타워형: the living room has N and E windows; the kitchen (west) faces W."""
    p = Plan()
    p.space("주방", 0, 0, 200, 300)
    p.space("거실", 200, 0, 600, 300)
    p.space("침실", 200, 300, 600, 500)
    p.wall(200, 0, 200, 300)
    p.door(200, 120, 200, 200)
    p.wall(200, 300, 600, 300)
    p.door(250, 300, 330, 300)
    p.window(0, 50, 0, 250)  # kitchen, W
    p.window(600, 50, 600, 250)  # living, E (200 long)
    p.window(250, 0, 550, 0)  # living, N (300 long, the main window)
    p.window(250, 500, 550, 500)  # bedroom, S
    return p


def test_flat_plan_statistics_and_nodes():
    g = Plan.build(flat_plan())
    TopologyGraph.model_validate(g.model_dump())
    s = g.statistics
    assert s.structure_type == "판상형"
    assert s.room_count == 2
    assert s.bathroom_count == 1
    assert s.bay_count == 2  # living room + 침실1 (S); 침실2 faces N
    assert s.windowless_ratio == 20.0  # the bathroom, 1 of 5
    assert s.space_count == s.inside_space_count == 5
    assert s.total_inside_area == 600 * 400
    assert s.ldk_ratio == 50.0
    assert s.balcony_ratio == 0.0
    assert s.master_bedroom_has_window is True
    assert s.space_type_count.습식공간 == 2
    assert s.space_type_count.개인공간 == 2
    assert s.space_type_count.공통공간 == 1
    assert g.builder_version == BUILDER_VERSION

    # node ids follow the vocab category order, then y, then x
    assert [n.node_id for n in g.nodes] == [f"space_{i}" for i in range(5)]
    assert [n.category_name for n in g.nodes] == [
        "공간_거실",
        "공간_침실",
        "공간_침실",
        "공간_주방및식당",
        "공간_화장실",
    ]
    bath = node_by_label(g, "욕실")
    assert bath.space_type == "습식공간"
    assert sorted(o.category_name for o in bath.contains.objects) == ["객체_변기", "객체_세면대"]
    assert bath.contains.ocr_labels == ["욕실"]
    master = node_by_label(g, "안방")
    assert master.space_type == "개인공간"
    assert master.area == 60000.0
    assert master.area_ratio == 25.0
    assert master.centroid == [450.0, 300.0]
    assert master.bbox == [300.0, 200.0, 300.0, 200.0]
    assert len(master.contains.structures.doors) == 2
    assert len(master.contains.structures.windows) == 1
    assert master.contains.structures.doors[0].subtype == "여닫이"


def test_flat_plan_edges():
    g = Plan.build(flat_plan())
    living, kitchen = node_by_label(g, "거실"), node_by_label(g, "주방")
    master, bath = node_by_label(g, "안방"), node_by_label(g, "욕실")
    bed2 = node_by_label(g, "침실2")
    assert [e.connection_type for e in edges_between(g, living, kitchen)] == ["open"]
    assert edges_between(g, living, kitchen)[0].connection_id is None
    lm = edges_between(g, living, master)
    assert [e.connection_type for e in lm] == ["door"]
    assert lm[0].connection_id == "19"  # the annotation id of the door
    assert [e.connection_type for e in edges_between(g, bath, master)] == ["door"]
    # walled, no door: no edge
    assert edges_between(g, bath, bed2) == []
    assert edges_between(g, kitchen, bath) == []
    assert edges_between(g, bed2, master) == []
    order = {n.node_id: i for i, n in enumerate(g.nodes)}
    for i, e in enumerate(g.edges):
        assert e.edge_id == f"edge_{i}"
        assert order[e.source_node] < order[e.target_node]
    # a wall running past a corner does not belong to the space beyond the corner
    wall_ids = {w.structure_id for w in kitchen.contains.structures.walls}
    assert wall_ids == {"15"}  # the x=300 wall only; not the y=200 wall starting at x=300


def test_tower_plan_living_with_two_perpendicular_windows():
    p = tower_plan()
    g = p.build()
    living = node_by_label(g, "거실")
    assert len(living.contains.structures.windows) == 2
    assert g.statistics.structure_type == "타워형"
    assert g.statistics.bay_count == 1  # bedroom faces S, living N


def test_tower_plan_kitchen_without_window():
    p = Plan()
    p.space("거실", 0, 0, 300, 200)
    p.space("주방", 300, 0, 500, 200)
    p.window(50, 200, 250, 200)  # living, S
    g = p.build()
    assert g.statistics.structure_type == "타워형"
    assert g.statistics.windowless_ratio == 50.0
    kitchen = node_by_label(g, "주방")
    living = node_by_label(g, "거실")
    # no wall between them: open
    assert [e.connection_type for e in edges_between(g, living, kitchen)] == ["open"]
    assert kitchen.contains.structures.windows == []


def test_tower_plan_same_direction():
    p = Plan()
    p.space("거실", 0, 0, 300, 200)
    p.space("주방", 300, 0, 500, 200)
    p.wall(300, 0, 300, 200)
    p.window(50, 200, 250, 200)  # living, S
    p.window(350, 200, 450, 200)  # kitchen, S
    g = p.build()
    assert g.statistics.structure_type == "타워형"
    assert g.edges == []


def test_mixed_plan_perpendicular_and_undecidable():
    p = Plan()
    p.space("거실", 0, 0, 300, 200)
    p.space("주방", 300, 0, 500, 200)
    p.wall(300, 0, 300, 200)
    p.window(50, 200, 250, 200)  # living, S
    p.window(500, 40, 500, 160)  # kitchen, E
    assert p.build().statistics.structure_type == "혼합형"

    q = Plan()  # no living room: cannot be decided
    q.space("주방", 0, 0, 300, 200)
    q.space("침실", 300, 0, 500, 200)
    q.window(50, 0, 250, 0)
    g = q.build()
    assert g.statistics.structure_type == "혼합형"
    assert g.statistics.bay_count == 0

    r = Plan()  # living room without a window; kitchen has one
    r.space("거실", 0, 0, 300, 200)
    r.space("주방", 300, 0, 500, 200)
    r.window(350, 0, 450, 0)
    g = r.build()
    assert g.statistics.structure_type == "혼합형"
    assert g.statistics.bay_count == 1  # a windowless living room: the number of living rooms

    u = Plan()  # neither has a window: undecidable wins over "kitchen has no window"
    u.space("거실", 0, 0, 300, 200)
    u.space("주방", 300, 0, 500, 200)
    assert u.build().statistics.structure_type == "혼합형"

    v = Plan()  # corner living room, no kitchen: 타워형 all the same (the team's order)
    v.space("거실", 0, 0, 300, 200)
    v.window(50, 200, 250, 200)
    v.window(0, 50, 0, 150)
    assert v.build().statistics.structure_type == "타워형"


def test_tower_before_flat_when_living_room_is_open_on_two_sides():
    """Living room open S and W, kitchen facing N (opposite the living room's main window):
    판상형 by the old order, 타워형 by the team aggregator's, which tests two open sides first."""
    p = Plan()
    p.space("거실", 0, 0, 300, 200)
    p.space("주방", 300, 0, 500, 200)
    p.wall(300, 0, 300, 200)
    p.window(30, 200, 270, 200)  # living, S (the main window: longest)
    p.window(0, 60, 0, 140)  # living, W
    p.window(350, 0, 450, 0)  # kitchen, N
    assert p.build().statistics.structure_type == "타워형"
    q = Plan()  # the same plan without the side window is 판상형
    q.space("거실", 0, 0, 300, 200)
    q.space("주방", 300, 0, 500, 200)
    q.wall(300, 0, 300, 200)
    q.window(30, 200, 270, 200)
    q.window(350, 0, 450, 0)
    assert q.build().statistics.structure_type == "판상형"


def test_window_edge_room_balcony_and_bays():
    """Bedroom and living room open onto a south balcony through windows."""
    p = Plan()
    p.space("거실", 0, 0, 300, 200)
    p.space("침실", 300, 0, 500, 200)
    p.space("발코니", 0, 200, 500, 260)
    p.space("주방", 0, -200, 300, 0)
    p.wall(300, 0, 300, 200)
    p.wall(0, 200, 500, 200)
    p.wall(0, 0, 300, 0)
    p.door(100, 0, 180, 0)
    w1 = p.window(40, 200, 260, 200)  # living ↔ balcony
    w2 = p.window(340, 200, 460, 200)  # bedroom ↔ balcony
    p.window(20, 260, 480, 260)  # balcony, S outer
    p.window(50, -200, 250, -200)  # kitchen, N
    g = p.build()
    living, bed = node_by_label(g, "거실"), node_by_label(g, "침실")
    balcony, kitchen = node_by_label(g, "발코니"), node_by_label(g, "주방")
    e = edges_between(g, living, balcony)
    assert [x.connection_type for x in e] == ["window"] and e[0].connection_id == str(w1)
    e = edges_between(g, bed, balcony)
    assert [x.connection_type for x in e] == ["window"] and e[0].connection_id == str(w2)
    assert [x.connection_type for x in edges_between(g, living, kitchen)] == ["door"]
    assert edges_between(g, living, bed) == []
    s = g.statistics
    assert s.bay_count == 2
    assert s.structure_type == "판상형"
    assert s.balcony_count == 1
    assert s.balcony_ratio == pytest.approx(round(500 * 60 / (500 * 260 + 300 * 200) * 100, 2))
    assert s.windowless_ratio == 0.0
    # the balcony's main window is the long outer one (S); the shared one faces N for it
    assert len(balcony.contains.structures.windows) == 3


def test_outside_spaces_excluded_from_ratios():
    p = Plan()
    p.space("거실", 0, 0, 400, 300)
    p.space("현관", 400, 200, 500, 300)
    p.space("엘리베이터홀", 500, 200, 700, 300)
    p.space("계단실", 500, 0, 700, 200)
    p.wall(500, 0, 500, 300)
    d = p.door(500, 220, 500, 280)
    p.window(50, 300, 350, 300)
    g = p.build()
    s = g.statistics
    hall, entry = node_by_label(g, "엘리베이터홀"), node_by_label(g, "현관")
    stairs = node_by_label(g, "계단실")
    assert hall.is_outside and stairs.is_outside and not entry.is_outside
    assert hall.space_type == stairs.space_type == "외부공간"
    assert hall.area_ratio == 0.0 and stairs.area_ratio == 0.0
    assert s.space_count == 4 and s.inside_space_count == 2
    assert s.total_inside_area == 400 * 300 + 100 * 100
    assert s.total_space_area == s.total_inside_area + 200 * 100 + 200 * 200
    assert s.windowless_ratio == 50.0  # 현관 only; outside spaces not counted
    assert s.space_type_count.외부공간 == 2
    assert sum(n.area_ratio for n in g.nodes) == pytest.approx(100.0, abs=0.02)
    e = edges_between(g, entry, hall)
    assert [x.connection_type for x in e] == ["door"] and e[0].connection_id == str(d)
    # 거실 and 현관 touch along x=400, y 200..300 with no wall: open
    assert [x.connection_type for x in edges_between(g, node_by_label(g, "거실"), entry)] == ["open"]


def test_ocr_synonyms_refine_classes():
    p = Plan()
    p.space("다목적공간", 0, 0, 200, 200, ocr="안방")
    p.space("다목적공간", 200, 0, 300, 200, ocr="팬트리")
    p.space("다목적공간", 300, 0, 400, 200)
    p.space("기타", 400, 0, 500, 200)
    p.space("기타", 500, 0, 600, 200, ocr="알파룸")
    p.space("거실", 0, 200, 600, 400, ocr="거실")
    p.window(50, 0, 150, 0)
    g = p.build()
    master = node_by_label(g, "안방")
    assert master.space_type == "개인공간"
    assert node_by_label(g, "팬트리").space_type == "특화공간"
    assert node_by_label(g, "알파룸").space_type == "특화공간"
    assert node_by_label(g, "다목적공간").space_type == "미분류"
    assert node_by_label(g, "기타").space_type == "미분류"
    s = g.statistics
    assert s.room_count == 1
    assert s.master_bedroom_has_window is True
    assert s.storage_ratio == pytest.approx(round(100 * 200 / (600 * 400) * 100, 2))
    # 6 spaces, 기타 excluded → 5 counted; only the 안방 has a window
    assert s.windowless_ratio == 80.0


def test_ocr_agreeing_with_category_wins_and_no_bedroom_window():
    p = Plan()
    p.space("침실", 0, 0, 300, 200)
    p._add(vocab.OCR_CATEGORY, [20, 20, 40, 16], text="드레스룸")
    p._add(vocab.OCR_CATEGORY, [200, 150, 40, 16], text=" 침실 3 ")
    g = p.build()
    (n,) = g.nodes
    assert n.label == "침실 3"
    assert n.space_type == "개인공간"
    assert n.contains.ocr_labels == ["드레스룸", "침실 3"]
    assert g.statistics.room_count == 1
    assert g.statistics.master_bedroom_has_window is False

    q = Plan()
    q.space("거실", 0, 0, 300, 200)
    assert q.build().statistics.master_bedroom_has_window is None


def test_non_rectangular_space_and_bbox_only_space():
    p = Plan()
    # L-shaped living room: 300x300 minus the top-right 100x100
    p.poly_space("거실", [(0, 0), (200, 0), (200, 100), (300, 100), (300, 300), (0, 300)])
    p._add("공간_침실", [300, 100, 200, 200])  # bbox only
    g = p.build()
    living = node_by_label(g, "거실")
    assert living.area == 80000.0
    assert living.centroid == [137.5, 162.5]
    bed = node_by_label(g, "침실")
    assert bed.segmentation == [[300.0, 100.0, 500.0, 100.0, 500.0, 300.0, 300.0, 300.0]]
    assert [e.connection_type for e in edges_between(g, living, bed)] == ["open"]


def test_short_uncovered_boundary_is_not_open():
    p = Plan()
    p.space("거실", 0, 0, 300, 200)
    p.space("침실", 300, 0, 500, 200)
    p.wall(300, 0, 300, 190)  # leaves 10 px uncovered (< 20 px)
    g = p.build()
    assert g.edges == []


def test_determinism_and_annotation_order_independence():
    plan = flat_plan()
    g1 = plan.build().model_dump_json()
    g2 = plan.build().model_dump_json()
    assert g1 == g2
    coco = plan.coco()
    random.Random(7).shuffle(coco["annotations"])
    g3 = build_topology(detections_from_coco(coco, "T01_0001.png")).model_dump_json()
    assert g3 == g1
    data = json.loads(g1)
    TopologyGraph.model_validate(data)
    assert "-0.0" not in g1


# --------------------------------------------------------------------------- input handling


def test_whole_set_coco_selects_by_file_name_or_stem():
    a, b = flat_plan().coco(), tower_plan().coco()
    b["images"][0].update(id=2, file_name="T01_0002.PNG")
    for ann in b["annotations"]:
        ann["image_id"] = 2
        ann["id"] += 1000
    whole = {
        "images": a["images"] + b["images"],
        "categories": a["categories"],
        "annotations": a["annotations"] + b["annotations"],
    }
    d1 = detections_from_coco(whole, "T01_0001.png")
    assert len(d1.detections) == len(a["annotations"])
    d2 = detections_from_coco(whole, "images/T01_0002.png")  # stem match, case-insensitive ext
    assert d2.image.file_name == "T01_0002.PNG"
    assert {d.id for d in d2.detections} == {x["id"] for x in b["annotations"]}
    with pytest.raises(ValueError, match="T01_0003"):
        detections_from_coco(whole, "T01_0003.png")
    with pytest.raises(ValueError, match="image_file_name"):
        detections_from_coco(whole, None)
    # a per-image file needs no name
    assert detections_from_coco(a).image.file_name == "T01_0001.png"


def test_detections_fields():
    det = detections_from_coco(flat_plan().coco(), "T01_0001.png")
    ocr = [d for d in det.detections if d.is_ocr]
    assert {d.text for d in ocr} == {"주방", "욕실", "침실2", "거실", "안방"}
    obj = det.objects[0]
    assert obj.polygon == ((340.0, 50.0), (360.0, 50.0), (360.0, 70.0), (340.0, 70.0))
    door = next(d for d in det.structures if d.category_name == vocab.DOOR)
    assert door.subtype == "여닫이"


def test_error_unknown_category_named():
    coco = flat_plan().coco()
    coco["categories"].append({"id": 99, "name": "공간_펜트하우스"})
    coco["annotations"][0]["category_id"] = 99
    with pytest.raises(ValueError, match="공간_펜트하우스.*strict_categories"):
        detections_from_coco(coco, "T01_0001.png", strict_categories=True)


def test_error_degenerate_polygon_names_annotation():
    coco = flat_plan().coco()
    coco["annotations"][2]["segmentation"] = [[0, 0, 10, 10]]
    with pytest.raises(ValueError, match=r"annotation 3\b.*degenerate"):
        detections_from_coco(coco, "T01_0001.png")
    coco["annotations"][2]["segmentation"] = [[0, 0, 10, 10, 20, 20]]  # collinear: zero area
    with pytest.raises(ValueError, match=r"annotation 3\b.*zero area"):
        detections_from_coco(coco, "T01_0001.png")
    coco["annotations"][2]["segmentation"] = []
    coco["annotations"][2]["bbox"] = [5, 5, 0, 10]
    with pytest.raises(ValueError, match=r"annotation 3\b.*degenerate"):
        detections_from_coco(coco, "T01_0001.png")


def test_largest_ring_is_used():
    coco = flat_plan().coco()
    coco["annotations"][0]["segmentation"] = [
        [0, 0, 10, 0, 10, 10, 0, 10],
        [0, 0, 300, 0, 300, 200, 0, 200],
    ]
    det = detections_from_coco(coco, "T01_0001.png")
    assert len(det.detections[0].polygon) == 4
    assert det.detections[0].polygon[2] == (300.0, 200.0)


def test_error_missing_keys_and_image():
    coco = flat_plan().coco()
    with pytest.raises(ValueError, match="'annotations'"):
        detections_from_coco({"images": coco["images"]}, "T01_0001.png")
    with pytest.raises(ValueError, match="'images'"):
        detections_from_coco({"annotations": []}, "T01_0001.png")
    bad = copy.deepcopy(coco)
    del bad["annotations"][4]["bbox"]
    del bad["annotations"][4]["segmentation"]
    with pytest.raises(ValueError, match=r"annotation 5 .*'bbox'"):
        detections_from_coco(bad, "T01_0001.png")
    bad = copy.deepcopy(coco)
    bad["annotations"][1]["category_id"] = 777
    with pytest.raises(ValueError, match="777"):
        detections_from_coco(bad, "T01_0001.png", strict_categories=True)
    with pytest.raises(ValueError, match="other.png"):
        detections_from_coco(coco, "other.png")


def test_overlay_renders(tmp_path):
    plan = flat_plan()
    g = plan.build()
    out = render_overlay(g, None, tmp_path / "overlay.png")
    assert out.exists() and out.stat().st_size > 0
    from PIL import Image

    img = tmp_path / "plan.png"
    Image.new("RGB", (800, 600), "white").save(img)
    out2 = render_overlay(g.model_dump(), img, tmp_path / "o2.png")
    with Image.open(out2) as im:
        assert im.size == (800, 600)


def test_facade_window_spanning_two_rooms_is_not_an_edge():
    p = Plan()
    p.space("거실", 0, 0, 300, 200)
    p.space("침실", 300, 0, 500, 200)
    p.wall(300, 0, 300, 200)
    p.window(100, 200, 450, 200)  # one long S window across both rooms' façade
    g = p.build()
    assert g.edges == []
    assert all(len(n.contains.structures.windows) == 1 for n in g.nodes)
    assert g.statistics.bay_count == 2
