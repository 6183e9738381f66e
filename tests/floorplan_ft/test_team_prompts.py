"""prompts.style = "team": the team's prompt module (a fixture with their interface) builds every
message, from the topology file as stored, with their "[참고 i]" context and their query, retrieved
from a table in their layout (`internal_eval`) on a real PostgreSQL. The teachers (phase 3), the
training rows (phase 5), the student's evaluation (phase 6) and our service send the same bytes."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from plans import prepare_plans
from team_format import to_team_graph

from floorplan_ft import prompts
from floorplan_ft.providers.openai_embeddings import OpenAIEmbeddingManager
from floorplan_ft.retrieval.corpus import load_corpus
from floorplan_ft.retrieval.pgvector import connect, vector_literal
from floorplan_ft.retrieval.retrieve import read_context
from floorplan_ft.settings import load_settings
from floorplan_ft.store import ArtifactStore
from floorplan_ft.topology_io import read_topology_dict

TEAM_CODE = Path(__file__).resolve().parents[1] / "fixtures" / "team_code"
OPENAI_KEY = "sk-test-TEAMPROMPT-secret-0123456789"
FAST = {"backoff_s": [0.01, 0.02, 0.04], "retry_after_cap_s": 0.2, "concurrency": 3, "tokens_per_minute": 10_000_000}


def fixture_module():
    """The fixture prompt module, loaded from its file on its own (not through our loader)."""
    spec = importlib.util.spec_from_file_location(
        "team_prompts_fixture_copy", TEAM_CODE / "CV" / "rag_system" / "prompts.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def team_settings(root: Path, **groups):
    base = {
        "paths": {"data_root": str(root), "team_code": str(TEAM_CODE)},
        "prompts": {"style": "team"},
    }
    for key, value in groups.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return load_settings(**base)


def fill_internal_eval(dsn_: str, manager) -> list[dict]:
    """The team's table as their loader leaves it: document, metadata jsonb, embedding vector(1024)."""
    chunks = load_corpus()
    vectors = manager.embed_documents([c.content for c in chunks])
    with connect(dsn_) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(
            "CREATE TABLE internal_eval (id serial PRIMARY KEY, document text, metadata jsonb, embedding vector(1024))"
        )
        for chunk, vector in zip(chunks, vectors, strict=True):
            conn.execute(
                "INSERT INTO internal_eval (document, metadata, embedding) VALUES (%s, %s, %s::vector)",
                (chunk.content, json.dumps({"source": chunk.source}, ensure_ascii=False), vector_literal(vector)),
            )
    return [
        {"id": str(i), "document": c.content, "vector": np.asarray(v, dtype=np.float32)}
        for i, (c, v) in enumerate(zip(chunks, vectors, strict=True), start=1)
    ]


def expected_query(raw: dict) -> str:
    st = read_topology_dict(raw, origin="test").statistics
    return f"{st.structure_type} 건축물 {st.bay_count}Bay 침실 {st.room_count}개"


def cosine_top_k(rows: list[dict], query_vector: np.ndarray, k: int) -> list[str]:
    matrix = np.stack([r["vector"] / np.linalg.norm(r["vector"]) for r in rows])
    q = query_vector / np.linalg.norm(query_vector)
    order = np.argsort(-(matrix @ q), kind="stable")[:k]
    return [rows[i]["id"] for i in order]


def chat_messages(requests) -> list[list[dict]]:
    return [[{"role": m["role"], "content": m["content"]} for m in r.body["messages"]] for r in requests]


