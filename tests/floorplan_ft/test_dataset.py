"""Phase 5: chat-format rows from the selected teacher, a split by complex, the stats report."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import copy_prepared
from plans import prepare_plans

from floorplan_ft.dataset import (
    DatasetError,
    answer_json,
    build_training_data,
    count_tokens,
    dataset_markdown,
    group_split,
    read_rows,
    to_prompt_completion,
    write_training_data,
)
from floorplan_ft.sampling import group_key
from floorplan_ft.schemas import FloorPlanAnalysis
from floorplan_ft.settings import load_settings
from floorplan_ft.teachers.items import build_items
from floorplan_ft.teachers.labeling import LabelingRun, ReferenceTeacher

N_PLANS, N_COMPLEXES = 40, 8


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Plans with topologies and contexts, labeled by the reference teacher (real sidecars)."""
    root = tmp_path_factory.mktemp("dataset") / "data"
    store, stems = prepare_plans(root, N_PLANS, N_COMPLEXES, seed=11)
    items, missing = build_items(store, stems)
    assert not missing
    summary = asyncio.run(LabelingRun(ReferenceTeacher(), store, load_settings().teachers).run(items))
    assert summary.labeled == N_PLANS
    store.write_text(store.layout.run_file("selected_model"), "reference\n")
    return root, stems


@pytest.fixture
def data(base, tmp_path, no_dotenv):
    root, stems = base
    return copy_prepared(root, tmp_path), list(stems)


def test_rows_are_the_teachers_prompt_and_answer_split_by_complex(data):
    store, stems = data
    settings = load_settings()
    built = build_training_data(store, stems, settings)
    paths = write_training_data(store, built)
    assert built.teacher == "reference" and not built.excluded
    assert not any("could not be matched" in w for w in built.warnings)  # sidecar keys match the prompts

    items = {i.stem: i for i in build_items(store, stems)[0]}
    stats = json.loads(Path(paths["stats_report"]).read_text())
    rows = {"train": read_rows(store, "train"), "val": read_rows(store, "val")}
    for split, part in rows.items():
        assert all(set(r) == {"messages"} for r in part)
        for row, stem in zip(part, stats["split"][split]["stems"], strict=True):
            system, user, assistant = row["messages"]
            assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
            assert [system, user] == items[stem].messages  # exactly what the teacher saw
            answer = FloorPlanAnalysis.model_validate_json(assistant["content"])
            stored = FloorPlanAnalysis.model_validate_json(store.read_text(store.layout.analysis(stem, "reference")))
            assert answer == stored and assistant["content"] == answer_json(stored)
            assert ": " not in assistant["content"][:40] and "\\u" not in assistant["content"]  # compact, Korean kept
            assert list(json.loads(assistant["content"])) == list(FloorPlanAnalysis.model_fields)

    train_c = {group_key(s) for s in stats["split"]["train"]["stems"]}
    val_c = {group_key(s) for s in stats["split"]["val"]["stems"]}
    assert train_c and val_c and not train_c & val_c
    assert (
        sorted(train_c) == stats["split"]["train"]["complexes"] and sorted(val_c) == stats["split"]["val"]["complexes"]
    )
    assert len(rows["train"]) + len(rows["val"]) == N_PLANS

    # The val share is the closest to 10 % that whole complexes allow.
    sizes = Counter(group_key(s) for s in stems)
    best = min(
        abs(sum(sizes[g] for g in sub) - 0.1 * N_PLANS)
        for k in range(1, len(sizes))
        for sub in itertools.combinations(sizes, k)
    )
    assert abs(len(rows["val"]) - 0.1 * N_PLANS) == best
    assert 0.05 <= stats["split"]["val_share"] <= 0.15

    assert stats["teacher"] == "reference" and stats["counts"]["kept"] == N_PLANS
    assert stats["fact_mismatches"]["rows"] == 0  # the reference answers agree with their topology
    assert stats["tokens"]["counter"] == "estimate" and stats["tokens"]["max_length"] == 4096
    assert stats["tokens"]["min"] <= stats["tokens"]["mean"] <= stats["tokens"]["p95"] <= stats["tokens"]["max"]
    assert sum(stats["labels"]["structure_type"].values()) == N_PLANS
    assert set(stats["labels"]["non_compliant_categories"]) <= {"채광", "환기", "가족융화", "수납"}
    md = dataset_markdown(built)
    assert "| train |" in md and "structure_type" in md and "reference" in md

    again = build_training_data(store, stems, settings)
    assert [r.stem for r in again.train] == [r.stem for r in built.train]  # deterministic


