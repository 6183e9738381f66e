"""Phase 2 domain logic: corpus vectors (cached), per-plan queries, batched top-k retrieval.

No orchestration imports: the Prefect tasks call these functions.

* `embed_corpus` / `CorpusIndex`: chunk vectors cached as ``{key}.npy`` + ``{key}.json`` under a
  cache folder (default ``{data_root}/cache/embeddings``), the key built from the embedding
  manager's identity, the width and `corpus_hash`, so an edited chunk or another model never
  reuses stale vectors. Both files are written atomically; the JSON (written last) is the marker.
* `build_query`: a deterministic Korean query from a plan's topology statistics, phrased in the
  criteria's own words and thresholds (ratios are bucketed at the criteria thresholds, so plans
  that the criteria treat alike share a query, and are embedded once).
* `retrieve_contexts`: the distinct queries are embedded in one `embed_queries` call (the manager
  batches internally), ranked against the chunks with one matrix product; ties go to the earlier
  chunk in corpus order.
* `RagContext`: what ``output/{stem}/rag_context.json`` holds — the query, the ranked chunks,
  ``context_text`` (exactly `prompts.format_context` of the ranked chunks in the prompt style:
  our numbered criteria, or the team's ``[참고 i]`` blocks; i.e. exactly what the prompt
  includes) and provenance (embedding identity, dimensions, corpus hash, top_k).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from floorplan_ft.prompts import PROJECT_STYLE, TEAM_STYLE, format_context, prompt_style, team_query
from floorplan_ft.providers.embeddings import BaseEmbeddingManager, EmbeddingError, normalise_rows
from floorplan_ft.retrieval.corpus import CriteriaChunk, corpus_hash
from floorplan_ft.schemas import TopologyGraph, TopologyStatistics
from floorplan_ft.store import ArtifactStore

# Bump when the query wording, the ranking or the file layout changes: part of every key.
RETRIEVAL_VERSION = "1"


# ============================================================================ corpus vectors


def corpus_cache_key(manager: BaseEmbeddingManager, chunks: Sequence[CriteriaChunk]) -> str:
    """Content key of a corpus embedding: model identity + width + corpus content + version."""
    payload = "\n".join(
        [
            RETRIEVAL_VERSION,
            manager.identity(),
            str(int(manager.dimensions)),
            corpus_hash(list(chunks)),
        ]
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _cache_store(cache_dir: str | Path | ArtifactStore | None) -> ArtifactStore | None:
    if cache_dir is None:
        return None
    if isinstance(cache_dir, ArtifactStore):
        return ArtifactStore(cache_dir.layout.embeddings_cache())
    return ArtifactStore(cache_dir)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def embed_corpus(
    manager: BaseEmbeddingManager,
    chunks: Sequence[CriteriaChunk],
    cache_dir: str | Path | ArtifactStore | None = None,
) -> np.ndarray:
    """Unit-row float32 vectors of the chunks, in corpus order, cached on disk when asked.

    ``cache_dir``: a local folder or fsspec URL, an `ArtifactStore` (then its
    ``cache/embeddings``), or None (no cache). A cache entry is used only when its metadata matches
    the manager identity, the width, the corpus hash and the chunk ids; a broken entry is ignored
    and rewritten.
    """
    chunks = list(chunks)
    if not chunks:
        raise ValueError("embed_corpus: the corpus is empty")
    dims = int(manager.dimensions)
    key = corpus_cache_key(manager, chunks)
    meta = {
        "key": key,
        "retrieval_version": RETRIEVAL_VERSION,
        "embedding_identity": manager.identity(),
        "dimensions": dims,
        "corpus_hash": corpus_hash(chunks),
        "chunk_ids": [c.id for c in chunks],
        "shape": [len(chunks), dims],
    }
    store = _cache_store(cache_dir)
    if store is not None:
        npy_path, meta_path = store.path(f"{key}.npy"), store.path(f"{key}.json")
        if store.exists(meta_path) and store.exists(npy_path):
            try:
                stored = store.read_json(meta_path)
                vectors = np.load(io.BytesIO(store.read_bytes(npy_path)), allow_pickle=False)
                if stored == meta and list(vectors.shape) == meta["shape"]:
                    return np.asarray(vectors, dtype=np.float32)
            except (ValueError, OSError):
                pass  # unreadable entry: recompute and overwrite
    vectors = manager.embed_documents([c.content for c in chunks])
    vectors = normalise_rows(np.asarray(vectors, dtype=np.float32))
    if vectors.shape != (len(chunks), dims):
        raise EmbeddingError(
            f"{manager.identity()}: expected corpus vectors of shape {(len(chunks), dims)}, got {vectors.shape}"
        )
    if store is not None:
        store.write_bytes(npy_path, _npy_bytes(vectors))
        store.write_json(meta_path, meta)  # written last: its presence marks a complete entry
    return vectors


@dataclass(frozen=True)
class CorpusIndex:
    """The corpus, its vectors and their provenance."""

    chunks: tuple[CriteriaChunk, ...]
    vectors: np.ndarray
    embedding_identity: str
    dimensions: int
    corpus_hash: str

    @classmethod
    def build(
        cls,
        manager: BaseEmbeddingManager,
        chunks: Sequence[CriteriaChunk],
        cache_dir: str | Path | ArtifactStore | None = None,
    ) -> CorpusIndex:
        chunks = tuple(chunks)
        return cls(
            chunks=chunks,
            vectors=embed_corpus(manager, chunks, cache_dir),
            embedding_identity=manager.identity(),
            dimensions=int(manager.dimensions),
            corpus_hash=corpus_hash(list(chunks)),
        )

    def search(self, query_vectors: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, similarities), each (n_queries, k): see `rank`."""
        return rank(self.vectors, query_vectors, top_k)


