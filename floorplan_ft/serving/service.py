"""The analysis service: topology → retrieval → chat client → validated `FloorPlanAnalysis`, and a
Korean chat grounded in a stored analysis. The HTTP API (`serving.api`) is a thin layer over it.

What the model sees is built exactly as in the pipeline: the query is `retrieve.query_for` of the
plan's statistics (in the configured prompt style), the top-k chunks are ranked like phase 2 (`retrieve.rank`, or pgvector with the
same order), and the messages are `prompts.build_messages_for(settings, topology, context)` — the
prompt the teachers answered and the student was trained on.

The provider comes from the settings (``LLM_PROVIDER`` / ``serving.llm_provider``): ``local`` (the
student in-process), ``openai-compatible`` (vLLM serving the merged student), ``openai`` (the
rollback), ``gemini``, or ``reference`` — the rule-based analyst, which is *not* a language model
and is labelled as such everywhere (``is_llm: false``).

Every provider call is bounded by ``serving.timeout_s`` (the SDK's own timeout, plus an overall
deadline here); failures surface as the typed `LLMError`s of `serving.base`, retrieval failures as
`RetrievalUnavailable`, bad input as `InvalidInput`. Nothing is retried here: the API maps
retryable errors to 503 (with Retry-After when the provider gave one) and the caller decides.

Limits (so that the service stays up): model calls pass an `AdmissionGate` of
``serving.max_concurrency`` slots and ``serving.max_queue`` waiting places per backend; a call that
finds the queue full, or waits longer than ``serving.timeout_s`` for a slot, is `ServiceBusy` (503
with Retry-After) at once. A call past its deadline is cancelled: for the in-process model the
decoding stops within a token (`LocalChatClient` reads a cancel flag), for HTTP providers the
request is closed. A prompt that does not fit the local model's context is `PromptTooLarge` (413)
before any decoding. `begin_shutdown` (SIGTERM) rejects the waiting calls and stops local
generations under way.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import re
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from pydantic import BaseModel, ValidationError

from floorplan_ft.prompts import (
    PROMPT_VERSION,
    build_messages_for,
    format_criteria,
    prompt_style,
    prompt_version_for,
)
from floorplan_ft.providers.base import (
    ChatResult,
    ConfigError,
    LLMClient,
    OutputTruncated,
    ProviderTimeout,
    Usage,
    _run_sync,
)
from floorplan_ft.providers.embeddings import BaseEmbeddingManager, EmbeddingError
from floorplan_ft.retrieval.corpus import CriteriaChunk, load_corpus
from floorplan_ft.retrieval.pgvector import VectorStore, VectorStoreError
from floorplan_ft.retrieval.retrieve import (
    RETRIEVAL_VERSION,
    RagContext,
    RetrievedChunk,
    build_query,
    context_from_hits,
    embed_query_batch,
    plain_queries,
    query_for,
)
from floorplan_ft.schemas import FloorPlanAnalysis, TopologyGraph, schema_hash
from floorplan_ft.serving.admission import AdmissionGate
from floorplan_ft.serving.errors import (
    CVFailed,
    InvalidImage,
    InvalidInput,
    PromptTooLarge,
    RetrievalUnavailable,
    ServiceBusy,
    ServiceError,
    UploadTooLarge,
)
from floorplan_ft.serving.vectorstore import MemoryVectorStore, PgVectorStore, check_identity
from floorplan_ft.store import Layout
from floorplan_ft.topology_io import TopologyFormatError, read_topology_dict

log = logging.getLogger(__name__)

REFERENCE_PROVIDER = "reference"
# Model calls at once per backend when serving.max_concurrency is not set: one in-process model
# decodes one request at a time; remote providers take several.
LOCAL_CONCURRENCY = 1
REMOTE_CONCURRENCY = 8
INITIAL_CALL_ESTIMATE_S = 5.0
SHUTDOWN_RETRY_AFTER_S = 5.0
ROLLBACK_PROVIDER = "openai"
# The overall deadline of a remote call is the SDK timeout plus this, so that the SDK's own typed
# timeout normally fires first; an in-process model has no timeout of its own.
DEADLINE_GRACE_S = 1.0
CHAT_HISTORY_TURNS = 10
CHAT_QUESTION_MAX = 2000
CHAT_TURN_MAX = 4000

CHAT_SYSTEM_PROMPT = """\
당신은 아파트 평면도 분석 결과를 사용자에게 설명해 주는 상담 도우미입니다.
아래에 주어지는 '저장된 분석 결과'(JSON)와 '관련 사내 평가 기준'만 근거로 삼아 질문에 답합니다.
지켜야 할 점:
1. 답변은 항상 한국어로, 핵심부터 간결하게 씁니다.
2. 분석 결과와 기준에 없는 공간, 방향, 면적, 수치는 만들어 내지 않습니다. 근거가 없으면 "저장된 분석에는 그 내용이 없습니다"라고 분명히 말합니다.
3. 구조 유형, 베이 수, 비율, 등급을 말할 때는 분석 결과에 적힌 값을 그대로 씁니다.
4. 기준을 근거로 들 때는 기준 번호나 출처를 함께 밝힙니다.
5. 개선 방향을 물으면 분석의 개선 제안(recommendations)과 부적합 항목, 기준에 비추어 답합니다.
6. 평면 분석과 관계없는 요청에는 평면도 상담만 도울 수 있다고 정중히 답합니다."""

CHAT_CONTEXT_TEMPLATE = """\
## 저장된 분석 결과
```json
{analysis_json}
```

