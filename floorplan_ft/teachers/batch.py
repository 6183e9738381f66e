"""Phase 3 through the providers' batch APIs: the same labels at the batch discount (half price),
answered within the providers' 24 h window instead of seconds.

- **OpenAI Batch API**: one JSONL file per job (``files.create(purpose="batch")``), each line
  ``{custom_id, method: POST, url: /v1/chat/completions, body}`` whose body is exactly what the online
  client would POST for that item; ``batches.create(endpoint="/v1/chat/completions",
  completion_window="24h")``; ``batches.retrieve`` to poll; ``files.content`` for the output and
  error files. ≤ 50,000 lines and ≤ 200 MB per file: larger sets are split into several jobs.
- **Gemini batch mode** (google-genai ``client.aio.batches``): inlined requests
  (``batches.create(model, src=[InlinedRequest(contents, config, metadata)])``), each built exactly
  like the online ``generateContent`` call; ``batches.get`` to poll; answers come back inlined in
  the job (``dest.inlined_responses``). Inlined requests are limited to ~20 MB per job, so jobs are
  split at 19 MB. File-based jobs (``src="files/..."``, for larger inputs) are not used.

Never paying twice:

- Job state lives in ``{data_root}/batches/{teacher}.json`` (id, created_at, item stems with their
  cache keys, input file id, status, reserved worst-case cost). A job is recorded *before* it is
  created at the provider, with a random token in its metadata (OpenAI) / display name (Gemini); if
  a run dies between creating and recording the id, the next run finds the job by its token in the
  provider's job list instead of submitting again.
- A rerun first polls the jobs it knows. Items with a cached answer (same key as online: provider,
  model, parameters, prompt, schema) are never submitted; items waiting in a running job with the
  same key are not submitted again; items whose key changed (new prompt) are submitted anew and the
  old job's answer for them is discarded (still booked: it was billed).

Results are validated by the online clients' own parsers (refusal, content filter, truncation, JSON,
schema) and written with `labeling.write_answer`, so answer files and sidecars are the same as
online ones and the online cache and phase 4 see no difference. Every line's tokens are booked in
the teacher's `CostLedger` at ``teachers.batch_discount`` × the price table.

Failures are finished online by `LabelingRun` (with all of its retry rules): invalid or truncated
answers, errored lines, and the items an expired, cancelled or failed job did not answer. Refusals
and content-filter stops are not sent again in the same run (the online policy: no retry); they go to
the failure ledger like online refusals (a later run retries failed items, as online reruns do).

Budget: before a job is submitted its worst case (each item's generous input estimate and full
output budget, at the discount) is reserved against ``teachers.budget_usd`` minus what the ledger
has spent and what running jobs have reserved; items that do not fit are not submitted (listed as
skipped for budget). The online finish gets the cap minus the reservations of still-running jobs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from floorplan_ft.prompts import PROMPT_VERSION
from floorplan_ft.schemas import FloorPlanAnalysis
from floorplan_ft.serving.base import (
    AuthError,
    BadRequest,
    ChatResult,
    ConfigError,
    ConnectionFailed,
    InvalidOutput,
    LLMError,
    OutputTruncated,
    ProviderTimeout,
    RateLimitError,
    Refusal,
    ServerError,
    Usage,
    error_from_status,
    redact,
)
from floorplan_ft.settings import Settings, TeacherSettings
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.labeling import (
    Budget,
    CostLedger,
    ItemOutcome,
    LabelingRun,
    LabelItem,
    LLMTeacher,
    cached_answer,
    cost_usd,
    failures_path,
    item_key,
    messages_tokens,
    meta_path,
    write_answer,
)

log = logging.getLogger(__name__)

BATCH_TEACHERS = ("openai", "gemini")
STATE_VERSION = 1
# Reasons that are final for this run (the online engine does not retry them either).
NO_RETRY = frozenset({"refusal"})
# Error lines for requests a job never ran (OpenAI lists them in the error file).
NOT_RUN = frozenset({"expired", "cancelled"})


def state_path(store: ArtifactStore, teacher: str) -> str:
    return store.path("batches", f"{teacher}.json")


def custom_id(stem: str, key: str) -> str:
    """A job line's id: the stem plus a key prefix, so a line can never be booked to another
    version of the item's prompt."""
    return f"{stem}#{key[:16]}"


