"""Phase 3 pacing against the real fake provider: per-provider limits, spacing, 429s without
headers, items kept past the provider's window, and the limiter's history across a restart."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path

import pytest
from fakes.provider_server import Reply
from plans import prepare_plans

from floorplan_ft.settings import load_settings
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.estimate import estimate_teacher
from floorplan_ft.teachers.factory import make_teacher
from floorplan_ft.teachers.items import build_items
from floorplan_ft.teachers.labeling import LabelingRun
from floorplan_ft.teachers.limits import (
    UNLIMITED,
    limiter_for,
    rate_limit_exhausted,
    teacher_limits,
)

OPENAI_KEY = "sk-test-PACING-secret-key-0123456789"
GEMINI_KEY = "AIzaTEST-PACING-secret-0123456789abcd"


def settings_for(fake, **teachers):
    return load_settings(
        teachers={"backoff_s": [0.01], "budget_usd": 1e6, **teachers},
        openai_api_key=OPENAI_KEY,
        openai_base_url=fake.openai_base_url,
        gemini_api_key=GEMINI_KEY,
        gemini_base_url=fake.gemini_base_url,
    )


@pytest.fixture
def data(tmp_path, no_dotenv):
    store, stems = prepare_plans(tmp_path / "data", 24, complexes=2, seed=5)
    return store, stems


def items_of(store, stems):
    items, missing = build_items(store, stems)
    assert not missing
    return items


# ------------------------------------------------------------------------------ limits per provider


def test_per_provider_defaults_and_their_precedence(tmp_path, no_dotenv):
    t = load_settings().teachers
    assert (t.requests_per_minute, t.tokens_per_minute) == (None, None)
    openai, gemini = teacher_limits(t, "openai"), teacher_limits(t, "gemini")
    assert (openai.requests_per_minute, openai.tokens_per_minute) == (500, 30_000)  # gpt-4o tier 1
    assert (gemini.requests_per_minute, gemini.tokens_per_minute) == (60, 1_000_000)
    assert gemini.source == "built-in"
    compatible = teacher_limits(t, "compatible")  # vLLM: no per-minute quota
    assert (compatible.requests_per_minute, compatible.tokens_per_minute) == (UNLIMITED, UNLIMITED)
    assert teacher_limits(t, "local", remote=False).requests_per_minute == UNLIMITED

    # A config file overrides one field of one teacher; the rest keep their defaults.
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[teachers.limits.gemini]\nrequests_per_minute = 150\n[teachers.limits.compatible]\nrequests_per_minute = 300\n"
    )
    t = load_settings(cfg).teachers
    gemini = teacher_limits(t, "gemini")
    assert (gemini.requests_per_minute, gemini.tokens_per_minute) == (150, 1_000_000)
    assert gemini.source == "teachers.limits.gemini / built-in"
    assert teacher_limits(t, "openai").requests_per_minute == 500  # not named: the built-in
    assert teacher_limits(t, "compatible").requests_per_minute == 300

    # The old explicit settings win over both, for every remote teacher.
    t = load_settings(cfg, teachers={"requests_per_minute": 40, "tokens_per_minute": 9_000}).teachers
    for name in ("openai", "gemini", "compatible"):
        limits = teacher_limits(t, name)
        assert (limits.requests_per_minute, limits.tokens_per_minute) == (40, 9_000)
        assert limits.source == "teachers.requests_per_minute / teachers.tokens_per_minute"


def test_limits_reach_the_labeling_run_and_the_estimate(fake_provider, data):
    store, _ = data
    settings = settings_for(
        fake_provider, compatible_base_url=fake_provider.openai_base_url, compatible_model="Qwen/Qwen3-32B"
    )
    runs = {
        name: LabelingRun(make_teacher(settings, name), store, settings.teachers)
        for name in ("openai", "gemini", "compatible", "reference")
    }
    assert (runs["openai"].limiter.requests_per_minute, runs["openai"].limiter.tokens_per_minute) == (500, 30_000)
    assert (runs["gemini"].limiter.requests_per_minute, runs["gemini"].limiter.tokens_per_minute) == (60, 1_000_000)
    assert runs["compatible"].limiter.tokens_per_minute == UNLIMITED
    assert runs["reference"].limiter.requests_per_minute == UNLIMITED and runs["reference"].limiter.history is None
    # 30K tokens/min is GPT-4o's, not the compatible server's.
    assert "in flight" in estimate_teacher(settings, "compatible", 100).limited_by
    assert estimate_teacher(settings, "openai", 100).limited_by == "30000 tokens/min"


def test_time_bound_of_a_rate_limited_item(no_dotenv):
    t = load_settings(teachers={"max_rate_limit_retries": 2, "rate_limit_max_wait_s": 180}).teachers
    assert not rate_limit_exhausted(t, 10, 74.0)  # many retries, but not yet the window + 25%
    assert rate_limit_exhausted(t, 3, 75.0)
    assert not rate_limit_exhausted(t, 2, 170.0)  # the retries not yet used up
    assert rate_limit_exhausted(t, 1, 180.0)  # the total wait bounds everything
    short = load_settings(teachers={"rate_limit_max_wait_s": 30}).teachers
    assert rate_limit_exhausted(short, 1, 30.0)  # a bound below the window wins


# ------------------------------------------------------------------------------ against the server


def record_admissions(run, now) -> list[float]:
    """Wrap the run's limiter so every admission's time (by `now`) is appended to the list returned."""
    admitted: list[float] = []
    acquire = run.limiter.acquire

    async def recording(tokens):
        waited = await acquire(tokens)
        admitted.append(now())
        return waited

    run.limiter.acquire = recording
    return admitted


def test_requests_arrive_evenly_spaced(fake_provider, data):
    store, stems = data
    fake_provider.rate_limit_headers = {}
    # 12 per 3 s window: one every 0.25 s, however many are in flight.
    settings = settings_for(
        fake_provider, concurrency=5, rate_window_s=3.0, limits={"gemini": {"requests_per_minute": 12}}
    )
    run = LabelingRun(make_teacher(settings, "gemini"), store, settings.teachers)
    admitted = record_admissions(run, time.monotonic)
    summary = asyncio.run(run.run(items_of(store, stems[:10])))
    assert summary.labeled == 10
    gaps = [b - a for a, b in itertools.pairwise(admitted)]
    # Admitted 0.25 s apart, however many are in flight (without spacing, 5 would go at once).
    # Measured after the await returns, so a loaded machine can shift one admission by a little.
    # A record seen late shortens one gap and lengthens the next, so judge most gaps, not all.
    assert sum(g >= 0.2 for g in gaps) >= 7, gaps
    assert admitted[-1] - admitted[0] >= 1.5, gaps
    arrivals = [r.at for r in fake_provider.requests_to("generateContent")]
    # The client's first request sets up its connection (~0.5 s) and the next few queue behind
    # it; from then on they arrive as they were admitted (give or take scheduling jitter).
    assert arrivals[9] - arrivals[4] >= 5 * 0.25 - 0.1
    assert sorted(b - a for a, b in itertools.pairwise(arrivals[4:]))[2] >= 0.2  # the median


def test_bare_429s_slow_the_teacher_down_and_no_item_is_lost(fake_provider, data):
    """The one real-time test (~15 s): a provider that announces nothing and enforces 12 per
    10 s window, with the engine configured three times too fast."""
    store, stems = data
    fake_provider.rate_limit_headers = {}
    fake_provider.rpm_limit, fake_provider.rpm_window_s, fake_provider.rpm_retry_after = 12, 10.0, False
    fake_provider.latency_s = 0.05
    settings = settings_for(
        fake_provider,
        concurrency=5,
        rate_window_s=10.0,
        retry_after_cap_s=10.0,
        max_rate_limit_retries=1,
        rate_limit_max_wait_s=40.0,
        limits={"gemini": {"requests_per_minute": 36}},
    )
    run = LabelingRun(make_teacher(settings, "gemini"), store, settings.teachers)
    summary = asyncio.run(run.run(items_of(store, stems)))
    assert (summary.labeled, summary.failed) == (24, 0)  # nothing given up as rate_limited
    rejected = fake_provider.rejected_429
    assert 1 <= len(rejected) <= 8  # it drew some 429s, then slowed down instead of hammering
    assert run.limiter.rate < 36 and run.limiter.rate_limited_count >= 1  # lowered, recovering
    start = fake_provider.requests[0].at
    late = [t for t in rejected if t - start >= 12.0]
    assert len(late) <= 1  # after the first window it keeps below the limit
    history = json.loads(Path(store.layout.rate_window("gemini")).read_text())
    assert history["rate"] == pytest.approx(run.limiter.rate, abs=0.01) and history["rate_limited"] >= 1


def test_an_item_rate_limited_past_the_window_is_kept(fake_provider, data):
    store, stems = data
    fake_provider.rate_limit_headers = {}
    settings = settings_for(
        fake_provider,
        concurrency=2,
        rate_window_s=4.0,
        max_rate_limit_retries=1,
        rate_limit_max_wait_s=30.0,
        retry_after_cap_s=5.0,
        limits={"gemini": {"requests_per_minute": 600}},
    )

    def sent_for(stem):
        return [r.at for r in fake_provider.requests if f"{stem}.png" in json.dumps(r.body, ensure_ascii=False)]

    # Three 429s, 2 s apart: the item waits 6 s, longer than the provider's 4 s window, although
    # by count it may have only one retry.
    fake_provider.push_for(f"{stems[0]}.png", *[Reply.rate_limited(retry_after=2)] * 3)
    summary = asyncio.run(
        LabelingRun(make_teacher(settings, "gemini"), store, settings.teachers).run(items_of(store, stems[:1]))
    )
    assert summary.labeled == 1
    kept = sent_for(stems[0])
    assert len(kept) == 4 and kept[-1] - kept[0] >= 4.0

    # An item refused for good is given up once it had its retry and the window + 25% (5 s).
    fake_provider.push_for(f"{stems[1]}.png", *[Reply.rate_limited(retry_after=1)] * 50)
    summary = asyncio.run(
        LabelingRun(make_teacher(settings, "gemini"), store, settings.teachers).run(items_of(store, stems[1:2]))
    )
    assert summary.failures[stems[1]]["reason"] == "rate_limited"
    given_up = sent_for(stems[1])
    # (the rate falls to its floor, one request per window, so the last retries are 4 s apart)
    assert 5.0 - 1.0 <= given_up[-1] - given_up[0] <= 5.0 + 4.0 + 1.0


# ------------------------------------------------------------------------------ across restarts


class Clocks:
    """One process's monotonic clock (its own origin) and the shared wall clock, advanced only by
    the limiter's sleeps: the run takes no real time waiting."""

    def __init__(self, wall: list[float], origin: float):
        self.mono, self.wall, self.origin = origin, wall, origin

    def clock(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall[0] + (self.mono - self.origin)

    async def sleep(self, seconds: float) -> None:
        self.mono += seconds


def labeled_with_clocks(settings, store, items, clocks):
    run = LabelingRun(make_teacher(settings, "gemini"), store, settings.teachers, sleep=clocks.sleep)
    run.limiter = limiter_for(
        "gemini", True, settings.teachers, store=store, sleep=clocks.sleep, clock=clocks.clock, wall=clocks.time
    )
    admitted = record_admissions(run, clocks.time)
    summary = asyncio.run(run.run(items))
    return run, summary, admitted


def test_a_restarted_run_goes_on_from_its_predecessors_window(fake_provider, data):
    store, stems = data
    fake_provider.rate_limit_headers = {}
    settings = settings_for(fake_provider, concurrency=3, limits={"gemini": {"requests_per_minute": 60}})
    # The first run is slowed by a 429 on its last item and pauses 20 s.
    fake_provider.push_for(f"{stems[9]}.png", Reply.rate_limited(retry_after=20))
    wall = [1.75e9]
    first = Clocks(wall, origin=500.0)
    _run1, summary1, times1 = labeled_with_clocks(settings, store, items_of(store, stems[:10]), first)
    assert summary1.labeled == 10 and summary1.rate_limited == 1
    history = json.loads(Path(store.layout.rate_window("gemini")).read_text())
    assert len(history["events"]) == 11 and history["rate"] == pytest.approx(42.0)
    end1 = first.time()

    # A new process 1 s later (its monotonic clock starts elsewhere) restores the window and rate.
    wall[0] = end1 + 1.0
    second = Clocks(wall, origin=9000.0)
    _run2, summary2, times2 = labeled_with_clocks(settings, store, items_of(store, stems[10:20]), second)
    assert summary2.labeled == 10
    assert times2[0] >= times1[-1] + 60 / 42.0 - 1e-6  # no immediate burst: the spacing goes on
    gaps = [b - a for a, b in itertools.pairwise(times2)]
    assert min(gaps) >= 60 / 60.0 - 1e-6 and gaps[0] >= 60 / 45.0  # still near the lowered rate
    everything = times1 + times2
    for t in everything:
        assert sum(1 for u in everything if t - 61.5 < u <= t) <= 60

    # The same restart without the history file starts afresh at the full rate at once.
    Path(store.layout.rate_window("gemini")).unlink()
    wall[0] = second.time() + 1.0
    third = Clocks(wall, origin=20000.0)
    run3, _, times3 = labeled_with_clocks(settings, store, items_of(store, stems[20:24]), third)
    assert times3[0] == pytest.approx(wall[0]) and run3.limiter.rate == 60.0


def test_a_broken_history_file_is_a_fresh_start(fake_provider, data, caplog):
    store, stems = data
    Path(store.layout.rate_window("gemini")).parent.mkdir(parents=True, exist_ok=True)
    Path(store.layout.rate_window("gemini")).write_text("{not json")
    settings = settings_for(fake_provider, limits={"gemini": {"requests_per_minute": 600}})
    with caplog.at_level("WARNING"):
        summary = asyncio.run(
            LabelingRun(make_teacher(settings, "gemini"), store, settings.teachers).run(items_of(store, stems[:2]))
        )
    assert summary.labeled == 2
    assert "rate_window_gemini.json" in caplog.text
    assert json.loads(Path(store.layout.rate_window("gemini")).read_text())["version"] == 1
    assert isinstance(ArtifactStore(store.root).read_json(store.layout.rate_window("gemini")), dict)