## 관련 사내 평가 기준
{criteria_block}"""

REFERENCE_CHAT_PREFIX = "[규칙 기반 참조 분석기의 응답입니다. 언어 모델이 생성한 답변이 아닙니다.]"


# ============================================================================ results


def _validation_errors(exc: ValidationError, prefix: str) -> list[dict[str, Any]]:
    return [
        {"loc": [prefix, *err["loc"]], "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]


@dataclass
class AnalysisOutcome:
    analysis: FloorPlanAnalysis
    timings: dict[str, float]  # retrieval_ms, llm_ms, total_ms (+ cv_ms for images)
    context: RagContext
    messages: list[dict[str, str]]
    provider: str
    model: str
    is_llm: bool
    usage: Usage | None = None
    prompt_version: str = PROMPT_VERSION

    def meta(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "is_llm": self.is_llm,
            "timings": self.timings,
            "criteria": [c.id for c in self.context.chunks],
            "query": self.context.query,
            "usage": self.usage.model_dump() if self.usage else None,
            "prompt_version": self.prompt_version,
        }


@dataclass
class UploadOutcome:
    """An uploaded plan analysed: the graph exactly as the CV source returned it (what
    ``topology_json`` carries), the overlay PNG, and the analysis outcome of the normalised graph."""

    raw_topology: dict[str, Any]
    overlay_png: bytes
    outcome: AnalysisOutcome

    def backend_body(self) -> dict[str, str]:
        """The team backend's response: three strings (the Spring side maps exactly these)."""
        return {
            "topology_json": json.dumps(self.raw_topology, ensure_ascii=False),
            "topology_image_url": "data:image/png;base64," + base64.b64encode(self.overlay_png).decode("ascii"),
            "llm_analysis_json": self.outcome.analysis.model_dump_json(),
        }


@dataclass
class ChatOutcome:
    answer: str
    timings: dict[str, float]
    criteria: list[RetrievedChunk]
    provider: str
    model: str
    is_llm: bool
    truncated: bool = False
    usage: Usage | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def meta(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "is_llm": self.is_llm,
            "timings": self.timings,
            "criteria": [c.id for c in self.criteria],
            "truncated": self.truncated,
            "usage": self.usage.model_dump() if self.usage else None,
        }


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


# ============================================================================ building blocks

_MANAGERS: dict[tuple, BaseEmbeddingManager] = {}
_MANAGERS_LOCK = threading.Lock()


def shared_embedding_manager(settings: Any) -> BaseEmbeddingManager:
    """The embedding manager of the settings; local models are loaded once per process (an app
    rebuilt with another LLM provider does not reload the embedding model)."""
    from floorplan_ft.providers.factory import make_embedding_manager

    r = settings.retrieval
    if r.provider != "local":
        return make_embedding_manager(settings)
    key = (r.provider, r.model, r.dimensions, r.device, r.batch_size)
    with _MANAGERS_LOCK:
        manager = _MANAGERS.get(key)
        if manager is None:
            manager = _MANAGERS[key] = make_embedding_manager(settings)
        return manager


def _serving(settings: Any, name: str, default: Any) -> Any:
    # Settings added with this service; read defensively so that older settings objects work.
    return getattr(settings.serving, name, default)


def open_vector_store(settings: Any, manager: BaseEmbeddingManager, chunks: Sequence[CriteriaChunk]) -> VectorStore:
    """``serving.vector_store``: ``memory`` (the corpus embedded at start-up, cached like phase 2
    under ``{data_root}/cache/embeddings``) or ``pgvector`` (``serving.pg_dsn``, table
    ``serving.vector_table`` or the live one)."""
    kind = _serving(settings, "vector_store", "memory")
    if str(getattr(settings.retrieval, "corpus", "shipped") or "shipped").startswith("pgvector:"):
        from floorplan_ft.retrieval.team_table import TeamTableStore

        return TeamTableStore.from_settings(settings)  # the team's criteria table, as phase 2 reads it
    if kind == "pgvector":
        dsn = _serving(settings, "pg_dsn", None)
        if dsn is None or not (dsn.get_secret_value() if hasattr(dsn, "get_secret_value") else str(dsn)):
            raise ConfigError(
                "serving.vector_store is 'pgvector' but no database is set: set serving.pg_dsn (FTP_SERVING__PG_DSN)"
            )
        return PgVectorStore(
            dsn, _serving(settings, "vector_table", None), statement_timeout_s=settings.serving.timeout_s
        )
    if kind != "memory":
        raise ConfigError(f"serving.vector_store = {kind!r}: use memory or pgvector")
    cache_dir = Layout(settings.paths.data_root.rstrip("/")).embeddings_cache()
    try:
        return MemoryVectorStore.build(manager, chunks, cache_dir)
    except OSError as exc:  # a read-only data root: embed without the cache
        log.warning("corpus vector cache %s unusable (%s); embedding without it", cache_dir, exc)
        return MemoryVectorStore.build(manager, chunks, None)


