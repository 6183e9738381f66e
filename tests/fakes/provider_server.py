"""A real HTTP server on 127.0.0.1 that speaks just enough OpenAI and Gemini for the clients.

Endpoints (OpenAI base URL: ``server.openai_base_url`` = ``http://127.0.0.1:PORT/v1``; Gemini base
URL: ``server.gemini_base_url`` = ``http://127.0.0.1:PORT``):

- ``POST /v1/chat/completions``: with ``response_format`` json_schema the answer is a valid instance
  generated from that schema (or ``server.answer``); without, a short text.
- ``POST /v1/embeddings``: deterministic vectors from a hash of each text, ``dimensions`` honoured,
  deliberately *not* unit length (so the client's normalisation is tested); float or base64.
- ``GET /v1/models``: ``server.models``.
- ``POST /{v1,v1beta,v1alpha}/models/{model}:generateContent``: Gemini, answer generated from
  ``generationConfig.responseJsonSchema``.

Batch APIs (state kept in ``server.batches`` / ``server.files``; these routes are recorded but never
consume scripted replies and are not counted by ``rpm_limit``):

- OpenAI: ``POST /v1/files`` (multipart upload), ``GET /v1/files/{id}/content``, ``POST /v1/batches``,
  ``GET /v1/batches`` (list) and ``GET /v1/batches/{id}``.
- Gemini: ``POST /{ver}/models/{model}:batchGenerateContent`` (inlined requests),
  ``GET /{ver}/batches`` (list) and ``GET /{ver}/batches/{id}`` (the job as a long-running
  operation whose ``metadata`` is the batch, with ``output.inlinedResponses`` once it ends).

Each batch follows a `BatchPlan` (``server.push_batch(...)``, else ``server.batch_default``): it answers
"in progress" for ``polls`` status requests, then ends ``completed``, ``expired`` (with ``finished``
lines done), ``failed`` or ``cancelled``. The lines are answered when the batch ends, each like a
request with that body: ``push_for(marker, ...)`` scripts apply per line (an invalid answer, a
refusal, an error status), everything else is a normal answer with ``server.usage``. A plan also
scripts the submission's faults: a failing upload (``upload_status``), a refused or failing create
(``create_status``, ``created_anyway``), a create reply without the job's id / name
(``reply_without_id``, ``listed``), an unknown state (``reply_state``), rows that are all unusable
(``rows="unusable"``) and the failure code of a failed job (``failure_code``).
``server.batch_enqueued_token_limit`` enforces a provider's enqueued-token limit over the batches
still running (input tokens counted like ``estimate_tokens``: UTF-8 bytes / 3 + 4 per message):
OpenAI fails the batch that would pass it (``token_limit_exceeded``, like a real tier-1 account),
Gemini refuses its create with 429 ``RESOURCE_EXHAUSTED``; ``server.enqueued_peak`` is the most
ever enqueued at once.

Behaviour is scripted per request: ``server.push(Reply.rate_limited(retry_after=2), Reply.ok())``
queues replies consumed in order by POST requests; when the queue is empty ``server.default`` is
used. ``server.latency_s`` delays every request. Every request is recorded (method, path, headers
including the key, JSON body) in ``server.requests``; ``server.request_count`` counts them.

Use as a context manager: ``with FakeProviderServer() as server: ...``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import numpy as np

DEFAULT_RATE_LIMIT_HEADERS = {
    "x-ratelimit-limit-requests": "500",
    "x-ratelimit-remaining-requests": "499",
    "x-ratelimit-reset-requests": "120ms",
    "x-ratelimit-limit-tokens": "30000",
    "x-ratelimit-remaining-tokens": "29000",
    "x-ratelimit-reset-tokens": "6m0s",
}
DEFAULT_USAGE = {
    "prompt_tokens": 120,
    "completion_tokens": 45,
    "cached_tokens": 20,
    "reasoning_tokens": 5,
}
REFUSAL_TEXT = "I'm sorry, but I can't help with that."
THINK_TEXT = "<think>\n평면을 살펴보면 거실이 남향이고...\n</think>\n\n"

_GEMINI_PATH = re.compile(r"^/(v1|v1beta|v1alpha)/models/([^/:]+):generateContent$")
_GEMINI_BATCH_CREATE = re.compile(r"^/(v1|v1beta|v1alpha)/models/([^/:]+):batchGenerateContent$")
_GEMINI_BATCHES = re.compile(r"^/(v1|v1beta|v1alpha)/batches(?:/([^/:]+))?$")
_OPENAI_BATCHES = re.compile(r"^/v1/batches(?:/([^/]+))?$")
_OPENAI_FILE_CONTENT = re.compile(r"^/v1/files/([^/]+)/content$")
_GEMINI_STATES = {
    "completed": "BATCH_STATE_SUCCEEDED",
    "expired": "BATCH_STATE_EXPIRED",
    "failed": "BATCH_STATE_FAILED",
    "cancelled": "BATCH_STATE_CANCELLED",
}


@dataclass
class Reply:
    """One scripted behaviour. Build with the class methods; `delay_s` adds latency to this reply."""

    kind: str = "ok"
    status: int = 200
    content: str | None = None
    retry_after: str | None = None
    retry_after_ms: str | None = None
    message: str = ""
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def ok(cls, content: str | None = None, delay_s: float = 0.0) -> Reply:
        """A normal answer (`content` overrides the generated one)."""
        return cls("ok", content=content, delay_s=delay_s)

    @classmethod
    def rate_limited(cls, retry_after: float | str | None = None, retry_after_ms: float | None = None) -> Reply:
        """HTTP 429 with optional ``Retry-After`` / ``retry-after-ms`` headers."""
        return cls(
            "status",
            status=429,
            retry_after=None if retry_after is None else str(retry_after),
            retry_after_ms=None if retry_after_ms is None else str(retry_after_ms),
            message="Rate limit reached for requests",
        )

    @classmethod
    def server_error(cls, status: int = 500) -> Reply:
        return cls("status", status=status, message="The server had an error processing your request.")

    @classmethod
    def unauthorized(cls, status: int = 401) -> Reply:
        """401 whose message echoes the key it received (worse than real providers on purpose)."""
        return cls("status", status=status, message="Incorrect API key provided: {key}")

    @classmethod
    def bad_request(cls, status: int = 400, message: str = "Invalid schema for response_format") -> Reply:
        return cls("status", status=status, message=message)

    @classmethod
    def truncated(cls) -> Reply:
        """finish_reason ``length`` / ``MAX_TOKENS`` with half an answer."""
        return cls("truncated")

    @classmethod
    def invalid_json(cls, content: str = '{"image_name": "C01_0001.png", "bay_count": ') -> Reply:
        return cls("ok", content=content)

    @classmethod
    def refusal(cls) -> Reply:
        """OpenAI ``message.refusal``; Gemini finish_reason ``SAFETY``."""
        return cls("refusal")

    @classmethod
    def content_filter(cls) -> Reply:
        """OpenAI finish_reason ``content_filter``; Gemini ``PROHIBITED_CONTENT``."""
        return cls("content_filter")

    @classmethod
    def prompt_blocked(cls) -> Reply:
        """Gemini: no candidates, ``promptFeedback.blockReason``."""
        return cls("prompt_blocked")

    @classmethod
    def malformed_body(cls) -> Reply:
        """HTTP 200 whose body is not JSON at all."""
        return cls("malformed_body")

    @classmethod
    def thinking(cls, content: str | None = None) -> Reply:
        """The answer preceded by a ``<think>...</think>`` block (Qwen3 without the template flag)."""
        return cls("think", content=content)


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.monotonic)
    rejected: bool = False

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class BatchPlan:
    """How one batch job behaves: ``polls`` status requests answer "in progress", the next one
    the final state: ``completed``, ``expired`` or ``cancelled`` (the first ``finished`` lines are
    done, the rest are not; OpenAI lists those in the error file when ``report_unfinished``), or
    ``failed`` (validation failed: no output at all, ``failure_code`` in the job's errors).

    Submission faults: ``upload_status`` makes the next ``upload_failures`` OpenAI uploads answer
    that status (then the plan is used up: it described the submission that never happened);
    ``create_status`` makes the create answer that status, with no job made unless
    ``created_anyway`` (a 5xx after the job was made); ``reply_without_id`` drops the id / name from
    the create reply (the job exists; ``listed=False`` also hides it from the list);
    ``reply_state`` replaces the state in the create reply; ``rows="unusable"``: the job ends as
    planned but no answered row is usable (OpenAI: bodies without choices and one line that is not
    JSON; Gemini: responses without candidates)."""

    polls: int = 1
    final: str = "completed"
    finished: int | None = None
    report_unfinished: bool = True
    failure_code: str = "invalid_request"
    upload_status: int | None = None
    upload_failures: int = 1_000
    create_status: int | None = None
    created_anyway: bool = False
    reply_without_id: bool = False
    listed: bool = True
    reply_state: str | None = None
    rows: str = "ok"


@dataclass
class FakeBatch:
    id: str
    provider: str  # openai | gemini
    lines: list[dict]
    plan: BatchPlan
    created_at: int
    input_file_id: str | None = None
    endpoint: str | None = None
    completion_window: str | None = None
    metadata: dict | None = None
    model: str | None = None
    display_name: str | None = None
    polls: int = 0
    status: str = "validating"
    ended_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0
    inlined: list[dict] = field(default_factory=list)
    tokens: int = 0  # enqueued input tokens (the fake's count)
    error_code: str | None = None  # set when the job failed: the code in its errors


class FakeProviderServer:
    """OpenAI + Gemini fake on a free port of 127.0.0.1, serving from a background thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batch_lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.queue: deque[Reply] = deque()
        self.requests: list[RecordedRequest] = []
        self.reset()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        self._httpd = _Server(("127.0.0.1", 0), _make_handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def openai_base_url(self) -> str:
        return self.base_url + "/v1"

    @property
    def gemini_base_url(self) -> str:
        return self.base_url

    # ------------------------------------------------------------------ scripting

    def push(self, *replies: Reply) -> None:
        with self._lock:
            self.queue.extend(replies)

    def push_for(self, marker: str, *replies: Reply) -> None:
        """Replies for requests whose body contains `marker` (e.g. one plan's image name), used
        before the shared queue: scripts per item stay right whatever order requests arrive in."""
        with self._lock:
            self.scripts.setdefault(marker, deque()).extend(replies)

    def reset(self) -> None:
        """Back to defaults: no scripted replies, no recorded requests, no latency (between tests)."""
        with self._lock:
            self.queue.clear()
            self.requests.clear()
            self.scripts: dict[str, deque[Reply]] = {}
            self.admitted: deque[float] = deque()
            self.rejected_429: list[float] = []
        # A provider-side limit: more than `rpm_limit` POSTs in 60 s get a 429 with Retry-After
        # (`rpm_retry_after=False`: a bare 429, as a provider that announces nothing sends).
        self.rpm_limit: int | None = None
        self.rpm_retry_after = True
        self.rpm_window_s = 60.0  # the window's length (a shorter one keeps a real-time test short)
        # Consulted after the scripts and the queue, before `default`: a callable that picks a
        # reply per request (e.g. a seeded random fault mix); None falls through to `default`.
        self.reply_hook: Callable[[RecordedRequest], Reply | None] | None = None
        self.default = Reply.ok()
        self.latency_s = 0.0
        self.rate_limit_headers: dict[str, str] = dict(DEFAULT_RATE_LIMIT_HEADERS)
        self.usage: dict[str, int] = dict(DEFAULT_USAGE)
        self.answer: dict | str | Callable[[RecordedRequest], dict | str] | None = None
        self.models = ["fake-model"]
        self.embedding_size = 64
        self.honour_dimensions = True
        with self._lock:
            self.batch_plans: deque[BatchPlan] = deque()
            self.batches: dict[str, FakeBatch] = {}
            self.files: dict[str, dict[str, Any]] = {}
            self._ids = 0
        self.batch_default = BatchPlan()
        self.batch_enqueued_token_limit: int | None = None
        self.enqueued_peak = 0

    def push_batch(self, *plans: BatchPlan) -> None:
        """Plans for the next batch jobs created, in order (then ``batch_default``)."""
        with self._lock:
            self.batch_plans.extend(plans)

    def batch_creations(self) -> list[RecordedRequest]:
        """The requests that created a batch job (OpenAI or Gemini)."""
        return [
            r
            for r in self.requests
            if r.method == "POST" and (r.path == "/v1/batches" or r.path.endswith(":batchGenerateContent"))
        ]

    @property
    def request_count(self) -> int:
        return len(self.requests)

    def requests_to(self, fragment: str) -> list[RecordedRequest]:
        return [r for r in self.requests if fragment in r.path]

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]

    def _record(self, request: RecordedRequest, consume: bool = True) -> Reply | None:
        with self._lock:
            self.requests.append(request)
            if request.method != "POST" or not consume:
                return None
            if self.rpm_limit is not None:
                now = time.monotonic()
                while self.admitted and now - self.admitted[0] >= self.rpm_window_s:
                    self.admitted.popleft()
                if len(self.admitted) >= self.rpm_limit:
                    self.rejected_429.append(now)
                    request.rejected = True
                    wait = round(self.admitted[0] + self.rpm_window_s - now, 3) if self.rpm_retry_after else None
                    return Reply.rate_limited(retry_after=wait)
                self.admitted.append(now)
            if self.scripts:
                text = json.dumps(request.body, ensure_ascii=False)
                for marker, replies in self.scripts.items():
                    if replies and marker in text:
                        return replies.popleft()
            if self.queue:
                return self.queue.popleft()
            hook = self.reply_hook
        chosen = hook(request) if hook is not None else None
        return chosen if chosen is not None else self.default

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    # ------------------------------------------------------------------ batch jobs

    def _new_id(self, prefix: str) -> str:
        with self._lock:
            self._ids += 1
            return f"{prefix}{self._ids:05d}fake"

    def _line_reply(self, body: Any) -> Reply:
        """The reply for one batch line: a `push_for` script whose marker is in the line, else ok."""
        with self._lock:
            if self.scripts:
                text = json.dumps(body, ensure_ascii=False)
                for marker, replies in self.scripts.items():
                    if replies and marker in text:
                        return replies.popleft()
        return Reply.ok()

    def _next_plan(self) -> BatchPlan:
        with self._lock:
            return self.batch_plans.popleft() if self.batch_plans else self.batch_default

    def _upload_failure(self) -> int | None:
        """The status a failing upload answers (the head plan's ``upload_status``), else None."""
        with self._lock:
            plan = self.batch_plans[0] if self.batch_plans else None
            if plan is None or plan.upload_status is None:
                return None
            plan.upload_failures -= 1
            if plan.upload_failures <= 0:
                self.batch_plans.popleft()
            return plan.upload_status

    def enqueued_tokens(self, provider: str, model: str | None) -> int:
        """Input tokens of that provider's and model's batches still running (failed ones free theirs)."""
        return sum(
            b.tokens
            for b in self.batches.values()
            if b.provider == provider and b.model == model and b.ended_at is None and b.error_code is None
        )

    def _new_batch(self, provider: str, lines: list[dict], plan: BatchPlan | None = None, **kw: Any) -> FakeBatch:
        plan = plan or self._next_plan()
        prefix = "batch_" if provider == "openai" else "batches/"
        batch = FakeBatch(self._new_id(prefix), provider, lines, plan, int(time.time()), **kw)
        batch.tokens = sum(_line_tokens(line) for line in lines)
        with self._lock:
            limit = self.batch_enqueued_token_limit
            if limit is not None and self.enqueued_tokens(provider, batch.model) + batch.tokens > limit:
                batch.error_code = "token_limit_exceeded"  # OpenAI: the job fails in validation
            self.batches[batch.id] = batch
            self.enqueued_peak = max(self.enqueued_peak, self.enqueued_tokens(provider, batch.model))
        return batch

    def over_token_limit(self, provider: str, model: str | None, lines: list[dict]) -> bool:
        limit = self.batch_enqueued_token_limit
        with self._lock:
            return limit is not None and (
                self.enqueued_tokens(provider, model) + sum(_line_tokens(line) for line in lines) > limit
            )

    def _poll(self, batch: FakeBatch) -> None:
        """One status request: in progress for `plan.polls` requests, then the final state.
        Called with `_batch_lock` held."""
        if batch.ended_at is not None:
            return
        batch.polls += 1
        if batch.error_code is not None:  # failed validation at once (enqueued-token limit)
            batch.status, batch.ended_at = "failed", int(time.time())
            return
        if batch.polls <= batch.plan.polls:
            batch.status = "in_progress"
            return
        self._finish(batch)

    def _finish(self, batch: FakeBatch) -> None:
        plan = batch.plan
        batch.status, batch.ended_at = plan.final, int(time.time())
        if plan.final == "failed":
            batch.error_code = plan.failure_code
            return
        done = len(batch.lines) if plan.final == "completed" else (plan.finished or 0)
        outputs: list[dict] = []
        errors: list[dict] = []
        for i, line in enumerate(batch.lines):
            if batch.provider == "gemini":
                if i < done:
                    batch.inlined.append(self._gemini_line(line, batch))
                continue
            custom_id = line.get("custom_id")
            if i >= done:
                if plan.report_unfinished:
                    code = "batch_expired" if plan.final == "expired" else "batch_cancelled"
                    errors.append(
                        {
                            "id": f"batch_req_{i}",
                            "custom_id": custom_id,
                            "response": None,
                            "error": {"code": code, "message": "not executed before the batch ended"},
                        }
                    )
                continue
            body = line.get("body") or {}
            reply = self._line_reply(body)
            request = RecordedRequest("POST", line.get("url", ""), {}, body)
            if reply.kind in ("status", "malformed_body"):
                status = reply.status if reply.kind == "status" else 500
                errors.append(
                    {
                        "id": f"batch_req_{i}",
                        "custom_id": custom_id,
                        "error": None,
                        "response": {
                            "status_code": status,
                            "request_id": f"req_{i}",
                            "body": {"error": {"message": reply.message, "type": "error", "code": None}},
                        },
                    }
                )
                continue
            answer = openai_chat_body(self, request, reply)
            if plan.rows == "unusable":  # billed, but no choice to read
                answer = {**answer, "choices": []}
            outputs.append(
                {
                    "id": f"batch_req_{i}",
                    "custom_id": custom_id,
                    "error": None,
                    "response": {"status_code": 200, "request_id": f"req_{i}", "body": answer},
                }
            )
        batch.completed, batch.failed = len(outputs), len(errors)
        if batch.provider == "gemini":
            batch.completed = sum(1 for r in batch.inlined if "response" in r)
            batch.failed = len(batch.inlined) - batch.completed
            return
        if outputs:
            garbage = ['{"id": "batch_req_x", "custom_id": '] if plan.rows == "unusable" else []
            batch.output_file_id = self._store_file(outputs, "batch_output", garbage)
        if errors:
            batch.error_file_id = self._store_file(errors, "batch_output")

    def _store_file(self, rows: list[dict], purpose: str, extra: list[str] = ()) -> str:
        content = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        content += "".join(line + "\n" for line in extra)
        file_id = self._new_id("file-")
        with self._lock:
            self.files[file_id] = {"filename": f"{file_id}.jsonl", "purpose": purpose, "content": content.encode()}
        return file_id

    def _gemini_line(self, line: dict, batch: FakeBatch) -> dict:
        request_body = line.get("request") or {}
        model = (batch.model or "models/fake-model").split("/")[-1]
        reply = self._line_reply(request_body)
        out: dict[str, Any] = {}
        if line.get("metadata") is not None:
            out["metadata"] = line["metadata"]
        if reply.kind in ("status", "malformed_body"):
            status = reply.status if reply.kind == "status" else 500
            out["error"] = {"code": status, "message": reply.message or "error"}
            return out
        request = RecordedRequest("POST", f"/v1beta/models/{model}:generateContent", {}, request_body)
        out["response"] = gemini_body(self, request, reply, model)
        if batch.plan.rows == "unusable":  # billed, but no candidate to read
            out["response"] = {k: v for k, v in out["response"].items() if k != "candidates"}
        return out

    def openai_batch_view(self, batch: FakeBatch) -> dict[str, Any]:
        ended = batch.ended_at
        view: dict[str, Any] = {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "input_file_id": batch.input_file_id,
            "completion_window": batch.completion_window,
            "status": batch.status,
            "created_at": batch.created_at,
            "expires_at": batch.created_at + 86_400,
            "metadata": batch.metadata,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "request_counts": {"total": len(batch.lines), "completed": batch.completed, "failed": batch.failed},
            "errors": None,
        }
        if batch.status != "validating":
            view["in_progress_at"] = batch.created_at
        if ended is not None:
            view[
                {
                    "completed": "completed_at",
                    "expired": "expired_at",
                    "failed": "failed_at",
                    "cancelled": "cancelled_at",
                }[batch.status]
            ] = ended
        if batch.status == "failed":
            code = batch.error_code or "invalid_request"
            message = (
                "Enqueued token limit reached for this model. Please try submitting fewer tasks or wait "
                "for in-progress batches to complete."
                if code == "token_limit_exceeded"
                else "the input file failed validation"
            )
            view["errors"] = {"object": "list", "data": [{"code": code, "message": message, "line": None}]}
        return view

    def gemini_batch_view(self, batch: FakeBatch) -> dict[str, Any]:
        iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(batch.created_at))
        state = {"validating": "BATCH_STATE_PENDING", "in_progress": "BATCH_STATE_RUNNING"}.get(
            batch.status
        ) or _GEMINI_STATES.get(batch.status, batch.status)
        meta: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
            "model": batch.model,
            "displayName": batch.display_name,
            "name": batch.id,
            "createTime": iso,
            "updateTime": iso,
            "state": state,
            "batchStats": {
                "requestCount": str(len(batch.lines)),
                "successfulRequestCount": str(batch.completed),
                "failedRequestCount": str(batch.failed),
            },
        }
        if batch.ended_at is not None:
            meta["endTime"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(batch.ended_at))
            if batch.inlined:
                meta["output"] = {"inlinedResponses": {"inlinedResponses": batch.inlined}}
        view: dict[str, Any] = {"name": batch.id, "metadata": meta, "done": batch.ended_at is not None}
        if batch.status == "failed":
            view["error"] = {"code": 3, "message": "the batch failed"}
        return view

    def create_reply(self, batch: FakeBatch, view: dict[str, Any]) -> dict[str, Any]:
        """The create reply: the job's view, less its id / with another state when the plan says so."""
        plan = batch.plan
        if plan.reply_without_id:
            view = {k: v for k, v in view.items() if k not in ("id", "name")}
            if isinstance(view.get("metadata"), dict) and batch.provider == "gemini":
                view["metadata"] = {k: v for k, v in view["metadata"].items() if k != "name"}
        if plan.reply_state is not None:
            if batch.provider == "openai":
                view = {**view, "status": plan.reply_state}
            else:
                view = {**view, "metadata": {**view.get("metadata", {}), "state": plan.reply_state}}
        return view

    def _answer_text(self, request: RecordedRequest, schema: dict | None) -> str:
        answer = self.answer(request) if callable(self.answer) else self.answer
        if isinstance(answer, str):
            return answer
        if answer is not None:
            return json.dumps(answer, ensure_ascii=False)
        if schema is not None:
            return json.dumps(example_from_schema(schema), ensure_ascii=False)
        return "가짜 응답입니다."


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that timed out hung up: fine
        import sys

        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


