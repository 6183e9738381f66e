"""Small flows the RunPod worker tests run inside fake pods (subprocesses)."""

from __future__ import annotations

import os
import time

from prefect import flow


@flow(name="pod-ok")
def pod_ok(value: int = 21) -> int:
    # The key is the worker's, never the pod's: a pod that sees it would print it into its log.
    print(f"RUNPOD_API_KEY in pod: {'RUNPOD_API_KEY' in os.environ}")
    return value * 2


@flow(name="pod-fails")
def pod_fails() -> None:
    raise RuntimeError("this flow fails on purpose")


@flow(name="pod-sleeps")
def pod_sleeps(seconds: float = 60.0) -> None:
    time.sleep(seconds)
