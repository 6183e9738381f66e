"""Phase 3 batch mode against a real HTTP server that speaks OpenAI's Batch API and Gemini's batch
mode (google-genai inlined requests): half price, persisted jobs, validation like online, failures
finished online."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fakes.provider_server import BatchPlan, Reply
from test_labeling import GEMINI_KEY, OPENAI_KEY, prepare, settings_for

from floorplan_ft.teachers.batch import label_in_batches, state_path
from floorplan_ft.teachers.factory import make_teacher
from floorplan_ft.teachers.items import build_items
from floorplan_ft.teachers.labeling import (
    LabelingRun,
    cost_usd,
    failures_path,
    item_key,
    ledger_path,
    messages_tokens,
    meta_path,
)

FAST_POLL = {"poll_interval_s": 0.01, "max_wait_s": 10.0}
# The fake's usage per answer (120 in, 45 out, 5 thinking): gpt-4o at $2.50 / $10 per 1M.
GPT4O_FULL = (120 * 2.50 + 45 * 10.00) / 1e6
# Gemini counts thinking as output: 120 in, 50 out at $2 / $12 per 1M.
GEMINI_FULL = (120 * 2.00 + 50 * 12.00) / 1e6


@pytest.fixture
def data(tmp_path, no_dotenv):
    return prepare(tmp_path / "data", 8)


def batch(settings, store, name, items, **kw):
    return asyncio.run(label_in_batches(name, settings, items, store, **{**FAST_POLL, **kw}))


def items_of(store, stems):
    items, missing = build_items(store, stems)
    assert not missing
    return items


def posts(fake, path):
    return [r for r in fake.requests if r.method == "POST" and r.path.endswith(path)]


def chat_requests(fake):
    return posts(fake, "/v1/chat/completions")


def stems_in(requests, stems):
    """Which items these requests were for (by the plan's image name in the prompt)."""
    return sorted(s for s in stems for r in requests if f"{s}.png" in json.dumps(r.body, ensure_ascii=False))


def input_lines(fake, batch_index=-1):
    """The JSONL lines of an OpenAI batch the fake received."""
    job = [b for b in fake.batches.values() if b.provider == "openai"][batch_index]
    return job.lines


def assert_no_keys(root):
    for path in Path(root).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert OPENAI_KEY.encode() not in data and GEMINI_KEY.encode() not in data, path


def test_openai_batch_labels_everything_at_half_price(fake_provider, data):
    store, stems = data
    settings = settings_for(fake_provider)
    items = items_of(store, stems)
    outcome = batch(settings, store, "openai", items)

    assert outcome.status == "done" and outcome.labeled == 8 and outcome.unlabeled == []
    assert len(posts(fake_provider, "/v1/batches")) == 1 and len(posts(fake_provider, "/v1/files")) == 1
    assert chat_requests(fake_provider) == []
    upload = posts(fake_provider, "/v1/files")[0].body
    assert upload["purpose"] == "batch"
    created = posts(fake_provider, "/v1/batches")[0].body
    assert created["endpoint"] == "/v1/chat/completions" and created["completion_window"] == "24h"

    # Each line is the online request: strict schema, token limit, temperature, same messages.
    teacher = make_teacher(settings, "openai")
    for line in input_lines(fake_provider):
        assert line["method"] == "POST" and line["url"] == "/v1/chat/completions"
        stem = line["custom_id"].rpartition("#")[0]
        item = next(i for i in items if i.stem == stem)
        body = line["body"]
        assert body["messages"] == item.messages and body["model"] == "gpt-4o"
        assert body["max_completion_tokens"] == 4096 and body["temperature"] == 0.2
        assert body["response_format"]["json_schema"]["strict"] is True

    # Sidecars: the online shape and cache key, cost at the batch discount.
    meta = store.read_json(meta_path(store, stems[0], "openai"))
    assert meta["key"] == item_key(teacher, items[0].messages, 4096)
    assert meta["cost_usd"] == pytest.approx(0.5 * GPT4O_FULL, abs=1e-6)
    assert meta["attempts"] == 1 and meta["input_tokens"] == 120 and meta["output_tokens"] == 45
    asyncio.run(LabelingRun(make_teacher(settings, "gemini"), store, settings.teachers).run(items[:1]))
    online_meta = store.read_json(meta_path(store, stems[0], "gemini"))
    assert set(meta) == set(online_meta)
    ledger = store.read_json(ledger_path(store, "openai"))
    assert ledger["requests"] == 8 and ledger["cost_usd"] == pytest.approx(8 * 0.5 * GPT4O_FULL, abs=1e-6)
    assert outcome.cost_usd == pytest.approx(ledger["cost_usd"], abs=1e-6)

    # The online engine sees the batch answers as its own cache: a rerun sends nothing.
    before = fake_provider.request_count
    summary = asyncio.run(LabelingRun(make_teacher(settings, "openai"), store, settings.teachers).run(items))
    assert summary.cached == 8 and fake_provider.request_count == before

    state = store.read_json(state_path(store, "openai"))
    job = state["jobs"][0]
    assert job["id"].startswith("batch_") and job["input_file_id"].startswith("file-")
    assert job["status"] == "completed" and job["ingested_at"] and job["created_at"]
    assert job["items"] == {i.stem: item_key(teacher, i.messages, 4096) for i in items}


def test_a_rerun_polls_the_running_job_instead_of_resubmitting(fake_provider, data):
    store, stems = data
    settings = settings_for(fake_provider)
    items = items_of(store, stems)
    fake_provider.batch_default = BatchPlan(polls=3)

    first = batch(settings, store, "openai", items, max_wait_s=0)
    assert first.status == "pending" and first.submitted == 8 and first.waiting == sorted(stems)
    assert len(first.jobs_pending) == 1

    second = batch(settings, store, "openai", items, max_wait_s=0)  # still running
    assert second.status == "pending" and second.submitted == 0 and second.labeled == 0
    assert len(posts(fake_provider, "/v1/batches")) == 1 and len(posts(fake_provider, "/v1/files")) == 1

    third = batch(settings, store, "openai", items)
    assert third.status == "done" and third.labeled == 8 and third.submitted == 0
    assert len(posts(fake_provider, "/v1/batches")) == 1 and chat_requests(fake_provider) == []
    assert store.read_json(ledger_path(store, "openai"))["requests"] == 8

    # Everything answered: a fourth run sends no request at all.
    before = fake_provider.request_count
    fourth = batch(settings, store, "openai", items)
    assert fourth.cached == 8 and fourth.submitted == 0 and fake_provider.request_count == before


def test_expired_batch_and_bad_lines_are_finished_online(fake_provider, data, caplog):
    store, stems = data
    settings = settings_for(fake_provider)
    items = items_of(store, stems)
    name = {i: f"{stems[i]}.png" for i in range(8)}
    # Five lines ran before the window closed; three of those are unusable, one is a refusal.
    fake_provider.push_batch(BatchPlan(polls=1, final="expired", finished=5))
    fake_provider.push_for(name[1], Reply.invalid_json())
    fake_provider.push_for(name[2], Reply.truncated())
    fake_provider.push_for(name[3], Reply.server_error(500))
    fake_provider.push_for(name[4], Reply.refusal())

    with caplog.at_level("DEBUG"):
        outcome = batch(settings, store, "openai", items)
    online = sorted(stems[i] for i in (1, 2, 3, 5, 6, 7))
    assert outcome.status == "done" and outcome.labeled == 1
    assert sorted(outcome.finished_online) == online
    assert {s: f["reason"] for s, f in outcome.failed.items()} == {
        stems[1]: "invalid_output", stems[2]: "truncated", stems[3]: "server_error",
        stems[4]: "refusal", stems[5]: "expired", stems[6]: "expired", stems[7]: "expired",
    }
    # Exactly those items went online, once each; the refusal was not sent again.
    requests = chat_requests(fake_provider)
    assert len(requests) == 6 and stems_in(requests, stems) == online
    assert outcome.online["labeled"] == 6 and outcome.unlabeled == [stems[4]]
    failures = store.read_json(failures_path(store, "openai"))["failures"]
    assert set(failures) == {stems[4]} and failures[stems[4]]["reason"] == "refusal"

    # The online requests are the batch lines' bodies.
    lines = {line["custom_id"].rpartition("#")[0]: line["body"] for line in input_lines(fake_provider)}
    for request in requests:
        (stem,) = stems_in([request], stems)
        assert request.body == lines[stem]

    # Billed: four batch lines with tokens at half price (the 500 has none, the expired never
    # ran), plus six online answers at full price.
    ledger = store.read_json(ledger_path(store, "openai"))
    assert ledger["requests"] == 5 + 6
    assert ledger["cost_usd"] == pytest.approx(4 * 0.5 * GPT4O_FULL + 6 * GPT4O_FULL, abs=1e-6)
    for i in (0, 1, 5):
        meta = store.read_json(meta_path(store, stems[i], "openai"))
        assert meta["cost_usd"] == pytest.approx((0.5 if i == 0 else 1.0) * GPT4O_FULL, abs=1e-6)
    assert_no_keys(store.root)
    assert OPENAI_KEY not in caplog.text and "batch_" in caplog.text


def test_cached_items_are_never_submitted_and_changed_prompts_are(fake_provider, data):
    store, stems = data
    settings = settings_for(fake_provider)
    items = items_of(store, stems)
    asyncio.run(LabelingRun(make_teacher(settings, "openai"), store, settings.teachers).run(items[:3]))
    assert len(chat_requests(fake_provider)) == 3

    fake_provider.batch_default = BatchPlan(polls=2)
    first = batch(settings, store, "openai", items, max_wait_s=0)
    assert first.cached == 3 and first.submitted == 5
    assert sorted(line["custom_id"].rpartition("#")[0] for line in input_lines(fake_provider)) == stems[3:]

    # The prompt of one waiting item changes: only that item goes out again, in a new job.
    items[4].messages = [*items[4].messages[:-1],
                         {**items[4].messages[-1], "content": items[4].messages[-1]["content"] + "\n(v2)"}]
    second = batch(settings, store, "openai", items)
    assert second.submitted == 1 and len(posts(fake_provider, "/v1/batches")) == 2
    assert [line["custom_id"].rpartition("#")[0] for line in input_lines(fake_provider)] == [stems[4]]
    assert second.status == "done" and second.labeled == 5 and second.unlabeled == []
    teacher = make_teacher(settings, "openai")
    assert store.read_json(meta_path(store, stems[4], "openai"))["key"] == item_key(teacher, items[4].messages, 4096)
    assert len(chat_requests(fake_provider)) == 3  # nothing online
    # Both jobs' lines were billed (the superseded answer too), the cached ones never.
    assert store.read_json(ledger_path(store, "openai"))["requests"] == 3 + 5 + 1


def test_budget_limits_what_is_submitted(fake_provider, data):
    store, stems = data
    items = items_of(store, stems)
    worst = [cost_usd(settings_for(fake_provider).teachers.prices["gpt-4o"],
                      messages_tokens(i.messages) * 3 // 2, 4096, 0.5) for i in items]
    # Room for the first three items' discounted worst case (at full price two would not fit).
    cap = sum(worst[:3]) + 1e-9
    assert 2 * (worst[0] + worst[1]) > cap
    settings = settings_for(fake_provider, budget_usd=cap)
    outcome = batch(settings, store, "openai", items)
    assert outcome.submitted == 3 and outcome.skipped_budget == stems[3:]
    assert len(input_lines(fake_provider)) == 3 and outcome.labeled == 3
    assert chat_requests(fake_provider) == []  # skipped items are not sent online either
    assert store.read_json(ledger_path(store, "openai"))["cost_usd"] <= cap
    failures = store.read_json(failures_path(store, "openai"))["failures"]
    assert {failures[s]["reason"] for s in stems[3:]} == {"budget"}

    # A cap below one item's worst case: no file, no job.
    fake_provider.reset()
    poor = settings_for(fake_provider, budget_usd=min(worst) / 2)
    other = batch(poor, store, "openai", items)
    assert other.submitted == 0 and set(other.skipped_budget) == set(stems[3:])
    assert posts(fake_provider, "/v1/batches") == [] and posts(fake_provider, "/v1/files") == []


def test_an_interrupted_submission_is_found_not_resubmitted(fake_provider, data):
    store, stems = data
    settings = settings_for(fake_provider)
    items = items_of(store, stems)
    fake_provider.batch_default = BatchPlan(polls=1)
    batch(settings, store, "openai", items, max_wait_s=0)
    # As if the run had died after creating the job, before recording its id.
    path = state_path(store, "openai")
    state = store.read_json(path)
    job_id = state["jobs"][0]["id"]
    state["jobs"][0].update(id=None, status="submitting")
    store.write_json(path, state)

    outcome = batch(settings, store, "openai", items)
    assert outcome.status == "done" and outcome.labeled == 8 and outcome.submitted == 0
    assert len(posts(fake_provider, "/v1/batches")) == 1
    assert store.read_json(path)["jobs"][0]["id"] == job_id


def test_large_sets_are_split_into_several_jobs(fake_provider, data):
    store, stems = data
    settings = settings_for(fake_provider)
    outcome = batch(settings, store, "openai", items_of(store, stems), max_requests_per_job=3)
    assert len(outcome.jobs_submitted) == 3 and outcome.labeled == 8
    assert [len(b.lines) for b in fake_provider.batches.values()] == [3, 3, 2]
    one_line = len(json.dumps(input_lines(fake_provider, 0)[0], ensure_ascii=False).encode()) + 1
    store.delete(state_path(store, "openai"))
    for stem in stems:
        store.delete(meta_path(store, stem, "openai"))
    fake_provider.reset()
    by_size = batch(settings, store, "openai", items_of(store, stems), max_bytes_per_job=int(one_line * 4.5))
    assert by_size.labeled == 8 and [len(b.lines) for b in fake_provider.batches.values()] == [4, 4]


def test_a_job_the_provider_lost_is_finished_online(fake_provider, data):
    store, stems = data
    settings = settings_for(fake_provider)
    items = items_of(store, stems[:2])
    fake_provider.batch_default = BatchPlan(polls=5)
    assert batch(settings, store, "openai", items, max_wait_s=0).status == "pending"
    fake_provider.batches.clear()  # deleted at the provider
    outcome = batch(settings, store, "openai", items)
    assert {f["reason"] for f in outcome.failed.values()} == {"missing"}
    assert outcome.status == "done" and outcome.unlabeled == [] and len(chat_requests(fake_provider)) == 2


def test_a_failed_job_is_finished_online(fake_provider, data):
    store, stems = data
    settings = settings_for(fake_provider)
    items = items_of(store, stems[:3])
    fake_provider.push_batch(BatchPlan(polls=0, final="failed"))
    outcome = batch(settings, store, "openai", items)
    assert {f["reason"] for f in outcome.failed.values()} == {"job_failed"}
    assert sorted(outcome.finished_online) == sorted(stems[:3]) and outcome.unlabeled == []
    assert len(chat_requests(fake_provider)) == 3


def test_gemini_batch_mode(fake_provider, data):
    store, stems = data
    settings = settings_for(fake_provider)
    items = items_of(store, stems[:5])
    fake_provider.push_batch(BatchPlan(polls=2, final="expired", finished=4))
    fake_provider.push_for(f"{stems[1]}.png", Reply.invalid_json())

    outcome = batch(settings, store, "gemini", items)
    creates = posts(fake_provider, ":batchGenerateContent")
    assert len(creates) == 1 and creates[0].path.endswith("/models/gemini-3-pro-preview:batchGenerateContent")
    assert outcome.status == "done" and outcome.labeled == 3
    assert {s: f["reason"] for s, f in outcome.failed.items()} == {stems[1]: "invalid_output", stems[4]: "expired"}
    online = posts(fake_provider, ":generateContent")
    assert len(online) == 2 and stems_in(online, stems) == sorted([stems[1], stems[4]])
    assert outcome.unlabeled == []

    # Inlined requests are the online generateContent bodies; answers carry the online sidecar.
    inlined = {r["metadata"]["custom_id"].rpartition("#")[0]: r["request"]
               for r in creates[0].body["batch"]["inputConfig"]["requests"]["requests"]}
    for request in online:
        (stem,) = stems_in([request], stems)
        assert request.body == inlined[stem]
    assert inlined[stems[0]]["generationConfig"]["responseJsonSchema"]
    meta = store.read_json(meta_path(store, stems[0], "gemini"))
    teacher = make_teacher(settings, "gemini")
    assert meta["key"] == item_key(teacher, items[0].messages, 4096) and meta["provider"] == "gemini"
    assert meta["cost_usd"] == pytest.approx(0.5 * GEMINI_FULL, abs=1e-6)
    ledger = store.read_json(ledger_path(store, "gemini"))
    assert ledger["requests"] == 4 + 2
    assert ledger["cost_usd"] == pytest.approx(4 * 0.5 * GEMINI_FULL + 2 * GEMINI_FULL, abs=1e-6)

    # A rerun: all answered, nothing sent; the job was polled to its end only once.
    before = fake_provider.request_count
    again = batch(settings, store, "gemini", items)
    assert again.cached == 5 and fake_provider.request_count == before
    job = store.read_json(state_path(store, "gemini"))["jobs"][0]
    assert job["id"].startswith("batches/") and job["status"] == "JOB_STATE_EXPIRED"
    assert_no_keys(store.root)


def test_gemini_rerun_polls_instead_of_resubmitting(fake_provider, data):
    store, stems = data
    settings = settings_for(fake_provider)
    items = items_of(store, stems[:4])
    fake_provider.batch_default = BatchPlan(polls=2)
    assert batch(settings, store, "gemini", items, max_wait_s=0).status == "pending"
    assert batch(settings, store, "gemini", items, max_wait_s=0).status == "pending"
    done = batch(settings, store, "gemini", items)
    assert done.status == "done" and done.labeled == 4
    assert len(posts(fake_provider, ":batchGenerateContent")) == 1
    assert posts(fake_provider, ":generateContent") == []


def test_batch_mode_is_for_openai_and_gemini_only(fake_provider, data):
    from floorplan_ft.serving.base import ConfigError

    store, stems = data
    with pytest.raises(ConfigError, match="batch mode"):
        batch(settings_for(fake_provider), store, "reference", items_of(store, stems[:1]))
