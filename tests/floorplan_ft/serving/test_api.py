"""The HTTP API end to end: FastAPI over the real service (MiniLM retrieval), the OpenAI client
against the local wire-format server, the tiny local student; in-process (ASGI) for most checks,
over real sockets (uvicorn in a thread, and `ft-pipeline serve` as a process) for the rest."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fakes.provider_server import Reply
from service_helpers import (
    OPENAI_KEY,
    SHARED_DATA_ROOT,
    free_port,
    minilm_manager,
    sample_graphs,
    service_settings,
    single_torch_thread,
    tiny_student_dir,
    topology_json,
    uvicorn_server,
)

from floorplan_ft.prompts import build_messages
from floorplan_ft.retrieval.corpus import load_corpus
from floorplan_ft.retrieval.retrieve import build_query, embed_corpus, retrieve_contexts
from floorplan_ft.schemas import FloorPlanAnalysis
from floorplan_ft.serving.api import create_app
from floorplan_ft.serving.service import AnalysisService
from floorplan_ft.settings import load_settings

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def fake(fake_provider):
    return fake_provider


def make_service(fake, **serving):
    settings = service_settings(None, fake, serving={"timeout_s": 5.0, **serving})
    return AnalysisService(settings, embedding_manager=minilm_manager())


async def _request(app, method: str, path: str, **kw) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        return await client.request(method, path, **kw)


def call(app, method: str, path: str, **kw) -> httpx.Response:
    """One request through the ASGI transport (no socket)."""
    return asyncio.run(_request(app, method, path, **kw))


@pytest.fixture
def app(fake, no_dotenv):
    service = make_service(fake)
    yield create_app(service)
    service.close()


def test_analyze_returns_a_validated_analysis_with_timing_headers(fake, app):
    response = call(app, "POST", "/analyze", json={"topology": topology_json(0)})
    assert response.status_code == 200, response.text
    body = response.json()
    FloorPlanAnalysis.model_validate(body["analysis"])
    meta = body["meta"]
    assert meta["provider"] == "openai" and meta["model"] == "gpt-4o-mini" and meta["is_llm"]
    assert len(meta["criteria"]) == 5 and meta["usage"]["input_tokens"] == 120

    timing = response.headers["server-timing"]
    assert [part.split(";")[0] for part in timing.split(", ")] == ["retrieval", "llm", "total"]
    assert float(response.headers["x-analysis-ms"]) == pytest.approx(meta["timings"]["total_ms"], abs=0.1)
    assert response.headers["x-llm-provider"] == "openai"

    # The provider received exactly the pipeline's messages for this topology.
    graph = sample_graphs()[0]
    manager, chunks = minilm_manager(), load_corpus()
    vectors = embed_corpus(manager, chunks, SHARED_DATA_ROOT / "cache" / "embeddings")
    ctx = retrieve_contexts(manager, chunks, vectors, {"p": build_query(graph.statistics)}, 5)["p"]
    expected = build_messages(graph.image_info.file_name, graph, ctx.prompt_criteria())
    assert fake.requests_to("/chat/completions")[-1].body["messages"] == expected
    assert meta["criteria"] == [c.id for c in ctx.chunks]

    named = call(app, "POST", "/analyze", json={"topology": topology_json(0), "image_name": "x.png"})
    assert named.status_code == 200
    assert "이미지 이름: x.png" in fake.last.body["messages"][1]["content"]


@pytest.mark.parametrize(
    ("reply", "status", "error"),
    [
        (Reply.rate_limited(retry_after=7), 503, "RateLimitError"),
        (Reply.server_error(500), 502, "ServerError"),
        (Reply.server_error(503), 502, "ServerError"),
        (Reply.unauthorized(), 502, "AuthError"),
        (Reply.invalid_json(), 502, "InvalidOutput"),
        (Reply.truncated(), 502, "OutputTruncated"),
        (Reply.refusal(), 502, "Refusal"),
    ],
)
def test_provider_failures_become_502_or_503_with_a_reason(fake, app, reply, status, error):
    fake.push(reply)
    response = call(app, "POST", "/analyze", json={"topology": topology_json(1)})
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error and body["stage"] == "llm" and body["provider"] == "openai"
    assert body["reason"] and OPENAI_KEY not in response.text
    if status == 503:
        assert body["retryable"] is True and response.headers["retry-after"] == "7"
    if error == "AuthError":
        assert "OPENAI_API_KEY" in body["reason"]


def test_hung_or_unreachable_provider_gives_503_within_the_timeout(fake, no_dotenv):
    service = make_service(fake, timeout_s=1.0)
    app = create_app(service)
    fake.latency_s = 4.0
    started = time.monotonic()
    response = call(app, "POST", "/analyze", json={"topology": topology_json(0)})
    elapsed = time.monotonic() - started
    fake.latency_s = 0.0
    assert response.status_code == 503 and response.json()["error"] == "ProviderTimeout"
    assert "1 s" in response.json()["reason"] and elapsed < 2.5
    service.close()

    settings = service_settings(None, fake, openai_base_url="http://127.0.0.1:1/v1")
    with AnalysisService(settings, embedding_manager=minilm_manager()) as down:
        response = call(create_app(down), "POST", "/analyze", json={"topology": topology_json(0)})
    assert response.status_code == 503 and response.json()["error"] == "ConnectionFailed"


def test_bad_json_and_invalid_topologies_get_422_naming_the_problem(fake, app):
    response = call(app, "POST", "/analyze", content=b'{"topology": {', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["message"].startswith("the body is not valid JSON")

    bad = topology_json(0)
    bad["statistics"]["bay_count"] = -1
    del bad["nodes"][0]["label"]
    response = call(app, "POST", "/analyze", json={"topology": bad})
    assert response.status_code == 422
    body = response.json()
    locs = [e["loc"] for e in body["detail"]]
    assert ["body", "topology", "statistics", "bay_count"] in locs
    assert ["body", "topology", "nodes", 0, "label"] in locs
    assert "topology.statistics.bay_count: Input should be greater than or equal to 0" in body["message"]
    assert "input" not in body["detail"][0]  # the topology is not echoed back

    dangling = topology_json(0)
    dangling["edges"][0]["target_node"] = "nowhere"
    response = call(app, "POST", "/analyze", json={"topology": dangling})
    assert response.status_code == 422
    assert response.json()["message"] == "topology.edges.0.target_node: unknown node 'nowhere'"

    assert call(app, "POST", "/analyze", json={"nodes": []}).status_code == 422  # no wrapper
    assert call(app, "POST", "/chat", json={"analysis": {}, "question": "채광?"}).status_code == 422
    assert fake.requests_to("/chat/completions") == []  # nothing reached the provider


def test_analyze_accepts_the_team_aggregators_graph_through_the_normalising_reader(fake, app):
    from team_format import to_team_graph

    graph = sample_graphs()[0]
    team = to_team_graph(graph)
    inside = next(n for n in team["nodes"] if n["area_ratio"] is not None)
    assert 0 < inside["area_ratio"] <= 1  # their fraction, not our percent
    response = call(app, "POST", "/analyze", json={"topology": team})
    assert response.status_code == 200, response.text
    FloorPlanAnalysis.model_validate(response.json()["analysis"])
    # The project-style prompt carries the normalised graph: percent area ratios, the same counts.
    user = fake.requests_to("/chat/completions")[-1].body["messages"][1]["content"]
    assert f'"bay_count": {graph.statistics.bay_count}' in user or f'"bay_count":{graph.statistics.bay_count}' in user

    broken = to_team_graph(graph)
    del broken["nodes"][0]["bbox"]
    response = call(app, "POST", "/analyze", json={"topology": broken})
    assert response.status_code == 422
    assert "nodes" in response.json()["message"] and "bbox" in response.json()["message"]


def test_health_shows_the_live_provider_without_secrets(fake, app):
    response = call(app, "GET", "/health")
    assert response.status_code == 200
    health = response.json()
    assert health["llm"] == {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "base_url": fake.openai_base_url,
        "is_llm": True,
    }
    assert health["embeddings"]["model"] == "packaged:all-MiniLM-L6-v2"
    assert health["vector_store"]["backend"] == "memory" and health["vector_store"]["rows"] == 16
    assert OPENAI_KEY not in response.text


def test_chat_endpoint_answers_from_the_stored_analysis(fake, app):
    analysis = call(app, "POST", "/analyze", json={"topology": topology_json(0)}).json()["analysis"]
    fake.answer = "저장된 분석에 따르면 환기는 보통입니다."
    response = call(
        app,
        "POST",
        "/chat",
        json={
            "analysis": analysis,
            "question": "환기는 어떤가요?",
            "history": [{"role": "user", "content": "안녕하세요"}, {"role": "assistant", "content": "네"}],
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["answer"] == "저장된 분석에 따르면 환기는 보통입니다."
    assert body["meta"]["truncated"] is False and len(body["meta"]["criteria"]) == 5
    assert "server-timing" in response.headers
    sent = fake.last.body["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]


@pytest.fixture
def env_apps():
    """Apps built by `_env_app`; their services are closed at the end of the test."""
    apps: list = []
    yield apps
    for app in apps:
        app.state.service.close()


def _env_app(monkeypatch, provider: str | None, apps: list | None = None, **env: str):
    """An app built from the environment alone, as `ft-pipeline serve` builds it."""
    for key in ("LLM_PROVIDER", "FTP_SERVING__ADAPTER_PATH", "FTP_SERVING__BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    if provider:
        monkeypatch.setenv("LLM_PROVIDER", provider)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    app = create_app(load_settings())
    if apps is not None:
        apps.append(app)
    return app


def test_provider_switch_by_environment_and_rollback(fake, no_dotenv, monkeypatch, tmp_path_factory, env_apps):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("FTP_OPENAI_BASE_URL", fake.openai_base_url)
    monkeypatch.setenv("FTP_PATHS__DATA_ROOT", str(SHARED_DATA_ROOT))
    monkeypatch.setenv("EMBEDDING_PROVIDER", "local")
    monkeypatch.setenv("FTP_RETRIEVAL__MODEL", "packaged:all-MiniLM-L6-v2")
    monkeypatch.setenv("FTP_RETRIEVAL__DIMENSIONS", "384")
    monkeypatch.setenv("FTP_RETRIEVAL__DEVICE", "cpu")
    monkeypatch.setenv("FTP_SERVING__MAX_NEW_TOKENS", "1500")
    monkeypatch.setenv("FTP_SERVING__CPU_THREADS", "1")
    student = tiny_student_dir(str(tmp_path_factory.getbasetemp()))
    body = {"topology": topology_json(2)}

    def live(app):
        return call(app, "GET", "/health").json()["llm"]

    openai_app = _env_app(monkeypatch, None, env_apps)  # the default is the OpenAI path
    assert live(openai_app)["provider"] == "openai"

    with single_torch_thread():  # the student over HTTP on a real socket
        local_app = _env_app(monkeypatch, "local", env_apps, FTP_SERVING__ADAPTER_PATH=str(student))
        with uvicorn_server(local_app) as base_url, httpx.Client(base_url=base_url, timeout=60) as http:
            health = http.get("/health").json()["llm"]
            assert health["provider"] == "local" and health["model"] == str(student)
            before = len(fake.requests)
            response = http.post("/analyze", json=body)
            assert response.status_code == 200, response.text
            FloorPlanAnalysis.model_validate(response.json()["analysis"])  # schema-valid answer
            assert response.headers["x-llm-provider"] == "local"
            assert len(fake.requests) == before  # nothing went to OpenAI
            chat = http.post("/chat", json={"analysis": response.json()["analysis"], "question": "수납은 어떤가요?"})
            assert chat.status_code == 200 and chat.json()["meta"]["provider"] == "local"

    compatible_app = _env_app(monkeypatch, "openai-compatible", env_apps, FTP_SERVING__BASE_URL=fake.openai_base_url)
    assert live(compatible_app) == {
        "provider": "openai-compatible",
        "model": "fake-model",
        "base_url": fake.openai_base_url,
        "enable_thinking": None,
        "is_llm": True,
    }
    response = call(compatible_app, "POST", "/analyze", json=body)
    assert response.status_code == 200 and fake.last.body["model"] == "fake-model"
    assert "authorization" not in fake.last.headers or OPENAI_KEY not in fake.last.headers["authorization"]

    rollback_app = _env_app(monkeypatch, "openai", env_apps)  # one variable back: the rollback
    assert live(rollback_app)["provider"] == "openai"
    response = call(rollback_app, "POST", "/analyze", json=body)
    assert response.status_code == 200 and fake.last.body["model"] == "gpt-4o-mini"


def test_api_over_a_real_socket(fake, app):
    with uvicorn_server(app) as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
        assert client.get("/health").json()["llm"]["provider"] == "openai"
        response = client.post("/analyze", json={"topology": topology_json(3)})
        assert response.status_code == 200
        assert response.headers["server-timing"].startswith("retrieval;dur=")
        FloorPlanAnalysis.model_validate(response.json()["analysis"])
        fake.push(Reply.rate_limited(retry_after=2))
        limited = client.post("/analyze", json={"topology": topology_json(3)})
        assert limited.status_code == 503 and limited.headers["retry-after"] == "2"
        bad = client.post("/analyze", content=b"not json", headers={"content-type": "application/json"})
        assert bad.status_code == 422


def test_ft_pipeline_serve_answers_analyze(fake, tmp_path):
    """`ft-pipeline serve` as a process: OpenAI path at the fake server, OpenAI-style embeddings
    from the same server (no model to load), stopped by its pid."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FTP_", "LLM_", "EMBEDDING_"))}
    env.update(
        {
            "OPENAI_API_KEY": OPENAI_KEY,
            "FTP_OPENAI_BASE_URL": fake.openai_base_url,
            "EMBEDDING_PROVIDER": "openai",
            "FTP_RETRIEVAL__DIMENSIONS": "256",
            "FTP_PATHS__DATA_ROOT": str(tmp_path / "data"),
            "LLM_PROVIDER": "openai",
        }
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "ft_pipeline.cli", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 40
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            while True:
                try:
                    health = client.get("/health")
                    break
                except httpx.TransportError:
                    assert process.poll() is None, process.stdout.read().decode()
                    assert time.monotonic() < deadline, "serve did not come up"
                    time.sleep(0.2)
            assert health.json()["llm"]["provider"] == "openai"
            assert health.json()["embeddings"]["dimensions"] == 256
            response = client.post("/analyze", json={"topology": topology_json(0)})
            assert response.status_code == 200, response.text
            FloorPlanAnalysis.model_validate(response.json()["analysis"])
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    output = process.stdout.read().decode()
    assert OPENAI_KEY not in output