def _make_handler(fake: FakeProviderServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

        def _handle(self, method: str) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            content_type = self.headers.get("content-type") or ""
            if content_type.startswith("multipart/form-data"):
                body: Any = _parse_multipart(content_type, raw)
            else:
                try:
                    body = json.loads(raw) if raw else None
                except json.JSONDecodeError:
                    body = raw.decode("utf-8", "replace")
            path = self.path.split("?", 1)[0]
            request = RecordedRequest(method, path, {k.lower(): v for k, v in self.headers.items()}, body)
            batch_route = self._batch_route(method, path)
            reply = fake._record(request, consume=batch_route is None)
            fake._sleep(fake.latency_s + (reply.delay_s if reply else 0.0))
            if batch_route is not None:
                return batch_route(request)
            if method == "GET" and path.rstrip("/") == "/v1/models":
                data = [{"id": m, "object": "model", "owned_by": "fake"} for m in fake.models]
                return self._json(200, {"object": "list", "data": data})
            if method == "POST" and path == "/v1/chat/completions":
                return self._openai_chat(request, reply)
            if method == "POST" and path == "/v1/embeddings":
                return self._openai_embeddings(request, reply)
            match = _GEMINI_PATH.match(path)
            if method == "POST" and match:
                return self._gemini(request, reply, match.group(2))
            self._json(404, {"error": {"message": f"no route {method} {path}", "code": 404}})

        # -------------------------------------------------------------- plumbing

        def _send(self, status: int, payload: bytes, content_type: str, headers: dict[str, str]) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(payload)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)

        def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
            payload = json.dumps(data, ensure_ascii=False).encode()
            self._send(status, payload, "application/json", headers or {})

        def _status_headers(self, reply: Reply) -> dict[str, str]:
            headers = dict(reply.headers)
            if reply.retry_after is not None:
                headers["retry-after"] = reply.retry_after
            if reply.retry_after_ms is not None:
                headers["retry-after-ms"] = reply.retry_after_ms
            return headers

        def _echo_key(self, request: RecordedRequest, message: str) -> str:
            auth = request.header("authorization") or ""
            key = auth.removeprefix("Bearer ") or request.header("x-goog-api-key") or ""
            return message.replace("{key}", key)

        # -------------------------------------------------------------- OpenAI

        def _openai_error(self, request: RecordedRequest, reply: Reply) -> None:
            code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(reply.status)
            error = {
                "message": self._echo_key(request, reply.message),
                "type": "error",
                "code": code,
            }
            self._json(reply.status, {"error": error}, self._status_headers(reply))

        def _openai_chat(self, request: RecordedRequest, reply: Reply) -> None:
            if reply.kind == "status":
                return self._openai_error(request, reply)
            if reply.kind == "malformed_body":
                return self._send(200, b"<html>upstream hiccup</html>", "text/html", {})
            data = openai_chat_body(fake, request, reply)
            self._json(200, data, {**fake.rate_limit_headers, **reply.headers})

        def _openai_embeddings(self, request: RecordedRequest, reply: Reply) -> None:
            if reply.kind == "status":
                return self._openai_error(request, reply)
            body = request.body or {}
            inputs = body.get("input")
            inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
            size = fake.embedding_size
            if fake.honour_dimensions and body.get("dimensions"):
                size = int(body["dimensions"])
            rows = []
            for i, text in enumerate(inputs):
                vector = fake_embedding(str(text), size)
                if body.get("encoding_format") == "base64":
                    encoded: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode()
                else:
                    encoded = vector.tolist()
                rows.append({"object": "embedding", "index": i, "embedding": encoded})
            tokens = sum(len(str(t)) for t in inputs)
            data = {
                "object": "list",
                "data": rows,
                "model": body.get("model", "fake-embedding"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
            self._json(200, data, fake.rate_limit_headers)

        # -------------------------------------------------------------- Gemini

        def _gemini(self, request: RecordedRequest, reply: Reply, model: str) -> None:
            if reply.kind == "status":
                status_name = {
                    400: "INVALID_ARGUMENT",
                    401: "UNAUTHENTICATED",
                    403: "PERMISSION_DENIED",
                    429: "RESOURCE_EXHAUSTED",
                    500: "INTERNAL",
                    503: "UNAVAILABLE",
                }.get(reply.status, "UNKNOWN")
                error: dict[str, Any] = {
                    "code": reply.status,
                    "message": self._echo_key(request, reply.message),
                    "status": status_name,
                }
                if reply.status == 429 and reply.retry_after is not None:
                    error["details"] = [
                        {
                            "@type": "type.googleapis.com/google.rpc.RetryInfo",
                            "retryDelay": f"{reply.retry_after}s",
                        }
                    ]
                return self._json(reply.status, {"error": error}, self._status_headers(reply))
            if reply.kind == "malformed_body":
                return self._send(200, b"<html>upstream hiccup</html>", "text/html", {})
            self._json(200, gemini_body(fake, request, reply, model), reply.headers)

        # -------------------------------------------------------------- batch APIs

        def _batch_route(self, method: str, path: str) -> Callable[[RecordedRequest], None] | None:
            if method == "POST" and path == "/v1/files":
                return self._openai_upload
            match = _OPENAI_FILE_CONTENT.match(path)
            if method == "GET" and match:
                return lambda request: self._openai_file_content(match.group(1))
            match = _OPENAI_BATCHES.match(path)
            if match and method == "POST" and match.group(1) is None:
                return self._openai_batch_create
            match = _GEMINI_BATCH_CREATE.match(path)
            if match and method == "POST":
                return lambda request: self._gemini_batch_create(request, match.group(2))
            match = _GEMINI_BATCHES.match(path)
            if match and method == "GET":
                # /v1/batches is both APIs' path: google-genai sends its key in x-goog-api-key.
                name = match.group(2)

                def get(request: RecordedRequest) -> None:
                    if request.header("x-goog-api-key") or not path.startswith("/v1/"):
                        return self._batch_get("gemini", name and f"batches/{name}")
                    return self._batch_get("openai", name)

                return get
            return None

        def _not_found(self, what: str) -> None:
            self._json(404, {"error": {"message": f"{what} not found", "code": 404, "status": "NOT_FOUND"}})

        def _plan_error(self, status: int, message: str) -> None:
            names = {400: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}
            self._json(
                status,
                {
                    "error": {
                        "message": message,
                        "type": "error",
                        "code": status,
                        "status": names.get(status, "UNKNOWN"),
                    }
                },
            )

        def _openai_upload(self, request: RecordedRequest) -> None:
            failure = fake._upload_failure()
            if failure is not None:
                return self._plan_error(failure, "the upload failed")
            form = request.body if isinstance(request.body, dict) else {}
            upload = form.get("file") or {}
            content = upload.get("content", "").encode()
            file_id = fake._new_id("file-")
            with fake._lock:
                fake.files[file_id] = {
                    "filename": upload.get("filename"),
                    "purpose": form.get("purpose"),
                    "content": content,
                }
            self._json(
                200,
                {
                    "id": file_id,
                    "object": "file",
                    "bytes": len(content),
                    "created_at": int(time.time()),
                    "filename": upload.get("filename") or "upload",
                    "purpose": form.get("purpose") or "batch",
                    "status": "processed",
                },
            )

        def _openai_file_content(self, file_id: str) -> None:
            stored = fake.files.get(file_id)
            if stored is None:
                return self._not_found(f"file {file_id}")
            self._send(200, stored["content"], "application/octet-stream", {})

        def _openai_batch_create(self, request: RecordedRequest) -> None:
            body = request.body if isinstance(request.body, dict) else {}
            stored = fake.files.get(body.get("input_file_id", ""))
            if stored is None:
                return self._not_found(f"file {body.get('input_file_id')}")
            lines = [json.loads(line) for line in stored["content"].decode().splitlines() if line.strip()]
            plan = fake._next_plan()
            if plan.create_status is not None and not plan.created_anyway:
                return self._plan_error(plan.create_status, "the batch could not be created")
            batch = fake._new_batch(
                "openai",
                lines,
                plan,
                input_file_id=body["input_file_id"],
                endpoint=body.get("endpoint"),
                completion_window=body.get("completion_window"),
                metadata=body.get("metadata"),
                model=(lines[0].get("body") or {}).get("model") if lines else None,
            )
            if plan.create_status is not None:
                return self._plan_error(plan.create_status, "the server had an error creating the batch")
            self._json(200, fake.create_reply(batch, fake.openai_batch_view(batch)))

        def _gemini_batch_create(self, request: RecordedRequest, model: str) -> None:
            body = request.body if isinstance(request.body, dict) else {}
            spec = body.get("batch") or {}
            lines = ((spec.get("inputConfig") or {}).get("requests") or {}).get("requests") or []
            if fake.over_token_limit("gemini", f"models/{model}", lines):
                return self._plan_error(429, "Resource has been exhausted: enqueued tokens for this model.")
            plan = fake._next_plan()
            if plan.create_status is not None and not plan.created_anyway:
                return self._plan_error(plan.create_status, "the batch could not be created")
            batch = fake._new_batch(
                "gemini", lines, plan, model=f"models/{model}", display_name=spec.get("displayName")
            )
            if plan.create_status is not None:
                return self._plan_error(plan.create_status, "the server had an error creating the batch")
            self._json(200, fake.create_reply(batch, fake.gemini_batch_view(batch)))

        def _batch_get(self, provider: str, batch_id: str | None) -> None:
            view = fake.openai_batch_view if provider == "openai" else fake.gemini_batch_view
            if batch_id is None:  # the list, newest first
                batches = [b for b in reversed(list(fake.batches.values())) if b.provider == provider and b.plan.listed]
                if provider == "openai":
                    data = [view(b) for b in batches]
                    return self._json(
                        200,
                        {
                            "object": "list",
                            "data": data,
                            "has_more": False,
                            "first_id": data[0]["id"] if data else None,
                            "last_id": data[-1]["id"] if data else None,
                        },
                    )
                return self._json(200, {"operations": [view(b) for b in batches]})
            batch = fake.batches.get(batch_id)
            if batch is None or batch.provider != provider:
                return self._not_found(f"batch {batch_id}")
            with fake._batch_lock:
                fake._poll(batch)
                data = view(batch)
            self._json(200, data)

    return Handler


def openai_chat_body(fake: FakeProviderServer, request: RecordedRequest, reply: Reply) -> dict[str, Any]:
    """The chat-completion JSON for `reply` (kinds ok, truncated, refusal, content_filter, think)."""
    body = request.body or {}
    schema = (body.get("response_format") or {}).get("json_schema", {}).get("schema")
    text = reply.content if reply.content is not None else fake._answer_text(request, schema)
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    finish = "stop"
    if reply.kind == "truncated":
        message["content"], finish = text[: max(1, len(text) // 2)], "length"
    elif reply.kind == "refusal":
        message["content"], message["refusal"] = None, REFUSAL_TEXT
    elif reply.kind == "content_filter":
        message["content"], finish = None, "content_filter"
    elif reply.kind == "think":
        message["content"] = THINK_TEXT + text
    usage = fake.usage
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": body.get("model", "fake-model"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": usage["cached_tokens"]},
            "completion_tokens_details": {"reasoning_tokens": usage["reasoning_tokens"]},
        },
    }


def gemini_body(fake: FakeProviderServer, request: RecordedRequest, reply: Reply, model: str) -> dict[str, Any]:
    """The generateContent JSON for `reply` (kinds ok, truncated, refusal, content_filter, think,
    prompt_blocked)."""
    body = request.body or {}
    config = body.get("generationConfig") or {}
    schema = config.get("responseJsonSchema") or config.get("responseSchema")
    text = reply.content if reply.content is not None else fake._answer_text(request, schema)
    usage = fake.usage
    usage_metadata = {
        "promptTokenCount": usage["prompt_tokens"],
        "candidatesTokenCount": usage["completion_tokens"],
        "thoughtsTokenCount": usage["reasoning_tokens"],
        "cachedContentTokenCount": usage["cached_tokens"],
        "totalTokenCount": usage["prompt_tokens"] + usage["completion_tokens"] + usage["reasoning_tokens"],
    }
    candidate: dict[str, Any] = {
        "content": {"role": "model", "parts": [{"text": text}]},
        "finishReason": "STOP",
        "index": 0,
    }
    data: dict[str, Any] = {"modelVersion": model, "usageMetadata": usage_metadata}
    if reply.kind == "truncated":
        candidate["content"]["parts"] = [{"text": text[: max(1, len(text) // 2)]}]
        candidate["finishReason"] = "MAX_TOKENS"
    elif reply.kind in ("refusal", "content_filter"):
        candidate.pop("content")
        candidate["finishReason"] = "SAFETY" if reply.kind == "refusal" else "PROHIBITED_CONTENT"
    elif reply.kind == "think":
        candidate["content"]["parts"] = [{"text": THINK_TEXT, "thought": True}, {"text": text}]
    if reply.kind == "prompt_blocked":
        data["promptFeedback"] = {"blockReason": "SAFETY"}
    else:
        data["candidates"] = [candidate]
    return data


def _parse_multipart(content_type: str, raw: bytes) -> dict[str, Any]:
    """A multipart/form-data body as ``{field: text}``, files as ``{field: {filename, content}}``."""
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
    form: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = (part.get_payload(decode=True) or b"").decode("utf-8", "replace")
        filename = part.get_filename()
        form[name] = {"filename": filename, "content": payload} if filename else payload
    return form


def _line_tokens(line: dict) -> int:
    """A batch line's input tokens as the fake counts them (UTF-8 bytes / 3 + 4 per message, like
    the pipeline's own estimate): OpenAI ``body.messages``, Gemini ``request.contents`` (+ system)."""
    body = line.get("body") if "body" in line else None
    texts: list[str] = []
    if isinstance(body, dict):
        texts = [str(m.get("content") or "") for m in body.get("messages") or [] if isinstance(m, dict)]
    else:
        request = line.get("request") or {}
        for content in [request.get("systemInstruction") or {}, *(request.get("contents") or [])]:
            if isinstance(content, dict):
                texts.append("".join(str(p.get("text") or "") for p in content.get("parts") or []))
    return sum(-(-len(t.encode("utf-8")) // 3) + 4 for t in texts if t)


def fake_embedding(text: str, size: int) -> np.ndarray:
    """Deterministic, not unit-length vector for `text` (norm ≈ 3)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(size)
    return (3.0 * vector / np.linalg.norm(vector)).astype(np.float32)


# --------------------------------------------------------------------- answers from a schema


def example_from_schema(schema: dict, root: dict | None = None, name: str = "") -> Any:
    """A small valid instance of a JSON schema (the subset pydantic and OpenAI strict mode write)."""
    root = root if root is not None else schema
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return example_from_schema(target, root, name)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [o for o in schema[key] if o.get("type") != "null"] or schema[key]
            return example_from_schema(options[0], root, name)
    if "allOf" in schema:
        return example_from_schema(schema["allOf"][0], root, name)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        return {key: example_from_schema(sub, root, key) for key, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        count = max(schema.get("minItems", 0), min(1, schema.get("maxItems", 1)))
        return [example_from_schema(schema.get("items") or {}, root, name) for _ in range(count)]
    if kind == "string":
        text = f"예시 {name}".strip()
        text = text.ljust(schema.get("minLength", 0), "가")
        return text[: schema["maxLength"]] if "maxLength" in schema else text
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        value = max(low, 1) if high is None or high >= 1 else low
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            value = schema["exclusiveMinimum"] + 1
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "예시"