def default_student_path(settings: Any) -> str:
    """Phase 6's student under the data root, for ``LLM_PROVIDER=local`` without
    ``serving.adapter_path``: ``{data_root}/{finetune.student_name}/merged_model`` if it was
    merged, else ``.../adapter_model`` (LoRA on its base)."""
    root = Path(settings.paths.data_root) / settings.finetune.student_name
    for name, marker in (("merged_model", "config.json"), ("adapter_model", "adapter_config.json")):
        if (root / name / marker).is_file():
            return str(root / name)
    raise ConfigError(
        f"LLM_PROVIDER=local needs the student: set serving.adapter_path (FTP_SERVING__ADAPTER_PATH) "
        f"or train one into {root}/adapter_model (step 6)",
        provider="local",
    )


def _safe_url(url: str | None) -> str | None:
    """A base URL without user info or query string (which may carry credentials)."""
    if not url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def validate_topology(topology: TopologyGraph | Mapping[str, Any]) -> TopologyGraph:
    """Schema validation plus the graph's own consistency (unique node ids, edges between
    existing nodes); `InvalidInput` names every problem's location."""
    if isinstance(topology, TopologyGraph):
        graph = topology
    else:
        if not isinstance(topology, Mapping):
            raise InvalidInput([{"loc": ["topology"], "msg": "expected a JSON object", "type": "model_type"}])
        # One normalising reader for every dialect (ours, the team aggregator's, their frontend's).
        try:
            graph = read_topology_dict(dict(topology), origin="topology")
        except TopologyFormatError as exc:
            raise InvalidInput(
                [
                    {
                        "loc": ["topology", *(int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", loc))],
                        "msg": msg,
                        "type": "value_error",
                    }
                    for loc, msg in exc.problems
                ]
            ) from None
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, node in enumerate(graph.nodes):
        if node.node_id in seen:
            errors.append(
                {
                    "loc": ["topology", "nodes", i, "node_id"],
                    "msg": f"duplicate node id {node.node_id!r}",
                    "type": "value_error",
                }
            )
        seen.add(node.node_id)
    for i, edge in enumerate(graph.edges):
        for end in ("source_node", "target_node"):
            if getattr(edge, end) not in seen:
                errors.append(
                    {
                        "loc": ["topology", "edges", i, end],
                        "msg": f"unknown node {getattr(edge, end)!r}",
                        "type": "value_error",
                    }
                )
    if not any(not n.is_outside for n in graph.nodes):
        errors.append({"loc": ["topology", "nodes"], "msg": "no space inside the unit", "type": "value_error"})
    if errors:
        raise InvalidInput(errors)
    return graph


def build_chat_messages(
    analysis: FloorPlanAnalysis,
    criteria: Sequence[RetrievedChunk | Mapping[str, Any]],
    question: str,
    history: Sequence[Mapping[str, str]] = (),
) -> list[dict[str, str]]:
    """System (rules + the stored analysis + criteria), the last turns, then the question."""
    context = CHAT_CONTEXT_TEMPLATE.format(
        analysis_json=json.dumps(analysis.model_dump(mode="json"), ensure_ascii=False, indent=1),
        criteria_block=format_criteria(criteria),
    )
    messages = [{"role": "system", "content": CHAT_SYSTEM_PROMPT + "\n\n" + context}]
    for turn in list(history)[-2 * CHAT_HISTORY_TURNS :]:
        messages.append({"role": turn["role"], "content": turn["content"]})
    messages.append({"role": "user", "content": question})
    return messages


_TOPIC_KEYS = (
    (("채광", "햇빛", "일조", "빛"), "채광"),
    (("환기", "통풍", "바람"), "환기"),
    (("가족", "거실", "ldk", "공용"), "가족융화"),
    (("수납", "드레스", "팬트리", "창고"), "수납"),
)


def reference_chat_answer(analysis: FloorPlanAnalysis, question: str, criteria: Sequence[RetrievedChunk]) -> str:
    """What the rule-based provider answers: the parts of the stored analysis the question names
    (criteria topics, spaces, grade, recommendations), quoted, plus the top criteria. No LLM."""
    q = question.lower()
    parts: list[str] = []
    evaluation = analysis.design_evaluation
    for words, key in _TOPIC_KEYS:
        if evaluation is not None and any(w in q for w in words):
            parts.append(f"- {key}: {getattr(evaluation, key)}")
    for space in analysis.spaces:
        if space.space_name and space.space_name.lower() in q:
            parts.append(f"- {space.space_name}: {space.evaluation_comment}")
    if analysis.compliance is not None and any(w in q for w in ("등급", "종합", "적합", "합격", "기준")):
        c = analysis.compliance
        parts.append(f"- 종합 등급: {c.overall_grade}. {c.summary}")
    if analysis.recommendations and any(w in q for w in ("개선", "제안", "추천", "바꾸", "고치")):
        parts += [f"- 개선 제안: {r}" for r in analysis.recommendations]
    if not parts:
        parts.append(f"- 요약: {analysis.summary}")
    lines = [REFERENCE_CHAT_PREFIX, "질문과 관련된 저장된 분석 내용:", *parts]
    if criteria:
        lines.append("관련 사내 기준:")
        lines += [f"{i}. [{c.source}] {c.content}" for i, c in enumerate(criteria[:2], start=1)]
    return "\n".join(lines)


# ============================================================================ the service


class AnalysisService:
    """One provider, one embedding model, one vector store, built from the settings.

    Everything can be injected (tests, the benchmark); what is not is built here, so a bad key,
    an unreachable OpenAI-compatible server or a vector table of the wrong width fails at start-up
    with the setting named, not on the first request.
    """

    def __init__(
        self,
        settings: Any = None,
        *,
        chat_client: LLMClient | None = None,
        embedding_manager: BaseEmbeddingManager | None = None,
        vector_store: VectorStore | None = None,
        corpus: Sequence[CriteriaChunk] | None = None,
        query_cache_size: int = 1024,
    ):
        if settings is None:
            from floorplan_ft.settings import load_settings

            settings = load_settings()
        self.settings = settings
        serving = settings.serving
        self.provider: str = serving.llm_provider
        self.timeout_s = float(serving.timeout_s)
        self.max_tokens = int(serving.max_new_tokens)
        self.chat_max_tokens = int(_serving(settings, "chat_max_tokens", 1024))
        # The teachers labelled at teachers.temperature (0.2); the local student decodes greedily.
        self.temperature = _serving(settings, "temperature", 0.2)
        self.top_k = int(settings.retrieval.top_k)
        # The prompt the pipeline trained on (a team prompt module that does not load stops here).
        self.prompt_style = prompt_style(settings)
        self.prompt_version = prompt_version_for(settings)
        self.warnings: list[str] = []
        self._owned: list[Any] = []

        self.corpus = list(corpus) if corpus is not None else load_corpus(settings.paths.corpus_path)
        self.embeddings = embedding_manager or shared_embedding_manager(settings)
        if vector_store is None:
            vector_store = open_vector_store(settings, self.embeddings, self.corpus)
            self._owned.append(vector_store)
        self.vector_store = vector_store
        check = check_identity(self.vector_store, self.embeddings)
        if check.warning:
            self.warnings.append(check.warning)
        if self.vector_store.corpus_hash and self.vector_store.backend not in ("memory", "pgvector-team"):
            from floorplan_ft.retrieval.corpus import corpus_hash

            if self.vector_store.corpus_hash != corpus_hash(self.corpus):
                self.warnings.append(
                    "the vector table was built from another version of the criteria corpus "
                    "than paths.corpus_path; re-run `ft-pipeline vectors migrate`"
                )

        if self.provider == REFERENCE_PROVIDER:
            self.client: LLMClient | None = None
        elif chat_client is not None:
            self.client = chat_client
        else:
            from floorplan_ft.providers.factory import make_chat_client

            student = None
            if self.provider == "local" and not serving.adapter_path:
                student = default_student_path(settings)
            self.client = make_chat_client(settings, model=student)
            self._owned.append(self.client)
        if self.client is not None:
            self.provider = self.client.provider
        slots = _serving(settings, "max_concurrency", None)
        if slots is None:
            slots = LOCAL_CONCURRENCY if self.provider == "local" else REMOTE_CONCURRENCY
        self.gate = AdmissionGate(int(slots), int(_serving(settings, "max_queue", 8)))
        self._llm_s = INITIAL_CALL_ESTIMATE_S  # a running mean of model calls, for Retry-After
        self.stopping = False
        self._query_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._query_cache_size = int(query_cache_size)
        self._cache_lock = threading.Lock()

    # ------------------------------------------------------------------ identity

    @property
    def is_llm(self) -> bool:
        return self.client is not None

    @property
    def model(self) -> str:
        if self.client is None:
            from floorplan_ft.teachers.reference import REFERENCE_VERSION

            return REFERENCE_VERSION
        return self.client.model

    def health(self) -> dict[str, Any]:
        """Which provider and model are live, the embeddings and vector store behind retrieval,
        and the prompt/schema versions. No keys, no passwords."""
        if self.client is None:
            llm = {
                "provider": REFERENCE_PROVIDER,
                "model": self.model,
                "base_url": None,
                "is_llm": False,
                "note": "rule-based reference analyst, not a language model (LLM_PROVIDER=reference)",
            }
        else:
            described = dict(self.client.describe())
            described["base_url"] = _safe_url(described.get("base_url"))
            llm = {**described, "is_llm": True}
        embeddings = {
            "provider": getattr(self.embeddings, "provider", None),
            "model": getattr(self.embeddings, "model", None),
            "dimensions": int(self.embeddings.dimensions),
            "base_url": _safe_url(getattr(self.embeddings, "base_url", None)),
        }
        return {
            "status": "ok",
            "llm": llm,
            "rollback_provider": ROLLBACK_PROVIDER,
            "embeddings": embeddings,
            "vector_store": self.vector_store.describe(),
            "retrieval": {"top_k": self.top_k, "retrieval_version": RETRIEVAL_VERSION},
            "prompt_style": self.prompt_style,
            "prompt_version": self.prompt_version,
            "schema_hash": schema_hash(),
            "timeout_s": self.timeout_s,
            "limits": {
                **self.gate.describe(),
                "max_request_mb": self.max_request_bytes / 1048576,
                "max_upload_mb": self.max_upload_bytes / 1048576,
                "stopping": self.stopping,
            },
            "warnings": list(self.warnings),
        }

    def warm_up(self) -> dict[str, float]:
        """Load what loads lazily (an in-process student, a local embedding model) and run one
        retrieval, so the first request is not the slow one. Returns seconds per part."""
        spent: dict[str, float] = {}
        t0 = time.perf_counter()
        load = getattr(self.client, "load", None)
        if callable(load):
            load()
            spent["llm_load_s"] = round(time.perf_counter() - t0, 3)
        t1 = time.perf_counter()
        self.retrieve(build_query({}))
        spent["retrieval_s"] = round(time.perf_counter() - t1, 3)
        return spent

    # ------------------------------------------------------------------ retrieval

    def _query_vectors(self, query: str) -> np.ndarray:
        with self._cache_lock:
            cached = self._query_cache.get(query)
            if cached is not None:
                self._query_cache.move_to_end(query)
                return cached
        vector = embed_query_batch(self.embeddings, [query], plain_queries(self.settings))
        if self._query_cache_size > 0:
            with self._cache_lock:
                self._query_cache[query] = vector
                while len(self._query_cache) > self._query_cache_size:
                    self._query_cache.popitem(last=False)
        return vector

    def retrieve(self, query: str) -> RagContext:
        """Top-k criteria for one query (blocking), as a phase-2 `RagContext`."""
        hits = self.vector_store.search(self._query_vectors(query), self.top_k)[0]
        return context_from_hits(
            query,
            hits,
            embedding_identity=self.embeddings.identity(),
            dimensions=int(self.embeddings.dimensions),
            corpus_hash_=self.vector_store.corpus_hash or "",
            top_k=self.top_k,
            style=self.prompt_style,
        )

    async def aretrieve(self, query: str) -> RagContext:
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.retrieve, query), self.timeout_s)
        except TimeoutError:
            raise RetrievalUnavailable(f"retrieval took longer than {self.timeout_s:g} s (serving.timeout_s)") from None
        except (EmbeddingError, VectorStoreError) as exc:
            raise RetrievalUnavailable(f"retrieval failed: {exc}") from None

    # ------------------------------------------------------------------ provider calls

    def retry_after_s(self) -> float:
        """A guess of when a slot frees: the mean call time × the calls ahead per slot."""
        ahead = self.gate.running + self.gate.waiting
        return float(max(1, min(math.ceil(self._llm_s * max(1, ahead) / self.gate.slots), math.ceil(self.timeout_s))))

    async def _call(
        self, messages: list[dict[str, str]], schema: type[BaseModel] | None, max_tokens: int
    ) -> ChatResult:
        assert self.client is not None
        await self.gate.enter(self.timeout_s, self.retry_after_s())
        started = time.perf_counter()
        try:
            return await self._call_admitted(messages, schema, max_tokens)
        finally:
            elapsed = time.perf_counter() - started
            self._llm_s = 0.7 * self._llm_s + 0.3 * elapsed
            self.gate.leave()

    async def _call_admitted(
        self, messages: list[dict[str, str]], schema: type[BaseModel] | None, max_tokens: int
    ) -> ChatResult:
        from floorplan_ft.providers.local_client import GenerationCancelled, PromptTooLong

        remote = self.client.provider != "local"
        deadline = self.timeout_s + (DEADLINE_GRACE_S if remote else 0.0)
        try:
            # On the deadline wait_for cancels the call: a local generation stops within a token
            # (and returns once its thread is free), an HTTP request is closed.
            return await asyncio.wait_for(
                self.client.achat(messages, schema, max_tokens=max_tokens, temperature=self.temperature),
                deadline,
            )
        except TimeoutError:
            raise ProviderTimeout(
                f"no answer within {self.timeout_s:g} s (serving.timeout_s); the call was cancelled",
                provider=self.client.provider,
                model=self.client.model,
            ) from None
        except PromptTooLong as exc:
            raise PromptTooLarge(str(exc), prompt_tokens=exc.prompt_tokens, context=exc.context) from None
        except GenerationCancelled:
            raise ServiceBusy(
                "the service is stopping; the generation was cancelled", retry_after=SHUTDOWN_RETRY_AFTER_S
            ) from None

    def begin_shutdown(self) -> dict[str, int]:
        """Stop taking model calls: new and waiting ones get `ServiceBusy`, local generations under
        way are cancelled (they answer 503 within a token). Safe to call more than once."""
        self.stopping = True
        rejected = self.gate.close("the service is stopping", SHUTDOWN_RETRY_AFTER_S)
        cancel_all = getattr(self.client, "cancel_all", None)
        cancelled = cancel_all() if callable(cancel_all) else 0
        log.info("shutdown: %d waiting call(s) rejected, %d generation(s) cancelled", rejected, cancelled)
        return {"rejected": rejected, "cancelled": cancelled}

    # ------------------------------------------------------------------ analyze

    async def aanalyze_detailed(
        self,
        topology: TopologyGraph | Mapping[str, Any],
        image_name: str | None = None,
        *,
        raw_topology: Mapping[str, Any] | None = None,
    ) -> AnalysisOutcome:
        """``raw_topology``: the graph as the client or the CV source gave it, when ``topology`` is
        its normalised form (the team prompt style sends the graph as production does)."""
        started = time.perf_counter()
        graph = validate_topology(topology)
        image_name = image_name or graph.image_info.file_name
        if len(image_name) > 200:
            raise InvalidInput([{"loc": ["image_name"], "msg": "at most 200 characters", "type": "string_too_long"}])
        t0 = time.perf_counter()
        context = await self.aretrieve(query_for(self.settings, graph.statistics))
        retrieval_s = time.perf_counter() - t0
        if raw_topology is None:
            raw_topology = topology if isinstance(topology, Mapping) else graph.model_dump(mode="json")
        messages = build_messages_for(self.settings, raw_topology, context, image_name=image_name, graph=graph)
        t1 = time.perf_counter()
        usage = None
        if self.client is None:
            from floorplan_ft.teachers.reference import reference_analysis

            analysis = reference_analysis(image_name, graph)
        else:
            result = await self._call(messages, FloorPlanAnalysis, self.max_tokens)
            analysis = result.parsed
            if not isinstance(analysis, FloorPlanAnalysis):  # every client validates; be sure
                analysis = FloorPlanAnalysis.model_validate_json(result.text)
            usage = result.usage
        llm_s = time.perf_counter() - t1
        timings = {
            "retrieval_ms": _ms(retrieval_s),
            "llm_ms": _ms(llm_s),
            "total_ms": _ms(time.perf_counter() - started),
        }
        log.info("analyze %s: %s/%s %s", image_name, self.provider, self.model, timings)
        return AnalysisOutcome(
            analysis, timings, context, messages, self.provider, self.model, self.is_llm, usage, self.prompt_version
        )

    async def aanalyze(
        self, topology: TopologyGraph | Mapping[str, Any], image_name: str | None = None
    ) -> tuple[FloorPlanAnalysis, dict[str, float]]:
        outcome = await self.aanalyze_detailed(topology, image_name)
        return outcome.analysis, outcome.timings

    def analyze(
        self, topology: TopologyGraph | Mapping[str, Any], image_name: str | None = None
    ) -> tuple[FloorPlanAnalysis, dict[str, float]]:
        """(validated analysis, {retrieval_ms, llm_ms, total_ms})."""
        return _run_sync(self.aanalyze(topology, image_name))

    def analyze_detailed(
        self, topology: TopologyGraph | Mapping[str, Any], image_name: str | None = None
    ) -> AnalysisOutcome:
        return _run_sync(self.aanalyze_detailed(topology, image_name))

    # ------------------------------------------------------------------ images

    def topology_from_image(self, path: str | Path) -> TopologyGraph:
        """The plan's topology through the configured CV source (``cv.source``): the image's
        folder is the image dir; annotations come from ``paths.annotation_dir``/``annotation_file``."""
        from floorplan_ft.cv import build_topology
        from floorplan_ft.cv.detections import AnnotationError
        from floorplan_ft.cv.sources import ImageError, SourceConfig, get_source

        path = Path(path)
        s = self.settings
        config = SourceConfig(
            kind=s.cv.source,
            image_dir=str(path.parent),
            annotation_dir=None if s.paths.annotation_file else s.annotation_dir(),
            annotation_file=s.paths.annotation_file,
            plugin=s.cv.plugin,
            device=s.cv.device,
            clear_cache_every=s.cv.clear_cache_every,
        )
        try:
            return build_topology(get_source(config).detections(path.stem))
        except (ImageError, AnnotationError, ValueError) as exc:
            raise InvalidInput([{"loc": ["image"], "msg": str(exc), "type": "value_error"}]) from None

    async def aanalyze_image(self, path: str | Path) -> AnalysisOutcome:
        t0 = time.perf_counter()
        graph = await asyncio.to_thread(self.topology_from_image, path)
        cv_s = time.perf_counter() - t0
        outcome = await self.aanalyze_detailed(graph, Path(path).name)
        outcome.timings = {"cv_ms": _ms(cv_s), **outcome.timings, "total_ms": _ms(time.perf_counter() - t0)}
        return outcome

    # ------------------------------------------------------------------ uploads (the backend's /analyze)

    @property
    def max_request_bytes(self) -> int:
        return int(float(_serving(self.settings, "max_request_mb", 2.0)) * 1024 * 1024)

    @property
    def max_upload_bytes(self) -> int:
        return int(float(_serving(self.settings, "max_upload_mb", 20.0)) * 1024 * 1024)

    @property
    def cv_timeout_s(self) -> float:
        explicit = _serving(self.settings, "cv_timeout_s", None)
        if explicit is not None:
            return float(explicit)
        return float(getattr(self.settings.cv, "runpod_timeout_s", 300.0)) + CV_DEADLINE_GRACE_S

    async def aanalyze_upload(self, image_bytes: bytes, filename: str | None) -> UploadOutcome:
        """An uploaded PNG → the configured CV source (``cv.source``, in a thread, bounded by
        `cv_timeout_s`) → the graph normalised by `topology_io` → `aanalyze_detailed` → the overlay.
        Raises `UploadTooLarge`, `InvalidImage`, `CVFailed`, then what `aanalyze_detailed` raises."""
        started = time.perf_counter()
        if len(image_bytes) > self.max_upload_bytes:
            raise UploadTooLarge(
                f"the upload is {len(image_bytes) / 1048576:.1f} MiB; serving.max_upload_mb is "
                f"{self.max_upload_bytes / 1048576:g}"
            )
        filename = _upload_name(filename)
        size = decode_image_size(image_bytes)
        t0 = time.perf_counter()
        try:
            result = await asyncio.wait_for(
                asyncio.to_thread(run_cv_on_upload, self.settings, image_bytes, filename),
                self.cv_timeout_s,
            )
        except TimeoutError:
            raise CVFailed(
                f"the CV source ({self.settings.cv.source}) gave no topology within "
                f"{self.cv_timeout_s:g} s (serving.cv_timeout_s)",
                status=503,
                retryable=True,
            ) from None
        cv_s = time.perf_counter() - t0
        raw, overlay = cv_result_parts(result)
        from floorplan_ft.topology_io import TopologyFormatError, read_topology_dict

        try:
            graph = read_topology_dict(raw, origin=f"CV result for {filename}")
        except TopologyFormatError as exc:
            raise CVFailed(f"the CV source returned a graph that does not read: {exc}") from None
        outcome = await self.aanalyze_detailed(graph, filename, raw_topology=raw)
        if overlay is None:
            overlay = await asyncio.to_thread(render_upload_overlay, graph, image_bytes, size)
        outcome.timings = {"cv_ms": _ms(cv_s), **outcome.timings, "total_ms": _ms(time.perf_counter() - started)}
        return UploadOutcome(raw, overlay, outcome)

    def analyze_image(self, path: str | Path) -> tuple[FloorPlanAnalysis, dict[str, float]]:
        """Image → CV source → topology → `analyze`; timings add ``cv_ms``."""
        outcome = _run_sync(self.aanalyze_image(path))
        return outcome.analysis, outcome.timings

    # ------------------------------------------------------------------ chat

    async def achat_detailed(
        self,
        analysis: FloorPlanAnalysis | Mapping[str, Any],
        question: str,
        history: Sequence[Mapping[str, str]] = (),
    ) -> ChatOutcome:
        started = time.perf_counter()
        analysis = _validate_analysis(analysis)
        question = _validate_question(question)
        history = _validate_history(history)
        t0 = time.perf_counter()
        context = await self.aretrieve(question)
        retrieval_s = time.perf_counter() - t0
        messages = build_chat_messages(analysis, context.chunks, question, history)
        t1 = time.perf_counter()
        usage, truncated = None, False
        if self.client is None:
            answer = reference_chat_answer(analysis, question, context.chunks)
        else:
            try:
                result = await self._call(messages, None, self.chat_max_tokens)
                answer, usage = result.text, result.usage
            except OutputTruncated as exc:  # a cut answer is still an answer: flag it
                answer, usage, truncated = exc.text, exc.usage, True
            answer = answer.strip()
        timings = {
            "retrieval_ms": _ms(retrieval_s),
            "llm_ms": _ms(time.perf_counter() - t1),
            "total_ms": _ms(time.perf_counter() - started),
        }
        return ChatOutcome(
            answer, timings, list(context.chunks), self.provider, self.model, self.is_llm, truncated, usage, messages
        )

    def chat(
        self,
        analysis: FloorPlanAnalysis | Mapping[str, Any],
        question: str,
        history: Sequence[Mapping[str, str]] = (),
    ) -> str:
        """A Korean answer grounded in the stored analysis and the criteria the question retrieves."""
        return _run_sync(self.achat_detailed(analysis, question, history)).answer

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        for owned in self._owned:
            try:
                owned.close()
            except Exception as exc:  # noqa: BLE001 - closing is best effort
                log.debug("closing %r: %s", owned, exc)
        self._owned.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


