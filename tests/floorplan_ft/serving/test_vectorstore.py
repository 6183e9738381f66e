"""Vector stores against a real PostgreSQL with pgvector (the `pgserver` wheel, started here and
listening on 127.0.0.1), embeddings from the local wire-format server (512 and 768 wide) and the
packaged MiniLM (384): store and search, the 512 → 768 migration with its checks, switch,
rollback, drop-old, a legacy table, failures that change nothing, the CLI, and the service on
pgvector sending the same prompt as on the in-memory store."""

from __future__ import annotations

import json

import numpy as np
import psycopg  # noqa: F401  (dev extra: psycopg[binary]; the suite fails without it)
import pytest
from fakes.provider_server import Reply
from service_helpers import (
    OPENAI_KEY,
    SHARED_DATA_ROOT,
    minilm_manager,
    sample_graphs,
    service_settings,
)

from floorplan_ft.providers.openai_embeddings import OpenAIEmbeddingManager
from floorplan_ft.retrieval.corpus import load_corpus
from floorplan_ft.retrieval.pgvector import VectorStoreError, connect
from floorplan_ft.retrieval.retrieve import build_query, embed_corpus, retrieve_contexts
from floorplan_ft.serving.service import AnalysisService
from floorplan_ft.serving.vector_migrations import (
    MigrationError,
    drop_old_tables,
    migrate_vectors,
    rollback_vectors,
    sample_queries,
    table_name_for,
    vector_status,
)
from floorplan_ft.serving.vectorstore import MemoryVectorStore, PgVectorStore


@pytest.fixture
def fake(fake_provider):
    return fake_provider


@pytest.fixture
def corpus():
    return load_corpus()


def openai_512(fake):
    """The service's current store: text-embedding-3-small at 512 dims (from the fake server)."""
    return OpenAIEmbeddingManager("text-embedding-3-small", 512, api_key=OPENAI_KEY, base_url=fake.openai_base_url)


def compatible_768(fake):
    """The new local model (Qwen3-Embedding at 768) behind an OpenAI-compatible server (the fake)."""
    return OpenAIEmbeddingManager(
        "Qwen/Qwen3-Embedding-0.6B", 768, base_url=fake.openai_base_url, provider="openai-compatible"
    )


def live_and_previous(dsn):
    status = vector_status(dsn)
    return status["live"], status["previous"]


def view_width(dsn) -> int:
    with connect(dsn) as conn:
        return conn.execute("SELECT vector_dims(embedding) FROM criteria_vectors LIMIT 1").fetchone()[0]


def tables(dsn) -> set[str]:
    with connect(dsn) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE 'criteria_vectors%'")
        return {r[0] for r in rows}


def test_memory_store_ranks_like_phase_two(corpus):
    manager = minilm_manager()
    vectors = embed_corpus(manager, corpus, SHARED_DATA_ROOT / "cache" / "embeddings")
    store = MemoryVectorStore(corpus, vectors, embedding_identity=manager.identity())
    queries = {f"p{i}": build_query(g.statistics) for i, g in enumerate(sample_graphs())}
    contexts = retrieve_contexts(manager, corpus, vectors, queries, 5)
    for stem, query in queries.items():
        hits = store.search(manager.embed_queries([query]), 5)[0]
        ref = contexts[stem].chunks  # phase 2 embeds the queries in one batch: floats differ ~1e-6
        assert [h.model_dump(exclude={"similarity"}) for h in hits] == [
            c.model_dump(exclude={"similarity"}) for c in ref
        ]
        assert np.allclose([h.similarity for h in hits], [c.similarity for c in ref], atol=1e-5)


def test_pgvector_store_searches_like_the_memory_store(dsn, corpus):
    manager = minilm_manager()
    report = migrate_vectors(dsn, None, manager, corpus)  # the initial load
    assert report.action == "loaded" and report.switched and report.new_rows == len(corpus)
    assert all(c.ok for c in report.checks) and report.view == "criteria_vectors"
    assert report.new_table == table_name_for(manager, corpus)
    assert report.new_table.startswith("criteria_vectors_384_all_minilm_l6_v2_")

    store = PgVectorStore(dsn)  # the live table, from the pointer
    memory = MemoryVectorStore.build(manager, corpus, SHARED_DATA_ROOT / "cache" / "embeddings")
    assert store.count() == len(corpus) and store.dimensions == 384
    assert store.embedding_identity == manager.identity()
    queries = sample_queries(corpus) + ["안방에 창이 없으면 불합격인가요?", "수납 공간 비율 기준"]
    query_vectors = manager.embed_queries(queries)
    got, expected = store.search(query_vectors, 5), memory.search(query_vectors, 5)
    for hits, ref in zip(got, expected, strict=True):
        assert [h.id for h in hits] == [r.id for r in ref]
        assert [h.content for h in hits] == [r.content for r in ref]
        assert np.allclose([h.similarity for h in hits], [r.similarity for r in ref], atol=1e-5)
    described = store.describe()
    assert described["backend"] == "pgvector" and described["table"] == report.new_table
    assert described["database"]["dbname"].startswith("t_") and "password" not in json.dumps(described)
    assert view_width(dsn) == 384
    store.close()

    again = migrate_vectors(dsn, None, manager, corpus)  # nothing to do: no re-embedding
    assert again.action == "already-current" and not again.switched


