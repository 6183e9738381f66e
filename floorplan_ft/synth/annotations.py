"""The plan's COCO annotations (`annotations/{stem}.json`, docs/data-formats.md)."""

from __future__ import annotations

from typing import Any

from floorplan_ft import vocab
from floorplan_ft.synth.model import SynthPlan


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
