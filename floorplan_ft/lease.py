"""One writer per data root: a lease file that names the run holding it.

Two pipeline runs on one data root would both write `student/`, the ledgers and the JSONL, and the
last writer would win. A run takes the lease `<data_root>/.ft-pipeline.lease.json` (`Layout.lease`) before its
writing phases and keeps it fresh with a heartbeat; a second run fails at once with a message naming
the run that holds it. A lease whose heartbeat is older than its time-to-live belongs to a run that
died (a killed pod): the next run takes it over and says so. Re-entry from the same process (the
parent flow's CV subflow) is allowed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self

from floorplan_ft.store import ArtifactStore

logger = logging.getLogger(__name__)

TTL_S = float(os.environ.get("FTP_LEASE_TTL_S", "120"))  # a holder silent this long is dead

_held: dict[str, int] = {}  # data roots whose lease this process holds, and how many times
_held_lock = threading.Lock()


class LeaseHeld(RuntimeError):
    """Another live run holds the data root's lease."""


def _now() -> float:
    return time.time()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


@dataclass
class DataRootLease:
    """The lease of one data root for `owner` (e.g. "flow run 'sassy-fox' (<id>)").

    Use as a context manager; `acquire` raises `LeaseHeld` naming the holder."""

    store: ArtifactStore
    owner: str
    ttl_s: float = TTL_S
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _reentered: bool = field(default=False, repr=False)

    @property
    def path(self) -> str:
        return self.store.layout.lease()

    def _record(self, acquired_at: float) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "acquired_at": _iso(acquired_at),
            "heartbeat": _now(),
            "ttl_s": self.ttl_s,
        }

    def holder(self) -> dict[str, Any] | None:
        """The current lease record, or None (no file, or one that does not read)."""
        try:
            if not self.store.exists(self.path):
                return None
            data = self.store.read_json(self.path)
        except (ValueError, OSError):
            return None
        return data if isinstance(data, dict) else None

    def acquire(self) -> DataRootLease:
        with _held_lock:
            if _held.get(self.store.root):
                _held[self.store.root] += 1
                self._reentered = True
                return self
        current = self.holder()
        if current is not None and current.get("token") != self.token:
            age = _now() - float(current.get("heartbeat") or 0)
            if age <= float(current.get("ttl_s") or self.ttl_s):
                raise LeaseHeld(
                    f"{self.store.root} is in use by {current.get('owner')} on {current.get('host')} "
                    f"(since {current.get('acquired_at')}, last heartbeat {age:.0f} s ago): wait for it to "
                    f"finish, or cancel it. If that run is dead, its lease expires {self.ttl_s:.0f} s after "
                    f"its last heartbeat; deleting {self.path} frees it at once."
                )
            logger.warning(
                "%s: taking over the lease of %s, silent for %.0f s (a run that died)",
                self.store.root,
                current.get("owner"),
                age,
            )
        self._write(_now())
        if (self.holder() or {}).get("token") != self.token:  # another run wrote between our read and write
            raise LeaseHeld(f"{self.store.root}: another run took the lease at the same moment; try again")
        with _held_lock:
            _held[self.store.root] = 1
        self._thread = threading.Thread(target=self._beat, name="ftp-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _write(self, acquired_at: float) -> None:
        self.store.write_json(self.path, self._record(acquired_at))

    def _beat(self) -> None:
        acquired = _now()
        while not self._stop.wait(max(self.ttl_s / 4, 0.05)):
            try:
                if (self.holder() or {}).get("token") == self.token:
                    self._write(acquired)
            except OSError as exc:  # pragma: no cover - a flaky mount; the next beat tries again
                logger.warning("lease heartbeat on %s failed: %s", self.path, exc)

    def release(self) -> None:
        with _held_lock:
            count = _held.get(self.store.root, 0)
            if self._reentered:
                _held[self.store.root] = count - 1
                return
            _held.pop(self.store.root, None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if (self.holder() or {}).get("token") == self.token:
            self.store.delete(self.path)

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
