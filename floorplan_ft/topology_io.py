"""The one reader of topology graphs: ours, the team's aggregator's, and their frontend's.

Every phase, the service and the metrics read a graph through `read_topology_dict`, which
detects the dialect and returns our `TopologyGraph`:

* ``project``: what our builder writes (docs/data-formats.md). Validated as is.
* ``team``: their aggregator's `topology_graph.json` (TEAM_SYSTEM.md "Their formats"): door and
  window entries ``{structure_id, type, bbox}``, objects with ``category_id``, node
  ``area_ratio`` a 0-1 fraction (null for outside spaces), no ldk/storage/master-window
  statistics. Fractions become percents; a null ratio reads 0 for an outside space (the schema's
  convention) and is recomputed from the areas for an inside one; ``type`` becomes ``subtype``.
* ``team-frontend``: the graphs their frontend ships (``"version": "V1.0.0"``: nodes with ``id``
  / ``class_name``, top-level ``doors`` / ``windows`` with ``touching_spaces``, ``bay_analysis``,
  no ``image_info`` and no ``statistics``). Converted to the aggregator's shape first, with the
  statistics computed by the aggregator's rules (their classes, their 타워형-first order), so an
  imported graph keeps the team's definitions. Its ``area_ratio`` is a share of the image; it is
  recomputed over the inside area. The image size is not in the file: the extent of the
  geometry stands in, and ``total_image_area`` is None.

Statistics the file lacks (ldk_ratio, storage_ratio, master_bedroom_has_window) are computed from
the nodes with our vocabulary (the builder's rules), or left None when they cannot be: never a
silent 0. Unknown keys are ignored. Errors name the origin (file) and the field.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import ValidationError

from floorplan_ft import vocab
from floorplan_ft.schemas import TopologyGraph

TopologyFormat = Literal["project", "team", "team-frontend"]
PROJECT, TEAM, TEAM_FRONTEND = "project", "team", "team-frontend"

_NODE_KEYS = (
    "node_id",
    "node_type",
    "category_id",
    "category_name",
    "label",
    "space_type",
    "is_outside",
    "bbox",
    "segmentation",
    "area",
    "area_ratio",
    "centroid",
)
_STAT_KEYS = (
    "total_image_area",
    "total_space_area",
    "total_inside_area",
    "space_count",
    "inside_space_count",
    "room_count",
    "bathroom_count",
    "balcony_count",
    "bay_count",
    "structure_type",
    "balcony_ratio",
    "windowless_ratio",
    "ldk_ratio",
    "storage_ratio",
    "master_bedroom_has_window",
)
_EDGE_KEYS = ("edge_id", "source_node", "target_node", "connection_type", "connection_id")


class TopologyFormatError(ValueError):
    """A graph that cannot be read; the message names the origin and the field."""

    def __init__(self, origin: str, problems: list[tuple[str, str]]):
        self.origin = origin
        self.problems = problems  # (field path, message)
        shown = "; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in problems[:5])
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"{origin}: {shown}{more}")


# --------------------------------------------------------------------------- detection


def _structure_entries(data: dict) -> list[dict]:
    out = []
    for node in data.get("nodes") or []:
        if isinstance(node, dict):
            structures = (node.get("contains") or {}).get("structures") or {}
            if isinstance(structures, dict):
                for key in ("doors", "windows"):
                    out += [s for s in structures.get(key) or [] if isinstance(s, dict)]
    return out


def detect_topology_format(data: Any) -> TopologyFormat:
    """``project``, ``team`` (their aggregator) or ``team-frontend``; ValueError when it is none."""
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise ValueError("not a topology graph: expected a JSON object with a 'nodes' list")  # noqa: TRY004
    nodes = [n for n in data["nodes"] if isinstance(n, dict)]
    if (
        "image_info" not in data
        and "statistics" not in data
        and ("bay_analysis" in data or any("class_name" in n and "node_id" not in n for n in nodes))
    ):
        return TEAM_FRONTEND
    if any("type" in s and "category_name" not in s for s in _structure_entries(data)):
        return TEAM
    for node in nodes:
        objects = (node.get("contains") or {}).get("objects") or []
        if any(isinstance(o, dict) and "category_id" in o for o in objects):
            return TEAM
        if "area_ratio" in node and node["area_ratio"] is None:
            return TEAM
    stats = data.get("statistics")
    if isinstance(stats, dict) and not {"ldk_ratio", "storage_ratio"} & stats.keys():
        return TEAM
    return PROJECT


# --------------------------------------------------------------------------- helpers


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pct(part: float, whole: float) -> float | None:
    return round(part / whole * 100.0, 2) + 0.0 if whole > 0 else None


def _canonical(node: dict) -> str:
    """Our canonical name of a node (label first, then category), as our builder decides it."""
    label = vocab.canonical_name(str(node.get("label") or ""))
    if label in vocab.SPACE_CLASS:
        return label
    return vocab.canonical_name(str(node.get("category_name") or ""))


def _windows(node: dict) -> list:
    structures = (node.get("contains") or {}).get("structures") or {}
    return list(structures.get("windows") or []) if isinstance(structures, dict) else []


def derived_statistics(nodes: list[dict]) -> dict[str, Any]:
    """ldk_ratio, storage_ratio and master_bedroom_has_window from normalised nodes, with our
    vocabulary; None where the nodes cannot give them (no inside area, no bedroom)."""
    inside = [n for n in nodes if not n.get("is_outside") and _num(n.get("area"))]
    total = sum(float(n["area"]) for n in inside)

    def area_of(names) -> float:
        return sum(float(n["area"]) for n in inside if _canonical(n) in names)

    bedrooms = [n for n in inside if _canonical(n) == "침실"]
    master = max(bedrooms, key=lambda n: float(n["area"]), default=None)
    return {
        "ldk_ratio": _pct(area_of(vocab.LDK_NAMES), total),
        "storage_ratio": _pct(area_of(vocab.STORAGE_NAMES), total),
        "master_bedroom_has_window": None if master is None else bool(_windows(master)),
    }


def _validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        loc = ""
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        out.append((loc, err["msg"]))
    return out


# --------------------------------------------------------------------------- team → ours


def _team_structure(entry: Any, kind: str, where: str, problems: list) -> dict | None:
    if not isinstance(entry, dict):
        problems.append((where, "expected an object"))
        return None
    category = entry.get("category_name") or (vocab.DOOR if kind == "doors" else vocab.WINDOW)
    subtype = entry.get("subtype", entry.get("type"))
    return {
        "structure_id": str(entry.get("structure_id", "")),
        "category_name": category,
        "bbox": entry.get("bbox"),
        "subtype": None if subtype is None else str(subtype),
    }


def _team_contains(raw: Any, where: str, problems: list) -> dict:
    raw = raw if isinstance(raw, dict) else {}
    objects = []
    for j, o in enumerate(raw.get("objects") or []):
        if not isinstance(o, dict):
            problems.append((f"{where}.objects[{j}]", "expected an object"))
            continue
        objects.append(
            {
                "object_id": str(o.get("object_id", f"obj_{j}")),
                "category_name": o.get("category_name"),
                "bbox": o.get("bbox", []),
            }
        )
    structures = raw.get("structures") if isinstance(raw.get("structures"), dict) else {}
    out: dict[str, list] = {}
    for kind in ("doors", "windows", "walls"):
        entries = [
            _team_structure(s, kind, f"{where}.structures.{kind}[{j}]", problems)
            for j, s in enumerate(structures.get(kind) or [])
        ]
        out[kind] = [e for e in entries if e is not None]
    labels = [str(t) for t in raw.get("ocr_labels") or [] if t is not None]
    return {"objects": objects, "ocr_labels": labels, "structures": out}


def _normalise_team(data: dict, problems: list) -> dict:
    nodes_in = data["nodes"]
    nodes: list[dict] = []
    for i, raw in enumerate(nodes_in):
        where = f"nodes[{i}]"
        if not isinstance(raw, dict):
            problems.append((where, "expected an object"))
            continue
        node = {k: raw.get(k) for k in _NODE_KEYS if k in raw}
        node.setdefault("node_type", "space")
        node["contains"] = _team_contains(raw.get("contains"), f"{where}.contains", problems)
        nodes.append(node)
    inside_total = sum(float(n["area"]) for n in nodes if not n.get("is_outside") and _num(n.get("area")))
    for i, node in enumerate(nodes):
        ratio = node.get("area_ratio")
        if node.get("is_outside"):
            node["area_ratio"] = 0.0  # theirs is null: ours says 0 for outside spaces
        elif ratio is None:
            if not _num(node.get("area")):
                problems.append((f"nodes[{i}].area_ratio", "null and no area to compute it from"))
                continue
            node["area_ratio"] = _pct(float(node["area"]), inside_total) or 0.0
        elif _num(ratio):
            node["area_ratio"] = round(float(ratio) * 100.0, 2) + 0.0  # fraction → percent
    return {
        "image_info": data.get("image_info"),
        "nodes": nodes,
        "edges": data.get("edges"),
        "statistics": data.get("statistics"),
    }


# --------------------------------------------------------------------------- frontend → team


_FRONTEND_NAMES = {"주방/식당": "공간_주방", "주방및식당": "공간_주방", "욕실": "공간_화장실", "복도": "공간_기타"}


def _frontend_category(raw: dict, where: str, problems: list) -> str | None:
    class_id = raw.get("class_id")
    if isinstance(class_id, int) and class_id in vocab.TEAM_SPA_CLASSES:
        return vocab.TEAM_SPA_CLASSES[class_id]
    name = str(raw.get("class_name") or "")
    category = _FRONTEND_NAMES.get(name, vocab.SPACE_PREFIX + name)
    if category in vocab.TEAM_CATEGORY_IDS:
        return category
    problems.append((f"{where}.class_id", f"unknown space class {class_id!r} ({name!r})"))
    return None


def _team_direction(bbox, centroid) -> str:
    """The aggregator's window direction: wider than tall (strictly) is S/N, else E/W."""
    x, y, w, h = (float(v) for v in bbox)
    if w > h:
        return "S" if y + h / 2 - float(centroid[1]) > 0 else "N"
    return "E" if x + w / 2 - float(centroid[0]) > 0 else "W"


