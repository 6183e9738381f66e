"""The team CV's detection dialect (their low_result / per-model annotations) builds a graph."""

import pytest

from floorplan_ft import vocab
from floorplan_ft.cv import build_topology, detections_from_coco

# Their category ids (detector config), a few of them; the file is hand-written, ours.
CATEGORIES = [{"id": i, "name": n} for n, i in vocab.TEAM_CATEGORY_IDS.items()] + [{"id": 99, "name": "공간_옥상정원"}]


def _rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _ann(i, cat, bbox, seg=None, **attrs):
    x, y, w, h = bbox
    return {
        "id": i,
        "image_id": 1,
        "category_id": vocab.TEAM_CATEGORY_IDS.get(cat, 99),
        "bbox": bbox,
        "segmentation": seg if seg is not None else _rect(x, y, x + w, y + h),
        "attributes": attrs,
    }


def team_coco():
    # Each of their four models numbers from 0: ids repeat across OBJ, OCR, STR and SPA.
    obj = [_ann(0, "객체_싱크대", [320, 40, 40, 20], seg=[])]
    ocr = [
        _ann(0, "OCR", [120, 90, 40, 20], seg=[], OCR="거실"),
        _ann(1, "OCR", [380, 90, 40, 20], seg=[], OCR="주방"),
        _ann(2, "OCR", [560, 30, 40, 20], seg=[], OCR="EV"),
    ]
    structures = [
        _ann(0, "구조_창호", [50, 196, 200, 8], subcat="이중창"),  # living, S
        _ann(1, "구조_창호", [-4, 50, 8, 100], subcat="고정창"),  # living, W
        _ann(2, "구조_창호", [350, -4, 100, 8], subcat="이중창"),  # kitchen, N
        _ann(3, "구조_벽체", [296, 0, 8, 200]),
        _ann(4, "구조_출입문", [500, 80, 8, 40], subcat="여닫이문"),
    ]
    spaces = [
        _ann(0, "공간_거실", [0, 0, 300, 200]),
        _ann(1, "공간_주방", [300, 0, 200, 200]),
        _ann(2, "공간_엘리베이터", [500, 0, 120, 120]),
        _ann(3, "background", [0, 0, 700, 300]),
        _ann(4, "공간_옥상정원", [620, 0, 50, 50]),
    ]
    return {
        "images": [{"id": 1, "file_name": "APT_FP_SPA_000000001.PNG", "width": 700, "height": 300}],
        "categories": CATEGORIES,
        "annotations": obj + ocr + structures + spaces,
    }


def test_team_dialect_builds_a_graph():
    det = detections_from_coco(team_coco())
    ids = [d.id for d in det.detections]
    assert len(ids) == len(set(ids)) == 12  # 14 annotations less background and the unknown one
    assert ids[:4] == [0, "0~1", 1, 2]  # repeats renamed by occurrence, in file order
    assert {d.text for d in det.ocr} == {"거실", "주방", "EV"}
    assert {d.subtype for d in det.structures if d.category_name == vocab.WINDOW} == {"이중창", "고정창"}
    assert [s.category for s in det.skipped] == ["공간_옥상정원"]
    assert det.skipped_summary() == {"count": 1, "by_category": {"공간_옥상정원": 1}}
    assert det.detections == detections_from_coco(team_coco()).detections  # deterministic

    graph = build_topology(det)
    by_label = {n.label: n for n in graph.nodes}
    assert set(by_label) == {"거실", "주방", "EV"}
    assert by_label["EV"].category_name == vocab.ELEVATOR_CATEGORY
    assert by_label["EV"].is_outside and by_label["EV"].space_type == vocab.OUTSIDE
    assert by_label["거실"].area_ratio + by_label["주방"].area_ratio == pytest.approx(100.0)
    # Living room open S and W, kitchen facing N: 타워형 in the team's order, not 판상형.
    assert graph.statistics.structure_type == "타워형"
    windows = by_label["거실"].contains.structures.windows
    assert sorted(w.subtype for w in windows) == ["고정창", "이중창"]
    assert by_label["주방"].contains.objects[0].category_name == "객체_싱크대"


def test_unknown_category_rejects_the_plan_when_strict():
    with pytest.raises(ValueError, match=r"annotation 4~1: unknown category '공간_옥상정원'.*strict"):
        detections_from_coco(team_coco(), strict_categories=True)
