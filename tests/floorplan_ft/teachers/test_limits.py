import asyncio
import itertools

import pytest

from floorplan_ft.teachers.limits import RateLimiter


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.slept = []

    def __call__(self):
        return self.now

    async def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


def _admit(limiter, clock, tokens_list):
    times = []

    async def go():
        for tokens in tokens_list:
            await limiter.acquire(tokens)
            times.append(clock.now)

    asyncio.run(go())
    return times


def test_requests_per_minute_are_never_exceeded():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=3, tokens_per_minute=10**9, clock=clock, sleep=clock.sleep)
    times = _admit(limiter, clock, [1] * 10)
    for i, t in enumerate(times):
        in_window = [u for u in times if t - 61.5 < u <= t]
        assert len(in_window) <= 3, (i, times)
    assert times[3] == 61.5 and times[6] == 123.0


def test_tokens_per_minute_bound_the_rate():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=1000, tokens_per_minute=10_000, clock=clock, sleep=clock.sleep)
    times = _admit(limiter, clock, [4_500] * 6)
    # Two 4.5K requests fit a minute (spaced 60/1000 s), the third waits for the first to leave.
    assert times[:3] == pytest.approx([0.0, 0.06, 61.5])
    assert times[5] == pytest.approx(123.06)


def test_settle_returns_unused_tokens():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=1000, tokens_per_minute=10_000, clock=clock, sleep=clock.sleep)
    _admit(limiter, clock, [8_000])
    limiter.settle(8_000, 2_000)
    times = _admit(limiter, clock, [8_000])
    assert times == pytest.approx([0.06])  # the spacing only, not the 61.5 s of a full window


def test_pause_after_429_holds_everyone():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=1000, tokens_per_minute=10**9, clock=clock, sleep=clock.sleep)
    limiter.pause(7.5)
    assert _admit(limiter, clock, [1, 1]) == pytest.approx([7.5, 7.56])


def test_adopts_announced_limits():
    limiter = RateLimiter(requests_per_minute=500, tokens_per_minute=30_000)
    limiter.adopt(5_000, 450_000)
    assert (limiter.requests_per_minute, limiter.tokens_per_minute) == (5_000, 450_000)


# ------------------------------------------------------------------------------ pacing


def test_requests_are_spread_evenly_over_the_window():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=60, tokens_per_minute=10**9, clock=clock, sleep=clock.sleep)
    times = _admit(limiter, clock, [1] * 120)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 1.0 - 1e-9  # never two admissions closer than 60/rpm
    # No burst: the first minute gets its allowance one by one, not all at t=0.
    assert sum(1 for t in times if t < 10.0) == 10
    for t in times:  # and the sliding window (with its margin) still holds
        assert sum(1 for u in times if t - 61.5 < u <= t) <= 60


def _limited(limiter, clock, retry_after=None):
    """One 429 for the most recent admission."""
    return limiter.rate_limited(retry_after, sent_at=limiter._events[-1][3])


def test_a_429_lowers_the_rate_once_per_burst_and_it_recovers_slowly():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=100, tokens_per_minute=10**9, clock=clock, sleep=clock.sleep)
    times = _admit(limiter, clock, [1] * 5)
    in_flight = [e[3] for e in limiter._events]
    for sent_at in in_flight:  # five requests in flight all come back 429
        limiter.rate_limited(2.0, sent_at=sent_at)
    assert limiter.rate == pytest.approx(70.0)  # x0.7 once: all five were sent before the decrease
    assert limiter.rate_limited_count == 5
    # The pause holds everyone for the Retry-After.
    assert _admit(limiter, clock, [1])[0] >= times[-1] + 2.0
    # The next 429 (a request sent after the decrease) lowers it again.
    _limited(limiter, clock, 0.0)
    assert limiter.rate == pytest.approx(49.0)
    # Recovery: additive, one step (5% of the target, at least 1/min) per quiet quarter window
    # in which something was sent; never above the ceiling.
    rates = []
    for _ in range(20):
        _admit(limiter, clock, [1] * 15)
        rates.append(limiter.rate)
    assert rates[0] < 60 and all(b >= a for a, b in itertools.pairwise(rates))
    assert max(b - a for a, b in itertools.pairwise(rates)) <= 5.0 * 2 + 1e-9
    assert rates[-1] == pytest.approx(100.0)


def test_the_rate_never_drops_below_the_floor():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=10, tokens_per_minute=10**9, clock=clock, sleep=clock.sleep)
    for _ in range(30):
        _admit(limiter, clock, [1])
        _limited(limiter, clock, 0.0)
    assert limiter.rate == 1.0