def _main_window(node: dict):
    windows = _windows(node)
    return max(windows, key=lambda w: max(w["bbox"][2], w["bbox"][3])) if windows else None


def team_structure_type(nodes: list[dict]) -> str:
    """The aggregator's order: 혼합형 without a living room; 타워형 when the living room has
    windows on two perpendicular sides (before anything about the kitchen); 혼합형 without a
    living-room window or a kitchen; 타워형 when the kitchen has no window; 판상형 when the main
    windows face opposite ways; 혼합형 when perpendicular; 타워형 when they face the same way."""
    living = next((n for n in nodes if n.get("category_name") == "공간_거실"), None)
    if living is None:
        return "혼합형"
    axes = {"NS" if _team_direction(w["bbox"], living["centroid"]) in "NS" else "EW" for w in _windows(living)}
    if len(axes) == 2:
        return "타워형"
    main = _main_window(living)
    if main is None:
        return "혼합형"
    kitchen = next((n for n in nodes if n.get("category_name") in ("공간_주방및식당", "공간_주방")), None)
    if kitchen is None:
        return "혼합형"
    k_main = _main_window(kitchen)
    if k_main is None:
        return "타워형"
    ld = _team_direction(main["bbox"], living["centroid"])
    kd = _team_direction(k_main["bbox"], kitchen["centroid"])
    if {"N": "S", "S": "N", "E": "W", "W": "E"}[ld] == kd:
        return "판상형"
    if (ld in "NS") != (kd in "NS"):
        return "혼합형"
    return "타워형"


