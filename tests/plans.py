"""Synthetic plans as phases 1-2 leave them: topologies and (fixed, not embedded) contexts."""

from __future__ import annotations

from pathlib import Path

from floorplan_ft.cv.runner import process_image
from floorplan_ft.cv.sources import SourceConfig
from floorplan_ft.retrieval.corpus import corpus_hash, load_corpus
from floorplan_ft.retrieval.retrieve import make_context, write_context
from floorplan_ft.store import ArtifactStore
from floorplan_ft.synth import write_dataset


def prepare_plans(root: Path, count: int, complexes: int, seed: int) -> tuple[ArtifactStore, list[str]]:
    stems = write_dataset(root, count=count, complexes=complexes, seed=seed)
    store = ArtifactStore(root)
    config = SourceConfig(image_dir=str(root / "images"), annotation_dir=str(root / "annotations"))
    chunks = load_corpus()
    for i, stem in enumerate(stems):
        assert process_image(store, config, stem).status == "built"
        picks = [(i + j) % len(chunks) for j in range(3)]
        ctx = make_context(
            f"q{i}",
            chunks,
            picks,
            [0.9, 0.8, 0.7],
            embedding_identity="test",
            dimensions=8,
            corpus_hash_=corpus_hash(chunks),
            top_k=3,
        )
        write_context(store, stem, ctx)
    return store, stems
