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

from floorplan_ft.teachers.batch import label_in_batches
from floorplan_ft.teachers.factory import make_teacher
from floorplan_ft.teachers.items import build_items
from floorplan_ft.teachers.labeling import (
    LabelingRun,
    cost_usd,
    item_key,
    messages_tokens,
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
    meta = store.read_json(store.layout.analysis_meta(stems[0], "openai"))
    assert meta["key"] == item_key(teacher, items[0].messages, 4096)
    assert meta["cost_usd"] == pytest.approx(0.5 * GPT4O_FULL, abs=1e-6)
    assert meta["attempts"] == 1 and meta["input_tokens"] == 120 and meta["output_tokens"] == 45
    asyncio.run(LabelingRun(make_teacher(settings, "gemini"), store, settings.teachers).run(items[:1]))
    online_meta = store.read_json(store.layout.analysis_meta(stems[0], "gemini"))
    assert set(meta) == set(online_meta)
    ledger = store.read_json(store.layout.cost_ledger("openai"))
    assert ledger["requests"] == 8 and ledger["cost_usd"] == pytest.approx(8 * 0.5 * GPT4O_FULL, abs=1e-6)
    assert outcome.cost_usd == pytest.approx(ledger["cost_usd"], abs=1e-6)

    # The online engine sees the batch answers as its own cache: a rerun sends nothing.
    before = fake_provider.request_count
    summary = asyncio.run(LabelingRun(make_teacher(settings, "openai"), store, settings.teachers).run(items))
    assert summary.cached == 8 and fake_provider.request_count == before

    state = store.read_json(store.layout.batch_state("openai"))
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
    assert store.read_json(store.layout.cost_ledger("openai"))["requests"] == 8

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
        stems[1]: "invalid_output",
        stems[2]: "truncated",
        stems[3]: "server_error",
        stems[4]: "refusal",
        stems[5]: "expired",
        stems[6]: "expired",
        stems[7]: "expired",
    }
    # Exactly those items went online, once each; the refusal was not sent again.
    requests = chat_requests(fake_provider)
    assert len(requests) == 6 and stems_in(requests, stems) == online
    assert outcome.online["labeled"] == 6 and outcome.unlabeled == [stems[4]]
    failures = store.read_json(store.layout.label_failures("openai"))["failures"]
    assert set(failures) == {stems[4]} and failures[stems[4]]["reason"] == "refusal"

    # The online requests are the batch lines' bodies.
    lines = {line["custom_id"].rpartition("#")[0]: line["body"] for line in input_lines(fake_provider)}
    for request in requests:
        (stem,) = stems_in([request], stems)
        assert request.body == lines[stem]

    # Billed: four batch lines with tokens at half price (the 500 has none, the expired never
    # ran), plus six online answers at full price.
    ledger = store.read_json(store.layout.cost_ledger("openai"))
    assert ledger["requests"] == 5 + 6
    assert ledger["cost_usd"] == pytest.approx(4 * 0.5 * GPT4O_FULL + 6 * GPT4O_FULL, abs=1e-6)
    for i in (0, 1, 5):
        meta = store.read_json(store.layout.analysis_meta(stems[i], "openai"))
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
    items[4].messages = [
        *items[4].messages[:-1],
        {**items[4].messages[-1], "content": items[4].messages[-1]["content"] + "\n(v2)"},
    ]
    second = batch(settings, store, "openai", items)
    assert second.submitted == 1 and len(posts(fake_provider, "/v1/batches")) == 2
    assert [line["custom_id"].rpartition("#")[0] for line in input_lines(fake_provider)] == [stems[4]]
    assert second.status == "done" and second.labeled == 5 and second.unlabeled == []
    teacher = make_teacher(settings, "openai")
    assert store.read_json(store.layout.analysis_meta(stems[4], "openai"))["key"] == item_key(
        teacher, items[4].messages, 4096
    )
    assert len(chat_requests(fake_provider)) == 3  # nothing online
    # Both jobs' lines were billed (the superseded answer too), the cached ones never.
    assert store.read_json(store.layout.cost_ledger("openai"))["requests"] == 3 + 5 + 1


