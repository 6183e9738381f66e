"""Phase 3 engine: label many plans with one teacher, carefully.

Per item: a content-addressed cache check (a rerun pays for nothing already answered), a budget
reservation (the cap is never exceeded: each attempt reserves its worst case before it is sent),
the rate limiter, one request, and failure handling by class, each bounded:

- 429 → the teacher slows down and pauses (Retry-After, else until its window has room), and the
  item is retried for at least the provider's window plus a margin (≤ rate_limit_max_wait_s)
- 5xx, timeout, connection error → backoff 2 → 4 → 8 s with jitter, then give up
- answer cut at the token limit → a larger output budget each time, then fresh asks
  (≤ max_truncated_attempts)
- invalid JSON / schema → a re-ask quoting the validation error, the same with a larger budget,
  then fresh asks with the original messages (≤ max_invalid_attempts)
- refusal, content filter, other 4xx → no retry; bad credentials → stop the teacher
- every item: at most max_attempts_per_item requests (429s aside) and max_item_cost_usd dollars

Every answer is written atomically with its provenance sidecar the moment it arrives, so a run
killed with SIGKILL loses only the requests in flight, and those are not lost from the books: the
cost ledger is write-ahead (`CostLedger`), each attempt's worst case on disk before it is sent.
Failures go to a per-teacher ledger with their reason and cost; the phase goes on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import random
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from floorplan_ft.prompts import PROMPT_VERSION
from floorplan_ft.providers.base import (
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
from floorplan_ft.schemas import SCHEMA_VERSION, FloorPlanAnalysis, TopologyGraph, schema_hash
from floorplan_ft.settings import ModelPrice, TeacherSettings
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.limits import limiter_for, load_history, rate_limit_exhausted
from floorplan_ft.teachers.reference import REFERENCE_VERSION, reference_analysis

log = logging.getLogger(__name__)

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
        return await self.client.achat(messages, FloorPlanAnalysis, max_tokens=max_tokens, temperature=self.temperature)

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


def cached_answer(store: ArtifactStore, stem: str, teacher: str, key: str) -> dict | None:
    """The sidecar of a valid cached answer for this exact key, else None."""
    mpath, apath = store.layout.analysis_meta(stem, teacher), store.layout.analysis(stem, teacher)
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
    store.write_text(store.layout.analysis(stem, teacher.name), answer.model_dump_json(indent=1) + "\n")
    # The sidecar is written last: its existence with the right key means the answer is complete.
    store.write_json(
        store.layout.analysis_meta(stem, teacher.name),
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


class _Journal:
    """Append-only JSON lines. Local data root: one file opened with O_APPEND per write (a line is
    one `write()`, which a SIGKILL cannot cut in half), fsync'd when `durable`. Object stores have no
    append: each line is one small object under ``<journal>.d/``, named in write order."""

    def __init__(self, store: ArtifactStore, path: str):
        self.store, self.path = store, path
        self._offset = 0  # local: bytes already read
        self._seen: set[str] = set()  # object store: objects already read
        self._prefix = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        self._seq = 0

    def exists(self) -> bool:
        if self.store.is_local:
            return os.path.exists(self.path)
        return bool(self.store.listdir(self.path + ".d"))

    def append(self, record: dict[str, Any], durable: bool) -> dict[str, Any] | None:
        """Write one line; returns the record when it must be applied by the caller (object store),
        None when `read_new` will see it (local file)."""
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        if not self.store.is_local:
            self._seq += 1
            name = f"{self._prefix}-{self._seq:08d}.json"
            self.store.write_bytes(f"{self.path}.d/{name}", data)
            self._seen.add(name)
            return record
        target = Path(self.path)
        created = not target.exists()
        if created:
            target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if created and durable and hasattr(os, "O_DIRECTORY"):
            dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)  # the new name survives a crash too
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return None

    def read_new(self) -> list[dict[str, Any]]:
        """The records written (by anyone) since the last call, in file order."""
        if not self.store.is_local:
            names = [n for n in self.store.listdir(self.path + ".d") if n not in self._seen]
            records = []
            for name in names:
                self._seen.add(name)
                records += self._parse(self.store.read_bytes(f"{self.path}.d/{name}"), name)
            return records
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1  # a line still being written is read next time
        self._offset += end
        return self._parse(chunk[:end], self.path)

    @staticmethod
    def _parse(chunk: bytes, where: str) -> list[dict[str, Any]]:
        records = []
        for number, line in enumerate(chunk.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                log.warning("%s: line %d of new records is not JSON; skipped", where, number)
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


class CostLedger:
    """Cumulative requests, tokens and dollars of one teacher on one data root, failed attempts
    included, kept write-ahead so that a crash never hides a request the provider may have billed.

    The truth is an append-only journal (``cost_ledger_<teacher>.journal.jsonl``): `begin` records
    an attempt's worst case (fsync'd) *before* its request leaves, `settle` replaces it with the real
    usage when the answer (or error) comes back, `add` books already-settled work (batch jobs). Every
    instance derives its totals by replaying the journal, so an attempt whose process was killed
    stays counted at its worst case for good (``unsettled_requests``), and an answer later received
    for the same item counts in ``possibly_paid_twice``. ``cost_ledger_<teacher>.json`` is a view of
    those totals (``requests``, ``input_tokens``, ``output_tokens``, ``cost_usd`` include unsettled
    attempts at their worst case), rewritten at most once a second while a run goes and at its end."""

    FIELDS = ("requests", "input_tokens", "output_tokens", "cost_usd")
    VIEW_INTERVAL_S = 1.0

    def __init__(self, store: ArtifactStore, teacher: str):
        self.store, self.teacher = store, teacher
        self.path = store.layout.cost_ledger(teacher)
        self.journal = _Journal(store, store.layout.cost_journal(teacher))
        self.run_id = uuid.uuid4().hex[:12]
        self._seq = 0
        self._settled = {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
        self._open: dict[str, dict[str, Any]] = {}  # attempt id → its start record, until settled
        self.possibly_paid_twice = 0
        self._view_at = 0.0
        if not self.journal.exists() and store.exists(self.path):
            # A ledger from before the journal: its totals become the journal's starting point.
            try:
                data = store.read_json(self.path)
            except (ValueError, OSError) as exc:
                raise ValueError(f"{self.path}: the cost ledger cannot be read ({exc}); fix or remove it") from None
            base = {k: data.get(k, 0) or 0 for k in self.FIELDS}
            self._append({"op": "base", **base, "possibly_paid_twice": data.get("possibly_paid_twice", 0)}, True)
        self._refresh()
        self.recovered_unsettled = self.unsettled_requests  # left by earlier (killed) runs
        self._write_view()

    # ---------------------------------------------------------------- replay
    def _append(self, record: dict[str, Any], durable: bool) -> None:
        direct = self.journal.append(record, durable)
        if direct is not None:
            self._apply(direct)
        self._refresh()

    def _refresh(self) -> None:
        for record in self.journal.read_new():
            self._apply(record)

    def _apply(self, r: dict[str, Any]) -> None:
        op, s = r.get("op"), self._settled
        if op == "start":
            self._open[str(r.get("id"))] = r
            return
        if op not in ("settle", "add", "base"):
            return
        if op == "settle":
            self._open.pop(str(r.get("id")), None)
        s["requests"] += int(r.get("requests", 1) if op != "settle" else 1)
        s["input_tokens"] += int(r.get("input_tokens", 0) or 0)
        s["output_tokens"] += int(r.get("output_tokens", 0) or 0)
        s["cost_usd"] = round(s["cost_usd"] + float(r.get("cost_usd", 0.0) or 0.0), 8)
        self.possibly_paid_twice += int(r.get("possibly_paid_twice", 0) or 0) if op == "base" else 0
        if op == "settle" and r.get("ok") and r.get("stem") is not None:
            # Attempts for this item that another run left unsettled may have been billed: this
            # answer may be the item's second paid one.
            for entry in self._open.values():
                if entry.get("stem") == r["stem"] and entry.get("run") != r.get("run") and not entry.get("_repaid"):
                    entry["_repaid"] = True
                    self.possibly_paid_twice += 1

    # ---------------------------------------------------------------- writing
    def begin(self, stem: str, worst_usd: float, input_tokens: int, output_tokens: int) -> str:
        """Record an attempt's worst case durably; call before its request is sent."""
        self._seq += 1
        attempt = f"{self.run_id}-{self._seq}"
        self._append(
            {
                "op": "start",
                "id": attempt,
                "run": self.run_id,
                "stem": stem,
                "cost_usd": round(worst_usd, 8),
                "input_tokens": int(input_tokens),
                "output_tokens": int(output_tokens),
                "at": round(time.time(), 3),
            },
            durable=True,
        )
        return attempt

    def settle(self, attempt: str, stem: str, usage: Usage | None, cost: float, ok: bool = False) -> None:
        """Replace a begun attempt's worst case by what it really cost (`ok`: an answer was stored).
        Not fsync'd: a settle line lost to a power cut leaves the worst case counted, never less."""
        self._append(
            {
                "op": "settle",
                "id": attempt,
                "run": self.run_id,
                "stem": stem,
                "input_tokens": usage.input_tokens if usage else 0,
                "output_tokens": usage.output_tokens if usage else 0,
                "cost_usd": round(cost, 8),
                "ok": bool(ok),
            },
            durable=False,
        )
        if time.monotonic() - self._view_at >= self.VIEW_INTERVAL_S:
            self._write_view()

    def add(self, usage: Usage | None, cost: float, requests: int = 1) -> None:
        """Book settled work at once (the batch runner's finished jobs)."""
        self._append(
            {
                "op": "add",
                "run": self.run_id,
                "requests": int(requests),
                "input_tokens": usage.input_tokens if usage else 0,
                "output_tokens": usage.output_tokens if usage else 0,
                "cost_usd": round(cost, 8),
            },
            durable=True,
        )
        self._write_view()

    def flush(self) -> None:
        """Bring the JSON view up to date (the end of a run)."""
        self._refresh()
        self._write_view()

    def _write_view(self) -> None:
        self._view_at = time.monotonic()
        self.store.write_json(self.path, self.view())

    # ---------------------------------------------------------------- reading
    def _unsettled(self) -> list[dict[str, Any]]:
        return [e for e in self._open.values() if e.get("run") != self.run_id]

    @property
    def unsettled_requests(self) -> int:
        """Attempts begun by other (killed, or still running) processes and never settled."""
        return len(self._unsettled())

    @property
    def totals(self) -> dict[str, Any]:
        """Settled usage plus every open attempt (in flight or orphaned) at its worst case."""
        t = dict(self._settled)
        for entry in self._open.values():
            t["requests"] += 1
            t["input_tokens"] += int(entry.get("input_tokens", 0))
            t["output_tokens"] += int(entry.get("output_tokens", 0))
            t["cost_usd"] += float(entry.get("cost_usd", 0.0))
        t["cost_usd"] = round(t["cost_usd"], 8)
        return t

    def view(self) -> dict[str, Any]:
        unsettled = self._unsettled()
        return {
            "teacher": self.teacher,
            **self.totals,
            "settled_requests": self._settled["requests"],
            "unsettled_requests": len(unsettled),
            "unsettled_cost_usd": round(sum(float(e.get("cost_usd", 0.0)) for e in unsettled), 8),
            "possibly_paid_twice": self.possibly_paid_twice,
            "journal": self.store.layout.cost_journal(self.teacher).rsplit("/", 1)[-1],
        }

    @property
    def spent(self) -> float:
        self._refresh()
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
    reasked: int = 0  # re-asks quoting a validation error
    larger_budget: int = 0  # attempts sent with a larger output budget
    fresh_asks: int = 0  # attempts sent again with the original messages
    unsettled_requests: int = 0  # in the ledger: attempts of killed runs, counted at their worst case
    recovered_unsettled: int = 0  # of those, found when this run started
    possibly_paid_twice: int = 0  # in the ledger: answers received for items with such an attempt
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
        # Per-provider limits, spacing, adaptive rate; its history lives in the data root (limits.py).
        self.limiter = limiter_for(teacher.name, teacher.remote, settings, store=store, sleep=sleep)
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
            self.store.layout.label_failures(self.teacher.name),
            {"teacher": self.teacher.name, "failures": dict(sorted(self._failures.items()))},
        )

    def _record_answer(
        self, item: LabelItem, key: str, result: ChatResult, outcome: ItemOutcome, started: float
    ) -> None:
        write_answer(
            self.store,
            self.teacher,
            item.stem,
            key,
            result,
            outcome,
            time.perf_counter() - started,
            item.prompt_version,
        )

    def _charge(self, outcome: ItemOutcome, usage: Usage | None, worst: float | None = None) -> float:
        """An attempt's cost on the item's own totals (before its answer is written with them).
        `worst`: the request may have been billed though no usage came back (a timeout)."""
        spent = cost_usd(self.price, usage.input_tokens, usage.output_tokens) if usage else 0.0
        if worst is not None:
            spent = max(spent, worst)
        outcome.cost_usd += spent
        if usage is not None:
            outcome.input_tokens += usage.input_tokens
            outcome.output_tokens += usage.output_tokens
        return spent

    def _settle(
        self,
        outcome: ItemOutcome,
        attempt: str,
        reserved: float,
        estimated_tokens: int,
        usage: Usage | None,
        spent: float,
        ok: bool = False,
    ) -> None:
        """Book one finished attempt: budget, limiter and the write-ahead ledger's settle line."""
        self.budget.settle(reserved, spent)
        self.limiter.settle(estimated_tokens, usage.input_tokens + usage.output_tokens if usage else 0)
        self.ledger.settle(attempt, outcome.stem, usage, spent, ok=ok)

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
        first_429: float | None = None
        invalid = truncated = 0  # answers of each kind so far (each escalates the next ask)
        answered = 0  # attempts that drew an answer or an error other than 429: the per-item cap
        error: LLMError | None = None
        while True:
            if self._stop:
                outcome.status, outcome.reason = "skipped", self._stop
                return outcome
            input_est = messages_tokens(messages)
            # Budget: the worst case of this attempt (a generous input estimate, the full output budget).
            worst = cost_usd(self.price, input_est * 3 // 2, max_tokens)
            if answered >= self.cfg.max_attempts_per_item:
                return self._fail(
                    outcome, "max_attempts", f"{answered} attempts (teachers.max_attempts_per_item); last: {error}"
                )
            if outcome.cost_usd + worst > self.cfg.max_item_cost_usd + 1e-12:
                return self._fail(
                    outcome,
                    "item_budget",
                    f"${outcome.cost_usd:.4f} spent, the next attempt may cost ${worst:.4f}: over "
                    f"teachers.max_item_cost_usd (${self.cfg.max_item_cost_usd:.2f}); last: {error}",
                )
            if not self.budget.reserve(worst):
                self._stop = self._stop or "budget"
                outcome.status, outcome.reason = "skipped", "budget"
                return outcome
            tokens = input_est + max_tokens
            await self.limiter.acquire(tokens)
            sent_at = self.limiter.now()
            outcome.attempts += 1
            self.summary.requests += 1
            # Write-ahead: the worst case is on disk before the request leaves.
            attempt = self.ledger.begin(item.stem, worst, input_est * 3 // 2, max_tokens)
            try:
                result = await self.teacher.answer(item, messages, max_tokens)
            except LLMError as exc:
                usage = getattr(exc, "usage", None)
                # A timed-out request may still be answered (and billed): count its worst case.
                spent = self._charge(outcome, usage, worst if isinstance(exc, ProviderTimeout) else None)
                self._settle(outcome, attempt, worst, tokens, usage, spent)
                error = exc
                if not isinstance(exc, RateLimitError):
                    answered += 1
            except Exception as exc:  # noqa: BLE001  (a bug or a broken local model: this item fails, the run goes on)
                self._settle(outcome, attempt, worst, tokens, None, self._charge(outcome, None))
                return self._fail(outcome, "error", f"{type(exc).__name__}: {exc}")
            except BaseException:
                # Cancelled mid-request: the provider may bill it, so its ledger entry stays open
                # (counted at the worst case); only this process's reservation is released.
                self.budget.settle(worst, worst)
                raise
            else:
                spent = self._charge(outcome, result.usage)
                if result.rate_limit is not None:
                    info = result.rate_limit
                    self.limiter.adopt(
                        info.limit_requests,
                        info.limit_tokens,
                        remaining_requests=info.remaining_requests,
                        remaining_tokens=info.remaining_tokens,
                    )
                outcome.status = "labeled"
                # The answer first, then the settle line: a kill in between leaves the attempt
                # counted at its worst case with its answer kept (never re-asked).
                self._record_answer(item, key, result, outcome, started)
                self._settle(outcome, attempt, worst, tokens, result.usage, spent, ok=True)
                return outcome

            if isinstance(error, RateLimitError):
                self.summary.rate_limited += 1
                rate_limited += 1
                first_429 = self.limiter.now() if first_429 is None else first_429
                # Slows the whole teacher down and pauses it (Retry-After, else from the window).
                self.limiter.rate_limited(error.retry_after, sent_at=sent_at)
                if rate_limit_exhausted(self.cfg, rate_limited, self.limiter.now() - first_429):
                    return self._fail(outcome, "rate_limited", str(error))
            elif isinstance(error, ServerError | ProviderTimeout | ConnectionFailed):
                if transient >= len(self.cfg.backoff_s):
                    return self._fail(outcome, _reason(error), str(error))
                delay = self.cfg.backoff_s[transient] * (1 + self.rng.uniform(0, 0.25))
                transient += 1
                await self.sleep(delay)
            elif isinstance(error, OutputTruncated):
                truncated += 1
                if truncated > self.cfg.max_truncated_attempts:
                    return self._fail(outcome, "truncated", str(error))
                messages, max_tokens = self._escalate(item, "truncated", truncated, messages, max_tokens, error)
            elif isinstance(error, InvalidOutput):
                invalid += 1
                if invalid > self.cfg.max_invalid_attempts:
                    return self._fail(outcome, "invalid_output", error.detail)
                messages, max_tokens = self._escalate(item, "invalid", invalid, messages, max_tokens, error)
            elif isinstance(error, Refusal):
                return self._fail(outcome, "refusal", str(error))
            elif isinstance(error, AuthError):
                self._stop = "auth"
                return self._fail(outcome, "auth", str(error))
            else:
                return self._fail(outcome, _reason(error), str(error))

    def _escalate(
        self, item: LabelItem, kind: str, n: int, messages: list[dict[str, str]], max_tokens: int, error: LLMError
    ) -> tuple[list[dict[str, str]], int]:
        """The next ask after the `n`-th invalid or cut-off answer of this item.

        invalid: 1st, a re-ask quoting the answer and its validation error; 2nd, the same with a
        larger output budget (a crowded answer breaks JSON too); then fresh asks, the original
        messages at that budget (a new sample, not anchored on a broken answer).
        truncated: a larger output budget each time (up to max_output_tokens_cap), the messages
        unchanged; at the cap, fresh asks with the original messages."""
        cap = self.cfg.max_output_tokens_cap
        larger = min(cap, max(max_tokens + 1, int(max_tokens * self.cfg.truncation_budget_factor)))
        s = self.summary
        if kind == "invalid" and n <= 2:
            reask = [
                *item.messages,
                {"role": "assistant", "content": (getattr(error, "text", "") or "")[:6000]},
                {"role": "user", "content": REASK.format(detail=getattr(error, "detail", str(error))[:1500])},
            ]
            s.reasked += 1
            if n == 2 and max_tokens < cap:
                s.larger_budget += 1
                return reask, larger
            return reask, max_tokens
        if kind == "truncated" and max_tokens < cap:
            s.larger_budget += 1
            return messages, larger
        s.fresh_asks += 1
        return list(item.messages), max_tokens

    def _fail(self, outcome: ItemOutcome, reason: str, detail: str) -> ItemOutcome:
        outcome.status, outcome.reason, outcome.detail = "failed", reason, detail[:500]
        return outcome

    # -------------------------------------------------------------- all items
    async def run(self, items: list[LabelItem]) -> TeacherRunSummary:
        start = time.perf_counter()
        self.ledger = CostLedger(self.store, self.teacher.name)
        if self.store.exists(self.store.layout.label_failures(self.teacher.name)):
            # Earlier failures stay listed until their item is labeled.
            self._failures = dict(self.store.read_json(self.store.layout.label_failures(self.teacher.name))["failures"])
        if self.ledger.recovered_unsettled:
            log.warning(
                "%s: %d request(s) of an interrupted run were never settled; counted at their worst case ($%.4f) in %s",
                self.teacher.name,
                self.ledger.recovered_unsettled,
                self.ledger.view()["unsettled_cost_usd"],
                self.ledger.path,
            )
        # Spent so far includes those: the cap holds across crashes.
        self.budget = Budget(self.cfg.budget_usd, self.ledger.spent)
        sem = asyncio.Semaphore(self.cfg.concurrency)
        self.summary.items = len(items)
        load_history(self.limiter)  # a restarted run goes on from its predecessor's window
        done = 0
        try:
            for coro in asyncio.as_completed([self._label(item, sem) for item in items]):
                outcome = await coro
                done += 1
                self._account(outcome)
                if self.on_progress:
                    self.on_progress(self.summary, done)
        finally:
            self.ledger.flush()
            self._write_failures()
            self.limiter.maybe_save(force=True)
            await self.teacher.aclose()
        s = self.summary
        s.stopped = self._stop
        s.total_spent_usd = round(self.ledger.spent, 6)
        s.unsettled_requests = self.ledger.unsettled_requests
        s.recovered_unsettled = self.ledger.recovered_unsettled
        s.possibly_paid_twice = self.ledger.possibly_paid_twice
        s.seconds = round(time.perf_counter() - start, 3)
        stems = {i.stem for i in items}
        s.failures = {k: v for k, v in sorted(self._failures.items()) if k in stems}
        s.unlabeled = sorted(s.failures)
        s.cost_usd = round(s.cost_usd, 6)
        self.store.write_json(self.store.layout.labeling_summary(self.teacher.name), s.as_dict())
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