def test_exclusions_have_reasons_and_duplicates_are_dropped(data):
    store, stems = data
    root = Path(store.root)
    # An exact copy of a plan's outputs under another name: same prompt, same answer.
    twin = "C07_9999"
    shutil.copytree(root / "output" / stems[0], root / "output" / twin)
    store.delete(store.layout.rag_context(stems[1]))
    store.write_text(store.layout.analysis(stems[2], "reference"), '{"image_name": 1}')
    store.delete(store.layout.analysis(stems[3], "reference"))
    store.write_json(store.layout.label_failures("reference"), {"failures": {stems[3]: {"reason": "refusal"}}})
    wrong = json.loads(store.read_text(store.layout.analysis(stems[5], "reference")))
    store.write_text(
        store.layout.analysis(stems[5], "reference"),
        json.dumps(wrong | {"bay_count": wrong["bay_count"] + 1}, ensure_ascii=False),
    )
    meta = store.read_json(store.layout.analysis_meta(stems[4], "reference"))
    store.write_json(store.layout.analysis_meta(stems[4], "reference"), meta | {"prompt_version": "old"})

    built = build_training_data(store, [*stems, twin], load_settings())
    reasons = {e.stem: (e.reason, e.detail) for e in built.excluded}
    assert reasons[twin] == ("duplicate", f"same prompt and answer as {stems[0]}")
    assert reasons[stems[1]][0] == "missing_context"
    assert reasons[stems[2]][0] == "invalid_answer"
    assert reasons[stems[3]] == ("no_answer", "labeling failed: refusal")
    assert reasons[stems[4]][0] == "stale_prompt"
    assert len(built.train) + len(built.val) == N_PLANS - 4
    assert built.stats["fact_mismatches"]["by_field"] == {"bay_count": 1}  # kept, reported
    assert built.stats["fact_mismatches"]["stems"] == [stems[5]]
    assert built.stats["exclusions"] == {
        "duplicate": 1,
        "invalid_answer": 1,
        "missing_context": 1,
        "no_answer": 1,
        "stale_prompt": 1,
    }


def _settings(max_length: int, drop: bool, **sampling):
    s = load_settings(sampling=sampling) if sampling else load_settings()
    return SimpleNamespace(
        sampling=s.sampling,
        teachers=s.teachers,
        dataset=SimpleNamespace(train_ratio=0.9, seed=42, drop_overlong=drop),
        finetune=SimpleNamespace(max_length=max_length),
    )


class FakeTokenizer:
    """Duck-typed tokenizer: one token per 10 characters of the rendered chat (v5 returns a dict)."""

    name_or_path = "fake-tok"

    def apply_chat_template(self, messages, tokenize=True, **kwargs):
        assert kwargs.get("enable_thinking") is False
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return {"input_ids": list(range(len(text) // 10))}


def test_token_lengths_flag_or_drop_overlong_rows(data):
    store, stems = data
    lengths = sorted(
        count_tokens(r.messages, FakeTokenizer())
        for r in build_training_data(store, stems, _settings(100_000, False)).train
    )
    limit = lengths[len(lengths) // 2]
    flagged = build_training_data(store, stems, _settings(limit, False), tokenizer=FakeTokenizer())
    tok = flagged.stats["tokens"]
    assert tok["counter"] == "tokenizer" and tok["tokenizer"] == "fake-tok" and tok["overlong_count"] > 0
    assert len(flagged.train) + len(flagged.val) == N_PLANS
    assert any("longer than finetune.max_length" in w for w in flagged.warnings)
    dropped = build_training_data(store, stems, _settings(limit, True), tokenizer=FakeTokenizer())
    assert dropped.stats["exclusions"] == {"overlong": tok["overlong_count"]}
    assert all(r.tokens <= limit for r in [*dropped.train, *dropped.val])


def test_bad_input_gives_clear_errors(data):
    store, stems = data
    settings = load_settings()
    store.delete(store.layout.run_file("selected_model"))
    with pytest.raises(DatasetError, match=r"selected_model\.txt.*step 4"):
        build_training_data(store, stems, settings)
    with pytest.raises(DatasetError, match="teacher 'gemini' has no answers"):
        build_training_data(store, stems, settings, teacher="gemini")
    for s in stems:
        store.write_text(store.layout.analysis(s, "reference"), "not json")
    with pytest.raises(DatasetError, match=r"no usable training rows.*invalid_answer"):
        build_training_data(store, stems, settings, teacher="reference")


def test_one_complex_cannot_be_split(data):
    store, stems = data
    with pytest.raises(DatasetError, match=r"one complex 'C'.*sampling\.group_pattern"):
        build_training_data(store, stems, _settings(4096, False, group_prefix_len=1), teacher="reference")


def test_group_split_is_deterministic_and_keeps_both_sides():
    sizes = {f"g{i}": n for i, n in enumerate([30, 1, 7, 3, 12, 2, 9, 5, 20, 11])}
    train, val = group_split(sizes, 0.9, 42)
    assert (train, val) == group_split(sizes, 0.9, 42)
    assert set(train) | set(val) == set(sizes) and not set(train) & set(val)
    assert sum(sizes[g] for g in val) == 10  # exactly 10 % of 100 is reachable
    with pytest.raises(DatasetError):
        group_split({"only": 5}, 0.9, 42)
    train, val = group_split({"a": 9, "b": 1}, 0.5, 0)
    assert val == ["b"] and train == ["a"]  # both sides non-empty even far from the target


def test_prompt_completion_form():
    row = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "{}"},
        ]
    }
    pc = to_prompt_completion(row)
    assert pc["prompt"] == row["messages"][:2] and pc["completion"] == [row["messages"][2]]