def test_migration_512_to_768_checks_switches_rolls_back_and_drops(dsn, fake, corpus):
    old = migrate_vectors(dsn, None, openai_512(fake), corpus)
    old_table = old.new_table
    assert old_table.startswith("criteria_vectors_512_text_embedding_3_small_")

    new = migrate_vectors(dsn, None, compatible_768(fake), corpus)
    assert new.action == "migrated" and new.switched
    assert (new.old_table, new.old_rows, new.old_dimensions) == (old_table, len(corpus), 512)
    assert (new.new_rows, new.new_dimensions) == (len(corpus), 768)
    names = {c.name: c for c in new.checks}
    assert names["new row count"].ok and names["old vs new row count"].ok and names["old ids kept"].ok
    sample_checks = [c for c in new.checks if c.name.startswith("sample query top-1")]
    assert len(sample_checks) == len(sample_queries(corpus)) and all(c.ok for c in sample_checks)
    assert live_and_previous(dsn) == (new.new_table, old_table)
    assert view_width(dsn) == 768
    assert tables(dsn) == {old_table, new.new_table}  # the old table is kept

    # The service on the new table, with the new embedding settings, sends the same prompt as on
    # the in-memory store with the same model.
    settings = service_settings(None, fake)
    pg_service = AnalysisService(
        settings, embedding_manager=compatible_768(fake), vector_store=PgVectorStore(dsn), chat_client=None
    )
    memory_service = AnalysisService(settings, embedding_manager=compatible_768(fake))
    graph = sample_graphs()[0]
    messages = []
    for service in (pg_service, memory_service):
        service.analyze(graph)
        messages.append(fake.requests_to("/chat/completions")[-1].body["messages"])
        service.close()
    assert messages[0] == messages[1]
    assert pg_service.health()["vector_store"]["table"] == new.new_table
    with pytest.raises(VectorStoreError, match="retrieval.dimensions"):
        AnalysisService(settings, embedding_manager=openai_512(fake), vector_store=PgVectorStore(dsn))

    back = rollback_vectors(dsn)
    assert back.action == "rolled-back" and back.new_table == old_table
    assert live_and_previous(dsn) == (old_table, new.new_table)
    assert view_width(dsn) == 512
    assert PgVectorStore(dsn).dimensions == 512  # a restarted 512 service reads the old table

    again = rollback_vectors(dsn)  # idempotent: a second rollback never switches forward again
    assert again.action == "already-rolled-back" and not again.switched
    assert (again.new_table, again.old_table) == (old_table, new.new_table)
    assert live_and_previous(dsn) == (old_table, new.new_table) and view_width(dsn) == 512

    forward = migrate_vectors(dsn, None, compatible_768(fake), corpus, drop_old=True)
    assert forward.switched and forward.dropped == [old_table]
    assert tables(dsn) == {new.new_table} and live_and_previous(dsn) == (new.new_table, None)
    with pytest.raises(MigrationError, match="no previous table"):
        rollback_vectors(dsn)
    log = [e["action"] for e in vector_status(dsn)["log"]]
    assert log[:4] == ["drop-old", "migrated", "rollback", "migrated"]


def test_a_failed_re_embed_or_write_changes_nothing(dsn, fake, corpus):
    old_table = migrate_vectors(dsn, None, openai_512(fake), corpus).new_table

    fake.push(Reply.server_error(500))  # the embeddings server fails mid-migration
    with pytest.raises(MigrationError, match="re-embedding the corpus failed, nothing was changed"):
        migrate_vectors(dsn, None, compatible_768(fake), corpus)
    assert live_and_previous(dsn) == (old_table, None) and tables(dsn) == {old_table}

    class NaNAfterWrite(OpenAIEmbeddingManager):
        """Vectors a server broke: pgvector rejects NaN while the rows are being written."""

        def embed_documents(self, texts):
            vectors = super().embed_documents(texts)
            vectors[-1, 0] = np.nan
            return vectors

    broken = NaNAfterWrite(
        "Qwen/Qwen3-Embedding-0.6B", 768, base_url=fake.openai_base_url, provider="openai-compatible"
    )
    with pytest.raises(MigrationError, match="nothing was changed"):
        migrate_vectors(dsn, None, broken, corpus)
    assert live_and_previous(dsn) == (old_table, None) and tables(dsn) == {old_table}
    assert PgVectorStore(dsn).count() == len(corpus)

    shrunk = corpus[:-1]  # a chunk went missing: the row-count check refuses to switch
    with pytest.raises(MigrationError, match="old vs new row count: old 16, new 15"):
        migrate_vectors(dsn, None, compatible_768(fake), shrunk)
    assert live_and_previous(dsn) == (old_table, None) and tables(dsn) == {old_table}
    report = migrate_vectors(dsn, None, compatible_768(fake), shrunk, allow_count_change=True)
    assert report.switched and report.new_rows == 15