def split_custom_id(value: str) -> tuple[str, str]:
    stem, _, prefix = str(value).rpartition("#")
    return stem, prefix


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------ results


@dataclass
class LineResult:
    """One answered (or errored) request of a finished job."""

    custom_id: str | None
    result: ChatResult | None = None
    reason: str | None = None  # set when the line failed: refusal, truncated, invalid_output, ...
    detail: str | None = None
    usage: Usage | None = None  # tokens billed for the line (also for unusable answers)


def _failure_reason(error: LLMError) -> str:
    if isinstance(error, Refusal):
        return "refusal"
    if isinstance(error, OutputTruncated):
        return "truncated"
    if isinstance(error, InvalidOutput):
        return "invalid_output"
    return _error_reason(error)


def _error_reason(error: LLMError) -> str:
    return {
        RateLimitError: "rate_limited",
        ServerError: "server_error",
        ProviderTimeout: "timeout",
        ConnectionFailed: "connection",
        AuthError: "auth",
        BadRequest: "bad_request",
    }.get(type(error), "batch_error")


def _validated(parse: Callable[[], ChatResult], cid: str | None) -> LineResult:
    try:
        result = parse()
    except LLMError as exc:
        detail = exc.detail if isinstance(exc, InvalidOutput) and exc.detail else str(exc)
        return LineResult(cid, reason=_failure_reason(exc), detail=redact(detail)[:500], usage=exc.usage)
    return LineResult(cid, result=result, usage=result.usage)


# ------------------------------------------------------------------------------ provider runners


class BatchRunner(ABC):
    """One provider's batch API: build lines, submit a job, poll it, read its results."""

    provider: str
    max_requests: int
    max_bytes: int
    terminal: frozenset[str]

    def __init__(self, client: Any, *, max_requests: int | None = None, max_bytes: int | None = None):
        self.client = client
        self.model = client.model
        if max_requests is not None:
            self.max_requests = max_requests
        if max_bytes is not None:
            self.max_bytes = max_bytes

    @abstractmethod
    def build_line(self, cid: str, item: LabelItem, max_tokens: int, temperature: float | None) -> Any:
        """The request of one item, exactly as the online client would send it."""

    @abstractmethod
    def line_size(self, line: Any) -> int:
        """Bytes the line adds to a job (for the providers' size limits)."""

    @abstractmethod
    async def submit(self, job: dict[str, Any], lines: list[Any], persist: Callable[[], None]) -> None:
        """Create the job. Sets ``job["id"]`` (and ``input_file_id``); calls `persist` after every
        step that leaves something at the provider, before the next one."""

    @abstractmethod
    async def find(self, job: dict[str, Any]) -> str | None:
        """The id of a job created under ``job["token"]`` whose id was never recorded, if any."""

    @abstractmethod
    async def poll(self, job: dict[str, Any]) -> bool:
        """Refresh ``job["status"]`` (and file ids, counts); True once the job has ended."""

    @abstractmethod
    async def results(self, job: dict[str, Any]) -> list[LineResult]:
        """Every line the ended job answered or errored (missing items are simply absent)."""

    async def aclose(self) -> None:
        return None


