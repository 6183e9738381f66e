import asyncio

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
    # Two 4.5K requests fit a minute, the third waits for the first to leave the window.
    assert times[:3] == [0.0, 0.0, 61.5]
    assert times[5] == 123.0


def test_settle_returns_unused_tokens():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=1000, tokens_per_minute=10_000, clock=clock, sleep=clock.sleep)
    _admit(limiter, clock, [8_000])
    limiter.settle(8_000, 2_000)
    times = _admit(limiter, clock, [8_000])
    assert times == [0.0]


def test_pause_after_429_holds_everyone():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=1000, tokens_per_minute=10**9, clock=clock, sleep=clock.sleep)
    limiter.pause(7.5)
    assert _admit(limiter, clock, [1, 1]) == [7.5, 7.5]


def test_adopts_announced_limits():
    limiter = RateLimiter(requests_per_minute=500, tokens_per_minute=30_000)
    limiter.adopt(5_000, 450_000)
    assert (limiter.requests_per_minute, limiter.tokens_per_minute) == (5_000, 450_000)
