"""One writer per data root: the lease names its holder, beats while held, expires when the
holder dies, and allows re-entry from the same process."""

from __future__ import annotations

import json
import time

import pytest

import floorplan_ft.lease as module
from floorplan_ft.lease import DataRootLease, LeaseHeld
from floorplan_ft.store import ArtifactStore


def _foreign_lease(store: ArtifactStore, *, heartbeat: float, owner: str = "flow run 'other-run' (1234)") -> None:
    store.write_json(
        store.layout.lease(),
        {
            "owner": owner,
            "token": "t-other",
            "host": "pod-7",
            "acquired_at": "2026-12-02T01:00:00+00:00",
            "heartbeat": heartbeat,
            "ttl_s": 60,
        },
    )


def test_a_second_writer_is_refused_with_the_holders_name(tmp_path):
    store = ArtifactStore(tmp_path)
    _foreign_lease(store, heartbeat=time.time())
    with pytest.raises(LeaseHeld, match=r"in use by flow run 'other-run' \(1234\) on pod-7") as refused:
        DataRootLease(store, owner="me").acquire()
    assert ".ft-pipeline.lease.json" in str(refused.value)
    assert json.loads((tmp_path / ".ft-pipeline.lease.json").read_text())["owner"].startswith("flow run 'other-run'")


def test_a_dead_holders_lease_is_taken_over_and_released(tmp_path, caplog):
    store = ArtifactStore(tmp_path)
    _foreign_lease(store, heartbeat=time.time() - 3600)
    with DataRootLease(store, owner="me", ttl_s=60) as lease:
        assert lease.holder()["owner"] == "me" and lease.holder()["token"] == lease.token
        assert "taking over the lease of flow run 'other-run'" in caplog.text
    assert not (tmp_path / ".ft-pipeline.lease.json").exists()


def test_the_heartbeat_keeps_a_long_run_alive(tmp_path):
    store = ArtifactStore(tmp_path)
    with DataRootLease(store, owner="long run", ttl_s=0.4) as lease:
        first = lease.holder()["heartbeat"]
        time.sleep(0.8)  # twice the time-to-live: without beats another run could take it over
        assert lease.holder()["heartbeat"] > first
        other = DataRootLease(store, owner="second")
        held = dict(module._held)
        module._held.clear()  # as another process would see it
        try:
            with pytest.raises(LeaseHeld, match="in use by long run"):
                other.acquire()
        finally:
            module._held.update(held)


def test_re_entry_from_the_same_process_is_allowed(tmp_path):
    store = ArtifactStore(tmp_path)
    with DataRootLease(store, owner="parent") as outer:
        with DataRootLease(store, owner="subflow"):
            assert outer.holder()["owner"] == "parent"
        assert outer.holder()["owner"] == "parent"  # the inner release leaves the outer lease
    assert outer.holder() is None