class OpenAIBatchRunner(BatchRunner):
    """The OpenAI Batch API (``/v1/files`` + ``/v1/batches``) with the official SDK."""

    provider = "openai"
    endpoint = "/v1/chat/completions"
    max_requests = 50_000
    max_bytes = 190 * 1024 * 1024  # the limit is 200 MB per input file
    terminal = frozenset({"completed", "expired", "cancelled", "failed"})
    upload_timeout_s = 600.0

    def __init__(self, client: Any, **kw: Any):
        super().__init__(client, **kw)
        self._sdk = client.new_sdk()  # max_retries=0: a retried create could start a second job
        self._kw = {"provider": self.provider, "model": self.model}

    def build_line(self, cid: str, item: LabelItem, max_tokens: int, temperature: float | None) -> dict:
        body = self.client.build_chat_request_body(
            item.messages, FloorPlanAnalysis, max_tokens=max_tokens, temperature=temperature
        )
        return {"custom_id": cid, "method": "POST", "url": self.endpoint, "body": body}

    def line_size(self, line: dict) -> int:
        return len(json.dumps(line, ensure_ascii=False).encode()) + 1

    async def _call(self, coro: Awaitable[Any]) -> Any:
        import openai

        try:
            return await coro
        except openai.APIStatusError as exc:
            error = error_from_status(
                exc.status_code, exc.response.headers, getattr(exc, "message", None),
                auth_hint="check OPENAI_API_KEY", **self._kw,
            )
        except openai.APITimeoutError:
            error = ProviderTimeout("the batch API did not answer in time", **self._kw)
        except openai.APIConnectionError as exc:
            where = self.client.base_url or "the OpenAI API"
            error = ConnectionFailed(f"cannot reach {where} ({type(exc.__cause__).__name__})", **self._kw)
        raise error from None  # the SDK's exception may quote the key or the request

    async def submit(self, job: dict[str, Any], lines: list[dict], persist: Callable[[], None]) -> None:
        data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
        upload = await self._call(self._sdk.with_options(timeout=self.upload_timeout_s).files.create(
            file=(f"ftp-{job['teacher']}-{job['token']}.jsonl", data, "application/jsonl"), purpose="batch"
        ))
        job["input_file_id"] = upload.id
        persist()
        batch = await self._call(self._sdk.batches.create(
            input_file_id=upload.id,
            endpoint=self.endpoint,
            completion_window="24h",
            metadata={"ftp_token": job["token"], "ftp_teacher": job["teacher"]},
        ))
        job["id"], job["status"] = batch.id, batch.status

    async def find(self, job: dict[str, Any]) -> str | None:
        page = await self._call(self._sdk.with_options(max_retries=2).batches.list(limit=100))
        for batch in page.data:
            if (batch.metadata or {}).get("ftp_token") == job["token"]:
                return batch.id
        return None

    async def poll(self, job: dict[str, Any]) -> bool:
        batch = await self._call(self._sdk.with_options(max_retries=2).batches.retrieve(job["id"]))
        job["status"] = batch.status
        job["output_file_id"] = batch.output_file_id
        job["error_file_id"] = batch.error_file_id
        if batch.request_counts is not None:
            job["request_counts"] = batch.request_counts.model_dump()
        if batch.errors is not None and batch.errors.data:
            job["errors"] = [redact(f"{e.code}: {e.message}")[:300] for e in batch.errors.data[:5]]
        return batch.status in self.terminal

    async def results(self, job: dict[str, Any]) -> list[LineResult]:
        out: list[LineResult] = []
        sdk = self._sdk.with_options(max_retries=2, timeout=self.upload_timeout_s)
        for file_id in (job.get("output_file_id"), job.get("error_file_id")):
            if not file_id:
                continue
            content = await self._call(sdk.files.content(file_id))
            for raw in content.text.splitlines():
                if raw.strip():
                    out.append(self._line(json.loads(raw)))
        return out

    def _line(self, row: dict[str, Any]) -> LineResult:
        cid = row.get("custom_id")
        response = row.get("response") or None
        error = row.get("error") or None
        if response is not None and response.get("status_code") == 200:
            return _validated(lambda: self.client.parse_chat_completion(response.get("body"), FloorPlanAnalysis), cid)
        if response is not None:
            body = response.get("body") or {}
            message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
            exc = error_from_status(int(response.get("status_code") or 0), None, message,
                                    auth_hint="check OPENAI_API_KEY", **self._kw)
            return LineResult(cid, reason=_error_reason(exc), detail=str(exc)[:500])
        code = str((error or {}).get("code") or "")
        reason = {"batch_expired": "expired", "batch_cancelled": "cancelled"}.get(code, "batch_error")
        return LineResult(cid, reason=reason, detail=redact(f"{code}: {(error or {}).get('message')}")[:500])

    async def aclose(self) -> None:
        await self._sdk.close()


