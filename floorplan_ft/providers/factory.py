"""Build the chat client and the embedding manager the settings ask for.

The analysis service calls ``make_chat_client(settings)`` (provider from ``LLM_PROVIDER`` /
``serving.llm_provider``); teachers name theirs: ``make_chat_client(settings, "gemini",
settings.teachers.gemini_model, timeout_s=settings.teachers.request_timeout_s)``. Problems surface
here, before any work: a missing key names ``OPENAI_API_KEY`` / ``GEMINI_API_KEY``, and an
OpenAI-compatible server is probed (``GET {base_url}/models``) so a wrong URL names its setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from floorplan_ft.providers.base import ConfigError, LLMClient
from floorplan_ft.providers.embeddings import BaseEmbeddingManager, EmbeddingError

CHAT_PROVIDERS = ("openai", "gemini", "openai-compatible", "compatible", "local")
PROBE_TIMEOUT_S = 3.0


LENGTH_RETRY_TEMPERATURE = 0.2


def make_chat_client(
    settings: Any,
    provider: str | None = None,
    model: str | None = None,
    *,
    base_url: str | None = None,
    timeout_s: float | None = None,
    max_tokens: int | None = None,
    probe: bool = True,
    enable_thinking: bool | None = None,
) -> LLMClient:
    """A client for `provider` (default ``settings.serving.llm_provider``).

    Providers: ``openai``, ``gemini``, ``openai-compatible`` (``serving.base_url``), ``compatible``
    (the teacher server: ``teachers.compatible_base_url`` / ``teachers.compatible_model``) and
    ``local`` (``serving.adapter_path``). `model` defaults to ``serving.llm_model`` when that was
    set or the provider is the serving one's default (openai); otherwise to the teacher model of that
    provider, or for a compatible server to the first model it lists. `timeout_s` defaults to
    ``serving.timeout_s``, `max_tokens` to the provider's default (local: ``serving.max_new_tokens``).
    `base_url` overrides the provider's URL setting (``openai_base_url``, ``gemini_base_url``,
    ``serving.base_url``); errors then name whichever setting holds that URL. `enable_thinking`
    (OpenAI-compatible servers) defaults to ``serving.enable_thinking`` for ``openai-compatible``.
    """
    serving = settings.serving
    provider = provider or serving.llm_provider
    timeout = timeout_s if timeout_s is not None else serving.timeout_s
    if provider == "reference":
        raise ConfigError(
            "provider 'reference' is the rule-based teacher, not a chat model: it is built by the "
            "teachers/service code, not by make_chat_client (or set LLM_PROVIDER to openai, gemini, "
            "openai-compatible or local)"
        )
    if provider not in CHAT_PROVIDERS:
        raise ConfigError(
            f"unknown LLM provider {provider!r}: set LLM_PROVIDER (serving.llm_provider) to one of "
            f"{', '.join(p for p in CHAT_PROVIDERS if p != 'compatible')}"
        )
    serving_model = serving.llm_model if _explicit(serving, "llm_model") or provider == "openai" else None

    if provider == "openai":
        from floorplan_ft.providers.openai_client import OpenAIChatClient

        return OpenAIChatClient(
            model or serving_model or settings.teachers.openai_model,
            api_key=settings.openai_api_key,
            base_url=base_url or settings.openai_base_url,
            timeout_s=timeout,
            max_tokens=max_tokens,
        )
    if provider == "gemini":
        from floorplan_ft.providers.gemini_client import GeminiChatClient

        return GeminiChatClient(
            model or serving_model or settings.teachers.gemini_model,
            api_key=settings.gemini_api_key,
            base_url=base_url or settings.gemini_base_url,
            timeout_s=timeout,
            max_tokens=max_tokens,
        )
    if provider in ("openai-compatible", "compatible"):
        from floorplan_ft.providers.openai_client import OpenAICompatibleChatClient, list_models

        if provider == "compatible":
            base_url = base_url or settings.teachers.compatible_base_url
            model = model or settings.teachers.compatible_model
        else:
            base_url = base_url or serving.base_url
            model = model or serving_model
        setting = _url_setting(settings, base_url, provider)
        if not base_url:
            raise ConfigError(f"provider {provider!r} needs a server: set {setting} (e.g. http://host:8000/v1)")
        if probe or not model:
            offered = list_models(base_url, timeout_s=PROBE_TIMEOUT_S, setting=setting)
            if not model:
                if not offered:
                    raise ConfigError(f"the server at {setting}={base_url} lists no models; set the model name")
                model = offered[0]
        if enable_thinking is None and provider == "openai-compatible":
            enable_thinking = serving.enable_thinking
        return OpenAICompatibleChatClient(
            base_url,
            model,
            timeout_s=timeout,
            max_tokens=max_tokens,
            base_url_setting=setting,
            enable_thinking=enable_thinking,
            # The team's vLLM client asks once more at 0.2 after a length cut; teachers own their retries.
            length_retry_temperature=LENGTH_RETRY_TEMPERATURE if provider == "openai-compatible" else None,
        )
    # local
    from floorplan_ft.providers.local_client import LocalChatClient

    path = model or serving.adapter_path
    if not path:
        raise ConfigError("provider 'local' needs a model directory: set serving.adapter_path")
    # A LoRA adapter runs on the base it was trained on (4-bit for QLoRA); merged weights load
    # unquantised. 4-bit only ever applies on CUDA.
    is_adapter = (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file()
    return LocalChatClient(
        path,
        device="auto",
        load_in_4bit=settings.finetune.load_in_4bit and is_adapter,
        max_new_tokens=max_tokens or serving.max_new_tokens,
        cpu_threads=serving.cpu_threads,
    )


def make_embedding_manager(settings: Any, *, probe: bool = True) -> BaseEmbeddingManager:
    """The embedding backend of ``retrieval.provider`` (local | openai | openai-compatible).

    Errors are `ConfigError`s naming the setting: ``OPENAI_API_KEY`` or ``retrieval.base_url``."""
    retrieval = settings.retrieval
    if retrieval.provider == "local":
        from floorplan_ft.providers.local_embeddings import LocalEmbeddingManager

        return LocalEmbeddingManager(
            model=retrieval.model,
            dimensions=retrieval.dimensions,
            device=retrieval.device,
            batch_size=retrieval.batch_size,
        )
    if retrieval.provider == "runpod":
        from floorplan_ft.providers.runpod_embeddings import runpod_embedding_manager

        return runpod_embedding_manager(settings)
    from floorplan_ft.providers.openai_embeddings import OpenAIEmbeddingManager

    if retrieval.provider == "openai":
        if settings.openai_api_key is None or not settings.openai_api_key.get_secret_value().strip():
            raise ConfigError("retrieval.provider is 'openai' but no key is set: set OPENAI_API_KEY")
        model = retrieval.model if _explicit(retrieval, "model") else "text-embedding-3-small"
        try:
            return OpenAIEmbeddingManager(
                model,
                retrieval.dimensions,
                api_key=settings.openai_api_key,
                base_url=settings.openai_base_url,
                batch_size=retrieval.batch_size,
            )
        except EmbeddingError as exc:
            raise ConfigError(str(exc)) from None
    if retrieval.provider == "openai-compatible":
        from floorplan_ft.providers.openai_client import list_models

        if not retrieval.base_url:
            raise ConfigError("retrieval.provider is 'openai-compatible' but no server is set: set retrieval.base_url")
        if probe:
            list_models(retrieval.base_url, timeout_s=PROBE_TIMEOUT_S, setting="retrieval.base_url")
        return OpenAIEmbeddingManager(
            retrieval.model,
            retrieval.dimensions,
            base_url=retrieval.base_url,
            batch_size=retrieval.batch_size,
            provider="openai-compatible",
        )
    raise ConfigError(f"unknown embedding provider {retrieval.provider!r}: set retrieval.provider")


def _url_setting(settings: Any, base_url: str | None, provider: str) -> str:
    """The setting an OpenAI-compatible URL came from, for error messages."""
    if base_url and base_url == settings.teachers.compatible_base_url:
        return "teachers.compatible_base_url"
    if base_url and base_url == settings.serving.base_url:
        return "serving.base_url"
    if base_url and base_url == getattr(settings.finetune, "eval_base_url", None):
        return "finetune.eval_base_url"
    if base_url:
        return "the base_url passed to make_chat_client"
    return "teachers.compatible_base_url" if provider == "compatible" else "serving.base_url"


def _explicit(group: Any, field: str) -> bool:
    """Whether a setting was given (file, env, profile) rather than left at its default."""
    return field in getattr(group, "model_fields_set", set())