CV_DEADLINE_GRACE_S = 10.0
# CV failures worth retrying later (503): the endpoint was slow, unreachable, overloaded or cold.
# The others (a FAILED job, an error in its output, a refused key, no source configured) are 502.
_RETRY_LATER = re.compile(r"timed out|no answer within|cannot reach|HTTP (?:429|5\d\d)|still IN_(?:QUEUE|PROGRESS)")
_UPLOAD_NAME = re.compile(r"[^\w.\-]+")


def _upload_name(filename: str | None) -> str:
    """The upload's base name, safe as a file name and in a prompt (no folders, at most 200)."""
    name = Path((filename or "").replace("\\", "/")).name.strip()
    name = _UPLOAD_NAME.sub("_", name)[:200].strip("._")
    return name or "upload.png"


def decode_image_size(image_bytes: bytes) -> tuple[int, int]:
    """(width, height) of a decodable image; `InvalidImage` with the decoder's reason otherwise."""
    from PIL import Image, UnidentifiedImageError

    if not image_bytes:
        raise InvalidImage("the upload is empty: send the plan image in the multipart field 'file'")
    try:
        with Image.open(io.BytesIO(image_bytes)) as im:
            im.load()
            return im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidImage(f"the upload is not a decodable image ({len(image_bytes)} bytes): {exc}") from None