# ============================================================================ queries


def _stat(stats: Any, name: str, default: Any = None) -> Any:
    if isinstance(stats, Mapping):
        value = stats.get(name, default)
    else:
        value = getattr(stats, name, default)
    return default if value is None else value


def _as_statistics(stats: TopologyStatistics | TopologyGraph | Mapping[str, Any]) -> Any:
    if isinstance(stats, TopologyGraph):
        return stats.statistics
    if isinstance(stats, Mapping) and "statistics" in stats and "nodes" in stats:
        return stats["statistics"]
    return stats


def build_query(stats: TopologyStatistics | TopologyGraph | Mapping[str, Any], *, include_counts: bool = False) -> str:
    """A Korean retrieval query from a plan's statistics (deterministic).

    The query states where the plan stands on each of the four values, in the criteria's own words
    and at the criteria's own thresholds. Deficiencies come first and are spelled out with the
    vocabulary of the criterion that covers them (안방 창 없음 → 외기창·불합격, 무창실 비율 높음,
    타워형/혼합형 → 맞통풍·환기 보완, LDK 부족/과다, 수납 부족 → 드레스룸·팬트리·알파룸, 베이 부족);
    what is compliant follows in a few words, so the top-k favours the criteria the plan needs.

    Bays and ratios are bucketed at the criteria thresholds (bays 0-3 / "4베이 이상"; windowless
    30%; LDK 30-40%; storage 5/10%; balcony present or not, as the criteria set no threshold for
    it), so plans the criteria treat alike share one query and are embedded once. Room and
    bathroom counts do not change which criterion applies, so they are left out unless
    ``include_counts`` (the teacher sees them anyway in the topology); with them, about twice as
    many distinct queries.
    A dict with missing keys is accepted: unknown values are left out.
    """
    s = _as_statistics(stats)
    structure = _stat(s, "structure_type", "")
    bays = int(_stat(s, "bay_count", 0))
    windowless = float(_stat(s, "windowless_ratio", 0.0))
    balcony = float(_stat(s, "balcony_ratio", 0.0))
    ldk = _stat(s, "ldk_ratio", None)  # None: unknown, left out of the query (never read as 0)
    storage = _stat(s, "storage_ratio", None)
    master_window = _stat(s, "master_bedroom_has_window", None)

    bay_text = "4베이 이상" if bays >= 4 else f"{bays}베이"
    grade = {4: "최우수", 3: "우수", 2: "보통"}.get(min(bays, 4), "미흡")
    head = f"{structure} 구조 {bay_text}" if structure else bay_text
    if include_counts:
        head += f", 방 {int(_stat(s, 'room_count', 0))}개, 화장실 {int(_stat(s, 'bathroom_count', 0))}개"
    problems: list[str] = []
    fine: list[str] = []

    # Mandatory condition: the master bedroom's exterior window.
    if master_window is False:
        problems.append("안방 창 없음: 안방(가장 큰 침실)에 외기에 면한 창이 없어 필수 조건 미충족, 불합격.")
    elif master_window is True:
        fine.append("안방 창 있음")

    # 채광: bays and windowless rooms.
    if bays < 3:
        problems.append(f"채광 {grade}: {bay_text}로 베이 수가 적어 남향 채광 부족.")
    else:
        fine.append(f"채광 {bay_text} {grade}")
    if windowless > 30:
        problems.append("무창실 비율 30% 초과로 높음: 창이 없는 실(무창실)이 많아 자연광 부족.")
    else:
        fine.append("무창실 비율 30% 이하")

    # 환기: structure type.
    if structure == "타워형":
        problems.append("환기 미흡: 타워형으로 맞통풍이 어렵고 주방 창·환기 보완 필요.")
    elif structure == "혼합형":
        problems.append("환기 보통: 혼합형으로 창이 직각 배치, 부분적인 교차 환기만 가능.")
    elif structure == "판상형":
        fine.append("판상형 맞통풍 환기")

    # 가족융화: LDK share.
    if ldk is None:
        pass
    elif float(ldk) < 30:
        problems.append("가족융화 부족: LDK(거실·주방·식당) 비율 30% 미만으로 공용 공간이 작음.")
    elif float(ldk) > 40:
        problems.append("가족융화: LDK(거실·주방·식당) 비율 40% 초과로 과다, 개인 공간과 수납 감소.")
    else:
        fine.append("LDK 비율 30~40% 적정")

    # 수납: storage share.
    if storage is None:
        pass
    elif float(storage) < 5:
        problems.append(
            "수납 부족: 드레스룸·팬트리·다용도실 수납 공간 비율 5% 미만, 알파룸 전환이나 붙박이장 등 수납 보완."
        )
    elif float(storage) < 10:
        problems.append("수납 보통: 드레스룸·팬트리 수납 공간 비율 5~10%.")
    else:
        fine.append("수납 비율 10% 이상 우수")

    # Balcony: only a reference figure in the daylight criteria (no threshold), so presence only.
    fine.append("발코니 있음" if balcony > 0 else "발코니 없음")

    parts = [f"{head} 평면의 평가 기준."]
    parts += problems
    parts.append("충족: " + ", ".join(fine) + ".")
    return " ".join(parts)


