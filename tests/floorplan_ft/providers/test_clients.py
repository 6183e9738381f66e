"""Chat clients, OpenAI embeddings and the factory against a real local HTTP server, plus the local
student client with a tiny random model built here (no network, no hub, no GPU)."""

from __future__ import annotations

import asyncio
import json
import pickle
import time
import traceback
from typing import Annotated, Literal

import numpy as np
import pytest
from fakes.provider_server import REFUSAL_TEXT, Reply, fake_embedding
from pydantic import BaseModel, Field
from tiny_models import bias_towards_short_json, build_tiny_causal_lm

from floorplan_ft.prompts import SYSTEM_PROMPT, build_messages
from floorplan_ft.providers import (
    AuthError,
    BadRequest,
    ConfigError,
    ConnectionFailed,
    InvalidOutput,
    LLMError,
    OutputTruncated,
    ProviderTimeout,
    RateLimitError,
    RateLimitInfo,
    Refusal,
    ServerError,
    make_chat_client,
    make_embedding_manager,
)
from floorplan_ft.providers.base import parse_duration, parse_retry_after
from floorplan_ft.providers.embeddings import EmbeddingError
from floorplan_ft.providers.gemini_client import GeminiChatClient, _retry_delay
from floorplan_ft.providers.local_client import LocalChatClient
from floorplan_ft.providers.openai_client import OpenAIChatClient, OpenAICompatibleChatClient
from floorplan_ft.providers.openai_embeddings import OpenAIEmbeddingManager
from floorplan_ft.schemas import FloorPlanAnalysis, openai_response_format
from floorplan_ft.settings import load_settings

OPENAI_KEY = "sk-test-OPENAI-secret-0123456789"
GEMINI_KEY = "AIzaTEST-gemini-secret-0123456789"
UNREACHABLE = "http://127.0.0.1:1/v1"  # nothing listens on port 1

MESSAGES = build_messages("C01_0001.png", {"nodes": [], "edges": [], "statistics": {"bay_count": 3}})


@pytest.fixture
def fake(fake_provider):
    """The shared server (conftest), reset: no script, no recorded requests, default answers."""
    return fake_provider


@pytest.fixture
def openai_client(fake):
    client = OpenAIChatClient("gpt-4o", api_key=OPENAI_KEY, base_url=fake.openai_base_url, timeout_s=5)
    yield client
    client.close()


@pytest.fixture
def gemini_client(fake):
    client = GeminiChatClient("gemini-3-pro-preview", api_key=GEMINI_KEY, base_url=fake.gemini_base_url, timeout_s=5)
    yield client
    client.close()


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert OPENAI_KEY not in text and GEMINI_KEY not in text


def assert_error_hides_keys(exc: BaseException, client=None) -> None:
    assert_no_secret(str(exc), repr(exc), "".join(traceback.format_exception(exc)))
    if client is not None:
        assert_no_secret(repr(client), json.dumps(client.describe()))


# ----------------------------------------------------------------------------- parsing units


def test_durations_and_retry_after():
    assert parse_duration("6m0s") == 360.0
    assert parse_duration("1s") == 1.0
    assert parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("1h2m3.5s") == pytest.approx(3723.5)
    assert parse_duration("2.5") == 2.5
    assert parse_duration("soon") is None and parse_duration(None) is None
    assert parse_retry_after({"Retry-After": "7"}) == 7.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert 0 <= parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) < 1
    assert parse_retry_after({}) is None
    info = RateLimitInfo.from_headers({"x-ratelimit-remaining-tokens": "10", "x-ratelimit-reset-tokens": "1s"})
    assert info.remaining_tokens == 10 and info.reset_tokens_s == 1.0 and info.limit_requests is None
    assert RateLimitInfo.from_headers({"content-type": "application/json"}) is None
    details = {"error": {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "36s"}]}}
    assert _retry_delay(details) == 36.0


# ----------------------------------------------------------------------------- OpenAI


