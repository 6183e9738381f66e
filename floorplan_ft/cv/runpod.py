"""The team's RunPod Serverless endpoint: CV inference (phase 1, the service) and embeddings.

One job: ``POST {base}/{endpoint}/runsync`` with ``{"input": {"action": ..., ...}}``; a reply that
is still ``IN_QUEUE`` / ``IN_PROGRESS`` is polled at ``GET {base}/{endpoint}/status/{id}`` until
``COMPLETED`` (result in ``output``) or ``FAILED`` (``error``). A job's whole wait, polls included,
is bounded by ``timeout_s`` (a cold start takes minutes). ``FAILED``, an ``{"error"}`` inside the
output, 5xx, 429 and timeouts are retried up to ``max_attempts``; 401/403 is a configuration error
(`RunPodAuthError`) that also makes every later call of the same client fail at once, without a
request. Requests in flight are bounded per endpoint and key by a process-wide semaphore.

The key is sent only in the ``Authorization`` header and removed from every message. It never
travels in task parameters: `register_key` keeps it in this process and hands out a reference.
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import SecretStr

from floorplan_ft.cv.sources import (
    CVConfigError,
    FinishedTopology,
    SourceConfig,
    check_png,
    find_image,
    sha256_file,
)

KEY_SETTING = "RUNPOD_API_KEY"
_PENDING = {"IN_QUEUE", "IN_PROGRESS"}


class RunPodError(RuntimeError):
    """A job that did not produce an output after every attempt (the message names the endpoint).
    `retry_later`: the last attempt failed on the way (timeout, unreachable, 429/5xx, still queued),
    not in the job itself (FAILED, an error in the output), so the same request may work later."""

    def __init__(self, message: str, *, retry_later: bool = False):
        from floorplan_ft.redact import mask_urls_in

        super().__init__(mask_urls_in(message))
        self.retry_later = retry_later


class RunPodAuthError(RunPodError, CVConfigError):
    """The endpoint refused the key (401/403) or none is set: a configuration error."""


@dataclass(frozen=True)
class RunPodEndpoint:
    endpoint_id: str
    base_url: str = "https://api.runpod.ai/v2"
    timeout_s: float = 300.0
    poll_interval_s: float = 2.0
    max_attempts: int = 3
    concurrency: int = 1

    @property
    def url(self) -> str:
        return f"{self.base_url.rstrip('/')}/{self.endpoint_id}"

    @property
    def identity(self) -> str:
        """What the endpoint is, for freshness keys (no key inside)."""
        return f"runpod:{self.url}"


def endpoint_from_settings(settings: Any) -> RunPodEndpoint:
    cv = settings.cv
    if not cv.runpod_endpoint_id:
        raise RunPodAuthError("no RunPod endpoint: set cv.runpod_endpoint_id (RUNPOD_ENDPOINT_ID)")
    return RunPodEndpoint(
        endpoint_id=cv.runpod_endpoint_id,
        base_url=cv.runpod_base_url,
        timeout_s=cv.runpod_timeout_s,
        poll_interval_s=cv.runpod_poll_interval_s,
        max_attempts=cv.runpod_max_attempts,
        concurrency=cv.concurrency,
    )


# ----------------------------------------------------------------------------- keys in this process

_KEYS: dict[str, str] = {}
_KEY_LOCK = threading.Lock()


def register_key(key: SecretStr | str | None) -> str | None:
    """Keep `key` in this process; return an opaque reference to pass instead (None: no key)."""
    value = key.get_secret_value() if isinstance(key, SecretStr) else key
    if not value or not value.strip():
        return None
    with _KEY_LOCK:
        for ref, known in _KEYS.items():
            if known == value:
                return ref
        ref = secrets.token_hex(8)
        _KEYS[ref] = value
        return ref


def resolve_key(ref: str | None) -> str | None:
    """The key behind a reference; without one, RUNPOD_API_KEY from the environment / .env."""
    if ref and ref in _KEYS:
        return _KEYS[ref]
    from floorplan_ft.settings import Settings

    try:
        secret = Settings().runpod_api_key
    except Exception:  # noqa: BLE001 - a broken environment means "no key" here; the caller says so
        return None
    return secret.get_secret_value() if secret else None


# ----------------------------------------------------------------------------- the client

_SEMAPHORES: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_SEM_LOCK = threading.Lock()


def _semaphore(endpoint: RunPodEndpoint) -> threading.BoundedSemaphore:
    with _SEM_LOCK:
        key = (endpoint.url, endpoint.concurrency)
        if key not in _SEMAPHORES:
            _SEMAPHORES[key] = threading.BoundedSemaphore(endpoint.concurrency)
        return _SEMAPHORES[key]


class _Retryable(Exception):
    """One attempt failed in a way the next attempt may not; `transient` when the job itself did
    not fail (timeouts, unreachable, 429/5xx, still queued)."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class RunPodClient:
    """Calls one endpoint's actions; thread-safe (one instance is shared by a worker's threads)."""

    def __init__(self, endpoint: RunPodEndpoint, api_key: str | None):
        if not api_key:
            raise RunPodAuthError(
                f"no RunPod key for {endpoint.url}: set {KEY_SETTING} (environment, .env or the "
                "ft-runpod-credentials/runpod block)"
            )
        self.endpoint = endpoint
        self._key = api_key
        self._auth_failure: str | None = None
        self._http = httpx.Client(
            timeout=httpx.Timeout(endpoint.timeout_s, connect=min(30.0, endpoint.timeout_s)),
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
        )

    def close(self) -> None:
        self._http.close()

    # ---------------------------------------------------------------------------------- actions

    def cv_inference(self, image_png: bytes, filename: str) -> dict:
        payload = {"image": base64.b64encode(image_png).decode("ascii"), "filename": filename}
        return self.call("cv_inference", payload)

    def embed_batch(self, texts: list[str]) -> list[list[float]]:
        output = self.call("embed_batch", {"texts": texts})
        vectors = output.get("embeddings")
        if not isinstance(vectors, list) or len(vectors) != len(texts):
            got = len(vectors) if isinstance(vectors, list) else type(vectors).__name__
            raise RunPodError(f"{self.endpoint.url}: embed_batch returned {got} vectors for {len(texts)} texts")
        return vectors

    def call(self, action: str, payload: dict) -> dict:
        """The output of one job, after up to `max_attempts` attempts."""
        reasons: list[str] = []
        transient = False
        for attempt in range(1, self.endpoint.max_attempts + 1):
            if self._auth_failure:
                raise RunPodAuthError(self._auth_failure)
            try:
                with _semaphore(self.endpoint):
                    return self._attempt(action, payload)
            except _Retryable as exc:
                reasons.append(str(exc))
                transient = exc.transient
                if attempt < self.endpoint.max_attempts:
                    time.sleep(min(self.endpoint.poll_interval_s * attempt, 30.0))
        raise RunPodError(
            f"{self.endpoint.url} action {action}: failed after {len(reasons)} attempts: " + "; ".join(reasons),
            retry_later=transient,
        )

    # ---------------------------------------------------------------------------------- internals

    def _attempt(self, action: str, payload: dict) -> dict:
        deadline = time.monotonic() + self.endpoint.timeout_s
        body = self._request(
            "POST", f"{self.endpoint.url}/runsync", deadline, json={"input": {"action": action, **payload}}
        )
        while body.get("status") in _PENDING:
            job = body.get("id")
            if not job:
                raise _Retryable(f"status {body.get('status')} without a job id")
            if time.monotonic() + self.endpoint.poll_interval_s > deadline:
                raise _Retryable(
                    f"job {job} still {body.get('status')} after {self.endpoint.timeout_s:g} s (cv.runpod_timeout_s)",
                    transient=True,
                )
            time.sleep(self.endpoint.poll_interval_s)
            body = self._request("GET", f"{self.endpoint.url}/status/{job}", deadline)
        status = body.get("status")
        if status == "COMPLETED":
            output = body.get("output")
            if isinstance(output, dict) and output.get("error"):
                raise _Retryable(f"error in output: {self._clean(str(output['error']))[:300]}")
            if not isinstance(output, dict):
                raise _Retryable(f"COMPLETED with a {type(output).__name__} output, expected an object")
            return output
        if status == "FAILED":
            raise _Retryable(f"job FAILED: {self._clean(str(body.get('error') or 'no error given'))[:300]}")
        raise _Retryable(f"unexpected job status {status!r}")

    def _request(self, method: str, url: str, deadline: float, **kwargs: Any) -> dict:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Retryable(f"no answer within {self.endpoint.timeout_s:g} s (cv.runpod_timeout_s)", transient=True)
        try:
            response = self._http.request(method, url, timeout=left, **kwargs)
        except httpx.TimeoutException:
            raise _Retryable(f"{method} {self._path(url)} timed out", transient=True) from None
        except httpx.HTTPError as exc:
            raise _Retryable(f"cannot reach {self.endpoint.base_url} ({type(exc).__name__})", transient=True) from None
        code = response.status_code
        if code in (401, 403):
            self._auth_failure = (
                f"{self.endpoint.url} refused the key (HTTP {code}): check {KEY_SETTING} and cv.runpod_endpoint_id"
            )
            raise RunPodAuthError(self._auth_failure)
        if code == 429 or code >= 500:
            raise _Retryable(f"{method} {self._path(url)}: HTTP {code}", transient=True)
        if code >= 400:
            raise RunPodError(
                f"{self.endpoint.url}: {method} {self._path(url)} answered HTTP {code}: "
                f"{self._clean(response.text)[:200]}"
            )
        try:
            body = response.json()
        except ValueError:
            raise _Retryable(f"{method} {self._path(url)}: answer is not JSON") from None
        if not isinstance(body, dict):
            raise _Retryable(f"{method} {self._path(url)}: answer is not an object")
        return body

    def _path(self, url: str) -> str:
        return url[len(self.endpoint.base_url.rstrip("/")) :]

    def _clean(self, text: str) -> str:
        from floorplan_ft.providers.base import redact

        return redact(text, (self._key,))


