"""What every chat backend shares: the result types, the error taxonomy and the `LLMClient` ABC.

A client makes exactly one attempt per call and classifies the failure; retry policy, rate limiting,
caching and cost live a layer up (the teachers, the analysis service). Each error says whether a
retry can help (`.retryable`) and never carries a key in its text.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, SerializeAsAny, ValidationError

Messages = list[dict[str, Any]]
T = TypeVar("T")


# ----------------------------------------------------------------------------------- results


class Usage(BaseModel):
    """Token counts of one call. `input_tokens` includes `cached_tokens`; `output_tokens` includes
    `thinking_tokens` (both are billed as output), so cost = input × in-price + output × out-price
    (minus the cache discount)."""

    model_config = ConfigDict(frozen=True)

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    thinking_tokens: int = 0
    latency_s: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class RateLimitInfo(BaseModel):
    """The provider's view of our quota, from ``x-ratelimit-*`` response headers."""

    model_config = ConfigDict(frozen=True)

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str] | None) -> RateLimitInfo | None:
        """Parse ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``; None when none is present."""
        if not headers:
            return None
        lower = {str(k).lower(): str(v) for k, v in headers.items()}
        values: dict[str, Any] = {}
        for kind in ("requests", "tokens"):
            values[f"limit_{kind}"] = _to_int(lower.get(f"x-ratelimit-limit-{kind}"))
            values[f"remaining_{kind}"] = _to_int(lower.get(f"x-ratelimit-remaining-{kind}"))
            values[f"reset_{kind}_s"] = parse_duration(lower.get(f"x-ratelimit-reset-{kind}"))
        if all(v is None for v in values.values()):
            return None
        return cls(**values)


class ChatResult(BaseModel):
    """One successful answer. With a schema, `parsed` is a validated instance of it."""

    model_config = ConfigDict(frozen=True)

    text: str
    parsed: SerializeAsAny[BaseModel] | None = None
    usage: Usage
    model: str
    provider: str
    finish_reason: str | None = None
    rate_limit: RateLimitInfo | None = None


def _to_int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None and value != "" else None
    except ValueError:
        return None


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(value: str | None) -> float | None:
    """``"6m0s"`` → 360.0, ``"1s"`` → 1.0, ``"20ms"`` → 0.02, ``"1.5"`` → 1.5; None if unparseable."""
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        return None
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (OpenAI) or ``retry-after`` (seconds or HTTP date)."""
    if not headers:
        return None
    lower = {str(k).lower(): str(v) for k, v in headers.items()}
    if "retry-after-ms" in lower:
        try:
            return max(0.0, float(lower["retry-after-ms"]) / 1000.0)
        except ValueError:
            pass
    raw = lower.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# ------------------------------------------------------------------------------------ errors

# Key-shaped strings redacted from any provider text we quote (OpenAI's 401 echoes part of the key).
_KEY_PATTERNS = re.compile(r"(sk-[A-Za-z0-9_\-*]{6,}|AIza[0-9A-Za-z_\-]{10,})")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove the given secrets and anything key-shaped from a message."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return _KEY_PATTERNS.sub("[redacted]", text)


class LLMError(Exception):
    """A failed provider call. `retryable`: whether the same request may succeed later (a class
    default that an instance may override, e.g. a 429 for an exhausted quota)."""

    retryable: bool = False

    def __init__(self, message: str, *, provider: str | None = None, model: str | None = None):
        self.provider = provider
        self.model = model
        self.usage: Usage | None = None  # set when tokens were spent (truncated, invalid, refused)
        prefix = f"{provider}/{model}: " if provider and model else (f"{provider}: " if provider else "")
        super().__init__(prefix + message)

    @property
    def message(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class RateLimitError(LLMError):
    """HTTP 429. `retry_after`: seconds the provider asked us to wait, if it said."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any):
        self.retry_after = retry_after
        self.status = 429
        super().__init__(message, **kw)


class ServerError(LLMError):
    """HTTP 5xx (or 409/lock timeouts): the provider failed, the request was fine."""

    retryable = True

    def __init__(self, message: str, *, status: int | None = None, **kw: Any):
        self.status = status
        super().__init__(message, **kw)