@pytest.mark.prefect
def test_teachers_rows_evaluation_and_service_send_the_same_team_prompt(
    prefect_api, fake_provider, dsn, tmp_path, no_dotenv, monkeypatch
):
    from floorplan_ft.serving.service import AnalysisService
    from floorplan_ft.training.evaluate import run_evaluation
    from flows.ft_pipeline import ft_pipeline

    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    root = tmp_path / "data"
    store, stems = prepare_plans(root, 6, complexes=3, seed=5)
    # The plans as the team's CV produced them: their dialect, stored as it came.
    for stem in stems:
        store.delete(store.layout.rag_context(stem))
        store.write_json(store.layout.topology(stem), to_team_graph(store.read_json(store.layout.topology(stem))))
    store.write_json(store.layout.run_file("sample"), {"stems": stems, "n": len(stems)})
    store.write_text(store.layout.run_file("selected_model"), "openai\n")
    # Their table, filled by the embedding backend this test runs with (an OpenAI-compatible server).
    embedder = OpenAIEmbeddingManager(
        "Qwen/Qwen3-Embedding-0.6B", 1024, base_url=fake_provider.openai_base_url, provider="openai-compatible"
    )
    table_rows = fill_internal_eval(dsn, embedder)

    # The DSN is a secret: it comes from the environment, never from a flow parameter.
    monkeypatch.setenv("FTP_SERVING__PG_DSN", dsn)
    overrides = {
        "paths.data_root": str(root),
        "paths.team_code": str(TEAM_CODE),
        "prompts.style": "team",
        "retrieval.provider": "openai-compatible",
        "retrieval.base_url": fake_provider.openai_base_url,
        "retrieval.corpus": "pgvector:internal_eval",
        "openai_base_url": fake_provider.openai_base_url,
        "teachers.teachers": ["openai", "gemini"],
        **{f"teachers.{k}": v for k, v in FAST.items()},
    }
    report = ft_pipeline(steps="2,3a,5", overrides=overrides)
    assert report["2"]["contexts"] == len(stems), report
    assert report["3a"]["labeled"] == len(stems), report
    assert report["5"]["status"] == "done", report

    team = fixture_module()
    expected = {}
    for stem in stems:
        raw = json.loads((root / "output" / stem / "topology_graph.json").read_text())
        ctx = read_context(store, stem)
        # Their query, embedded plainly; their table's top-5 by cosine; their context blocks.
        assert ctx.query == expected_query(raw)
        top = cosine_top_k(table_rows, embedder.embed_documents([ctx.query])[0], 5)
        assert [c.id for c in ctx.chunks] == top
        documents = {r["id"]: r["document"] for r in table_rows}
        assert [c.content for c in ctx.chunks] == [documents[i] for i in top]
        assert ctx.context_text == "\n".join(f"[참고 {i}]\n{documents[d]}\n" for i, d in enumerate(top, start=1))
        on_disk = json.loads((root / "output" / stem / "rag_context.json").read_text())
        assert on_disk["context_text"] == ctx.context_text and on_disk["context_format"] == "team"
        expected[stem] = [
            {"role": "system", "content": team.SYSTEM_PROMPT},
            {"role": "user", "content": team.build_analysis_prompt(raw, ctx.context_text)},
        ]
        assert team.SYSTEM_MARKER in expected[stem][0]["content"]
        assert team.RUBRIC_MARKER in expected[stem][1]["content"]
        assert "[참고 1]" in expected[stem][1]["content"]

    def stem_of(messages) -> str:
        (stem,) = [s for s in stems if f'"file": "{s}.png"' in messages[1]["content"]]
        return stem

    # Phase 3: what the teacher sent to the provider.
    teacher_sent = chat_messages(
        r for r in fake_provider.requests_to("/chat/completions") if r.body["model"] != "cv_agent"
    )
    assert len(teacher_sent) == len(stems)
    by_stem = {stem_of(m): m for m in teacher_sent}
    assert by_stem == expected
    meta = json.loads((root / "output" / stems[0] / "llm_analysis_openai.meta.json").read_text())
    assert meta["prompt_version"] == prompts.team_prompts(team_settings(root)).version
    assert meta["prompt_version"].startswith("team-")

    # Phase 5: the rows are that prompt plus the answer.
    rows = [
        json.loads(line) for split in ("train", "val") for line in (root / f"{split}.jsonl").read_text().splitlines()
    ]
    assert len(rows) == len(stems)
    for row in rows:
        assert row["messages"][:2] == expected[stem_of(row["messages"])]
    stats = json.loads((root / "stats_report.json").read_text())
    assert stats["prompt_version"] == meta["prompt_version"]

    # Phase 6: the evaluation sends the val rows' prompts to the served student.
    settings = team_settings(
        root,
        finetune={
            "eval_base_url": fake_provider.openai_base_url,
            "eval_model": "cv_agent",
            "student_name": "team-student",
        },
        openai_api_key=OPENAI_KEY,
    )
    val_rows = [json.loads(x) for x in (root / "val.jsonl").read_text().splitlines()]
    assert val_rows
    before = len(fake_provider.requests_to("/chat/completions"))
    run_evaluation(settings)
    eval_sent = chat_messages(fake_provider.requests_to("/chat/completions")[before:])
    assert len(eval_sent) == len(val_rows)
    for sent in eval_sent:
        assert sent == expected[stem_of(sent)]

    # The service: the same plan through its openai-compatible provider (the same fake server),
    # retrieving from the team's table.
    service_settings = team_settings(
        root,
        retrieval={
            "provider": "openai-compatible",
            "base_url": fake_provider.openai_base_url,
            "corpus": "pgvector:internal_eval",
        },
        serving={
            "llm_provider": "openai-compatible",
            "base_url": fake_provider.openai_base_url,
            "llm_model": "cv_agent",
            "pg_dsn": dsn,
            "timeout_s": 10.0,
        },
    )
    service = AnalysisService(service_settings)
    try:
        assert service.health()["prompt_version"] == meta["prompt_version"]
        assert service.vector_store.describe()["table"] == "internal_eval"
        for stem in stems[:2]:
            raw = json.loads((root / "output" / stem / "topology_graph.json").read_text())
            before = len(fake_provider.requests_to("/chat/completions"))
            outcome = asyncio.run(service.aanalyze_detailed(read_topology_dict(raw, origin=stem), raw_topology=raw))
            (sent,) = chat_messages(fake_provider.requests_to("/chat/completions")[before:])
            assert sent == expected[stem] == outcome.messages
            assert outcome.context.context_text == read_context(store, stem).context_text
            # Byte for byte, the same strings the teacher was sent for this plan.
            assert [m["content"].encode() for m in sent] == [m["content"].encode() for m in by_stem[stem]]
    finally:
        service.close()