def _team_bay_count(nodes: list[dict]) -> int:
    livings = [n for n in nodes if n.get("category_name") == "공간_거실"]
    if len(livings) != 1 or not _windows(livings[0]):
        return len(livings)

    def direction(n):  # the aggregator picks the widest window here
        w = max(_windows(n), key=lambda w: w["bbox"][2])
        return _team_direction(w["bbox"], n["centroid"])

    ref = direction(livings[0])
    beds = [n for n in nodes if n.get("category_name") == "공간_침실" and _windows(n)]
    return 1 + sum(1 for n in beds if direction(n) == ref)


def _frontend_to_team(data: dict, origin: str, problems: list) -> dict:
    nodes: list[dict] = []
    by_id: dict[str, dict] = {}
    for i, raw in enumerate(data["nodes"]):
        where = f"nodes[{i}]"
        if not isinstance(raw, dict):
            problems.append((where, "expected an object"))
            continue
        category = _frontend_category(raw, where, problems)
        for key in ("id", "bbox", "area", "centroid"):
            if key not in raw:
                problems.append((f"{where}.{key}", "missing"))
        if category is None or any(k not in raw for k in ("id", "bbox", "area", "centroid")):
            continue
        ocr = raw.get("ocr_label")
        label = str(ocr) if isinstance(ocr, str) and ocr.strip() else str(raw.get("name") or raw.get("class_name"))
        node = {
            "node_id": str(raw["id"]),
            "node_type": "space",
            "category_id": vocab.TEAM_CATEGORY_IDS[category],
            "category_name": category,
            "label": label,
            "space_type": vocab.team_space_class(label),
            "is_outside": vocab.team_is_outside(label),
            "bbox": raw["bbox"],
            "segmentation": raw.get("segmentation") or [],
            "area": raw["area"],
            "area_ratio": None,
            "centroid": raw["centroid"],
            "contains": {
                "objects": [
                    {
                        "object_id": f"{raw['id']}_obj_{j}",
                        "category_name": vocab.OBJECT_PREFIX + str(o.get("class_name", "")),
                        "bbox": o.get("bbox", []),
                    }
                    for j, o in enumerate(raw.get("objects") or [])
                    if isinstance(o, dict)
                ],
                "ocr_labels": [label] if isinstance(ocr, str) and ocr.strip() else [],
                "structures": {"doors": [], "windows": [], "walls": []},
            },
            "_has_window": raw.get("has_window"),
        }
        nodes.append(node)
        by_id[node["node_id"]] = node
    for kind in ("doors", "windows"):
        for j, s in enumerate(data.get(kind) or []):
            if not isinstance(s, dict) or "bbox" not in s:
                problems.append((f"{kind}[{j}]", "expected an object with a bbox"))
                continue
            entry = {
                "structure_id": str(s.get("id", f"{kind}_{j}")),
                "type": s.get("subcat") or s.get("type"),
                "bbox": s["bbox"],
            }
            for t in s.get("touching_spaces") or []:
                target = by_id.get(str((t or {}).get("space_id")))
                if target is not None:
                    target["contains"]["structures"][kind].append(entry)
    edges = []
    for j, e in enumerate(data.get("edges") or []):
        if not isinstance(e, dict):
            problems.append((f"edges[{j}]", "expected an object"))
            continue
        kind = e.get("connection_type")
        edges.append(
            {
                "edge_id": str(e.get("edge_id", f"edge_{j}")),
                "source_node": str(e.get("source")),
                "target_node": str(e.get("target")),
                "connection_type": kind,
                "connection_id": e.get("door_id") if kind == "door" else e.get("window_id"),
            }
        )
    inside = [n for n in nodes if not n["is_outside"]]
    total_inside = float(sum(float(n["area"]) for n in inside))
    for n in nodes:
        n["area_ratio"] = (
            None if n["is_outside"] else (round(float(n["area"]) / total_inside, 4) if total_inside > 0 else 0.0)
        )

    def has_window(n) -> bool:
        flag = n.pop("_has_window", None)
        return bool(flag) if isinstance(flag, bool) else bool(_windows(n))

    window_flags = {n["node_id"]: has_window(n) for n in nodes}
    counted = [n for n in inside if n["label"] != "기타"]
    type_count = {t: 0 for t in vocab.SPACE_TYPES}
    for n in nodes:
        type_count[n["space_type"]] += 1
    bay = (data.get("bay_analysis") or {}).get("bay_count")
    extent_w = max((float(n["bbox"][0]) + float(n["bbox"][2]) for n in nodes), default=1.0)
    extent_h = max((float(n["bbox"][1]) + float(n["bbox"][3]) for n in nodes), default=1.0)
    parts = origin.replace("\\", "/").rsplit("/", 2)
    name = parts[-1]
    stem = (
        parts[-2]
        if name == "topology_graph.json" and len(parts) > 1
        else (name.removesuffix(".json").removesuffix("_topology"))
    )
    balcony_area = sum(float(n["area"]) for n in nodes if n["category_name"] == "공간_발코니")
    statistics = {
        "total_image_area": None,
        "total_space_area": float(sum(float(n["area"]) for n in nodes)),
        "total_inside_area": total_inside,
        "space_count": len(nodes),
        "inside_space_count": len(inside),
        "room_count": sum(n["category_name"] == "공간_침실" for n in nodes),
        "bathroom_count": sum(n["category_name"] == "공간_화장실" for n in nodes),
        "balcony_count": sum(n["category_name"] == "공간_발코니" for n in nodes),
        "bay_count": bay if isinstance(bay, int) and bay >= 0 else _team_bay_count(nodes),
        "space_type_count": type_count,
        "structure_type": team_structure_type(nodes),
        "balcony_ratio": round(balcony_area / total_inside * 100, 4) if total_inside > 0 else 0.0,
        "windowless_ratio": round(sum(not window_flags[n["node_id"]] for n in counted) / len(counted) * 100, 4)
        if counted
        else 0.0,
        # has_window is the frontend's own flag; carry it where windows did not attach.
        "master_bedroom_has_window": _master_window(inside, window_flags),
    }
    image_info = data.get("image_info") or {
        "file_name": f"{stem}.png",
        "width": max(1, math.ceil(extent_w)),
        "height": max(1, math.ceil(extent_h)),
    }
    return {"image_info": image_info, "nodes": nodes, "edges": edges, "statistics": statistics}