def test_without_retry_after_the_pause_comes_from_the_window():
    clock = FakeClock()
    # Configured far above the provider's real limit; it took 60 in the first 24 s, then said no.
    limiter = RateLimiter(requests_per_minute=150, tokens_per_minute=10**9, clock=clock, sleep=clock.sleep)
    times = _admit(limiter, clock, [1] * 61)
    assert times[-1] == pytest.approx(24.0)
    pause = _limited(limiter, clock)
    assert pause == pytest.approx(61.5 - 24.0)  # until the oldest accepted request leaves the window
    assert limiter.rate == pytest.approx(105.0)
    # Evenly paced, a 429 without Retry-After still pauses (the new spacing), never zero.
    clock2 = FakeClock()
    paced = RateLimiter(requests_per_minute=60, tokens_per_minute=10**9, clock=clock2, sleep=clock2.sleep)
    _admit(paced, clock2, [1] * 70)
    pause = _limited(paced, clock2)
    assert paced.rate < 60 and pause == pytest.approx(60 / paced.rate) and pause > 1.0


def test_a_full_window_teaches_the_provider_limit_and_recovery_stops_below_it():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=150, tokens_per_minute=10**9, clock=clock, sleep=clock.sleep)
    _admit(limiter, clock, [1] * 61)
    _limited(limiter, clock)  # 24 s of history: too short to say what the provider's limit is
    assert limiter.learnt_limit is None and limiter.rate == pytest.approx(105.0)

    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=100, tokens_per_minute=10**9, clock=clock, sleep=clock.sleep)
    _admit(limiter, clock, [1] * 100)  # 100/min for a whole window, then the provider says no
    limiter.requests_per_minute = 150  # (a ceiling above it: what recovery would head for)
    _limited(limiter, clock)
    assert limiter.learnt_limit == 99.0  # accepted in the last minute: the refused one is not
    assert limiter.rate == pytest.approx(0.97 * 99)  # straight to just below it
    _admit(limiter, clock, [1])
    _limited(limiter, clock)  # refused again while already there: x0.7
    assert limiter.rate == pytest.approx(0.7 * 0.97 * 99)
    for _ in range(200):
        _admit(limiter, clock, [1])
    assert limiter.rate == pytest.approx(0.97 * 99)  # recovery stops just below what was accepted
    # Ten quiet windows after the 429 it probes above it again, up to the ceiling.
    while clock.now < 900:
        _admit(limiter, clock, [1] * 50)
    assert limiter.rate == pytest.approx(150.0)


def test_adopting_headers_keeps_a_reduced_rate_below_the_new_limit():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=500, tokens_per_minute=30_000, clock=clock, sleep=clock.sleep)
    limiter.adopt(120, None)
    assert limiter.rate == 120.0  # unreduced: follows the announcement
    _admit(limiter, clock, [1])
    _limited(limiter, clock, 0.0)
    limiter.adopt(5_000, None)
    assert limiter.rate == pytest.approx(84.0) and limiter.requests_per_minute == 5_000


# ------------------------------------------------------------------------------ across restarts


class WallClock(FakeClock):
    """Monotonic and wall clocks of one 'process': the wall clock is shared between processes."""

    def __init__(self, wall):
        super().__init__()
        self.now = 1000.0 * (1 + len(wall))  # every process has its own monotonic origin
        self.wall = wall

    def time(self):
        return self.wall[0] + self.now


def test_history_round_trips_through_wall_clock_and_prevents_a_burst():
    wall = [1.7e9]
    saved = []
    first = WallClock(wall)
    limiter = RateLimiter(60, 10**9, clock=first, sleep=first.sleep, wall=first.time, save=saved.append)
    _admit(limiter, first, [1] * 50)  # 49 s of 1/s
    limiter.maybe_save(force=True)
    state = saved[-1]
    assert len(state["events"]) == 50 and state["window_s"] == 60.0
    assert state["events"][-1][0] == pytest.approx(wall[0] + first.now)

    # The process dies; another starts 2 s later (new monotonic origin, same wall clock).
    wall[0] += first.now + 2.0 - 2000.0
    second = WallClock(wall)
    second.now = 2000.0
    restarted = RateLimiter(60, 10**9, clock=second, sleep=second.sleep, wall=second.time)
    assert restarted.restore(state) == 50
    times = _admit(restarted, second, [1] * 20)
    # 50 of the window are its predecessor's: only 10 more fit before they start to expire.
    assert sum(1 for t in times if t - 2000.0 < 10.0) <= 10
    all_times = [e[0] for e in restarted._events]
    for t in all_times:
        assert sum(1 for u in all_times if t - 61.5 < u <= t) <= 60


