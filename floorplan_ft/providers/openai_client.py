"""OpenAI chat completions, and the same wire format against vLLM / llama.cpp / Ollama servers.

One attempt per call (`max_retries=0`): the teachers own retries. Raw-response access gives the
``x-ratelimit-*`` and ``retry-after`` headers. The answer is validated here, not by the SDK's
``parse()``, so truncation, refusals and bad JSON map to our own errors with the text kept.
"""

from __future__ import annotations

import json
import time
from typing import Any

import openai
from openai.types.chat import ChatCompletion
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
    RateLimitInfo,
    Refusal,
    RemoteLLMClient,
    Usage,
    error_from_status,
    parse_structured,
    strip_thinking,
)
from floorplan_ft.schemas import FloorPlanAnalysis, openai_response_format

# Keywords strict mode rejects (string lengths); pydantic still checks them on every answer.
_STRICT_UNSUPPORTED = frozenset({"maxLength", "minLength"})
# Sent instead of a key to servers that need none: the SDK would otherwise fall back to the
# OPENAI_API_KEY environment variable and hand the real key to a third-party server.
NO_KEY = "no-key"


def strict_response_format(schema: type[BaseModel]) -> dict[str, Any]:
    """``response_format`` for OpenAI strict structured outputs, built like
    `schemas.openai_response_format` (which is used as is for `FloorPlanAnalysis`)."""
    if schema is FloorPlanAnalysis:
        return openai_response_format()
    from openai.lib._pydantic import to_strict_json_schema

    return {
        "type": "json_schema",
        "json_schema": {
            "name": schema.__name__,
            "strict": True,
            "schema": _strip_keywords(to_strict_json_schema(schema), _STRICT_UNSUPPORTED),
        },
    }


def _strip_keywords(node: Any, banned: frozenset[str]) -> Any:
    if isinstance(node, dict):
        return {k: _strip_keywords(v, banned) for k, v in node.items() if k not in banned}
    if isinstance(node, list):
        return [_strip_keywords(v, banned) for v in node]
    return node


def _secret(value: SecretStr | str | None) -> SecretStr | None:
    if value is None or isinstance(value, SecretStr):
        return value
    return SecretStr(value)