def _master_window(inside: list[dict], flags: dict[str, bool]) -> bool | None:
    bedrooms = [n for n in inside if _canonical(n) == "침실"]
    if not bedrooms:
        return None
    return flags[max(bedrooms, key=lambda n: float(n["area"]))["node_id"]]


# --------------------------------------------------------------------------- entry point


def read_topology_dict(data: Any, *, origin: str) -> TopologyGraph:
    """Our `TopologyGraph` from a graph in any of the three dialects (module docstring).
    `origin` (a path or a name) starts every error message."""
    try:
        fmt = detect_topology_format(data)
    except ValueError as exc:
        raise TopologyFormatError(origin, [("", str(exc))]) from None
    problems: list[tuple[str, str]] = []
    if fmt == TEAM_FRONTEND:
        data = _frontend_to_team(data, origin, problems)
    if fmt == PROJECT:
        body = {k: data.get(k) for k in ("image_info", "nodes", "edges", "statistics", "builder_version") if k in data}
        body["nodes"] = [_project_node(n) for n in data["nodes"]]
    else:
        body = _normalise_team(data, problems)
    if problems:
        raise TopologyFormatError(origin, problems)
    if isinstance(body.get("image_info"), dict):
        body["image_info"] = {k: body["image_info"].get(k) for k in ("file_name", "width", "height")}
    if isinstance(body.get("edges"), list):
        body["edges"] = [
            {k: e.get(k) for k in _EDGE_KEYS if k in e} if isinstance(e, dict) else e for e in body["edges"]
        ]
    stats = body.get("statistics")
    if isinstance(stats, dict):
        clean = {k: stats[k] for k in _STAT_KEYS if k in stats}
        if isinstance(stats.get("space_type_count"), dict):
            clean["space_type_count"] = {t: stats["space_type_count"].get(t, 0) for t in vocab.SPACE_TYPES}
        elif "space_type_count" in stats:
            clean["space_type_count"] = stats["space_type_count"]
        nodes = [n for n in body.get("nodes") or [] if isinstance(n, dict)]
        derived = derived_statistics(nodes)
        for key, value in derived.items():
            if clean.get(key) is None:
                clean[key] = value
        body["statistics"] = clean
    try:
        return TopologyGraph.model_validate(body)
    except ValidationError as exc:
        raise TopologyFormatError(origin, _validation_problems(exc)) from None