def test_restored_rate_pause_and_learnt_limit():
    wall = [1.7e9]
    saved = []
    first = WallClock(wall)
    limiter = RateLimiter(150, 10**9, clock=first, sleep=first.sleep, wall=first.time, save=saved.append)
    _admit(limiter, first, [1] * 80)
    _limited(limiter, first, 30.0)
    state = saved[-1]
    assert state["paused_until"] == pytest.approx(wall[0] + first.now + 30.0)
    second = WallClock(wall)
    second.now = first.now  # restarted at once, same instant
    wall2 = [wall[0]]
    second.wall = wall2
    restarted = RateLimiter(150, 10**9, clock=second, sleep=second.sleep, wall=second.time)
    restarted.restore(state)
    assert restarted.rate == pytest.approx(limiter.rate)
    assert restarted.learnt_limit == limiter.learnt_limit
    assert _admit(restarted, second, [1])[0] >= first.now + 30.0 - 1e-6  # the pause holds
    # A newer, lower ceiling wins over the saved rate.
    lower = RateLimiter(20, 10**9, clock=second, sleep=second.sleep, wall=second.time)
    lower.restore(state)
    assert lower.rate <= 20


def test_saves_at_most_once_a_second():
    clock = FakeClock()
    saved = []
    limiter = RateLimiter(600, 10**9, clock=clock, sleep=clock.sleep, save=saved.append)
    _admit(limiter, clock, [1] * 50)  # 0.1 s apart: 4.9 s
    assert 4 <= len(saved) <= 6
    limiter.maybe_save(force=True)
    assert len(saved[-1]["events"]) == 50


def test_an_unknown_history_format_is_refused():
    limiter = RateLimiter(60, 1000)
    with pytest.raises(ValueError, match="rate history"):
        limiter.restore({"version": 99})


def test_a_burst_pause_burst_provider_is_learnt_at_the_second_minute():
    """A sliding-window provider (60/min) and a limiter that believes 500/min: the first minute's
    429 comes after 7 s of watching (too early to learn), the next one after a pause of a whole
    window, which is enough: from then on it paces just below 60/min."""
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=500, tokens_per_minute=10**9, clock=clock, sleep=clock.sleep)
    _admit(limiter, clock, [1] * 61)
    _limited(limiter, clock)
    assert limiter.learnt_limit is None and limiter.rate == pytest.approx(350.0)
    times = _admit(limiter, clock, [1] * 61)
    assert times[0] == pytest.approx(61.5)  # the pause: until the first burst has left the window
    _limited(limiter, clock)
    assert limiter.learnt_limit == 60.0 and limiter.rate == pytest.approx(0.97 * 60)


def test_requests_sent_before_the_first_answer_count_from_that_answer():
    """A fresh client's first request can take seconds to leave, and those admitted meanwhile
    queue behind it: the provider counts them later than we admitted them."""
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=60, tokens_per_minute=10**9, clock=clock, sleep=clock.sleep)
    _admit(limiter, clock, [5, 5, 5])  # at 0, 1, 2
    clock.now = 3.5  # the first answer comes back: everything sent so far counts from here
    for _ in range(3):
        limiter.settle(5, 7)
    times = _admit(limiter, clock, [1] * 57)
    assert [e[0] for e in list(limiter._events)[:4]] == [3.5, 3.5, 3.5, times[0]]
    limiter.settle(1, 1)  # later answers leave their admission time alone
    assert limiter._events[3][0] == times[0]
    assert _admit(limiter, clock, [1]) == [pytest.approx(3.5 + 61.5)]  # the 61st: first answer + window


def test_429_despite_announced_room_pauses_without_slowing_down():
    """A provider whose headers say both limits have plenty left and that still answers 429 (a
    transient refusal): the teacher pauses as asked but keeps its rate; once the headers report
    the quota nearly used, a 429 lowers the rate as usual."""
    from floorplan_ft.teachers.limits import RateLimiter

    now = [0.0]
    limiter = RateLimiter(600, 1_000_000, clock=lambda: now[0], window_s=60.0)
    limiter.adopt(600, 1_000_000, remaining_requests=550, remaining_tokens=900_000)
    for _ in range(5):
        now[0] += 0.5
        assert limiter.rate_limited(1.0) == 1.0
    assert limiter.rate == 600 and limiter.transient_429s == 5
    # The quota is nearly gone: the next 429 is about our rate.
    now[0] += 0.5
    limiter.adopt(600, 1_000_000, remaining_requests=3, remaining_tokens=900_000)
    limiter.rate_limited(1.0)
    assert limiter.rate < 600
    # An announcement goes stale: seconds later a 429 is judged on its own again.
    limiter2 = RateLimiter(600, 1_000_000, clock=lambda: now[0], window_s=60.0)
    limiter2.adopt(600, 1_000_000, remaining_requests=550, remaining_tokens=900_000)
    now[0] += 30.0
    limiter2.rate_limited(None)
    assert limiter2.rate < 600 and limiter2.transient_429s == 0
