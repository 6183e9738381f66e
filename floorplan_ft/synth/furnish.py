"""Fixtures (toilet, basin, bath, sink, hob) and the OCR box of every space."""

from __future__ import annotations

import math

import numpy as np

from floorplan_ft import vocab
from floorplan_ft.synth.geometry import overlaps
from floorplan_ft.synth.model import PlacedBox, SynthSpace


def _text_units(text: str) -> float:
    """Width of ``text`` in font sizes (Hangul a full em, Latin and digits narrower)."""
    return sum(1.0 if ord(ch) >= 0x1100 else 0.62 for ch in text)


def furnish(
    rng: np.random.Generator, spaces: list[SynthSpace], s: float, t: int
) -> tuple[list[PlacedBox], list[PlacedBox]]:
    """(objects, OCR boxes) of all spaces; ``s`` pixels per meter, ``t`` the wall thickness."""
    objects: list[PlacedBox] = []
    ocr: list[PlacedBox] = []
    pad = t // 2 + max(3, round(0.08 * s))
    for sp in spaces:
        x0, y0, x1, y1 = sp.rect
        ix0, iy0, ix1, iy1 = x0 + pad, y0 + pad, x1 - pad, y1 - pad
        iw, ih = ix1 - ix0, iy1 - iy0
        mine: list[tuple[str, tuple[int, int, int, int], bool]] = []  # (cat, rect, optional)

        def box(w_m: float, h_m: float) -> tuple[int, int]:
            return round(w_m * s), round(h_m * s)

        if sp.role == "bath":
            tw, th = box(0.42, 0.68)
            sw, sh = box(0.55, 0.45)
            if tw + sw + int(0.1 * s) <= iw and th <= ih // 2:
                if rng.random() < 0.5:
                    mine.append(("객체_변기", (ix0, iy0, ix0 + tw, iy0 + th), False))
                    mine.append(("객체_세면대", (ix1 - sw, iy0, ix1, iy0 + sh), False))
                else:
                    mine.append(("객체_세면대", (ix0, iy0, ix0 + sw, iy0 + sh), False))
                    mine.append(("객체_변기", (ix1 - tw, iy0, ix1, iy0 + th), False))
            bw, bh = box(1.5, 0.72)
            if bw <= iw and ih >= int(2.3 * s) and rng.random() < 0.6:
                bx = ix0 if rng.random() < 0.5 else ix1 - bw
                mine.append(("객체_욕조", (bx, iy1 - bh, bx + bw, iy1), True))
        elif sp.role == "kitchen":
            kw_, kh = box(min(1.9, iw / s * 0.55), 0.6)
            gw, gh = box(0.6, 0.58)
            if kw_ + gw + 4 <= iw and kh <= ih // 3:
                if rng.random() < 0.5:
                    mine.append(("객체_싱크대", (ix0, iy0, ix0 + kw_, iy0 + kh), False))
                    mine.append(
                        (
                            "객체_가스레인지",
                            (ix0 + kw_ + 4, iy0, ix0 + kw_ + 4 + gw, iy0 + gh),
                            True,
                        )
                    )
                else:
                    mine.append(("객체_싱크대", (ix1 - kw_, iy0, ix1, iy0 + kh), False))
                    mine.append(
                        (
                            "객체_가스레인지",
                            (ix1 - kw_ - 4 - gw, iy0, ix1 - kw_ - 4, iy0 + gh),
                            True,
                        )
                    )
        # OCR box at the centre of what is left
        if sp.has_ocr:
            fs = round(min(max(0.3 * s, 12), 40))
            units = _text_units(sp.label)
            while fs > 8 and (units * fs > 0.9 * iw or 1.3 * fs > 0.5 * ih):
                fs -= 1
            bw_, bh_ = math.ceil(units * fs), math.ceil(1.3 * fs)
            cx, cy = (ix0 + ix1) // 2, (iy0 + iy1) // 2
            tops = [r for _, r, _ in mine if r[1] == iy0]
            if tops:  # keep clear of the fixtures along the top wall
                cy = max(cy, max(r[3] for r in tops) + bh_ // 2 + 4)
            orect = (cx - bw_ // 2, cy - bh_ // 2, cx - bw_ // 2 + bw_, cy - bh_ // 2 + bh_)
            if orect[3] > iy1:
                orect = (orect[0], iy1 - bh_, orect[2], iy1)
            mine = [m for m in mine if not (m[2] and overlaps(m[1], orect))]
            if any(overlaps(m[1], orect) for m in mine):
                mine = []
            ocr.append(PlacedBox(vocab.OCR_CATEGORY, sp.idx, orect, sp.label))
        for cat, r, _opt in mine:
            objects.append(PlacedBox(cat, sp.idx, r))
    return objects, ocr
