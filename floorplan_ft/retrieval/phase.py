"""Phase 2: the relevant criteria for every sampled plan (`run`).

The corpus is embedded once, the distinct plan queries once, and one `rag_context.json` written per
plan. Contexts that are still current are left alone, so a rerun embeds nothing. A plan whose
topology is missing, marked stale by phase 1, or does not read is skipped with a reason naming the
file and the problem; the others go on. `retrieval_failures.json` holds the skipped plans of the
data root's current state: a plan that gets a context leaves it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from floorplan_ft.phase import DONE, DONE_WITH_FAILURES, Artifact, Failure, PhaseResult
from floorplan_ft.progress import summarize
from floorplan_ft.prompts import check_prompts, prompt_style
from floorplan_ft.providers.embeddings import BaseEmbeddingManager
from floorplan_ft.providers.factory import make_embedding_manager
from floorplan_ft.retrieval.corpus import corpus_hash, load_corpus
from floorplan_ft.retrieval.retrieve import (
    RagContext,
    distinct_queries,
    embed_corpus,
    embed_query_batch,
    plain_queries,
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
from floorplan_ft.store import ArtifactStore

# How the task layer embeds (Prefect caches both by content); the defaults embed directly.
EmbedCorpus = Callable[[BaseEmbeddingManager, list, str], np.ndarray]
EmbedQueries = Callable[[BaseEmbeddingManager, list[str], bool], np.ndarray]


def run(
    settings: Any,
    store: ArtifactStore,
    *,
    embed_corpus_fn: EmbedCorpus = embed_corpus,
    embed_queries_fn: EmbedQueries = embed_query_batch,
) -> PhaseResult:
    """Phase 2 over the sampled plans, from the local corpus or the team's pgvector table."""
    check_prompts(settings)  # a team prompt module that does not load stops here, before any work
    stems = read_sample(store.layout.run_file("sample"))
    queries, skipped = topology_queries(store, stems, lambda stats: query_for(settings, stats))
    manager = make_embedding_manager(settings)
    team_table = TeamTableStore.from_settings(settings) if corpus_table(settings.retrieval.corpus) else None
    try:
        contexts, written, chunks = _contexts(
            settings, store, manager, team_table, queries, embed_corpus_fn, embed_queries_fn
        )
    finally:
        if team_table is not None:
            team_table.close()
    ledger = update_retrieval_ledger(store, skipped, done=list(contexts))
    return _result(store, manager, contexts, written, chunks, skipped, ledger, settings.retrieval.top_k)


def _contexts(
    settings: Any,
    store: ArtifactStore,
    manager: BaseEmbeddingManager,
    team_table: TeamTableStore | None,
    queries: dict[str, str],
    embed_corpus_fn: EmbedCorpus,
    embed_queries_fn: EmbedQueries,
) -> tuple[dict[str, RagContext], int, list]:
    """(every plan's current context, how many were written now, the corpus chunks)."""
    top_k, style, plain = settings.retrieval.top_k, prompt_style(settings), plain_queries(settings)
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
        vectors = embed_corpus_fn(manager, chunks, store.layout.embeddings_cache())
        c_hash = corpus_hash(chunks)

    contexts, todo = {}, {}
    identity = manager.identity()
    for stem, query in queries.items():
        try:
            ctx = read_context(store, stem)
        except (FileNotFoundError, ValueError):
            todo[stem] = query
            continue
        current = ctx.is_current(
            embedding_identity=identity,
            dimensions=manager.dimensions,
            corpus_hash=c_hash,
            top_k=top_k,
            query=query,
            style=style,
        )
        if current:
            contexts[stem] = ctx
        else:
            todo[stem] = query
    if todo:
        query_vectors = embed_queries_fn(manager, distinct_queries(todo), plain)
        options = {"query_vectors": query_vectors, "style": style, "plain": plain}
        if team_table is not None:
            fresh = retrieve_contexts_from_store(manager, team_table, todo, top_k, **options)
        else:
            fresh = retrieve_contexts(manager, chunks, vectors, todo, top_k, **options)
        for stem, ctx in fresh.items():
            write_context(store, stem, ctx)
        contexts.update(fresh)
    return contexts, len(todo), chunks


def _result(
    store: ArtifactStore,
    manager: BaseEmbeddingManager,
    contexts: dict[str, RagContext],
    written: int,
    chunks: list,
    skipped: dict[str, dict],
    ledger: dict,
    top_k: int,
) -> PhaseResult:
    missing = [s for s, e in skipped.items() if e["reason"] == "missing_topology"]
    unusable = len(skipped) - len(missing)
    health = retrieval_health(contexts, chunks, missing)
    ledger_path = store.layout.run_file("retrieval_failures")
    table = [
        {"measure": "plans with a context", "value": health["plans"]},
        {"measure": "written this run", "value": written},
        {"measure": "plans without topology", "value": len(missing)},
        {"measure": "plans skipped: stale or unreadable topology", "value": unusable},
        {"measure": "distinct queries", "value": health["distinct_queries"]},
        {"measure": "mean top-1 similarity", "value": health["mean_top1_similarity"]},
        {"measure": f"mean top-{top_k} similarity", "value": health["mean_topk_similarity"]},
        {"measure": "embedding", "value": manager.identity()},
    ] + [{"measure": f"retrieved: {cid}", "value": n} for cid, n in health["chunk_frequency"].items()]
    return PhaseResult(
        step="2",
        status=DONE_WITH_FAILURES if unusable else DONE,
        counts={
            "contexts": len(contexts),
            "written": written,
            "missing_topology": len(missing),
            "skipped": len(skipped),
        },
        outputs={"failure_ledger": ledger_path if ledger else None},
        details={
            "distinct_queries": health["distinct_queries"],
            "mean_top1": health["mean_top1_similarity"],
            "mean_topk": health["mean_topk_similarity"],
        },
        failures=[Failure(stem, e["reason"], e["detail"]) for stem, e in skipped.items()],
        warnings=_skip_warnings(skipped, ledger_path),
        artifacts=[
            Artifact(
                key="phase2-retrieval-health",
                table=table,
                description="Phase 2: retrieval health (the plan wanted a mean top-5 similarity above 0.7 on "
                "Qwen3-Embedding)",
            )
        ],
    )


def _skip_warnings(skipped: dict[str, dict], ledger_path: str) -> list[str]:
    """The first five skipped plans by name, then the rest summarised per reason."""
    lines = [f"{stem}: no context ({e['reason']}): {e['detail']}" for stem, e in list(skipped.items())[:5]]
    if len(skipped) > 5:
        by_reason: dict[str, list[str]] = {}
        for stem, entry in skipped.items():
            by_reason.setdefault(entry["reason"], []).append(stem)
        lines.append(
            f"{len(skipped)} plans skipped in all ("
            + "; ".join(f"{r}: {summarize(s, 5)}" for r, s in sorted(by_reason.items()))
            + f"): see {ledger_path}"
        )
    return lines