def test_openai_structured_answer_usage_and_rate_limits(fake, openai_client):
    result = openai_client.chat(MESSAGES, FloorPlanAnalysis, max_tokens=4096, temperature=0.2)

    assert isinstance(result.parsed, FloorPlanAnalysis)
    assert json.loads(result.text) == result.parsed.model_dump()
    assert (result.provider, result.model, result.finish_reason) == ("openai", "gpt-4o", "stop")
    usage = result.usage
    assert (
        usage.input_tokens,
        usage.output_tokens,
        usage.cached_tokens,
        usage.thinking_tokens,
    ) == (120, 45, 20, 5)
    assert usage.latency_s > 0
    assert result.rate_limit == RateLimitInfo(
        limit_requests=500,
        remaining_requests=499,
        reset_requests_s=0.12,
        limit_tokens=30000,
        remaining_tokens=29000,
        reset_tokens_s=360.0,
    )
    request = fake.last
    assert request.path == "/v1/chat/completions"
    assert request.body["response_format"] == openai_response_format()
    assert request.body["max_completion_tokens"] == 4096 and request.body["temperature"] == 0.2
    assert request.body["messages"] == MESSAGES
    assert request.header("authorization") == f"Bearer {OPENAI_KEY}"  # the key was sent ...
    assert_no_secret(repr(openai_client), json.dumps(openai_client.describe()), result.model_dump_json())


def test_openai_text_answer_without_schema(fake, openai_client):
    result = openai_client.chat([{"role": "user", "content": "안녕"}])
    assert result.parsed is None and result.text == "가짜 응답입니다."
    assert "response_format" not in fake.last.body


@pytest.mark.parametrize(
    ("reply", "error", "check"),
    [
        (
            Reply.rate_limited(retry_after=7),
            RateLimitError,
            lambda e: e.retry_after == 7.0 and e.retryable,
        ),
        (Reply.rate_limited(retry_after_ms=250), RateLimitError, lambda e: e.retry_after == 0.25),
        (Reply.server_error(500), ServerError, lambda e: e.status == 500 and e.retryable),
        (Reply.server_error(503), ServerError, lambda e: e.status == 503),
        (Reply.bad_request(), BadRequest, lambda e: e.status == 400 and not e.retryable),
        (
            Reply.truncated(),
            OutputTruncated,
            lambda e: e.text.startswith('{"image_name"') and e.usage.output_tokens == 45,
        ),
        (
            Reply.invalid_json(),
            InvalidOutput,
            lambda e: e.text.startswith('{"image_name"') and "char" in e.detail,
        ),
        (
            Reply.ok('{"image_name": "x"}'),
            InvalidOutput,
            lambda e: "structure_type" in e.detail and e.retryable,
        ),
        (Reply.malformed_body(), InvalidOutput, lambda e: "<html>" in e.text),
        (Reply.refusal(), Refusal, lambda e: REFUSAL_TEXT[:20] in str(e) and not e.retryable),
        (Reply.content_filter(), Refusal, lambda e: e.reason == "content_filter"),
    ],
)
def test_openai_errors_are_classified_after_one_attempt(fake, openai_client, reply, error, check):
    fake.push(reply)
    with pytest.raises(error) as info:
        openai_client.chat(MESSAGES, FloorPlanAnalysis)
    assert check(info.value)
    assert fake.request_count == 1  # no SDK retries: the teachers own the retry policy
    assert_error_hides_keys(info.value, openai_client)


def test_openai_auth_error_names_the_setting_and_hides_the_key(fake, openai_client):
    fake.push(Reply.unauthorized())  # the fake echoes the whole key in its message
    with pytest.raises(AuthError) as info:
        openai_client.chat(MESSAGES, FloorPlanAnalysis)
    assert "OPENAI_API_KEY" in str(info.value) and info.value.status == 401
    assert not info.value.retryable
    assert fake.last.header("authorization") == f"Bearer {OPENAI_KEY}"
    assert_error_hides_keys(info.value, openai_client)


def test_openai_timeout_and_connection_failure(fake):
    fake.push(Reply.ok(delay_s=2.0))
    slow = OpenAIChatClient("gpt-4o", api_key=OPENAI_KEY, base_url=fake.openai_base_url, timeout_s=0.3)
    with slow, pytest.raises(ProviderTimeout) as info:
        slow.chat(MESSAGES)
    assert info.value.retryable and fake.request_count == 1
    nowhere = OpenAIChatClient("gpt-4o", api_key=OPENAI_KEY, base_url=UNREACHABLE, timeout_s=2)
    with nowhere, pytest.raises(ConnectionFailed) as info:
        nowhere.chat(MESSAGES)
    assert info.value.retryable
    assert_error_hides_keys(info.value)


