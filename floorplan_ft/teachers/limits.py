"""Client-side rate limiting per teacher: requests and tokens per minute.

Providers enforce per-minute limits on requests and, more tightly, on tokens (GPT-4o tier 1:
~500 requests but 30K tokens a minute). A fixed number of requests in flight cannot respect a token
limit, so every request first takes its estimated tokens from a sliding one-minute window; when
the provider reports its real limits in `x-ratelimit-*` headers, the window adopts them, and a
429 pauses the whole teacher (not only the one request) for the time the provider asked.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

# The provider's minute plus a margin: our clock starts when a request is admitted, the provider's
# when it arrives, and network (or, in the benchmark, CPU) jitter moves arrivals by up to a second;
# without a margin the 121st request of a 120/min limit can land inside the provider's window and
# draw a 429. Half a second still drew a few on a loaded machine; 1.5 s costs 2.5% throughput.
WINDOW_S = 61.5


class RateLimiter:
    """Sliding-window limiter over requests and tokens; safe for many coroutines of one loop."""

    def __init__(
        self,
        requests_per_minute: int,
        tokens_per_minute: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = asyncio.sleep,
    ):
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self._clock = clock
        self._sleep = sleep
        self._events: deque[tuple[float, int]] = deque()  # (time, tokens) of admitted requests
        self._tokens_in_window = 0
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def _expire(self, now: float) -> None:
        while self._events and now - self._events[0][0] >= WINDOW_S:
            _, tokens = self._events.popleft()
            self._tokens_in_window -= tokens

    def _wait_time(self, now: float, tokens: int) -> float:
        if now < self._paused_until:
            return self._paused_until - now
        tokens = min(tokens, self.tokens_per_minute)  # one oversized request still goes, alone
        over_requests = len(self._events) + 1 - self.requests_per_minute
        over_tokens = self._tokens_in_window + tokens - self.tokens_per_minute
        if over_requests <= 0 and over_tokens <= 0:
            return 0.0
        # Walk the window until enough of it has expired for both limits.
        freed_tokens = 0
        for freed_requests, (at, used) in enumerate(self._events, start=1):
            freed_tokens += used
            if freed_requests >= over_requests and freed_tokens >= over_tokens:
                return max(0.0, at + WINDOW_S - now)
        return WINDOW_S

    async def acquire(self, tokens: int) -> float:
        """Wait until `tokens` fit in the window, then admit them; returns the seconds waited."""
        waited = 0.0
        async with self._lock:
            while True:
                now = self._clock()
                self._expire(now)
                delay = self._wait_time(now, tokens)
                if delay <= 0:
                    self._events.append((now, tokens))
                    self._tokens_in_window += tokens
                    return waited
                # Sleep in short slices: a settle() that hands back unused tokens or a new limit
                # from the provider's headers can admit this request earlier.
                step = min(delay, 1.0)
                waited += step
                await self._sleep(step)

    def settle(self, estimated: int, actual: int) -> None:
        """Replace a request's estimate by the tokens it really used (the most recent match)."""
        for i in range(len(self._events) - 1, -1, -1):
            at, used = self._events[i]
            if used == estimated:
                self._events[i] = (at, actual)
                self._tokens_in_window += actual - estimated
                return

    def pause(self, seconds: float) -> None:
        """After a 429: nobody on this teacher sends before `seconds` have passed."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    def adopt(self, requests_limit: int | None, tokens_limit: int | None) -> None:
        """Take the limits the provider announces (its headers are the truth; the settings are
        only the starting point until the first answer arrives)."""
        if requests_limit:
            self.requests_per_minute = int(requests_limit)
        if tokens_limit:
            self.tokens_per_minute = int(tokens_limit)