def test_project_style_is_unchanged_by_the_builder(tmp_path, no_dotenv):
    """build_messages_for in the default style is exactly the project's own prompt."""
    store, stems = prepare_plans(tmp_path / "data", 2, complexes=1, seed=3)
    settings = load_settings(paths={"data_root": str(tmp_path / "data")})
    assert prompts.prompt_version_for(settings) == prompts.PROMPT_VERSION
    for stem in stems:
        graph = store.read_topology(stem)
        ctx = store.read_json(store.layout.rag_context(stem))
        assert prompts.build_messages_for(settings, store.read_topology_raw(stem), ctx) == prompts.build_messages(
            graph.image_info.file_name, graph, ctx["chunks"]
        )


def test_team_context_and_query_text_are_exact():
    assert prompts.team_context_text(["가 기준", "나 기준"]) == "[참고 1]\n가 기준\n\n[참고 2]\n나 기준\n"
    assert prompts.team_context_text([]) == ""
    assert prompts.format_context([{"content": "x", "source": "s"}], "team") == "[참고 1]\nx\n"
    assert (
        prompts.team_query({"structure_type": "타워형", "bay_count": 3, "room_count": 2})
        == "타워형 건축물 3Bay 침실 2개"
    )
    assert prompts.team_query({}) == "혼합형 건축물 0Bay 침실 0개"  # their defaults