class GeminiBatchRunner(BatchRunner):
    """Gemini batch mode with inlined requests through google-genai's ``client.aio.batches``."""

    provider = "gemini"
    max_requests = 50_000
    max_bytes = 19 * 1024 * 1024  # inlined requests: ~20 MB per job
    terminal = frozenset({
        "JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED",
        "JOB_STATE_PARTIALLY_SUCCEEDED",
    })

    def __init__(self, client: Any, **kw: Any):
        super().__init__(client, **kw)
        self._sdk = client.new_sdk()
        self._kw = {"provider": self.provider, "model": self.model}
        self._ended: dict[str, Any] = {}

    def build_line(self, cid: str, item: LabelItem, max_tokens: int, temperature: float | None) -> Any:
        from google.genai import types

        contents, config = self.client.build_generate_content_request(
            item.messages, FloorPlanAnalysis, max_tokens=max_tokens, temperature=temperature
        )
        return types.InlinedRequest(contents=contents, config=config, metadata={"custom_id": cid})

    def line_size(self, line: Any) -> int:
        return len(line.model_dump_json(exclude_none=True).encode()) + 64

    async def _call(self, coro: Awaitable[Any]) -> Any:
        from google.genai import errors

        from floorplan_ft.serving.gemini_client import _transport_error

        try:
            return await coro
        except errors.APIError as exc:
            error: LLMError | None = error_from_status(
                int(exc.code or 0), None, exc.message, auth_hint="check GEMINI_API_KEY", **self._kw
            )
        except Exception as exc:
            error = _transport_error(exc, self.client.timeout_s, self.client.base_url, **self._kw)
            if error is None:
                raise
        raise error from None

    async def submit(self, job: dict[str, Any], lines: list[Any], persist: Callable[[], None]) -> None:
        from google.genai import types

        persist()  # the token is on record before the job can exist
        created = await self._call(self._sdk.aio.batches.create(
            model=self.model, src=lines,
            config=types.CreateBatchJobConfig(display_name=f"ftp-{job['teacher']}-{job['token']}"),
        ))
        job["id"], job["status"] = created.name, _state(created)

    async def find(self, job: dict[str, Any]) -> str | None:
        wanted = f"ftp-{job['teacher']}-{job['token']}"
        pager = await self._call(self._sdk.aio.batches.list(config={"page_size": 100}))
        for batch in pager.page:  # the newest 100 jobs
            if batch.display_name == wanted:
                return batch.name
        return None

    async def poll(self, job: dict[str, Any]) -> bool:
        batch = await self._call(self._sdk.aio.batches.get(name=job["id"]))
        job["status"] = _state(batch)
        ended = job["status"] in self.terminal
        if ended:
            self._ended[job["id"]] = batch
        return ended

    async def results(self, job: dict[str, Any]) -> list[LineResult]:
        batch = self._ended.pop(job["id"], None) or await self._call(self._sdk.aio.batches.get(name=job["id"]))
        dest = batch.dest
        if dest is not None and dest.file_name and not dest.inlined_responses:
            job["errors"] = [f"answers in {dest.file_name}: file results are not read (inlined requests only)"]
        responses = list((dest.inlined_responses if dest is not None else None) or [])
        order = [custom_id(stem, key) for stem, key in job["items"].items()]
        by_position = len(responses) == len(order)
        out: list[LineResult] = []
        for i, answer in enumerate(responses):
            cid = (answer.metadata or {}).get("custom_id") or (order[i] if by_position else None)
            if answer.error is not None:
                detail = redact(f"{answer.error.code}: {answer.error.message}")[:500]
                out.append(LineResult(cid, reason="batch_error", detail=detail))
            elif answer.response is not None:
                out.append(_validated(lambda r=answer.response: self.client.parse_generate_content(r, FloorPlanAnalysis), cid))
            else:
                out.append(LineResult(cid, reason="batch_error", detail="neither response nor error"))
        return out

    async def aclose(self) -> None:
        await self._sdk.aio.aclose()


def _state(batch: Any) -> str:
    state = batch.state
    return str(getattr(state, "value", state) or "JOB_STATE_UNSPECIFIED")


# ------------------------------------------------------------------------------ outcome


@dataclass
class BatchOutcome:
    teacher: str
    provider: str
    model: str
    status: str = "done"  # done | pending (jobs still running: a rerun resumes polling them)
    items: int = 0
    cached: int = 0  # answered before this run
    labeled: int = 0  # answers written from batch results in this run
    submitted: int = 0  # items sent in jobs created by this run
    jobs_submitted: list[str] = field(default_factory=list)
    jobs_pending: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # items in jobs still running
    failed: dict[str, dict] = field(default_factory=dict)  # batch failures ingested in this run
    finished_online: list[str] = field(default_factory=list)  # handed to LabelingRun (or to hand,
    # with finish_online=False): failed lines and items an ended job did not answer
    skipped_budget: list[str] = field(default_factory=list)
    cost_usd: float = 0.0  # batch lines booked in this run (discounted)
    total_spent_usd: float = 0.0
    budget_usd: float = 0.0
    online: dict[str, Any] | None = None  # the online finish's TeacherRunSummary
    unlabeled: list[str] = field(default_factory=list)  # no answer and not waiting
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ------------------------------------------------------------------------------ the run