_CLIENTS: dict[tuple[RunPodEndpoint, str], RunPodClient] = {}
_CLIENT_LOCK = threading.Lock()


def get_client(endpoint: RunPodEndpoint, key_ref: str | None) -> RunPodClient:
    """One client per endpoint and key per process (shares the connection pool and the auth state)."""
    key = resolve_key(key_ref)
    with _CLIENT_LOCK:
        cache_key = (endpoint, key or "")
        if cache_key not in _CLIENTS:
            _CLIENTS[cache_key] = RunPodClient(endpoint, key)
        return _CLIENTS[cache_key]


def decode_topology(value: Any, where: str) -> tuple[str, dict]:
    """The output's `topology_json` (a JSON string or an object) → (text to store, parsed dict)."""
    import json

    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, indent=1) + "\n", value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: topology_json is not valid JSON ({exc})") from None
        if isinstance(parsed, dict):
            return value, parsed
    raise ValueError(f"{where}: topology_json missing or not an object (got {type(value).__name__})")


def validate_team_topology(graph: dict, origin: str) -> None:
    """What is stored must be readable downstream: through the one normalising reader."""
    from floorplan_ft.topology_io import read_topology_dict

    read_topology_dict(graph, origin=origin)  # TopologyFormatError (a ValueError) names the problems


