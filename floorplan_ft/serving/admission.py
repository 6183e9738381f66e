"""Admission to the model: at most ``serving.max_concurrency`` calls at once and
``serving.max_queue`` more waiting (`AdmissionGate`); the rest are refused with `ServiceBusy`."""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from floorplan_ft.serving.errors import ServiceBusy


class AdmissionGate:
    """At most `slots` calls at once and `queue` more waiting; thread-safe and not bound to one event
    loop (the sync API runs each call on a loop of its own). `enter` raises `ServiceBusy` at once
    when the queue is full and after `wait_s` in the queue; `leave` hands the slot to the oldest
    waiter. Waiters are resolved on their own loops."""

    def __init__(self, slots: int, queue: int):
        self.slots = max(1, int(slots))
        self.queue = max(0, int(queue))
        self.running = 0
        self.rejected = 0
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self._lock = threading.Lock()
        self._closed_reason: str | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _busy(self, message: str, retry_after: float) -> ServiceBusy:
        self.rejected += 1
        return ServiceBusy(message, retry_after=retry_after)

    async def enter(self, wait_s: float, retry_after: float) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._closed_reason is not None:
                raise self._busy(self._closed_reason, retry_after)
            if self.running < self.slots and not self._waiters:
                self.running += 1
                return
            if len(self._waiters) >= self.queue:
                raise self._busy(
                    f"the model is busy: {self.running} call(s) running and {len(self._waiters)} "
                    f"waiting (serving.max_concurrency={self.slots}, serving.max_queue={self.queue})",
                    retry_after,
                )
            waiter = loop.create_future()
            entry = (loop, waiter)
            self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), wait_s)
        except BaseException as exc:
            with self._lock:
                queued = entry in self._waiters
                if queued:
                    self._waiters.remove(entry)
            if not queued:
                # The slot was handed over (or is on its way): give it on, never lose it.
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self.leave()
                elif not waiter.done():
                    waiter.cancel()  # the pending hand-over sees it and passes the slot on
            if isinstance(exc, TimeoutError):
                raise self._busy(
                    f"no model slot within {wait_s:g} s (serving.timeout_s): the queue is not moving fast enough",
                    retry_after,
                ) from None
            raise

    def leave(self) -> None:
        with self._lock:
            while self._waiters:
                loop, waiter = self._waiters.popleft()
                if waiter.done():
                    continue
                try:
                    loop.call_soon_threadsafe(self._hand_over, waiter)
                    return  # `running` is unchanged: the slot goes to that waiter
                except RuntimeError:  # its loop is closed
                    continue
            self.running = max(0, self.running - 1)

    def _hand_over(self, waiter: asyncio.Future) -> None:
        if waiter.done():  # it gave up in the meantime
            self.leave()
        else:
            waiter.set_result(True)

    def close(self, reason: str, retry_after: float) -> int:
        """Refuse new calls and reject the waiting ones (a shutdown). Returns how many waited."""
        with self._lock:
            self._closed_reason = reason
            waiters, self._waiters = list(self._waiters), deque()
        for loop, waiter in waiters:
            error = self._busy(reason, retry_after)
            try:
                loop.call_soon_threadsafe(lambda w=waiter, e=error: w.done() or w.set_exception(e))
            except RuntimeError:
                pass
        return len(waiters)

    def describe(self) -> dict[str, int]:
        return {
            "max_concurrency": self.slots,
            "max_queue": self.queue,
            "running": self.running,
            "waiting": self.waiting,
            "rejected": self.rejected,
        }