class BatchLabeling:
    """Submit, poll and ingest batch jobs of one teacher, then finish the rest online."""

    def __init__(
        self,
        teacher: LLMTeacher,
        runner: BatchRunner,
        store: ArtifactStore,
        settings: TeacherSettings,
        *,
        poll_interval_s: float = 60.0,
        max_wait_s: float = 25 * 3600.0,
        finish_online: bool = True,
        on_progress: Callable[[BatchOutcome], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.teacher = teacher
        self.runner = runner
        self.store = store
        self.cfg = settings
        self.price = settings.prices.get(teacher.model)
        self.discount = settings.batch_discount
        self.poll_interval_s = poll_interval_s
        self.max_wait_s = max_wait_s
        self.finish_online = finish_online
        self.on_progress = on_progress
        self.sleep = sleep
        self.path = state_path(store, teacher.name)
        self.outcome = BatchOutcome(teacher.name, teacher.provider, teacher.model, budget_usd=settings.budget_usd)

    # -------------------------------------------------------------- state
    def _load(self) -> dict[str, Any]:
        if self.store.exists(self.path):
            return self.store.read_json(self.path)
        return {"version": STATE_VERSION, "teacher": self.teacher.name, "jobs": []}

    def _save(self) -> None:
        self.store.write_json(self.path, self.state)

    def _active(self) -> list[dict[str, Any]]:
        return [j for j in self.state["jobs"] if j.get("ingested_at") is None]

    # -------------------------------------------------------------- main
    async def run(self, items: list[LabelItem]) -> BatchOutcome:
        start = time.monotonic()
        o = self.outcome
        o.items = len(items)
        self.items = {item.stem: item for item in items}
        self.keys = {item.stem: item_key(self.teacher, item.messages, self.cfg.max_output_tokens) for item in items}
        self.ledger = CostLedger(self.store, self.teacher.name)
        self.state = self._load()
        online: list[str] = []
        closed = False
        o.cached = sum(
            cached_answer(self.store, item.stem, self.teacher.name, self.keys[item.stem]) is not None
            for item in items
        )
        try:
            await self._recover()
            await self._poll_all(online)
            to_submit = self._classify(items, online)
            await self._submit(to_submit)
            self._progress()
            while self._active() and (remaining := self.max_wait_s - (time.monotonic() - start)) > 0:
                await self.sleep(min(self.poll_interval_s, remaining))
                await self._poll_all(online)
                self._progress()

            active = self._active()
            o.jobs_pending = [j["id"] or f"token:{j['token']}" for j in active]
            waiting = {stem for j in active for stem, key in j["items"].items() if self.keys.get(stem) == key}
            o.waiting = sorted(waiting)
            o.status = "pending" if active else "done"
            online_items = [
                self.items[s] for s in dict.fromkeys(online)
                if s in self.items and s not in waiting
                and cached_answer(self.store, s, self.teacher.name, self.keys[s]) is None
            ]
            o.finished_online = [item.stem for item in online_items]
            if online_items and self.finish_online:
                reserved = sum(j.get("reserved_usd", 0.0) for j in active)
                cfg = self.cfg.model_copy(update={"budget_usd": max(0.0, self.cfg.budget_usd - reserved)})
                closed = True  # LabelingRun closes the teacher
                summary = await LabelingRun(self.teacher, self.store, cfg).run(online_items)
                o.online = summary.as_dict()
        finally:
            await self.runner.aclose()
            if not closed:
                await self.teacher.aclose()
        o.cost_usd = round(o.cost_usd, 6)
        o.total_spent_usd = round(CostLedger(self.store, self.teacher.name).spent, 6)
        waiting = set(o.waiting)
        o.unlabeled = sorted(
            s for s in self.items
            if s not in waiting
            and cached_answer(self.store, s, self.teacher.name, self.keys[s]) is None
        )
        o.seconds = round(time.monotonic() - start, 3)
        return o

    def _progress(self) -> None:
        if self.on_progress:
            self.on_progress(self.outcome)

    # -------------------------------------------------------------- classify and submit
    def _classify(self, items: list[LabelItem], online: list[str]) -> list[LabelItem]:
        active_keys: dict[str, set[str]] = {}
        for job in self._active():
            for stem, key in job["items"].items():
                active_keys.setdefault(stem, set()).add(key)
        last_failed: dict[str, tuple[str, str]] = {}  # stem -> (key, reason) from the newest ended job
        for job in self.state["jobs"]:
            if job.get("ingested_at") is not None:
                for stem, failure in (job.get("failed") or {}).items():
                    last_failed[stem] = (job["items"].get(stem), failure.get("reason"))
        to_submit = []
        for item in items:
            key = self.keys[item.stem]
            if cached_answer(self.store, item.stem, self.teacher.name, key) is not None:
                continue
            if key in active_keys.get(item.stem, ()):
                continue  # waiting in a running job
            failed_key, _ = last_failed.get(item.stem, (None, None))
            if failed_key == key:
                online.append(item.stem)  # the batch already tried: finish online
                continue
            to_submit.append(item)
        return to_submit

    def _worst_case(self, item: LabelItem) -> float:
        # The online engine's worst case of one attempt, at the batch discount.
        return cost_usd(self.price, messages_tokens(item.messages) * 3 // 2, self.cfg.max_output_tokens, self.discount)

    async def _submit(self, items: list[LabelItem]) -> None:
        if not items:
            return
        reserved = sum(j.get("reserved_usd", 0.0) for j in self._active())
        budget = Budget(self.cfg.budget_usd, self.ledger.spent + reserved)
        fitting: list[tuple[LabelItem, float]] = []
        for i, item in enumerate(items):
            worst = self._worst_case(item)
            if not budget.reserve(worst):
                self.outcome.skipped_budget = [it.stem for it in items[i:]]
                self._record_failures({s: {"reason": "budget", "detail": "skipped: the batch would exceed the budget",
                                           "attempts": 0, "cost_usd": 0.0} for s in self.outcome.skipped_budget})
                log.warning("%s: %d item(s) not submitted: the budget cap ($%.2f) would be exceeded",
                            self.teacher.name, len(self.outcome.skipped_budget), self.cfg.budget_usd)
                break
            fitting.append((item, worst))
        for chunk in self._chunks(fitting):
            await self._submit_job(chunk)

    def _chunks(self, fitting: list[tuple[LabelItem, float]]) -> list[list[tuple[LabelItem, float, Any]]]:
        chunks: list[list[tuple[LabelItem, float, Any]]] = []
        current: list[tuple[LabelItem, float, Any]] = []
        size = 0
        for item, worst in fitting:
            key = self.keys[item.stem]
            line = self.runner.build_line(custom_id(item.stem, key), item, self.cfg.max_output_tokens,
                                          self.teacher.temperature)
            line_size = self.runner.line_size(line)
            if current and (len(current) >= self.runner.max_requests or size + line_size > self.runner.max_bytes):
                chunks.append(current)
                current, size = [], 0
            current.append((item, worst, line))
            size += line_size
        if current:
            chunks.append(current)
        return chunks

    async def _submit_job(self, chunk: list[tuple[LabelItem, float, Any]]) -> None:
        job: dict[str, Any] = {
            "id": None,
            "token": uuid.uuid4().hex,
            "teacher": self.teacher.name,
            "provider": self.runner.provider,
            "model": self.teacher.model,
            "created_at": _now_iso(),
            "status": "submitting",
            "input_file_id": None,
            "max_tokens": self.cfg.max_output_tokens,
            "reserved_usd": round(sum(worst for _, worst, _ in chunk), 8),
            "items": {item.stem: self.keys[item.stem] for item, _, _ in chunk},
            "ingested_at": None,
        }
        recorded = False

        def persist() -> None:
            nonlocal recorded
            if not recorded:
                self.state["jobs"].append(job)
                recorded = True
            self._save()

        try:
            await self.runner.submit(job, [line for _, _, line in chunk], persist)
        except BaseException:
            # Nothing recorded: nothing exists at the provider. Recorded without an id: the job may
            # exist; the next run looks it up by its token before submitting anything.
            if recorded:
                self._save()
            raise
        persist()
        self.outcome.submitted += len(chunk)
        self.outcome.jobs_submitted.append(job["id"])
        log.info("%s: submitted batch %s with %d item(s)", self.teacher.name, job["id"], len(chunk))

    async def _recover(self) -> None:
        """Jobs recorded without an id (a run died while creating them): adopt or forget."""
        for job in self._active():
            if job.get("id"):
                continue
            try:
                found = await self.runner.find(job)
            except (RateLimitError, ServerError, ProviderTimeout, ConnectionFailed) as exc:
                # Its items count as waiting (never resubmitted) until the lookup succeeds.
                log.warning("%s: cannot look up an interrupted submission yet (%s)", self.teacher.name, exc)
                continue
            if found:
                job["id"] = found
                log.info("%s: found batch %s created by an interrupted run", self.teacher.name, found)
            else:
                job.update(status="not_submitted", ingested_at=_now_iso(), reserved_usd=0.0, failed={})
            self._save()

    # -------------------------------------------------------------- poll and ingest
    async def _poll_all(self, online: list[str]) -> None:
        for job in self._active():
            if not job.get("id"):
                continue
            try:
                ended = await self.runner.poll(job)
                if ended:
                    await self._ingest(job, online, await self.runner.results(job))
            except (RateLimitError, ServerError, ProviderTimeout, ConnectionFailed) as exc:
                log.warning("%s: polling batch %s failed (%s); trying again later", self.teacher.name, job["id"], exc)
            except BadRequest as exc:
                if exc.status != 404:
                    raise
                # The provider no longer knows the job (deleted): its items are finished online.
                log.warning("%s: batch %s not found at the provider", self.teacher.name, job["id"])
                job["status"] = "not_found"
                await self._ingest(job, online, [])
        self._save()

    async def _ingest(self, job: dict[str, Any], online: list[str], lines: list[LineResult]) -> None:
        teacher = self.teacher.name
        elapsed = max(0.0, time.time() - datetime.fromisoformat(job["created_at"]).timestamp())
        input_tokens = output_tokens = 0
        cost = 0.0
        requests = 0
        answered: set[str] = set()
        failed: dict[str, dict] = {}
        labeled: list[str] = []
        for line in lines:
            requests += line.reason not in NOT_RUN  # lines the provider never ran are no requests
            line_cost = 0.0
            if line.usage is not None:
                line_cost = cost_usd(self.price, line.usage.input_tokens, line.usage.output_tokens, self.discount)
                input_tokens += line.usage.input_tokens
                output_tokens += line.usage.output_tokens
            cost += line_cost
            stem, prefix = split_custom_id(line.custom_id or "")
            job_key = job["items"].get(stem)
            if job_key is None or not job_key.startswith(prefix) or not prefix:
                log.warning("%s: batch %s returned an unknown line %r", teacher, job["id"], line.custom_id)
                continue
            answered.add(stem)
            if line.result is None:
                failed[stem] = {"reason": line.reason, "detail": line.detail, "cost_usd": round(line_cost, 6)}
                continue
            current = self.keys.get(stem)
            if current is not None and current != job_key:
                continue  # the prompt changed since: superseded (but billed)
            if current is None and self.store.exists(meta_path(self.store, stem, teacher)):
                continue  # not ours to overwrite
            if cached_answer(self.store, stem, teacher, job_key) is not None:
                continue  # written by an earlier, interrupted ingest
            usage = line.usage or Usage()
            write_answer(self.store, self.teacher, stem, job_key, line.result,
                         ItemOutcome(stem, "labeled", attempts=1, cost_usd=line_cost,
                                     input_tokens=usage.input_tokens, output_tokens=usage.output_tokens),
                         elapsed, getattr(self.items.get(stem), "prompt_version", PROMPT_VERSION))
            labeled.append(stem)
        status = job.get("status")
        gone = {"expired": "expired", "cancelled": "cancelled", "failed": "job_failed",
                "JOB_STATE_EXPIRED": "expired", "JOB_STATE_CANCELLED": "cancelled",
                "JOB_STATE_FAILED": "job_failed"}.get(status, "missing")
        for stem in job["items"]:
            if stem not in answered:
                detail = f"batch {job['id']} ended {status} without an answer"
                if job.get("errors"):
                    detail += ": " + "; ".join(job["errors"])[:300]
                failed[stem] = {"reason": gone, "detail": detail, "cost_usd": 0.0}

        # Answers are on disk; now book the job once, then mark it ingested.
        if requests:
            self.ledger.add(Usage(input_tokens=input_tokens, output_tokens=output_tokens), cost,
                            requests=requests)
        job.update(ingested_at=_now_iso(), reserved_usd=0.0, failed=failed, labeled=len(labeled),
                   cost_usd=round(cost, 6), input_tokens=input_tokens, output_tokens=output_tokens)
        self._save()

        o = self.outcome
        o.labeled += sum(1 for s in labeled if s in self.items)
        o.cost_usd += cost
        mine = {s: f for s, f in failed.items() if self.keys.get(s) == job["items"][s]}
        for stem, failure in mine.items():
            o.failed[stem] = {**failure, "job": job["id"]}
            if failure["reason"] not in NO_RETRY:
                online.append(stem)
        self._record_failures(
            {s: {"reason": f["reason"], "detail": f["detail"], "attempts": 1, "cost_usd": f["cost_usd"]}
             for s, f in mine.items() if f["reason"] in NO_RETRY},
            labeled=labeled,
        )
        log.info("%s: batch %s ended %s: %d labeled, %d to finish online", teacher, job["id"], status,
                 len(labeled), sum(1 for f in mine.values() if f["reason"] not in NO_RETRY))

    def _record_failures(self, add: dict[str, dict], labeled: list[str] = ()) -> None:
        """The teacher's failure ledger (shared with the online engine): add final failures, drop
        items now labeled."""
        if not add and not labeled:
            return
        path = failures_path(self.store, self.teacher.name)
        data = self.store.read_json(path) if self.store.exists(path) else {"teacher": self.teacher.name, "failures": {}}
        failures = dict(data.get("failures") or {})
        for stem in labeled:
            failures.pop(stem, None)
        failures.update(add)
        self.store.write_json(path, {"teacher": self.teacher.name, "failures": dict(sorted(failures.items()))})


# ------------------------------------------------------------------------------ entry point


def make_runner(teacher: LLMTeacher, **kw: Any) -> BatchRunner:
    from floorplan_ft.serving.gemini_client import GeminiChatClient
    from floorplan_ft.serving.openai_client import OpenAIChatClient, OpenAICompatibleChatClient

    client = teacher.client
    if isinstance(client, OpenAIChatClient) and not isinstance(client, OpenAICompatibleChatClient):
        return OpenAIBatchRunner(client, **kw)
    if isinstance(client, GeminiChatClient):
        return GeminiBatchRunner(client, **kw)
    raise ConfigError(
        f"teacher {teacher.name!r}: batch mode exists for {', '.join(BATCH_TEACHERS)} only; "
        "set teachers.use_batch_api=false for it"
    )


async def label_in_batches(
    teacher_name: str,
    settings: Settings,
    items: list[LabelItem],
    store: ArtifactStore,
    *,
    poll_interval_s: float = 60.0,
    max_wait_s: float = 25 * 3600.0,
    finish_online: bool = True,
    max_requests_per_job: int | None = None,
    max_bytes_per_job: int | None = None,
    on_progress: Callable[[BatchOutcome], None] | None = None,
) -> BatchOutcome:
    """Label `items` with teacher ``openai`` or ``gemini`` through its batch API.

    Polls the jobs earlier runs left, submits what is neither answered nor waiting (within the
    budget), and polls every `poll_interval_s` until all jobs ended or `max_wait_s` passed
    (``max_wait_s=0``: submit and return). Then the items the batch could not label are finished
    online with `LabelingRun` (unless `finish_online` is False). Returns ``status="pending"`` while
    jobs are still running: they stay recorded and the next call resumes polling them.
    """
    from floorplan_ft.teachers.factory import make_teacher

    if teacher_name not in BATCH_TEACHERS:
        raise ConfigError(
            f"teacher {teacher_name!r}: batch mode exists for {', '.join(BATCH_TEACHERS)} only; "
            "set teachers.use_batch_api=false for it"
        )
    teacher = make_teacher(settings, teacher_name)
    assert isinstance(teacher, LLMTeacher)
    try:
        runner = make_runner(teacher, max_requests=max_requests_per_job, max_bytes=max_bytes_per_job)
    except BaseException:
        await teacher.aclose()
        raise
    run = BatchLabeling(
        teacher, runner, store, settings.teachers,
        poll_interval_s=poll_interval_s, max_wait_s=max_wait_s,
        finish_online=finish_online, on_progress=on_progress,
    )
    return await run.run(items)
