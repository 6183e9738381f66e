"""A real HTTP server on 127.0.0.1 that speaks RunPod Serverless for one endpoint.

``server.base_url`` (``http://127.0.0.1:PORT/v2``) and ``server.endpoint_id`` go into
``cv.runpod_base_url`` / ``cv.runpod_endpoint_id``; ``server.api_key`` is the only key it accepts
(anything else: HTTP 401 on every route, whose body does not echo the key).

- ``POST /v2/{endpoint}/runsync`` ``{"input": {"action", ...}}``: the next scripted `Job` (or
  ``server.default``) decides the reply: ``COMPLETED`` at once, or ``IN_PROGRESS`` with an ``id``
  for ``polls`` status requests, then ``COMPLETED`` / ``FAILED``; or an HTTP status.
- ``GET /v2/{endpoint}/status/{id}``: the job's state (404 for an unknown id).
- Actions: ``cv_inference`` (``image`` base64 PNG, ``filename``): the PNG's sha256 is looked up in
  the plans registered with ``server.register_plan(png_bytes, team_graph, low_result)``; the output
  holds ``topology_json`` (a JSON string, the exact text in ``server.sent_topologies[sha]``, or an
  object with ``topology_as_object``), ``low_result``, ``source_result``,
  ``topology_image_base64`` and ``inference_time_sec``. An unknown image → ``{"error": ...}``.
  ``embed`` (``text`` → ``embedding``) and ``embed_batch`` (``texts`` → ``embeddings``):
  deterministic unit vectors of ``DIMENSIONS`` (1024) from hashed character 1-3-grams, so texts
  that share words are close.
- ``server.cold_start(polls=N)``: the next job stays ``IN_QUEUE`` for N polls (a cold worker).
- Every request is recorded in ``server.requests`` (method, path, headers, body);
  ``server.max_in_flight`` is the most requests handled at once (``server.latency_s`` slows each);
  ``server.max_active_jobs`` is the most jobs in progress at once (runsync received, final state
  not yet answered), i.e. the client's concurrency as the endpoint saw it.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import numpy as np

DIMENSIONS = 1024
ENDPOINT_ID = "ep-fake-cv"
API_KEY = "rp_test_key_0123456789abcdef"  # a fake, for asserting it is written nowhere


@dataclass
class Job:
    """One scripted job: `polls` status requests in progress, then `final` ("COMPLETED",
    "FAILED", "ERROR" = COMPLETED with {"error"} in the output); or `http_status` for the runsync."""

    final: str = "COMPLETED"
    polls: int = 0
    error: str = "worker crashed"
    http_status: int | None = None
    delay_s: float = 0.0
    pending_status: str = "IN_PROGRESS"

    @classmethod
    def completed(cls, delay_s: float = 0.0) -> Job:
        return cls(delay_s=delay_s)

    @classmethod
    def in_progress(cls, polls: int = 2, final: str = "COMPLETED") -> Job:
        return cls(final=final, polls=polls)

    @classmethod
    def failed(cls, error: str = "CUDA out of memory", polls: int = 0) -> Job:
        return cls(final="FAILED", error=error, polls=polls)

    @classmethod
    def error_in_output(cls, error: str = "image decode failed") -> Job:
        return cls(final="ERROR", error=error)

    @classmethod
    def http(cls, status: int) -> Job:
        return cls(http_status=status)


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    raw: bytes
    at: float = field(default_factory=time.monotonic)


@dataclass
class _RunningJob:
    id: str
    job: Job
    output: dict | None
    polls_left: int


def embed_text(text: str, dims: int = DIMENSIONS) -> list[float]:
    """Hashed bag of character 1-3-grams, L2-normalised."""
    vec = np.zeros(dims, dtype=np.float64)
    padded = f" {text} "
    for n in (1, 2, 3):
        for i in range(len(padded) - n + 1):
            h = int.from_bytes(hashlib.blake2b(padded[i : i + n].encode(), digest_size=8).digest(), "little")
            vec[h % dims] += 1.0 if (h >> 63) == 0 else 0.8
    norm = np.linalg.norm(vec)
    return (vec / norm if norm else vec).tolist()


class FakeRunPodServer:
    def __init__(self, api_key: str = API_KEY, endpoint_id: str = ENDPOINT_ID):
        self.api_key = api_key
        self.endpoint_id = endpoint_id
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.reset()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    # ------------------------------------------------------------------------------- control

    def reset(self) -> None:
        with getattr(self, "_lock", threading.Lock()):
            self.requests: list[RecordedRequest] = []
            self.queue: deque[Job] = deque()
            self.default = Job.completed()
            self.jobs: dict[str, _RunningJob] = {}
            self.plans: dict[str, tuple[dict, Any]] = {}
            self.sent_topologies: dict[str, str] = {}
            self.topology_as_object = False
            self.overlay_png: bytes | None = None
            self._cold_polls = 0
            self.active_jobs = 0
            self.max_active_jobs = 0
            self.in_flight = 0
            self.max_in_flight = 0
            self.latency_s = 0.0

    def push(self, *jobs: Job) -> None:
        with self._lock:
            self.queue.extend(jobs)

    def cold_start(self, polls: int) -> None:
        with self._lock:
            self._cold_polls = polls

    def register_plan(self, png: bytes, team_graph: dict, low_result: Any = None) -> str:
        sha = hashlib.sha256(png).hexdigest()
        with self._lock:
            self.plans[sha] = (team_graph, low_result if low_result is not None else {"annotations": []})
        return sha

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v2"

    def calls(self, action: str | None = None) -> list[RecordedRequest]:
        """The runsync requests (of one action)."""
        return [
            r
            for r in self.requests
            if r.method == "POST"
            and r.path.endswith("/runsync")
            and (action is None or (r.body or {}).get("input", {}).get("action") == action)
        ]

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # ------------------------------------------------------------------------------- behaviour

    def _output_for(self, inp: dict) -> dict:
        action = inp.get("action")
        if action == "embed":
            return {"embedding": embed_text(str(inp.get("text", "")))}
        if action == "embed_batch":
            return {"embeddings": [embed_text(str(t)) for t in inp.get("texts") or []]}
        if action != "cv_inference":
            return {"error": f"Unknown action: {action}"}
        try:
            png = base64.b64decode(inp.get("image") or "", validate=True)
        except ValueError:
            return {"error": "image is not base64"}
        sha = hashlib.sha256(png).hexdigest()
        if sha not in self.plans:
            return {"error": f"no detections for {inp.get('filename')}"}
        graph, low = self.plans[sha]
        graph = json.loads(json.dumps(graph))
        if isinstance(graph.get("image_info"), dict) and inp.get("filename"):
            graph["image_info"]["file_name"] = inp["filename"]
        text = json.dumps(graph, ensure_ascii=False)
        self.sent_topologies[sha] = text
        overlay = self.overlay_png or png
        return {
            "topology_json": graph if self.topology_as_object else text,
            "low_result": low,
            "source_result": {"OBJ": [], "OCR": [], "STR": [], "SPA": []},
            "topology_image_base64": "data:image/png;base64," + base64.b64encode(overlay).decode(),
            "inference_time_sec": 0.01,
        }

    def _final_body(self, running: _RunningJob) -> dict:
        job = running.job
        if job.final == "FAILED":
            return {"id": running.id, "status": "FAILED", "error": job.error}
        output = running.output if job.final == "COMPLETED" else {"error": job.error}
        return {"id": running.id, "status": "COMPLETED", "output": output, "executionTime": 10}

    def _runsync(self, body: Any) -> tuple[int, dict]:
        inp = body.get("input") if isinstance(body, dict) else None
        if not isinstance(inp, dict):
            return 400, {"error": "body must be {'input': {...}}"}
        with self._lock:
            job = self.queue.popleft() if self.queue else self.default
            cold, self._cold_polls = self._cold_polls, 0
        if job.delay_s:
            time.sleep(job.delay_s)
        if job.http_status:
            return job.http_status, {"error": f"HTTP {job.http_status}"}
        polls = job.polls + cold
        running = _RunningJob(id=f"job-{next(self._ids)}", job=job, output=self._output_for(inp), polls_left=polls)
        if polls == 0:
            return 200, self._final_body(running)
        with self._lock:
            self.jobs[running.id] = running
            self.active_jobs += 1
            self.max_active_jobs = max(self.max_active_jobs, self.active_jobs)
        status = "IN_QUEUE" if cold else job.pending_status
        return 200, {"id": running.id, "status": status}

    def _status(self, job_id: str) -> tuple[int, dict]:
        with self._lock:
            running = self.jobs.get(job_id)
            if running is None:
                return 404, {"error": "job not found"}
            running.polls_left -= 1
            if running.polls_left > 0:
                return 200, {"id": job_id, "status": "IN_PROGRESS"}
            del self.jobs[job_id]
            self.active_jobs -= 1
        return 200, self._final_body(running)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw) if raw else None
                except json.JSONDecodeError:
                    body = None
                headers = {k.lower(): v for k, v in self.headers.items()}
                with server._lock:
                    server.requests.append(RecordedRequest(method, self.path, headers, body, raw))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._route(method, headers, body)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _route(self, method: str, headers: dict, body: Any) -> None:
                if server.latency_s:
                    time.sleep(server.latency_s)
                if headers.get("authorization") != f"Bearer {server.api_key}":
                    return self._reply(401, {"error": "Unauthorized"})
                prefix = f"/v2/{server.endpoint_id}/"
                if not self.path.startswith(prefix):
                    return self._reply(404, {"error": "endpoint not found"})
                route = self.path[len(prefix) :]
                if method == "POST" and route == "runsync":
                    return self._reply(*server._runsync(body))
                if method == "GET" and route.startswith("status/"):
                    return self._reply(*server._status(route[len("status/") :]))
                return self._reply(404, {"error": "no such route"})

            def do_POST(self) -> None:
                self._handle("POST")

            def do_GET(self) -> None:
                self._handle("GET")

        return Handler
