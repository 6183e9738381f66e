"""The `runpod` worker type against a real Prefect API (the session's `prefect_api`) and a fake RunPod
REST v2 server on 127.0.0.1 whose "pods" are local subprocesses running `python -m prefect.engine`.

One pool (`prefect work-pool create --type runpod`, the entry point installed with the project); each
test makes a deployment of a small flow (tests/workers/flows_for_pods.py) on it and lets a worker
pick the run up: once `prefect worker start --pool ... --run-once` as a process, otherwise the worker
class in-process.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from fakes.runpod_pods import API_KEY, FakeRunPodPods

from ft_pipeline.runpod_worker import RunPodError, RunPodWorker, secret_env_keys

pytestmark = [pytest.mark.prefect, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
POOL = "runpod-test-pool"
ENTRY = "tests/workers/flows_for_pods.py"
FAST = {
    "poll_interval_seconds": 0.5,
    "start_timeout_seconds": 6,
    "stop_grace_seconds": 2,
    "max_price_per_hour": 2.0,
    "image": "fake/ft-pipeline-runpod:test",
}


def _prefect(*args: str, env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(
        [str(BIN / "prefect"), *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"prefect {' '.join(args)} failed ({done.returncode}):\n{out[-3000:]}"
    return out


def _client_env(api_url: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RUNPOD_"))}
    env.update(
        PREFECT_API_URL=api_url,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="module")
def api_url(prefect_api):
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def pods(tmp_path_factory):
    # The "image": a clean environment with this checkout's Python first on PATH; no RunPod key.
    host_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RUNPOD_"))}
    host_env.update(PREFECT_HOME=str(tmp_path_factory.mktemp("pod-home")), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    with FakeRunPodPods(host_env=host_env, host_path=str(BIN)) as server:
        yield server


@pytest.fixture(scope="module")
def pool(api_url, tmp_path_factory):
    """The pool, created the way an operator would: the type found through the entry point."""
    home = tmp_path_factory.mktemp("cli-home")
    env = _client_env(api_url, home)
    template = json.loads(_prefect("work-pool", "get-default-base-job-template", "--type", "runpod", env=env))
    assert {"gpu_type", "gpu_count", "cloud_type", "interruptible", "image", "network_volume_id"} <= set(
        template["variables"]["properties"]
    )
    for key, value in FAST.items():
        template["variables"]["properties"][key]["default"] = value
    path = home / "template.json"
    path.write_text(json.dumps(template))
    out = _prefect("work-pool", "create", POOL, "--type", "runpod", "--base-job-template", str(path), env=env)
    assert "Created work pool" in out, out
    return POOL


@pytest.fixture
def fake(pods, monkeypatch):
    pods.reset()
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    monkeypatch.setenv("RUNPOD_API_BASE_URL", pods.base_url)
    return pods


async def _deploy_and_run(pool: str, flow_name: str, parameters=None, job_variables=None) -> uuid.UUID:
    from prefect import get_client

    async with get_client() as client:
        flow_id = await client.create_flow_from_name(flow_name)
        deployment_id = await client.create_deployment(
            flow_id=flow_id,
            name=f"{flow_name}-{uuid.uuid4().hex[:6]}",
            work_pool_name=pool,
            entrypoint=f"{ENTRY}:{flow_name.replace('-', '_')}",
            path=str(ROOT),
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
            job_variables=job_variables or {},
        )
        run = await client.create_flow_run_from_deployment(deployment_id, parameters=parameters or {})
        return run.id


async def _work(pool: str, until_final: list[uuid.UUID], timeout_s: float = 60, on_running=None) -> RunPodWorker:
    """An in-process worker: polls until every run in `until_final` is final, then stops. `on_running`
    (async, given the client and the run) is called once, when the first run is Running."""
    from prefect import get_client

    async with RunPodWorker(work_pool_name=pool, name=f"test-{uuid.uuid4().hex[:6]}", prefetch_seconds=5) as worker:
        deadline = time.monotonic() + timeout_s
        async with get_client() as client:
            while time.monotonic() < deadline:
                await worker.get_and_submit_flow_runs()
                runs = [await client.read_flow_run(i) for i in until_final]
                if on_running is not None and runs[0].state.is_running():
                    await on_running(client, runs[0])
                    on_running = None
                if all(r.state and r.state.is_final() for r in runs):
                    break
                await asyncio.sleep(0.5)
            else:
                raise AssertionError(f"runs not final after {timeout_s} s: {[r.state for r in runs]}")
    return worker


async def _run(flow_run_id: uuid.UUID):
    from prefect import get_client

    async with get_client() as client:
        return await client.read_flow_run(flow_run_id)


async def _artifacts(flow_run_id: uuid.UUID) -> list[dict]:
    import httpx
    from prefect.settings import PREFECT_API_URL

    # This Prefect's client sends nulls the server rejects (422): post the filter ourselves.
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{PREFECT_API_URL.value()}/artifacts/filter",
            json={"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "limit": 50, "offset": 0},
        )
        response.raise_for_status()
        return response.json()


def _pod_artifact(flow_run_id: uuid.UUID) -> str:
    found = [a for a in asyncio.run(_artifacts(flow_run_id)) if a["key"] == "runpod-pod"]
    assert len(found) == 1, found
    return found[0]["data"]


async def _logs(flow_run_id: uuid.UUID) -> str:
    import httpx
    from prefect.settings import PREFECT_API_URL

    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{PREFECT_API_URL.value()}/logs/filter",
            json={"logs": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "limit": 200, "offset": 0},
        )
        response.raise_for_status()
        return "\n".join(entry["message"] for entry in response.json())


def _pod_of(fake: FakeRunPodPods, flow_run_id: uuid.UUID):
    matches = [p for p in fake.pods.values() if p.name.endswith(str(flow_run_id))]
    assert len(matches) == 1, [p.name for p in fake.pods.values()]
    return matches[0]


def test_completed_run_through_prefect_worker_start(pool, fake, api_url, tmp_path):
    """`prefect worker start --pool` finds the type, a pod runs the flow to Completed, the pod is
    terminated, and the run's artifact gives pod id, GPU, hours and dollars. The key stays out."""
    flow_run_id = asyncio.run(_deploy_and_run(pool, "pod-ok", parameters={"value": 21}))
    env = _client_env(api_url, tmp_path / "worker-home")
    env.update(RUNPOD_API_KEY=API_KEY, RUNPOD_API_BASE_URL=fake.base_url, PREFECT_WORKER_PREFETCH_SECONDS="5")
    out = _prefect("worker", "start", "--pool", pool, "--run-once", "--name", "cli-worker", env=env, timeout=150)

    run = asyncio.run(_run(flow_run_id))
    assert run.state.is_completed(), f"{run.state}\n{out[-3000:]}"
    pod = _pod_of(fake, flow_run_id)
    assert pod.terminated and pod.started is not None
    assert pod.name == f"prefect-{pool}-{flow_run_id}"
    body = pod.body
    assert body["gpu"] == {"id": "NVIDIA A100 80GB PCIe", "count": 1} and body["cloud"] == "SECURE"
    assert body["args"] == "python -m prefect.engine" and body["env"]["PREFECT__FLOW_RUN_ID"] == str(flow_run_id)
    assert "RUNPOD_API_KEY in pod: False" in fake.output(pod.id)

    markdown = _pod_artifact(flow_run_id)
    assert pod.id in markdown and "NVIDIA A100 80GB PCIe" in markdown and "completed" in markdown
    assert "1.640" in markdown  # USD/h of the secure A100; dollars = that x hours

    logs = asyncio.run(_logs(flow_run_id))
    for text in (out, logs, markdown, json.dumps(body)):
        assert API_KEY not in text
    create = [r for r in fake.requests if r.method == "POST" and r.path == "/v2/pods"]
    assert len(create) == 1 and create[0].headers["authorization"] == f"Bearer {API_KEY}"