def _project_node(raw: Any) -> Any:
    if not isinstance(raw, dict):
        return raw
    node = {k: raw[k] for k in _NODE_KEYS if k in raw}
    if "contains" in raw:
        contains = raw["contains"] if isinstance(raw["contains"], dict) else {}
        structures = contains.get("structures") if isinstance(contains.get("structures"), dict) else {}
        node["contains"] = {
            "objects": [
                {k: o.get(k) for k in ("object_id", "category_name", "bbox") if k in o} if isinstance(o, dict) else o
                for o in contains.get("objects") or []
            ],
            "ocr_labels": contains.get("ocr_labels") or [],
            "structures": {
                kind: [
                    {k: s.get(k) for k in ("structure_id", "category_name", "bbox", "subtype") if k in s}
                    if isinstance(s, dict)
                    else s
                    for s in structures.get(kind) or []
                ]
                for kind in ("doors", "windows", "walls")
            },
        }
    return node


def read_topology_bytes(data: bytes | str, *, origin: str) -> TopologyGraph:
    """`read_topology_dict` over a file's bytes; invalid JSON names the origin too."""
    import json

    try:
        parsed = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TopologyFormatError(origin, [("", f"not valid JSON ({exc})")]) from None
    return read_topology_dict(parsed, origin=origin)
