"""Phase 3 against a real HTTP server that speaks OpenAI's and Gemini's wire formats."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fakes.provider_server import Reply
from plans import prepare_plans

from floorplan_ft.schemas import FloorPlanAnalysis
from floorplan_ft.settings import TeacherSettings, load_settings
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.factory import make_teacher
from floorplan_ft.teachers.items import build_items
from floorplan_ft.teachers.labeling import LabelingRun

OPENAI_KEY = "sk-test-LABELING-secret-key-0123456789"
GEMINI_KEY = "AIzaTEST-LABELING-secret-0123456789abcd"
FAST = {
    "backoff_s": [0.01, 0.02, 0.04],
    "retry_after_cap_s": 0.2,
    "concurrency": 3,
    "requests_per_minute": 100_000,
    "tokens_per_minute": 10_000_000,
}


def prepare(root: Path, count: int) -> tuple[ArtifactStore, list[str]]:
    store, stems = prepare_plans(root, count, complexes=2, seed=21)
    store.write_json(store.layout.run_file("sample"), {"stems": stems, "n": len(stems)})
    return store, stems


def settings_for(fake, **teachers):
    return load_settings(
        teachers={**FAST, **teachers},
        openai_api_key=OPENAI_KEY,
        openai_base_url=fake.openai_base_url,
        gemini_api_key=GEMINI_KEY,
        gemini_base_url=fake.gemini_base_url,
    )


def run_teacher(settings, store, name, stems):
    items, missing = build_items(store, stems)
    assert not missing
    return asyncio.run(LabelingRun(make_teacher(settings, name), store, settings.teachers).run(items))


@pytest.fixture
def data(tmp_path, no_dotenv):
    return prepare(tmp_path / "data", 10)


def test_labels_every_plan_then_a_rerun_sends_nothing(fake_provider, data):
    store, stems = data
    settings = settings_for(fake_provider)
    summary = run_teacher(settings, store, "openai", stems)
    assert (summary.labeled, summary.failed, summary.cached) == (10, 0, 0)
    assert fake_provider.request_count == 10
    meta = store.read_json(store.layout.analysis_meta(stems[0], "openai"))
    assert meta["model"] == "gpt-4o" and meta["attempts"] == 1 and meta["input_tokens"] == 120
    assert {"prompt_version", "schema_hash", "cost_usd", "output_tokens", "seconds"} <= set(meta)
    FloorPlanAnalysis.model_validate_json(Path(store.layout.analysis(stems[0], "openai")).read_text())
    ledger = store.read_json(store.layout.cost_ledger("openai"))
    assert ledger["requests"] == 10 and ledger["cost_usd"] == pytest.approx(summary.cost_usd, abs=1e-6)
    # Both teachers saw the same prompt: the user message is identical across providers.
    openai_prompts = {m["content"] for r in fake_provider.requests_to("chat/completions") for m in r.body["messages"]}

    again = run_teacher(settings, store, "openai", stems)
    assert (again.labeled, again.cached) == (0, 10)
    assert fake_provider.request_count == 10  # a second run sends zero requests

    run_teacher(settings, store, "gemini", stems)
    for request in fake_provider.requests_to("generateContent"):
        assert request.body["contents"][0]["parts"][0]["text"] in openai_prompts
        assert request.body["systemInstruction"]["parts"][0]["text"] in openai_prompts


def test_failures_are_handled_by_class_within_bounds(fake_provider, data):
    store, stems = data
    # The plan's fixed design (one re-ask, one larger budget) is these two settings at 1.
    settings = settings_for(fake_provider, max_invalid_attempts=1, max_truncated_attempts=1)
    name = {i: f"{stems[i]}.png" for i in range(10)}
    fake_provider.push_for(name[0], Reply.rate_limited(retry_after=0.05), Reply.ok())
    fake_provider.push_for(name[1], *[Reply.server_error(500)] * 4)
    fake_provider.push_for(name[2], Reply.truncated(), Reply.ok())
    fake_provider.push_for(name[3], Reply.truncated(), Reply.truncated())
    fake_provider.push_for(name[4], Reply.invalid_json(), Reply.ok())
    fake_provider.push_for(name[5], Reply.invalid_json(), Reply.invalid_json())
    fake_provider.push_for(name[6], Reply.refusal())
    fake_provider.push_for(name[7], Reply.content_filter())
    fake_provider.push_for(name[8], Reply.server_error(503), Reply.ok())

    summary = run_teacher(settings, store, "openai", stems)
    expected_attempts = {0: 2, 1: 4, 2: 2, 3: 2, 4: 2, 5: 2, 6: 1, 7: 1, 8: 2, 9: 1}
    assert fake_provider.request_count == sum(expected_attempts.values())
    failures = json.loads(Path(store.path("label_failures_openai.json")).read_text())["failures"]
    assert {s: f["reason"] for s, f in failures.items()} == {
        stems[1]: "server_error",
        stems[3]: "truncated",
        stems[5]: "invalid_output",
        stems[6]: "refusal",
        stems[7]: "refusal",
    }
    assert failures[stems[1]]["attempts"] == 4  # 1 + the 2 → 4 → 8 s backoff schedule
    assert (summary.labeled, summary.failed) == (5, 5)
    for i in (0, 2, 4, 8):
        assert store.read_json(store.layout.analysis_meta(stems[i], "openai"))["attempts"] == expected_attempts[i]

    requests = {
        i: [r for r in fake_provider.requests if name[i] in json.dumps(r.body, ensure_ascii=False)] for i in (2, 4)
    }
    budgets = [r.body["max_completion_tokens"] for r in requests[2]]
    assert budgets == [4096, 8192]  # one retry with a larger output budget
    reask = requests[4][1].body["messages"]
    assert reask[-2]["role"] == "assistant" and "스키마 검증" in reask[-1]["content"]
    # The failed attempts' tokens are paid for and booked.
    ledger = store.read_json(store.layout.cost_ledger("openai"))
    assert ledger["requests"] == fake_provider.request_count


def test_gemini_teacher_faults(fake_provider, data):
    store, stems = data
    settings = settings_for(fake_provider)
    fake_provider.push_for(f"{stems[0]}.png", Reply.rate_limited(retry_after=0.05), Reply.ok())
    # A body that is not JSON counts as an invalid answer: 1 + teachers.max_invalid_attempts of them.
    fake_provider.push_for(f"{stems[1]}.png", *[Reply.malformed_body()] * 5)
    fake_provider.push_for(f"{stems[2]}.png", Reply.prompt_blocked())
    summary = run_teacher(settings, store, "gemini", stems[:4])
    failures = json.loads(Path(store.path("label_failures_gemini.json")).read_text())["failures"]
    assert set(failures) == {stems[1], stems[2]} and failures[stems[2]]["reason"] == "refusal"
    assert summary.labeled == 2 and summary.rate_limited == 1


def test_budget_cap_is_never_exceeded(fake_provider, data):
    store, stems = data
    # Answers as big as the plan's (~3K in, 1.5K out ≈ $0.0225 each with gpt-4o); each attempt
    # reserves its worst case (the full 4,096-token output budget) before it is sent.
    fake_provider.usage = {"prompt_tokens": 3000, "completion_tokens": 1500, "cached_tokens": 0, "reasoning_tokens": 0}
    settings = settings_for(fake_provider, budget_usd=0.15, concurrency=2)
    summary = run_teacher(settings, store, "openai", stems)
    spent = store.read_json(store.layout.cost_ledger("openai"))["cost_usd"]
    assert spent <= 0.15
    assert summary.skipped_budget > 0 and summary.labeled > 0 and summary.stopped == "budget"
    assert summary.labeled + summary.skipped_budget == 10
    assert set(summary.unlabeled) == {s for s in stems if not Path(store.layout.analysis(s, "openai")).exists()}
    # A second run with the same cap finds the money already spent and sends nothing more.
    before = fake_provider.request_count
    run_teacher(settings, store, "openai", stems)
    assert store.read_json(store.layout.cost_ledger("openai"))["cost_usd"] <= 0.15
    assert fake_provider.request_count - before <= 1


def test_bad_key_stops_the_teacher_and_never_leaks(fake_provider, data, caplog):
    store, stems = data
    settings = settings_for(fake_provider, concurrency=1)
    fake_provider.push(Reply.unauthorized())
    summary = run_teacher(settings, store, "openai", stems)
    assert summary.stopped == "auth" and fake_provider.request_count == 1
    assert len(summary.unlabeled) == 10
    detail = json.dumps(summary.failures, ensure_ascii=False)
    assert "OPENAI_API_KEY" in detail


def test_no_key_in_any_file_or_log(fake_provider, data, caplog):
    store, stems = data
    settings = settings_for(fake_provider)
    fake_provider.push(Reply.unauthorized(), Reply.rate_limited(retry_after=0.01), Reply.server_error())
    with caplog.at_level("DEBUG"):
        run_teacher(settings, store, "openai", stems)
        run_teacher(settings, store, "gemini", stems)
    assert any(r.header("authorization") == f"Bearer {OPENAI_KEY}" for r in fake_provider.requests)
    for path in Path(store.root).rglob("*"):
        if path.is_file():
            data_bytes = path.read_bytes()
            assert OPENAI_KEY.encode() not in data_bytes and GEMINI_KEY.encode() not in data_bytes, path
    assert OPENAI_KEY not in caplog.text and GEMINI_KEY not in caplog.text


KILLED_RUN = """
import asyncio, sys
sys.path[:0] = {paths!r}
from floorplan_ft.settings import TeacherSettings, load_settings
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.factory import make_teacher
from floorplan_ft.teachers.items import build_items
from floorplan_ft.teachers.labeling import LabelingRun
settings = load_settings(teachers={{"concurrency": 2}}, openai_api_key={key!r}, openai_base_url={url!r})
store = ArtifactStore({root!r})
items, _ = build_items(store, {stems!r})
asyncio.run(LabelingRun(make_teacher(settings, "openai"), store, settings.teachers).run(items))
"""


def test_killed_run_never_pays_twice_for_a_finished_item(fake_provider, data, tmp_path):
    store, stems = data
    fake_provider.latency_s = 0.4
    script = tmp_path / "run.py"
    here = str(Path(__file__).resolve().parents[2])
    script.write_text(
        textwrap.dedent(
            KILLED_RUN.format(
                paths=[str(Path(here).parent), here],
                key=OPENAI_KEY,
                url=fake_provider.openai_base_url,
                root=str(store.root),
                stems=stems,
            )
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = [s for s in stems if Path(store.layout.analysis_meta(s, "openai")).exists()]
        if len(done) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {s for s in stems if Path(store.layout.analysis_meta(s, "openai")).exists()}
    assert 3 <= len(finished) < 10
    before = fake_provider.request_count

    fake_provider.latency_s = 0.0
    summary = run_teacher(settings_for(fake_provider), store, "openai", stems)
    resent = [
        r
        for r in fake_provider.requests[before:]
        if any(f"{s}.png" in json.dumps(r.body, ensure_ascii=False) for s in finished)
    ]
    assert resent == []
    assert summary.cached == len(finished) and summary.labeled == 10 - len(finished)


def test_an_openai_compatible_server_can_be_a_teacher(fake_provider, data):
    store, stems = data
    fake_provider.models = ["Qwen/Qwen3-32B"]
    settings = settings_for(
        fake_provider, compatible_base_url=fake_provider.openai_base_url, compatible_model="Qwen/Qwen3-32B"
    )
    summary = run_teacher(settings, store, "compatible", stems[:3])
    assert summary.labeled == 3 and summary.model == "Qwen/Qwen3-32B"
    body = fake_provider.requests_to("chat/completions")[0].body
    assert body["model"] == "Qwen/Qwen3-32B"
    assert body["chat_template_kwargs"] == {"enable_thinking": False}  # Qwen3 served non-thinking
    # The OpenAI key is never sent to a third-party server.
    assert all(OPENAI_KEY not in str(r.headers) for r in fake_provider.requests)


# ------------------------------------------------------------------ completeness under faults


async def _quick_sleep(seconds: float) -> None:
    # Backoff waits need not take real time; the limiter's pauses still follow the real clock
    # (capped by retry_after_cap_s), in short slices.
    await asyncio.sleep(min(seconds, 0.005))


def synthetic_items(n: int, tag: str = "F") -> list:
    """Items as the engine sees them; the plan's image name in the user turn identifies each."""
    from floorplan_ft.teachers.labeling import LabelItem

    return [
        LabelItem(
            f"{tag}{i:04d}",
            f"{tag}{i:04d}.png",
            [
                {"role": "system", "content": "평면도 분석가입니다."},
                {"role": "user", "content": f"{tag}{i:04d}.png 평면을 분석하세요."},
            ],
        )
        for i in range(n)
    ]


