"""Typed detections for one plan image, read from a COCO-style annotation file.

The topology builder consumes a `Detections` value, never raw COCO, so every check on the input
happens here and fails with a `ValueError` that names the problem (missing key, unknown category,
degenerate polygon, image not in the file).
"""

from __future__ import annotations

import logging
import math
import unicodedata
from collections.abc import Sequence
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from floorplan_ft import vocab

Point = tuple[float, float]
logger = logging.getLogger(__name__)


class AnnotationError(ValueError):
    """Malformed or unusable COCO input; the message names the key, category or annotation."""


class DetImage(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int | str | None = None
    file_name: str
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class Detection(BaseModel):
    """One detection: a space, a structure, an object or an OCR text box.

    `polygon` is the outer ring (x, y) without a repeated closing point; it is the bbox rectangle
    when the annotation had no segmentation (structures, objects, OCR, bbox-only spaces).
    """

    model_config = ConfigDict(frozen=True)

    id: int | str
    category_name: str
    bbox: tuple[float, float, float, float]
    polygon: tuple[Point, ...] | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)

    # ------------------------------------------------------------------ kind helpers
    @property
    def is_space(self) -> bool:
        return self.category_name.startswith(vocab.SPACE_PREFIX)

    @property
    def is_structure(self) -> bool:
        return self.category_name in vocab.STRUCTURE_CATEGORIES

    @property
    def is_object(self) -> bool:
        return self.category_name.startswith(vocab.OBJECT_PREFIX)

    @property
    def is_ocr(self) -> bool:
        return self.category_name == vocab.OCR_CATEGORY

    @property
    def text(self) -> str:
        """The OCR text ('' when none), NFC-normalised with whitespace collapsed; the team's
        detections keep it in attributes["OCR"]."""
        value = self.attributes.get("text")
        if value is None:
            value = self.attributes.get(vocab.TEAM_OCR_CATEGORY)
        return normalise_text(value)

    @property
    def subtype(self) -> str | None:
        value = self.attributes.get("subtype")
        if value is None:
            value = self.attributes.get(vocab.TEAM_SUBTYPE_KEY)  # the team's name for it
        return None if value is None else str(value)

    @property
    def center(self) -> Point:
        x, y, w, h = self.bbox
        return (x + w / 2.0, y + h / 2.0)


class SkippedAnnotation(BaseModel):
    """An annotation left out of the plan, and why (for the topology sidecar)."""

    model_config = ConfigDict(frozen=True)

    id: int | str
    category: str
    reason: str


class Detections(BaseModel):
    model_config = ConfigDict(frozen=True)

    image: DetImage
    detections: tuple[Detection, ...] = ()
    # Annotations with an unknown category, skipped (cv.strict_categories = false); the team's
    # `background` class is ignored and not listed.
    skipped: tuple[SkippedAnnotation, ...] = ()

    def skipped_summary(self) -> dict:
        """{"count": n, "by_category": {name: n}} for the sidecar."""
        by: dict[str, int] = {}
        for s in self.skipped:
            by[s.category] = by.get(s.category, 0) + 1
        return {"count": len(self.skipped), "by_category": dict(sorted(by.items()))}

    @property
    def spaces(self) -> list[Detection]:
        return [d for d in self.detections if d.is_space]

    @property
    def structures(self) -> list[Detection]:
        return [d for d in self.detections if d.is_structure]

    @property
    def objects(self) -> list[Detection]:
        return [d for d in self.detections if d.is_object]

    @property
    def ocr(self) -> list[Detection]:
        return [d for d in self.detections if d.is_ocr]


# --------------------------------------------------------------------------- helpers


def normalise_text(value: Any) -> str:
    if value is None:
        return ""
    return " ".join(unicodedata.normalize("NFC", str(value)).split())


def ring_area(points: Sequence[Point]) -> float:
    """Signed shoelace area (positive for counter-clockwise in a y-up frame)."""
    n = len(points)
    s = 0.0
    for i in range(n):
        x1, y1 = points[i]
        x2, y2 = points[(i + 1) % n]
        s += x1 * y2 - x2 * y1
    return s / 2.0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _stem(name: str) -> str:
    base = PureWindowsPath(PurePosixPath(name).name).name
    return base.rsplit(".", 1)[0] if "." in base else base


def _select_image(coco: dict, image_file_name: str | None) -> dict:
    images = coco["images"]
    if not isinstance(images, list) or not images:
        raise AnnotationError("COCO file has no images: 'images' must be a non-empty list")
    for i, img in enumerate(images):
        if not isinstance(img, dict):
            raise AnnotationError(f"COCO image entry {i} is not an object")
        for key in ("file_name", "width", "height"):
            if key not in img:
                raise AnnotationError(f"COCO image entry {i} is missing key {key!r}")
    if image_file_name is None:
        if len(images) == 1:
            return images[0]
        raise AnnotationError(f"COCO file holds {len(images)} images: pass image_file_name to pick one")
    wanted = str(image_file_name)
    for match in (
        lambda img: img["file_name"] == wanted,
        lambda img: PurePosixPath(str(img["file_name"])).name == PurePosixPath(wanted).name,
        lambda img: _stem(str(img["file_name"])).lower() == _stem(wanted).lower(),
    ):
        found = [img for img in images if match(img)]
        if found:
            return found[0]
    raise AnnotationError(
        f"image {wanted!r} not found in COCO file ({len(images)} images, matched by file_name or stem)"
    )


