"""True statistics of a plan, from the generator's own layout model (`truth/{stem}.json`)."""

from __future__ import annotations

import json
import os
from typing import Any

from floorplan_ft import vocab
from floorplan_ft.synth.model import SynthPlan

_OPPOSITE = {"S": "N", "N": "S", "E": "W", "W": "E"}


def structure_type(living: dict | None, kitchen: dict | None) -> tuple[str, set[str]]:
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
    structure, _hits = structure_type(main_info(livings), main_info(kitchens))
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
