"""Phase 3 engine: label many plans with one teacher, carefully.

Per item: a content-addressed cache check (a rerun pays for nothing already answered), a budget
reservation (the cap is never exceeded: each attempt reserves its worst case before it is sent),
the rate limiter, one request, and failure handling by class, each bounded:

- 429 → wait what Retry-After says (capped), pause the whole teacher, retry (≤ max_rate_limit_retries)
- 5xx, timeout, connection error → backoff 2 → 4 → 8 s with jitter, then give up
- answer cut at the token limit → one retry with a larger output budget
- invalid JSON / schema → one re-ask quoting the validation error
- refusal, content filter, other 4xx → no retry; bad credentials → stop the teacher

Every answer is written atomically with its provenance sidecar the moment it arrives, so a run
killed with SIGKILL loses only the requests in flight. Failures go to a per-teacher ledger with
their reason and cost; the phase goes on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from floorplan_ft.prompts import PROMPT_VERSION
from floorplan_ft.schemas import SCHEMA_VERSION, FloorPlanAnalysis, TopologyGraph, schema_hash
from floorplan_ft.serving.base import (
    AuthError,
    ChatResult,
    ConnectionFailed,
    InvalidOutput,
    LLMClient,
    LLMError,
    OutputTruncated,
    ProviderTimeout,
    RateLimitError,
    Refusal,
    ServerError,
    Usage,
)
from floorplan_ft.settings import ModelPrice, TeacherSettings
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.limits import RateLimiter
from floorplan_ft.teachers.reference import REFERENCE_VERSION, reference_analysis

REASK = (
    "직전 응답이 요구한 JSON 스키마 검증을 통과하지 못했습니다. 오류: {detail}\n"
    "설명 없이 스키마를 정확히 따르는 JSON 객체 하나만 다시 작성하세요."
)


# ------------------------------------------------------------------------------ items, teachers


@dataclass
class LabelItem:
    stem: str
    image_name: str
    messages: list[dict[str, str]]
    topology: TopologyGraph | None = None
    prompt_version: str = PROMPT_VERSION  # prompts.prompt_version_for(settings): the sidecars record it


class Teacher(ABC):
    """A labeler: an LLM behind a chat client, or the rule-based reference."""

    name: str
    provider: str
    model: str
    temperature: float | None = None
    # Remote APIs have per-minute limits; an in-process model or the rules do not.
    remote: bool = True

    def cache_identity(self) -> dict[str, Any]:
        return {"provider": self.provider, "model": self.model, "temperature": self.temperature}

    @abstractmethod
    async def answer(self, item: LabelItem, messages: list[dict], max_tokens: int) -> ChatResult:
        """One attempt at labeling `item` with these messages (a re-ask adds turns)."""

    async def aclose(self) -> None:
        return None


class LLMTeacher(Teacher):
    def __init__(self, name: str, client: LLMClient, temperature: float):
        self.name = name
        self.client = client
        self.provider = client.provider
        self.model = client.model
        self.temperature = temperature
        self.remote = client.provider != "local"

    async def answer(self, item: LabelItem, messages: list[dict], max_tokens: int) -> ChatResult:
        return await self.client.achat(
            messages, FloorPlanAnalysis, max_tokens=max_tokens, temperature=self.temperature
        )

    async def aclose(self) -> None:
        await self.client.aclose()


class ReferenceTeacher(Teacher):
    """Rule-based analyst (never an LLM): answers from the topology, costs nothing."""

    name = "reference"
    provider = "rules"
    model = REFERENCE_VERSION
    remote = False

    async def answer(self, item: LabelItem, messages: list[dict], max_tokens: int) -> ChatResult:
        if item.topology is None:
            raise InvalidOutput("", f"{item.stem}: no topology graph to analyse")
        start = time.perf_counter()
        parsed = reference_analysis(item.image_name, item.topology)
        return ChatResult(
            text=parsed.model_dump_json(),
            parsed=parsed,
            usage=Usage(input_tokens=0, output_tokens=0, latency_s=time.perf_counter() - start),
            model=self.model,
            provider=self.provider,
            finish_reason="stop",
        )


# ------------------------------------------------------------------------------ money


def estimate_tokens(text: str) -> int:
    """Upper-leaning token estimate: Hangul is ~1 token per character (3 UTF-8 bytes), ASCII JSON
    ~4 characters per token; a third of the UTF-8 length covers both."""
    return math.ceil(len(text.encode("utf-8")) / 3)


def messages_tokens(messages: list[dict[str, str]]) -> int:
    return sum(estimate_tokens(m["content"]) + 4 for m in messages)


def cost_usd(price: ModelPrice | None, input_tokens: int, output_tokens: int, factor: float = 1.0) -> float:
    if price is None:
        return 0.0
    return factor * (input_tokens * price.input_per_m + output_tokens * price.output_per_m) / 1e6


class Budget:
    """Spent + reserved never exceeds the cap: an attempt runs only if its worst case fits."""

    def __init__(self, cap_usd: float, already_spent: float = 0.0):
        self.cap = cap_usd
        self.spent = already_spent
        self.reserved = 0.0

    def reserve(self, amount: float) -> bool:
        if self.spent + self.reserved + amount > self.cap + 1e-12:
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, actual: float) -> None:
        self.reserved -= reserved
        self.spent += actual


# ------------------------------------------------------------------------------ cache layout


def item_key(teacher: Teacher, messages: list[dict[str, str]], max_tokens: int) -> str:
    """Content address of one answer: provider, model, generation parameters, prompt, schema."""
    payload = {
        **teacher.cache_identity(),
        "max_tokens": max_tokens,
        "messages": messages,
        "schema": schema_hash(),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def meta_path(store: ArtifactStore, stem: str, teacher: str) -> str:
    return store.path("output", stem, f"llm_analysis_{teacher}.meta.json")


def failures_path(store: ArtifactStore, teacher: str) -> str:
    return store.path(f"label_failures_{teacher}.json")


def ledger_path(store: ArtifactStore, teacher: str) -> str:
    return store.path(f"cost_ledger_{teacher}.json")


def summary_path(store: ArtifactStore, teacher: str) -> str:
    return store.path(f"labeling_{teacher}.json")


def cached_answer(store: ArtifactStore, stem: str, teacher: str, key: str) -> dict | None:
    """The sidecar of a valid cached answer for this exact key, else None."""
    mpath, apath = meta_path(store, stem, teacher), store.analysis_path(stem, teacher)
    if not (store.exists(mpath) and store.exists(apath)):
        return None
    try:
        meta = store.read_json(mpath)
        if meta.get("key") != key:
            return None
        FloorPlanAnalysis.model_validate_json(store.read_text(apath))
    except (ValueError, OSError):
        return None
    return meta


def write_answer(
    store: ArtifactStore,
    teacher: Teacher,
    stem: str,
    key: str,
    result: ChatResult,
    outcome: ItemOutcome,
    seconds: float,
    prompt_version: str = PROMPT_VERSION,
) -> None:
    """Write one validated answer and its provenance sidecar (the online engine and the batch
    runner both write through here, so caching and phase 4 see one format)."""
    answer = result.parsed
    assert isinstance(answer, BaseModel)
    store.write_text(store.analysis_path(stem, teacher.name), answer.model_dump_json(indent=1) + "\n")
    # The sidecar is written last: its existence with the right key means the answer is complete.
    store.write_json(
        meta_path(store, stem, teacher.name),
        {
            "key": key,
            "teacher": teacher.name,
            "provider": teacher.provider,
            "model": result.model or teacher.model,
            "prompt_version": prompt_version,
            "schema_version": SCHEMA_VERSION,
            "schema_hash": schema_hash(),
            "input_tokens": outcome.input_tokens,
            "output_tokens": outcome.output_tokens,
            "cost_usd": round(outcome.cost_usd, 6),
            "attempts": outcome.attempts,
            "seconds": round(seconds, 3),
            "labeled_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )


class CostLedger:
    """Cumulative tokens and dollars of one teacher on one data root, failed attempts included.
    Rewritten atomically after every attempt, so a killed run loses at most what was in flight."""

    FIELDS = ("requests", "input_tokens", "output_tokens", "cost_usd")

    def __init__(self, store: ArtifactStore, teacher: str):
        self.store, self.path = store, ledger_path(store, teacher)
        self.totals = {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
        if store.exists(self.path):
            data = store.read_json(self.path)
            self.totals.update({k: data.get(k, 0) for k in self.FIELDS})
        self.teacher = teacher

    def add(self, usage: Usage | None, cost: float, requests: int = 1) -> None:
        self.totals["requests"] += requests
        if usage is not None:
            self.totals["input_tokens"] += usage.input_tokens
            self.totals["output_tokens"] += usage.output_tokens
        self.totals["cost_usd"] = round(self.totals["cost_usd"] + cost, 8)
        self.store.write_json(self.path, {"teacher": self.teacher, **self.totals})

    @property
    def spent(self) -> float:
        return float(self.totals["cost_usd"])


# ------------------------------------------------------------------------------ the run


@dataclass
class ItemOutcome:
    stem: str
    status: str  # labeled | cached | failed | skipped
    reason: str | None = None
    detail: str | None = None
    attempts: int = 0
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass
class TeacherRunSummary:
    teacher: str
    provider: str
    model: str
    items: int = 0
    labeled: int = 0
    cached: int = 0
    failed: int = 0
    skipped_budget: int = 0
    requests: int = 0
    rate_limited: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    total_spent_usd: float = 0.0
    budget_usd: float = 0.0
    seconds: float = 0.0
    stopped: str | None = None
    failures: dict[str, dict] = field(default_factory=dict)
    unlabeled: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


ProgressFn = Callable[[TeacherRunSummary, int], None]


class LabelingRun:
    def __init__(
        self,
        teacher: Teacher,
        store: ArtifactStore,
        settings: TeacherSettings,
        *,
        on_progress: ProgressFn | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ):
        self.teacher = teacher
        self.store = store
        self.cfg = settings
        self.price = None if isinstance(teacher, ReferenceTeacher) else settings.prices.get(teacher.model)
        unlimited = 10**12
        self.limiter = (
            RateLimiter(settings.requests_per_minute, settings.tokens_per_minute, sleep=sleep)
            if teacher.remote
            else RateLimiter(unlimited, unlimited, sleep=sleep)
        )
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.on_progress = on_progress
        self.summary = TeacherRunSummary(teacher.name, teacher.provider, teacher.model, budget_usd=settings.budget_usd)
        self._stop: str | None = None
        self._failures: dict[str, dict] = {}
        self._lock = asyncio.Lock()

    # -------------------------------------------------------------- bookkeeping
    def _write_failures(self) -> None:
        self.store.write_json(
            failures_path(self.store, self.teacher.name),
            {"teacher": self.teacher.name, "failures": dict(sorted(self._failures.items()))},
        )

    def _record_answer(self, item: LabelItem, key: str, result: ChatResult, outcome: ItemOutcome, started: float) -> None:
        write_answer(self.store, self.teacher, item.stem, key, result, outcome, time.perf_counter() - started,
                     item.prompt_version)

    def _settle(self, outcome: ItemOutcome, reserved: float, estimated_tokens: int, usage: Usage | None) -> None:
        """Book one finished attempt: budget, limiter, ledger and the item's own totals."""
        spent = cost_usd(self.price, usage.input_tokens, usage.output_tokens) if usage else 0.0
        self.budget.settle(reserved, spent)
        self.limiter.settle(estimated_tokens, usage.input_tokens + usage.output_tokens if usage else 0)
        self.ledger.add(usage, spent)
        outcome.cost_usd += spent
        if usage is not None:
            outcome.input_tokens += usage.input_tokens
            outcome.output_tokens += usage.output_tokens

    # -------------------------------------------------------------- one item
    async def _label(self, item: LabelItem, sem: asyncio.Semaphore) -> ItemOutcome:
        key = item_key(self.teacher, item.messages, self.cfg.max_output_tokens)
        if cached_answer(self.store, item.stem, self.teacher.name, key) is not None:
            return ItemOutcome(item.stem, "cached")
        async with sem:
            return await self._attempts(item, key)

    async def _attempts(self, item: LabelItem, key: str) -> ItemOutcome:
        outcome = ItemOutcome(item.stem, "failed")
        started = time.perf_counter()
        messages = list(item.messages)
        max_tokens = self.cfg.max_output_tokens
        transient = rate_limited = 0
        truncated_retry = reasked = False
        while True:
            if self._stop:
                outcome.status, outcome.reason = "skipped", self._stop
                return outcome
            input_est = messages_tokens(messages)
            # Budget: the worst case of this attempt (a generous input estimate, the full output budget).
            worst = cost_usd(self.price, input_est * 3 // 2, max_tokens)
            if not self.budget.reserve(worst):
                self._stop = self._stop or "budget"
                outcome.status, outcome.reason = "skipped", "budget"
                return outcome
            tokens = input_est + max_tokens
            await self.limiter.acquire(tokens)
            outcome.attempts += 1
            self.summary.requests += 1
            try:
                result = await self.teacher.answer(item, messages, max_tokens)
            except LLMError as exc:
                self._settle(outcome, worst, tokens, getattr(exc, "usage", None))
                error = exc
            except Exception as exc:  # noqa: BLE001  (a bug or a broken local model: this item fails, the run goes on)
                self._settle(outcome, worst, tokens, None)
                return self._fail(outcome, "error", f"{type(exc).__name__}: {exc}")
            except BaseException:
                self._settle(outcome, worst, tokens, None)
                raise
            else:
                self._settle(outcome, worst, tokens, result.usage)
                if result.rate_limit is not None:
                    self.limiter.adopt(result.rate_limit.limit_requests, result.rate_limit.limit_tokens)
                outcome.status = "labeled"
                self._record_answer(item, key, result, outcome, started)
                return outcome

            if isinstance(error, RateLimitError):
                self.summary.rate_limited += 1
                rate_limited += 1
                cap = self.cfg.retry_after_cap_s
                self.limiter.pause(min(error.retry_after if error.retry_after is not None else cap, cap))
                if rate_limited > self.cfg.max_rate_limit_retries:
                    return self._fail(outcome, "rate_limited", str(error))
            elif isinstance(error, ServerError | ProviderTimeout | ConnectionFailed):
                if transient >= len(self.cfg.backoff_s):
                    return self._fail(outcome, _reason(error), str(error))
                delay = self.cfg.backoff_s[transient] * (1 + self.rng.uniform(0, 0.25))
                transient += 1
                await self.sleep(delay)
            elif isinstance(error, OutputTruncated):
                if truncated_retry or max_tokens >= self.cfg.max_output_tokens_cap:
                    return self._fail(outcome, "truncated", str(error))
                truncated_retry = True
                max_tokens = min(self.cfg.max_output_tokens_cap, int(max_tokens * self.cfg.truncation_budget_factor))
            elif isinstance(error, InvalidOutput):
                if reasked:
                    return self._fail(outcome, "invalid_output", error.detail)
                reasked = True
                messages = [*item.messages, {"role": "assistant", "content": (error.text or "")[:6000]},
                            {"role": "user", "content": REASK.format(detail=error.detail[:1500])}]
            elif isinstance(error, Refusal):
                return self._fail(outcome, "refusal", str(error))
            elif isinstance(error, AuthError):
                self._stop = "auth"
                return self._fail(outcome, "auth", str(error))
            else:
                return self._fail(outcome, _reason(error), str(error))

    def _fail(self, outcome: ItemOutcome, reason: str, detail: str) -> ItemOutcome:
        outcome.status, outcome.reason, outcome.detail = "failed", reason, detail[:500]
        return outcome

    # -------------------------------------------------------------- all items
    async def run(self, items: list[LabelItem]) -> TeacherRunSummary:
        start = time.perf_counter()
        self.ledger = CostLedger(self.store, self.teacher.name)
        if self.store.exists(failures_path(self.store, self.teacher.name)):
            # Earlier failures stay listed until their item is labeled.
            self._failures = dict(self.store.read_json(failures_path(self.store, self.teacher.name))["failures"])
        self.budget = Budget(self.cfg.budget_usd, self.ledger.spent)
        sem = asyncio.Semaphore(self.cfg.concurrency)
        self.summary.items = len(items)
        done = 0
        try:
            for coro in asyncio.as_completed([self._label(item, sem) for item in items]):
                outcome = await coro
                done += 1
                self._account(outcome)
                if self.on_progress:
                    self.on_progress(self.summary, done)
        finally:
            self._write_failures()
            await self.teacher.aclose()
        s = self.summary
        s.stopped = self._stop
        s.total_spent_usd = round(self.ledger.spent, 6)
        s.seconds = round(time.perf_counter() - start, 3)
        stems = {i.stem for i in items}
        s.failures = {k: v for k, v in sorted(self._failures.items()) if k in stems}
        s.unlabeled = sorted(s.failures)
        s.cost_usd = round(s.cost_usd, 6)
        self.store.write_json(summary_path(self.store, self.teacher.name), s.as_dict())
        return s

    def _account(self, o: ItemOutcome) -> None:
        s = self.summary
        s.input_tokens += o.input_tokens
        s.output_tokens += o.output_tokens
        s.cost_usd += o.cost_usd
        if o.status in ("labeled", "cached"):
            if o.status == "labeled":
                s.labeled += 1
            else:
                s.cached += 1
            if self._failures.pop(o.stem, None) is not None:
                self._write_failures()
        else:
            if o.status == "skipped":
                s.skipped_budget += o.reason == "budget"
            else:
                s.failed += 1
            self._failures[o.stem] = {
                "reason": o.reason,
                "detail": o.detail,
                "attempts": o.attempts,
                "cost_usd": round(o.cost_usd, 6),
            }
            self._write_failures()


def _reason(exc: Exception) -> str:
    return {
        ServerError: "server_error",
        ProviderTimeout: "timeout",
        ConnectionFailed: "connection",
    }.get(type(exc), type(exc).__name__)