def run_cv_on_upload(settings: Any, image_bytes: bytes, filename: str) -> Any:
    """The configured CV source on one uploaded image (blocking; the caller runs it in a thread).
    The source's own errors become `CVFailed`: 503 for timeouts and unreachable endpoints."""
    from floorplan_ft.cv.online import CVUnavailable, topology_from_image
    from floorplan_ft.cv.sources import ImageError

    try:
        return topology_from_image(settings, image_bytes, filename)
    except ServiceError:
        raise
    except ImageError as exc:
        raise InvalidImage(str(exc)) from None
    except CVUnavailable as exc:
        # The source says whether a retry may help; other sources' errors are read by their words.
        later = exc.retry_later or _RETRY_LATER.search(str(exc)) is not None
        raise CVFailed(
            f"the CV source ({settings.cv.source}) failed: {exc}", status=503 if later else 502, retryable=later
        ) from None
    except (TimeoutError, ConnectionError) as exc:
        raise CVFailed(
            f"the CV source ({settings.cv.source}) is unreachable or slow: {exc}", status=503, retryable=True
        ) from None
    except Exception as exc:  # noqa: BLE001 - any source failure is a 5xx with its reason
        status = 503 if getattr(exc, "retryable", False) else 502
        raise CVFailed(
            f"the CV source ({settings.cv.source}) failed: {exc}", status=status, retryable=status == 503
        ) from None