def test_budget_limits_what_is_submitted(fake_provider, data):
    store, stems = data
    items = items_of(store, stems)
    worst = [
        cost_usd(settings_for(fake_provider).teachers.prices["gpt-4o"], messages_tokens(i.messages) * 3 // 2, 4096, 0.5)
        for i in items
    ]
    # Room for the first three items' discounted worst case (at full price two would not fit).
    cap = sum(worst[:3]) + 1e-9
    assert 2 * (worst[0] + worst[1]) > cap
    settings = settings_for(fake_provider, budget_usd=cap)
    outcome = batch(settings, store, "openai", items)
    assert outcome.submitted == 3 and outcome.skipped_budget == stems[3:]
    assert len(input_lines(fake_provider)) == 3 and outcome.labeled == 3
    assert chat_requests(fake_provider) == []  # skipped items are not sent online either
    assert store.read_json(store.layout.cost_ledger("openai"))["cost_usd"] <= cap
    failures = store.read_json(store.layout.label_failures("openai"))["failures"]
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
    path = store.layout.batch_state("openai")
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
    store.delete(store.layout.batch_state("openai"))
    for stem in stems:
        store.delete(store.layout.analysis_meta(stem, "openai"))
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
    inlined = {
        r["metadata"]["custom_id"].rpartition("#")[0]: r["request"]
        for r in creates[0].body["batch"]["inputConfig"]["requests"]["requests"]
    }
    for request in online:
        (stem,) = stems_in([request], stems)
        assert request.body == inlined[stem]
    assert inlined[stems[0]]["generationConfig"]["responseJsonSchema"]
    meta = store.read_json(store.layout.analysis_meta(stems[0], "gemini"))
    teacher = make_teacher(settings, "gemini")
    assert meta["key"] == item_key(teacher, items[0].messages, 4096) and meta["provider"] == "gemini"
    assert meta["cost_usd"] == pytest.approx(0.5 * GEMINI_FULL, abs=1e-6)
    ledger = store.read_json(store.layout.cost_ledger("gemini"))
    assert ledger["requests"] == 4 + 2
    assert ledger["cost_usd"] == pytest.approx(4 * 0.5 * GEMINI_FULL + 2 * GEMINI_FULL, abs=1e-6)

    # A rerun: all answered, nothing sent; the job was polled to its end only once.
    before = fake_provider.request_count
    again = batch(settings, store, "gemini", items)
    assert again.cached == 5 and fake_provider.request_count == before
    job = store.read_json(store.layout.batch_state("gemini"))["jobs"][0]
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
    from floorplan_ft.providers.base import ConfigError

    store, stems = data
    with pytest.raises(ConfigError, match="batch mode"):
        batch(settings_for(fake_provider), store, "reference", items_of(store, stems[:1]))


# ------------------------------------------------------------------------------ hardening (issue 14)


def job_lines_by_stem(fake, provider):
    """Every item the fake received in a batch of `provider`, with how many jobs carried it."""
    seen: dict[str, int] = {}
    for job in fake.batches.values():
        if job.provider != provider:
            continue
        for line in job.lines:
            cid = line.get("custom_id") or (line.get("metadata") or {}).get("custom_id")
            stem = cid.rpartition("#")[0]
            seen[stem] = seen.get(stem, 0) + 1
    return seen


def test_gemini_reply_without_a_name_is_found_by_its_display_name_never_resubmitted(fake_provider, data):
    store, stems = data
    settings = settings_for(fake_provider)
    items = items_of(store, stems[:4])
    fake_provider.push_batch(BatchPlan(polls=2, reply_without_id=True))

    first = batch(settings, store, "gemini", items, max_wait_s=0)
    state = store.read_json(store.layout.batch_state("gemini"))
    (job,) = state["jobs"]
    # The reply had no name: the job was looked up in the list and recorded with its real name.
    assert job["id"] == next(iter(fake_provider.batches)) and job["id"].startswith("batches/")
    assert first.status == "pending" and first.submitted == 4 and first.jobs_submitted == [job["id"]]
    assert job["reserved_usd"] > 0 and state["submissions_failed"] == []

    again = batch(settings, store, "gemini", items)
    assert again.status == "done" and again.labeled == 4 and again.unlabeled == []
    assert len(fake_provider.batch_creations()) == 1 and posts(fake_provider, ":generateContent") == []
    job = store.read_json(store.layout.batch_state("gemini"))["jobs"][0]
    assert job["reserved_usd"] == 0.0 and job["ingested_at"]
    ledger = store.read_json(store.layout.cost_ledger("gemini"))
    assert ledger["requests"] == 4 and ledger["cost_usd"] == pytest.approx(4 * 0.5 * GEMINI_FULL, abs=1e-6)


def test_a_reply_without_id_the_provider_does_not_list_is_no_job_and_goes_online(fake_provider, data, caplog):
    store, stems = data
    settings = settings_for(fake_provider)
    items = items_of(store, stems[:3])
    fake_provider.push_batch(BatchPlan(reply_without_id=True, listed=False))
    with caplog.at_level("WARNING"):
        outcome = batch(settings, store, "openai", items)
    assert outcome.status == "done" and outcome.unlabeled == [] and outcome.online["labeled"] == 3
    assert {f["reason"] for f in outcome.failed.values()} == {"no_job_id"}
    assert outcome.submissions_failed[0]["reason"] == "no_job_id"
    state = store.read_json(store.layout.batch_state("openai"))
    assert state["jobs"] == []  # never recorded as a job (no null id, nothing reserved)
    assert state["submissions_failed"][0]["items"].keys() == {i.stem for i in items}
    assert "no job id" in caplog.text
    # A rerun has everything cached: no second job for the same items.
    before = fake_provider.request_count
    assert batch(settings, store, "openai", items).cached == 3 and fake_provider.request_count == before
    assert len(fake_provider.batch_creations()) == 1


def test_a_failed_upload_is_finished_online(fake_provider, data):
    store, stems = data
    settings = settings_for(fake_provider)
    items = items_of(store, stems[:4])
    fake_provider.push_batch(BatchPlan(upload_status=500))
    outcome = batch(settings, store, "openai", items)
    assert fake_provider.batch_creations() == [] and len(posts(fake_provider, "/v1/files")) == 3  # 1 + 2 retries
    assert outcome.status == "done" and outcome.unlabeled == [] and len(chat_requests(fake_provider)) == 4
    assert {f["reason"] for f in outcome.failed.values()} == {"upload_failed"}
    assert store.read_json(store.layout.batch_state("openai"))["jobs"] == []
    assert store.read_json(store.layout.cost_ledger("openai"))["requests"] == 4


def test_the_phase3_task_finishes_a_failed_upload_online(prefect_api, fake_provider, data):
    from prefect import flow

    from floorplan_ft.settings import load_settings
    from tasks.labeling import label_with_teacher

    store, _ = data
    settings = load_settings(
        paths={"data_root": store.root},
        teachers={
            **settings_for(fake_provider).teachers.model_dump(),
            "use_batch_api": True,
            "batch_poll_interval_s": 0.01,
            "batch_max_wait_s": 10.0,
        },
        openai_api_key=OPENAI_KEY,
        openai_base_url=fake_provider.openai_base_url,
        gemini_api_key=GEMINI_KEY,
        gemini_base_url=fake_provider.gemini_base_url,
    )
    fake_provider.push_batch(BatchPlan(upload_status=400))

    @flow
    def phase3() -> dict:
        return label_with_teacher(settings, "openai").report()

    result = phase3()
    assert result["labeled"] == 0 and result["finished_online"] == 8 and result["unlabeled"] == 0
    assert result["status"] == "done" and result["submissions_failed"] == 1
    assert len(posts(fake_provider, "/v1/files")) == 1 and fake_provider.batch_creations() == []
    assert len(chat_requests(fake_provider)) == 8


def test_a_create_that_fails_after_making_the_job_is_adopted_and_a_refused_one_goes_online(fake_provider, data):
    store, stems = data
    settings = settings_for(fake_provider)
    items = items_of(store, stems)
    fake_provider.push_batch(BatchPlan(create_status=500, created_anyway=True))
    made = batch(settings, store, "openai", items[:4])
    assert made.status == "done" and made.labeled == 4 and chat_requests(fake_provider) == []
    assert len(fake_provider.batch_creations()) == 1 and made.jobs_submitted == list(fake_provider.batches)

    fake_provider.push_batch(BatchPlan(create_status=400))
    refused = batch(settings, store, "openai", items[4:])
    assert refused.status == "done" and refused.online["labeled"] == 4 and refused.unlabeled == []
    assert {f["reason"] for f in refused.failed.values()} == {"create_refused"}
    assert len(fake_provider.batches) == 1


def test_an_unknown_state_in_the_reply_is_kept_and_polled(fake_provider, data, caplog):
    store, stems = data
    settings = settings_for(fake_provider)
    items = items_of(store, stems[:3])
    fake_provider.push_batch(BatchPlan(reply_state="warming_up"))
    with caplog.at_level("WARNING"):
        outcome = batch(settings, store, "openai", items)
    assert "unknown state 'warming_up'" in caplog.text
    assert outcome.status == "done" and outcome.labeled == 3 and chat_requests(fake_provider) == []
    assert store.read_json(store.layout.batch_state("openai"))["jobs"][0]["status"] == "completed"


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_a_succeeded_job_whose_rows_are_all_unusable_is_finished_online(fake_provider, data, provider, caplog):
    store, stems = data
    settings = settings_for(fake_provider)
    items = items_of(store, stems[:4])
    fake_provider.push_batch(BatchPlan(rows="unusable"))
    with caplog.at_level("WARNING"):
        outcome = batch(settings, store, provider, items)
    assert "none of its" in caplog.text and "row(s) was usable" in caplog.text
    assert outcome.status == "done" and outcome.labeled == 0 and outcome.unlabeled == []
    assert sorted(outcome.finished_online) == sorted(stems[:4])
    assert {f["reason"] for f in outcome.failed.values()} == {"invalid_output"}
    online = chat_requests(fake_provider) if provider == "openai" else posts(fake_provider, ":generateContent")
    assert len(online) == 4
    # The unusable rows were billed (their tokens), at the discount; the online answers at full price.
    full = GPT4O_FULL if provider == "openai" else GEMINI_FULL
    ledger = store.read_json(store.layout.cost_ledger(provider))
    batch_requests = 4 + (1 if provider == "openai" else 0)  # OpenAI's output also had a line that is not JSON
    assert ledger["requests"] == batch_requests + 4
    assert ledger["cost_usd"] == pytest.approx(4 * 0.5 * full + 4 * full, abs=1e-6)
    assert store.read_json(store.layout.batch_state(provider))["jobs"][0]["unusable"] is True


def test_submissions_stay_under_the_enqueued_token_limit(fake_provider, data):
    store, stems = data
    items = items_of(store, stems)
    need = [messages_tokens(i.messages) + 1500 for i in items]
    limit = sum(need[:3])
    assert limit < sum(need[:4])
    settings = settings_for(fake_provider, batch_max_enqueued_tokens=limit)
    fake_provider.batch_enqueued_token_limit = limit  # the provider enforces the same number
    fake_provider.batch_default = BatchPlan(polls=1)

    outcome = batch(settings, store, "openai", items)
    assert outcome.status == "done" and outcome.labeled == 8 and chat_requests(fake_provider) == []
    sizes = [len(b.lines) for b in fake_provider.batches.values()]
    assert sum(sizes) == 8 and len(sizes) >= 3 and sizes[0] == 3
    assert fake_provider.enqueued_peak <= limit
    assert all(b.status == "completed" for b in fake_provider.batches.values())
    # One after the other: each job was created after the one before it had ended.
    batches = list(fake_provider.batches.values())
    created = fake_provider.batch_creations()
    assert len(created) == len(batches)
    assert job_lines_by_stem(fake_provider, "openai") == {s: 1 for s in stems}


def test_a_rerun_continues_the_split_submission_without_duplicates(fake_provider, data):
    store, stems = data
    items = items_of(store, stems)
    need = [messages_tokens(i.messages) + 1500 for i in items]
    settings = settings_for(fake_provider, batch_max_enqueued_tokens=sum(need[:4]))
    fake_provider.batch_default = BatchPlan(polls=2)

    first = batch(settings, store, "openai", items, max_wait_s=0)
    assert first.status == "pending" and first.submitted == 4 and first.queued == sorted(stems[4:])
    assert len(fake_provider.batch_creations()) == 1
    second = batch(settings, store, "openai", items, max_wait_s=0)  # the first job still runs: no room
    assert second.submitted == 0 and len(fake_provider.batch_creations()) == 1
    assert second.waiting == sorted(stems[:4]) and second.queued == sorted(stems[4:])

    third = batch(settings, store, "openai", items)
    assert third.status == "done" and third.labeled + first.labeled + second.labeled == 8
    assert third.unlabeled == [] and chat_requests(fake_provider) == []
    assert len(fake_provider.batch_creations()) == len(fake_provider.batches) >= 2
    assert job_lines_by_stem(fake_provider, "openai") == {s: 1 for s in stems}


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_an_enqueued_token_limit_below_the_setting_is_learnt_and_labels_in_batch(fake_provider, data, provider, caplog):
    store, stems = data
    items = items_of(store, stems[:6])
    need = [messages_tokens(i.messages) + 1500 for i in items]
    # The setting claims room for all six (a higher tier than the account has); the provider's
    # limit (input tokens only) holds four: OpenAI fails the job, Gemini refuses its create (429).
    field = "batch_max_enqueued_tokens" if provider == "openai" else "batch_max_enqueued_tokens_gemini"
    settings = settings_for(fake_provider, **{field: sum(need)})
    fake_provider.batch_enqueued_token_limit = sum(messages_tokens(i.messages) for i in items[:4])
    fake_provider.batch_default = BatchPlan(polls=1)
    with caplog.at_level("WARNING"):
        outcome = batch(settings, store, provider, items)
    assert "enqueued-token limit" in caplog.text
    assert outcome.status == "done" and outcome.unlabeled == [] and outcome.labeled == 6
    online = chat_requests(fake_provider) if provider == "openai" else posts(fake_provider, ":generateContent")
    assert online == []  # not sent online: submitted again in smaller jobs
    assert fake_provider.enqueued_peak <= fake_provider.batch_enqueued_token_limit
    if provider == "openai":
        assert next(iter(fake_provider.batches.values())).error_code == "token_limit_exceeded"
        sizes = [len(b.lines) for b in fake_provider.batches.values()]
        assert sizes[0] == 6 and sum(sizes[1:]) == 6 and len(sizes) >= 3
    else:
        sizes = [len(b.lines) for b in fake_provider.batches.values()]  # the refused create made none
        assert len(fake_provider.batch_creations()) == len(sizes) + 1 and sum(sizes) == 6 and len(sizes) >= 2


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_a_corrupt_job_record_is_rebuilt_from_the_provider_list(fake_provider, data, provider, caplog):
    store, stems = data
    settings = settings_for(fake_provider)
    items = items_of(store, stems[:5])
    fake_provider.batch_default = BatchPlan(polls=2)
    assert batch(settings, store, provider, items[:3], max_wait_s=0).status == "pending"
    path = store.layout.batch_state(provider)
    store.write_text(path, '{"version": 2, "jobs": [{"id": null, "token": ')  # cut short

    with caplog.at_level("WARNING"):
        outcome = batch(settings, store, provider, items)
    assert path in outcome.record_problem and "not readable as JSON" in outcome.record_problem
    assert path in caplog.text and "rebuilt" in caplog.text
    assert outcome.status == "done" and outcome.unlabeled == []
    # The running job was adopted (its three items never went out again); the other two were
    # submitted once (OpenAI: right away, its input file tells its items; Gemini: after it ended).
    assert job_lines_by_stem(fake_provider, provider) == {s: 1 for s in stems[:5]}
    online = chat_requests(fake_provider) if provider == "openai" else posts(fake_provider, ":generateContent")
    assert online == [] and len(fake_provider.batch_creations()) == 2
    rebuilt = store.read_json(path)
    assert rebuilt["rebuilt"]["old_record"].startswith(path + ".corrupt-")
    assert store.read_text(rebuilt["rebuilt"]["old_record"]).startswith('{"version": 2')
    ledger = store.read_json(store.layout.cost_ledger(provider))
    assert ledger["requests"] == 5


def test_a_corrupt_record_and_no_provider_list_submit_nothing(fake_provider, data, tmp_path):
    store, stems = data
    items = items_of(store, stems[:2])
    path = store.layout.batch_state("openai")
    store.write_json(path, {"jobs": [{"id": 12, "token": "t", "items": {}, "created_at": "2025-01-01T00:00:00"}]})
    settings = load_unreachable(tmp_path)
    outcome = batch(settings, store, "openai", items)
    assert outcome.status == "pending" and "jobs[0]: id 12 is not a job id" in outcome.record_problem
    assert "could not be read" in outcome.record_problem and outcome.submitted == 0
    assert store.read_json(path)["jobs"][0]["id"] == 12  # left as it was for the next run


def load_unreachable(tmp_path):
    import socket

    from floorplan_ft.settings import load_settings

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    base = settings_for.__globals__["FAST"]
    return load_settings(
        teachers={**base, "request_timeout_s": 2.0},
        openai_api_key=OPENAI_KEY,
        openai_base_url=f"http://127.0.0.1:{port}/v1",
        gemini_api_key=GEMINI_KEY,
        gemini_base_url=f"http://127.0.0.1:{port}",
    )
