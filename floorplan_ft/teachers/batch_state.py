"""The batch job state machine of one teacher: which items to submit, the job record, polling jobs to
their end and ingesting their answers, then finishing the rest online (`BatchLabeling`).

Never paying twice:

- Job state lives in ``{data_root}/batches/{teacher}.json`` (id, created_at, item stems with their
  cache keys, input file id, status, reserved worst-case cost). A job is recorded *before* it is
  created at the provider, with a random token in its metadata (OpenAI) / display name (Gemini); if
  a run dies between creating and recording the id, the next run finds the job by its token in the
  provider's job list instead of submitting again.
- A rerun first polls the jobs it knows. Items with a cached answer (same key as online: provider,
  model, parameters, prompt, schema) are never submitted; items waiting in a running job with the
  same key are not submitted again; items whose key changed (new prompt) are submitted anew and the
  old job's answer for them is discarded (still booked: it was billed).

Answers are written with `labeling.write_answer`, so answer files and sidecars are the same as
online ones and the online cache and phase 4 see no difference. Every line's tokens are booked in
the teacher's `CostLedger` at ``teachers.batch_discount`` × the price table.

Failures are finished online by `LabelingRun` (with all of its retry rules): invalid or truncated
answers, errored lines, and the items an expired, cancelled or failed job did not answer. Refusals
and content-filter stops are not sent again in the same run (the online policy: no retry); they go to
the failure ledger like online refusals (a later run retries failed items, as online reruns do).

Budget: before a job is submitted its worst case (each item's generous input estimate and full
output budget, at the discount) is reserved against ``teachers.budget_usd`` minus what the ledger
has spent and what running jobs have reserved; items that do not fit are not submitted (listed as
skipped for budget). The online finish gets the cap minus the reservations of still-running jobs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from floorplan_ft.prompts import PROMPT_VERSION
from floorplan_ft.providers.base import (
    AuthError,
    BadRequest,
    ConnectionFailed,
    LLMError,
    ProviderTimeout,
    RateLimitError,
    ServerError,
    Usage,
    redact,
)
from floorplan_ft.settings import TeacherSettings
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.batch_runners import (
    BatchRunner,
    JobView,
    LineResult,
    custom_id,
    split_custom_id,
    valid_job_id,
)
from floorplan_ft.teachers.labeling import (
    Budget,
    CostLedger,
    ItemOutcome,
    LabelingRun,
    LabelItem,
    LLMTeacher,
    cached_answer,
    cost_usd,
    item_key,
    messages_tokens,
    write_answer,
)

log = logging.getLogger(__name__)

STATE_VERSION = 2
# Reasons that are final for this run (the online engine does not retry them either).
NO_RETRY = frozenset({"refusal"})
# Error lines for requests a job never ran (OpenAI lists them in the error file).
NOT_RUN = frozenset({"expired", "cancelled"})


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------ outcome


@dataclass
class BatchOutcome:
    teacher: str
    provider: str
    model: str
    status: str = "done"  # done | pending (jobs still running or items queued: a rerun goes on)
    items: int = 0
    cached: int = 0  # answered before this run
    labeled: int = 0  # answers written from batch results in this run
    submitted: int = 0  # items sent in jobs created by this run
    jobs_submitted: list[str] = field(default_factory=list)
    jobs_pending: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # items in jobs still running
    queued: list[str] = field(default_factory=list)  # not yet submitted: waiting for room under the
    # enqueued-token limit (or for a refused create to be tried again); a rerun submits them
    failed: dict[str, dict] = field(default_factory=dict)  # batch failures of this run, per item
    submissions_failed: list[dict] = field(default_factory=list)  # uploads / creates that made no job
    finished_online: list[str] = field(default_factory=list)  # handed to LabelingRun (or to hand,
    # with finish_online=False): failed lines and items an ended job did not answer
    skipped_budget: list[str] = field(default_factory=list)
    cost_usd: float = 0.0  # batch lines booked in this run (discounted)
    reserved_usd: float = 0.0  # worst case of the jobs still running (not in the ledger yet)
    total_spent_usd: float = 0.0
    budget_usd: float = 0.0
    record_problem: str | None = None  # the job record was unusable: what was wrong, what was done
    online: dict[str, Any] | None = None  # the online finish's TeacherRunSummary
    unlabeled: list[str] = field(default_factory=list)  # no answer and not waiting
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _state_problem(data: Any) -> str | None:
    """What makes a job record unusable, or None."""
    if not isinstance(data, dict):
        return "not a JSON object"
    jobs = data.get("jobs")
    if not isinstance(jobs, list):
        return "'jobs' is missing or not a list"
    for i, job in enumerate(jobs):
        where = f"jobs[{i}]"
        if not isinstance(job, dict):
            return f"{where} is not an object"
        if not valid_job_id(job.get("token")):
            return f"{where} has no token"
        if job.get("id") is not None and not valid_job_id(job.get("id")):
            return f"{where}: id {str(job.get('id'))[:40]} is not a job id"
        items = job.get("items")
        if not isinstance(items, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in items.items()):
            return f"{where}: 'items' is not a map of plan to cache key"
        try:
            datetime.fromisoformat(str(job.get("created_at")))
        except ValueError:
            return f"{where}: created_at {str(job.get('created_at'))[:40]!r} is not a time"
        reserved = job.get("reserved_usd", 0.0)
        if isinstance(reserved, bool) or not isinstance(reserved, int | float):
            return f"{where}: reserved_usd is not a number"
        if job.get("ingested_at") is not None and not isinstance(job.get("ingested_at"), str):
            return f"{where}: ingested_at is not a time"
    if not isinstance(data.get("submissions_failed", []), list):
        return "'submissions_failed' is not a list"
    return None


# ------------------------------------------------------------------------------ the run

# Failures after which the items go into a later job instead of online (the provider's
# enqueued-token limit: room comes back when earlier jobs finish), at most MAX_REQUEUES times a run.
REQUEUE = frozenset({"token_limit"})
MAX_REQUEUES = 2
SUCCEEDED = frozenset({"completed", "JOB_STATE_SUCCEEDED", "JOB_STATE_PARTIALLY_SUCCEEDED"})


class BatchLabeling:
    """Submit, poll and ingest batch jobs of one teacher, then finish the rest online."""

    def __init__(
        self,
        teacher: LLMTeacher,
        runner: BatchRunner,
        store: ArtifactStore,
        settings: TeacherSettings,
        *,
        poll_interval_s: float = 60.0,
        max_wait_s: float = 25 * 3600.0,
        finish_online: bool = True,
        max_enqueued_tokens: int | None = None,
        on_progress: Callable[[BatchOutcome], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.teacher = teacher
        self.runner = runner
        self.store = store
        self.cfg = settings
        self.price = settings.prices.get(teacher.model)
        self.discount = settings.batch_discount
        self.poll_interval_s = poll_interval_s
        self.max_wait_s = max_wait_s
        self.finish_online = finish_online
        self.max_enqueued = max_enqueued_tokens or (
            settings.batch_max_enqueued_tokens_gemini
            if runner.provider == "gemini"
            else settings.batch_max_enqueued_tokens
        )
        self.on_progress = on_progress
        self.sleep = sleep
        self.path = store.layout.batch_state(teacher.name)
        self.outcome = BatchOutcome(teacher.name, teacher.provider, teacher.model, budget_usd=settings.budget_usd)
        self.queue: deque[LabelItem] = deque()  # to submit, in order
        self.deferred: list[LabelItem] = []  # to submit again at the next poll (a refused create)
        self.online: list[str] = []  # to finish online
        self.requeues: dict[str, int] = {}
        self._mine: set[str] = set()  # tokens of the submissions of this run
        self._blocked = False

    # -------------------------------------------------------------- state
    def _load(self) -> tuple[dict[str, Any] | None, str | None]:
        empty = {"version": STATE_VERSION, "teacher": self.teacher.name, "jobs": [], "submissions_failed": []}
        if not self.store.exists(self.path):
            return empty, None
        try:
            data = self.store.read_json(self.path)
        except (ValueError, OSError) as exc:
            return None, f"not readable as JSON ({type(exc).__name__}: {redact(str(exc))[:200]})"
        problem = _state_problem(data)
        if problem is not None:
            return None, problem
        data.setdefault("submissions_failed", [])
        return data, None

    def _save(self) -> None:
        self.store.write_json(self.path, self.state)

    def _active(self) -> list[dict[str, Any]]:
        return [j for j in self.state["jobs"] if j.get("ingested_at") is None]

    def _reserved(self) -> float:
        return sum(float(j.get("reserved_usd") or 0.0) for j in self._active())

    def _enqueued(self) -> int:
        return sum(int(j.get("enqueued_tokens") or 0) for j in self._active())

    def _tokens(self, item: LabelItem) -> int:
        """An item's enqueued tokens, estimated like the online engine: prompt + expected output."""
        return messages_tokens(item.messages) + self.cfg.expected_output_tokens

    def _items_from_ids(self, ids: list[str]) -> dict[str, str]:
        """A job's plan → key map from its lines' custom ids: the current key where the prefix
        matches it, else the prefix (an answer for an older prompt: booked, never written)."""
        items: dict[str, str] = {}
        for cid in ids:
            stem, prefix = split_custom_id(cid)
            if stem and prefix:
                current = self.keys.get(stem, "")
                items[stem] = current if current.startswith(prefix) else prefix
        return items

    # -------------------------------------------------------------- main
    async def run(self, items: list[LabelItem]) -> BatchOutcome:
        start = time.monotonic()
        o = self.outcome
        o.items = len(items)
        self.items = {item.stem: item for item in items}
        self.keys = {item.stem: item_key(self.teacher, item.messages, self.cfg.max_output_tokens) for item in items}
        self.ledger = CostLedger(self.store, self.teacher.name)
        state, problem = self._load()
        closed = False
        o.cached = sum(
            cached_answer(self.store, item.stem, self.teacher.name, self.keys[item.stem]) is not None for item in items
        )
        try:
            if state is None:
                state = await self._rebuild(str(problem))
            if state is None:
                o.status = "pending"  # nothing can be decided safely: the next run tries again
            else:
                self.state = state
                await self._run_jobs(items, start)
                closed = await self._finish()
        finally:
            await self.runner.aclose()
            if not closed:
                await self.teacher.aclose()
        o.cost_usd = round(o.cost_usd, 6)
        o.total_spent_usd = round(CostLedger(self.store, self.teacher.name).spent, 6)
        waiting = set(o.waiting) | set(o.queued)
        o.unlabeled = sorted(
            s
            for s in self.items
            if s not in waiting and cached_answer(self.store, s, self.teacher.name, self.keys[s]) is None
        )
        o.seconds = round(time.monotonic() - start, 3)
        return o

    async def _run_jobs(self, items: list[LabelItem], start: float) -> None:
        await self._recover()
        await self._poll_all()
        self._classify(items)
        await self._submit_ready()
        self._progress()
        while (self._active() or self.queue or self.deferred) and (
            remaining := self.max_wait_s - (time.monotonic() - start)
        ) > 0:
            await self.sleep(min(self.poll_interval_s, remaining))
            self.queue.extend(self.deferred)
            self.deferred.clear()
            await self._recover()
            await self._poll_all()
            if self._blocked and not any(j.get("items_unknown") for j in self._active()):
                self._classify(items)
            await self._submit_ready()
            self._progress()

    async def _finish(self) -> bool:
        """Report what is still running; finish the rest online. True when the teacher was handed
        to `LabelingRun` (which closes it)."""
        o = self.outcome
        active = self._active()
        o.jobs_pending = [j["id"] or f"token:{j['token']}" for j in active]
        waiting = {stem for j in active for stem, key in j["items"].items() if self.keys.get(stem) == key}
        o.waiting = sorted(waiting)
        o.queued = sorted({item.stem for item in [*self.queue, *self.deferred]} - waiting)
        o.reserved_usd = round(self._reserved(), 6)
        o.status = "pending" if active or o.queued else "done"
        queued = set(o.queued)
        online_items = [
            self.items[s]
            for s in dict.fromkeys(self.online)
            if s in self.items
            and s not in waiting
            and s not in queued
            and cached_answer(self.store, s, self.teacher.name, self.keys[s]) is None
        ]
        o.finished_online = [item.stem for item in online_items]
        if not (online_items and self.finish_online):
            return False
        reserved = self._reserved()
        cfg = self.cfg.model_copy(update={"budget_usd": max(0.0, self.cfg.budget_usd - reserved)})
        log.info("%s: finishing %d item(s) online", self.teacher.name, len(online_items))
        summary = await LabelingRun(self.teacher, self.store, cfg).run(online_items)
        o.online = summary.as_dict()
        return True

    def _progress(self) -> None:
        if self.on_progress:
            self.on_progress(self.outcome)

    def _to_online(self, stem: str, reason: str, detail: str, job_id: str | None = None, cost: float = 0.0) -> None:
        entry = {"reason": reason, "detail": detail[:500], "cost_usd": round(cost, 6)}
        if job_id:
            entry["job"] = job_id
        self.outcome.failed[stem] = entry
        self.online.append(stem)

    # -------------------------------------------------------------- a record that cannot be read
    async def _rebuild(self, problem: str) -> dict[str, Any] | None:
        """The job record is unusable: adopt this teacher's jobs from the provider's list (matched
        by their metadata / display name) so nothing is submitted twice. None when the list cannot
        be read (then nothing is submitted or sent online; the record is left as it is)."""
        o, teacher = self.outcome, self.teacher.name
        o.record_problem = f"{self.path}: {problem}"
        log.error(
            "%s: the batch job record %s is unusable (%s); looking up this teacher's jobs at the "
            "provider before submitting anything",
            teacher,
            self.path,
            problem,
        )
        try:
            views = await self.runner.list_jobs(teacher)
        except LLMError as exc:
            o.record_problem += f"; the provider's job list could not be read ({exc}): nothing submitted"
            log.error(
                "%s: cannot list the provider's batch jobs (%s): nothing is submitted or labeled "
                "online until a run can; %s is left as it is",
                teacher,
                exc,
                self.path,
            )
            return None
        jobs = []
        for view in views:
            if not valid_job_id(view.id):
                continue
            try:
                ids = await self.runner.job_items(view)
            except LLMError:
                ids = None
            job_items = self._items_from_ids(ids) if ids is not None else {}
            current = [self.items[s] for s, k in job_items.items() if s in self.items and self.keys[s] == k]
            jobs.append(
                {
                    "id": view.id,
                    "token": view.token,
                    "teacher": teacher,
                    "provider": self.runner.provider,
                    "model": self.teacher.model,
                    "created_at": _now_iso(),
                    "status": view.state if view.state in self.runner.states else "submitted",
                    "input_file_id": view.input_file_id if valid_job_id(view.input_file_id) else None,
                    "max_tokens": self.cfg.max_output_tokens,
                    "reserved_usd": round(sum(self._worst_case(i) for i in current), 8),
                    "enqueued_tokens": sum(self._tokens(i) for i in current),
                    "items": job_items,
                    "items_unknown": ids is None,
                    "recovered": True,
                    "ingested_at": None,
                }
            )
        backup = f"{self.path}.corrupt-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
        try:
            self.store.write_bytes(backup, self.store.read_bytes(self.path))
        except OSError as exc:
            backup = f"(not kept: {exc})"
        state = {
            "version": STATE_VERSION,
            "teacher": teacher,
            "jobs": jobs,
            "submissions_failed": [],
            "rebuilt": {"at": _now_iso(), "problem": problem, "old_record": backup},
        }
        self.state = state
        self._save()
        live = sum(1 for j in jobs if j["status"] not in self.runner.terminal)
        o.record_problem += (
            f"; rebuilt from the provider's list: {len(jobs)} job(s) adopted ({live} running), "
            f"the old record kept as {backup}"
        )
        log.warning(
            "%s: rebuilt %s from the provider's job list: %d job(s) adopted (%d running); the "
            "unusable record is kept as %s",
            teacher,
            self.path,
            len(jobs),
            live,
            backup,
        )
        return state

    # -------------------------------------------------------------- classify and submit
    def _classify(self, items: list[LabelItem]) -> None:
        active = self._active()
        self._blocked = any(j.get("items_unknown") for j in active)
        if self._blocked:
            log.warning(
                "%s: a running job adopted from the provider has items not known yet: nothing new "
                "is submitted until it ends",
                self.teacher.name,
            )
            return
        active_keys: dict[str, set[str]] = {}
        for job in active:
            for stem, key in job["items"].items():
                active_keys.setdefault(stem, set()).add(key)
        last_failed: dict[str, tuple[str | None, str | None]] = {}  # stem -> (key, reason), newest last
        for job in self.state["jobs"]:
            if job.get("ingested_at") is not None:
                for stem, failure in (job.get("failed") or {}).items():
                    last_failed[stem] = (job["items"].get(stem), (failure or {}).get("reason"))
        for record in self.state.get("submissions_failed") or []:
            if isinstance(record, dict) and isinstance(record.get("items"), dict):
                for stem, key in record["items"].items():
                    last_failed[stem] = (key, record.get("reason"))
        taken = {i.stem for i in [*self.queue, *self.deferred]} | set(self.online)
        for item in items:
            key = self.keys[item.stem]
            if item.stem in taken or cached_answer(self.store, item.stem, self.teacher.name, key) is not None:
                continue
            if key in active_keys.get(item.stem, ()):
                continue  # waiting in a running job
            failed_key, reason = last_failed.get(item.stem, (None, None))
            if failed_key == key and reason not in REQUEUE:
                self.online.append(item.stem)  # the batch already tried: finish online
                continue
            self.queue.append(item)

    def _worst_case(self, item: LabelItem) -> float:
        # The online engine's worst case of one attempt, at the batch discount.
        return cost_usd(self.price, messages_tokens(item.messages) * 3 // 2, self.cfg.max_output_tokens, self.discount)

    async def _submit_ready(self) -> None:
        """Submit queued items in jobs as long as they fit under the enqueued-token limit."""
        while self.queue:
            chunk = self._take_chunk(self.max_enqueued - self._enqueued())
            if not chunk:
                if self.queue and not self._active():
                    # Nothing running and still no room: the estimate of what is enqueued is stale.
                    log.warning(
                        "%s: no room under batch_max_enqueued_tokens (%d) with no job running",
                        self.teacher.name,
                        self.max_enqueued,
                    )
                return
            await self._submit_job(chunk)

    def _take_chunk(self, room: int) -> list[tuple[LabelItem, float, Any, int]]:
        """The next job's items from the queue: within the provider's request, byte and
        enqueued-token limits and the budget."""
        budget = Budget(self.cfg.budget_usd, self.ledger.spent + self._reserved())
        chunk: list[tuple[LabelItem, float, Any, int]] = []
        size = tokens = 0
        while self.queue:
            item = self.queue[0]
            need = self._tokens(item)
            if need > self.max_enqueued:
                self.queue.popleft()
                self._to_online(
                    item.stem,
                    "too_large_for_batch",
                    f"about {need} tokens: more than batch_max_enqueued_tokens ({self.max_enqueued})",
                )
                continue
            if tokens + need > room or len(chunk) >= self.runner.max_requests:
                break
            key = self.keys[item.stem]
            line = self.runner.build_line(
                custom_id(item.stem, key), item, self.cfg.max_output_tokens, self.teacher.temperature
            )
            line_size = self.runner.line_size(line)
            if chunk and size + line_size > self.runner.max_bytes:
                break
            worst = self._worst_case(item)
            if not budget.reserve(worst):
                skipped = [it.stem for it in self.queue]
                self.queue.clear()
                self.outcome.skipped_budget += skipped
                self._record_failures(
                    {
                        s: {
                            "reason": "budget",
                            "detail": "skipped: the batch would exceed the budget",
                            "attempts": 0,
                            "cost_usd": 0.0,
                        }
                        for s in skipped
                    }
                )
                log.warning(
                    "%s: %d item(s) not submitted: the budget cap ($%.2f) would be exceeded",
                    self.teacher.name,
                    len(skipped),
                    self.cfg.budget_usd,
                )
                break
            self.queue.popleft()
            chunk.append((item, worst, line, need))
            size += line_size
            tokens += need
        return chunk

    async def _submit_job(self, chunk: list[tuple[LabelItem, float, Any, int]]) -> None:
        teacher = self.teacher.name
        job: dict[str, Any] = {
            "id": None,
            "token": uuid.uuid4().hex,
            "teacher": teacher,
            "provider": self.runner.provider,
            "model": self.teacher.model,
            "created_at": _now_iso(),
            "status": "submitting",
            "input_file_id": None,
            "max_tokens": self.cfg.max_output_tokens,
            "reserved_usd": round(sum(worst for _, worst, _, _ in chunk), 8),
            "enqueued_tokens": sum(need for _, _, _, need in chunk),
            "items": {item.stem: self.keys[item.stem] for item, _, _, _ in chunk},
            "ingested_at": None,
        }
        lines = [line for _, _, line, _ in chunk]
        # On record (with its token) before anything can exist at the provider: a run that dies
        # after the create finds the job by that token instead of submitting again.
        self.state["jobs"].append(job)
        self._mine.add(job["token"])
        self._save()
        try:
            await self.runner.upload(job, lines)
        except Exception as exc:  # noqa: BLE001  (no job can exist yet: these items go online)
            self._submission_failed(job, "upload_failed", f"the upload failed: {redact(str(exc))[:300]}")
            return
        self._save()
        try:
            view = await self.runner.create(job, lines)
        except (BadRequest, AuthError) as exc:  # refused: the provider made no job
            self._submission_failed(job, "create_refused", f"the create was refused: {exc}")
            return
        except RateLimitError as exc:  # refused for now (Gemini answers 429 over its enqueued-token quota)
            self._lower_limit(job)
            self._submission_failed(job, "token_limit", f"the create was refused for now: {exc}", requeue=True)
            return
        except Exception as exc:  # noqa: BLE001  (5xx, timeout, an unreadable reply: the job may exist)
            log.warning(
                "%s: creating a batch failed (%s); it may exist: looking it up by its token",
                teacher,
                redact(str(exc))[:300],
            )
            await self._resolve(job, "create_failed")
            return
        problem = self.runner.reply_problem(view)
        if not valid_job_id(view.id):
            log.warning(
                "%s: the create reply is unusable (%s): not recorded as a job; looking it up by its token",
                teacher,
                problem,
            )
            await self._resolve(job, "no_job_id")
            return
        self._adopt(job, view, "create reply")

    def _adopt(self, job: dict[str, Any], view: JobView, where: str) -> None:
        """Record a job with a usable id (it exists: it is polled to its end, never resubmitted)."""
        job["id"] = view.id
        problem = self.runner.reply_problem(view)
        job["status"] = view.state if problem is None else "submitted"
        self._save()
        if problem:
            log.warning(
                "%s: the %s for batch %s has %s: kept (the job exists) and polled until it reports a known state",
                self.teacher.name,
                where,
                view.id,
                problem,
            )
        if job["token"] in self._mine:
            self.outcome.submitted += len(job["items"])
            self.outcome.jobs_submitted.append(view.id)
            log.info(
                "%s: submitted batch %s with %d item(s) (~%d tokens enqueued)",
                self.teacher.name,
                view.id,
                len(job["items"]),
                job.get("enqueued_tokens", 0),
            )
        else:
            log.info("%s: found batch %s created by an interrupted run", self.teacher.name, view.id)

    async def _resolve(self, job: dict[str, Any], reason: str) -> None:
        """A submission whose job id is not known: adopt the job the provider lists under its token,
        or, when the provider lists none, count it as never made (its items go online)."""
        try:
            found = await self.runner.find(job)
        except Exception as exc:  # noqa: BLE001  (cannot tell: its items wait, never resubmitted)
            job["lookup_error"] = redact(str(exc))[:300]
            self._save()
            log.warning(
                "%s: cannot look up submission %s yet (%s): its %d item(s) wait (neither resubmitted nor "
                "sent online); looked up again at the next poll and by a rerun",
                self.teacher.name,
                job["token"],
                redact(str(exc))[:300],
                len(job["items"]),
            )
            return
        if found is not None and valid_job_id(found.id):
            job.pop("lookup_error", None)
            self._adopt(job, found, "job list")
            return
        detail = (
            "the provider lists no job with this submission's token"
            if found is None
            else "the provider lists the job without an id (it cannot be polled)"
        )
        if found is not None:
            log.error(
                "%s: submission %s exists at the provider without an id: it may be billed without being read",
                self.teacher.name,
                job["token"],
            )
        self._submission_failed(job, reason, detail)

    def _lower_limit(self, job: dict[str, Any]) -> None:
        """The provider refused a job for its enqueued-token limit: it is below what we assumed.
        Use less for the rest of this run: what else was enqueued plus this job, less one token;
        half this job when nothing else was (items larger than that are finished online)."""
        others = self._enqueued() - (int(job.get("enqueued_tokens") or 0) if job in self._active() else 0)
        size = int(job.get("enqueued_tokens") or 0)
        lower = others + size - 1 if others > 0 else size // 2
        if 0 < lower < self.max_enqueued:
            log.warning(
                "%s: the provider's enqueued-token limit is below %d (a job of ~%d tokens was refused "
                "with ~%d enqueued): using %d for the rest of this run; set teachers.%s to the "
                "account's limit",
                self.teacher.name,
                self.max_enqueued,
                size,
                others,
                lower,
                "batch_max_enqueued_tokens_gemini" if self.runner.provider == "gemini" else "batch_max_enqueued_tokens",
            )
            self.max_enqueued = lower

    def _submission_failed(self, job: dict[str, Any], reason: str, detail: str, requeue: bool = False) -> None:
        """An upload or create that made no usable job: dropped from the jobs (never polled, nothing
        reserved), kept under ``submissions_failed``; its items go online or into a later job."""
        self.state["jobs"].remove(job)
        record = {
            "token": job["token"],
            "at": _now_iso(),
            "reason": reason,
            "detail": detail[:500],
            "items": job["items"],
            "input_file_id": job.get("input_file_id"),
        }
        self.state["submissions_failed"] = [*(self.state.get("submissions_failed") or []), record][-50:]
        self._save()
        self.outcome.submissions_failed.append({"reason": reason, "detail": detail[:500], "items": len(job["items"])})
        later = []
        for stem, key in job["items"].items():
            if self.keys.get(stem) != key:
                continue
            if requeue and self.requeues.get(stem, 0) < MAX_REQUEUES:
                self.requeues[stem] = self.requeues.get(stem, 0) + 1
                self.deferred.append(self.items[stem])
                later.append(stem)
            else:
                self._to_online(stem, reason, detail)
        log.warning(
            "%s: batch submission of %d item(s) made no job (%s: %s): %d to submit again later, %d to finish online",
            self.teacher.name,
            len(job["items"]),
            reason,
            detail[:200],
            len(later),
            len(job["items"]) - len(later),
        )

    async def _recover(self) -> None:
        """Submissions recorded without a job id (a run died creating them, or a lookup failed):
        adopt the job the provider lists under their token, or count them as never made."""
        for job in self._active():
            if not job.get("id"):
                await self._resolve(job, "not_created")

    # -------------------------------------------------------------- poll and ingest
    async def _poll_all(self) -> None:
        for job in self._active():
            if not job.get("id"):
                continue
            try:
                view = await self.runner.poll(job)
                if view.state not in self.runner.states:
                    log.warning(
                        "%s: batch %s reports an unknown state %r: still waiting for it",
                        self.teacher.name,
                        job["id"],
                        str(view.state)[:60],
                    )
                    continue
                job["status"] = view.state
                if view.state in self.runner.terminal:
                    await self._ingest(job, await self.runner.results(job))
            except (RateLimitError, ServerError, ProviderTimeout, ConnectionFailed) as exc:
                log.warning("%s: polling batch %s failed (%s); trying again later", self.teacher.name, job["id"], exc)
            except BadRequest as exc:
                if exc.status != 404:
                    log.warning(
                        "%s: polling batch %s was refused (%s); trying again later", self.teacher.name, job["id"], exc
                    )
                    continue
                # The provider no longer knows the job (deleted): its items are finished online.
                log.warning("%s: batch %s not found at the provider", self.teacher.name, job["id"])
                job["status"] = "not_found"
                await self._ingest(job, [])
        self._save()

    async def _ingest(self, job: dict[str, Any], lines: list[LineResult]) -> None:
        teacher = self.teacher.name
        if job.get("items_unknown"):
            job["items"] = self._items_from_ids([line.custom_id for line in lines if line.custom_id])
            job["items_unknown"] = False
        elapsed = max(0.0, time.time() - datetime.fromisoformat(job["created_at"]).timestamp())
        input_tokens = output_tokens = 0
        cost = 0.0
        requests = 0
        answered: set[str] = set()
        failed: dict[str, dict] = {}
        labeled: list[str] = []
        usable = 0
        for line in lines:
            stem, prefix = split_custom_id(line.custom_id or "")
            job_key = job["items"].get(stem)
            known = job_key is not None and bool(prefix) and job_key.startswith(prefix)
            usable += line.result is not None and known
            # An adopted job (rebuilt record) may have been read before: its lines with an answer on
            # disk were booked then.
            booked_before = (
                bool(job.get("recovered")) and known and cached_answer(self.store, stem, teacher, job_key) is not None
            )
            line_cost = 0.0
            if line.usage is not None:
                line_cost = cost_usd(self.price, line.usage.input_tokens, line.usage.output_tokens, self.discount)
            if not booked_before:
                requests += line.reason not in NOT_RUN  # lines the provider never ran are no requests
                if line.usage is not None:
                    input_tokens += line.usage.input_tokens
                    output_tokens += line.usage.output_tokens
                cost += line_cost
            if not known:
                log.warning(
                    "%s: batch %s returned an unusable row (%s)",
                    teacher,
                    job["id"],
                    line.detail or f"unknown custom_id {str(line.custom_id)[:80]!r}",
                )
                continue
            answered.add(stem)
            if line.result is None:
                failed[stem] = {"reason": line.reason, "detail": line.detail, "cost_usd": round(line_cost, 6)}
                continue
            current = self.keys.get(stem)
            if current is not None and current != job_key:
                continue  # the prompt changed since: superseded (but billed)
            if current is None and self.store.exists(self.store.layout.analysis_meta(stem, teacher)):
                continue  # not ours to overwrite
            if cached_answer(self.store, stem, teacher, job_key) is not None:
                continue  # written by an earlier, interrupted ingest
            usage = line.usage or Usage()
            write_answer(
                self.store,
                self.teacher,
                stem,
                job_key,
                line.result,
                ItemOutcome(
                    stem,
                    "labeled",
                    attempts=1,
                    cost_usd=line_cost,
                    input_tokens=usage.input_tokens,
                    output_tokens=usage.output_tokens,
                ),
                elapsed,
                getattr(self.items.get(stem), "prompt_version", PROMPT_VERSION),
            )
            labeled.append(stem)
        status = job.get("status")
        if status in SUCCEEDED and job["items"] and usable == 0:
            log.warning(
                "%s: batch %s reported %s but none of its %d row(s) was usable: its items are finished online",
                teacher,
                job["id"],
                status,
                len(lines),
            )
            job["unusable"] = True
        gone = {
            "expired": "expired",
            "cancelled": "cancelled",
            "failed": "job_failed",
            "JOB_STATE_EXPIRED": "expired",
            "JOB_STATE_CANCELLED": "cancelled",
            "JOB_STATE_FAILED": "job_failed",
        }.get(status, "missing")
        if gone == "job_failed" and "token_limit_exceeded" in (job.get("error_codes") or []):
            gone = "token_limit"  # OpenAI's enqueued-token limit: room comes back as jobs finish
            self._lower_limit(job)
        for stem in job["items"]:
            if stem not in answered:
                detail = f"batch {job['id']} ended {status} without an answer"
                if job.get("errors"):
                    detail += ": " + "; ".join(job["errors"])[:300]
                failed[stem] = {"reason": gone, "detail": detail, "cost_usd": 0.0}

        # Answers are on disk; now book the job once, then mark it ingested.
        if requests or cost:
            self.ledger.add(Usage(input_tokens=input_tokens, output_tokens=output_tokens), cost, requests=requests)
        job.update(
            ingested_at=_now_iso(),
            reserved_usd=0.0,
            failed=failed,
            labeled=len(labeled),
            cost_usd=round(cost, 6),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
        )
        self._save()

        o = self.outcome
        o.labeled += sum(1 for s in labeled if s in self.items)
        o.cost_usd += cost
        mine = {s: f for s, f in failed.items() if self.keys.get(s) == job["items"][s]}
        later = 0
        for stem, failure in mine.items():
            if failure["reason"] in REQUEUE and self.requeues.get(stem, 0) < MAX_REQUEUES:
                self.requeues[stem] = self.requeues.get(stem, 0) + 1
                self.deferred.append(self.items[stem])
                later += 1
                continue
            o.failed[stem] = {**failure, "job": job["id"]}
            if failure["reason"] not in NO_RETRY:
                self.online.append(stem)
        self._record_failures(
            {
                s: {"reason": f["reason"], "detail": f["detail"], "attempts": 1, "cost_usd": f["cost_usd"]}
                for s, f in mine.items()
                if f["reason"] in NO_RETRY
            },
            labeled=labeled,
        )
        log.info(
            "%s: batch %s ended %s: %d labeled, %d to submit again, %d to finish online",
            teacher,
            job["id"],
            status,
            len(labeled),
            later,
            sum(1 for s, f in mine.items() if f["reason"] not in NO_RETRY) - later,
        )

    def _record_failures(self, add: dict[str, dict], labeled: list[str] = ()) -> None:
        """The teacher's failure ledger (shared with the online engine): add final failures, drop
        items now labeled."""
        if not add and not labeled:
            return
        path = self.store.layout.label_failures(self.teacher.name)
        data = self.store.read_json(path) if self.store.exists(path) else {"teacher": self.teacher.name, "failures": {}}
        failures = dict(data.get("failures") or {})
        for stem in labeled:
            failures.pop(stem, None)
        failures.update(add)
        self.store.write_json(path, {"teacher": self.teacher.name, "failures": dict(sorted(failures.items()))})
