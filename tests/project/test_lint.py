"""`ruff check` and `ruff format --check` over the whole project are part of the suite (the version
is pinned in pyproject, the line length set there)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _ruff() -> list[str]:
    ruff = Path(sys.executable).with_name("ruff")
    return [str(ruff)] if ruff.exists() else [shutil.which("ruff") or "ruff"]


@pytest.mark.parametrize(
    "args",
    [["check", "--no-cache", "--output-format", "concise", "."], ["format", "--check", "--no-cache", "."]],
    ids=["check", "format"],
)
def test_ruff_is_clean(args):
    result = subprocess.run([*_ruff(), *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