def query_for(settings: Any, stats: TopologyStatistics | TopologyGraph | Mapping[str, Any]) -> str:
    """The plan's retrieval query in the configured prompt style: `build_query` (project) or the
    team service's "{structure_type} 건축물 {bay_count}Bay 침실 {room_count}개" (team)."""
    if prompt_style(settings) == TEAM_STYLE:
        return team_query(_as_statistics(stats))
    return build_query(stats)


def plain_queries(settings: Any) -> bool:
    """Team style embeds the query as plain text, as their service does (no query instruction)."""
    return prompt_style(settings) == TEAM_STYLE


def distinct_queries(queries: Mapping[str, str] | Iterable[str]) -> list[str]:
    """The distinct query texts, sorted (a stable order for batching and cache keys)."""
    values = queries.values() if isinstance(queries, Mapping) else queries
    return sorted(set(values))


def query_cache_key(
    manager: BaseEmbeddingManager | str, queries: Mapping[str, str] | Iterable[str], plain: bool = False
) -> str:
    """Content key of a batch of query embeddings: manager identity + the sorted distinct queries.

    Same key ⇔ `embed_query_batch(manager, distinct_queries(queries))` gives the same matrix.
    """
    identity = manager if isinstance(manager, str) else manager.identity()
    h = hashlib.sha256(f"{RETRIEVAL_VERSION}\n{identity}\n{'plain' if plain else ''}".encode())
    for q in distinct_queries(queries):
        h.update(hashlib.sha256(q.encode()).digest())
    return h.hexdigest()[:24]


