"""Import topology graphs the team already has (their aggregator's or their frontend's, or ours)
as phase-1 outputs, so `ft-pipeline run --steps 2-6` works on them without images.

Each valid file is copied byte for byte to ``output/{stem}/topology_graph.json`` (the team's
prompt builder must see the graph as production wrote it; every reader normalises through
`floorplan_ft.topology_io`) with a sidecar ``topology_graph.meta.json`` whose ``source`` is
``"import"`` (phase 1 treats such a graph as done), and the stem joins ``sampled_images.json``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from floorplan_ft.cv.runner import IMPORT_SOURCE, SIDECAR, is_imported  # noqa: F401 (re-exported)
from floorplan_ft.sampling import SAMPLE_FORMAT_VERSION
from floorplan_ft.store import ArtifactStore
from floorplan_ft.topology_io import detect_topology_format, read_topology_bytes


@dataclass
class ImportOutcome:
    path: str
    stem: str | None
    status: str  # imported | failed
    format: str | None = None
    reason: str | None = None


def stem_of(path: Path) -> str:
    """``{stem}/topology_graph.json``, ``{stem}_topology.json`` or ``{stem}.json`` → stem."""
    if path.name == "topology_graph.json":
        return path.parent.name
    name = path.name.removesuffix(".json")
    return name.removesuffix("_topology") or name


def find_topology_files(paths: list[Path]) -> list[Path]:
    """The files named, and in each folder named: every ``topology_graph.json`` and
    ``*_topology.json`` below it, and the other ``*.json`` directly in it (not sidecars)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = set(p.rglob("topology_graph.json")) | set(p.rglob("*_topology.json"))
            found |= {f for f in p.glob("*.json") if not f.name.endswith(".meta.json")}
            out += sorted(f for f in found if f.is_file())
        else:
            out.append(p)
    return out


def import_topologies(store: ArtifactStore, paths: list[Path]) -> list[ImportOutcome]:
    """Import every file found; one bad file is reported with its reason, the rest go on."""
    outcomes: list[ImportOutcome] = []
    taken: dict[str, str] = {}
    for path in find_topology_files(paths):
        stem = stem_of(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            outcomes.append(ImportOutcome(str(path), stem, "failed", reason=f"cannot read: {exc}"))
            continue
        if stem in taken:
            outcomes.append(
                ImportOutcome(str(path), stem, "failed", reason=f"stem {stem!r} already imported from {taken[stem]}")
            )
            continue
        try:
            graph = read_topology_bytes(data, origin=str(path))
        except ValueError as exc:
            outcomes.append(ImportOutcome(str(path), stem, "failed", reason=str(exc)))
            continue
        fmt = detect_topology_format(json.loads(data))
        sha = hashlib.sha256(data).hexdigest()
        store.write_bytes(store.layout.topology(stem), data)
        store.write_json(
            store.layout.topology_meta(stem),
            {
                "key": f"{IMPORT_SOURCE}:{sha}",
                "source": IMPORT_SOURCE,
                "origin": str(path.resolve()),
                "sha256": sha,
                "format": fmt,
                "image_file_name": graph.image_info.file_name,
                "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
        taken[stem] = str(path)
        outcomes.append(ImportOutcome(str(path), stem, "imported", format=fmt))
    stems = [o.stem for o in outcomes if o.status == "imported" and o.stem]
    if stems:
        extend_sample(store, stems)
    return outcomes


def extend_sample(store: ArtifactStore, stems: list[str]) -> list[str]:
    """Add stems to ``sampled_images.json`` (written when missing); returns the whole list."""
    path = store.layout.run_file("sample")
    data: dict = {}
    if store.exists(path):
        loaded = store.read_json(path)
        data = loaded if isinstance(loaded, dict) else {"stems": list(loaded)}
    current = list(data.get("stems") or [])
    new = [s for s in stems if s not in current]
    data.setdefault("format_version", SAMPLE_FORMAT_VERSION)
    data.setdefault("seed", None)
    data.setdefault("parameters", {})
    data.setdefault("groups", [])
    data.setdefault("excluded", [])
    data.setdefault("warnings", [])
    data["stems"] = current + new
    data["n"] = len(data["stems"])
    data["imported"] = sorted(set(data.get("imported") or []) | set(stems))
    store.write_json(path, data)
    return data["stems"]