# The fault mix's 429s are random, not a real limit: a one-second provider window lets an adaptive
# limiter recover from them within the test (the field exists once the limiter has it).
FAULT_WINDOW = {"rate_window_s": 1.0} if "rate_window_s" in TeacherSettings.model_fields else {}


# Limits the fake announces in x-ratelimit-* headers, high enough that pacing plays no part.
ROOMY_HEADERS = {
    "x-ratelimit-limit-requests": "100000",
    "x-ratelimit-remaining-requests": "99999",
    "x-ratelimit-reset-requests": "1ms",
    "x-ratelimit-limit-tokens": "100000000",
    "x-ratelimit-remaining-tokens": "99999000",
    "x-ratelimit-reset-tokens": "1ms",
}


def run_items(settings, store, items, name="openai"):
    run = LabelingRun(make_teacher(settings, name), store, settings.teachers, sleep=_quick_sleep)
    return asyncio.run(run.run(items))


def gpt4o(input_tokens: int, output_tokens: int) -> float:
    return (input_tokens * 2.50 + output_tokens * 10.00) / 1e6


def test_the_fault_mix_labels_every_item(fake_provider, tmp_path, no_dotenv):
    from fakes.faults import FaultMix

    mix = FaultMix(seed=14, retry_after=1).install(fake_provider)
    fake_provider.rate_limit_headers = dict(ROOMY_HEADERS)
    store = ArtifactStore(tmp_path / "data")
    settings = settings_for(fake_provider, concurrency=5, **FAULT_WINDOW)
    items = synthetic_items(120)
    summary = run_items(settings, store, items)
    assert (summary.labeled, summary.failed, summary.skipped_budget) == (120, 0, 0), summary.failures
    assert mix.drawn["invalid_json"] > 0 and mix.drawn["truncated"] > 0 and mix.drawn["rate_limited"] > 0
    for item in items:
        FloorPlanAnalysis.model_validate_json(Path(store.layout.analysis(item.stem, "openai")).read_text())
    # Every request is in the ledger; every answer that came back (valid, broken or cut) is paid.
    chats = fake_provider.requests_to("chat/completions")
    ledger = store.read_json(store.layout.cost_ledger("openai"))
    assert ledger["requests"] == len(chats) == summary.requests
    billed = mix.drawn["ok"] + mix.drawn["invalid_json"] + mix.drawn["truncated"]
    assert ledger["cost_usd"] == pytest.approx(billed * gpt4o(120, 45), abs=1e-6)
    assert ledger["unsettled_requests"] == 0 and ledger["possibly_paid_twice"] == 0
    # ... and booked on the items: the sidecars add up to the ledger.
    booked = sum(store.read_json(store.layout.analysis_meta(i.stem, "openai"))["cost_usd"] for i in items)
    assert booked == pytest.approx(ledger["cost_usd"], abs=1e-5)
    assert mix.repaid == 0  # no item got a second valid answer
    assert summary.reasked > 0 and summary.larger_budget > 0


