"""The HTTP API over `AnalysisService` (FastAPI): ``POST /analyze``, ``POST /chat``, ``GET /health``.

* ``POST /analyze`` ``{"topology": <topology_graph.json>, "image_name": "optional.png"}`` →
  ``{"analysis": FloorPlanAnalysis, "meta": {provider, model, is_llm, timings, criteria, ...}}``
  with ``Server-Timing: retrieval;dur=…, llm;dur=…, total;dur=…`` and ``X-Analysis-Ms`` headers.
* ``POST /chat`` ``{"analysis": FloorPlanAnalysis, "question": "…", "history": [{role, content}]}``
  → ``{"answer": "…", "meta": {…, "truncated": bool}}`` (Korean, grounded in the analysis).
* ``GET /health`` → which provider/model is live (no secrets), embeddings, vector store.
* ``POST /analyze`` with ``multipart/form-data`` (the team's Spring backend: the plan PNG in the
  field ``file``) is served by ``POST /analyze/upload``: the configured CV source (``cv.source``)
  → the graph → the model → ``{"topology_json": str, "topology_image_url": "data:image/png;base64,…",
  "llm_analysis_json": str}``. 400 for an image that does not decode, 413 over
  ``serving.max_upload_mb``, 502/503 with ``stage: "cv"`` when the CV source fails or is slow
  (bounded by ``serving.cv_timeout_s``). Requests are told apart by their Content-Type only: a
  JSON body keeps the contract above unchanged.

Limits (docs/runbook.md, "Service limits"): a body over ``serving.max_request_mb`` (uploads:
``serving.max_upload_mb``) → 413 ``RequestTooLarge`` / ``UploadTooLarge``, judged from
Content-Length before reading or while a chunked body streams in; a prompt that does not fit the
local model's context → 413 ``PromptTooLarge``; more calls than ``serving.max_concurrency`` running
plus ``serving.max_queue`` waiting (or a wait past ``serving.timeout_s``) → 503 ``ServiceBusy`` with
Retry-After at once. A call past ``serving.timeout_s`` is cancelled (a local generation stops within
a token), and SIGTERM cancels local generations at once and stops uvicorn within
``serving.shutdown_grace_s``.

Errors: a body that is not JSON, or a topology / analysis that does not validate → 422 with
``detail`` (FastAPI's list of ``{loc, msg, type}``) and ``message`` (one readable line naming the
fields). Provider failures → 502 (the provider answered badly: 5xx, invalid or cut JSON, refusal,
rejected key or request) or 503 (rate limit, timeout, unreachable, retrieval down; with
``Retry-After`` when known), as ``{"error", "reason", "stage", "provider", "retryable"}``. Every
provider call is bounded by ``serving.timeout_s``, so no request hangs.

Run it with ``ft-pipeline serve`` (uvicorn; host and port from ``serving.host`` / ``serving.port``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from floorplan_ft.providers.base import (
    AuthError,
    BadRequest,
    ConfigError,
    ConnectionFailed,
    InvalidOutput,
    LLMError,
    OutputTruncated,
    ProviderTimeout,
    RateLimitError,
    Refusal,
    ServerError,
)
from floorplan_ft.schemas import FloorPlanAnalysis
from floorplan_ft.serving.errors import (
    CVFailed,
    InvalidImage,
    InvalidInput,
    PromptTooLarge,
    RetrievalUnavailable,
    ServiceBusy,
    UploadTooLarge,
)
from floorplan_ft.serving.service import CHAT_QUESTION_MAX, CHAT_TURN_MAX, AnalysisService

log = logging.getLogger(__name__)
API_VERSION = "1"


# ----------------------------------------------------------------------------- bodies


class AnalyzeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A plain object here: the service reads it through the one normalising reader, which takes
    # our graphs and the team aggregator's (fraction area_ratio, `type` on doors and windows).
    topology: dict[str, Any] = Field(
        description="The plan's topology graph (topology_graph.json, ours or the team aggregator's).",
        json_schema_extra={"$comment": "validated as floorplan_ft.schemas.TopologyGraph after normalising"},
    )
    image_name: Annotated[str, Field(max_length=200)] | None = Field(
        None, description="Name written into the analysis; default: topology.image_info.file_name."
    )


class AnalyzeResponse(BaseModel):
    analysis: FloorPlanAnalysis
    meta: dict[str, Any]


class BackendAnalyzeResponse(BaseModel):
    """What the team's Spring backend maps: three strings."""

    topology_json: str = Field(description="The topology graph the CV source returned, as a JSON string.")
    topology_image_url: str = Field(description="The overlay picture as a data:image/png;base64 URI.")
    llm_analysis_json: str = Field(description="The FloorPlanAnalysis as a JSON string.")


