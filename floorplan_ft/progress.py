"""Progress people can see: one console line every few seconds and a Prefect progress artifact.

A long step (CV over 2,000 plans, labeling for an hour, fine-tuning) calls ``progress.update(...)``
as often as it likes; a side thread turns the latest figures into at most one log line per
``interval_s`` (done / N, failures, rate, ETA, dollars) and hands the same text to ``publish``
(the task layer's Prefect progress artifact, `tasks.common.step_progress`). The step's own loop
never waits on the console or the Prefect API. No Prefect here: the domain package stays free of it.

``summarize(names)`` shortens a long list for a log line: ``"a, b, c … and 1,997 more"``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Self

_log = logging.getLogger("ft_pipeline.progress")
HEARTBEAT = 6  # intervals without news before the same line is printed again


def summarize(names: Iterable[Any], limit: int = 8) -> str:
    """The first `limit` names, then how many more: never a 2,000-name log line."""
    items = [str(n) for n in names]
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f" … and {len(items) - limit:,} more"


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


@dataclass
class Snapshot:
    done: int = 0
    failed: int = 0
    dollars: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Progress:
    """Throttled progress of one step over `total` units.

    ``label`` starts every line (``"phase 3 openai"``); ``unit`` names what is counted.
    ``publish(percent, line)``, when given, receives every printed line too (the task layer passes
    one that updates a Prefect progress artifact). Use as a context manager or call ``close()``:
    the final line is always printed.
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        unit: str = "plans",
        interval_s: float = 5.0,
        publish: Callable[[float, str], None] | None = None,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        clock: Callable[[], float] = time.monotonic,
        start_thread: bool = True,
    ):
        self.label, self.total, self.unit = label, max(int(total), 0), unit
        self.interval_s = interval_s
        self.logger = logger or _log
        self._clock = clock
        self._started = clock()
        self._snap = Snapshot()
        self._version = 0
        self._printed_version = -1
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._publish_fn = publish
        self.lines: list[str] = []  # every line printed (tests, the final summary)
        self._thread: threading.Thread | None = None
        if start_thread:
            self._thread = threading.Thread(target=self._loop, name=f"progress-{label}", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ updates (any thread)
    def update(
        self,
        done: int,
        *,
        failed: int | None = None,
        dollars: float | None = None,
        note: str | None = None,
        **extra: Any,
    ) -> None:
        """Record the latest figures (cheap: no I/O). `extra` values appear as ``key value``."""
        with self._lock:
            snap = self._snap
            snap.done = int(done)
            if failed is not None:
                snap.failed = int(failed)
            if dollars is not None:
                snap.dollars = float(dollars)
            if note is not None:
                snap.note = note
            snap.extra.update(extra)
            self._version += 1

    # ------------------------------------------------------------------ text
    def line(self) -> str:
        """The current figures as one line: done / N (%), failed, rate, ETA, dollars, extras."""
        with self._lock:
            snap = Snapshot(
                self._snap.done, self._snap.failed, self._snap.dollars, self._snap.note, dict(self._snap.extra)
            )
        elapsed = max(self._clock() - self._started, 1e-9)
        parts = [f"{self.label}: {snap.done:,}/{self.total:,} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * snap.done / self.total:.0f}%)"
        if snap.failed:
            parts.append(f"{snap.failed:,} failed")
        for key, value in snap.extra.items():
            parts.append(f"{key} {value:,}" if isinstance(value, int) else f"{key} {value}")
        rate = snap.done / elapsed * 60.0
        parts.append(f"{rate:,.1f}/min" if rate < 100 else f"{rate:,.0f}/min")
        remaining = self.total - snap.done
        if snap.done and remaining > 0:
            parts.append(f"ETA {format_duration(remaining / (snap.done / elapsed))}")
        elif remaining <= 0 and self.total:
            parts.append(f"took {format_duration(elapsed)}")
        if snap.dollars is not None:
            parts.append(f"${snap.dollars:,.4f}")
        if snap.note:
            parts.append(snap.note)
        return " · ".join(parts)

    def fraction(self) -> float:
        with self._lock:
            done = self._snap.done
        return 1.0 if not self.total else min(1.0, done / self.total)

    # ------------------------------------------------------------------ output
    def flush(self, force: bool = False) -> str | None:
        """Print (and publish) the current line if anything changed since the last one."""
        with self._lock:
            changed = self._version != self._printed_version
            self._printed_version = self._version
        if not (changed or force):
            return None
        text = self.line()
        self.lines.append(text)
        self.logger.info("%s", text)
        self._publish(text)
        return text

    def _loop(self) -> None:
        self.flush(force=True)  # the step has started: say so at once
        last = self._clock()
        while not self._stop.wait(self.interval_s):
            # Nothing finished for a while (a long rate-limit wait, a slow batch): still say so
            # every HEARTBEAT intervals, so a quiet console never looks like a hung one.
            heartbeat = self._clock() - last >= HEARTBEAT * self.interval_s
            if self.flush(force=heartbeat) is not None:
                last = self._clock()

    def close(self) -> str:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return self.flush(force=True) or self.line()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _publish(self, text: str) -> None:
        if self._publish_fn is None:
            return
        try:
            self._publish_fn(100.0 * self.fraction(), text)
        except Exception as exc:  # noqa: BLE001 - progress is never worth failing a step
            _log.debug("progress publish failed (%s)", exc)