def test_a_legacy_table_is_migrated_and_can_be_rolled_back_to(dsn, fake, corpus):
    """The service's existing store: a plain table of 512-dim vectors, no bookkeeping."""
    vectors = openai_512(fake).embed_documents([c.content for c in corpus])
    with connect(dsn) as conn, conn.transaction():
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute("CREATE TABLE rag_chunks (id text PRIMARY KEY, content text, embedding vector(512))")
        for chunk, vector in zip(corpus, vectors, strict=True):
            conn.execute(
                "INSERT INTO rag_chunks VALUES (%s, %s, %s::vector)",
                (chunk.id, chunk.content, "[" + ",".join(map(str, vector)) + "]"),
            )

    with pytest.raises(MigrationError, match="does not exist"):
        migrate_vectors(dsn, "no_such_table", compatible_768(fake), corpus)
    report = migrate_vectors(dsn, "rag_chunks", compatible_768(fake), corpus)
    assert report.switched and report.old_rows == len(corpus) and report.old_dimensions == 512
    back = rollback_vectors(dsn)
    assert back.new_table == "rag_chunks"
    legacy = PgVectorStore(dsn)
    assert legacy.dimensions == 512 and legacy.embedding_identity.startswith("legacy")
    hits = legacy.search(openai_512(fake).embed_queries([corpus[3].content]), 3)[0]
    assert hits[0].id == corpus[3].id and hits[0].source == ""  # no source column in that table
    settings = service_settings(None, fake)
    with AnalysisService(settings, embedding_manager=openai_512(fake), vector_store=legacy) as service:
        assert any("unknown" in w for w in service.health()["warnings"])


def test_vectors_cli_migrate_rollback_drop_status(dsn, fake, corpus, no_dotenv, monkeypatch):
    from typer.testing import CliRunner

    from ft_pipeline.cli import app

    old_table = migrate_vectors(dsn, None, openai_512(fake), corpus).new_table
    # The new embedding, as the settings name it: Qwen3-Embedding at 768 behind a compatible server.
    monkeypatch.setenv("EMBEDDING_PROVIDER", "openai-compatible")
    args = [
        "--set",
        f"retrieval.base_url={fake.openai_base_url}",
        "--set",
        "retrieval.dimensions=768",
        "--set",
        "retrieval.model=Qwen/Qwen3-Embedding-0.6B",
    ]
    runner = CliRunner()

    result = runner.invoke(app, ["vectors", "migrate", "--dsn", dsn, *args])
    assert result.exit_code == 0, result.output
    assert f"migrated: {old_table} -> criteria_vectors_768_qwen3_embedding_0_6b_" in result.output
    assert "[ok] new row count: 16 rows, 16 distinct ids, corpus 16" in result.output
    assert "FAIL" not in result.output and "the old table is kept" in result.output
    assert view_width(dsn) == 768

    result = runner.invoke(app, ["vectors", "migrate", "--dsn", dsn, "--rollback"])
    assert result.exit_code == 0 and "rolled-back" in result.output
    assert view_width(dsn) == 512
    result = runner.invoke(app, ["vectors", "migrate", "--dsn", dsn, "--rollback"])
    assert result.exit_code == 0, result.output
    assert f"already rolled back: {old_table} is live" in result.output and "nothing changed" in result.output
    assert view_width(dsn) == 512  # still the old table: the second rollback did not switch forward

    result = runner.invoke(app, ["vectors", "migrate", "--dsn", dsn, "--drop-old", *args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["switched"] and report["dropped"]  # re-applied (table rebuilt), then the old dropped

    status = json.loads(runner.invoke(app, ["vectors", "status", "--dsn", dsn]).stdout)
    assert status["previous"] is None and len(status["tables"]) == 1
    assert status["tables"][0]["dimensions"] == 768

    result = runner.invoke(app, ["vectors", "migrate", "--dsn", dsn, "--rollback"])
    assert result.exit_code == 2 and "no previous table" in result.output
    result = runner.invoke(app, ["vectors", "migrate", "--dsn", "postgresql://postgres:hunter2@127.0.0.1:1/x"])
    assert result.exit_code == 2 and "cannot connect" in result.output and "hunter2" not in result.output


def test_drop_old_alone_and_pinned_tables(dsn, fake, corpus):
    first = migrate_vectors(dsn, None, openai_512(fake), corpus).new_table
    second = migrate_vectors(dsn, None, compatible_768(fake), corpus, switch=False)
    assert not second.switched and live_and_previous(dsn) == (first, None)  # staged, not live
    pinned = PgVectorStore(dsn, second.new_table)  # serving.vector_table pins a table (canary)
    assert pinned.dimensions == 768 and pinned.describe()["pinned"]
    assert drop_old_tables(dsn).dropped == []  # nothing to drop before a switch
    with pytest.raises(VectorStoreError, match="no live vector table"):
        PgVectorStore(dsn.replace(dsn.rsplit("/", 1)[1], "postgres"))
