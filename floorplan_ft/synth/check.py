"""The generator's self check: the plan keeps the geometric conventions and its truth is what the
layout intended."""

from __future__ import annotations

from floorplan_ft.synth.geometry import Rect, overlaps
from floorplan_ft.synth.model import Opening, SynthPlan
from floorplan_ft.synth.truth import structure_type, truth_statistics


def self_check(plan: SynthPlan) -> list[str]:
    """Consistency of the layout model with the geometric conventions; [] when all is well."""
    return _geometry_problems(plan) + _truth_problems(plan)


def _geometry_problems(plan: SynthPlan) -> list[str]:
    """Spaces do not overlap; every door, window and wall overlaps exactly the spaces it separates;
    a window faces its side by geometry too; objects and OCR boxes lie inside their space."""
    problems: list[str] = []
    t = plan.wall_thickness
    rects = [sp.rect for sp in plan.spaces]
    for i in range(len(rects)):
        for j in range(i + 1, len(rects)):
            if overlaps(rects[i], rects[j]):
                problems.append(f"spaces {i},{j} overlap")
    for k, o in enumerate(plan.openings):
        if o.kind == "open":
            continue
        r = o.rect(t)
        hit = tuple(sp.idx for sp in plan.spaces if overlaps(r, sp.rect))
        if set(hit) != set(o.spaces):
            problems.append(f"{o.kind} {k} overlaps {hit}, expected {o.spaces}")
        if o.kind == "window":
            problems += _window_facing_problems(plan, k, o, r)
    for wseg in plan.walls:
        r = wseg.rect(t)
        hit = tuple(sp.idx for sp in plan.spaces if overlaps(r, sp.rect))
        if set(hit) != set(wseg.spaces):
            problems.append(f"wall {wseg} overlaps {hit}")
    for b in plan.objects + plan.ocr:
        x0, y0, x1, y1 = plan.spaces[b.space].rect
        if not (x0 <= b.rect[0] < b.rect[2] <= x1 and y0 <= b.rect[1] < b.rect[3] <= y1):
            problems.append(f"{b.category} outside its space {b.space}")
    return problems


def _window_facing_problems(plan: SynthPlan, k: int, o: Opening, r: Rect) -> list[str]:
    """Window ``k`` (rectangle ``r``) lies on the side of each of its spaces it faces by construction,
    clearly off the space's centre line."""
    problems: list[str] = []
    t = plan.wall_thickness
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
    return problems


def _truth_problems(plan: SynthPlan) -> list[str]:
    """The truth says what the layout intended (structure type unambiguous, bay count), main windows
    are strictly widest, the designated master is the largest bedroom."""
    problems: list[str] = []
    truth = truth_statistics(plan)
    sp_truth = truth["spaces"]
    livings = [d for d in sp_truth if d["name"] == "거실"]
    kitchens = [d for d in sp_truth if d["name"] == "주방"]
    _st, hits = structure_type(
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
