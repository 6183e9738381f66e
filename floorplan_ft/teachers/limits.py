"""Client-side pacing per teacher: requests and tokens per window, spaced, adaptive, persistent.

Providers enforce per-minute limits on requests and, more tightly, on tokens (GPT-4o tier 1:
~500 requests but 30K tokens a minute). A fixed number of requests in flight cannot respect a token
limit, so every request first takes its estimated tokens from a sliding window. On top of that:

- Spacing: two admissions are at least `window / rate` apart, so the window's allowance is spread
  over the window instead of going out in one burst (a provider that quantizes its limit, or one
  whose real limit is lower than we think, answers a burst with a wall of 429s).
- Adaptive rate: a 429 lowers the rate (multiplicative decrease, x0.7, never below 1/min); every
  quarter window without a 429 raises it additively, back to the configured or announced limit.
  Once we have watched for a full window, the number of requests the provider accepted in the
  window when it said no (or at an earlier 429, if more) is taken as its limit: the rate drops to
  97 % of it at once (x0.7 if it was already there), recovery stops there instead of running into
  it again, and only after ten quiet windows does the rate probe above it.
- Pause: a 429 pauses the whole teacher for the provider's Retry-After, or, when it sends none,
  until the oldest request of our window leaves it (that is when a sliding window has room again).
- Memory: the last window's admissions, the adaptive rate and the pause are written to the data
  root (wall-clock times) at most once a second and at the end, and a new run starts from them, so
  a restarted run does not burst into a window its predecessor filled.

When the provider reports its real limits in `x-ratelimit-*` headers, they replace the settings.
In-process times are `clock()` (monotonic); persisted ones are `time.time()`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The provider's window plus a margin: our clock starts when a request is admitted, the provider's
# when it arrives, and network (or, in the benchmark, CPU) jitter moves arrivals by up to a second;
# without a margin the 121st request of a 120/min limit can land inside the provider's window and
# draw a 429. Half a second still drew a few on a loaded machine; 1.5 s costs 2.5% throughput.
PROVIDER_WINDOW_S = 60.0
WINDOW_MARGIN_S = 1.5
WINDOW_S = PROVIDER_WINDOW_S + WINDOW_MARGIN_S

DECREASE = 0.7  # rate factor on a 429
FLOOR_RPM = 1.0  # the adaptive rate never goes below this
RECOVER_EVERY = 0.25  # of the window: one additive step per quiet quarter window
RECOVER_STEP = 0.05  # of the target rate per step (at least 1 request/min)
SAFE_SHARE = 0.97  # of a learnt provider limit: where recovery stops
PROBE_AFTER_WINDOWS = 10  # quiet windows after which a learnt limit is forgotten (probe above it)
# A 429 right after the provider's headers announced plenty of room (at least this share of both
# limits left) is not about our rate (an overloaded shard, a transient 429): pause, do not slow down.
ROOM_SHARE = 0.10
ROOM_FRESH_S = 10.0  # how long such an announcement stays believable
RETRY_MARGIN = 0.25  # of the window: a rate-limited item is kept at least window * (1 + this)
SAVE_EVERY_S = 1.0
HISTORY_VERSION = 1
UNLIMITED = 10**12


@dataclass(frozen=True)
class TeacherLimits:
    """The limits one teacher starts from, and where they came from."""

    requests_per_minute: int  # UNLIMITED: no client-side limit
    tokens_per_minute: int
    source: str


def teacher_limits(settings: Any, teacher: str, remote: bool = True) -> TeacherLimits:
    """Resolve a teacher's starting limits from TeacherSettings.

    Precedence per field: `teachers.requests_per_minute` / `tokens_per_minute` (explicit, every
    remote teacher) > `teachers.limits.<teacher>` > the built-in default of that teacher
    (settings._default_limits). 0 means unthrottled; a teacher without a remote API (the local model,
    the rules) is never throttled. Announced header limits replace these at run time (`adopt`).
    """
    from floorplan_ft.settings import _default_limits

    if not remote:
        return TeacherLimits(UNLIMITED, UNLIMITED, "in-process")
    builtin = _default_limits().get(teacher)
    configured = (getattr(settings, "limits", None) or {}).get(teacher)
    values, sources = {}, []
    for field in ("requests_per_minute", "tokens_per_minute"):
        explicit = getattr(settings, field, None)
        entry = getattr(configured, field, None) if configured is not None else None
        default = getattr(builtin, field, None) if builtin is not None else None
        if explicit is not None:
            value, source = explicit, f"teachers.{field}"
        elif entry is not None and entry != default:
            value, source = entry, f"teachers.limits.{teacher}"
        elif default is not None:
            value, source = default, "built-in"
        else:
            value, source = 0, "built-in"  # an unknown teacher name: no client-side limit
        values[field] = UNLIMITED if not value else int(value)
        sources.append(source)
    return TeacherLimits(values["requests_per_minute"], values["tokens_per_minute"], " / ".join(dict.fromkeys(sources)))


def rate_limit_exhausted(settings: Any, retries: int, waited_s: float) -> bool:
    """Whether an item rate-limited `retries` times, the first `waited_s` ago, is given up.

    It is kept at least the provider's window plus a margin (a sliding window always has room again
    by then) and until it has had `max_rate_limit_retries` retries, and at most
    `rate_limit_max_wait_s` in all."""
    window = float(getattr(settings, "rate_window_s", PROVIDER_WINDOW_S))
    max_wait = float(getattr(settings, "rate_limit_max_wait_s", 3 * window))
    if waited_s >= max_wait:
        return True
    return retries > settings.max_rate_limit_retries and waited_s >= window * (1 + RETRY_MARGIN)


class RateLimiter:
    """Sliding-window, spaced, adaptive limiter over requests and tokens; safe for many coroutines
    of one event loop."""

    def __init__(
        self,
        requests_per_minute: int,
        tokens_per_minute: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = asyncio.sleep,
        wall: Callable[[], float] = time.time,
        window_s: float = PROVIDER_WINDOW_S,
        pause_cap_s: float = PROVIDER_WINDOW_S,
        save: Callable[[dict], None] | None = None,
    ):
        self.requests_per_minute = requests_per_minute  # the ceiling: configured or announced
        self.tokens_per_minute = tokens_per_minute
        self.window_s = float(window_s)  # the provider's window
        self.span_s = self.window_s * WINDOW_S / PROVIDER_WINDOW_S  # ours: window plus margin
        self.pause_cap_s = pause_cap_s
        self.rate = float(requests_per_minute)  # the adaptive rate, per window
        self.learnt_limit: float | None = None  # what the provider accepted per window when it said no
        self.rate_limited_count = 0
        self._clock, self._sleep, self._wall = clock, sleep, wall
        # [time, tokens, rejected, admitted, settled] of admitted requests. `time` is the admission, except
        # for requests admitted before the first answer came back: they count from their answer.
        # A fresh client's first request can take seconds to leave (connection set-up, and under
        # load), and those admitted meanwhile queue behind it; the provider counts them when they
        # arrive, later than we admitted them, and the window would overflow a minute later.
        self._events: deque[list] = deque()
        self._warm_at: float | None = None  # when the first answer came back
        self._tokens_in_window = 0
        self._paused_until = 0.0
        self._next_at = -math.inf  # spacing: the earliest next admission
        self._last_decrease = -math.inf
        self._step_at = clock()  # the last additive step, or when the current quiet stretch began
        self._learnt_at = -math.inf
        self._observed_since = clock()  # since when this limiter (or its predecessor) has watched
        self._peak, self._peak_at = 0.0, -math.inf  # accepted per window at the last 429
        self._room_at = -math.inf  # when the headers last announced plenty of room
        self.transient_429s = 0  # 429s that came despite announced room (not counted against the rate)
        self._save = save
        self.history: StoredHistory | None = None  # set by limiter_for
        self.source = ""  # where the starting limits came from (teacher_limits)
        self._saved_at = -math.inf
        self._dirty = False
        self._lock = asyncio.Lock()

    # -------------------------------------------------------------- time
    def now(self) -> float:
        return self._clock()

    @property
    def spacing_s(self) -> float:
        return self.window_s / max(self.rate, FLOOR_RPM / 1e6)

    def _target(self, now: float) -> float:
        """Where recovery heads: the ceiling, or just below a provider limit learnt recently."""
        if self.learnt_limit is not None and now - self._learnt_at < PROBE_AFTER_WINDOWS * self.window_s:
            return max(FLOOR_RPM, min(float(self.requests_per_minute), SAFE_SHARE * self.learnt_limit))
        return float(self.requests_per_minute)

    def _recover(self, now: float) -> None:
        """Additive increase: one step per quiet quarter window in which something was sent."""
        every = RECOVER_EVERY * self.window_s
        target = self._target(now)
        if self.rate > target:  # a headers announcement or a settings change lowered the ceiling
            self.rate = target
            return
        # Steps older than the window cannot have sent anything we still know of.
        self._step_at = max(self._step_at, now - self.span_s - every)
        while self.rate < target and now - self._step_at >= every:
            self._step_at += every
            sent = any(self._step_at - every <= e[0] < self._step_at and not e[2] for e in self._events)
            if sent:
                self.rate = min(target, self.rate + max(1.0, RECOVER_STEP * target))
                self._dirty = True

    def _expire(self, now: float) -> None:
        while self._events and now - self._events[0][0] >= self.span_s:
            tokens = self._events.popleft()[1]
            self._tokens_in_window -= tokens

    def _wait_time(self, now: float, tokens: int) -> float:
        if now < self._paused_until:
            return self._paused_until - now
        if now < self._next_at:
            return self._next_at - now
        tokens = min(tokens, self.tokens_per_minute)  # one oversized request still goes, alone
        limit = max(1, math.floor(min(self.rate, self.requests_per_minute) + 1e-9))
        over_requests = len(self._events) + 1 - limit
        over_tokens = self._tokens_in_window + tokens - self.tokens_per_minute
        if over_requests <= 0 and over_tokens <= 0:
            return 0.0
        # Walk the window until enough of it has expired for both limits.
        freed_tokens = 0
        for freed_requests, (at, used, *_) in enumerate(self._events, start=1):
            freed_tokens += used
            if freed_requests >= over_requests and freed_tokens >= over_tokens:
                return max(0.0, at + self.span_s - now)
        return self.span_s

    async def acquire(self, tokens: int) -> float:
        """Wait until `tokens` fit in the window and the spacing allows, then admit them; returns
        the seconds waited (`now()` right after it returns is the admission time)."""
        waited = 0.0
        async with self._lock:
            while True:
                now = self._clock()
                self._recover(now)
                self._expire(now)
                delay = self._wait_time(now, tokens)
                if delay <= 0:
                    self._events.append([now, tokens, False, now, False])
                    self._tokens_in_window += tokens
                    self._next_at = now + self.spacing_s
                    self._dirty = True
                    self.maybe_save()
                    return waited
                # Sleep in short slices: a settle() that hands back unused tokens or a new limit
                # from the provider's headers can admit this request earlier.
                step = min(delay, 1.0)
                waited += step
                await self._sleep(step)

    def settle(self, estimated: int, actual: int) -> None:
        """Replace a request's estimate by the tokens it really used (the oldest unsettled match:
        answers come back roughly in order); one sent before the first answer came back counts
        from now (see `_events`)."""
        now = self._clock()
        if self._warm_at is None:
            self._warm_at = now
        for i in range(len(self._events)):
            at, used, rejected, admitted, settled = self._events[i]
            if used == estimated and not settled:
                warming = admitted < self._warm_at
                self._events[i] = [max(at, now) if warming else at, actual, rejected, admitted, True]
                self._tokens_in_window += actual - estimated
                self._dirty = True
                return

    # -------------------------------------------------------------- 429s
    def pause(self, seconds: float) -> None:
        """Nobody on this teacher sends before `seconds` have passed."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)
        self._dirty = True

    def rate_limited(self, retry_after: float | None = None, *, sent_at: float | None = None) -> float:
        """Book an HTTP 429 of the request admitted at `sent_at`: lower the rate (once per burst of
        429s: requests sent before the last decrease do not lower it again) and pause the teacher
        for `retry_after` or, without one, until the window has room again. Returns the pause."""
        now = self._clock()
        self.rate_limited_count += 1
        if sent_at is not None:
            for event in reversed(self._events):
                if event[3] == sent_at and not event[2]:
                    event[2] = True
                    break
        self._expire(now)
        room_announced = now - self._room_at <= ROOM_FRESH_S
        if room_announced:
            self.transient_429s += 1
        elif sent_at is None or sent_at > self._last_decrease:
            # What the provider took in the window before saying no (our admissions precede its
            # arrivals, so our window with its margin), and the most it took at an earlier 429.
            accepted = float(sum(1 for e in self._events if not e[2]))
            if now - self._peak_at < PROBE_AFTER_WINDOWS * self.window_s:
                accepted = max(accepted, self._peak)
            self._peak, self._peak_at = accepted, now
            target = self._target(now)
            if accepted and now - self._observed_since >= 0.9 * self.window_s:
                # Watched for a whole window: that count is the provider's limit. Go just below
                # it at once; already there (the limit fell, or the quota is shared): x0.7.
                self.learnt_limit, self._learnt_at = accepted, now
                target = self._target(now)
                self.rate = self.rate * DECREASE if self.rate <= target + 1e-9 else target
            else:  # too short a watch to tell a burst allowance from a rate: x0.7
                self.rate = min(self.rate * DECREASE, target)
            self.rate = max(FLOOR_RPM, self.rate)
            self._last_decrease = now
        if retry_after is not None:
            wait = max(0.0, float(retry_after))
        elif room_announced:  # not the window: a short pause, as for a 5xx
            wait = max(1.0, self.spacing_s)
        else:
            accepted_at = [e[0] for e in self._events if not e[2]]
            # Without Retry-After: a sliding window has room once its oldest request leaves it.
            wait = (accepted_at[0] + self.span_s - now) if accepted_at else 0.1 * self.window_s
            wait = max(wait, self.spacing_s)
        wait = min(wait, self.pause_cap_s)
        self.pause(wait)
        # The quiet stretch (and the recovery clock) starts when sending resumes.
        self._step_at = max(self._paused_until, now)
        self._next_at = max(self._next_at, now + min(self.spacing_s, self.pause_cap_s))
        self.maybe_save(force=True)
        return wait

    def adopt(
        self,
        requests_limit: int | None,
        tokens_limit: int | None,
        *,
        remaining_requests: int | None = None,
        remaining_tokens: int | None = None,
    ) -> None:
        """Take the limits the provider announces (its headers are the truth; the settings are
        only the starting point until the first answer arrives). With the remaining counts: when
        both limits have plenty left, a 429 in the next seconds is transient, not our rate."""
        if (
            requests_limit
            and tokens_limit
            and remaining_requests is not None
            and remaining_tokens is not None
            and remaining_requests >= ROOM_SHARE * requests_limit
            and remaining_tokens >= ROOM_SHARE * tokens_limit
        ):
            self._room_at = self._clock()
        elif remaining_requests is not None or remaining_tokens is not None:
            self._room_at = -math.inf
        if requests_limit:
            unreduced = self.rate >= self.requests_per_minute
            self.requests_per_minute = int(requests_limit)
            self.rate = float(requests_limit) if unreduced else min(self.rate, float(requests_limit))
        if tokens_limit:
            self.tokens_per_minute = int(tokens_limit)

    # -------------------------------------------------------------- across restarts
    def state(self) -> dict[str, Any]:
        """The recent history as JSON: wall-clock times, so another process can read it."""
        now, wall = self._clock(), self._wall()

        def to_wall(t: float) -> float | None:
            return None if not math.isfinite(t) else round(wall + (t - now), 3)

        self._expire(now)
        return {
            "version": HISTORY_VERSION,
            "saved_at": round(wall, 3),
            "window_s": self.window_s,
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
            "rate": round(self.rate, 3),
            "learnt_limit": self.learnt_limit,
            "learnt_at": to_wall(self._learnt_at),
            "last_decrease_at": to_wall(self._last_decrease),
            "recovery_step_at": to_wall(self._step_at),
            "observed_since": to_wall(self._observed_since),
            "peak": self._peak,
            "peak_at": to_wall(self._peak_at),
            "paused_until": to_wall(self._paused_until) if self._paused_until > now else None,
            "next_at": to_wall(self._next_at) if self._next_at > now else None,
            "rate_limited": self.rate_limited_count,
            "events": [[to_wall(e[0]), e[1], int(e[2])] for e in self._events],
        }

    def restore(self, data: dict[str, Any]) -> int:
        """Start from a predecessor's history (see `state`); returns how many of its admissions are
        still inside the window. The rate never exceeds this run's ceiling."""
        if not isinstance(data, dict) or data.get("version") != HISTORY_VERSION:
            raise ValueError(
                f"unknown rate history format (version {data.get('version') if isinstance(data, dict) else None!r})"
            )
        now, wall = self._clock(), self._wall()

        def to_mono(t: Any) -> float | None:
            return None if t is None else now + (float(t) - wall)

        kept = 0
        for at, tokens, rejected in data.get("events") or []:
            mono = to_mono(at)
            if mono is not None and now - self.span_s < mono <= now + 1.0:
                self._events.append([mono, int(tokens), bool(rejected), mono, True])
                self._tokens_in_window += int(tokens)
                kept += 1
        saved_rate = data.get("rate")
        if saved_rate is not None and float(saved_rate) < float(data.get("requests_per_minute") or math.inf):
            self.rate = max(FLOOR_RPM, min(self.rate, float(saved_rate)))
        learnt_at = to_mono(data.get("learnt_at"))
        if data.get("learnt_limit") and learnt_at is not None:
            self.learnt_limit, self._learnt_at = float(data["learnt_limit"]), learnt_at
        last_decrease = to_mono(data.get("last_decrease_at"))
        if last_decrease is not None:
            self._last_decrease = min(last_decrease, now)
        peak_at = to_mono(data.get("peak_at"))
        if data.get("peak") and peak_at is not None:
            self._peak, self._peak_at = float(data["peak"]), peak_at
        observed = to_mono(data.get("observed_since"))
        if observed is not None and kept:  # its watch goes on only if its window is still ours
            self._observed_since = min(self._observed_since, observed)
        step_at = to_mono(data.get("recovery_step_at"))
        if step_at is not None and self.rate < self.requests_per_minute:
            self._step_at = step_at  # the recovery goes on where the predecessor's stood
        paused = to_mono(data.get("paused_until"))
        if paused is not None and paused > now:
            self._paused_until = max(self._paused_until, paused)
            self._step_at = max(self._step_at, paused)
        nxt = to_mono(data.get("next_at"))
        if nxt is not None:
            self._next_at = max(self._next_at, nxt)
        if self._events:
            self._next_at = max(self._next_at, self._events[-1][0] + self.spacing_s)
        self._recover(now)
        return kept

    def maybe_save(self, *, force: bool = False) -> None:
        """Write the history through `save` when something changed, at most every SAVE_EVERY_S
        (forced: now)."""
        if self._save is None or not (self._dirty or force):
            return
        now = self._clock()
        if not force and now - self._saved_at < SAVE_EVERY_S:
            return
        self._saved_at, self._dirty = now, False
        self._save(self.state())