class OpenAIChatClient(RemoteLLMClient):
    """Chat completions on api.openai.com (or a proxy / test server at `base_url`)."""

    provider = "openai"
    _max_tokens_param = "max_completion_tokens"

    def __init__(
        self,
        model: str,
        *,
        api_key: SecretStr | str | None,
        base_url: str | None = None,
        timeout_s: float = 60.0,
        max_tokens: int | None = None,
        key_setting: str = "OPENAI_API_KEY",
    ):
        self.model = model
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self._key_setting = key_setting
        self._api_key = _secret(api_key)
        if self._api_key is None or not self._api_key.get_secret_value().strip():
            raise ConfigError(f"no API key: set {key_setting} (environment or .env)", provider=self.provider)

    # ------------------------------------------------------------------ hooks for subclasses

    def _new_sdk(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            api_key=self._api_key.get_secret_value() if self._api_key else NO_KEY,
            base_url=self.base_url,
            timeout=self.timeout_s,
            max_retries=0,
        )

    def _response_format(self, schema: type[BaseModel]) -> dict[str, Any]:
        return strict_response_format(schema)

    def _extra_body(self) -> dict[str, Any] | None:
        return None

    def _clean_text(self, text: str) -> str:
        return text

    def _auth_hint(self) -> str:
        return f"check {self._key_setting}"

    def _secrets(self) -> tuple[str, ...]:
        return (self._api_key.get_secret_value(),) if self._api_key else ()

    # ------------------------------------------------------------------ the call

    def _request_kwargs(
        self,
        messages: Messages,
        schema: type[BaseModel] | None,
        max_tokens: int | None,
        temperature: float | None,
    ) -> dict[str, Any]:
        request: dict[str, Any] = {"model": self.model, "messages": messages}
        limit = max_tokens or self.max_tokens
        if limit:
            request[self._max_tokens_param] = limit
        if temperature is not None:
            request["temperature"] = temperature
        if schema is not None:
            request["response_format"] = self._response_format(schema)
        extra_body = self._extra_body()
        if extra_body:
            request["extra_body"] = extra_body
        return request

    async def _request(
        self,
        sdk: openai.AsyncOpenAI,
        messages: Messages,
        schema: type[BaseModel] | None,
        max_tokens: int | None,
        temperature: float | None,
    ) -> ChatResult:
        request = self._request_kwargs(messages, schema, max_tokens, temperature)
        started = time.perf_counter()
        raw = await self._send(sdk, request)
        latency = time.perf_counter() - started
        completion = self._completion(raw)
        return self._checked_result(completion, latency, schema, raw.headers)

    def _checked_result(
        self, completion: Any, latency: float, schema: type[BaseModel] | None, headers: Any
    ) -> ChatResult:
        choice = completion.choices[0]
        usage = _usage(completion.usage, latency)
        try:
            return self._result(completion, choice, usage, schema, headers)
        except LLMError as exc:
            exc.usage = usage  # tokens were spent even though the answer is unusable
            raise

    # ------------------------------------------------------------------ outside achat (batch API)

    def build_chat_request_body(
        self,
        messages: Messages,
        schema: type[BaseModel] | None = None,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> dict[str, Any]:
        """The JSON body ``achat`` would POST to ``/chat/completions`` for this call (same model,
        messages, strict ``response_format``, token limit and temperature), e.g. for a Batch API
        line."""
        request = self._request_kwargs(messages, schema, max_tokens, temperature)
        extra_body = request.pop("extra_body", None) or {}
        return {**request, **extra_body}

    def parse_chat_completion(
        self,
        body: dict[str, Any],
        schema: type[BaseModel] | None = None,
        *,
        latency_s: float = 0.0,
    ) -> ChatResult:
        """Validate a chat-completion body obtained elsewhere (a Batch API output line) exactly as
        ``achat`` validates its answer: refusal, content filter, truncation, JSON and schema map to
        the same errors, with the spent tokens on ``exc.usage``."""
        kw = {"provider": self.provider, "model": self.model}
        text = json.dumps(body, ensure_ascii=False)[:2000] if isinstance(body, dict) else str(body)[:2000]
        choices = body.get("choices") if isinstance(body, dict) else None
        if not (
            choices
            and isinstance(choices, list)
            and isinstance(choices[0], dict)
            and isinstance(choices[0].get("message"), dict)
        ):
            raise InvalidOutput(text, "no choices", message="the response body is not a chat completion", **kw)
        completion = ChatCompletion.construct(**body)  # lenient, like the SDK's own parsing
        return self._checked_result(completion, latency_s, schema, None)

    def new_sdk(self) -> openai.AsyncOpenAI:
        """A fresh SDK client with this client's key, URL and timeout and no SDK retries, for calls
        outside ``achat`` (files and batches). The caller closes it."""
        return self._new_sdk()

    async def _send(self, sdk: openai.AsyncOpenAI, request: dict[str, Any]) -> Any:
        kw = {"provider": self.provider, "model": self.model}
        try:
            return await sdk.chat.completions.with_raw_response.create(**request)
        except openai.APIStatusError as exc:
            error = error_from_status(
                exc.status_code,
                exc.response.headers,
                getattr(exc, "message", None),
                auth_hint=self._auth_hint(),
                secrets=self._secrets(),
                quota_exhausted=_error_code(exc.body) == "insufficient_quota",
                **kw,
            )
        except openai.APITimeoutError:
            error = ProviderTimeout(f"no answer within {self.timeout_s:g} s", **kw)
        except openai.APIConnectionError as exc:
            where = self.base_url or "the OpenAI API"
            error = ConnectionFailed(f"cannot reach {where} ({type(exc.__cause__).__name__})", **kw)
        raise error from None  # the SDK's exception may quote the key (401) or the request

    def _completion(self, raw: Any) -> Any:
        kw = {"provider": self.provider, "model": self.model}
        body = _body_text(raw)
        try:
            completion = raw.parse()
        except (ValueError, TypeError, openai.OpenAIError) as exc:  # a body that is not JSON
            raise InvalidOutput(
                body, str(exc)[:300], message="the response body is not a chat completion", **kw
            ) from None
        if isinstance(completion, str) or not getattr(completion, "choices", None):
            raise InvalidOutput(body, "no choices", message="the response body is not a chat completion", **kw)
        return completion

    def _result(
        self,
        completion: Any,
        choice: Any,
        usage: Usage,
        schema: type[BaseModel] | None,
        headers: Any,
    ) -> ChatResult:
        kw = {"provider": self.provider, "model": self.model}
        message = choice.message
        finish = choice.finish_reason
        refusal = getattr(message, "refusal", None)
        if refusal:
            raise Refusal(f"the model refused: {refusal[:200]}", reason="refusal", **kw)
        if finish == "content_filter":
            raise Refusal("the content filter stopped the answer", reason="content_filter", **kw)
        text = message.content or ""
        if finish == "length":
            raise OutputTruncated(
                f"the answer hit the output-token limit after {usage.output_tokens} tokens",
                text=text,
                **kw,
            )
        text = self._clean_text(text)
        parsed = None
        if schema is not None:
            if not text.strip():
                raise InvalidOutput(text, "empty content", message="the answer is empty", **kw)
            parsed = parse_structured(text, schema, provider=self.provider, model=self.model)
        return ChatResult(
            text=text,
            parsed=parsed,
            usage=usage,
            model=completion.model or self.model,
            provider=self.provider,
            finish_reason=finish,
            rate_limit=RateLimitInfo.from_headers(headers),
        )

    async def _close_sdk(self, sdk: openai.AsyncOpenAI) -> None:
        await sdk.close()


class OpenAICompatibleChatClient(OpenAIChatClient):
    """vLLM, llama.cpp or Ollama behind ``/v1/chat/completions``.

    The schema goes out as ``response_format`` json_schema with its length bounds kept (these
    servers' grammar backends honour them). Qwen3 models think unless told otherwise, so by default
    (`enable_thinking=None`) a model whose name contains "qwen" gets
    ``chat_template_kwargs={"enable_thinking": False}``; pass True/False to force either way. Any
    leading ``<think>...</think>`` block is stripped before parsing.

    ``length_retry_temperature``: on an answer cut at ``max_tokens`` (``finish_reason=length``), ask
    once more at this temperature, as the team's vLLM client does (0.2); None: no retry. The request
    is otherwise the team client's: ``response_format`` json_schema of the schema,
    ``chat_template_kwargs.enable_thinking``, ``max_tokens``.
    """

    provider = "openai-compatible"
    _max_tokens_param = "max_tokens"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: SecretStr | str | None = None,
        timeout_s: float = 60.0,
        max_tokens: int | None = None,
        enable_thinking: bool | None = None,
        base_url_setting: str = "serving.base_url",
        length_retry_temperature: float | None = None,
    ):
        if not base_url:
            raise ConfigError(f"no server URL: set {base_url_setting}", provider=self.provider)
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.enable_thinking = enable_thinking
        self._base_url_setting = base_url_setting
        self._key_setting = "the server's API key"
        self._api_key = _secret(api_key)
        self.length_retry_temperature = length_retry_temperature
        self.length_retries = 0  # answers asked again after a length cut (tests, reports)

    async def _request(self, sdk, messages, schema, max_tokens, temperature) -> ChatResult:
        try:
            return await super()._request(sdk, messages, schema, max_tokens, temperature)
        except OutputTruncated:
            if self.length_retry_temperature is None:
                raise
            self.length_retries += 1
            return await super()._request(sdk, messages, schema, max_tokens, self.length_retry_temperature)

    def _response_format(self, schema: type[BaseModel]) -> dict[str, Any]:
        return {
            "type": "json_schema",
            "json_schema": {
                "name": schema.__name__,
                "strict": True,
                "schema": schema.model_json_schema(),
            },
        }

    def _extra_body(self) -> dict[str, Any] | None:
        thinking = self.enable_thinking
        if thinking is None:
            thinking = False if "qwen" in self.model.lower() else None
        if thinking is None:
            return None
        return {"chat_template_kwargs": {"enable_thinking": thinking}}

    def _clean_text(self, text: str) -> str:
        return strip_thinking(text)

    def _auth_hint(self) -> str:
        return f"the server at {self._base_url_setting} ({self.base_url}) wants a valid API key"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "enable_thinking": self.enable_thinking}