def cv_result_parts(result: Any) -> tuple[dict[str, Any], bytes | None]:
    """(graph dict, overlay PNG or None) from what the CV source returned: a graph (dict or
    `TopologyGraph`), or an object/dict that holds one (``topology``/``topology_json``/``graph``)
    and maybe the overlay (``overlay_png`` bytes or ``topology_image_base64``)."""

    def pick(*names: str) -> Any:
        for name in names:
            value = result.get(name) if isinstance(result, Mapping) else getattr(result, name, None)
            if value is not None:
                return value
        return None

    if isinstance(result, TopologyGraph):
        return result.model_dump(mode="json"), None
    if isinstance(result, Mapping) and "nodes" in result:
        return dict(result), None
    graph = pick("topology", "topology_json", "topology_graph", "graph")
    if isinstance(graph, TopologyGraph):
        graph = graph.model_dump(mode="json")
    if isinstance(graph, str):
        try:
            graph = json.loads(graph)
        except ValueError as exc:
            raise CVFailed(f"the CV source returned a topology that is not JSON: {exc}") from None
    if not isinstance(graph, Mapping):
        raise CVFailed(f"the CV source returned no topology graph (got {type(result).__name__})")
    overlay = pick("overlay_png", "topology_image_png")
    if overlay is None:
        encoded = pick("topology_image_base64", "overlay_base64")
        if isinstance(encoded, str) and encoded:
            try:
                overlay = base64.b64decode(encoded.split(",", 1)[-1], validate=False)
            except ValueError:
                overlay = None
    if overlay is not None and not bytes(overlay).startswith(b"\x89PNG"):
        overlay = _as_png(bytes(overlay))
    return dict(graph), (bytes(overlay) if overlay is not None else None)