def embed_query_batch(manager: BaseEmbeddingManager, distinct: Sequence[str], plain: bool = False) -> np.ndarray:
    """One `embed_queries` call over the distinct queries → unit rows, in the given order.
    ``plain``: embed them as documents (no query instruction), as the team's service does."""
    distinct = list(distinct)
    if not distinct:
        return np.zeros((0, int(manager.dimensions)), dtype=np.float32)
    embed = manager.embed_documents if plain else manager.embed_queries
    vectors = normalise_rows(np.asarray(embed(distinct), dtype=np.float32))
    if vectors.shape != (len(distinct), int(manager.dimensions)):
        raise EmbeddingError(
            f"{manager.identity()}: expected query vectors of shape "
            f"{(len(distinct), int(manager.dimensions))}, got {vectors.shape}"
        )
    return vectors


# ============================================================================ ranking


def rank(chunk_vectors: np.ndarray, query_vectors: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k of every query against every chunk with one matrix product.

    Returns (indices, similarities), each (n_queries, min(top_k, n_chunks)), best first; equal
    similarities keep corpus order (a stable sort), so results are deterministic.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1 (setting retrieval.top_k), got {top_k}")
    chunks = normalise_rows(chunk_vectors)
    queries = normalise_rows(query_vectors)
    if queries.shape[0] == 0:
        return np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    if chunks.shape[1] != queries.shape[1]:
        raise EmbeddingError(
            f"query width {queries.shape[1]} != corpus width {chunks.shape[1]}: the corpus "
            "vectors come from another model or dimensions setting"
        )
    sims = queries @ chunks.T  # (n_queries, n_chunks)
    k = min(int(top_k), chunks.shape[0])
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


# ============================================================================ contexts


class RetrievedChunk(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(ge=1)
    id: str
    content: str
    similarity: float
    source: str


class RagContext(BaseModel):
    """``output/{stem}/rag_context.json``."""

    model_config = ConfigDict(extra="forbid")

    query: str
    chunks: list[RetrievedChunk]
    context_text: str = Field(
        description="prompts.format_context(chunks, context_format): exactly what the prompt includes"
    )
    embedding_identity: str
    dimensions: int
    corpus_hash: str
    top_k: int
    retrieval_version: str = RETRIEVAL_VERSION
    context_format: Literal["team"] | None = Field(
        None, description="None: ft-pipeline's numbered criteria; 'team': the team's [참고 i] blocks"
    )

    @property
    def style(self) -> str:
        return self.context_format or PROJECT_STYLE

    def prompt_criteria(self) -> list[dict[str, Any]]:
        """The ranked chunks as `prompts.build_user_prompt` / `build_messages` take them."""
        return [c.model_dump() for c in self.chunks]

    def is_current(
        self,
        *,
        embedding_identity: str,
        dimensions: int,
        corpus_hash: str,
        top_k: int,
        query: str | None = None,
        style: str = PROJECT_STYLE,
    ) -> bool:
        """Whether this context still matches the settings, corpus, query and prompt formatting."""
        return (
            self.retrieval_version == RETRIEVAL_VERSION
            and self.embedding_identity == embedding_identity
            and self.dimensions == int(dimensions)
            and self.corpus_hash == corpus_hash
            and self.top_k == int(top_k)
            and (query is None or self.query == query)
            and self.style == style
            and self.context_text == format_context(self.chunks, self.style)
        )


def make_context(
    query: str,
    chunks: Sequence[CriteriaChunk],
    indices: Sequence[int],
    similarities: Sequence[float],
    *,
    embedding_identity: str,
    dimensions: int,
    corpus_hash_: str,
    top_k: int,
    style: str = PROJECT_STYLE,
) -> RagContext:
    hits = [
        RetrievedChunk(
            rank=r,
            id=chunks[int(i)].id,
            content=chunks[int(i)].content,
            similarity=round(float(s), 6),
            source=chunks[int(i)].source,
        )
        for r, (i, s) in enumerate(zip(indices, similarities, strict=True), start=1)
    ]
    return context_from_hits(
        query,
        hits,
        embedding_identity=embedding_identity,
        dimensions=dimensions,
        corpus_hash_=corpus_hash_,
        top_k=top_k,
        style=style,
    )


def context_from_hits(
    query: str,
    hits: Sequence[RetrievedChunk],
    *,
    embedding_identity: str,
    dimensions: int,
    corpus_hash_: str,
    top_k: int,
    style: str = PROJECT_STYLE,
) -> RagContext:
    """A `RagContext` of ranked hits, its context text in the prompt style's format."""
    hits = list(hits)
    return RagContext(
        query=query,
        chunks=hits,
        context_text=format_context(hits, style),
        embedding_identity=embedding_identity,
        dimensions=int(dimensions),
        corpus_hash=corpus_hash_,
        top_k=int(top_k),
        context_format=TEAM_STYLE if style == TEAM_STYLE else None,
    )


def _distinct_query_vectors(
    manager: BaseEmbeddingManager, queries: Mapping[str, str], query_vectors: np.ndarray | None, plain: bool
) -> tuple[list[str], np.ndarray]:
    """The distinct queries (sorted) and their vectors: embedded in one call unless given."""
    distinct = distinct_queries(queries)
    if query_vectors is None:
        return distinct, embed_query_batch(manager, distinct, plain)
    if np.asarray(query_vectors).shape[0] != len(distinct):
        raise ValueError(f"{len(distinct)} distinct queries but {np.asarray(query_vectors).shape[0]} vectors")
    return distinct, query_vectors


def retrieve_contexts(
    manager: BaseEmbeddingManager,
    chunks: Sequence[CriteriaChunk],
    chunk_vectors: np.ndarray,
    queries: Mapping[str, str],
    top_k: int,
    *,
    query_vectors: np.ndarray | None = None,
    style: str = PROJECT_STYLE,
    plain: bool = False,
) -> dict[str, RagContext]:
    """Top-k criteria for every plan: ``{stem: query}`` → ``{stem: RagContext}``.

    Identical queries are embedded once: the distinct queries (`distinct_queries`, sorted) go to
    the manager in a single `embed_queries` call. ``query_vectors``, when given, are those
    vectors already computed (e.g. a cached `embed_query_batch` result keyed by
    `query_cache_key`), rows in `distinct_queries(queries)` order; the manager is then not called.
    """
    chunks = list(chunks)
    chunk_vectors = np.asarray(chunk_vectors, dtype=np.float32)
    if chunk_vectors.shape[0] != len(chunks):
        raise ValueError(f"{len(chunks)} chunks but {chunk_vectors.shape[0]} chunk vectors")
    if not queries:
        return {}
    distinct, query_vectors = _distinct_query_vectors(manager, queries, query_vectors, plain)
    indices, sims = rank(chunk_vectors, query_vectors, top_k)
    row = {q: i for i, q in enumerate(distinct)}
    identity, dims, c_hash = manager.identity(), int(manager.dimensions), corpus_hash(chunks)
    by_query: dict[str, RagContext] = {}
    out: dict[str, RagContext] = {}
    for stem in sorted(queries):
        q = queries[stem]
        if q not in by_query:
            r = row[q]
            by_query[q] = make_context(
                q,
                chunks,
                indices[r],
                sims[r],
                embedding_identity=identity,
                dimensions=dims,
                corpus_hash_=c_hash,
                top_k=top_k,
                style=style,
            )
        out[stem] = by_query[q].model_copy(deep=True)
    return out


def retrieve_contexts_from_store(
    manager: BaseEmbeddingManager,
    store: Any,
    queries: Mapping[str, str],
    top_k: int,
    *,
    query_vectors: np.ndarray | None = None,
    style: str = PROJECT_STYLE,
    plain: bool = False,
) -> dict[str, RagContext]:
    """Like `retrieve_contexts`, against a vector store (e.g. the team's table) instead of corpus
    vectors in memory: ``store.search(query_vectors, top_k)`` per distinct query."""
    if not queries:
        return {}
    distinct, query_vectors = _distinct_query_vectors(manager, queries, query_vectors, plain)
    hits = store.search(np.asarray(query_vectors, dtype=np.float32), top_k)
    identity, dims = manager.identity(), int(manager.dimensions)
    by_query = {
        q: context_from_hits(
            q,
            hits[r],
            embedding_identity=identity,
            dimensions=dims,
            corpus_hash_=store.corpus_hash or "",
            top_k=top_k,
            style=style,
        )
        for r, q in enumerate(distinct)
    }
    return {stem: by_query[queries[stem]].model_copy(deep=True) for stem in sorted(queries)}


def write_context(store: ArtifactStore, stem: str, ctx: RagContext) -> str:
    """Write ``output/{stem}/rag_context.json`` atomically; returns the path."""
    # A project-style context keeps the file layout it always had (no context_format key).
    exclude = {"context_format"} if ctx.context_format is None else None
    return store.write_json(store.layout.rag_context(stem), ctx.model_dump(mode="json", exclude=exclude))


def read_context(store: ArtifactStore, stem: str) -> RagContext:
    """Read and validate ``output/{stem}/rag_context.json`` (FileNotFoundError when missing)."""
    path = store.layout.rag_context(stem)
    if not store.exists(path):
        raise FileNotFoundError(path)
    try:
        return RagContext.model_validate(store.read_json(path))
    except ValueError as exc:
        raise ValueError(f"{path}: not a valid rag context ({exc})") from None


# ============================================================================ health


def topology_queries(
    store: ArtifactStore, stems: Sequence[str], query: Any
) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """(query per usable plan, skipped plans). `query` maps a graph's statistics to the query text.

    A plan is skipped, with a reason and a detail naming the file and the problem, when its
    topology is missing (``missing_topology``), marked stale by phase 1 because its inputs no
    longer build (``stale_topology``), or does not read or validate (``bad_topology``)."""
    queries: dict[str, str] = {}
    skipped: dict[str, dict[str, str]] = {}
    for stem in stems:
        found = store.plan_topology(stem)
        if found.graph is None:
            skipped[stem] = {"reason": found.reason, "detail": found.detail}
        else:
            queries[stem] = query(found.graph.statistics)
    return queries, skipped


def update_retrieval_ledger(
    store: ArtifactStore, skipped: Mapping[str, Mapping[str, str]], done: Sequence[str]
) -> dict[str, dict]:
    """Merge this run into `retrieval_failures.json`: skipped plans added (reason, detail, time),
    plans with a context now (`done`) removed, others left as they were. Returns the ledger."""
    from datetime import UTC, datetime

    path = store.layout.run_file("retrieval_failures")
    ledger: dict[str, dict] = {}
    if store.exists(path):
        try:
            ledger = dict(store.read_json(path).get("failures", {}))
        except (ValueError, AttributeError, TypeError):
            ledger = {}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    for stem in done:
        ledger.pop(stem, None)
    for stem, entry in skipped.items():
        ledger[stem] = {"reason": entry["reason"], "detail": entry["detail"], "at": now}
    store.write_json(path, {"failures": dict(sorted(ledger.items()))}, indent=1)
    return ledger


def retrieval_health(
    contexts: Mapping[str, RagContext],
    chunks: Sequence[CriteriaChunk],
    plans_without_topology: int | Sequence[str] = 0,
) -> dict[str, Any]:
    """Summary numbers for a retrieval run (for a table artifact / the stats report)."""
    missing = int(plans_without_topology) if isinstance(plans_without_topology, int) else len(plans_without_topology)
    frequency = {c.id: 0 for c in chunks}
    top1: list[float] = []
    topk: list[float] = []
    for ctx in contexts.values():
        if ctx.chunks:
            top1.append(ctx.chunks[0].similarity)
        for hit in ctx.chunks:
            topk.append(hit.similarity)
            frequency[hit.id] = frequency.get(hit.id, 0) + 1

    def mean(values: list[float]) -> float | None:
        return round(float(np.mean(values)), 6) if values else None

    return {
        "plans": len(contexts),
        "plans_without_topology": missing,
        "distinct_queries": len({ctx.query for ctx in contexts.values()}),
        "mean_top1_similarity": mean(top1),
        "min_top1_similarity": round(float(min(top1)), 6) if top1 else None,
        "mean_topk_similarity": mean(topk),
        "chunk_frequency": frequency,
        "never_retrieved": [cid for cid, n in frequency.items() if n == 0],
    }
