"""End to end on a real Prefect server with real process workers, the way the team runs it:

server (SQLite in a temp dir) → `ft-pipeline pools create` → `prefect deploy --all` → workers for
`local-gpu` and `runpod` → steps 0-1 through the local-gpu deployment (`run_cv_on_local_gpu`, as a
runpod parent would) → `prefect deployment run ft-pipeline/runpod` for steps 2-5 of the demo →
outputs on disk, artifacts through the API, the nightly cv-batch scheduled at 01:00 Asia/Seoul.

Every process is started in its own process group and stopped in `finally`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from processes import free_port, run_ok, stop, tool

ROOT = Path(__file__).resolve().parents[2]
SEOUL = ZoneInfo("Asia/Seoul")
RUN_TIMEOUT_S = 150


class Processes:
    """Background processes, each in its own session; stopped newest first."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append((name, proc))
        return proc

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop_all(self) -> None:
        for _, proc in reversed(self.started):
            stop(proc)


def _wait_health(api: str, server: subprocess.Popen, procs: Processes, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prefect server exited:\n{procs.tail('server')}"
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"prefect server not healthy after {timeout_s} s:\n{procs.tail('server')}")


def _wait_final(api: str, flow_run_id: str, procs: Processes, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=10).json()
        if run["state_type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} not finished after {timeout_s} s:\n{procs.tail('worker-runpod')}")


def _artifacts(api: str, flow_run_ids: list[str]) -> list[dict]:
    # This Prefect's client sends nulls the server rejects (422): post the filter ourselves.
    response = httpx.post(
        f"{api}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": flow_run_ids}}, "limit": 200, "offset": 0, "sort": "CREATED_DESC"},
        timeout=10,
    )
    response.raise_for_status()
    return response.json()


def _next_one_am_seoul(now: datetime) -> datetime:
    local = now.astimezone(SEOUL)
    candidate = local.replace(hour=1, minute=0, second=0, microsecond=0)
    return candidate if candidate > local else candidate + timedelta(days=1)


