"""The service stays up (issue 14): a request size limit (413 before the body is read), a prompt
bound (413 before any decoding), a timed-out local generation that really stops (the next request
is served at once), a bounded queue (503 + Retry-After at once when full), HTTP provider calls
closed when cancelled, and `ft-pipeline serve` stopping on SIGTERM within seconds while a
generation is under way. Real components throughout: uvicorn on 127.0.0.1, the tiny local
students (transformers in-process), a raw TCP server that never answers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from service_helpers import (
    OPENAI_KEY,
    free_port,
    minilm_manager,
    rambling_student_dir,
    sample_graphs,
    service_settings,
    single_torch_thread,
    tiny_student_dir,
    topology_json,
    uvicorn_server,
)

from floorplan_ft.schemas import FloorPlanAnalysis
from floorplan_ft.serving.api import create_app
from floorplan_ft.serving.service import AnalysisService, PromptTooLarge
from floorplan_ft.teachers.reference import reference_analysis

# Long enough that an uncancelled generation of the rambling student runs for minutes.
LONG_BUDGET = 40_000


def local_service(student, **serving) -> AnalysisService:
    settings = service_settings(
        None,
        serving={
            "llm_provider": "local",
            "adapter_path": str(student),
            "cpu_threads": 1,
            **serving,
        },
    )
    service = AnalysisService(settings, embedding_manager=minilm_manager())
    service.warm_up()
    return service


@pytest.fixture
def rambling(tmp_path_factory):
    return rambling_student_dir(str(tmp_path_factory.getbasetemp()))


def big_topology(copies: int) -> dict:
    """A valid plan graph with its spaces repeated `copies` times (new ids, edges remapped)."""
    base = topology_json(2)
    nodes, edges = [], []
    for k in range(copies):
        ids = {n["node_id"]: f"{n['node_id']}_r{k}" for n in base["nodes"]}
        nodes += [{**n, "node_id": ids[n["node_id"]]} for n in base["nodes"]]
        edges += [
            {
                **e,
                "edge_id": f"{e['edge_id']}_r{k}",
                "source_node": ids[e["source_node"]],
                "target_node": ids[e["target_node"]],
            }
            for e in base["edges"]
        ]
    return {**base, "nodes": nodes, "edges": edges}


# =========================================================================== request size


def test_a_body_over_the_limit_is_413_before_it_is_read(no_dotenv):
    """Content-Length over serving.max_request_mb: 413 JSON without one receive() of the body."""
    settings = service_settings(None, serving={"llm_provider": "reference", "max_request_mb": 0.5})
    with AnalysisService(settings, embedding_manager=minilm_manager()) as service:
        app = create_app(service)
        received, sent = [], []

        async def receive():
            received.append(1)
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/analyze",
            "raw_path": b"/analyze",
            "query_string": b"",
            "root_path": "",
            "scheme": "http",
            "http_version": "1.1",
            "server": ("127.0.0.1", 80),
            "client": ("127.0.0.1", 1),
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(20 * 1024 * 1024).encode())],
        }
        asyncio.run(app(scope, receive, send))
    assert received == []  # nothing of the body was read
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["error"] == "RequestTooLarge" and body["stage"] == "request"
    assert body["reason"] == "the request body is 20.0 MiB; serving.max_request_mb is 0.5 MiB"
    assert body["limit_bytes"] == 512 * 1024 and body["retryable"] is False


def test_a_20_mb_analyze_is_refused_at_once_and_the_next_request_is_served(no_dotenv):
    """The measured case: a 20 MB /analyze body (default limit 2 MB), over a real socket, with a
    Content-Length and chunked; /chat has the same limit; a normal request right after is 200."""
    settings = service_settings(None, serving={"llm_provider": "reference"})
    assert settings.serving.max_request_mb == 2.0
    padding = "x" * (20 * 1024 * 1024)
    huge = json.dumps({"topology": {**topology_json(0), "padding": padding}}).encode()
    with (
        AnalysisService(settings, embedding_manager=minilm_manager()) as service,
        uvicorn_server(create_app(service)) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        started = time.monotonic()
        response = http.post("/analyze", content=huge, headers={"content-type": "application/json"})
        elapsed = time.monotonic() - started
        assert response.status_code == 413, response.text
        assert response.json()["error"] == "RequestTooLarge"
        assert "serving.max_request_mb is 2 MiB" in response.json()["reason"]
        assert elapsed < 10

        def chunks():
            for i in range(0, len(huge), 256 * 1024):
                yield huge[i : i + 256 * 1024]

        chunked = http.post("/analyze", content=chunks(), headers={"content-type": "application/json"})
        assert chunked.status_code == 413 and chunked.json()["error"] == "RequestTooLarge"
        assert "(chunked)" in chunked.json()["reason"]

        chat = http.post("/chat", content=huge, headers={"content-type": "application/json"})
        assert chat.status_code == 413

        # Under the limit, chunked or not, the body reaches the app intact.
        small = json.dumps({"topology": topology_json(0)}).encode()
        ok = http.post(
            "/analyze", content=iter([small[:1000], small[1000:]]), headers={"content-type": "application/json"}
        )
        assert ok.status_code == 200, ok.text
        assert http.post("/analyze", json={"topology": topology_json(1)}).status_code == 200


# =========================================================================== prompt bound


def test_a_topology_whose_prompt_exceeds_the_model_context_is_413_without_decoding(no_dotenv, tmp_path_factory):
    student = tiny_student_dir(str(tmp_path_factory.getbasetemp()))  # 8192 positions
    with single_torch_thread():
        service = local_service(student, max_new_tokens=1500, timeout_s=120)
        try:
            app = create_app(service)
            with uvicorn_server(app) as url, httpx.Client(base_url=url, timeout=120) as http:
                started = time.monotonic()
                response = http.post("/analyze", json={"topology": big_topology(3)})
                elapsed = time.monotonic() - started
                assert response.status_code == 413, response.text
                body = response.json()
                assert body["error"] == "PromptTooLarge" and body["stage"] == "prompt"
                assert body["context"] == 8192 and body["prompt_tokens"] + 1500 > 8192
                assert "does not fit the model's context of 8192 tokens" in body["reason"]
                assert elapsed < 30  # no generation ran
                assert service.client.cancelled_generations == 0
                ok = http.post("/analyze", json={"topology": topology_json(2)})
                assert ok.status_code == 200, ok.text
                FloorPlanAnalysis.model_validate(ok.json()["analysis"])
        finally:
            service.close()
        # The service raises it for a direct (sync) caller too.
        with local_service(student, max_new_tokens=1500) as direct:
            with pytest.raises(PromptTooLarge, match="8192 tokens") as info:
                direct.analyze(big_topology(3))
            assert info.value.context == 8192 and info.value.prompt_tokens > 6692


# =========================================================================== timeouts cancel


def test_a_timed_out_local_generation_stops_and_the_next_request_is_served(no_dotenv, rambling):
    with single_torch_thread():
        service = local_service(rambling, max_new_tokens=LONG_BUDGET, timeout_s=2.0, chat_max_tokens=16)
        try:
            with uvicorn_server(create_app(service)) as url, httpx.Client(base_url=url, timeout=120) as http:
                started = time.monotonic()
                timed_out = http.post("/analyze", json={"topology": topology_json(2)})
                elapsed = time.monotonic() - started
                assert timed_out.status_code == 503, timed_out.text
                body = timed_out.json()
                assert body["error"] == "ProviderTimeout" and "the call was cancelled" in body["reason"]
                assert elapsed < 8
                # The generator thread left the model before the 503 was sent.
                assert service.client.generating is False
                assert service.client.cancelled_generations == 1
                assert service.client._lock.acquire(blocking=False)
                service.client._lock.release()

                service.timeout_s = 60.0  # the next request gets a normal deadline
                analysis = reference_analysis("p.png", sample_graphs()[0]).model_dump(mode="json")
                started = time.monotonic()
                chat = http.post("/chat", json={"analysis": analysis, "question": "수납은?"})
                assert chat.status_code == 200, chat.text
                assert chat.json()["meta"]["provider"] == "local"
                assert time.monotonic() - started < 20  # served now, not after a 40K-token run
                limits = http.get("/health").json()["limits"]
                assert limits["running"] == 0 and limits["waiting"] == 0
        finally:
            service.close()


# =========================================================================== bounded queue


def test_a_full_queue_answers_503_with_retry_after_at_once(no_dotenv, rambling):
    with single_torch_thread():
        service = local_service(rambling, max_new_tokens=LONG_BUDGET, timeout_s=300, max_concurrency=1, max_queue=2)
        try:
            with uvicorn_server(create_app(service)) as url:

                def post(_i):
                    started = time.monotonic()
                    r = httpx.post(url + "/analyze", json={"topology": topology_json(2)}, timeout=120)
                    return r, time.monotonic() - started

                with ThreadPoolExecutor(10) as pool:
                    futures = [pool.submit(post, i) for i in range(10)]
                    deadline = time.monotonic() + 60
                    while sum(f.done() for f in futures) < 7:
                        assert time.monotonic() < deadline, service.gate.describe()
                        time.sleep(0.05)
                    gate = service.gate.describe()
                    assert gate["running"] == 1 and gate["waiting"] == 2 and gate["rejected"] == 7
                    assert service.client.generating
                    rejected = [f.result() for f in futures if f.done()]
                    for response, elapsed in rejected:
                        assert response.status_code == 503, response.text
                        assert response.json()["error"] == "ServiceBusy"
                        assert response.json()["stage"] == "queue"
                        assert "serving.max_queue=2" in response.json()["reason"]
                        assert int(response.headers["retry-after"]) >= 1
                        assert elapsed < 15  # at once, not after the running generation
                    # Stopping: the waiting ones are rejected, the running generation is cancelled.
                    started = time.monotonic()
                    assert service.begin_shutdown() == {"rejected": 2, "cancelled": 1}
                    rest = [f.result(timeout=30)[0] for f in futures]
                    assert time.monotonic() - started < 15
            assert [r.status_code for r in rest] == [503] * 10
            assert sum("stopping" in r.json()["reason"] for r in rest) == 3
            assert service.gate.running == 0 and service.gate.waiting == 0
        finally:
            service.close()


def test_a_wait_longer_than_the_timeout_is_503_and_the_slot_is_not_lost(no_dotenv, rambling):
    with single_torch_thread():
        service = local_service(rambling, max_new_tokens=LONG_BUDGET, timeout_s=3.0, max_concurrency=1, max_queue=4)
        try:

            async def three():
                # One slot: the first call holds it until its 3 s deadline, the second waits and
                # then runs for 3 s more, the third's wait passes 3 s before a slot frees.
                tasks = []
                for index in (2, 1, 0):
                    tasks.append(asyncio.create_task(service.aanalyze_detailed(topology_json(index))))
                    await asyncio.sleep(0.5)
                return await asyncio.gather(*tasks, return_exceptions=True)

            started = time.monotonic()
            outcomes = asyncio.run(three())
            assert [type(o).__name__ for o in outcomes] == ["ProviderTimeout", "ProviderTimeout", "ServiceBusy"], (
                outcomes
            )
            assert "no model slot within 3 s" in str(outcomes[2])
            assert outcomes[2].retry_after >= 1
            assert time.monotonic() - started < 15
            assert service.client.cancelled_generations == 2
            assert service.gate.running == 0 and service.gate.waiting == 0
        finally:
            service.close()


# =========================================================================== HTTP providers


class SilentServer:
    """A TCP server that answers ``GET /v1/models`` and never answers anything else; it records when
    each connection closes (EOF), i.e. when a client gave up on its request."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.posts: list[float] = []
        self.closed: list[float] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(120)
        buffer, posted = b"", False
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                if head.startswith(b"GET "):
                    body = json.dumps({"object": "list", "data": [{"id": "silent", "object": "model"}]}).encode()
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                    )
                    continue
                posted = True  # never answered: wait until the client hangs up
                self.posts.append(time.monotonic())
                while conn.recv(65536):
                    pass
                return
        except OSError:
            return
        finally:
            if posted:
                self.closed.append(time.monotonic())
            conn.close()

    def stop(self):
        self._stop.set()
        self.sock.close()