def _usage(usage: Any, latency: float) -> Usage:
    if usage is None:
        return Usage(latency_s=latency)
    prompt_details = getattr(usage, "prompt_tokens_details", None)
    completion_details = getattr(usage, "completion_tokens_details", None)
    return Usage(
        input_tokens=usage.prompt_tokens or 0,
        output_tokens=usage.completion_tokens or 0,
        cached_tokens=(getattr(prompt_details, "cached_tokens", None) or 0),
        thinking_tokens=(getattr(completion_details, "reasoning_tokens", None) or 0),
        latency_s=latency,
    )


def _error_code(body: Any) -> str | None:
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return error.get("code") or error.get("type")
    return None


def _body_text(raw: Any) -> str:
    try:
        return raw.http_response.text
    except (AttributeError, ValueError, RuntimeError):  # pragma: no cover - an unread body
        return ""


def list_models(
    base_url: str,
    *,
    api_key: SecretStr | str | None = None,
    timeout_s: float = 3.0,
    setting: str = "serving.base_url",
) -> list[str]:
    """``GET {base_url}/models``: the model ids a server offers. Fails with a `ConfigError` naming
    `setting` if the server cannot be reached or does not answer like an OpenAI-style server."""
    import httpx

    url = base_url.rstrip("/") + "/models"
    key = _secret(api_key)
    headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
    try:
        response = httpx.get(url, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ConfigError(
            f"cannot reach the server at {setting}={base_url} ({type(exc).__name__}); start it or fix {setting}"
        ) from None
    if response.status_code in (401, 403):
        raise ConfigError(f"the server at {setting}={base_url} rejected the request (HTTP {response.status_code})")
    try:
        response.raise_for_status()
        return [str(item["id"]) for item in response.json().get("data", [])]
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(
            f"{url} did not answer like an OpenAI-compatible server (HTTP {response.status_code}); "
            f"check {setting} (it usually ends in /v1)"
        ) from None
