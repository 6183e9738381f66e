"""Phase 1 and the service's upload path through the team's RunPod Serverless endpoint, against a
real HTTP server on 127.0.0.1 speaking its protocol (tests/fakes/runpod_server.py)."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import pytest
from fakes.runpod_server import API_KEY, Job
from team_format import to_team_graph

from floorplan_ft.cv import runpod as rp
from floorplan_ft.cv.detections import detections_from_coco
from floorplan_ft.cv.online import CVUnavailable, OnlineCVResult, topology_from_image
from floorplan_ft.cv.runpod import RunPodAuthError, RunPodClient, RunPodEndpoint, RunPodError
from floorplan_ft.cv.sources import CVConfigError, ImageError
from floorplan_ft.cv.topology import build_topology
from floorplan_ft.settings import load_settings
from floorplan_ft.synth import write_dataset
from floorplan_ft.topology_io import read_topology_bytes
from tasks.common import nest_overrides

FAST = {"cv.runpod_poll_interval_s": 0.05, "cv.runpod_timeout_s": 10}


def _plans(root: Path, server, count: int = 6, seed: int = 3) -> list[str]:
    """Synthetic plans, each registered with the fake endpoint as the team graph it answers."""
    stems = write_dataset(root, count=count, complexes=2, seed=seed)
    for stem in stems:
        coco = json.loads((root / "annotations" / f"{stem}.json").read_text())
        graph = to_team_graph(build_topology(detections_from_coco(coco)))
        server.register_plan(
            (root / "images" / f"{stem}.png").read_bytes(), graph, {"annotations": coco["annotations"]}
        )
    return stems


def _settings(root: Path, server, key: str = API_KEY, **extra):
    overrides = {
        "paths.data_root": str(root),
        "cv.source": "runpod",
        "cv.runpod_endpoint_id": server.endpoint_id,
        "cv.runpod_base_url": server.base_url,
        "sampling.size_low_pct": 0,
        "sampling.size_high_pct": 100,
        **FAST,
        **extra,
    }
    settings = load_settings(**nest_overrides(overrides))
    return settings.model_copy(update={"runpod_api_key": rp.SecretStr(key)}), overrides


def _client(server, key: str = API_KEY, **kw) -> RunPodClient:
    endpoint = RunPodEndpoint(server.endpoint_id, server.base_url, **{"timeout_s": 10, "poll_interval_s": 0.05, **kw})
    return RunPodClient(endpoint, key)


def _fn(task, *args):
    from prefect.logging import disable_run_logger

    with disable_run_logger():
        return task.fn(*args)


def _files_text(root: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- the client


def test_client_sends_the_team_request_and_polls_in_progress(runpod_server, tmp_path):
    stems = _plans(tmp_path, runpod_server, count=1)
    png = (tmp_path / "images" / f"{stems[0]}.png").read_bytes()
    runpod_server.push(Job.in_progress(polls=3))
    output = _client(runpod_server).cv_inference(png, "x.png")
    assert "topology_json" in output and "low_result" in output
    post, *polls = runpod_server.requests
    assert post.method == "POST" and post.path == f"/v2/{runpod_server.endpoint_id}/runsync"
    assert post.headers["authorization"] == f"Bearer {API_KEY}"
    assert post.body == {
        "input": {"action": "cv_inference", "image": base64.b64encode(png).decode(), "filename": "x.png"}
    }
    assert [p.method for p in polls] == ["GET"] * 3
    assert all(p.path.startswith(f"/v2/{runpod_server.endpoint_id}/status/job-") for p in polls)


def test_failed_and_error_in_output_are_retried_then_reported(runpod_server):
    runpod_server.push(Job.failed("CUDA OOM"), Job.error_in_output("bad image"), Job.http(503))
    with pytest.raises(RunPodError) as err:
        _client(runpod_server, max_attempts=3).call("embed", {"text": "x"})
    assert "3 attempts" in str(err.value) and "CUDA OOM" in str(err.value) and "bad image" in str(err.value)
    assert "HTTP 503" in str(err.value)
    assert err.value.retry_later  # the last attempt met an overloaded endpoint: worth a retry later
    assert len(runpod_server.calls()) == 3
    runpod_server.push(Job.http(503), Job.failed("CUDA OOM"))
    with pytest.raises(RunPodError) as err:
        _client(runpod_server, max_attempts=2).call("embed", {"text": "x"})
    assert not err.value.retry_later  # the job itself failed
    runpod_server.push(Job.failed(), Job.in_progress(polls=1, final="FAILED"))
    assert len(_client(runpod_server, max_attempts=3).call("embed", {"text": "x"})["embedding"]) == 1024


def test_a_refused_key_is_a_config_error_and_later_calls_send_nothing(runpod_server):
    client = _client(runpod_server, key="rp_wrong_key_zzzz")
    with pytest.raises(RunPodAuthError) as err:
        client.call("embed", {"text": "x"})
    assert "RUNPOD_API_KEY" in str(err.value) and "rp_wrong_key_zzzz" not in str(err.value)
    assert isinstance(err.value, CVConfigError)
    with pytest.raises(RunPodAuthError):
        client.call("embed", {"text": "y"})
    assert len(runpod_server.requests) == 1


def test_cold_start_within_timeout_and_timeout_beyond_it(runpod_server):
    runpod_server.cold_start(polls=8)
    assert _client(runpod_server, timeout_s=5).call("embed", {"text": "a"})["embedding"]
    assert runpod_server.requests[0].body["input"]["action"] == "embed"
    runpod_server.reset()
    runpod_server.push(Job.in_progress(polls=1000), Job.in_progress(polls=1000))
    with pytest.raises(RunPodError) as err:
        _client(runpod_server, timeout_s=0.4, max_attempts=2).call("embed", {"text": "a"})
    assert "cv.runpod_timeout_s" in str(err.value) and len(runpod_server.calls()) == 2
    assert err.value.retry_later


def test_requests_in_flight_are_bounded_per_endpoint(runpod_server):
    runpod_server.default = Job.in_progress(polls=3)
    client = _client(runpod_server, concurrency=2)
    threads = [threading.Thread(target=client.call, args=("embed", {"text": str(i)})) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runpod_server.calls()) == 6 and runpod_server.max_active_jobs == 2


# ----------------------------------------------------------------------------- online (the service)


def test_topology_from_image_returns_the_endpoint_graph_and_overlay(runpod_server, tmp_path):
    stems = _plans(tmp_path / "d", runpod_server, count=1)
    png = (tmp_path / "d" / "images" / f"{stems[0]}.png").read_bytes()
    runpod_server.overlay_png = b"\x89PNG\r\n\x1a\nOVERLAY"
    settings, _ = _settings(tmp_path, runpod_server)
    result = topology_from_image(settings, png, "../../평면도 1.PNG")
    assert isinstance(result, OnlineCVResult)
    sent = runpod_server.calls("cv_inference")[0].body["input"]
    assert sent["filename"] == "평면도_1.png" and base64.b64decode(sent["image"]) == png
    assert result.topology == json.loads(next(iter(runpod_server.sent_topologies.values())))
    assert result.overlay_png == b"\x89PNG\r\n\x1a\nOVERLAY"
    assert result.source == f"runpod:{runpod_server.base_url}/{runpod_server.endpoint_id}"
    read_topology_bytes(json.dumps(result.topology), origin="online")  # readable downstream


def test_topology_from_image_errors(runpod_server, tmp_path):
    settings, _ = _settings(tmp_path, runpod_server)
    with pytest.raises(ImageError, match="plan.png: not a decodable image"):
        topology_from_image(settings, b"\x89PNG\r\n\x1a\ngarbage", "plan.png")
    with pytest.raises(ImageError, match="empty upload"):
        topology_from_image(settings, b"", "plan.png")
    stems = _plans(tmp_path / "d", runpod_server, count=1)
    png = (tmp_path / "d" / "images" / f"{stems[0]}.png").read_bytes()
    runpod_server.default = Job.failed("worker died")
    with pytest.raises(CVUnavailable, match="worker died"):
        topology_from_image(settings, png, "p.png")
    runpod_server.default = Job.completed()
    with pytest.raises(CVUnavailable, match="no detections"):  # an image the endpoint cannot read
        topology_from_image(settings, _other_png(), "p.png")
    bad, _ = _settings(tmp_path, runpod_server, key="rp_wrong_key_online")
    with pytest.raises(CVUnavailable) as err:
        topology_from_image(bad, png, "p.png")
    assert "RUNPOD_API_KEY" in str(err.value) and "rp_wrong_key_online" not in str(err.value)
    unset = load_settings(
        **nest_overrides({"paths.data_root": str(tmp_path), "cv.source": "runpod", "cv.runpod_endpoint_id": "e"})
    )
    with pytest.raises(CVUnavailable, match="RUNPOD_API_KEY"):
        topology_from_image(unset, png, "p.png")
    with pytest.raises(CVUnavailable, match="cv.source"):
        topology_from_image(load_settings(**nest_overrides({"paths.data_root": str(tmp_path)})), png, "p.png")


def _other_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 10), "white").save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- phase 1


@pytest.fixture
def runpod_env(monkeypatch):
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)


@pytest.mark.prefect
def test_phase1_through_the_endpoint_stores_what_it_sent_and_reruns_free(
    prefect_api, runpod_server, tmp_path, runpod_env
):
    from flows.cv_batch import cv_batch_with_concurrency

    root = tmp_path / "data"
    stems = _plans(root, runpod_server, count=6)
    runpod_server.push(Job.in_progress(polls=2), Job.completed())
    runpod_server.default = Job.in_progress(polls=2)
    runpod_server.latency_s = 0.05
    _, overrides = _settings(root, runpod_server, **{"cv.concurrency": 3, "cv.chunk_size": 6})
    run = cv_batch_with_concurrency(3)
    report = run(scope="all", overrides=overrides)  # no key in the parameters: from the environment
    assert report["built"] == 6 and report["failed"] == 0, report
    assert len(runpod_server.calls("cv_inference")) == 6
    assert 1 < runpod_server.max_active_jobs <= 3
    for stem in stems:
        out = root / "output" / stem
        png = (root / "images" / f"{stem}.png").read_bytes()
        sha = rp.sha256_file(root / "images" / f"{stem}.png")
        assert (out / "topology_graph.json").read_bytes() == runpod_server.sent_topologies[sha].encode("utf-8")
        assert json.loads((out / "low_result.json").read_text())["annotations"]
        meta = json.loads((out / "topology_graph.meta.json").read_text())
        assert meta["source"] == f"runpod:{runpod_server.base_url}/{runpod_server.endpoint_id}"
        assert meta["input_hash"] == sha and meta["low_result"] == "low_result.json"
        assert base64.b64decode(runpod_server.calls("cv_inference")[0].body["input"]["image"])[:8] == png[:8]
    before = len(runpod_server.requests)
    again = run(scope="all", overrides=overrides)
    assert (again["built"], again["cached"]) == (0, 6) and len(runpod_server.requests) == before
    assert API_KEY not in _files_text(root)
    for request in runpod_server.requests:  # the key travels in the Authorization header only
        assert API_KEY not in request.path and API_KEY.encode() not in request.raw
        assert [k for k, v in request.headers.items() if API_KEY in v] == ["authorization"]


def test_failed_images_are_ledgered_and_the_run_goes_on(runpod_server, tmp_path, runpod_env):
    from floorplan_ft.cv.runner import update_failure_ledger
    from floorplan_ft.store import ArtifactStore
    from tasks.cv import build_topology_task, source_config

    root = tmp_path / "data"
    stems = _plans(root, runpod_server, count=4)
    runpod_server.push(*[Job.failed("CUDA OOM")] * 3)  # the first image fails all 3 attempts
    runpod_server.push(Job.error_in_output("decode error"), Job.completed())  # the second recovers
    settings, _ = _settings(root, runpod_server, **{"cv.concurrency": 1})
    config = source_config(settings)
    assert API_KEY not in config.model_dump_json()
    outcomes = _fn(build_topology_task, stems, config, str(root))
    by_stem = {o["stem"]: o for o in outcomes}
    assert by_stem[stems[0]]["status"] == "failed" and "CUDA OOM" in by_stem[stems[0]]["reason"]
    assert stems[0] in by_stem[stems[0]]["reason"]
    assert [by_stem[s]["status"] for s in stems[1:]] == ["built"] * 3
    assert len(runpod_server.calls("cv_inference")) == 3 + 2 + 2
    from floorplan_ft.cv.runner import ImageOutcome

    ledger = update_failure_ledger(ArtifactStore(str(root)), [ImageOutcome.model_validate(o) for o in outcomes])
    assert set(ledger) == {stems[0]} and "FAILED" in ledger[stems[0]]["reason"]
    assert not (root / "output" / stems[0] / "topology_graph.json").exists()


def test_an_invalid_topology_from_the_endpoint_is_a_failure_with_its_reason(runpod_server, tmp_path, runpod_env):
    from tasks.cv import build_topology_task, source_config

    root = tmp_path / "data"
    stems = _plans(root, runpod_server, count=2)
    sha = rp.sha256_file(root / "images" / f"{stems[0]}.png")
    graph, low = runpod_server.plans[sha]
    runpod_server.plans[sha] = ({**graph, "nodes": "not a list"}, low)
    settings, _ = _settings(root, runpod_server)
    outcomes = {o["stem"]: o for o in _fn(build_topology_task, stems, source_config(settings), str(root))}
    assert outcomes[stems[0]]["status"] == "failed" and "nodes" in outcomes[stems[0]]["reason"]
    assert outcomes[stems[1]]["status"] == "built"


def test_topology_json_as_an_object_is_accepted(runpod_server, tmp_path, runpod_env):
    from tasks.cv import build_topology_task, source_config

    root = tmp_path / "data"
    stems = _plans(root, runpod_server, count=1)
    runpod_server.topology_as_object = True
    runpod_server.overlay_png = b"\x89PNG\r\n\x1a\nTHEIR-OVERLAY"
    settings, _ = _settings(root, runpod_server)
    assert _fn(build_topology_task, stems, source_config(settings), str(root), True)[0]["status"] == "built"
    stored = json.loads((root / "output" / stems[0] / "topology_graph.json").read_text())
    assert stored == json.loads(next(iter(runpod_server.sent_topologies.values())))
    # cv.overlay: the endpoint's own picture (topology_image_base64) is kept, not redrawn.
    assert (root / "output" / stems[0] / "topology_overlay.png").read_bytes() == runpod_server.overlay_png


@pytest.mark.prefect
def test_a_refused_key_stops_phase1_early_naming_the_setting(prefect_api, runpod_server, tmp_path, monkeypatch):
    from flows.cv_batch import cv_batch_with_concurrency

    monkeypatch.setenv("RUNPOD_API_KEY", "rp_wrong_key_phase1")
    root = tmp_path / "data"
    _plans(root, runpod_server, count=6)
    _, overrides = _settings(root, runpod_server, **{"cv.chunk_size": 2})
    with pytest.raises(CVConfigError) as err:
        cv_batch_with_concurrency(1)(scope="all", overrides=overrides)
    assert "RUNPOD_API_KEY" in str(err.value) and "rp_wrong_key_phase1" not in str(err.value)
    assert len(runpod_server.requests) <= 2  # not one per image, no retries
    assert "rp_wrong_key_phase1" not in _files_text(root)


@pytest.mark.prefect
def test_cli_runs_steps_0_1_through_the_endpoint(prefect_api, runpod_server, no_dotenv, monkeypatch):
    """`ft-pipeline run --steps 0,1` with the key and endpoint from the environment only."""
    from typer.testing import CliRunner

    from ft_pipeline.cli import app

    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    monkeypatch.setenv("RUNPOD_ENDPOINT_ID", runpod_server.endpoint_id)
    root = no_dotenv / "data"
    _plans(root, runpod_server, count=4)
    args = [
        "run",
        "--steps",
        "0,1",
        "--set",
        f"paths.data_root={root}",
        "--set",
        "cv.source=runpod",
        "--set",
        f"cv.runpod_base_url={runpod_server.base_url}",
        "--set",
        "cv.runpod_poll_interval_s=0.05",
        "--set",
        "sampling.sample_size=4",
        "--set",
        "sampling.size_low_pct=0",
        "--set",
        "sampling.size_high_pct=100",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output[-3000:]
    assert len(runpod_server.calls("cv_inference")) == 4
    assert len(list(root.glob("output/*/topology_graph.json"))) == 4
    assert len(list(root.glob("output/*/low_result.json"))) == 4
    assert API_KEY not in result.output and API_KEY not in _files_text(root)


# ----------------------------------------------------------------------------- embeddings


def _embedding_settings(tmp_path, server, key=API_KEY, **extra):
    settings, _ = _settings(tmp_path, server, key=key, **{"retrieval.provider": "runpod", **extra})
    return settings


def test_runpod_embeddings_batch_through_embed_batch_at_1024_dims(runpod_server, tmp_path):
    import numpy as np

    from floorplan_ft.providers.factory import make_embedding_manager
    from floorplan_ft.providers.runpod_embeddings import RunPodEmbeddingManager

    manager = make_embedding_manager(_embedding_settings(tmp_path, runpod_server, **{"retrieval.batch_size": 2}))
    assert isinstance(manager, RunPodEmbeddingManager) and manager.dimensions == 1024
    texts = [
        "판상형 건축물 3Bay 침실 3개",
        "판상형 건축물 3Bay 침실 2개",
        "타워형 건축물 2Bay 침실 1개",
        "채광 기준",
        "환기 기준",
    ]
    docs = manager.embed_documents(texts)
    assert docs.shape == (5, 1024) and np.allclose(np.linalg.norm(docs, axis=1), 1.0, atol=1e-5)
    calls = runpod_server.calls("embed_batch")
    assert [c.body["input"]["texts"] for c in calls] == [texts[0:2], texts[2:4], texts[4:]]
    query = manager.embed_queries([texts[0]])
    assert query.shape == (1, 1024) and np.allclose(query[0], docs[0], atol=1e-6)
    assert float(docs[0] @ docs[1]) > float(docs[0] @ docs[4])  # similar texts are closer
    assert "runpod" in manager.identity() and runpod_server.endpoint_id in manager.identity()


def test_runpod_embeddings_retry_then_fail_and_refuse_a_bad_key(runpod_server, tmp_path):
    from floorplan_ft.providers.base import ConfigError
    from floorplan_ft.providers.embeddings import EmbeddingError
    from floorplan_ft.providers.factory import make_embedding_manager

    manager = make_embedding_manager(_embedding_settings(tmp_path, runpod_server))
    runpod_server.push(Job.failed("OOM"), Job.http(502))
    assert manager.embed_documents(["a"]).shape == (1, 1024)
    assert len(runpod_server.calls("embed_batch")) == 3
    runpod_server.push(*[Job.error_in_output("model not loaded")] * 3)
    with pytest.raises(EmbeddingError, match="model not loaded"):
        manager.embed_documents(["b"])
    bad = make_embedding_manager(_embedding_settings(tmp_path, runpod_server, key="rp_wrong_embed_key"))
    with pytest.raises(EmbeddingError) as err:
        bad.embed_queries(["c"])
    assert "RUNPOD_API_KEY" in str(err.value) and "rp_wrong_embed_key" not in str(err.value)
    no_key = load_settings(**nest_overrides({"retrieval.provider": "runpod", "cv.runpod_endpoint_id": "e"}))
    with pytest.raises(ConfigError, match="RUNPOD_API_KEY"):
        make_embedding_manager(no_key)


def test_no_key_or_no_endpoint_stops_before_any_request(runpod_server, no_dotenv, monkeypatch):
    from floorplan_ft.cv.sources import get_source
    from tasks.cv import source_config

    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    root = no_dotenv / "data"
    _plans(root, runpod_server, count=1)
    settings, _ = _settings(root, runpod_server)
    config = source_config(settings.model_copy(update={"runpod_api_key": None}))
    with pytest.raises(CVConfigError, match="RUNPOD_API_KEY"):
        get_source(config)
    with pytest.raises(CVConfigError, match="cv.runpod_endpoint_id"):
        get_source(config.model_copy(update={"runpod_endpoint_id": None}))
    assert runpod_server.requests == []
