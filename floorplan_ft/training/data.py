"""Phase 6 data: the phase-5 JSONL rows tokenised for training, and what they are (hashes, provenance).

Each row ``{"messages": [system, user, assistant]}`` is split with ``to_prompt_completion``; the
prompt is rendered with the base model's chat template exactly as the serving client renders it
(``add_generation_prompt=True``, ``enable_thinking=False``: Qwen3's template then pre-fills an empty
think block) and the completion is the answer's JSON followed by the tokenizer's EOS token. Both are
tokenized here, so ``labels`` are -100 on every prompt token and equal to the input on the answer
and its EOS: the loss covers the answer only, with any chat template. (TRL's own conversational
prompt/completion path renders prompt+completion through the template and starts the completion
where the two token sequences diverge: with a template whose finished assistant turn differs from
its generation prompt — the tiny test template drops the empty think block — TRL warns and trains
on a context the model never sees when served, plus the template's trailing newline.) Rows longer than
``finetune.max_length`` are named in a warning and cut (prompt first, so the answer's end is lost);
a row left with no answer token is dropped, and a configuration that drops every row is refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from floorplan_ft.dataset import to_prompt_completion
from floorplan_ft.store import ArtifactStore
from floorplan_ft.training.config import TrainConfig, TrainConfigError

IGNORE_INDEX = -100


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], enable_thinking: bool = False) -> str:
    """The prompt as the serving client renders it (generation prompt, thinking off)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TrainConfigError(
            f"the tokenizer of finetune.base_model ({getattr(tokenizer, 'name_or_path', '?')}) has no chat "
            "template: use an instruct/chat model, or a base model directory whose tokenizer_config.json has one"
        )
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, enable_thinking=enable_thinking
    )


def encode_row(tokenizer: Any, row: dict[str, Any], enable_thinking: bool = False) -> tuple[list[int], list[int], int]:
    """(input_ids, labels, prompt token count) of one conversational row: labels are -100 on the
    prompt, the answer's tokens and EOS after it."""
    pc = to_prompt_completion(row)
    if not pc["completion"] or pc["completion"][0].get("role") != "assistant":
        raise ValueError("the row's last message is not the assistant's answer")
    prompt = render_prompt(tokenizer, pc["prompt"], enable_thinking)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TrainConfigError("the base model's tokenizer has no eos_token: the student could never stop")
    p_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    c_ids = list(tokenizer(pc["completion"][0]["content"], add_special_tokens=False)["input_ids"]) + [eos]
    return p_ids + c_ids, [IGNORE_INDEX] * len(p_ids) + c_ids, len(p_ids)


@dataclass
class EncodedSplit:
    name: str
    examples: list[dict[str, list[int]]]
    stems: list[str]
    lengths: dict[str, int]
    overlong: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def longest(self) -> int:
        return max(self.lengths.values(), default=0)


def split_stems(config: TrainConfig, split: str, count: int) -> list[str]:
    """The plan stems of a split in row order (from stats_report.json), else ``{split}-{i}``."""
    if config.stats_path and Path(config.stats_path).is_file():
        try:
            stems = json.loads(Path(config.stats_path).read_text(encoding="utf-8"))["split"][split]["stems"]
            if isinstance(stems, list) and len(stems) == count:
                return [str(s) for s in stems]
        except (ValueError, KeyError, TypeError):
            pass
    return [f"{split}-{i}" for i in range(count)]