@pytest.mark.prefect
@pytest.mark.timeout(360)
def test_runpod_deployment_end_to_end(tmp_path):
    started = time.monotonic()
    timings: dict[str, float] = {}
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    data = tmp_path / "data"
    logs = tmp_path / "logs"
    logs.mkdir()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FTP_", "FT_PIPELINE_"))}
    base_env.update(
        PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1"
    )
    server_env = {
        **base_env,
        "PREFECT_HOME": str(tmp_path / "server-home"),
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_LOGGING_SERVER_LEVEL": "WARNING",
    }
    client_env = {**base_env, "PREFECT_HOME": str(tmp_path / "client-home"), "PREFECT_API_URL": api}

    procs = Processes(logs)
    try:
        server = procs.start(
            "server", [tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], server_env
        )

        # While the server boots: 12 synthetic plans and the demo's tiny local teacher.
        from floorplan_ft.synth import write_dataset
        from floorplan_ft.training.tiny import bias_towards_short_json, build_tiny_causal_lm

        write_dataset(data, count=12, complexes=3, seed=7)
        teacher = data / "models" / "tiny-local-teacher"
        model, tokenizer = build_tiny_causal_lm(teacher, seed=0)
        bias_towards_short_json(model, tokenizer, teacher)
        del model, tokenizer

        _wait_health(api, server, procs)
        timings["server+data"] = time.monotonic() - started

        t = time.monotonic()
        out = _run([tool("ft-pipeline"), "pools", "create", "--data-root", str(data)], client_env)
        assert "work pool local-gpu (process): created" in out and "work pool runpod (process): created" in out
        again = _run([tool("ft-pipeline"), "pools", "create", "--data-root", str(data)], client_env)
        assert again.count(": unchanged") == 2, again
        timings["pools"] = time.monotonic() - t

        t = time.monotonic()
        deploy_time = datetime.now(SEOUL)
        out = _run(
            [tool("prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
            client_env,
            timeout=180,
        )
        for name in ("ft-pipeline/runpod", "ft-pipeline/local-gpu", "cv-batch/overnight"):
            assert f"Deployment '{name}' successfully created" in out, out[-3000:]
        timings["deploy"] = time.monotonic() - t

        for pool in ("local-gpu", "runpod"):
            worker_env = {
                **client_env,
                "PREFECT_HOME": str(tmp_path / f"worker-{pool}-home"),
                "PREFECT_WORKER_QUERY_SECONDS": "1",
                "PREFECT_WORKER_PREFETCH_SECONDS": "1",
                "PREFECT_LOGGING_LEVEL": "INFO",
                "FT_PIPELINE_ROOT": str(ROOT),
            }
            procs.start(
                f"worker-{pool}",
                [tool("prefect"), "worker", "start", "--pool", pool, "--name", f"test-{pool}"],
                worker_env,
            )

        overrides = {"teachers.local_model_path": str(teacher), "sampling.sample_size": 6, "quality.sample_size": 6}

        # Steps 0-1 on the local-gpu pool, started and awaited the way a runpod parent does it.
        t = time.monotonic()
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from flows.orchestrate import run_cv_on_local_gpu

        with temporary_settings({PREFECT_API_URL: api}):
            cv = run_cv_on_local_gpu(
                "0,1",
                profile="demo",
                overrides=overrides,
                timeout_s=RUN_TIMEOUT_S,
                poll_interval_s=1,
                raise_on_failure=False,
            )
        assert cv["0"]["status"] == "done" and cv["1"]["status"] == "done", f"{cv}\n{procs.tail('worker-local-gpu')}"
        cv_run = httpx.get(f"{api}/flow_runs/{cv['0']['flow_run_id']}", timeout=10).json()
        assert cv_run["work_pool_name"] == "local-gpu"
        assert cv_run["parameters"]["steps"] == "0,1"
        timings["local-gpu run (steps 0,1)"] = time.monotonic() - t

        sample = json.loads((data / "sampled_images.json").read_text())
        stems = sample["stems"] if isinstance(sample, dict) else sample
        assert len(stems) == 6
        for stem in stems:
            assert (data / "output" / stem / "topology_graph.json").is_file()

        # Steps 2-5 on the runpod pool, started from the CLI like a person would.
        t = time.monotonic()
        params = {"steps": "2,3a,3b,4,5", "profile": "demo", "overrides": overrides}
        out = _run(
            [tool("prefect"), "deployment", "run", "ft-pipeline/runpod", "--params", json.dumps(params)], client_env
        )
        match = re.search(r"UUID: ([0-9a-f-]{36})", out)
        assert match, out
        run_id = match.group(1)
        run = _wait_final(api, run_id, procs, RUN_TIMEOUT_S)
        assert run["state_type"] == "COMPLETED", (
            f"{run['state_type']}: {run['state'].get('message')}\n{procs.tail('worker-runpod')}"
        )
        assert run["work_pool_name"] == "runpod"
        timings["runpod run (steps 2-5)"] = time.monotonic() - t

        # Outputs: in the data root the runpod pool's job template points at (no override).
        for stem in stems:
            out_dir = data / "output" / stem
            for name in ("rag_context.json", "llm_analysis_reference.json", "llm_analysis_local.json"):
                assert (out_dir / name).is_file(), f"{out_dir / name} missing"
        assert (data / "selected_model.txt").read_text().strip() == "reference"
        report = json.loads((data / "quality_report.json").read_text())
        assert report
        rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
        rows += [json.loads(line) for line in (data / "val.jsonl").read_text().splitlines()]
        assert len(rows) == len(stems) and all("messages" in r for r in rows)
        results = data / ".prefect" / "results"
        assert results.is_dir() and any(results.iterdir()), "task results not on the data root"

        # Artifacts through the API, for both runs (the cv-batch subflow has its own run id).
        arts = _artifacts(api, [run_id])
        keys = {a["key"] for a in arts}
        for key in ("ft-pipeline-summary", "phase2-retrieval-health", "phase4-quality", "phase5-dataset"):
            assert key in keys, f"artifact {key} missing: {sorted(k for k in keys if k)}"
        summary = next(a for a in arts if a["key"] == "ft-pipeline-summary")
        assert "| 5 |" in summary["data"] and "done" in summary["data"]
        cv_keys = {a["key"] for a in _artifacts(api, [cv["0"]["flow_run_id"]])}
        assert {"phase0-sample", "ft-pipeline-summary"} <= cv_keys

        # The nightly batch: scheduled at the next 01:00 in Seoul.
        t = time.monotonic()
        deployment = httpx.get(f"{api}/deployments/name/cv-batch/overnight", timeout=10).json()
        assert deployment["work_pool_name"] == "local-gpu"
        assert deployment["parameters"] == {"scope": "all"}
        [schedule] = deployment["schedules"]
        assert schedule["schedule"]["cron"] == "0 1 * * *"
        assert schedule["schedule"]["timezone"] == "Asia/Seoul"
        assert schedule["active"]
        scheduled: list[dict] = []
        deadline = time.monotonic() + 30
        while not scheduled and time.monotonic() < deadline:
            scheduled = httpx.post(
                f"{api}/flow_runs/filter",
                json={
                    "flow_runs": {
                        "deployment_id": {"any_": [deployment["id"]]},
                        "state": {"type": {"any_": ["SCHEDULED"]}},
                    },
                    "sort": "EXPECTED_START_TIME_ASC",
                    "limit": 5,
                    "offset": 0,
                },
                timeout=10,
            ).json()
            if not scheduled:
                time.sleep(1)
        assert scheduled, f"no scheduled cv-batch/overnight run:\n{procs.tail('server')}"
        first = datetime.fromisoformat(scheduled[0]["expected_start_time"])
        expected = {_next_one_am_seoul(deploy_time), _next_one_am_seoul(datetime.now(SEOUL))}
        assert first in expected, f"first nightly run at {first.astimezone(SEOUL)}, expected {expected}"
        timings["schedule check"] = time.monotonic() - t

        # Typed parameters for the UI form.
        runpod = httpx.get(f"{api}/deployments/name/ft-pipeline/runpod", timeout=10).json()
        props = runpod["parameter_openapi_schema"]["properties"]
        assert {"steps", "config_file", "profile", "overrides"} <= set(props)
        assert runpod["parameters"]["steps"] == "2,3a,3b,4,5,6"
        assert runpod["pull_steps"] == [{"ft_pipeline.deploy_steps.set_project_root": {}}]
    finally:
        t = time.monotonic()
        procs.stop_all()
        timings["stop"] = time.monotonic() - t
        timings["total"] = time.monotonic() - started
        print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    for name, proc in procs.started:
        assert proc.poll() is not None, f"{name} still running"


def _run(args: list[str], env: dict[str, str], timeout: float = 120) -> str:
    return run_ok(args, env, timeout)
