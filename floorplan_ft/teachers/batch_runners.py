"""The providers' batch APIs behind one interface (`BatchRunner`): build a job's lines exactly like
the online request, upload and create the job, poll it, find it again by our token, and read its
results back as validated `LineResult`s.

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

Results are validated by the online clients' own parsers (refusal, content filter, truncation, JSON,
schema). What a job's state means for its items is `batch_state`'s business.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from floorplan_ft.providers.base import (
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
from floorplan_ft.schemas import FloorPlanAnalysis
from floorplan_ft.teachers.labeling import LabelItem, LLMTeacher

BATCH_TEACHERS = ("openai", "gemini")


def custom_id(stem: str, key: str) -> str:
    """A job line's id: the stem plus a key prefix, so a line can never be booked to another
    version of the item's prompt."""
    return f"{stem}#{key[:16]}"


def split_custom_id(value: str) -> tuple[str, str]:
    stem, _, prefix = str(value).rpartition("#")
    return stem, prefix


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
    except Exception as exc:  # noqa: BLE001  (a row of a shape no parser expects: that row is unusable)
        return LineResult(cid, reason="bad_row", detail=redact(f"{type(exc).__name__}: {exc}")[:500])
    return LineResult(cid, result=result, usage=result.usage)


# ------------------------------------------------------------------------------ provider runners


class UnusableReply(Exception):
    """A provider reply that cannot be used as it is (no id, a field of the wrong type)."""


@dataclass
class JobView:
    """What one provider reply says about a job; checked by `reply_problem` before it is used."""

    id: Any
    state: Any
    token: str | None = None  # our token, from the job's metadata / display name
    teacher: str | None = None
    input_file_id: Any = None


async def _own_jobs(pager: Any, view: Callable[[Any], JobView], teacher: str, limit: int) -> list[JobView]:
    """This teacher's jobs (those carrying our token) among the provider's newest `limit`."""
    out: list[JobView] = []
    seen = 0
    async for batch in pager:
        seen += 1
        job = view(batch)
        if job.teacher == teacher and job.token:
            out.append(job)
        if seen >= limit:
            break
    return out


