"""The flows do not hook print(): libraries that capture their own stdout keep working inside a run."""

from __future__ import annotations

import dill.detect
import pytest
from prefect import flow

GLOBAL_TABLE = {"a": 1}


def _uses_a_global():
    return GLOBAL_TABLE["a"]


def _probe() -> list[str]:
    # dill (under datasets' fingerprinting in phase 6) captures dis.dis output through sys.stdout;
    # a print hook (Prefect's log_prints) would log the bytecode as run lines and leave dill blind.
    return sorted(dill.detect.nestedglobals(_uses_a_global))


@pytest.mark.parametrize("name", ["ft_pipeline", "cv_batch"])
def test_flows_leave_print_alone(prefect_api, name, monkeypatch):
    from flows.cv_batch import cv_batch
    from flows.ft_pipeline import ft_pipeline

    monkeypatch.delenv("PREFECT_LOGGING_LOG_PRINTS", raising=False)
    real = {"ft_pipeline": ft_pipeline, "cv_batch": cv_batch}[name]
    probe = flow(_probe, name=f"probe-{name}", log_prints=real.log_prints)
    assert probe() == ["GLOBAL_TABLE"]