class ProviderTimeout(LLMError):
    """No answer within the request timeout."""

    retryable = True


TimeoutError_ = ProviderTimeout


class ConnectionFailed(LLMError):
    """The server could not be reached (refused, DNS, reset)."""

    retryable = True


class OutputTruncated(LLMError):
    """The answer hit the output-token limit (finish_reason length / MAX_TOKENS). `text` is the
    partial answer; retrying unchanged gives the same cut, so raise the limit instead."""

    def __init__(self, message: str, *, text: str = "", **kw: Any):
        self.text = text
        super().__init__(message, **kw)


class InvalidOutput(LLMError):
    """The answer is not JSON or fails the schema. `text` and `detail` let a re-ask quote both."""

    retryable = True

    def __init__(self, message: str, *, text: str = "", detail: str = "", **kw: Any):
        self.text = text
        self.detail = detail
        super().__init__(message, **kw)


class Refusal(LLMError):
    """The model refused, or a safety / content filter blocked the prompt or the answer."""

    def __init__(self, message: str, *, reason: str | None = None, **kw: Any):
        self.reason = reason
        super().__init__(message, **kw)


class AuthError(LLMError):
    """HTTP 401/403: the key is missing, wrong or lacks access. The message names the setting."""

    def __init__(self, message: str, *, status: int | None = None, **kw: Any):
        self.status = status
        super().__init__(message, **kw)


class BadRequest(LLMError):
    """Any other 4xx: the request itself is wrong (model name, schema, parameters)."""

    def __init__(self, message: str, *, status: int | None = None, **kw: Any):
        self.status = status
        super().__init__(message, **kw)


class ConfigError(LLMError):
    """A client cannot be built: missing credentials, unreachable server, bad option."""


def error_from_status(
    status: int,
    headers: Mapping[str, str] | None,
    detail: str | None,
    *,
    provider: str,
    model: str,
    auth_hint: str,
    secrets: tuple[str, ...] = (),
    quota_exhausted: bool = False,
) -> LLMError:
    """Classify an HTTP error status. `detail` (the provider's message) is redacted and quoted,
    except on 401/403, where providers echo parts of the key; `auth_hint` says what to fix."""
    said = f": {redact(detail, secrets)[:300]}" if detail else ""
    kw: dict[str, Any] = {"provider": provider, "model": model}
    if status in (401, 403):
        return AuthError(f"the provider rejected the credentials (HTTP {status}); {auth_hint}", status=status, **kw)
    if status == 429:
        error = RateLimitError(
            f"rate limited (HTTP 429){said}", retry_after=parse_retry_after(headers), **kw
        )
        if quota_exhausted:  # out of credit: waiting does not help
            error.retryable = False
        return error
    if status == 408:
        return ProviderTimeout(f"the provider timed out the request (HTTP 408){said}", **kw)
    if status == 409 or status >= 500:
        return ServerError(f"provider error (HTTP {status}){said}", status=status, **kw)
    return BadRequest(f"request rejected (HTTP {status}){said}", status=status, **kw)


# ------------------------------------------------------------------------------ JSON answers

_THINK_BLOCK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)
_CODE_FENCE = re.compile(r"^\s*```(?:json)?\s*\n(.*?)\n?```\s*$", re.DOTALL)


def strip_thinking(text: str) -> str:
    """Drop a leading ``<think>...</think>`` block (Qwen3 and other reasoning models)."""
    return _THINK_BLOCK.sub("", text, count=1)


def parse_structured(
    text: str, schema: type[BaseModel], *, provider: str, model: str
) -> BaseModel:
    """Validate an answer against `schema`, tolerating a think block and a ```json fence.

    Raw control characters inside strings are accepted (``strict=False``): xgrammar's bounded
    string rule lets a weak local model emit them, and they are harmless once parsed.
    """
    body = strip_thinking(text)
    fenced = _CODE_FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        data = json.loads(body, strict=False)
    except json.JSONDecodeError as exc:
        raise InvalidOutput(
            f"the answer is not valid JSON ({exc.msg} at char {exc.pos})",
            text=text, detail=f"{exc.msg} at char {exc.pos}", provider=provider, model=model,
        ) from None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        detail = str(exc)
        raise InvalidOutput(
            f"the answer does not match {schema.__name__}: {exc.error_count()} error(s)",
            text=text, detail=detail, provider=provider, model=model,
        ) from None


