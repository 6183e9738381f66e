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
    """Remove the given secrets, anything key-shaped and the passwords of URLs from a message."""
    from floorplan_ft.redact import mask_urls_in

    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return mask_urls_in(_KEY_PATTERNS.sub("[redacted]", text))


class LLMError(Exception):
    """A failed provider call. `retryable`: whether the same request may succeed later (a class
    default that an instance may override, e.g. a 429 for an exhausted quota)."""

    retryable: bool = False

    def __init__(self, message: str = "", *, provider: str | None = None, model: str | None = None):
        self.provider = provider
        self.model = model
        self.usage: Usage | None = None  # set when tokens were spent (truncated, invalid, refused)
        prefix = f"{provider}/{model}: " if provider and model else (f"{provider}: " if provider else "")
        # A base URL with a password in it (a proxy, a tunnel) never reaches a log or a result.
        super().__init__(redact(prefix + message))

    @property
    def message(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def __reduce__(self):
        # Prefect pickles a failed task's exception; rebuild without re-running __init__.
        return (_rebuild_error, (type(self), self.args, self.__dict__.copy()))


def _rebuild_error(cls: type[LLMError], args: tuple, state: dict[str, Any]) -> LLMError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class RateLimitError(LLMError):
    """HTTP 429. `retry_after`: seconds the provider asked us to wait, if it said."""

    retryable = True

    def __init__(
        self,
        retry_after: float | None = None,
        *,
        message: str = "rate limited (HTTP 429)",
        **kw: Any,
    ):
        self.retry_after = retry_after
        self.status = 429
        super().__init__(message, **kw)


class ServerError(LLMError):
    """HTTP 5xx (or 409/lock timeouts): the provider failed, the request was fine."""

    retryable = True

    def __init__(self, status: int | None = None, *, message: str | None = None, **kw: Any):
        self.status = status
        super().__init__(message or f"provider error (HTTP {status})", **kw)


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

    def __init__(self, message: str = "the answer hit the output-token limit", *, text: str = "", **kw: Any):
        self.text = text
        super().__init__(message, **kw)


class InvalidOutput(LLMError):
    """The answer is not JSON or fails the schema. `text` (the raw answer) and `detail` (the parse
    or validation error) let a re-ask quote both."""

    retryable = True

    def __init__(self, text: str = "", detail: str = "", *, message: str | None = None, **kw: Any):
        self.text = text
        self.detail = detail
        super().__init__(message or f"invalid answer: {detail[:300]}", **kw)


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
        return AuthError(
            f"the provider rejected the credentials (HTTP {status}); {auth_hint}",
            status=status,
            **kw,
        )
    if status == 429:
        error = RateLimitError(parse_retry_after(headers), message=f"rate limited (HTTP 429){said}", **kw)
        if quota_exhausted:  # out of credit: waiting does not help
            error.retryable = False
        return error
    if status == 408:
        return ProviderTimeout(f"the provider timed out the request (HTTP 408){said}", **kw)
    if status == 409 or status >= 500:
        return ServerError(status, message=f"provider error (HTTP {status}){said}", **kw)
    return BadRequest(f"request rejected (HTTP {status}){said}", status=status, **kw)


# ------------------------------------------------------------------------------ JSON answers

_THINK_BLOCK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)
_CODE_FENCE = re.compile(r"^\s*```(?:json)?\s*\n(.*?)\n?```\s*$", re.DOTALL)


def strip_thinking(text: str) -> str:
    """Drop a leading ``<think>...</think>`` block (Qwen3 and other reasoning models)."""
    return _THINK_BLOCK.sub("", text, count=1)