@pytest.mark.parametrize("provider", ["openai", "gemini", "openai-compatible"])
def test_a_cancelled_http_provider_call_closes_its_request(no_dotenv, provider):
    silent = SilentServer()
    try:
        extra = {
            "openai": {"openai_api_key": OPENAI_KEY, "openai_base_url": silent.url + "/v1"},
            "gemini": {"gemini_api_key": "AIza-test-key-0123456789", "gemini_base_url": silent.url},
            "openai-compatible": {},
        }[provider]
        serving = {"llm_provider": provider, "timeout_s": 60.0}
        if provider == "openai-compatible":
            serving["base_url"] = silent.url + "/v1"
        settings = service_settings(None, serving=serving, **extra)
        with AnalysisService(settings, embedding_manager=minilm_manager()) as service:

            async def cancel_while_waiting():
                task = asyncio.create_task(service.aanalyze_detailed(topology_json(0)))
                deadline = time.monotonic() + 20
                while not silent.posts:
                    assert time.monotonic() < deadline and not task.done(), "no request arrived"
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.3)
                closed_before = len(silent.closed)
                task.cancel()
                cancelled_at = time.monotonic()
                with pytest.raises(asyncio.CancelledError):
                    await task
                return closed_before, cancelled_at

            closed_before, cancelled_at = asyncio.run(cancel_while_waiting())
            deadline = time.monotonic() + 5
            while len(silent.closed) <= closed_before and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(silent.closed) > closed_before, "the provider request was left open"
            assert silent.closed[-1] - cancelled_at < 3
            assert len(silent.posts) == 1  # cancelled, not retried
            assert service.gate.running == 0
    finally:
        silent.stop()