# ----------------------------------------------------------------------------------- clients


class LLMClient(ABC):
    """One chat model behind one provider. Subclasses implement `achat` and `aclose`."""

    provider: str
    model: str
    base_url: str | None = None

    @abstractmethod
    async def achat(
        self,
        messages: Messages,
        schema: type[BaseModel] | None = None,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatResult:
        """One attempt. With `schema`, `parsed` is a validated instance; raises an `LLMError`."""

    def chat(
        self,
        messages: Messages,
        schema: type[BaseModel] | None = None,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatResult:
        """Blocking `achat`. Runs on the client's own event-loop thread, so it works from plain
        sync code and from inside a running loop (it blocks that loop's thread meanwhile)."""
        return self._runner().run(
            self.achat(messages, schema, max_tokens=max_tokens, temperature=temperature)
        )

    def describe(self) -> dict[str, Any]:
        """What the client talks to, for logs and provenance. Never contains secrets."""
        return {"provider": self.provider, "model": self.model, "base_url": self.base_url}

    async def aclose(self) -> None:
        """Release connections. The client is unusable afterwards."""
        runner = getattr(self, "_sync_runner", None)
        if runner is not None:
            self._sync_runner = None
            runner.stop()

    def close(self) -> None:
        """Blocking `aclose`, for sync callers."""
        _run_sync(self.aclose())

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.describe().items())
        return f"{type(self).__name__}({fields})"

    def _runner(self) -> _LoopThread:
        runner = getattr(self, "_sync_runner", None)
        if runner is None:
            runner = self._sync_runner = _LoopThread(name=f"{self.provider}-chat")
        return runner


class _LoopThread:
    """A private event loop on a daemon thread: sync callers share its connection pools."""

    def __init__(self, name: str):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("chat() called from the client's own loop thread; await achat()")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even if this thread has a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


class PerLoop:
    """One SDK client per event loop: httpx connection pools must not cross loops (``chat()`` runs
    on a private loop, callers may use their own, ``asyncio.run`` makes a new one each time)."""

    def __init__(self, factory):
        self._factory = factory
        self._clients: dict[int, tuple[asyncio.AbstractEventLoop, Any]] = {}
        self._lock = threading.Lock()

    def get(self) -> Any:
        loop = asyncio.get_running_loop()
        with self._lock:
            for key, (other, _) in list(self._clients.items()):
                if other.is_closed():
                    del self._clients[key]
            entry = self._clients.get(id(loop))
            if entry is None or entry[0] is not loop:
                entry = self._clients[id(loop)] = (loop, self._factory())
            return entry[1]

    def pop_current(self) -> Any | None:
        """Forget and return the current loop's client (to close it); clients of other loops are
        dropped when their loop closes."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        with self._lock:
            entry = self._clients.pop(id(loop), None)
        return entry[1] if entry and entry[0] is loop else None

    def pop_all(self) -> list[tuple[asyncio.AbstractEventLoop, Any]]:
        with self._lock:
            entries = list(self._clients.values())
            self._clients.clear()
        return entries


async def close_per_loop(clients: PerLoop, runner: _LoopThread | None, close) -> None:
    """Close the SDK client of the current loop and of the sync runner's loop (`close` is an async
    function taking one SDK client); others belong to loops that are gone or not ours to drive."""
    current = asyncio.get_running_loop()
    for loop, sdk in clients.pop_all():
        if loop is current:
            await close(sdk)
        elif runner is not None and loop is runner._loop and not loop.is_closed():
            future = asyncio.run_coroutine_threadsafe(close(sdk), loop)
            await asyncio.wrap_future(future)
