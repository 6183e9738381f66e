"""Phase 2 tasks: embed the corpus once, embed the distinct plan queries once, write contexts.

A plan whose topology is missing, marked stale by phase 1, or does not read is skipped with a
reason naming the file and the problem; the others go on. `retrieval_failures.json` holds the
skipped plans of the data root's current state: a plan that gets a context leaves it."""

from __future__ import annotations

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from floorplan_ft.progress import summarize
from floorplan_ft.prompts import check_prompts, prompt_style
from floorplan_ft.providers.embeddings import BaseEmbeddingManager
from floorplan_ft.providers.factory import make_embedding_manager
from floorplan_ft.retrieval.corpus import corpus_hash, load_corpus
from floorplan_ft.retrieval.retrieve import (
    corpus_cache_key,
    distinct_queries,
    embed_corpus,
    embed_query_batch,
    plain_queries,
    query_cache_key,
    query_for,
    read_context,
    retrieval_health,
    retrieve_contexts,
    retrieve_contexts_from_store,
    topology_queries,
    update_retrieval_ledger,
    write_context,
)
from floorplan_ft.retrieval.team_table import TeamTableStore, corpus_table
from floorplan_ft.sampling import read_sample
from floorplan_ft.settings import Settings
from tasks.common import artifact_key, store_for


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


def retrieve_for_plans(settings: Settings) -> dict:
    """Phase 2 over the sampled plans. Contexts that are still current are left alone, so a rerun
    embeds nothing; plans without a usable topology are skipped into the ledger, not fatal."""
    store = store_for(settings)
    check_prompts(settings)  # a team prompt module that does not load stops here, before any work
    style, plain = prompt_style(settings), plain_queries(settings)
    stems = read_sample(store.layout.run_file("sample"))
    queries, skipped = topology_queries(store, stems, lambda stats: query_for(settings, stats))
    logger = get_run_logger()
    for stem, entry in list(skipped.items())[:5]:
        logger.warning("%s: no context (%s): %s", stem, entry["reason"], entry["detail"])
    if len(skipped) > 5:
        by_reason: dict[str, list[str]] = {}
        for stem, entry in skipped.items():
            by_reason.setdefault(entry["reason"], []).append(stem)
        logger.warning(
            "%d plans skipped in all (%s): see %s",
            len(skipped),
            "; ".join(f"{r}: {summarize(s, 5)}" for r, s in sorted(by_reason.items())),
            store.layout.run_file("retrieval_failures"),
        )

    manager = make_embedding_manager(settings)
    top_k = settings.retrieval.top_k
    table = corpus_table(settings.retrieval.corpus)
    team_table = TeamTableStore.from_settings(settings) if table else None
    try:
        return _retrieve(settings, store, manager, team_table, queries, skipped, top_k, style, plain)
    finally:
        if team_table is not None:
            team_table.close()


def _retrieve(settings, store, manager, team_table, queries, skipped, top_k, style, plain) -> dict:
    logger = get_run_logger()
    missing = [s for s, e in skipped.items() if e["reason"] == "missing_topology"]
    unusable = len(skipped) - len(missing)
    if team_table is not None:
        # The team's table: their rows and their vectors; only the queries are embedded here.
        if team_table.dimensions != int(manager.dimensions):
            raise ValueError(
                f"the team table {team_table.table} holds {team_table.dimensions}-dim vectors but "
                f"retrieval.dimensions is {manager.dimensions}: set retrieval.dimensions (EMBEDDING_DIM)"
            )
        chunks, vectors, c_hash = [], None, team_table.corpus_hash
    else:
        chunks = load_corpus(settings.paths.corpus_path)
        vectors = embed_corpus_task(manager, chunks, store.layout.embeddings_cache())
        c_hash = corpus_hash(chunks)

    contexts, todo = {}, {}
    identity = manager.identity()
    for stem, query in queries.items():
        try:
            ctx = read_context(store, stem)
        except (FileNotFoundError, ValueError):
            todo[stem] = query
            continue
        if ctx.is_current(
            embedding_identity=identity,
            dimensions=manager.dimensions,
            corpus_hash=c_hash,
            top_k=top_k,
            query=query,
            style=style,
        ):
            contexts[stem] = ctx
        else:
            todo[stem] = query
    if todo:
        distinct = distinct_queries(todo)
        query_vectors = embed_queries_task(manager, distinct, plain)
        if team_table is not None:
            fresh = retrieve_contexts_from_store(
                manager, team_table, todo, top_k, query_vectors=query_vectors, style=style, plain=plain
            )
        else:
            fresh = retrieve_contexts(
                manager, chunks, vectors, todo, top_k, query_vectors=query_vectors, style=style, plain=plain
            )
        for stem, ctx in fresh.items():
            write_context(store, stem, ctx)
        contexts.update(fresh)
    ledger = update_retrieval_ledger(store, skipped, done=list(contexts))
    health = retrieval_health(contexts, chunks, missing)
    logger.info(
        "phase 2: %d contexts (%d new), %d plans without topology, %d with a stale or unreadable one",
        len(contexts),
        len(todo),
        len(missing),
        unusable,
    )
    create_table_artifact(
        key=artifact_key("phase2-retrieval-health"),
        table=[
            {"measure": "plans with a context", "value": health["plans"]},
            {"measure": "written this run", "value": len(todo)},
            {"measure": "plans without topology", "value": len(missing)},
            {"measure": "plans skipped: stale or unreadable topology", "value": unusable},
            {"measure": "distinct queries", "value": health["distinct_queries"]},
            {"measure": "mean top-1 similarity", "value": health["mean_top1_similarity"]},
            {"measure": f"mean top-{top_k} similarity", "value": health["mean_topk_similarity"]},
            {"measure": "embedding", "value": identity},
        ]
        + [{"measure": f"retrieved: {cid}", "value": n} for cid, n in health["chunk_frequency"].items()],
        description="Phase 2: retrieval health (the plan wanted a mean top-5 similarity above 0.7 on Qwen3-Embedding)",
    )
    return {
        "status": "done" if not unusable else "done with failures",
        "contexts": len(contexts),
        "written": len(todo),
        "missing_topology": len(missing),
        "skipped": len(skipped),
        "failure_ledger": store.layout.run_file("retrieval_failures") if ledger else None,
        "distinct_queries": health["distinct_queries"],
        "mean_top1": health["mean_top1_similarity"],
        "mean_topk": health["mean_topk_similarity"],
    }
