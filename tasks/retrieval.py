"""Phase 2 task: retrieve the criteria per plan (`floorplan_ft.retrieval.phase.run`), with the
corpus and query embeddings cached by Prefect on their content."""

from __future__ import annotations

import numpy as np
from prefect import task

from floorplan_ft.phase import PhaseResult
from floorplan_ft.providers.embeddings import BaseEmbeddingManager
from floorplan_ft.retrieval import phase
from floorplan_ft.retrieval.retrieve import corpus_cache_key, embed_corpus, embed_query_batch, query_cache_key
from floorplan_ft.settings import Settings
from tasks.common import PERSIST_THIS_RUN, publish, store_for


# The keys are computed from content (model identity and width, corpus text, the queries), never
# from the manager object, which cannot be hashed; a changed document or model gets a new key.
@task(
    name="embed-corpus",
    cache_key_fn=lambda _ctx, p: "corpus-" + corpus_cache_key(p["manager"], p["chunks"]),
    persist_result=True,
)
def embed_corpus_task(manager: BaseEmbeddingManager, chunks: list, cache_dir: str) -> np.ndarray:
    return embed_corpus(manager, chunks, cache_dir)


@task(
    name="embed-queries",
    cache_key_fn=lambda _ctx, p: "queries-" + query_cache_key(p["manager"], p["distinct"], p.get("plain", False)),
    persist_result=True,
)
def embed_queries_task(manager: BaseEmbeddingManager, distinct: list[str], plain: bool = False) -> np.ndarray:
    return embed_query_batch(manager, distinct, plain)


# The contexts are files in the data root, checked for currency on every run: not cached.
@task(name="retrieve-criteria", cache_policy=PERSIST_THIS_RUN, persist_result=True)
def retrieve_criteria(settings: Settings) -> PhaseResult:
    """Phase 2 over the sampled plans; plans without a usable topology are ledgered, not fatal."""
    result = phase.run(
        settings, store_for(settings), embed_corpus_fn=embed_corpus_task, embed_queries_fn=embed_queries_task
    )
    return publish(result)