def _for(fake, stem):
    return [r for r in fake.requests_to("chat/completions") if f"{stem}.png" in json.dumps(r.body, ensure_ascii=False)]


def test_invalid_and_cut_answers_escalate_in_order(fake_provider, tmp_path, no_dotenv):
    store = ArtifactStore(tmp_path / "data")
    settings = settings_for(fake_provider)
    items = synthetic_items(3, "E")
    broken = '{"image_name": "E0000.png", "bay_count": '
    fake_provider.push_for("E0000.png", *[Reply.invalid_json(broken)] * 4, Reply.ok())
    fake_provider.push_for("E0001.png", *[Reply.truncated()] * 3, Reply.ok())
    fake_provider.push_for("E0002.png", Reply.truncated(), Reply.invalid_json(), Reply.ok())
    summary = run_items(settings, store, items)
    assert summary.labeled == 3

    invalid = _for(fake_provider, "E0000")
    original = invalid[0].body["messages"]
    assert [r.body["max_completion_tokens"] for r in invalid] == [4096, 4096, 8192, 8192, 8192]
    # 1st: a re-ask quoting the broken answer and the error; 2nd: the same with a larger budget.
    for reask in (invalid[1], invalid[2]):
        turns = reask.body["messages"]
        assert turns[: len(original)] == original
        assert turns[-2] == {"role": "assistant", "content": broken}
        assert "스키마 검증" in turns[-1]["content"] and "오류:" in turns[-1]["content"]
        assert len(turns[-1]["content"]) > len("스키마 검증") + 40  # the validation error is quoted
    # Then fresh asks: the original messages again.
    assert invalid[3].body["messages"] == original and invalid[4].body["messages"] == original

    cut = _for(fake_provider, "E0001")
    assert [r.body["max_completion_tokens"] for r in cut] == [4096, 8192, 16384, 16384]
    assert all(r.body["messages"] == cut[0].body["messages"] for r in cut)

    mixed = _for(fake_provider, "E0002")
    assert [r.body["max_completion_tokens"] for r in mixed] == [4096, 8192, 8192]
    assert "스키마 검증" in mixed[2].body["messages"][-1]["content"]

    # Every attempt is paid for and booked on its item.
    for stem, attempts in (("E0000", 5), ("E0001", 4), ("E0002", 3)):
        meta = store.read_json(store.layout.analysis_meta(stem, "openai"))
        assert meta["attempts"] == attempts
        assert meta["cost_usd"] == pytest.approx(attempts * gpt4o(120, 45), abs=1e-6)
    assert (summary.reasked, summary.fresh_asks) == (3, 3)