UPLOAD_PATH = "/analyze/upload"


# A multipart body is the file plus its envelope (boundaries, part headers, other fields).
MULTIPART_ENVELOPE_BYTES = 64 * 1024
_BODY_METHODS = ("POST", "PUT", "PATCH")


class _RequestGuard:
    """ASGI middleware in front of every route.

    * The request size limit: a body over the limit (``serving.max_request_mb``; a multipart upload:
      ``serving.max_upload_mb`` plus its envelope) is answered 413 with a JSON error. With a
      Content-Length it is judged before a byte is read; a chunked body is read up to the limit
      (counting as it streams in, answered 413 as soon as it passes) and then replayed to the app.
    * A multipart ``POST /analyze`` (the backend's upload) goes to `UPLOAD_PATH`.
    """

    def __init__(self, app: Any, limits: Callable[[], tuple[int, int]]):
        self.app = app
        self.limits = limits  # a callable, so a test can change the settings' limits

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        request_limit, upload_limit = self.limits()
        if kind == b"multipart/form-data":
            limit, shown, error, setting, what = (
                upload_limit + MULTIPART_ENVELOPE_BYTES,
                upload_limit,
                "UploadTooLarge",
                "serving.max_upload_mb",
                "upload",
            )
            if scope.get("method") == "POST" and scope.get("path") in ("/analyze", UPLOAD_PATH):
                scope = {**scope, "path": UPLOAD_PATH, "raw_path": UPLOAD_PATH.encode()}
        else:
            limit, shown, error, setting, what = (
                request_limit,
                request_limit,
                "RequestTooLarge",
                "serving.max_request_mb",
                "request",
            )

        def too_large(size: str) -> JSONResponse:
            return _error_response(
                413,
                error,
                f"the {what} body is {size}; {setting} is {shown / 1048576:g} MiB",
                "upload" if what == "upload" else "request",
                retryable=False,
                limit_bytes=shown,
            )

        length = headers.get(b"content-length")
        if length is not None:
            if length.strip().isdigit() and int(length) > limit:
                log.warning("413: a %s of %s bytes (%s)", what, int(length), setting)
                await too_large(f"{int(length) / 1048576:.1f} MiB")(scope, receive, send)
                return
            await self.app(scope, receive, send)  # the server delivers no more than announced
            return
        chunks: list[bytes] = []
        size = 0
        tail: dict | None = None
        while True:
            message = await receive()
            if message.get("type") != "http.request":
                tail = message  # a disconnect: the app sees it after the body read so far
                break
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                log.warning("413: a chunked %s passed %s bytes (%s)", what, limit, setting)
                await too_large(f"over {limit / 1048576:g} MiB (chunked)")(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
        if tail is not None:
            pending.append(tail)

        async def replay() -> dict:
            return pending.pop(0) if pending else await receive()

        await self.app(scope, replay, send)


class ChatTurn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: Annotated[str, Field(max_length=CHAT_TURN_MAX)]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    analysis: FloorPlanAnalysis = Field(description="A stored analysis (the `analysis` of /analyze).")
    question: Annotated[str, Field(min_length=1, max_length=CHAT_QUESTION_MAX)]
    history: list[ChatTurn] = Field(default_factory=list, max_length=40)


class ChatResponse(BaseModel):
    answer: str
    meta: dict[str, Any]


# ----------------------------------------------------------------------------- errors

# 503: try again later (the provider is busy, slow or away). 502: the provider answered, badly.
_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (RateLimitError, 503),
    (ProviderTimeout, 503),
    (ConnectionFailed, 503),
    (ServerError, 502),
    (AuthError, 502),
    (InvalidOutput, 502),
    (OutputTruncated, 502),
    (Refusal, 502),
    (BadRequest, 502),
    (ConfigError, 503),
)


def error_status(exc: LLMError) -> int:
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return 502