def _parse_bbox(raw: Any, ann_id: Any) -> tuple[float, float, float, float]:
    if not isinstance(raw, (list, tuple)) or len(raw) != 4 or not all(_is_number(v) for v in raw):
        raise AnnotationError(f"annotation {ann_id}: bbox must be [x, y, w, h] numbers, got {raw!r}")
    x, y, w, h = (float(v) for v in raw)
    if w < 0 or h < 0:
        raise AnnotationError(f"annotation {ann_id}: bbox has negative width/height {raw!r}")
    return (x, y, w, h)


def _clean_ring(points: list[Point]) -> list[Point]:
    out: list[Point] = []
    for p in points:
        if not out or (abs(p[0] - out[-1][0]) > 1e-9 or abs(p[1] - out[-1][1]) > 1e-9):
            out.append(p)
    if len(out) > 1 and abs(out[0][0] - out[-1][0]) < 1e-9 and abs(out[0][1] - out[-1][1]) < 1e-9:
        out.pop()
    return out


def _parse_segmentation(raw: Any, ann_id: Any) -> list[Point] | None:
    """Largest ring of a COCO polygon segmentation; None when there is none."""
    if raw is None:
        return None
    if isinstance(raw, dict):
        raise AnnotationError(f"annotation {ann_id}: RLE segmentation is not supported, a polygon is required")
    if not isinstance(raw, (list, tuple)):
        raise AnnotationError(f"annotation {ann_id}: segmentation must be a list of polygons")
    if not raw:
        return None
    rings_raw = [raw] if all(_is_number(v) for v in raw) else list(raw)
    best: list[Point] | None = None
    best_area = -1.0
    for ring in rings_raw:
        if not isinstance(ring, (list, tuple)) or not all(_is_number(v) for v in ring):
            raise AnnotationError(f"annotation {ann_id}: segmentation ring must be a flat list of numbers")
        if len(ring) % 2:
            raise AnnotationError(f"annotation {ann_id}: segmentation ring has an odd number of coordinates")
        pts = _clean_ring([(float(ring[i]), float(ring[i + 1])) for i in range(0, len(ring), 2)])
        if len(pts) < 3:
            raise AnnotationError(f"annotation {ann_id}: degenerate polygon (fewer than 3 distinct points)")
        area = abs(ring_area(pts))
        if area > best_area:
            best, best_area = pts, area
    if best is None:
        return None
    if best_area <= 1e-9:
        raise AnnotationError(f"annotation {ann_id}: degenerate polygon (zero area)")
    return best


def _rect(bbox: tuple[float, float, float, float]) -> list[Point]:
    x, y, w, h = bbox
    return [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]


def _category_names(coco: dict) -> dict[Any, str]:
    cats = coco.get("categories")
    if cats is None:
        return {}
    if not isinstance(cats, list):
        raise AnnotationError("COCO 'categories' must be a list")
    out: dict[Any, str] = {}
    for i, cat in enumerate(cats):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise AnnotationError(f"COCO category entry {i} is missing key 'id' or 'name'")
        out[cat["id"]] = str(cat["name"])
    return out


def detections_from_coco(
    coco: dict, image_file_name: str | None = None, *, strict_categories: bool = False
) -> Detections:
    """Read the detections of one image from a per-image or whole-set COCO dict.

    `image_file_name` selects the image in a whole-set file (by exact file_name, base name or
    stem, case-insensitive); it may be omitted for a file holding a single image.

    The team's dialect is read too: the category `OCR` (text in attributes.OCR), door/window
    subtypes in attributes.subcat, `공간_엘리베이터`, the `background` class (ignored), and ids
    that repeat because each of their four models numbers from 0 (a repeat becomes
    ``"{id}~{k}"``, k counting its earlier occurrences in file order). An annotation of an
    unknown category is skipped with a warning and listed in `Detections.skipped`, unless
    `strict_categories` (then the whole plan is rejected).
    """
    if not isinstance(coco, dict):
        raise AnnotationError("COCO input must be a JSON object")
    for key in ("images", "annotations"):
        if key not in coco:
            raise AnnotationError(f"COCO file is missing key {key!r}")
    img = _select_image(coco, image_file_name)
    image = _det_image(img)
    cat_names = _category_names(coco)
    anns = coco["annotations"]
    if not isinstance(anns, list):
        raise AnnotationError("COCO 'annotations' must be a list")
    multi = len(coco["images"]) > 1
    out: list[Detection] = []
    seen: dict[Any, int] = {}
    skipped: list[SkippedAnnotation] = []
    for i, ann in enumerate(anns):
        if not _belongs_to(ann, i, img, multi):
            continue
        ann_id = _unique_id(ann["id"], seen)
        name = _category_of(ann, ann_id, cat_names, skipped, strict_categories)
        if name is not None:
            out.append(_detection(ann, ann_id, name))
    return Detections(image=image, detections=tuple(out), skipped=tuple(skipped))