def test_per_item_caps_on_attempts_and_dollars(fake_provider, tmp_path, no_dotenv):
    from floorplan_ft.teachers.labeling import cost_usd, messages_tokens

    store = ArtifactStore(tmp_path / "data")
    items = synthetic_items(2, "C")
    # Attempts: at most 3 requests (the 429 is not counted), whatever the retry settings allow.
    fake_provider.push_for("C0000.png", Reply.rate_limited(retry_after=0.01), *[Reply.invalid_json()] * 6)
    # Dollars: room for two attempts' worst cases, not a third at the doubled budget.
    price = load_settings().teachers.prices["gpt-4o"]
    first = cost_usd(price, messages_tokens(items[1].messages) * 3 // 2, 4096)
    fake_provider.push_for("C0001.png", *[Reply.truncated()] * 6)
    cap = 2 * first + 0.002
    settings = settings_for(fake_provider, max_attempts_per_item=3, max_item_cost_usd=cap)
    summary = run_items(settings, store, items)
    failures = summary.failures
    assert failures["C0000"]["reason"] == "max_attempts" and failures["C0000"]["attempts"] == 4
    assert len(_for(fake_provider, "C0000")) == 4  # 1 × 429 + 3 answers
    assert failures["C0000"]["cost_usd"] == pytest.approx(3 * gpt4o(120, 45), abs=1e-6)
    assert failures["C0001"]["reason"] == "item_budget"
    assert len(_for(fake_provider, "C0001")) == 2
    assert failures["C0001"]["cost_usd"] == pytest.approx(2 * gpt4o(120, 45), abs=1e-6)
    assert "max_item_cost_usd" in failures["C0001"]["detail"]
    ledger = store.read_json(store.layout.cost_ledger("openai"))
    assert ledger["requests"] == 6
    assert ledger["cost_usd"] == pytest.approx(5 * gpt4o(120, 45), abs=1e-6)
