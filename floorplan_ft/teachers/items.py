"""Phase 3 inputs: one item per plan with a topology and a retrieval context."""

from __future__ import annotations

from dataclasses import dataclass

from floorplan_ft.prompts import build_messages
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.labeling import LabelItem
from floorplan_ft.topology_io import read_topology_bytes


@dataclass
class MissingInput:
    stem: str
    reason: str  # missing_topology | missing_context | bad_topology | bad_context


def build_items(store: ArtifactStore, stems: list[str]) -> tuple[list[LabelItem], list[MissingInput]]:
    """Items with the exact messages every teacher sees; plans lacking inputs are listed, not fatal."""
    items: list[LabelItem] = []
    missing: list[MissingInput] = []
    for stem in stems:
        topo_path, ctx_path = store.topology_path(stem), store.rag_context_path(stem)
        if not store.exists(topo_path):
            missing.append(MissingInput(stem, "missing_topology"))
            continue
        if not store.exists(ctx_path):
            missing.append(MissingInput(stem, "missing_context"))
            continue
        try:
            graph = read_topology_bytes(store.read_bytes(topo_path), origin=topo_path)
        except ValueError:
            missing.append(MissingInput(stem, "bad_topology"))
            continue
        try:
            chunks = store.read_json(ctx_path)["chunks"]
        except (ValueError, KeyError, TypeError):
            missing.append(MissingInput(stem, "bad_context"))
            continue
        image_name = graph.image_info.file_name
        items.append(LabelItem(stem, image_name, build_messages(image_name, graph, chunks), graph))
    return items, missing