def test_async_and_sync_calls_on_several_event_loops(fake, openai_client):
    async def ask():
        return await openai_client.achat(MESSAGES, FloorPlanAnalysis)

    first = asyncio.run(ask())  # each asyncio.run is a new loop: the client keeps a pool per loop
    second = asyncio.run(ask())
    third = openai_client.chat(MESSAGES, FloorPlanAnalysis)

    async def sync_inside_a_loop():
        return openai_client.chat(MESSAGES, FloorPlanAnalysis)

    fourth = asyncio.run(sync_inside_a_loop())
    assert first.parsed == second.parsed == third.parsed == fourth.parsed
    assert fake.request_count == 4

    fake.latency_s = 0.3

    async def five_at_once():
        started = time.perf_counter()
        await asyncio.gather(*(openai_client.achat(MESSAGES) for _ in range(5)))
        return time.perf_counter() - started

    assert asyncio.run(five_at_once()) < 1.2  # concurrent, not 5 x 0.3 s in a row


def test_compatible_client_strips_think_block_and_disables_thinking(fake, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)  # must not leak to a third-party server
    fake.push(Reply.thinking())
    with OpenAICompatibleChatClient(fake.openai_base_url, "Qwen/Qwen3-8B", max_tokens=2048) as client:
        result = client.chat(MESSAGES, FloorPlanAnalysis)
    assert isinstance(result.parsed, FloorPlanAnalysis)
    assert "<think>" not in result.text and result.provider == "openai-compatible"
    body = fake.last.body
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["max_tokens"] == 2048
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema == FloorPlanAnalysis.model_json_schema()  # length bounds kept for the server's grammar
    assert fake.last.header("authorization") != f"Bearer {OPENAI_KEY}"

    with OpenAICompatibleChatClient(fake.openai_base_url, "llama-3.2-3b") as client:
        client.chat(MESSAGES, FloorPlanAnalysis)
    assert "chat_template_kwargs" not in fake.last.body


def test_compatible_client_errors(fake):
    with OpenAICompatibleChatClient(fake.openai_base_url, "Qwen/Qwen3-8B", api_key="secret-vllm-key") as client:
        fake.push(Reply.unauthorized())
        with pytest.raises(AuthError) as info:
            client.chat(MESSAGES, FloorPlanAnalysis)
        assert "serving.base_url" in str(info.value) and "secret-vllm-key" not in str(info.value)
        fake.push(Reply.thinking("<think>"))  # thinking that never produced an answer
        with pytest.raises(InvalidOutput):
            client.chat(MESSAGES, FloorPlanAnalysis)


# ----------------------------------------------------------------------------- Gemini


def test_gemini_structured_answer_and_request_shape(fake, gemini_client):
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": "{}"},
        {"role": "user", "content": "다시"},
    ]
    result = gemini_client.chat(messages, FloorPlanAnalysis, max_tokens=1000, temperature=0.2)

    assert isinstance(result.parsed, FloorPlanAnalysis)
    assert (result.provider, result.finish_reason) == ("gemini", "STOP")
    usage = result.usage
    assert (
        usage.input_tokens,
        usage.output_tokens,
        usage.cached_tokens,
        usage.thinking_tokens,
    ) == (120, 50, 20, 5)
    request = fake.last
    assert request.path == "/v1/models/gemini-3-pro-preview:generateContent"
    assert request.header("x-goog-api-key") == GEMINI_KEY
    assert request.body["systemInstruction"]["parts"][0]["text"] == SYSTEM_PROMPT
    assert [c["role"] for c in request.body["contents"]] == ["user", "model", "user"]
    config = request.body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseJsonSchema"] == FloorPlanAnalysis.model_json_schema()
    assert (config["maxOutputTokens"], config["temperature"]) == (1000, 0.2)


def test_gemini_skips_thought_parts(fake, gemini_client):
    fake.push(Reply.thinking())
    result = gemini_client.chat(MESSAGES, FloorPlanAnalysis)
    assert isinstance(result.parsed, FloorPlanAnalysis) and "<think>" not in result.text


