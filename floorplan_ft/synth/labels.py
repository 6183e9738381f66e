"""The category and label of every room: what the plan's OCR text says, drawn with the spellings
real plans use (침실2 / 방2, 화장실 / 욕실, 주방 / 키친, …)."""

from __future__ import annotations

import numpy as np

from floorplan_ft.synth.model import Cell, pick


def space_labels(rng: np.random.Generator, cells: list[Cell]) -> list[tuple[str, str, bool]]:
    """(category, label, has_ocr) for each cell."""
    out: list[tuple[str, str, bool]] = [("", "", True)] * len(cells)
    order = sorted(range(len(cells)), key=lambda i: (cells[i].x0, cells[i].y0))
    beds = [i for i in order if cells[i].role == "bedroom"]
    baths = [i for i in order if cells[i].role == "bath"]
    balconies = [i for i in order if cells[i].role == "balcony"]
    # bedrooms: master is 침실1
    k = 2
    for i in beds:
        if cells[i].is_master:
            lab = pick(rng, [("침실1", 0.6), ("안방", 0.3), ("마스터룸", 0.1)])
        else:
            stem = pick(rng, [("침실", 0.88), ("방", 0.08), ("룸", 0.04)])
            lab = f"{stem}{k}"
            k += 1
        out[i] = ("공간_침실", lab, True)
    for n, i in enumerate(baths, start=1):
        if cells[i].key == "ensuite":
            lab = pick(
                rng,
                [("부부욕실", 0.3), ("안방욕실", 0.15), (f"욕실{n}", 0.2), (f"화장실{n}", 0.35)],
            )
        elif len(baths) == 1:
            lab = pick(rng, [("화장실", 0.5), ("욕실", 0.25), ("공용욕실", 0.1), ("화장실1", 0.15)])
        else:
            lab = pick(rng, [(f"화장실{n}", 0.55), (f"욕실{n}", 0.3), ("공용욕실", 0.15)])
        out[i] = ("공간_화장실", lab, True)
    for n, i in enumerate(balconies, start=1):
        if len(balconies) == 1:
            lab = pick(rng, [("발코니", 0.7), ("베란다", 0.2), ("발코니1", 0.1)])
        else:
            lab = pick(rng, [(f"발코니{n}", 0.8), ("베란다", 0.1), ("서비스발코니", 0.1)])
        out[i] = ("공간_발코니", lab, True)
    for i, c in enumerate(cells):
        r = c.role
        if r in ("bedroom", "bath", "balcony"):
            continue
        if r == "living":
            out[i] = ("공간_거실", "거실", True)
        elif r == "kitchen":
            cat = "공간_주방및식당" if rng.random() < 0.6 else "공간_주방"
            lab = pick(rng, [("주방", 0.45), ("주방및식당", 0.2), ("키친", 0.2), ("식당", 0.15)])
            out[i] = (cat, lab, True)
        elif r == "entrance":
            out[i] = ("공간_현관", "현관", True)
        elif r == "dress":
            lab = pick(rng, [("드레스룸", 0.7), ("옷방", 0.2), ("워크인클로짓", 0.1)])
            out[i] = ("공간_드레스룸", lab, True)
        elif r == "pantry":
            cat = "공간_다목적공간" if rng.random() < 0.5 else "공간_기타"
            out[i] = (cat, "팬트리", True)
        elif r == "utility":
            out[i] = ("공간_다목적공간", pick(rng, [("다용도실", 0.7), ("세탁실", 0.3)]), True)
        elif r == "alpha":
            out[i] = ("공간_다목적공간", "알파룸", True)
        elif r == "ac":
            lab = pick(rng, [("실외기실", 0.7), ("실외기룸", 0.15), ("에어컨실", 0.15)])
            out[i] = ("공간_실외기실", lab, True)
        elif r == "corridor":
            out[i] = ("공간_기타", "기타", False)
        elif r == "hall":
            lab = pick(rng, [("엘리베이터홀", 0.55), ("EV홀", 0.2), ("엘베홀", 0.15), ("승강기홀", 0.1)])
            out[i] = ("공간_엘리베이터홀", lab, True)
        elif r == "stair":
            out[i] = ("공간_계단실", "계단실", True)
        else:  # pragma: no cover
            raise ValueError(r)
    return out
