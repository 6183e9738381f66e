"""A real HTTP server on 127.0.0.1 that speaks RunPod's REST API v2 for pods, and runs each "pod"
as a local subprocess.

``server.base_url`` (``http://127.0.0.1:PORT``, no ``/v2``) goes into ``RUNPOD_API_BASE_URL``;
``server.api_key`` is the only key it accepts (anything else: 401, whose body does not echo the key).

- ``POST /v2/pods`` ``{name, image, args, env, disk, cloud, gpu: {id, count}, mounts, dataCenterIds}``
  → 201 Pod in ``PROVISIONING``. Unknown body fields → 422 naming them (as v2 does). After
  ``start_delay_s`` the pod goes ``STARTING`` → ``RUNNING`` and ``args`` (shell-split; the image is
  ignored) runs as a subprocess in its own session, with ``host_env`` + the pod's ``env`` and
  ``host_path`` first on PATH, in a scratch directory. When the process exits the pod is ``EXITED``.
- ``GET /v2/pods/{id}``: the pod (``status``, ``cost`` USD/h while RUNNING, ``gpu``, ``createdAt``,
  ``startedAt``, ``env``...); 404 once terminated. ``GET /v2/pods`` → ``{"pods": [...]}``.
- ``POST /v2/pods/{id}/action`` ``{"action": "stop"|"start"|"restart"|"terminate"}``: stop sends
  SIGTERM to the process group (SIGKILL after 5 s) → ``EXITED``; terminate kills it → gone.
- ``DELETE /v2/pods/{id}``: terminate.
- ``GET /v2/pods/{id}/logs?tail=N``: the process's output as server-sent events (then the stream ends).
- ``GET /v2/catalog/gpus/{id}`` → ``{id, name, price: {secure, community}}`` from ``server.gpu_prices``.
- ``server.fail_next(status, method="POST", path="/v2/pods", times=1)``: the next matching requests
  get that HTTP status (RFC 9457 body) and do nothing.
- ``server.never_start = True``: new pods stay ``PROVISIONING`` and never run.
- ``server.add_pod(name, args, env, ...)``: a pod made by "someone else" (a previous worker).
- ``server.pods`` (every pod ever, terminated ones too, with ``terminated``, ``process``, ``log``);
  ``server.requests`` (method, path, headers, body).
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

API_KEY = "rp_pods_test_key_9f8e7d6c5b4a"  # a fake, for asserting it is written nowhere
DEFAULT_PRICES = {
    "NVIDIA A100 80GB PCIe": {"secure": 1.64, "community": 1.19},
    "NVIDIA H100 80GB HBM3": {"secure": 2.99, "community": 2.39},
    "NVIDIA GeForce RTX 4090": {"secure": 0.69, "community": 0.34},
}
CREATE_FIELDS = {
    "name",
    "image",
    "args",
    "env",
    "disk",
    "ports",
    "registry",
    "cloud",
    "cpu",
    "gpu",
    "dataCenterIds",
    "globalNetworking",
    "mounts",
    "startJupyter",
    "startSsh",
    "templateId",
}


@dataclass
class FakePod:
    id: str
    name: str
    body: dict
    created: float = field(default_factory=time.time)
    status: str = "PROVISIONING"
    started: float | None = None
    process: subprocess.Popen | None = None
    log: Path | None = None
    terminated: bool = False
    stopped: bool = False
    never_start: bool = False

    @property
    def gpu(self) -> dict:
        return self.body.get("gpu") or {}


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z") if ts else None


class FakeRunPodPods:
    def __init__(
        self,
        api_key: str = API_KEY,
        host_env: dict[str, str] | None = None,
        host_path: str | None = None,
        start_delay_s: float = 0.3,
    ):
        self.api_key = api_key
        self.host_env = dict(host_env if host_env is not None else os.environ)
        self.host_path = host_path
        self.start_delay_s = start_delay_s
        self.gpu_prices = {k: dict(v) for k, v in DEFAULT_PRICES.items()}
        self.never_start = False
        self.pods: dict[str, FakePod] = {}
        self.requests: list[RecordedRequest] = []
        self._failures: list[tuple[str, str, int]] = []
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._scratch = Path(tempfile.mkdtemp(prefix="fake-runpod-pods-"))
        self._stop = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._threads = [
            threading.Thread(target=self._httpd.serve_forever, daemon=True),
            threading.Thread(target=self._lifecycle, daemon=True),
        ]

    # ------------------------------------------------------------------ control

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with self._lock:
            for pod in self.pods.values():
                self._kill(pod)
        self._httpd.shutdown()
        self._httpd.server_close()

    def reset(self) -> None:
        with self._lock:
            for pod in self.pods.values():
                self._kill(pod)
                pod.terminated = True
            self.pods.clear()
            self.requests.clear()
            self._failures.clear()
            self.never_start = False
            self.gpu_prices = {k: dict(v) for k, v in DEFAULT_PRICES.items()}

    def fail_next(self, status: int, method: str = "POST", path: str = "/v2/pods", times: int = 1) -> None:
        with self._lock:
            self._failures.extend([(method, path, status)] * times)

    def add_pod(self, name: str, args: str, env: dict[str, str] | None = None, gpu: str = "NVIDIA A100 80GB PCIe"):
        body = {"name": name, "image": "img", "args": args, "env": env or {}, "gpu": {"id": gpu, "count": 1}}
        body["cloud"] = "SECURE"
        return self._create(body)

    def live_pods(self) -> list[FakePod]:
        with self._lock:
            return [p for p in self.pods.values() if not p.terminated]

    def output(self, pod_id: str) -> str:
        pod = self.pods[pod_id]
        return pod.log.read_text(errors="replace") if pod.log and pod.log.exists() else ""

    # ------------------------------------------------------------------ pods

    def _cost(self, pod: FakePod) -> float:
        if pod.status != "RUNNING":
            return 0.0
        price = self.gpu_prices.get(pod.gpu.get("id"), {}).get(str(pod.body.get("cloud", "SECURE")).lower(), 1.0)
        return round(price * int(pod.gpu.get("count", 1)), 4)

    def _view(self, pod: FakePod) -> dict:
        gpu = {"id": pod.gpu.get("id"), "count": pod.gpu.get("count", 1), "vcpuCount": 8, "memory": 62}
        return {
            "id": pod.id,
            "name": pod.name,
            "status": pod.status,
            "actions": ["stop", "terminate"] if pod.status == "RUNNING" else ["start", "terminate"],
            "image": pod.body.get("image"),
            "args": pod.body.get("args", ""),
            "disk": pod.body.get("disk", 50),
            "env": pod.body.get("env", {}),
            "ports": pod.body.get("ports", []),
            "registry": None,
            "mounts": pod.body.get("mounts", {}),
            "gpu": gpu,
            "cloud": pod.body.get("cloud", "SECURE"),
            "dataCenterId": "FAKE-1",
            "cost": self._cost(pod),
            "createdAt": _iso(pod.created),
            "startedAt": _iso(pod.started),
        }

    def _create(self, body: dict) -> FakePod:
        with self._lock:
            pod = FakePod(id=f"pod{next(self._ids):04d}fake", name=body["name"], body=body)
            pod.never_start = self.never_start
            self.pods[pod.id] = pod
        return pod

    def _lifecycle(self) -> None:
        while not self._stop.wait(0.05):
            with self._lock:
                pods = list(self.pods.values())
            for pod in pods:
                with self._lock:
                    if pod.terminated or pod.never_start:
                        continue
                    if pod.status == "PROVISIONING" and time.time() - pod.created >= self.start_delay_s:
                        pod.status = "STARTING"
                    elif pod.status == "STARTING":
                        self._launch(pod)
                    elif pod.status == "RUNNING" and pod.process is not None and pod.process.poll() is not None:
                        pod.status = "EXITED"

    def _launch(self, pod: FakePod) -> None:
        env = {**self.host_env, **{k: str(v) for k, v in (pod.body.get("env") or {}).items()}}
        if self.host_path:
            env["PATH"] = self.host_path + os.pathsep + env.get("PATH", os.defpath)
        workdir = self._scratch / pod.id
        workdir.mkdir(parents=True, exist_ok=True)
        pod.log = workdir / "output.log"
        args = shlex.split(pod.body.get("args") or "true")
        with open(pod.log, "wb") as log:
            pod.process = subprocess.Popen(
                args, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        pod.status, pod.started = "RUNNING", time.time()

    def _kill(self, pod: FakePod, sig: int = signal.SIGKILL, wait_s: float = 5.0) -> None:
        proc = pod.process
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)

    def _stop_pod(self, pod: FakePod) -> None:
        self._kill(pod, signal.SIGTERM)
        with self._lock:
            pod.status, pod.stopped = "EXITED", True

    def _terminate(self, pod: FakePod) -> None:
        self._kill(pod)
        with self._lock:
            pod.status, pod.terminated = "TERMINATED", True

    # ------------------------------------------------------------------ HTTP

    def _route(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any]:
        with self._lock:
            for i, (m, p, status) in enumerate(self._failures):
                if m == method and path == p:
                    del self._failures[i]
                    return status, {"title": "Injected", "status": status, "detail": "fake failure"}
        parts = path.strip("/").split("/")
        if parts[:2] == ["v2", "catalog"] and len(parts) == 4 and parts[2] == "gpus" and method == "GET":
            gpu_id = parts[3]
            if gpu_id not in self.gpu_prices:
                return 404, {"title": "Not Found", "status": 404, "detail": "GPU type not found"}
            return 200, {"id": gpu_id, "name": gpu_id, "price": self.gpu_prices[gpu_id], "maxCount": 8}
        if parts[:2] != ["v2", "pods"]:
            return 404, {"title": "Not Found", "status": 404, "detail": "no such route"}
        if len(parts) == 2 and method == "POST":
            return self._post_pod(body)
        if len(parts) == 2 and method == "GET":
            return 200, {"pods": [self._view(p) for p in self.live_pods()]}
        pod = self.pods.get(parts[2])
        if pod is None or pod.terminated:
            return 404, {"title": "Not Found", "status": 404, "detail": "The requested Pod does not exist."}
        if len(parts) == 3 and method == "GET":
            return 200, self._view(pod)
        if len(parts) == 3 and method == "DELETE":
            self._terminate(pod)
            return 204, None
        if parts[3:] == ["action"] and method == "POST":
            action = (body or {}).get("action")
            if action == "stop":
                self._stop_pod(pod)
            elif action == "terminate":
                self._terminate(pod)
                return 204, None
            elif action not in ("start", "restart"):
                return 422, {"title": "Unprocessable Entity", "status": 422, "detail": f"unknown action {action!r}"}
            return 200, self._view(pod)
        if parts[3:] == ["logs"] and method == "GET":
            tail = int(query.get("tail", ["100"])[0])
            lines = self.output(pod.id).splitlines()[-tail:] if tail else []
            return 200, "".join(f"data: {line}\n\n" for line in lines)
        return 404, {"title": "Not Found", "status": 404, "detail": "no such route"}

    def _post_pod(self, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or not body.get("name") or not body.get("image"):
            return 422, {"title": "Unprocessable Entity", "status": 422, "detail": "name and image are required"}
        unknown = sorted(set(body) - CREATE_FIELDS)
        if unknown:
            return 422, {"title": "Unprocessable Entity", "status": 422, "detail": f"unknown fields: {unknown}"}
        if not isinstance(body.get("gpu"), dict) or not body["gpu"].get("id"):
            return 400, {"title": "Bad Request", "status": 400, "detail": "exactly one of gpu or cpu must be set"}
        return 201, self._view(self._create(body))

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: Any) -> None:
                if isinstance(body, str):
                    data, ctype = body.encode(), "text/event-stream"
                elif body is None:
                    data, ctype = b"", "application/json"
                else:
                    data = json.dumps(body).encode()
                    ctype = "application/json" if status < 400 else "application/problem+json"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
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
                url = urlsplit(self.path)
                path = unquote(url.path)
                with server._lock:
                    server.requests.append(RecordedRequest(method, path, headers, body))
                if headers.get("authorization") != f"Bearer {server.api_key}":
                    return self._reply(401, {"title": "Unauthorized", "status": 401, "detail": "invalid bearer token"})
                self._reply(*server._route(method, path, parse_qs(url.query), body))

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        return Handler