def test_team_prompt_version_follows_their_module(tmp_path):
    edited = tmp_path / "edited"
    (edited / "CV" / "rag_system").mkdir(parents=True)
    for rel in ("CV/__init__.py", "CV/rag_system/__init__.py"):
        (edited / rel).write_text("")
    source = (TEAM_CODE / "CV" / "rag_system" / "prompts.py").read_text()
    (edited / "CV" / "rag_system" / "prompts.py").write_text(source.replace("채점표", "평가표"))
    original = prompts.prompt_version_for(team_settings(tmp_path))
    changed = prompts.prompt_version_for(load_settings(paths={"team_code": str(edited)}, prompts={"style": "team"}))
    assert original.startswith("team-") and changed.startswith("team-")
    assert original != changed != prompts.PROMPT_VERSION
    # The loader took each module from its own folder.
    edited_settings = load_settings(paths={"team_code": str(edited)}, prompts={"style": "team"})
    assert prompts.team_prompts(edited_settings).origin.startswith(str(edited.resolve()))
    # Leave the import path and the CV package as the other tests expect them.
    sys.path.remove(str(edited.resolve()))
    for name in [m for m in sys.modules if m == "CV" or m.startswith("CV.")]:
        del sys.modules[name]


@pytest.mark.parametrize("case", ["no_folder", "no_module", "no_builder"])
def test_a_missing_team_module_fails_early_naming_the_setting(case, tmp_path, no_dotenv):
    from floorplan_ft.teachers.items import build_items

    team_code = tmp_path / "team"
    if case != "no_folder":
        (team_code / "mine").mkdir(parents=True)
        (team_code / "mine" / "__init__.py").write_text("")
        (team_code / "mine" / "prompts.py").write_text('SYSTEM_PROMPT = "x"\n')
    module = "mine.nothing" if case == "no_module" else "mine.prompts"
    settings = load_settings(
        paths={"data_root": str(tmp_path / "data"), "team_code": str(team_code)},
        prompts={"style": "team", "module": module},
    )
    expected = {"no_folder": "paths.team_code", "no_module": "prompts.module", "no_builder": "build_analysis_prompt"}
    with pytest.raises(prompts.PromptModuleError, match=expected[case]):
        prompts.check_prompts(settings)
    with pytest.raises(prompts.PromptModuleError, match=expected[case]):  # before any plan is read
        build_items(ArtifactStore(tmp_path / "data"), ["nothing_there"], settings)
    if case == "no_module":
        message = str(pytest.raises(prompts.PromptModuleError, prompts.check_prompts, settings).value)
        assert "paths.team_code" in message and "mine.nothing" in message


def test_team_table_retrieval_ranks_like_their_service(dsn, fake_provider):
    """retrieval.corpus = pgvector:internal_eval: top-k by <=> over their rows, metadata as source."""
    from floorplan_ft.retrieval.team_table import TeamTableStore, corpus_table

    embedder = OpenAIEmbeddingManager(
        "Qwen/Qwen3-Embedding-0.6B", 1024, base_url=fake_provider.openai_base_url, provider="openai-compatible"
    )
    rows = fill_internal_eval(dsn, embedder)
    assert corpus_table("pgvector:internal_eval") == "internal_eval" and corpus_table("shipped") is None
    store = TeamTableStore(dsn, "internal_eval")
    try:
        assert store.dimensions == 1024 and store.count() == len(rows)
        query = embedder.embed_documents(["판상형 건축물 4Bay 침실 3개"])
        (hits,) = store.search(query, 5)
        assert [h.id for h in hits] == cosine_top_k(rows, query[0], 5)
        assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
        assert all(h.source and h.source != "internal_eval" for h in hits)  # from metadata.source
        assert hits[0].similarity >= hits[-1].similarity
        before = store.corpus_hash
        with connect(dsn) as conn:
            conn.execute("UPDATE internal_eval SET document = document || ' (개정)' WHERE id = 1")
        assert TeamTableStore(dsn, "internal_eval").corpus_hash != before  # a changed row: new provenance
    finally:
        store.close()
    from floorplan_ft.retrieval.pgvector import VectorStoreError

    with pytest.raises(VectorStoreError, match="retrieval.corpus"):
        TeamTableStore(dsn, "no_such_table")