@pytest.mark.parametrize(
    ("reply", "error", "check"),
    [
        (Reply.rate_limited(retry_after=3), RateLimitError, lambda e: e.retry_after == 3.0),
        (Reply.server_error(500), ServerError, lambda e: e.status == 500),
        (Reply.server_error(503), ServerError, lambda e: e.status == 503),
        (Reply.bad_request(), BadRequest, lambda e: e.status == 400),
        (
            Reply.truncated(),
            OutputTruncated,
            lambda e: e.text.startswith('{"image_name"') and e.usage.output_tokens == 50,
        ),
        (Reply.refusal(), Refusal, lambda e: e.reason == "SAFETY"),
        (Reply.content_filter(), Refusal, lambda e: e.reason == "PROHIBITED_CONTENT"),
        (Reply.prompt_blocked(), Refusal, lambda e: "prompt was blocked" in str(e)),
        (Reply.invalid_json(), InvalidOutput, lambda e: e.text.startswith('{"image_name"')),
        (Reply.malformed_body(), InvalidOutput, lambda e: "<html>" in e.text),
    ],
)
def test_gemini_errors_are_classified_after_one_attempt(fake, gemini_client, reply, error, check):
    fake.push(reply)
    with pytest.raises(error) as info:
        gemini_client.chat(MESSAGES, FloorPlanAnalysis)
    assert check(info.value)
    assert fake.request_count == 1
    assert_error_hides_keys(info.value, gemini_client)


def test_gemini_auth_timeout_and_connection(fake, gemini_client):
    fake.push(Reply.unauthorized(403))
    with pytest.raises(AuthError) as info:
        gemini_client.chat(MESSAGES, FloorPlanAnalysis)
    assert "GEMINI_API_KEY" in str(info.value)
    assert_error_hides_keys(info.value, gemini_client)

    fake.push(Reply.ok(delay_s=2.0))
    slow = GeminiChatClient("gemini-x", api_key=GEMINI_KEY, base_url=fake.gemini_base_url, timeout_s=0.3)
    with slow, pytest.raises(ProviderTimeout):
        slow.chat(MESSAGES)
    nowhere = GeminiChatClient("gemini-x", api_key=GEMINI_KEY, base_url="http://127.0.0.1:1", timeout_s=2)
    with nowhere, pytest.raises(ConnectionFailed) as info:
        nowhere.chat(MESSAGES)
    assert_error_hides_keys(info.value)


# ----------------------------------------------------------------------------- embeddings


def test_openai_embeddings_dimensions_batches_and_unit_rows(fake):
    texts = ["채광 기준", "환기 기준", "수납 기준", "가족융화", "드레스룸"]
    manager = OpenAIEmbeddingManager(
        "text-embedding-3-small",
        16,
        api_key=OPENAI_KEY,
        base_url=fake.openai_base_url,
        batch_size=2,
    )
    docs = manager.embed_documents(texts)
    assert docs.shape == (5, 16) and docs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1.0, rtol=1e-5)
    expected = fake_embedding(texts[3], 16)
    np.testing.assert_allclose(docs[3], expected / np.linalg.norm(expected), rtol=1e-5)
    calls = fake.requests_to("/embeddings")
    assert [len(c.body["input"]) for c in calls] == [2, 2, 1]
    assert all(c.body["dimensions"] == 16 and c.body["model"] == "text-embedding-3-small" for c in calls)
    np.testing.assert_allclose(manager.embed_queries(texts[:1]), docs[:1])  # no instruction: same
    assert manager.identity() == "openai|text-embedding-3-small|16"
    assert manager.embed_documents([]).shape == (0, 16)


def test_compatible_embeddings_instruction_and_matryoshka_cut(fake):
    fake.honour_dimensions = False  # the server returns its full width (64)
    manager = OpenAIEmbeddingManager(
        "Qwen/Qwen3-Embedding-0.6B", 16, base_url=fake.openai_base_url, provider="openai-compatible"
    )
    query = manager.embed_queries(["남향 거실"])
    assert fake.last.body["input"][0].startswith("Instruct: ") and fake.last.body["input"][0].endswith("남향 거실")
    doc = manager.embed_documents(["남향 거실"])
    assert fake.last.body["input"] == ["남향 거실"]
    assert query.shape == doc.shape == (1, 16) and not np.allclose(query, doc)
    full = fake_embedding("남향 거실", 64)[:16]
    np.testing.assert_allclose(doc[0], full / np.linalg.norm(full), rtol=1e-5)


def test_embeddings_auth_error_hides_key(fake):
    manager = OpenAIEmbeddingManager(api_key=OPENAI_KEY, base_url=fake.openai_base_url)
    fake.push(Reply.unauthorized())
    with pytest.raises(EmbeddingError) as info:
        manager.embed_documents(["x"])
    assert "OPENAI_API_KEY" in str(info.value)
    assert_error_hides_keys(info.value)


# ----------------------------------------------------------------------------- factory


def settings_from_env(monkeypatch, **env: str):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_settings()


