"""Phase 3 inputs: one item per plan with a topology and a retrieval context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from floorplan_ft.prompts import (
    TEAM_STYLE,
    build_messages,
    build_messages_for,
    prompt_style,
    prompt_version_for,
)
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.labeling import LabelItem


@dataclass
class MissingInput:
    stem: str
    reason: str  # missing_topology | stale_topology | missing_context | bad_topology | bad_context


def build_items(
    store: ArtifactStore, stems: list[str], settings: Any = None
) -> tuple[list[LabelItem], list[MissingInput]]:
    """Items with the exact messages every teacher sees; plans lacking inputs are listed, not fatal.

    ``settings`` chooses the prompt style (`prompts.build_messages_for`; None: ft-pipeline's own).
    In team style the team's builder gets the topology file as stored, not our normalised graph."""
    team = prompt_style(settings) == TEAM_STYLE
    version = prompt_version_for(settings)  # a team module that does not load fails here, once
    items: list[LabelItem] = []
    missing: list[MissingInput] = []
    for stem in stems:
        ctx_path = store.layout.rag_context(stem)
        found = store.plan_topology(stem, keep_raw=team)  # stale: phase 1's inputs no longer build
        if found.reason in ("missing_topology", "stale_topology"):
            missing.append(MissingInput(stem, found.reason))
            continue
        if not store.exists(ctx_path):
            missing.append(MissingInput(stem, "missing_context"))
            continue
        if found.graph is None:
            missing.append(MissingInput(stem, "bad_topology"))
            continue
        graph, raw = found.graph, found.raw
        try:
            context = store.read_json(ctx_path)
            chunks = context["chunks"]
            if team and context.get("context_format") != TEAM_STYLE:
                raise ValueError("retrieved for the project prompt style: run phase 2 again")
        except (ValueError, KeyError, TypeError, AttributeError):
            missing.append(MissingInput(stem, "bad_context"))
            continue
        image_name = graph.image_info.file_name
        if team:
            messages = build_messages_for(settings, raw, context, graph=graph)
        else:
            messages = build_messages(image_name, graph, chunks)
        items.append(LabelItem(stem, image_name, messages, graph, version))
    return items, missing
