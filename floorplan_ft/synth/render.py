"""The plan as an image: palette-mode PIL rendering and deterministic PNG bytes."""

from __future__ import annotations

import io
import os
from functools import lru_cache

from floorplan_ft.synth.model import SynthPlan

_PALETTE: list[tuple[int, int, int]] = [
    (255, 255, 255),  # 0 background
    (0, 0, 0),  # 1 wall
    (255, 236, 200),  # 2 거실
    (214, 232, 255),  # 3 침실
    (255, 214, 210),  # 4 주방
    (200, 240, 240),  # 5 화장실
    (222, 242, 208),  # 6 발코니
    (236, 224, 248),  # 7 현관
    (244, 232, 210),  # 8 드레스룸 / 수납
    (226, 226, 226),  # 9 실외기실
    (250, 248, 238),  # 10 복도/기타
    (205, 205, 205),  # 11 외부공간
    (120, 190, 255),  # 12 window fill
    (25, 80, 190),  # 13 window line
    (196, 126, 60),  # 14 door
    (110, 110, 110),  # 15 object line
    (250, 250, 250),  # 16 object fill
    (40, 40, 40),  # 17 text
    (238, 236, 212),  # 18 알파룸/다목적
]
_FILL = {
    "거실": 2,
    "침실": 3,
    "주방": 4,
    "화장실": 5,
    "발코니": 6,
    "현관": 7,
    "드레스룸": 8,
    "팬트리": 8,
    "세탁실": 8,
    "실외기실": 9,
    "기타": 10,
    "엘리베이터홀": 11,
    "계단실": 11,
    "알파룸": 18,
}
_FLAT_PALETTE = [v for rgb in _PALETTE for v in rgb] + [0] * (768 - 3 * len(_PALETTE))

_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/nanum/NanumGothic.ttf",
    "/usr/share/fonts/truetype/nanum/NanumBarunGothic.ttf",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/noto/NotoSansKR-Regular.ttf",
    "/usr/share/fonts/truetype/unfonts-core/UnDotum.ttf",
    "/usr/share/fonts/truetype/baekmuk/gulim.ttf",
    "/System/Library/Fonts/AppleSDGothicNeo.ttc",
    "/Library/Fonts/AppleGothic.ttf",
    "C:/Windows/Fonts/malgun.ttf",
)


@lru_cache(maxsize=1)
def _font_path() -> str | None:
    for p in _FONT_CANDIDATES:
        if p and os.path.isfile(p):
            return p
    return None


@lru_cache(maxsize=64)
def _font(size: int):
    from PIL import ImageFont

    path = _font_path()
    if path is None:
        return None
    try:
        return ImageFont.truetype(path, size)
    except OSError:
        return None


def render_plan(plan: SynthPlan, draw_text: bool = False):
    """The plan as a palette-mode PIL image (white background, light room fills, black walls,
    blue windows, brown doors, grey fixtures, OCR text when a Korean font is available)."""
    from PIL import Image, ImageDraw

    img = Image.new("P", (plan.width, plan.height), 0)
    img.putpalette(_FLAT_PALETTE)
    d = ImageDraw.Draw(img)
    t = plan.wall_thickness
    h = t // 2
    for sp in plan.spaces:
        x0, y0, x1, y1 = sp.rect
        d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=_FILL.get(sp.name, 10))
    for w in plan.walls:  # drawn a half thickness longer so that corners close
        x0, y0, x1, y1 = w.rect(t)
        if w.orient == "h":
            x0, x1 = x0 - h, x1 + h
        else:
            y0, y1 = y0 - h, y1 + h
        d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=1)
    for o in plan.openings:
        if o.kind == "window":
            x0, y0, x1, y1 = o.rect(t)
            d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=12, outline=13)
            if o.orient == "h":
                d.line([x0, o.line, x1 - 1, o.line], fill=13)
            else:
                d.line([o.line, y0, o.line, y1 - 1], fill=13)
        elif o.kind == "door":
            x0, y0, x1, y1 = o.rect(t)
            d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=0)
            if o.orient == "h":
                d.rectangle([x0, o.line - 1, x1 - 1, o.line + 1], fill=14)
                d.line([x0, y0, x0, y1 - 1], fill=14, width=2)
                d.line([x1 - 1, y0, x1 - 1, y1 - 1], fill=14, width=2)
            else:
                d.rectangle([o.line - 1, y0, o.line + 1, y1 - 1], fill=14)
                d.line([x0, y0, x1 - 1, y0], fill=14, width=2)
                d.line([x0, y1 - 1, x1 - 1, y1 - 1], fill=14, width=2)
    for b in plan.objects:
        x0, y0, x1, y1 = b.rect
        d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=16, outline=15, width=2)
        if b.category in ("객체_변기", "객체_세면대", "객체_욕조"):
            d.ellipse([x0 + 4, y0 + 4, x1 - 5, y1 - 5], outline=15)
    if draw_text and _font_path() is not None:
        for b in plan.ocr:
            x0, y0, x1, y1 = b.rect
            fs = max(8, round((y1 - y0) / 1.3))
            font = _font(fs)
            if font is None:
                break
            d.text((x0, y0 + (y1 - y0 - fs) // 2), b.text or "", fill=17, font=font)
    return img


def png_bytes(plan: SynthPlan) -> bytes:
    """Deterministic PNG bytes (no metadata chunks, fixed compression). Text is not drawn: the
    fonts differ between machines and the same seed must give the same bytes everywhere; the OCR
    boxes are in the annotations."""
    buf = io.BytesIO()
    render_plan(plan).save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()