def parse_structured(text: str, schema: type[BaseModel], *, provider: str, model: str) -> BaseModel:
    """Validate an answer against `schema`, tolerating a think block and a ```json fence.

    Raw control characters inside strings are tolerated (``strict=False``). `InvalidOutput.detail`
    lists the failures as ``field.path: message``, ready to quote in a re-ask.
    """
    body = strip_thinking(text)
    fenced = _CODE_FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        data = json.loads(body, strict=False)
    except json.JSONDecodeError as exc:
        raise InvalidOutput(
            text,
            f"{exc.msg} at char {exc.pos}",
            message=f"the answer is not valid JSON ({exc.msg} at char {exc.pos})",
            provider=provider,
            model=model,
        ) from None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        detail = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors())
        raise InvalidOutput(
            text,
            detail,
            message=f"the answer does not match {schema.__name__}: {exc.error_count()} error(s)",
            provider=provider,
            model=model,
        ) from None


# ----------------------------------------------------------------------------------- clients


class LLMClient(ABC):
    """One chat model behind one provider."""

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
        """Blocking `achat`, from plain sync code or from inside a running loop (which it blocks)."""
        return _run_sync(self.achat(messages, schema, max_tokens=max_tokens, temperature=temperature))

    def describe(self) -> dict[str, Any]:
        """What the client talks to, for logs and provenance. Never contains secrets."""
        return {"provider": self.provider, "model": self.model, "base_url": self.base_url}

    async def aclose(self) -> None:
        """Release connections (a later call opens new ones)."""

    def close(self) -> None:
        """Blocking `aclose`."""
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


class RemoteLLMClient(LLMClient):
    """A client over an async provider SDK whose calls all run on the client's own event loop (a
    daemon thread). httpx connection pools are bound to one loop; this way one SDK client and one
    pool serve `chat()` from sync code, `achat()` from any caller's loop, and `asyncio.run` per
    call, without leaking sockets. Subclasses implement `_new_sdk`, `_request` and `_close_sdk`."""

    _loop_thread: _LoopThread | None = None
    _sdk_client: Any = None

    @abstractmethod
    def _new_sdk(self) -> Any:
        """Build the SDK client (called on the client's loop)."""

    @abstractmethod
    async def _request(
        self,
        sdk: Any,
        messages: Messages,
        schema: type[BaseModel] | None,
        max_tokens: int | None,
        temperature: float | None,
    ) -> ChatResult:
        """The call itself, on the client's loop."""

    @abstractmethod
    async def _close_sdk(self, sdk: Any) -> None:
        """Close the SDK client's connections."""

    async def _on_own_loop(self, messages, schema, max_tokens, temperature) -> ChatResult:
        if self._sdk_client is None:
            self._sdk_client = self._new_sdk()
        return await self._request(self._sdk_client, messages, schema, max_tokens, temperature)

    async def achat(
        self,
        messages: Messages,
        schema: type[BaseModel] | None = None,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatResult:
        coro = self._on_own_loop(messages, schema, max_tokens, temperature)
        return await self._thread().submit(coro)

    def chat(
        self,
        messages: Messages,
        schema: type[BaseModel] | None = None,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatResult:
        return self._thread().run(self._on_own_loop(messages, schema, max_tokens, temperature))

    def _thread(self) -> _LoopThread:
        with _THREAD_LOCK:
            if self._loop_thread is None:
                self._loop_thread = _LoopThread(name=f"{self.provider}-client")
            return self._loop_thread

    async def _shutdown(self) -> None:
        sdk, self._sdk_client = self._sdk_client, None
        if sdk is not None:
            await self._close_sdk(sdk)

    async def aclose(self) -> None:
        with _THREAD_LOCK:
            thread, self._loop_thread = self._loop_thread, None
        if thread is not None:
            await thread.submit(self._shutdown())
            thread.stop()

    def close(self) -> None:
        with _THREAD_LOCK:
            thread, self._loop_thread = self._loop_thread, None
        if thread is not None:
            thread.run(self._shutdown())
            thread.stop()


_THREAD_LOCK = threading.Lock()


class _LoopThread:
    """An event loop running forever on a daemon thread."""

    def __init__(self, name: str):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Block the calling thread until `coro` finishes on this loop."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("blocking call from the client's own loop thread; await achat()")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def submit(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro` running on this loop from another loop (cancellation is passed on)."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
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
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
