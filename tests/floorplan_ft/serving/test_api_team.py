"""`POST /analyze` as the team's Spring backend calls it: a multipart upload of the plan PNG →
the CV source (their RunPod endpoint, played by the wire-level fake) → the graph → the model →
three JSON strings. The JSON form of /analyze is untouched (tests/floorplan_ft/serving/test_api.py)."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from PIL import Image
from service_helpers import minilm_manager, service_settings, topology_json, uvicorn_server

from floorplan_ft.serving.api import create_app
from floorplan_ft.serving.service import AnalysisService


def png_bytes(size=(64, 48), colour=(255, 255, 255)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def make_app(fake=None, **groups):
    serving = {"timeout_s": 5.0, **groups.pop("serving", {})}
    if fake is None:
        serving.setdefault("llm_provider", "reference")
    settings = service_settings(None, fake, serving=serving, **groups)
    service = AnalysisService(settings, embedding_manager=minilm_manager())
    return create_app(service), service


@pytest.fixture
def reference_app(no_dotenv):
    app, service = make_app()
    yield app
    service.close()


def post_upload(base_url: str, data: bytes, name: str = "APT_FP_OBJ_000000001.PNG", path: str = "/analyze"):
    files = {"file": (name, data, "image/png")}
    return httpx.post(base_url + path, files=files, timeout=30)


# =========================================================================== input errors


def test_garbage_bytes_are_a_400_with_the_reason(reference_app):
    with uvicorn_server(reference_app) as url:
        response = post_upload(url, b"not a png at all")
        empty = post_upload(url, b"")
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "InvalidImage" and body["stage"] == "upload"
    assert "not a decodable image (16 bytes)" in body["reason"]
    assert empty.status_code == 400 and "the upload is empty" in empty.json()["reason"]


def test_an_upload_over_the_limit_is_a_413(no_dotenv):
    app, service = make_app(serving={"max_upload_mb": 0.01})  # 10 KiB
    big = png_bytes((900, 900), (10, 20, 30)) + b"\0" * 200_000
    try:
        with uvicorn_server(app) as url:
            response = post_upload(url, big)
            # Without a Content-Length (a chunked upload) the handler's own check answers.
            chunked = httpx.post(
                url + "/analyze/upload",
                timeout=30,
                headers={"content-type": "multipart/form-data; boundary=b"},
                content=iter(
                    [
                        (
                            b'--b\r\nContent-Disposition: form-data; name="file"; '
                            b'filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
                        ),
                        big,
                        b"\r\n--b--\r\n",
                    ]
                ),
            )
    finally:
        service.close()
    assert response.status_code == 413 and response.json()["error"] == "UploadTooLarge"
    assert "serving.max_upload_mb" in response.json()["reason"]
    assert chunked.status_code == 413, chunked.text


def test_a_multipart_request_without_the_file_field_is_a_422(reference_app):
    with uvicorn_server(reference_app) as url:
        response = httpx.post(url + "/analyze", files={"image": ("x.png", png_bytes(), "image/png")}, timeout=30)
    assert response.status_code == 422
    assert "file" in response.json()["message"]


def test_the_json_form_is_unchanged_beside_the_upload(reference_app):
    with uvicorn_server(reference_app) as url:
        response = httpx.post(url + "/analyze", json={"topology": topology_json(0)}, timeout=30)
        broken = httpx.post(
            url + "/analyze", content=b"{nope", timeout=30, headers={"content-type": "application/json"}
        )
    assert response.status_code == 200 and set(response.json()) == {"analysis", "meta"}
    assert broken.status_code == 422 and "not valid JSON" in broken.json()["message"]


# =========================================================================== through the RunPod endpoint


def runpod_app(runpod_server, fake=None, *, max_attempts: int = 1, **serving):
    from fakes.runpod_server import API_KEY

    cv = {
        "source": "runpod",
        "runpod_endpoint_id": runpod_server.endpoint_id,
        "runpod_base_url": runpod_server.base_url,
        "runpod_poll_interval_s": 0.05,
        "runpod_timeout_s": 10,
        "runpod_max_attempts": max_attempts,
    }
    return make_app(fake, cv=cv, runpod_api_key=API_KEY, serving=serving)


@pytest.fixture
def registered(runpod_server):
    """One plan the fake endpoint knows: its PNG and the team-dialect graph it answers."""
    from team_format import to_team_graph

    from floorplan_ft.schemas import TopologyGraph

    graph = to_team_graph(TopologyGraph.model_validate(topology_json(2)))
    png = png_bytes((120, 90), (200, 210, 220))
    runpod_server.register_plan(png, graph, {"annotations": []})
    return png, graph


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("provider", ["reference", "openai"])
def test_an_upload_goes_through_the_endpoint_and_the_model_into_three_strings(
    runpod_server, registered, fake_provider, no_dotenv, provider
):
    from fakes.runpod_server import API_KEY

    from floorplan_ft.schemas import FloorPlanAnalysis

    png, graph = registered
    runpod_server.overlay_png = png_bytes((120, 90), (255, 0, 0))
    app, service = runpod_app(runpod_server, fake_provider if provider == "openai" else None)
    try:
        with uvicorn_server(app) as url:
            response = post_upload(url, png)
    finally:
        service.close()
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"topology_json", "topology_image_url", "llm_analysis_json"}
    assert all(isinstance(v, str) for v in body.values())

    # The graph exactly as the endpoint sent it (their service's json.dumps, byte for byte).
    assert body["topology_json"] == runpod_server.sent_topologies[_sha(png)]
    returned = json.loads(body["topology_json"])
    assert returned["nodes"] == graph["nodes"] and returned["statistics"] == graph["statistics"]
    assert "walls" in returned["nodes"][0]["contains"]["structures"]  # still the team's dialect

    prefix = "data:image/png;base64,"
    assert body["topology_image_url"].startswith(prefix)
    overlay = base64.b64decode(body["topology_image_url"][len(prefix) :])
    assert overlay == runpod_server.overlay_png and overlay[:8] == b"\x89PNG\r\n\x1a\n"

    analysis = FloorPlanAnalysis.model_validate_json(body["llm_analysis_json"])
    if provider == "reference":  # the fake OpenAI answers a canned analysis
        assert analysis.image_name == "APT_FP_OBJ_000000001.PNG"
        assert analysis.bay_count == graph["statistics"]["bay_count"]
    assert float(response.headers["x-analysis-ms"]) > 0 and "cv;dur=" in response.headers["server-timing"]
    if provider == "openai":
        sent = fake_provider.requests_to("/chat/completions")[-1].body["messages"][1]["content"]
        assert "APT_FP_OBJ_000000001.PNG" in sent
    cv_call = runpod_server.calls("cv_inference")[-1]
    assert cv_call.body["input"]["filename"].startswith("APT_FP_OBJ_000000001")
    assert API_KEY not in response.text


def test_without_an_overlay_from_the_endpoint_ours_is_drawn(runpod_server, registered, no_dotenv):
    png, _ = registered
    app, service = runpod_app(runpod_server)
    try:
        with uvicorn_server(app) as url:
            body = post_upload(url, png).json()
    finally:
        service.close()
    overlay = base64.b64decode(body["topology_image_url"].split(",", 1)[1])
    with Image.open(io.BytesIO(overlay)) as im:
        assert im.format == "PNG" and im.size == (120, 90)


@pytest.mark.parametrize(
    ("job", "status", "reason"),
    [
        ("failed", 502, "job FAILED: CUDA out of memory"),
        ("error", 502, "error in output: image decode failed"),
        ("http503", 503, "HTTP 503"),
        ("unknown-image", 502, "no detections for"),
    ],
)
def test_endpoint_failures_are_5xx_with_the_reason(runpod_server, registered, no_dotenv, job, status, reason):
    from fakes.runpod_server import API_KEY, Job

    png, _ = registered
    scripted = {"failed": Job.failed(), "error": Job.error_in_output(), "http503": Job.http(503)}
    if job in scripted:
        runpod_server.push(scripted[job])
    upload = png if job != "unknown-image" else png_bytes((30, 30), (1, 2, 3))
    app, service = runpod_app(runpod_server)
    try:
        with uvicorn_server(app) as url:
            response = post_upload(url, upload)
    finally:
        service.close()
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == "CVFailed" and body["stage"] == "cv" and body["source"] == "runpod"
    assert reason in body["reason"] and body["retryable"] is (status == 503)
    assert API_KEY not in response.text


def test_a_slow_endpoint_is_cut_at_serving_cv_timeout_s(runpod_server, registered, no_dotenv):
    png, _ = registered
    runpod_server.latency_s = 3.0
    app, service = runpod_app(runpod_server, cv_timeout_s=0.5)
    try:
        with uvicorn_server(app) as url:
            response = post_upload(url, png)
            # The event loop was not blocked meanwhile: health answers while a CV call runs.
            health = httpx.get(url + "/health", timeout=5)
    finally:
        runpod_server.latency_s = 0.0
        service.close()
    assert response.status_code == 503, response.text
    assert "within 0.5 s (serving.cv_timeout_s)" in response.json()["reason"]
    assert response.json()["retryable"] is True and health.status_code == 200