def test_factory_picks_the_provider_from_llm_provider(fake, no_dotenv, monkeypatch):
    settings = settings_from_env(
        monkeypatch,
        LLM_PROVIDER="gemini",
        GEMINI_API_KEY=GEMINI_KEY,
        FTP_GEMINI_BASE_URL=fake.gemini_base_url,
    )
    with make_chat_client(settings) as client:
        assert isinstance(client, GeminiChatClient) and client.model == settings.teachers.gemini_model
        assert client.chat(MESSAGES, FloorPlanAnalysis).parsed is not None
        assert_no_secret(repr(client), json.dumps(client.describe()))

    settings = settings_from_env(
        monkeypatch,
        LLM_PROVIDER="openai",
        OPENAI_API_KEY=OPENAI_KEY,
        FTP_OPENAI_BASE_URL=fake.openai_base_url,
    )
    with make_chat_client(settings) as client:
        assert isinstance(client, OpenAIChatClient) and client.model == "gpt-4o-mini"
        assert client.describe() == {
            "provider": "openai",
            "model": "gpt-4o-mini",
            "base_url": fake.openai_base_url,
        }
    with make_chat_client(settings, "openai", settings.teachers.openai_model, timeout_s=120) as client:
        assert client.model == "gpt-4o" and client.timeout_s == 120

    settings = settings_from_env(
        monkeypatch, LLM_PROVIDER="openai-compatible", FTP_SERVING__BASE_URL=fake.openai_base_url
    )
    with make_chat_client(settings) as client:
        assert isinstance(client, OpenAICompatibleChatClient) and client.model == "fake-model"  # from /models
        assert [r.method for r in fake.requests if r.path == "/v1/models"] == ["GET"]

    settings = settings_from_env(monkeypatch, LLM_PROVIDER="local", FTP_SERVING__ADAPTER_PATH=str(no_dotenv))
    with pytest.raises(ConfigError, match="serving.adapter_path"):
        make_chat_client(settings)  # an empty directory is no model


def test_factory_fails_early_naming_the_setting(no_dotenv, monkeypatch):
    settings = settings_from_env(monkeypatch, LLM_PROVIDER="openai")
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        make_chat_client(settings)
    with pytest.raises(ConfigError, match="GEMINI_API_KEY"):
        make_chat_client(settings, "gemini")
    with pytest.raises(ConfigError, match="reference"):
        make_chat_client(settings, "reference")
    with pytest.raises(ConfigError, match="serving.base_url"):
        make_chat_client(settings, "openai-compatible")  # not set
    with pytest.raises(ConfigError, match="teachers.compatible_base_url"):
        make_chat_client(settings, "compatible")

    settings = settings_from_env(monkeypatch, LLM_PROVIDER="openai-compatible", FTP_SERVING__BASE_URL=UNREACHABLE)
    with pytest.raises(ConfigError, match="serving.base_url") as info:
        make_chat_client(settings, model="Qwen/Qwen3-8B")
    assert UNREACHABLE in str(info.value)

    settings = settings_from_env(monkeypatch, FTP_TEACHERS__COMPATIBLE_BASE_URL=UNREACHABLE)
    with pytest.raises(ConfigError, match="teachers.compatible_base_url"):  # how the teachers call it
        make_chat_client(settings, "openai-compatible", "m", base_url=settings.teachers.compatible_base_url)


def test_embedding_factory(fake, no_dotenv, monkeypatch):
    settings = settings_from_env(monkeypatch, EMBEDDING_PROVIDER="openai")
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        make_embedding_manager(settings)
    settings = settings_from_env(
        monkeypatch,
        EMBEDDING_PROVIDER="openai",
        OPENAI_API_KEY=OPENAI_KEY,
        FTP_OPENAI_BASE_URL=fake.openai_base_url,
        FTP_RETRIEVAL__DIMENSIONS="8",
    )
    manager = make_embedding_manager(settings)
    assert manager.model == "text-embedding-3-small" and manager.embed_queries(["거실"]).shape == (
        1,
        8,
    )
    assert_no_secret(repr(manager))

    settings = settings_from_env(
        monkeypatch, EMBEDDING_PROVIDER="openai-compatible", FTP_RETRIEVAL__BASE_URL=UNREACHABLE
    )
    with pytest.raises(ConfigError, match="retrieval.base_url"):
        make_embedding_manager(settings)
    monkeypatch.setenv("FTP_RETRIEVAL__BASE_URL", fake.openai_base_url)
    manager = make_embedding_manager(load_settings())
    assert manager.provider == "openai-compatible" and manager.embed_documents(["x"]).shape == (
        1,
        8,
    )