def _as_png(image_bytes: bytes) -> bytes | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image_bytes)) as im:
            out = io.BytesIO()
            im.convert("RGB").save(out, format="PNG")
            return out.getvalue()
    except (OSError, ValueError):
        return None


def render_upload_overlay(graph: TopologyGraph, image_bytes: bytes, size: tuple[int, int]) -> bytes:
    """Our overlay (nodes, labels, edges) over the uploaded plan, as PNG bytes."""
    from floorplan_ft.cv.overlay import render_overlay

    with tempfile.TemporaryDirectory(prefix="ftp-upload-") as tmp:
        plan, out = Path(tmp) / "plan.png", Path(tmp) / "overlay.png"
        plan.write_bytes(image_bytes)
        render_overlay(graph, plan, out)
        return out.read_bytes()


def _validate_analysis(analysis: FloorPlanAnalysis | Mapping[str, Any]) -> FloorPlanAnalysis:
    if isinstance(analysis, FloorPlanAnalysis):
        return analysis
    try:
        return FloorPlanAnalysis.model_validate(analysis)
    except ValidationError as exc:
        raise InvalidInput(_validation_errors(exc, "analysis")) from None


def _validate_question(question: Any) -> str:
    if not isinstance(question, str) or not question.strip():
        raise InvalidInput([{"loc": ["question"], "msg": "ask a non-empty question", "type": "value_error"}])
    if len(question) > CHAT_QUESTION_MAX:
        raise InvalidInput(
            [{"loc": ["question"], "msg": f"at most {CHAT_QUESTION_MAX} characters", "type": "string_too_long"}]
        )
    return question.strip()


def _validate_history(history: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    out = []
    for i, turn in enumerate(history or ()):
        role = turn.get("role") if isinstance(turn, Mapping) else None
        content = turn.get("content") if isinstance(turn, Mapping) else None
        if role not in ("user", "assistant") or not isinstance(content, str):
            raise InvalidInput(
                [
                    {
                        "loc": ["history", i],
                        "msg": "each turn is {role: user|assistant, content: text}",
                        "type": "value_error",
                    }
                ]
            )
        if len(content) > CHAT_TURN_MAX:
            raise InvalidInput(
                [
                    {
                        "loc": ["history", i, "content"],
                        "msg": f"at most {CHAT_TURN_MAX} characters",
                        "type": "string_too_long",
                    }
                ]
            )
        out.append({"role": role, "content": content})
    return out


_HANGUL = re.compile(r"[\uac00-\ud7a3]")


def is_korean(text: str) -> bool:
    """Whether an answer contains Hangul (a cheap check for tests and monitoring)."""
    return bool(_HANGUL.search(text or ""))