# =========================================================================== SIGTERM


def test_sigterm_stops_ft_pipeline_serve_within_seconds_during_a_generation(fake_provider, rambling, tmp_path):
    """`ft-pipeline serve` with the local student decoding a long request: SIGTERM cancels the
    generation (the request answers 503) and the process exits within 10 s."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FTP_", "LLM_", "EMBEDDING_"))}
    env.update(
        {
            "OPENAI_API_KEY": OPENAI_KEY,
            "FTP_OPENAI_BASE_URL": fake_provider.openai_base_url,
            "EMBEDDING_PROVIDER": "openai",
            "FTP_RETRIEVAL__DIMENSIONS": "256",
            "FTP_PATHS__DATA_ROOT": str(tmp_path / "data"),
            "LLM_PROVIDER": "local",
            "FTP_SERVING__ADAPTER_PATH": str(rambling),
            "FTP_SERVING__MAX_NEW_TOKENS": str(LONG_BUDGET),
            "FTP_SERVING__TIMEOUT_S": "300",
            "FTP_SERVING__CPU_THREADS": "1",
        }
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "ft_pipeline.cli", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                assert httpx.get(base + "/health", timeout=5).json()["llm"]["provider"] == "local"
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read().decode()
                assert time.monotonic() < deadline, "serve did not come up"
                time.sleep(0.2)
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(httpx.post, base + "/analyze", json={"topology": topology_json(2)}, timeout=120)
            deadline = time.monotonic() + 60
            while httpx.get(base + "/health", timeout=5).json()["limits"]["running"] < 1:
                assert time.monotonic() < deadline and not long.done()
                time.sleep(0.1)
            time.sleep(1.0)  # decoding
            assert not long.done()
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)
            stopped_after = time.monotonic() - signalled
            response = long.result(timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = process.stdout.read().decode()
    assert stopped_after < 10, output
    assert process.returncode in (0, -signal.SIGTERM), output
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "ServiceBusy" and "stopping" in response.json()["reason"]
    assert OPENAI_KEY not in output
