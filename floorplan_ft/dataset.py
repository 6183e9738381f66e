"""Phase 5: the selected teacher's answers as chat-format training data, split by complex.

Per plan: the messages come from ``teachers.items.build_items`` (the exact system and user turns
every teacher saw; one builder for labeling, training and serving), the assistant turn is the
teacher's answer re-validated against ``FloorPlanAnalysis`` and written as compact JSON in the
schema's field order (``ensure_ascii=False``, nulls kept). A row is
``{"messages": [system, user, assistant]}`` (TRL's conversational format); ``to_prompt_completion``
derives TRL's prompt/completion form from it.

Kept: plans with a topology, a retrieval context and a valid answer whose prompt is current
(answers labeled under another prompt template are excluded as ``stale_prompt``). Dropped with a
reason: everything else, exact duplicates (same messages and answer) and, with
``dataset.drop_overlong``, rows longer than ``finetune.max_length`` tokens.

Split: whole complexes (``sampling.group_key`` with the sampling settings) go to train or val, so
near-duplicate plans of one complex never leak into validation. Complexes are shuffled with
``dataset.seed``; then the subset of complexes whose row count is closest to
``(1 - dataset.train_ratio) * rows`` goes to val (exact subset-sum; ties: fewer val rows, then the
first found in the shuffled order). One complex only → ``DatasetError``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from floorplan_ft.phase import Artifact, Failure, PhaseResult
from floorplan_ft.prompts import prompt_version_for
from floorplan_ft.sampling import SamplingError, group_key, read_sample, stable_hash
from floorplan_ft.schemas import FloorPlanAnalysis, schema_hash
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.items import build_items
from floorplan_ft.teachers.labeling import messages_tokens

STATS_FORMAT_VERSION = 1
SELECTION_FILE = "selected_model.txt"


class DatasetError(ValueError):
    """Phase 5 cannot build the data; the message says what to fix."""


@dataclass
class Row:
    stem: str
    group: str
    messages: list[dict[str, str]]
    answer: FloorPlanAnalysis
    tokens: int = 0
    mismatches: tuple[str, ...] = ()  # facts where the answer contradicts the topology

    def to_json(self) -> dict[str, Any]:
        return {"messages": self.messages}


@dataclass
class Exclusion:
    stem: str
    reason: str  # missing_topology | missing_context | bad_topology | bad_context | no_answer | invalid_answer | stale_prompt | duplicate | overlong
    detail: str | None = None


@dataclass
class TrainingData:
    teacher: str
    train: list[Row]
    val: list[Row]
    excluded: list[Exclusion]
    stats: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def answer_json(answer: FloorPlanAnalysis) -> str:
    """The assistant turn: compact JSON, schema field order, non-ASCII kept as is."""
    return json.dumps(answer.model_dump(mode="json"), ensure_ascii=False, separators=(",", ":"))


def to_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    """TRL's prompt/completion form of a conversational row (trains only the answer)."""
    messages = row["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def selected_teacher(store: ArtifactStore, teacher: str | None = None) -> str:
    """The explicit ``teacher``, else the name in ``selected_model.txt`` (written by step 4)."""
    if teacher:
        return teacher
    path = store.layout.run_file("selected_model")
    if not store.exists(path):
        raise DatasetError(
            f"no teacher selected: {path} ({SELECTION_FILE}) does not exist. Run step 4 (compare "
            "teachers; quality.force_teacher picks one without a contest) first, or pass the teacher explicitly"
        )
    name = store.read_text(path).strip()
    if not name or len(name.splitlines()) != 1:
        raise DatasetError(f"{path}: expected one teacher name, got {name!r}; rerun step 4")
    return name


# ----------------------------------------------------------------------------- tokens


def count_tokens(messages: list[dict[str, str]], tokenizer: Any = None) -> int:
    """Tokens of the full conversation: the tokenizer's chat template when given (Qwen3 rendered in
    non-thinking mode), else the conservative estimate of ``teachers.labeling``."""
    if tokenizer is None:
        return messages_tokens(messages)
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, enable_thinking=False)
    except Exception:  # noqa: BLE001 - any template failure: count the plain text instead
        out = tokenizer("\n".join(m["content"] for m in messages))
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    if out and isinstance(out[0], list):  # batched
        out = out[0]
    return len(out)