def _det_image(img: dict) -> DetImage:
    if not (_is_number(img["width"]) and _is_number(img["height"])):
        raise AnnotationError(f"image {img['file_name']!r}: width/height must be numbers")
    if img["width"] <= 0 or img["height"] <= 0:
        raise AnnotationError(f"image {img['file_name']!r}: width/height must be positive")
    return DetImage(
        id=img.get("id"), file_name=str(img["file_name"]), width=int(img["width"]), height=int(img["height"])
    )


def _belongs_to(ann: Any, index: int, img: dict, multi: bool) -> bool:
    """Whether annotation entry `index` is one of the selected image's (a malformed entry raises)."""
    if not isinstance(ann, dict):
        raise AnnotationError(f"annotation entry {index} is not an object")
    if "id" not in ann:
        raise AnnotationError(f"annotation entry {index} is missing key 'id'")
    if multi:
        if "image_id" not in ann:
            raise AnnotationError(f"annotation {ann['id']} is missing key 'image_id'")
        return ann["image_id"] == img.get("id")
    return not ("image_id" in ann and "id" in img and ann["image_id"] != img["id"])


def _unique_id(ann_id: Any, seen: dict[Any, int]) -> Any:
    """The team's four models each number from 0: a repeated id becomes "{id}~{k}"."""
    if ann_id in seen:
        seen[ann_id] += 1
        return f"{ann_id}~{seen[ann_id] - 1}"
    seen[ann_id] = 1
    return ann_id


def _category_of(ann: dict, ann_id: Any, cat_names: dict, skipped: list[SkippedAnnotation], strict: bool) -> str | None:
    """The annotation's category in our vocabulary (by id through `categories`, or a name on the
    annotation itself), or None when it is skipped (background, or unknown and not `strict`)."""
    if "category_id" in ann and ann["category_id"] in cat_names:
        name = cat_names[ann["category_id"]]
    elif "category_name" in ann:
        name = str(ann["category_name"])
    elif "category_id" in ann:
        if not cat_names:
            raise AnnotationError("COCO file is missing key 'categories'")
        problem = f"category_id {ann['category_id']!r} is not in 'categories'"
        if strict:
            raise AnnotationError(f"annotation {ann_id}: {problem}")
        _skip(skipped, ann_id, f"id {ann['category_id']!r}", problem)
        return None
    else:
        raise AnnotationError(f"annotation {ann_id} is missing key 'category_id'")
    if name == vocab.TEAM_OCR_CATEGORY:
        name = vocab.OCR_CATEGORY
    if name == vocab.TEAM_BACKGROUND:
        return None
    if name not in vocab.ALL_CATEGORIES:
        problem = f"unknown category {name!r} (not in vocab.ALL_CATEGORIES)"
        if strict:
            raise AnnotationError(f"annotation {ann_id}: {problem} (cv.strict_categories)")
        _skip(skipped, ann_id, name, problem)
        return None
    return name


def _detection(ann: dict, ann_id: Any, name: str) -> Detection:
    """One annotation as a detection: attributes, polygon, and a bbox (given, or the polygon's)."""
    attributes = ann.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise AnnotationError(f"annotation {ann_id}: attributes must be an object")
    attributes = dict(attributes)
    if name == vocab.OCR_CATEGORY and "text" not in attributes and "text" in ann:
        attributes["text"] = ann["text"]
    polygon = _parse_segmentation(ann.get("segmentation"), ann_id)
    if "bbox" in ann and ann["bbox"] is not None:
        bbox = _parse_bbox(ann["bbox"], ann_id)
    elif polygon is not None:
        xs = [p[0] for p in polygon]
        ys = [p[1] for p in polygon]
        bbox = (min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys))
    else:
        raise AnnotationError(f"annotation {ann_id} is missing key 'bbox' (and has no segmentation)")
    if polygon is None:
        if name.startswith(vocab.SPACE_PREFIX) and (bbox[2] <= 0 or bbox[3] <= 0):
            raise AnnotationError(f"annotation {ann_id}: degenerate polygon (space bbox has zero area)")
        polygon = _rect(bbox)
    return Detection(id=ann_id, category_name=name, bbox=bbox, polygon=tuple(polygon), attributes=attributes)


def _skip(skipped: list[SkippedAnnotation], ann_id: Any, category: str, reason: str) -> None:
    logger.warning("annotation %s skipped: %s", ann_id, reason)
    skipped.append(SkippedAnnotation(id=ann_id, category=category, reason=reason))