def decode_overlay(value: Any) -> bytes | None:
    """The output's `topology_image_base64` (plain base64 or a data URI) → PNG bytes, or None."""
    if not isinstance(value, str) or not value:
        return None
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=False)
    except (ValueError, TypeError):
        return None


def finished_from_output(output: dict, where: str) -> FinishedTopology:
    """A cv_inference output → the topology to store (as it came), validated, plus low_result."""
    text, graph = decode_topology(output.get("topology_json"), where)
    validate_team_topology(graph, where)
    return FinishedTopology(
        text=text,
        graph=graph,
        low_result=output.get("low_result"),
        overlay_png=decode_overlay(output.get("topology_image_base64")),
    )


class RunPodSource:
    """Phase 1 through the team's endpoint: one cv_inference job per image."""

    finished_topology = True

    def __init__(self, config: SourceConfig):
        if not config.runpod_endpoint_id:
            raise CVConfigError("cv.source is 'runpod' but cv.runpod_endpoint_id (RUNPOD_ENDPOINT_ID) is not set")
        self.config = config
        self.endpoint = RunPodEndpoint(
            endpoint_id=config.runpod_endpoint_id,
            base_url=config.runpod_base_url,
            timeout_s=config.runpod_timeout_s,
            poll_interval_s=config.runpod_poll_interval_s,
            max_attempts=config.runpod_max_attempts,
            concurrency=config.concurrency,
        )
        self.identity = self.endpoint.identity
        self.client = get_client(self.endpoint, config.runpod_key_ref)

    def input_hash(self, stem: str) -> str:
        return sha256_file(find_image(self.config.image_dir, stem))

    def topology(self, stem: str) -> FinishedTopology:
        path = find_image(self.config.image_dir, stem)
        check_png(path)
        try:
            output = self.client.cv_inference(path.read_bytes(), path.name)
        except RunPodAuthError:
            raise
        except RunPodError as exc:
            # Ledgered per image: the run goes on with the others.
            raise ValueError(f"{path}: {exc}") from None
        return finished_from_output(output, f"{path.name} from {self.endpoint.url}")