def encode_split(
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    stems: Sequence[str],
    max_length: int,
    *,
    name: str = "train",
    enable_thinking: bool = False,
) -> tuple[EncodedSplit, list[str]]:
    """Tokenized rows cut to ``max_length`` and the warnings naming the rows that were longer."""
    examples, lengths, overlong, dropped, kept = [], {}, [], [], []
    for stem, row in zip(stems, rows, strict=True):
        ids, labels, _ = encode_row(tokenizer, row, enable_thinking)
        lengths[stem] = len(ids)
        if len(ids) > max_length:
            overlong.append(stem)
            ids, labels = ids[:max_length], labels[:max_length]
            if all(t == IGNORE_INDEX for t in labels):
                dropped.append(stem)
                continue
        examples.append({"input_ids": ids, "labels": labels})
        kept.append(stem)
    warnings: list[str] = []
    if overlong:
        detail = ", ".join(f"{s} ({lengths[s]})" for s in overlong[:20])
        more = f" and {len(overlong) - 20} more" if len(overlong) > 20 else ""
        warnings.append(
            f"{len(overlong)} of {len(rows)} {name} rows are longer than finetune.max_length={max_length} tokens "
            f"and are cut (the end of their answer is lost): {detail}{more}. Longest: {max(lengths.values())} "
            f"tokens; set finetune.max_length >= {max(lengths.values())} (or dataset.drop_overlong=true)"
        )
    if dropped:
        warnings.append(
            f"{len(dropped)} {name} rows keep no answer token within finetune.max_length={max_length} and are "
            f"left out: {', '.join(dropped[:20])}"
        )
    return EncodedSplit(name, examples, kept, lengths, overlong, dropped), warnings


def encode_splits(
    config: TrainConfig, tokenizer: Any, train_rows: Sequence[dict[str, Any]], val_rows: Sequence[dict[str, Any]]
) -> tuple[EncodedSplit, EncodedSplit, list[str]]:
    """Both splits encoded, and the warnings about them; refused when no train row keeps an answer token."""
    splits, warnings = [], []
    for name, rows in (("train", train_rows), ("val", val_rows)):
        split, w = encode_split(
            tokenizer,
            rows,
            split_stems(config, name, len(rows)),
            config.max_length,
            name=name,
            enable_thinking=config.enable_thinking,
        )
        splits.append(split)
        warnings += w
    train, val = splits
    if not train.examples:
        longest = max(train.longest, val.longest)
        raise TrainConfigError(
            f"no train row keeps any answer token within finetune.max_length={config.max_length} "
            f"(longest row: {longest} tokens with this tokenizer): set finetune.max_length >= {longest}"
        )
    if not val.examples:
        warnings.append("val.jsonl has no usable rows: no validation loss and no early stopping")
    return train, val, warnings


def split_summary(train: EncodedSplit, val: EncodedSplit) -> dict[str, Any]:
    """Rows kept, the longest row, and the stems cut or left out (the model card's data section)."""
    return {
        "train_rows": len(train.examples),
        "val_rows": len(val.examples),
        "longest_tokens": max(train.longest, val.longest),
        "overlong": train.overlong + val.overlong,
        "dropped": train.dropped + val.dropped,
    }


def split_hashes(config: TrainConfig, store: ArtifactStore) -> dict[str, str]:
    """The content hashes of train.jsonl and val.jsonl: the data half of the run's fingerprint."""
    return {"train": store.file_hash(config.train_path), "val": store.file_hash(config.val_path)}


def data_summary(config: TrainConfig, store: ArtifactStore) -> dict[str, Any]:
    """The data a run trains on: paths, hashes and the phase-5 provenance (teacher, prompt, schema)."""
    stats: dict[str, Any] = {}
    if config.stats_path and Path(config.stats_path).is_file():
        try:
            stats = json.loads(Path(config.stats_path).read_text(encoding="utf-8"))
        except ValueError:
            stats = {}
    hashes = split_hashes(config, store)
    return {
        "train_path": config.train_path,
        "val_path": config.val_path,
        "train_sha256": hashes["train"],
        "val_sha256": hashes["val"],
        "teacher": stats.get("teacher"),
        "prompt_version": stats.get("prompt_version"),
        "schema_hash": stats.get("schema_hash"),
    }


def read_split(store: ArtifactStore, path: str) -> list[dict[str, Any]]:
    text = store.read_text(path)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_splits(config: TrainConfig, store: ArtifactStore) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The train and val rows; refused when train.jsonl has none."""
    train_rows = read_split(store, config.train_path)
    val_rows = read_split(store, config.val_path)
    if not train_rows:
        raise TrainConfigError(f"{config.train_path} has no rows: rebuild the training data (step 5)")
    return train_rows, val_rows


def to_dataset(examples: list[dict[str, list[int]]]):
    """Pre-tokenized rows as the ``datasets.Dataset`` the trainer reads."""
    from datasets import Dataset

    return Dataset.from_list(examples)
