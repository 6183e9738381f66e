"""Small helpers for the PNG charts drawn with Pillow (no display, no matplotlib needed)."""

from __future__ import annotations


def chart_font(size: int = 13):
    """Pillow's default font at `size` (older Pillow: its fixed-size bitmap font)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()
