"""The hand-off trigger and the concurrency guards of deployments/prefect.yaml, on a real server.

One `prefect server start` (SQLite in a temp dir, all its services: the triggers and actions
services evaluate automations) → `ft-pipeline pools create` → `prefect deploy --all` from the
repository's prefect.yaml. No worker runs: the tests move flow runs of ft-pipeline/local-gpu
through Pending → Running → Completed / Failed with the API a worker's engine uses, so the server
emits the same `prefect.flow-run.*` events and applies the same concurrency rules as for a real run.

Every process is started in its own process group and stopped at the end of the module.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from processes import free_port, run_ok, stop, tool

ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
HAND_OFF_TIMEOUT_S = 45.0  # measured here: ~1-3 s from the Completed state to the runpod run

pytestmark = [pytest.mark.prefect, pytest.mark.timeout(300)]


class Server:
    def __init__(self, api: str, proc: subprocess.Popen, log: Path):
        self.api = api
        self.proc = proc
        self.log = log
        self.client = httpx.Client(base_url=api, timeout=15)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def get(self, path: str) -> dict | list:
        response = self.client.get(path)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict) -> dict | list:
        response = self.client.post(path, json=body)
        assert response.status_code < 300, f"POST {path}: {response.status_code} {response.text}"
        return response.json()

    def deployment(self, flow_and_name: str) -> dict:
        return self.get(f"/deployments/name/{flow_and_name}")

    def runs_of(self, deployment_id: str) -> list[dict]:
        return self.post(
            "/flow_runs/filter",
            {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "sort": "START_TIME_DESC", "limit": 50},
        )

    def start_run(self, deployment_id: str, parameters: dict, tags: list[str] | None = None) -> str:
        body = {"parameters": parameters, **({"tags": tags} if tags else {})}
        return self.post(f"/deployments/{deployment_id}/create_flow_run", body)["id"]

    def set_state(self, flow_run_id: str, state_type: str, message: str = "") -> dict:
        """Propose a state the way a worker's engine does (orchestration rules apply, no force)."""
        return self.post(
            f"/flow_runs/{flow_run_id}/set_state",
            {"state": {"type": state_type, "message": message}, "force": False},
        )

    def run_to(self, flow_run_id: str, final: str) -> None:
        for state in ("PENDING", "RUNNING", final):
            result = self.set_state(flow_run_id, state)
            assert result["status"] == "ACCEPT", f"{state}: {result}\n{self.tail()}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triggers")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FTP_", "FT_PIPELINE_"))}
    base_env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1")
    server_env = {
        **base_env,
        "PREFECT_HOME": str(tmp / "server-home"),
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_SERVER_LEVEL": "WARNING",
    }
    client_env = {**base_env, "PREFECT_HOME": str(tmp / "client-home"), "PREFECT_API_URL": api}
    log = tmp / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=server_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    srv = Server(api, proc, log)
    srv.client_env = client_env
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"prefect server exited:\n{srv.tail()}"
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"prefect server not healthy:\n{srv.tail()}"
            time.sleep(0.3)
        _run([tool("ft-pipeline"), "pools", "create", "--data-root", str(tmp / "data")], client_env)
        out = _run([tool("prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_YAML)], client_env)
        for name in ("ft-pipeline/runpod", "ft-pipeline/local-gpu", "cv-batch/overnight"):
            assert f"Deployment '{name}' successfully created" in out, out[-3000:]
        yield srv
    finally:
        srv.client.close()
        stop(proc)
    assert proc.poll() is not None, "prefect server still running"


def _spec(name: str) -> dict:
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    return next(d for d in spec["deployments"] if d["name"] == name)


def _wait_for_runs(server: Server, deployment_id: str, count: int, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        runs = server.runs_of(deployment_id)
        if len(runs) >= count or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def test_trigger_is_registered_on_the_runpod_deployment(server):
    runpod = server.deployment("ft-pipeline/runpod")
    automations = server.get(f"/automations/related-to/prefect.deployment.{runpod['id']}")
    assert len(automations) == 1, automations
    [automation] = automations
    assert automation["enabled"]
    assert automation["name"] == "ft-pipeline/runpod after ft-pipeline/local-gpu completed"

    trigger = automation["trigger"]
    assert trigger["type"] == "event" and trigger["posture"] == "Reactive"
    assert trigger["expect"] == ["prefect.flow-run.Completed"]
    assert trigger["threshold"] == 1
    assert trigger["match"] == {"prefect.resource.id": "prefect.flow-run.*"}
    assert trigger["match_related"] == [
        {"prefect.resource.role": "flow", "prefect.resource.name": "ft-pipeline"},
        {"prefect.resource.role": "deployment", "prefect.resource.name": "local-gpu"},
    ]

    [action] = automation["actions"]
    assert action["type"] == "run-deployment"
    assert action["source"] == "selected" and action["deployment_id"] == runpod["id"]
    steps = action["parameters"]["steps"]
    assert "'2-6' if 'cross-pool' not in flow_run.tags" in steps, steps
    assert set(action["parameters"]) == {"steps", "config_file", "profile", "overrides"}
    assert set(action["parameters"]) <= set(runpod["parameter_openapi_schema"]["properties"])

    # The trigger belongs to runpod only.
    for other in ("ft-pipeline/local-gpu", "cv-batch/overnight"):
        dep = server.deployment(other)
        assert server.get(f"/automations/related-to/prefect.deployment.{dep['id']}") == []


def test_concurrency_limits_on_the_deployments_that_write(server):
    expected = {
        "ft-pipeline/runpod": ("runpod", "ENQUEUE"),
        "ft-pipeline/local-gpu": ("local-gpu", "ENQUEUE"),
        "cv-batch/overnight": ("overnight", "CANCEL_NEW"),
    }
    for name, (spec_name, strategy) in expected.items():
        dep = server.deployment(name)
        assert dep["global_concurrency_limit"]["limit"] == 1, (name, dep["global_concurrency_limit"])
        assert dep["global_concurrency_limit"]["active"]
        assert dep["concurrency_options"]["collision_strategy"] == strategy, name
        spec = _spec(spec_name)
        assert spec["concurrency_limit"] == {"limit": 1, "collision_strategy": strategy}


def test_completed_cv_run_starts_runpod_with_its_parameters_and_a_failed_one_none(server):
    local = server.deployment("ft-pipeline/local-gpu")
    runpod = server.deployment("ft-pipeline/runpod")
    assert server.runs_of(runpod["id"]) == []

    # A failed CV run first: it must start nothing.
    failed_marker = f"failed-{uuid.uuid4().hex[:8]}"
    failed = server.start_run(local["id"], {"steps": "0,1", "profile": "demo", "overrides": {"marker": failed_marker}})
    server.run_to(failed, "FAILED")

    # Then a completed one, with every parameter the hand-off passes on.
    marker = f"completed-{uuid.uuid4().hex[:8]}"
    overrides = {"marker": marker, "sampling.sample_size": 6, "teachers.local_model_path": "demo-data/models/x"}
    completed = server.start_run(
        local["id"],
        {"steps": "0,1", "config_file": "configs/team.yaml", "profile": "demo", "overrides": overrides},
    )
    t = time.monotonic()
    server.run_to(completed, "COMPLETED")
    runs = _wait_for_runs(server, runpod["id"], 1, HAND_OFF_TIMEOUT_S)
    assert runs, f"no ft-pipeline/runpod run {HAND_OFF_TIMEOUT_S} s after the CV run completed:\n{server.tail()}"
    print(f"hand-off after {time.monotonic() - t:.1f} s")

    # Events are evaluated in order: the failed run's event was handled before the completed one's.
    # Give the server a few more seconds for anything late, then expect exactly the one run.
    time.sleep(3)
    runs = server.runs_of(runpod["id"])
    assert len(runs) == 1, [(r["name"], r["parameters"]) for r in runs]
    [run] = runs
    assert run["parameters"] == {
        "steps": "2-6",
        "config_file": "configs/team.yaml",
        "profile": "demo",
        "overrides": overrides,
    }
    assert run["work_pool_name"] == "runpod"
    assert run["state_type"] == "SCHEDULED"
    assert run["created_by"]["type"] == "AUTOMATION"


def test_cv_run_without_profile_hands_off_with_the_runpod_default(server):
    local = server.deployment("ft-pipeline/local-gpu")
    runpod = server.deployment("ft-pipeline/runpod")
    before = {r["id"] for r in server.runs_of(runpod["id"])}

    completed = server.start_run(local["id"], {"steps": "0,1"})
    server.run_to(completed, "COMPLETED")
    runs = _wait_for_runs(server, runpod["id"], len(before) + 1, HAND_OFF_TIMEOUT_S)
    new = [r for r in runs if r["id"] not in before]
    assert len(new) == 1, f"{new}\n{server.tail()}"
    assert new[0]["parameters"] == {"steps": "2-6", "config_file": None, "profile": "production", "overrides": None}


def test_cross_pool_child_is_not_handed_off(server):
    """The CV child of a runpod run with cv_deployment (tagged cross-pool by flows/orchestrate.py):
    its parent runs phases 2-6 itself, so the trigger's action refuses it and no run is created."""
    local = server.deployment("ft-pipeline/local-gpu")
    runpod = server.deployment("ft-pipeline/runpod")
    before = len(server.runs_of(runpod["id"]))

    child = server.start_run(local["id"], {"steps": "0,1", "profile": "demo"}, tags=["ft-pipeline", "cross-pool"])
    assert "cross-pool" in server.get(f"/flow_runs/{child}")["tags"]
    server.run_to(child, "COMPLETED")
    deadline = time.monotonic() + HAND_OFF_TIMEOUT_S
    while "cross_pool_child_not_handed_off" not in server.tail(20000):
        assert time.monotonic() < deadline, f"the trigger did not refuse the cross-pool child:\n{server.tail()}"
        time.sleep(0.5)
    assert "Action failed" in server.tail(20000)
    time.sleep(2)
    assert len(server.runs_of(runpod["id"])) == before


def test_concurrency_collisions_enqueue_or_cancel(server):
    """Two runs of one deployment at once: ENQUEUE makes the second wait, CANCEL_NEW cancels it."""
    local = server.deployment("ft-pipeline/local-gpu")
    first = server.start_run(local["id"], {"steps": "0,1"})
    second = server.start_run(local["id"], {"steps": "0,1"})
    assert server.set_state(first, "PENDING")["status"] == "ACCEPT"
    waiting = server.set_state(second, "PENDING")
    assert waiting["status"] == "REJECT", waiting
    assert waiting["state"]["name"] == "AwaitingConcurrencySlot"
    assert waiting["state"]["type"] == "SCHEDULED"
    # The slot frees when the first run ends; the second then gets it.
    server.set_state(first, "RUNNING")
    server.set_state(first, "FAILED")
    assert server.set_state(second, "PENDING")["status"] == "ACCEPT"
    server.set_state(second, "RUNNING")
    server.set_state(second, "FAILED")

    runpod = server.deployment("ft-pipeline/runpod")
    runpod_runs = len(server.runs_of(runpod["id"]))
    overnight = server.deployment("cv-batch/overnight")
    night1 = server.start_run(overnight["id"], {"scope": "all"})
    night2 = server.start_run(overnight["id"], {"scope": "all"})
    assert server.set_state(night1, "PENDING")["status"] == "ACCEPT"
    cancelled = server.set_state(night2, "PENDING")
    assert cancelled["state"]["type"] == "CANCELLED", cancelled
    server.set_state(night1, "RUNNING")
    server.set_state(night1, "COMPLETED")
    # Neither the failed local-gpu runs nor a completed cv-batch run (another flow) start a runpod run.
    time.sleep(3)
    assert len(server.runs_of(runpod["id"])) == runpod_runs


def test_deploying_again_replaces_the_trigger(server):
    """prefect deploy deletes the automations a deployment owns and creates them again: one stays."""
    runpod = server.deployment("ft-pipeline/runpod")
    [before] = server.get(f"/automations/related-to/prefect.deployment.{runpod['id']}")
    _run(
        [tool("prefect"), "--no-prompt", "deploy", "--prefect-file", str(PREFECT_YAML), "--name", "runpod"],
        server.client_env,
    )
    assert server.deployment("ft-pipeline/runpod")["id"] == runpod["id"]
    [after] = server.get(f"/automations/related-to/prefect.deployment.{runpod['id']}")
    assert after["id"] != before["id"]
    assert {k: v for k, v in after["trigger"].items() if k != "id"} == {
        k: v for k, v in before["trigger"].items() if k != "id"
    }
    assert after["actions"] == before["actions"]


def _run(args: list[str], env: dict[str, str], timeout: float = 180) -> str:
    return run_ok(args, env, timeout)