# ----------------------------------------------------------------------------- local student


class Small(BaseModel):
    """Bounded like FloorPlanAnalysis, small enough that a random model's rambling stays short."""

    kind: Literal["판상형", "타워형", "혼합형"]
    count: int = Field(ge=0, le=9)
    note: str = Field(max_length=20)
    tags: list[Annotated[str, Field(max_length=8)]] = Field(max_length=3)
    ratio: float = Field(ge=0, le=100)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, single_thread_torch):
    root = tmp_path_factory.mktemp("tiny-student")
    random_dir, terse_dir, adapter_dir = root / "random", root / "terse", root / "adapter"
    model, tokenizer = build_tiny_causal_lm(random_dir)

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    peft_model.peft_config["default"].base_model_name_or_path = str(random_dir)
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)

    terse, tokenizer = build_tiny_causal_lm(terse_dir)
    bias_towards_short_json(terse, tokenizer, terse_dir)
    return {"random": random_dir, "terse": terse_dir, "adapter": adapter_dir}


def test_local_client_constrained_json_from_a_random_model(tiny_dirs):
    client = LocalChatClient(tiny_dirs["random"], device="cpu", max_new_tokens=300)
    assert not client.loaded  # lazy
    prompts = ["거실 분석", "안방과 욕실", "Describe the plan."]
    for prompt in prompts:
        result = client.chat(
            [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
            Small,
        )
        assert isinstance(result.parsed, Small), result.text
        assert Small.model_validate_json(result.text) == result.parsed  # strict JSON (no raw NULs)
        assert result.finish_reason == "stop" and result.usage.output_tokens > 0
        assert result.usage.input_tokens > 10 and result.usage.latency_s > 0
    assert len(client._grammars) == 1  # compiled once per schema
    assert client.describe()["device"] == "cpu" and client.provider == "local"

    async def both():
        return await asyncio.gather(*(client.achat([{"role": "user", "content": p}], Small) for p in prompts[:2]))

    assert all(isinstance(r.parsed, Small) for r in asyncio.run(both()))  # the lock serialises them

    with pytest.raises(OutputTruncated) as info:
        client.chat([{"role": "user", "content": "x"}], Small, max_tokens=4)
    assert info.value.usage.output_tokens == 4
    client.close()


def test_local_client_floor_plan_analysis(tiny_dirs):
    client = LocalChatClient(tiny_dirs["terse"], device="cpu", max_new_tokens=600)
    result = client.chat(MESSAGES, FloorPlanAnalysis)
    assert isinstance(result.parsed, FloorPlanAnalysis), result.text
    assert result.parsed.structure_type in ("판상형", "타워형", "혼합형")
    keys = list(json.loads(result.text))
    assert keys == [k for k in FloorPlanAnalysis.model_fields if k in keys]  # trained key order
    assert "<think>" not in result.text and result.finish_reason == "stop"


def test_local_client_loads_a_lora_adapter(tiny_dirs):
    client = LocalChatClient(tiny_dirs["adapter"], device="cpu", max_new_tokens=300)
    result = client.chat([{"role": "user", "content": "거실"}], Small)
    assert isinstance(result.parsed, Small)
    from peft import PeftModel

    assert isinstance(client._model, PeftModel)  # base from adapter_config.json + the adapter


def test_local_client_rejects_a_directory_without_a_model(tmp_path):
    with pytest.raises(ConfigError, match="serving.adapter_path"):
        LocalChatClient(tmp_path)


def test_every_error_is_an_llm_error():
    for cls in (
        RateLimitError,
        ServerError,
        ProviderTimeout,
        ConnectionFailed,
        OutputTruncated,
        InvalidOutput,
        Refusal,
        AuthError,
        BadRequest,
        ConfigError,
    ):
        assert issubclass(cls, LLMError)
    # Prefect pickles a failed task's exception: the fields a retry policy reads must survive.
    error = pickle.loads(pickle.dumps(RateLimitError(2.0, message="slow down", provider="openai", model="m")))
    assert (error.retry_after, error.retryable, str(error)) == (2.0, True, "openai/m: slow down")
    error = pickle.loads(pickle.dumps(InvalidOutput("{", "EOF", provider="gemini", model="m")))
    assert (error.text, error.detail, str(error)) == ("{", "EOF", "gemini/m: invalid answer: EOF")
    assert ServerError(502).status == 502 and "502" in str(ServerError(502))