# ------------------------------------------------------------------------------ the teacher's limiter


class StoredHistory:
    """The limiter's history as `<data_root>/rate_window_<teacher>.json` in an ArtifactStore."""

    def __init__(self, store: Any, teacher: str):
        self.store, self.path = store, store.layout.rate_window(teacher)

    def load(self) -> dict | None:
        """The stored history, or None when there is none (a broken file: ValueError naming it)."""
        if not self.store.exists(self.path):
            return None
        return self.store.read_json(self.path)

    def save(self, state: dict) -> None:
        self.store.write_json(self.path, state, indent=None)


def limiter_for(
    teacher: str,
    remote: bool,
    settings: Any,
    *,
    store: Any = None,
    sleep: Callable[[float], object] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
) -> RateLimiter:
    """The limiter of one teacher: its resolved limits, the settings' window and pause cap, and
    (with a store and a remote teacher) its history in the data root."""
    limits = teacher_limits(settings, teacher, remote)
    history = StoredHistory(store, teacher) if (store is not None and remote) else None
    limiter = RateLimiter(
        limits.requests_per_minute,
        limits.tokens_per_minute,
        clock=clock,
        sleep=sleep,
        wall=wall,
        window_s=float(getattr(settings, "rate_window_s", PROVIDER_WINDOW_S)),
        pause_cap_s=float(getattr(settings, "retry_after_cap_s", PROVIDER_WINDOW_S)),
        save=history.save if history is not None else None,
    )
    limiter.source, limiter.history = limits.source, history
    return limiter


def load_history(limiter: RateLimiter) -> int:
    """Restore a limiter built by `limiter_for` from its stored history; a missing file is a fresh
    start, an unreadable one is replaced at the next save (the error names the file)."""
    history = getattr(limiter, "history", None)
    if history is None:
        return 0
    try:
        data = history.load()
        return 0 if data is None else limiter.restore(data)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        import logging

        logging.getLogger(__name__).warning("%s: rate history ignored (%s)", history.path, exc)
        return 0