def tokenizer_name(tokenizer: Any) -> str | None:
    if tokenizer is None:
        return None
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def load_student_tokenizer(name_or_path: str) -> tuple[Any, str | None]:
    """The student's tokenizer from a local directory or the local cache (never the network);
    (None, why) when it cannot be loaded, so the caller falls back to the estimate."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True), None
    except Exception as exc:  # noqa: BLE001 - missing package, not cached, broken files
        return None, f"tokenizer {name_or_path!r} not available locally ({type(exc).__name__}); lengths are estimates"


# ----------------------------------------------------------------------------- split


def group_split(sizes: dict[str, int], train_ratio: float, seed: int) -> tuple[list[str], list[str]]:
    """(train groups, val groups): val gets the subset of groups whose total is closest to
    ``(1 - train_ratio) * total``, both sides non-empty. Deterministic for a seed."""
    if len(sizes) < 2:
        raise DatasetError("a grouped split needs at least two complexes")
    keys = sorted(sizes)
    order = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    total = sum(sizes.values())
    target = (1.0 - train_ratio) * total
    parent: dict[int, tuple[int, int] | None] = {0: None}  # reachable sum → (group index, previous sum)
    for i, g in enumerate(order):
        s = sizes[g]
        for prev in list(parent):
            nxt = prev + s
            if nxt not in parent:
                parent[nxt] = (i, prev)
    candidates = [v for v in parent if 0 < v < total]
    if not candidates:  # unreachable with ≥ 2 non-empty groups
        raise DatasetError("cannot split: every complex is empty")
    best = min(candidates, key=lambda v: (abs(v - target), v))
    val: list[str] = []
    v = best
    while parent[v] is not None:
        i, v = parent[v]
        val.append(order[i])
    val_set = set(val)
    return sorted(g for g in keys if g not in val_set), sorted(val)


# ----------------------------------------------------------------------------- build


def _prompt_check(meta: dict | None, messages: list[dict[str, str]], settings: Any, teacher: str) -> str:
    """fresh | stale | unverified: does the sidecar say the answer came from this very prompt?"""
    if not isinstance(meta, dict):
        return "unverified"
    if meta.get("prompt_version") not in (None, prompt_version_for(settings)):
        return "stale"
    key = meta.get("key")
    if not key:
        return "unverified"
    from floorplan_ft.teachers.factory import teacher_model

    t = settings.teachers
    try:
        configured = teacher_model(settings, teacher)
    except (KeyError, AttributeError):
        configured = None
    models = {m for m in (meta.get("model"), configured) if m}
    for model in models:
        for temperature in (t.temperature, None):
            payload = {
                "provider": meta.get("provider"),
                "model": model,
                "temperature": temperature,
                "max_tokens": t.max_output_tokens,
                "messages": messages,
                "schema": schema_hash(),
            }
            digest = hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()).hexdigest()
            if digest == key:
                return "fresh"
    return "unverified"


def _fact_mismatches(answer: FloorPlanAnalysis, item: Any) -> tuple[str, ...]:
    """Fields where the answer contradicts the topology it was given (label noise, reported)."""
    st = item.topology.statistics if item.topology is not None else None
    if st is None:
        return ()
    truth = {
        "image_name": item.image_name,
        "structure_type": st.structure_type,
        "bay_count": st.bay_count,
        "room_count": st.room_count,
        "bathroom_count": st.bathroom_count,
        "total_spaces": st.inside_space_count,
    }
    return tuple(k for k, v in truth.items() if getattr(answer, k) != v)


def _pct(values: list[int], q: float) -> float:
    return float(np.percentile(np.array(values, dtype=float), q)) if values else 0.0


def build_training_data(
    store: ArtifactStore,
    stems: Sequence[str],
    settings: Any,
    *,
    teacher: str | None = None,
    tokenizer: Any = None,
    tokenizer_note: str | None = None,
) -> TrainingData:
    """Rows, exclusions, the grouped split and the statistics (nothing is written)."""
    teacher = selected_teacher(store, teacher)
    stems = list(dict.fromkeys(stems))
    if not stems:
        raise DatasetError("no plans given: the sample is empty (run step 0)")
    answered = [s for s in stems if store.exists(store.layout.analysis(s, teacher))]
    if not answered:
        raise DatasetError(
            f"teacher {teacher!r} has no answers for any of the {len(stems)} sampled plans "
            f"(output/<stem>/llm_analysis_{teacher}.json): run its labeling step, or select another teacher"
        )
    failures: dict[str, dict] = {}
    if store.exists(store.layout.label_failures(teacher)):
        try:
            failures = dict(store.read_json(store.layout.label_failures(teacher)).get("failures", {}))
        except (ValueError, AttributeError):
            failures = {}
    pattern, prefix_len = settings.sampling.group_pattern, settings.sampling.group_prefix_len
    max_length = settings.finetune.max_length
    drop_overlong = bool(getattr(settings.dataset, "drop_overlong", False))

    excluded: list[Exclusion] = []
    warnings: list[str] = []
    prompt_version = prompt_version_for(settings)  # the team's module fails here, before any row
    items, missing = build_items(store, stems, settings)
    excluded += [Exclusion(m.stem, m.reason) for m in missing]
    rows: list[Row] = []
    unverified: list[str] = []
    seen: dict[str, str] = {}
    for item in items:
        path = store.layout.analysis(item.stem, teacher)
        if not store.exists(path):
            why = failures.get(item.stem, {}).get("reason")
            excluded.append(Exclusion(item.stem, "no_answer", f"labeling failed: {why}" if why else None))
            continue
        try:
            answer = FloorPlanAnalysis.model_validate_json(store.read_text(path))
        except (ValueError, UnicodeDecodeError) as exc:
            excluded.append(Exclusion(item.stem, "invalid_answer", str(exc).splitlines()[0][:300]))
            continue
        mpath = store.layout.analysis_meta(item.stem, teacher)
        try:
            meta = store.read_json(mpath) if store.exists(mpath) else None
        except ValueError:
            meta = None
        check = _prompt_check(meta, item.messages, settings, teacher)
        if check == "stale":
            excluded.append(
                Exclusion(
                    item.stem,
                    "stale_prompt",
                    f"labeled with prompt {meta.get('prompt_version')}, current {prompt_version}",
                )
            )
            continue
        if check == "unverified":
            unverified.append(item.stem)
        messages = [*item.messages, {"role": "assistant", "content": answer_json(answer)}]
        fingerprint = hashlib.sha256(json.dumps(messages, ensure_ascii=False).encode()).hexdigest()
        if fingerprint in seen:
            excluded.append(Exclusion(item.stem, "duplicate", f"same prompt and answer as {seen[fingerprint]}"))
            continue
        seen[fingerprint] = item.stem
        try:
            group = group_key(item.stem, pattern, prefix_len)
        except SamplingError as exc:
            raise DatasetError(str(exc)) from None
        rows.append(
            Row(item.stem, group, messages, answer, count_tokens(messages, tokenizer), _fact_mismatches(answer, item))
        )

    if unverified:
        warnings.append(
            f"{len(unverified)} answers could not be matched to the current prompt through their sidecar key "
            f"(settings changed since labeling, or the topology/context was rebuilt after): {unverified[:10]}"
        )
    overlong = [r.stem for r in rows if r.tokens > max_length]
    if overlong:
        if drop_overlong:
            excluded += [
                Exclusion(r.stem, "overlong", f"{r.tokens} > finetune.max_length {max_length}")
                for r in rows
                if r.tokens > max_length
            ]
            rows = [r for r in rows if r.tokens <= max_length]
        else:
            warnings.append(
                f"{len(overlong)} rows are longer than finetune.max_length={max_length} tokens and will be "
                f"truncated in training (set dataset.drop_overlong=true to drop them): {overlong[:10]}"
            )
    reasons = Counter(e.reason for e in excluded)
    if not rows:
        raise DatasetError(
            f"no usable training rows from teacher {teacher!r}: all {len(stems)} plans were excluded "
            f"({dict(reasons)}); see the reasons above"
        )

    sizes = Counter(r.group for r in rows)
    if len(sizes) < 2:
        (only,) = sizes
        how = (
            f"sampling.group_pattern={pattern!r}"
            if pattern
            else f"the first {prefix_len} characters of the name (sampling.group_prefix_len)"
        )
        raise DatasetError(
            f"all {len(rows)} rows belong to one complex {only!r} by {how}: a split by complex cannot put any "
            "plan in validation without leaking that complex into both sides. Set sampling.group_pattern to a "
            f"regex whose group 'complex' captures the complex id in names like {rows[0].stem!r}, or add plans "
            "from other complexes"
        )
    ratio, seed = settings.dataset.train_ratio, settings.dataset.seed
    train_groups, val_groups = group_split(dict(sizes), ratio, seed)
    # Row order inside a split: a seeded shuffle (no complex-sorted blocks during training).
    val_set = set(val_groups)
    train = [r for r in rows if r.group not in val_set]
    val = [r for r in rows if r.group in val_set]
    for part, salt in ((train, "train"), (val, "val")):
        perm = np.random.default_rng(seed + stable_hash(salt)).permutation(len(part))
        part[:] = [part[i] for i in perm]

    target = (1 - ratio) * len(rows)
    if abs(len(val) - target) > max(1.0, 0.05 * len(rows)):
        warnings.append(
            f"val has {len(val)} rows ({len(val) / len(rows):.0%}), target {target:.0f} "
            f"({1 - ratio:.0%}): the complexes' sizes allow no closer split"
        )
    noisy = [r.stem for r in rows if r.mismatches]
    if noisy:
        warnings.append(
            f"{len(noisy)} kept answers contradict their topology (structure type, counts or image name): "
            f"{noisy[:10]}; see stats_report.json fact_mismatches"
        )
    tokens = [r.tokens for r in rows]
    st_counter = Counter(r.answer.structure_type for r in rows)
    stats = {
        "format_version": STATS_FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "teacher": teacher,
        "prompt_version": prompt_version,
        "schema_hash": schema_hash(),
        "counts": {
            "plans": len(stems),
            "kept": len(rows),
            "excluded": len(excluded),
            "train": len(train),
            "val": len(val),
        },
        "exclusions": dict(sorted(reasons.items())),
        "excluded": [
            {"stem": e.stem, "reason": e.reason, "detail": e.detail} for e in sorted(excluded, key=lambda e: e.stem)
        ],
        "tokens": {
            "counter": "tokenizer" if tokenizer is not None else "estimate",
            "tokenizer": tokenizer_name(tokenizer),
            "note": tokenizer_note,
            "max_length": max_length,
            "min": min(tokens),
            "mean": round(sum(tokens) / len(tokens), 1),
            "p95": round(_pct(tokens, 95), 1),
            "max": max(tokens),
            "overlong": overlong,
            "overlong_count": len(overlong),
            "drop_overlong": drop_overlong,
        },
        "labels": {
            "structure_type": dict(st_counter.most_common()),
            "bay_count": {str(k): v for k, v in sorted(Counter(r.answer.bay_count for r in rows).items())},
            "overall_grade": dict(
                Counter(
                    r.answer.compliance.overall_grade if r.answer.compliance else "(none)" for r in rows
                ).most_common()
            ),
            "ventilation_quality": dict(Counter(r.answer.ventilation_quality for r in rows).most_common()),
            "non_compliant_categories": dict(
                Counter(
                    i.category for r in rows if r.answer.compliance for i in r.answer.compliance.non_compliant_items
                ).most_common()
            ),
        },
        "fact_mismatches": {
            "note": "kept rows whose answer contradicts the topology it was given (not excluded)",
            "rows": sum(1 for r in rows if r.mismatches),
            "by_field": dict(Counter(f for r in rows for f in r.mismatches).most_common()),
            "stems": [r.stem for r in rows if r.mismatches][:50],
        },
        "split": {
            "train_ratio": ratio,
            "seed": seed,
            "group_pattern": pattern,
            "group_prefix_len": prefix_len if pattern is None else None,
            "val_share": round(len(val) / len(rows), 4),
            "train": {"rows": len(train), "complexes": train_groups, "stems": [r.stem for r in train]},
            "val": {"rows": len(val), "complexes": val_groups, "stems": [r.stem for r in val]},
        },
        "warnings": warnings,
    }
    return TrainingData(teacher, train, val, excluded, stats, warnings)


def write_training_data(store: ArtifactStore, data: TrainingData) -> dict[str, str]:
    """train.jsonl, val.jsonl and stats_report.json, each written atomically; returns the paths."""
    return {
        "train": store.write_jsonl(store.layout.run_file("train"), [r.to_json() for r in data.train]),
        "val": store.write_jsonl(store.layout.run_file("val"), [r.to_json() for r in data.val]),
        "stats_report": store.write_json(store.layout.run_file("stats_report"), data.stats),
    }


def read_rows(store: ArtifactStore, split: str) -> list[dict[str, Any]]:
    """The rows of ``train`` or ``val`` as written."""
    text = store.read_text(store.layout.run_file(split))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def dataset_markdown(data: TrainingData) -> str:
    """The phase-5 artifact."""
    s = data.stats
    c, t, sp, lab = s["counts"], s["tokens"], s["split"], s["labels"]

    def dist(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "(none)"

    lines = [
        "## Phase 5: training data",
        "",
        (
            f"Teacher **{data.teacher}** · {c['kept']} rows kept of {c['plans']} plans "
            f"({c['excluded']} excluded: {dist(s['exclusions'])})"
        ),
        "",
        "| split | rows | complexes |",
        "|---|---|---|",
        f"| train | {sp['train']['rows']} | {len(sp['train']['complexes'])} |",
        f"| val | {sp['val']['rows']} | {len(sp['val']['complexes'])} |",
        "",
        f"Val share {sp['val_share']:.1%} (target {1 - sp['train_ratio']:.0%}, whole complexes, seed {sp['seed']}).",
        "",
        (
            f"Tokens ({t['counter']}{' ' + t['tokenizer'] if t['tokenizer'] else ''}): min {t['min']}, "
            f"mean {t['mean']}, p95 {t['p95']}, max {t['max']} vs finetune.max_length {t['max_length']}; "
            f"{t['overlong_count']} longer" + (" (dropped)" if t["drop_overlong"] and t["overlong_count"] else "")
        ),
        "",
        "| label | distribution |",
        "|---|---|",
        f"| structure_type | {dist(lab['structure_type'])} |",
        f"| bay_count | {dist(lab['bay_count'])} |",
        f"| overall_grade | {dist(lab['overall_grade'])} |",
        f"| non-compliant categories | {dist(lab['non_compliant_categories'])} |",
        "",
        (
            f"Answers contradicting their topology (kept): {s['fact_mismatches']['rows']} "
            f"({dist(s['fact_mismatches']['by_field'])})."
        ),
    ]
    if data.warnings:
        lines += ["", "Warnings:"] + [f"- {w}" for w in data.warnings]
    return "\n".join(lines) + "\n"


def run(settings: Any, store: ArtifactStore) -> PhaseResult:
    """Phase 5: the selected teacher's answers as chat-format train/val JSONL (split by complex),
    with the token statistics of what the student will see."""
    stems = read_sample(store.layout.run_file("sample"))
    tokenizer, note = load_student_tokenizer(settings.finetune.base_model)
    data = build_training_data(store, stems, settings, tokenizer=tokenizer, tokenizer_note=note)
    paths = write_training_data(store, data)
    return PhaseResult(
        step="5",
        counts={"train_rows": len(data.train), "val_rows": len(data.val), "excluded": len(data.excluded)},
        details={"teacher": data.teacher, "files": paths},
        failures=[Failure(e.stem, e.reason, e.detail or "") for e in data.excluded],
        warnings=data.warnings[:20],
        artifacts=[
            Artifact(
                key="phase5-dataset", markdown=dataset_markdown(data), description="Phase 5: chat-format training data"
            )
        ],
    )
