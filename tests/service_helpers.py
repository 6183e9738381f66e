"""Shared pieces of the service, API and vector-store tests (real components, built once per
process): plan topologies from the synthetic generator, settings for the service, the packaged
MiniLM embedding model, a tiny local student, and a uvicorn server on a real socket."""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from floorplan_ft.schemas import TopologyGraph
from floorplan_ft.settings import load_settings

OPENAI_KEY = "sk-test-SERVICE-secret-0123456789"
MINILM = "packaged:all-MiniLM-L6-v2"
LOCAL_RETRIEVAL = {"provider": "local", "model": MINILM, "dimensions": 384, "device": "cpu"}
# One data root for the whole run, so that the corpus vectors are embedded once and then read
# from {data_root}/cache/embeddings like phase 2 does.
SHARED_DATA_ROOT = Path(tempfile.mkdtemp(prefix="ftp-service-tests-"))
atexit.register(shutil.rmtree, SHARED_DATA_ROOT, ignore_errors=True)


@functools.cache
def sample_graphs(count: int = 4, seed: int = 11) -> tuple[TopologyGraph, ...]:
    """Topologies of synthetic plans, built in memory (no files)."""
    from floorplan_ft.cv import build_topology, detections_from_coco
    from floorplan_ft.synth import generate_plan, plan_to_coco

    graphs = []
    for i in range(count):
        plan = generate_plan(np.random.default_rng([seed, i]), f"C0{i % 3 + 1}_{i:04d}")
        graphs.append(build_topology(detections_from_coco(plan_to_coco(plan))))
    return tuple(graphs)


def topology_json(index: int = 0) -> dict[str, Any]:
    return sample_graphs()[index].model_dump(mode="json")


def service_settings(data_root: Path | None = None, fake: Any = None, **overrides: Any):
    """Settings of a service on the packaged MiniLM (384) with OpenAI at the fake server; groups in
    `overrides` are merged over these. `data_root` defaults to the run's shared one."""
    data_root = data_root or SHARED_DATA_ROOT
    groups: dict[str, dict[str, Any]] = {
        "paths": {"data_root": str(data_root)},
        "retrieval": dict(LOCAL_RETRIEVAL),
        "serving": {"timeout_s": 5.0},
    }
    top: dict[str, Any] = {}
    if fake is not None:
        top = {"openai_api_key": OPENAI_KEY, "openai_base_url": fake.openai_base_url}
    for key, value in overrides.items():
        if isinstance(value, dict) and key in groups:
            groups[key] = {**groups[key], **value}
        else:
            top[key] = value
    return load_settings(**groups, **top)


def minilm_manager():
    """The packaged MiniLM, loaded once per process (shared with services built from settings)."""
    from types import SimpleNamespace

    from floorplan_ft.serving.service import shared_embedding_manager

    retrieval = SimpleNamespace(**LOCAL_RETRIEVAL, batch_size=32)  # the settings' defaults
    return shared_embedding_manager(SimpleNamespace(retrieval=retrieval))


@functools.cache
def tiny_student_dir(base: str) -> Path:
    """A random 2-layer Qwen3 biased towards short JSON (the demo's tiny student), built once."""
    from floorplan_ft.training.tiny import bias_towards_short_json, build_tiny_causal_lm

    directory = Path(base) / "tiny-student"
    if not (directory / "config.json").is_file():
        model, tokenizer = build_tiny_causal_lm(directory, seed=0)
        bias_towards_short_json(model, tokenizer, directory)
    return directory


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """Tiny models run far faster on one thread than on two contended cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def uvicorn_server(app: Any):
    """The app on a real socket (127.0.0.1, a free port) served by uvicorn in a thread."""
    from floorplan_ft.serving.api import serve_in_thread

    return serve_in_thread(app)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def rambling_student_dir(base: str, context: int = 65536) -> Path:
    """A random 2-layer Qwen3 *without* the short-JSON bias: under the schema it fills every string
    to its maxLength, so with a large output budget one analysis decodes for minutes (a long
    request to time out or interrupt). Its context is widened to `context` positions so that such a
    budget fits."""
    import json

    from floorplan_ft.training.tiny import build_tiny_causal_lm

    directory = Path(base) / f"rambling-student-{context}"
    if not (directory / "config.json").is_file():
        build_tiny_causal_lm(directory, seed=0)
        config_file = directory / "config.json"
        config = json.loads(config_file.read_text())
        config["max_position_embeddings"] = context
        config_file.write_text(json.dumps(config, indent=2))
    return directory
