"""Fixtures in the team's dialects, made from our own graphs (our code, from the facts in
TEAM_SYSTEM.md "Their formats" and their aggregator's output as stored in their repository).

* `to_team_graph`: the aggregator's `topology_graph.json` (door/window entries
  ``{structure_id: "str_N", type, bbox}``, ``walls: []``, objects with ``category_id``, node
  ``area_ratio`` a 0-1 fraction and null outside, 13 statistics).
* `to_frontend_graph`: the frontend's ``"version": "V1.0.0"`` graph (nodes by ``id`` and
  ``class_name``, top-level doors/windows with ``touching_spaces``, ``bay_analysis``, no
  ``image_info``, no ``statistics``).
"""

from __future__ import annotations

from typing import Any

from floorplan_ft import vocab
from floorplan_ft.schemas import TopologyGraph

TEAM_STATISTICS = (
    "total_image_area",
    "total_space_area",
    "total_inside_area",
    "space_count",
    "inside_space_count",
    "room_count",
    "bathroom_count",
    "balcony_count",
    "bay_count",
    "space_type_count",
    "structure_type",
    "balcony_ratio",
    "windowless_ratio",
)


def _sid(structure_id: str) -> str:
    return f"str_{structure_id}"


def to_team_graph(graph: TopologyGraph | dict) -> dict[str, Any]:
    """One of our graphs as the team's aggregator would write it (same geometry and counts)."""
    g = graph if isinstance(graph, TopologyGraph) else TopologyGraph.model_validate(graph)
    inside_total = sum(n.area for n in g.nodes if not n.is_outside)
    nodes = []
    for n in g.nodes:
        structures = n.contains.structures
        nodes.append(
            {
                "node_id": n.node_id,
                "node_type": "space",
                "category_id": vocab.TEAM_CATEGORY_IDS.get(n.category_name, n.category_id),
                "category_name": n.category_name,
                "label": n.label,
                "space_type": n.space_type,
                "is_outside": n.is_outside,
                "bbox": [int(v) for v in n.bbox],
                "segmentation": n.segmentation,
                "area": n.area,
                "area_ratio": None if n.is_outside else round(n.area / inside_total, 4),
                "centroid": [int(v) for v in n.centroid],
                "contains": {
                    "objects": [
                        {
                            "object_id": f"obj_{o.object_id}",
                            "category_id": vocab.TEAM_CATEGORY_IDS.get(o.category_name, 0),
                            "category_name": o.category_name,
                            "bbox": o.bbox,
                        }
                        for o in n.contains.objects
                    ],
                    "ocr_labels": list(n.contains.ocr_labels),
                    "structures": {
                        "doors": [
                            {"structure_id": _sid(s.structure_id), "type": s.subtype or "기타문", "bbox": s.bbox}
                            for s in structures.doors
                        ],
                        "windows": [
                            {"structure_id": _sid(s.structure_id), "type": s.subtype or "기타창", "bbox": s.bbox}
                            for s in structures.windows
                        ],
                        "walls": [],
                    },
                },
            }
        )
    stats = g.statistics.model_dump(mode="json")
    return {
        "image_info": g.image_info.model_dump(mode="json"),
        "nodes": nodes,
        "edges": [
            {
                "edge_id": e.edge_id,
                "source_node": e.source_node,
                "target_node": e.target_node,
                "connection_type": e.connection_type,
                "connection_id": None if e.connection_id is None else _sid(e.connection_id),
            }
            for e in g.edges
        ],
        "statistics": {k: stats[k] for k in TEAM_STATISTICS},
    }


def to_frontend_graph(graph: TopologyGraph | dict) -> dict[str, Any]:
    """One of our graphs as the team's frontend ships it (``V1.0.0``)."""
    g = graph if isinstance(graph, TopologyGraph) else TopologyGraph.model_validate(graph)
    class_of = {name: cid for cid, name in vocab.TEAM_SPA_CLASSES.items()}
    image_area = g.image_info.width * g.image_info.height
    nodes, doors, windows = [], {}, {}
    for n in g.nodes:
        name = n.category_name.removeprefix(vocab.SPACE_PREFIX)
        nodes.append(
            {
                "id": n.node_id,
                "class_id": class_of.get(n.category_name, 12),
                "class_name": name,
                "instance_id": 1,
                "segmentation": n.segmentation,
                "bbox": n.bbox,
                "area": n.area,
                "area_ratio": round(n.area / image_area, 4),
                "centroid": n.centroid,
                "name": name,
                "ocr_label": n.label if n.label != name else None,
                "source": "spa",
                "objects": [
                    {"class_name": o.category_name.removeprefix(vocab.OBJECT_PREFIX), "confidence": 0.9}
                    for o in n.contains.objects
                ],
                "has_window": bool(n.contains.structures.windows),
            }
        )
        for kind, bucket in (("doors", doors), ("windows", windows)):
            for s in getattr(n.contains.structures, kind):
                prefix = "door" if kind == "doors" else "window"
                entry = bucket.setdefault(
                    s.structure_id, {"id": f"{prefix}_{s.structure_id}", "bbox": s.bbox, "touching_spaces": []}
                )
                entry["touching_spaces"].append(
                    {"space_id": n.node_id, "space_name": name, "class_name": name, "overlap": 100}
                )
    edges = []
    for e in g.edges:
        edge = {
            "source": e.source_node,
            "target": e.target_node,
            "confidence": 1.0,
            "connection_type": e.connection_type,
        }
        if e.connection_type == "window":
            edge["window_id"] = f"window_{e.connection_id}"
        else:
            edge["door_id"] = None if e.connection_id is None else f"door_{e.connection_id}"
        edges.append(edge)
    return {
        "version": "V1.0.0",
        "nodes": nodes,
        "edges": edges,
        "uncertain_edges": [],
        "doors": list(doors.values()),
        "windows": list(windows.values()),
        "summary": {"total_spaces": len(nodes)},
        "bay_analysis": {"bay_count": g.statistics.bay_count, "bay_type": f"{g.statistics.bay_count} Bay"},
    }