def _error_response(status: int, kind: str, reason: str, stage: str, **extra: Any) -> JSONResponse:
    headers = {}
    retry_after = extra.pop("retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    body = {"error": kind, "reason": reason, "stage": stage, **extra}
    return JSONResponse(status_code=status, content=body, headers=headers)


def _readable(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors[:10]:
        if err.get("type") == "json_invalid":
            where = err.get("loc", ["body", "?"])[-1]
            detail = (err.get("ctx") or {}).get("error", "")
            parts.append(f"the body is not valid JSON (at character {where}): {detail}".rstrip(": "))
            continue
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        parts.append(f"{'.'.join(loc) or '(body)'}: {err.get('msg')}")
    more = f" (+{len(errors) - 10} more)" if len(errors) > 10 else ""
    return "; ".join(parts) + more


def _clean(errors: list[Any]) -> list[dict[str, Any]]:
    """FastAPI's errors without the echoed input (a whole topology) and with JSON-safe ctx."""
    out = []
    for err in errors:
        item = {"loc": list(err.get("loc", ())), "msg": err.get("msg"), "type": err.get("type")}
        ctx = err.get("ctx")
        if ctx:
            item["ctx"] = {k: str(v) for k, v in ctx.items()}
        out.append(item)
    return out


def _timing_headers(timings: dict[str, float], provider: str, model: str) -> dict[str, str]:
    parts = [f"{name.removesuffix('_ms')};dur={value:.1f}" for name, value in timings.items()]
    return {
        "Server-Timing": ", ".join(parts),
        "X-Analysis-Ms": f"{timings.get('total_ms', 0.0):.1f}",
        "X-LLM-Provider": provider,
        # Header values must be latin-1: a local model path may not be.
        "X-LLM-Model": model.encode("latin-1", "replace").decode("latin-1"),
    }


# ----------------------------------------------------------------------------- app


def create_app(source: Any = None, *, warm_up: bool = False) -> FastAPI:
    """The FastAPI app over a service: pass an `AnalysisService`, or settings to build one (None:
    `load_settings()`, so ``LLM_PROVIDER`` and the other variables pick the provider). A service
    built here is closed when the app shuts down. `warm_up`: load the models now, not on the
    first request."""
    if isinstance(source, AnalysisService):
        service, owned = source, False
    else:
        service, owned = AnalysisService(source), True
    if warm_up:
        log.info("warm-up: %s", service.warm_up())

    @asynccontextmanager
    async def lifespan(app_: FastAPI):
        app_.state.loop = asyncio.get_running_loop()
        yield
        if owned:
            service.begin_shutdown()
            await asyncio.to_thread(service.close)  # bounded: a generation cannot hold it

    app = FastAPI(
        title="ft-pipeline analysis service",
        version=API_VERSION,
        description=__doc__,
        lifespan=lifespan,
    )
    app.state.service = service

    def begin_shutdown() -> None:
        """From a signal handler: the service stops taking model calls, on the app's loop."""
        loop = getattr(app.state, "loop", None)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(service.begin_shutdown)
        else:
            service.begin_shutdown()

    app.state.begin_shutdown = begin_shutdown
    app.add_middleware(_RequestGuard, limits=lambda: (service.max_request_bytes, service.max_upload_bytes))

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _clean(list(exc.errors()))
        return JSONResponse(status_code=422, content={"detail": errors, "message": _readable(errors)})

    @app.exception_handler(InvalidInput)
    async def _invalid_input(_request: Request, exc: InvalidInput) -> JSONResponse:
        errors = [{**e, "loc": ["body", *e["loc"]]} for e in exc.errors]
        return JSONResponse(status_code=422, content={"detail": errors, "message": _readable(errors)})

    @app.exception_handler(LLMError)
    async def _provider_failed(_request: Request, exc: LLMError) -> JSONResponse:
        status = error_status(exc)
        log.warning("provider failure -> %d: %s", status, exc)
        return _error_response(
            status,
            type(exc).__name__,
            str(exc),
            "llm",
            provider=exc.provider or service.provider,
            retryable=bool(exc.retryable),
            retry_after=getattr(exc, "retry_after", None),
        )

    @app.exception_handler(RetrievalUnavailable)
    async def _retrieval_failed(_request: Request, exc: RetrievalUnavailable) -> JSONResponse:
        log.warning("retrieval failure -> 503: %s", exc)
        return _error_response(
            503, "RetrievalUnavailable", str(exc), "retrieval", provider=service.provider, retryable=True
        )

    @app.exception_handler(ServiceBusy)
    async def _busy(_request: Request, exc: ServiceBusy) -> JSONResponse:
        log.warning("busy -> 503: %s", exc)
        return _error_response(
            503,
            "ServiceBusy",
            str(exc),
            "queue",
            provider=service.provider,
            retryable=True,
            retry_after=exc.retry_after,
        )

    @app.exception_handler(PromptTooLarge)
    async def _prompt_too_large(_request: Request, exc: PromptTooLarge) -> JSONResponse:
        log.warning("prompt too large -> 413: %s", exc)
        return _error_response(
            413,
            "PromptTooLarge",
            str(exc),
            "prompt",
            provider=service.provider,
            retryable=False,
            prompt_tokens=exc.prompt_tokens,
            context=exc.context,
        )

    @app.post("/analyze", response_model=AnalyzeResponse)
    async def analyze(body: AnalyzeRequest) -> JSONResponse:
        """Topology in, validated FloorPlanAnalysis out, with per-stage timings."""
        outcome = await service.aanalyze_detailed(body.topology, body.image_name)
        content = {"analysis": outcome.analysis.model_dump(mode="json"), "meta": outcome.meta()}
        return JSONResponse(content, headers=_timing_headers(outcome.timings, outcome.provider, outcome.model))

    @app.exception_handler(InvalidImage)
    async def _invalid_image(_request: Request, exc: InvalidImage) -> JSONResponse:
        return _error_response(400, "InvalidImage", str(exc), "upload", retryable=False)

    @app.exception_handler(UploadTooLarge)
    async def _too_large(_request: Request, exc: UploadTooLarge) -> JSONResponse:
        return _error_response(413, "UploadTooLarge", str(exc), "upload", retryable=False)

    @app.exception_handler(CVFailed)
    async def _cv_failed(_request: Request, exc: CVFailed) -> JSONResponse:
        log.warning("CV failure -> %d: %s", exc.status, exc)
        return _error_response(
            exc.status, "CVFailed", str(exc), "cv", source=service.settings.cv.source, retryable=exc.retryable
        )

    @app.post(UPLOAD_PATH, response_model=BackendAnalyzeResponse)
    async def analyze_upload(file: Annotated[UploadFile, File(description="The plan image (PNG).")]) -> JSONResponse:
        """The team backend's request: a plan image in, three JSON strings out (also what a
        multipart ``POST /analyze`` reaches)."""
        limit = service.max_upload_bytes
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise UploadTooLarge(f"the upload is over serving.max_upload_mb ({limit / 1048576:g} MiB)")
        upload = await service.aanalyze_upload(data, file.filename)
        outcome = upload.outcome
        return JSONResponse(
            upload.backend_body(),
            headers=_timing_headers(outcome.timings, outcome.provider, outcome.model),
        )

    @app.post("/chat", response_model=ChatResponse)
    async def chat(body: ChatRequest) -> JSONResponse:
        """A Korean answer about a stored analysis, grounded in it and the criteria."""
        outcome = await service.achat_detailed(body.analysis, body.question, [t.model_dump() for t in body.history])
        return JSONResponse(
            {"answer": outcome.answer, "meta": outcome.meta()},
            headers=_timing_headers(outcome.timings, outcome.provider, outcome.model),
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Live provider and model (LLM or the rule-based reference), embeddings, vector store."""
        return service.health()

    return app


def serve(settings: Any = None, *, host: str | None = None, port: int | None = None, log_level: str = "info") -> None:
    """Run the API on uvicorn (blocking); host and port default to ``serving.host`` / ``.port``.
    SIGTERM / SIGINT: the service stops taking model calls and cancels local generations at once
    (their requests answer 503), then uvicorn drains within ``serving.shutdown_grace_s`` and exits."""
    try:
        import uvicorn
    except ImportError:  # pragma: no cover - the `serve` extra
        raise ConfigError("`ft-pipeline serve` needs uvicorn: pip install 'ft-pipeline[serve]'") from None
    if settings is None:
        from floorplan_ft.settings import load_settings

        settings = load_settings()
    app = create_app(settings, warm_up=True)
    config = uvicorn.Config(
        app,
        host=host or settings.serving.host,
        port=port or settings.serving.port,
        log_level=log_level,
        timeout_graceful_shutdown=float(getattr(settings.serving, "shutdown_grace_s", 5.0)),
    )
    _server_class()(config, on_exit=app.state.begin_shutdown).run()


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server that tells the service first when a stop signal comes."""

        def __init__(self, config: Any, on_exit: Callable[[], None]):
            super().__init__(config)
            self._on_exit = on_exit

        def handle_exit(self, sig: int, frame: Any) -> None:
            try:
                self._on_exit()
            finally:
                super().handle_exit(sig, frame)

    return Server


@contextmanager
def serve_in_thread(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30.0
) -> Iterator[str]:
    """Run `app` on uvicorn in a background thread on a real socket (port 0: a free one); yields
    the base URL and stops the server on exit. For tests, benchmarks and notebooks."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn-api")
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the API did not start on {host}:{bound}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
