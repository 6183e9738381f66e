"""`ft-pipeline estimate`: tokens, dollars and hours per teacher before any call is made."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from floorplan_ft.settings import Settings
from floorplan_ft.teachers.factory import teacher_model
from floorplan_ft.teachers.labeling import cost_usd, messages_tokens
from floorplan_ft.teachers.limits import UNLIMITED, teacher_limits

# DOMAIN.md: ~3K input tokens per item from the plan; one answer takes ~20 s.
PLAN_INPUT_TOKENS = 3000
SECONDS_PER_ANSWER = 20.0


@dataclass
class TeacherEstimate:
    teacher: str
    model: str
    items: int
    input_tokens_per_item: int
    output_tokens_per_item: int
    input_tokens_source: str
    usd_online: float | None
    usd_batch: float | None
    items_per_minute: float
    limited_by: str
    hours: float
    budget_usd: float
    over_budget: bool

    def as_dict(self) -> dict:
        return asdict(self)


def estimate_teacher(settings: Settings, name: str, items: int, input_tokens: int | None = None) -> TeacherEstimate:
    t = settings.teachers
    model = teacher_model(settings, name)
    free = name in ("reference", "local")
    price = None if free else t.prices.get(model)
    tokens_in = input_tokens or PLAN_INPUT_TOKENS
    tokens_out = 0 if name == "reference" else t.expected_output_tokens
    per_item = cost_usd(price, tokens_in, tokens_out) if price else (0.0 if free else None)
    if free:
        rate, limit = (float("inf"), "no API") if name == "reference" else (60.0 / SECONDS_PER_ANSWER, "local model")
    else:
        limits = teacher_limits(t, name)  # explicit > teachers.limits > built-in per provider
        candidates = {
            f"{t.concurrency} in flight at ~{SECONDS_PER_ANSWER:.0f} s per answer": t.concurrency
            * 60.0
            / SECONDS_PER_ANSWER,
        }
        if limits.requests_per_minute < UNLIMITED:
            candidates[f"{limits.requests_per_minute} requests/min"] = float(limits.requests_per_minute)
        if limits.tokens_per_minute < UNLIMITED:
            candidates[f"{limits.tokens_per_minute} tokens/min"] = limits.tokens_per_minute / max(
                1, tokens_in + tokens_out
            )
        limit, rate = min(candidates.items(), key=lambda kv: kv[1])
    hours = 0.0 if rate == float("inf") else items / rate / 60.0
    online = None if per_item is None else round(per_item * items, 2)
    return TeacherEstimate(
        teacher=name,
        model=model,
        items=items,
        input_tokens_per_item=tokens_in,
        output_tokens_per_item=tokens_out,
        input_tokens_source="measured from the prompts" if input_tokens else "the plan's ~3K",
        usd_online=online,
        usd_batch=None if online is None else round(online * t.batch_discount, 2),
        items_per_minute=round(rate, 2) if rate != float("inf") else float("inf"),
        limited_by=limit,
        hours=round(hours, 2),
        budget_usd=t.budget_usd,
        over_budget=online is not None and online > t.budget_usd,
    )


def mean_prompt_tokens(messages_per_item: list[list[dict[str, str]]]) -> int | None:
    if not messages_per_item:
        return None
    return round(sum(messages_tokens(m) for m in messages_per_item) / len(messages_per_item))