def test_failing_flow_pod_terminated(pool, fake):
    flow_run_id = asyncio.run(_deploy_and_run(pool, "pod-fails"))
    asyncio.run(_work(pool, [flow_run_id]))
    run = asyncio.run(_run(flow_run_id))
    assert run.state.is_failed(), run.state
    pod = _pod_of(fake, flow_run_id)
    assert pod.terminated
    assert "| failed |" in _pod_artifact(flow_run_id)


def test_max_runtime_terminates_pod(pool, fake):
    flow_run_id = asyncio.run(
        _deploy_and_run(pool, "pod-sleeps", parameters={"seconds": 120}, job_variables={"max_runtime_hours": 0.002})
    )
    started = time.monotonic()
    asyncio.run(_work(pool, [flow_run_id]))
    run = asyncio.run(_run(flow_run_id))
    assert run.state.is_crashed(), run.state
    assert "max_runtime_hours=0.002 passed" in run.state.message
    pod = _pod_of(fake, flow_run_id)
    assert pod.terminated and pod.process.poll() is not None
    assert time.monotonic() - started < 60


def test_cancelled_run_pod_terminated(pool, fake):
    from prefect.states import Cancelling

    async def cancel(client, run):
        await client.set_flow_run_state(run.id, Cancelling(), force=True)

    flow_run_id = asyncio.run(_deploy_and_run(pool, "pod-sleeps", parameters={"seconds": 120}))
    asyncio.run(_work(pool, [flow_run_id], on_running=cancel))
    run = asyncio.run(_run(flow_run_id))
    assert run.state.is_cancelled(), run.state
    pod = _pod_of(fake, flow_run_id)
    assert pod.stopped and pod.terminated and pod.process.poll() is not None
    assert "| cancelled |" in _pod_artifact(flow_run_id)


def test_pod_that_never_starts(pool, fake):
    fake.never_start = True
    flow_run_id = asyncio.run(_deploy_and_run(pool, "pod-ok", job_variables={"start_timeout_seconds": 2}))
    asyncio.run(_work(pool, [flow_run_id]))
    run = asyncio.run(_run(flow_run_id))
    assert run.state.is_crashed(), run.state
    assert "did not reach RUNNING within start_timeout_seconds=2" in run.state.message
    assert "PROVISIONING" in run.state.message
    pod = _pod_of(fake, flow_run_id)
    assert pod.terminated and pod.process is None
    assert "never started" in _pod_artifact(flow_run_id)


