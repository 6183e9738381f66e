"""Draw a topology graph over its plan image (optional debugging aid, Pillow only)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from floorplan_ft.schemas import TopologyGraph
from floorplan_ft.topology_io import read_topology_dict

EDGE_COLOURS = {"door": (220, 40, 40), "window": (40, 110, 230), "open": (30, 170, 60)}
NODE_COLOUR = (250, 140, 0)
OUTSIDE_COLOUR = (140, 140, 140)

# Fonts that can render Hangul, tried in order; labels are skipped when none is found.
_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/nanum/NanumGothic.ttf",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/System/Library/Fonts/AppleSDGothicNeo.ttc",
    "C:/Windows/Fonts/malgun.ttf",
)


def _font(size: int) -> ImageFont.FreeTypeFont | None:
    for path in _FONT_CANDIDATES:
        if Path(path).exists():
            try:
                return ImageFont.truetype(path, size)
            except OSError:
                continue
    return None


def render_overlay(graph: TopologyGraph | dict, image_path: str | Path | None, out_path: str | Path) -> Path:
    """Draw node centroids, labels and edges (coloured by type) on the plan; write `out_path`.

    With no image (``image_path`` None or missing) a white canvas of the plan's size is used.
    """
    if isinstance(graph, dict):
        graph = read_topology_dict(graph, origin="topology")
    size = (graph.image_info.width, graph.image_info.height)
    if image_path is not None and Path(image_path).exists():
        with Image.open(image_path) as im:
            base = im.convert("RGB")
    else:
        base = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(base)
    scale = max(1, round(max(base.size) / 800))
    centres = {n.node_id: tuple(n.centroid) for n in graph.nodes}

    for e in graph.edges:
        a, b = centres.get(e.source_node), centres.get(e.target_node)
        if a is None or b is None:
            continue
        colour = EDGE_COLOURS.get(e.connection_type, (0, 0, 0))
        draw.line([a, b], fill=colour, width=2 * scale)

    font = _font(14 * scale)
    r = 5 * scale
    for n in graph.nodes:
        x, y = n.centroid
        colour = OUTSIDE_COLOUR if n.is_outside else NODE_COLOUR
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=(0, 0, 0))
        if font is not None:
            draw.text((x + r + 2, y - r), f"{n.label} ({n.space_type})", fill=(0, 0, 0), font=font)

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    base.save(out)
    return out