def valid_job_id(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


class BatchRunner(ABC):
    """One provider's batch API: build lines, upload and create a job, poll it, read its results."""

    provider: str
    max_requests: int
    max_bytes: int
    states: frozenset[str]  # every state the provider documents
    terminal: frozenset[str]
    list_limit = 1000  # jobs looked at when searching the provider's list

    def __init__(self, client: Any, *, max_requests: int | None = None, max_bytes: int | None = None):
        self.client = client
        self.model = client.model
        if max_requests is not None:
            self.max_requests = max_requests
        if max_bytes is not None:
            self.max_bytes = max_bytes

    def reply_problem(self, view: JobView) -> str | None:
        """Why a job reply cannot be used as it is, or None."""
        if not valid_job_id(view.id):
            return f"no job id (got {type(view.id).__name__} {str(view.id)[:40]!r})"
        if view.state not in self.states:
            return f"unknown state {str(view.state)[:60]!r}"
        return None

    @abstractmethod
    def build_line(self, cid: str, item: LabelItem, max_tokens: int, temperature: float | None) -> Any:
        """The request of one item, exactly as the online client would send it."""

    @abstractmethod
    def line_size(self, line: Any) -> int:
        """Bytes the line adds to a job (for the providers' size limits)."""

    async def upload(self, job: dict[str, Any], lines: list[Any]) -> None:
        """Put the job's input where the create can read it (sets ``job["input_file_id"]``)."""

    @abstractmethod
    async def create(self, job: dict[str, Any], lines: list[Any]) -> JobView:
        """Create the job, tagged with ``job["token"]``; returns the reply, unchecked."""

    @abstractmethod
    async def list_jobs(self, teacher: str) -> list[JobView]:
        """This teacher's jobs in the provider's list (newest first, at most `list_limit` looked at)."""

    async def find(self, job: dict[str, Any]) -> JobView | None:
        """The job created under ``job["token"]``, if the provider lists it."""
        for view in await self.list_jobs(job["teacher"]):
            if view.token == job["token"]:
                return view
        return None

    async def job_items(self, view: JobView) -> list[str] | None:
        """The custom ids a listed job was created with, when the provider can tell."""
        return None

    @abstractmethod
    async def poll(self, job: dict[str, Any]) -> JobView:
        """Fetch the job; records file ids and counts on `job`; returns the reply, unchecked."""

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
    states = frozenset(
        {"validating", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled", "failed"}
    )
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

    def _error(self, exc: Exception) -> LLMError | None:
        """The SDK's exception as ours (None: not an API error)."""
        import openai

        if isinstance(exc, openai.APIStatusError):
            return error_from_status(
                exc.status_code,
                exc.response.headers,
                getattr(exc, "message", None),
                auth_hint="check OPENAI_API_KEY",
                **self._kw,
            )
        if isinstance(exc, openai.APITimeoutError):
            return ProviderTimeout("the batch API did not answer in time", **self._kw)
        if isinstance(exc, openai.APIConnectionError):
            where = self.client.base_url or "the OpenAI API"
            return ConnectionFailed(f"cannot reach {where} ({type(exc.__cause__).__name__})", **self._kw)
        return None

    async def _call(self, coro: Awaitable[Any]) -> Any:
        try:
            return await coro
        except Exception as exc:
            error = self._error(exc)
            if error is None:
                raise
        raise error from None  # the SDK's exception may quote the key or the request

    async def upload(self, job: dict[str, Any], lines: list[dict]) -> None:
        data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
        # A file is no job: retrying its upload cannot start anything twice.
        sdk = self._sdk.with_options(timeout=self.upload_timeout_s, max_retries=2)
        upload = await self._call(
            sdk.files.create(
                file=(f"ftp-{job['teacher']}-{job['token']}.jsonl", data, "application/jsonl"), purpose="batch"
            )
        )
        file_id = getattr(upload, "id", None)
        if not valid_job_id(file_id):
            raise UnusableReply(f"the upload reply has no file id (got {type(file_id).__name__})")
        job["input_file_id"] = file_id

    def _view(self, batch: Any) -> JobView:
        metadata = getattr(batch, "metadata", None)
        metadata = metadata if isinstance(metadata, dict) else {}
        return JobView(
            getattr(batch, "id", None),
            getattr(batch, "status", None),
            token=metadata.get("ftp_token"),
            teacher=metadata.get("ftp_teacher"),
            input_file_id=getattr(batch, "input_file_id", None),
        )

    async def create(self, job: dict[str, Any], lines: list[dict]) -> JobView:
        batch = await self._call(
            self._sdk.batches.create(
                input_file_id=job["input_file_id"],
                endpoint=self.endpoint,
                completion_window="24h",
                metadata={"ftp_token": job["token"], "ftp_teacher": job["teacher"]},
            )
        )
        return self._view(batch)

    async def list_jobs(self, teacher: str) -> list[JobView]:
        try:
            # The SDK's async pager fetches the next page as the loop goes on.
            out = await _own_jobs(
                self._sdk.with_options(max_retries=2).batches.list(limit=100), self._view, teacher, self.list_limit
            )
        except Exception as exc:
            error = self._error(exc)
            if error is None:
                raise
            raise error from None
        return out

    async def job_items(self, view: JobView) -> list[str] | None:
        if not valid_job_id(view.input_file_id):
            return None
        sdk = self._sdk.with_options(max_retries=2, timeout=self.upload_timeout_s)
        content = await self._call(sdk.files.content(view.input_file_id))
        ids = []
        for raw in content.text.splitlines():
            try:
                row = json.loads(raw) if raw.strip() else None
            except ValueError:
                return None
            if isinstance(row, dict) and isinstance(row.get("custom_id"), str):
                ids.append(row["custom_id"])
        return ids

    async def poll(self, job: dict[str, Any]) -> JobView:
        batch = await self._call(self._sdk.with_options(max_retries=2).batches.retrieve(job["id"]))
        for name in ("output_file_id", "error_file_id"):
            value = getattr(batch, name, None)
            job[name] = value if valid_job_id(value) else None
        counts = getattr(batch, "request_counts", None)
        if counts is not None and hasattr(counts, "model_dump"):
            job["request_counts"] = counts.model_dump()
        errors = getattr(getattr(batch, "errors", None), "data", None) or []
        if errors:
            job["errors"] = [
                redact(f"{getattr(e, 'code', None)}: {getattr(e, 'message', None)}")[:300] for e in errors[:5]
            ]
            job["error_codes"] = sorted({str(getattr(e, "code", "")) for e in errors})
        return self._view(batch)

    async def results(self, job: dict[str, Any]) -> list[LineResult]:
        out: list[LineResult] = []
        sdk = self._sdk.with_options(max_retries=2, timeout=self.upload_timeout_s)
        for file_id in (job.get("output_file_id"), job.get("error_file_id")):
            if not file_id:
                continue
            content = await self._call(sdk.files.content(file_id))
            for number, raw in enumerate(content.text.splitlines(), start=1):
                if raw.strip():
                    out.append(self._line(raw, f"{file_id} line {number}"))
        return out

    def _line(self, raw: str, where: str) -> LineResult:
        try:
            row = json.loads(raw)
        except ValueError as exc:
            return LineResult(None, reason="bad_row", detail=f"{where}: not JSON ({exc.msg})")
        if not isinstance(row, dict):
            return LineResult(None, reason="bad_row", detail=f"{where}: not a JSON object")
        cid = row.get("custom_id")
        if not isinstance(cid, str):
            return LineResult(None, reason="bad_row", detail=f"{where}: no custom_id")
        response = row.get("response") or None
        error = row.get("error") or None
        if response is not None and not isinstance(response, dict):
            return LineResult(cid, reason="bad_row", detail=f"{where}: 'response' is not an object")
        if response is not None and response.get("status_code") == 200:
            line = _validated(lambda: self.client.parse_chat_completion(response.get("body"), FloorPlanAnalysis), cid)
            if line.usage is None:  # an unusable answer is billed all the same
                line.usage = _body_usage(response.get("body"))
            return line
        if response is not None:
            body = response.get("body") or {}
            message = (
                (body.get("error") or {}).get("message")
                if isinstance(body, dict) and isinstance(body.get("error"), dict)
                else None
            )
            try:
                status = int(response.get("status_code") or 0)
            except (TypeError, ValueError):
                status = 0
            exc = error_from_status(status, None, message, auth_hint="check OPENAI_API_KEY", **self._kw)
            return LineResult(cid, reason=_error_reason(exc), detail=str(exc)[:500])
        error = error if isinstance(error, dict) else {}
        code = str(error.get("code") or "")
        reason = {"batch_expired": "expired", "batch_cancelled": "cancelled"}.get(code, "batch_error")
        return LineResult(cid, reason=reason, detail=redact(f"{code}: {error.get('message')}")[:500])

    async def aclose(self) -> None:
        await self._sdk.close()


def _body_usage(body: Any) -> Usage | None:
    """The tokens a chat-completion body reports, if it reports them as numbers."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return None
    tokens = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
        return None
    return Usage(input_tokens=tokens[0], output_tokens=tokens[1])


class GeminiBatchRunner(BatchRunner):
    """Gemini batch mode with inlined requests through google-genai's ``client.aio.batches``."""

    provider = "gemini"
    max_requests = 50_000
    max_bytes = 19 * 1024 * 1024  # inlined requests: ~20 MB per job
    states = frozenset(
        {
            "JOB_STATE_QUEUED",
            "JOB_STATE_PENDING",
            "JOB_STATE_RUNNING",
            "JOB_STATE_SUCCEEDED",
            "JOB_STATE_FAILED",
            "JOB_STATE_CANCELLING",
            "JOB_STATE_CANCELLED",
            "JOB_STATE_PAUSED",
            "JOB_STATE_EXPIRED",
            "JOB_STATE_UPDATING",
            "JOB_STATE_PARTIALLY_SUCCEEDED",
        }
    )
    terminal = frozenset(
        {
            "JOB_STATE_SUCCEEDED",
            "JOB_STATE_FAILED",
            "JOB_STATE_CANCELLED",
            "JOB_STATE_EXPIRED",
            "JOB_STATE_PARTIALLY_SUCCEEDED",
        }
    )

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

        from floorplan_ft.providers.gemini_client import _transport_error

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

    @staticmethod
    def display_name(teacher: str, token: str) -> str:
        return f"ftp-{teacher}-{token}"

    def _view(self, batch: Any) -> JobView:
        name = getattr(batch, "display_name", None)
        teacher = token = None
        if isinstance(name, str) and name.startswith("ftp-"):
            teacher, _, token = name[4:].rpartition("-")
        return JobView(getattr(batch, "name", None), _state(batch), token=token or None, teacher=teacher or None)

    async def create(self, job: dict[str, Any], lines: list[Any]) -> JobView:
        from google.genai import types

        created = await self._call(
            self._sdk.aio.batches.create(
                model=self.model,
                src=lines,
                config=types.CreateBatchJobConfig(display_name=self.display_name(job["teacher"], job["token"])),
            )
        )
        return self._view(created)

    async def list_jobs(self, teacher: str) -> list[JobView]:
        async def walk() -> list[JobView]:
            pager = await self._sdk.aio.batches.list(config={"page_size": 100})
            return await _own_jobs(pager, self._view, teacher, self.list_limit)

        return await self._call(walk())

    async def poll(self, job: dict[str, Any]) -> JobView:
        batch = await self._call(self._sdk.aio.batches.get(name=job["id"]))
        view = self._view(batch)
        if view.state in self.terminal:
            self._ended[job["id"]] = batch
        error = getattr(batch, "error", None)
        if error is not None:
            job["errors"] = [redact(f"{getattr(error, 'code', None)}: {getattr(error, 'message', None)}")[:300]]
        return view

    async def results(self, job: dict[str, Any]) -> list[LineResult]:
        batch = self._ended.pop(job["id"], None) or await self._call(self._sdk.aio.batches.get(name=job["id"]))
        dest = batch.dest
        if dest is not None and dest.file_name and not dest.inlined_responses:
            job["errors"] = [f"answers in {dest.file_name}: file results are not read (inlined requests only)"]
        responses = list((dest.inlined_responses if dest is not None else None) or [])
        order = [custom_id(stem, key) for stem, key in (job.get("items") or {}).items()]
        by_position = len(responses) == len(order) and not job.get("items_unknown")
        out: list[LineResult] = []
        for i, answer in enumerate(responses):
            metadata = answer.metadata if isinstance(answer.metadata, dict) else {}
            cid = metadata.get("custom_id")
            if not isinstance(cid, str):
                cid = order[i] if by_position else None
            if answer.error is not None:
                detail = redact(f"{answer.error.code}: {answer.error.message}")[:500]
                out.append(LineResult(cid, reason="batch_error", detail=detail))
            elif answer.response is not None:
                out.append(
                    _validated(lambda r=answer.response: self.client.parse_generate_content(r, FloorPlanAnalysis), cid)
                )
            else:
                out.append(LineResult(cid, reason="bad_row", detail="neither response nor error"))
        return out

    async def aclose(self) -> None:
        await self._sdk.aio.aclose()


def _state(batch: Any) -> str | None:
    state = getattr(batch, "state", None)
    value = getattr(state, "value", state)
    return str(value) if value else None


def make_runner(teacher: LLMTeacher, **kw: Any) -> BatchRunner:
    from floorplan_ft.providers.gemini_client import GeminiChatClient
    from floorplan_ft.providers.openai_client import OpenAIChatClient, OpenAICompatibleChatClient

    client = teacher.client
    if isinstance(client, OpenAIChatClient) and not isinstance(client, OpenAICompatibleChatClient):
        return OpenAIBatchRunner(client, **kw)
    if isinstance(client, GeminiChatClient):
        return GeminiBatchRunner(client, **kw)
    raise ConfigError(
        f"teacher {teacher.name!r}: batch mode exists for {', '.join(BATCH_TEACHERS)} only; "
        "set teachers.use_batch_api=false for it"
    )
