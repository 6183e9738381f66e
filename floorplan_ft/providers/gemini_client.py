"""Gemini through google-genai, one attempt per call.

The schema goes out as ``response_json_schema`` (plain JSON schema, so the fixed-key objects of
`FloorPlanAnalysis` pass), and the answer is validated here: the SDK's ``.parsed`` is silently None
on truncation. With a custom ``base_url`` google-genai 3.4 calls
``POST {base_url}/v1/models/{model}:generateContent`` (api version ``v1`` unless `api_version` or
``GOOGLE_GENAI_API_VERSION`` says otherwise) with the key in ``x-goog-api-key``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel, SecretStr

from floorplan_ft.providers.base import (
    ChatResult,
    ConfigError,
    ConnectionFailed,
    InvalidOutput,
    LLMError,
    Messages,
    OutputTruncated,
    ProviderTimeout,
    Refusal,
    RemoteLLMClient,
    Usage,
    error_from_status,
    parse_duration,
    parse_structured,
)

_REFUSED = {
    "SAFETY",
    "RECITATION",
    "BLOCKLIST",
    "PROHIBITED_CONTENT",
    "SPII",
    "LANGUAGE",
    "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT",
    "IMAGE_RECITATION",
    "MODEL_ARMOR",
}


class GeminiChatClient(RemoteLLMClient):
    provider = "gemini"

    def __init__(
        self,
        model: str,
        *,
        api_key: SecretStr | str | None,
        base_url: str | None = None,
        timeout_s: float = 60.0,
        max_tokens: int | None = None,
        api_version: str | None = None,
        key_setting: str = "GEMINI_API_KEY",
    ):
        if isinstance(api_key, str):
            api_key = SecretStr(api_key)
        if api_key is None or not api_key.get_secret_value().strip():
            raise ConfigError(f"no API key: set {key_setting} (environment or .env)", provider=self.provider)
        self.model = model
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.api_version = api_version
        self._key_setting = key_setting
        self._api_key = api_key

    def _new_sdk(self) -> Any:
        from google import genai
        from google.genai import types

        options = types.HttpOptions(
            base_url=self.base_url,
            api_version=self.api_version,
            timeout=int(self.timeout_s * 1000),
            # attempts=1 also turns off the SDK's implicit retry of aiohttp connection errors.
            retry_options=types.HttpRetryOptions(attempts=1),
        )
        return genai.Client(api_key=self._api_key.get_secret_value(), http_options=options)

    async def _request(
        self,
        sdk: Any,
        messages: Messages,
        schema: type[BaseModel] | None,
        max_tokens: int | None,
        temperature: float | None,
    ) -> ChatResult:
        contents, config = self.build_generate_content_request(
            messages, schema, max_tokens=max_tokens, temperature=temperature
        )
        started = time.perf_counter()
        response = await self._send(sdk, contents, config)
        return self.parse_generate_content(response, schema, latency_s=time.perf_counter() - started)

    # ------------------------------------------------------------------ also used by the batch API

    def build_generate_content_request(
        self,
        messages: Messages,
        schema: type[BaseModel] | None = None,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> tuple[list[Any], Any]:
        """``(contents, GenerateContentConfig)`` of the ``generateContent`` call ``achat`` makes
        (system instruction, JSON schema, temperature, token limit), e.g. for a batch request."""
        from google.genai import types

        system, contents = to_gemini_contents(messages)
        config: dict[str, Any] = {"system_instruction": system}
        if schema is not None:
            config["response_mime_type"] = "application/json"
            config["response_json_schema"] = schema.model_json_schema()
        if temperature is not None:
            config["temperature"] = temperature
        limit = max_tokens or self.max_tokens
        if limit:
            config["max_output_tokens"] = limit
        return contents, types.GenerateContentConfig(**config)

    def parse_generate_content(
        self, response: Any, schema: type[BaseModel] | None = None, *, latency_s: float = 0.0
    ) -> ChatResult:
        """Validate a ``GenerateContentResponse`` (from ``achat`` or a batch job's inlined
        responses) the same way: blocked prompt, safety stops, truncation, JSON and schema map to
        the same errors, with the spent tokens on ``exc.usage``."""
        usage = _usage(getattr(response, "usage_metadata", None), latency_s)
        try:
            return self._result(response, usage, schema)
        except LLMError as exc:
            exc.usage = usage
            raise

    def new_sdk(self) -> Any:
        """A fresh ``genai.Client`` with this client's key, URL, API version and timeout and no SDK
        retries, for calls outside ``achat`` (batch jobs). The caller closes ``.aio``."""
        return self._new_sdk()

    async def _send(self, sdk: Any, contents: list[Any], config: Any) -> Any:
        from google.genai import errors

        kw = {"provider": self.provider, "model": self.model}
        try:
            return await sdk.aio.models.generate_content(model=self.model, contents=contents, config=config)
        except errors.APIError as exc:
            headers = getattr(getattr(exc, "response", None), "headers", None)
            error = error_from_status(
                int(exc.code or 0),
                headers,
                exc.message,
                auth_hint=f"check {self._key_setting}",
                secrets=(self._api_key.get_secret_value(),),
                **kw,
            )
            if exc.code == 429 and getattr(error, "retry_after", None) is None:
                error.retry_after = _retry_delay(exc.details)
        except json.JSONDecodeError as exc:
            error = InvalidOutput(exc.doc[:2000], exc.msg, message="the response body is not JSON", **kw)
        except Exception as exc:
            error = _transport_error(exc, self.timeout_s, self.base_url, **kw)
            if error is None:
                raise
        raise error from None  # the SDK's exception may carry the request and its headers

    def _result(self, response: Any, usage: Usage, schema: type[BaseModel] | None) -> ChatResult:
        kw = {"provider": self.provider, "model": self.model}
        feedback = getattr(response, "prompt_feedback", None)
        block = getattr(feedback, "block_reason", None) if feedback else None
        if block:
            raise Refusal(f"the prompt was blocked ({_name(block)})", reason=_name(block), **kw)
        candidates = response.candidates or []
        if not candidates:
            raise InvalidOutput("", "no candidates", message="the response has no candidates", **kw)
        candidate = candidates[0]
        finish = _name(candidate.finish_reason) if candidate.finish_reason else None
        text = _candidate_text(candidate)
        if finish in _REFUSED:
            raise Refusal(f"the answer was stopped ({finish})", reason=finish, **kw)
        if finish == "MAX_TOKENS":
            raise OutputTruncated(
                f"the answer hit the output-token limit after {usage.output_tokens} tokens",
                text=text,
                **kw,
            )
        parsed = None
        if schema is not None:
            if not text.strip():
                raise InvalidOutput(
                    text,
                    f"empty answer, finish_reason {finish}",
                    message=f"the answer is empty (finish_reason {finish})",
                    **kw,
                )
            parsed = parse_structured(text, schema, provider=self.provider, model=self.model)
        return ChatResult(
            text=text,
            parsed=parsed,
            usage=usage,
            model=getattr(response, "model_version", None) or self.model,
            provider=self.provider,
            finish_reason=finish,
            rate_limit=None,  # Gemini sends no quota headers
        )

    async def _close_sdk(self, sdk: Any) -> None:
        await sdk.aio.aclose()


def to_gemini_contents(messages: Messages) -> tuple[str | None, list[Any]]:
    """OpenAI-style messages → (system_instruction, contents with roles user/model)."""
    from google.genai import types

    system_parts: list[str] = []
    contents = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role in ("system", "developer"):
            system_parts.append(content)
            continue
        gemini_role = "model" if role == "assistant" else "user"
        contents.append(types.Content(role=gemini_role, parts=[types.Part(text=content)]))
    return ("\n\n".join(system_parts) or None), contents


def _name(value: Any) -> str:
    return getattr(value, "value", None) or str(value)


def _candidate_text(candidate: Any) -> str:
    content = getattr(candidate, "content", None)
    parts = getattr(content, "parts", None) or []
    return "".join(p.text for p in parts if getattr(p, "text", None) and not getattr(p, "thought", False))


def _usage(meta: Any, latency: float) -> Usage:
    if meta is None:
        return Usage(latency_s=latency)
    thinking = meta.thoughts_token_count or 0
    return Usage(
        input_tokens=meta.prompt_token_count or 0,
        output_tokens=(meta.candidates_token_count or 0) + thinking,
        cached_tokens=meta.cached_content_token_count or 0,
        thinking_tokens=thinking,
        latency_s=latency,
    )


def _retry_delay(details: Any) -> float | None:
    """``RetryInfo.retryDelay`` ("36s") from a Google error body."""
    error = details.get("error", details) if isinstance(details, dict) else {}
    for item in (error.get("details") or []) if isinstance(error, dict) else []:
        if isinstance(item, dict) and str(item.get("@type", "")).endswith("RetryInfo"):
            return parse_duration(item.get("retryDelay"))
    return None


def _transport_error(exc: Exception, timeout_s: float, base_url: str | None, **kw: Any) -> LLMError | None:
    """Timeouts and connection failures of httpx, httpx2 or aiohttp (whichever google-genai uses)."""
    import asyncio

    names = {cls.__name__ for cls in type(exc).__mro__}
    where = base_url or "the Gemini API"
    if names & {"TimeoutException", "ServerTimeoutError"} or isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return ProviderTimeout(f"no answer within {timeout_s:g} s", **kw)
    if names & {
        "ConnectError",
        "NetworkError",
        "ClientConnectionError",
        "RemoteProtocolError",
    } or isinstance(exc, ConnectionError):
        return ConnectionFailed(f"cannot reach {where} ({type(exc).__name__})", **kw)
    return None