def test_price_above_max_is_refused_without_a_pod(pool, fake):
    flow_run_id = asyncio.run(_deploy_and_run(pool, "pod-ok", job_variables={"gpu_type": "NVIDIA H100 80GB HBM3"}))
    asyncio.run(_work(pool, [flow_run_id]))
    run = asyncio.run(_run(flow_run_id))
    assert run.state.is_crashed(), run.state
    assert "above max_price_per_hour=2.0: no pod created" in run.state.message
    assert fake.pods == {}
    assert not [r for r in fake.requests if r.method == "POST"]


def test_orphan_of_a_final_run_terminated_at_worker_start(pool, fake):
    # "A previous worker" left a pod for a run that has since finished, and one for a deleted run.
    from prefect import get_client
    from prefect.states import Completed

    async def finished_run() -> uuid.UUID:
        flow_run_id = await _deploy_and_run(pool, "pod-ok")
        async with get_client() as client:
            await client.set_flow_run_state(flow_run_id, Completed(), force=True)
        return flow_run_id

    flow_run_id = asyncio.run(finished_run())
    orphan = fake.add_pod(f"prefect-{pool}-{flow_run_id}", "sleep 120")
    gone = fake.add_pod(f"prefect-{pool}-{uuid.uuid4()}", "sleep 120")
    stranger = fake.add_pod("somebody-elses-pod", "sleep 120")

    async def start_worker() -> RunPodWorker:
        async with RunPodWorker(work_pool_name=pool, name="restarted") as worker:
            return worker

    worker = asyncio.run(start_worker())
    assert sorted(worker.terminated_orphans) == sorted([orphan.id, gone.id])
    assert orphan.terminated and gone.terminated and not stranger.terminated


def test_api_errors_retried_and_key_never_shown(pool, fake):
    # A 500 on create (the pod was not made) is retried; a 401 is named without the key.
    fake.fail_next(500, "POST", "/v2/pods")
    flow_run_id = asyncio.run(_deploy_and_run(pool, "pod-ok"))
    asyncio.run(_work(pool, [flow_run_id]))
    assert asyncio.run(_run(flow_run_id)).state.is_completed()
    assert len([r for r in fake.requests if r.method == "POST" and r.path == "/v2/pods"]) == 2

    fake.fail_next(401, "GET", "/v2/catalog/gpus/NVIDIA A100 80GB PCIe")
    second = asyncio.run(_deploy_and_run(pool, "pod-ok"))
    asyncio.run(_work(pool, [second]))
    run = asyncio.run(_run(second))
    assert run.state.is_crashed() and "HTTP 401" in run.state.message, run.state
    for text in (run.state.message, asyncio.run(_logs(second)), asyncio.run(_logs(flow_run_id))):
        assert API_KEY not in text
    assert API_KEY not in _pod_artifact(flow_run_id)


def test_literal_secret_in_env_refused():
    assert secret_env_keys(
        {
            "OPENAI_API_KEY": "sk-live",
            "HF_TOKEN": "{{ prefect.blocks.secret.hf-token }}",
            "TOKENIZERS_PARALLELISM": "false",
            "AWS_SECRET_ACCESS_KEY": "",
        }
    ) == ["OPENAI_API_KEY"]
    template = RunPodWorker.get_default_base_job_template()
    with pytest.raises(RunPodError, match="env OPENAI_API_KEY: a literal value"):
        asyncio.run(
            RunPodWorker.job_configuration.from_template_and_values(
                template, {"env": {"OPENAI_API_KEY": "sk-live"}}, client=object()
            )
        )


def test_orphan_of_a_running_flow_is_followed_until_final(pool, fake):
    # The previous worker died while its run went on: the new worker follows the pod, then ends it.
    from prefect import get_client
    from prefect.states import Completed, Running

    async def scenario() -> tuple[uuid.UUID, str]:
        flow_run_id = await _deploy_and_run(pool, "pod-ok")
        async with get_client() as client:
            await client.set_flow_run_state(flow_run_id, Running(), force=True)
        orphan = fake.add_pod(f"prefect-{pool}-{flow_run_id}", "sleep 120")
        async with RunPodWorker(work_pool_name=pool, name="restarted") as worker:
            assert worker.terminated_orphans == []
            await asyncio.sleep(1.5)
            assert not orphan.terminated
            async with get_client() as client:
                await client.set_flow_run_state(flow_run_id, Completed(), force=True)
            deadline = time.monotonic() + 20
            while not orphan.terminated and time.monotonic() < deadline:
                await asyncio.sleep(0.3)
        return flow_run_id, orphan.id

    flow_run_id, pod_id = asyncio.run(scenario())
    assert fake.pods[pod_id].terminated
    markdown = _pod_artifact(flow_run_id)
    assert pod_id in markdown and "| completed |" in markdown
