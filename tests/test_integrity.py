"""Data integrity in phases 1-2: file modes follow the umask, unreadable or stale graphs never
flow downstream, failure ledgers show the current state."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from floorplan_ft.sampling import SampleResult, write_sample
from floorplan_ft.store import ArtifactStore, atomic_write
from floorplan_ft.synth import write_dataset


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test and put the old one back."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield os.umask
    os.umask(saved)


def _sample() -> SampleResult:
    return SampleResult(stems=["C00_0001"], groups=[], excluded=[], warnings=[], seed=0, n=1, parameters={})


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_every_writer_follows_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    store = ArtifactStore(tmp_path / "root")
    written = [
        Path(store.write_json(store.run_file("cv_failures"), {"failures": {}})),
        Path(store.write_text(store.topology_path("C00_0001"), "{}\n")),
        write_sample(_sample(), tmp_path / "root" / "sampled_images.json"),
        atomic_write(tmp_path / "plain.bin", b"x"),
    ]
    write_dataset(tmp_path / "synth", count=1, complexes=1, seed=3)
    written += sorted((tmp_path / "synth").rglob("*.*"))
    assert len(written) >= 7
    assert {p.name: _mode(p) for p in written} == {p.name: expected for p in written}
    assert list(tmp_path.rglob(".*.tmp")) == []  # no temporary file left behind


def test_a_file_written_0600_before_gets_the_umask_mode_when_rewritten(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "cv_failures.json"
    target.write_text("{}")
    target.chmod(0o600)  # what the old mkstemp writer left behind
    ArtifactStore(tmp_path).write_json(str(target), {"failures": {}})
    assert _mode(target) == 0o644 and target.read_text() == '{\n  "failures": {}\n}\n'
