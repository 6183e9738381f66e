"""A Prefect worker type ``runpod``: one RunPod pod per flow run, started and stopped by the worker.

``prefect work-pool create --type runpod POOL`` and ``prefect worker start --pool POOL`` find it
through the ``prefect.collections`` entry point in pyproject.toml. Per flow run the worker checks the
GPU's price, creates a pod whose command executes that flow run (``python -m prefect.engine`` with
``PREFECT__FLOW_RUN_ID``), follows pod and flow run, and terminates the pod when the run is final,
cancelled, over its maximum runtime, or when the pod never reaches RUNNING. A restarted worker
terminates the pods it owns (named ``{pod_name_prefix}-{pool}-{flow run id}``) whose flow run is
final or gone, and follows the others. Each run gets a markdown artifact (key ``runpod-pod``): pod id,
GPU, hours and dollars. docs/runpod-worker.md has the commands and the job-template fields.

RunPod REST API v2 (``https://api.runpod.io``; runpod/docs ``api-reference-v2/openapi.json``; v1 at
rest.runpod.io/v1 with ``gpuTypeIds``/``dockerStartCmd`` was retired in November 2026):

- ``POST /v2/pods`` ``{name, image, args, env, disk, cloud: SECURE|COMMUNITY, gpu: {id, count},
  mounts: {network: [{volumeId, path}]}, dataCenterIds}`` → 201 Pod. Unknown fields are refused by
  name; the create body has no spot/interruptible option.
- ``GET /v2/pods/{id}`` → Pod ``{id, name, status, cost, gpu, createdAt, startedAt, ...}``; status
  PROVISIONING → STARTING → RUNNING, then EXITED / ERROR / TERMINATED; ``cost`` is USD per hour
  (0 when EXITED or TERMINATED). ``GET /v2/pods`` → ``{"pods": [...]}``.
- ``POST /v2/pods/{id}/action`` ``{"action": "stop"}``; ``DELETE /v2/pods/{id}`` terminates.
- ``GET /v2/pods/{id}/logs?tail=N``: server-sent events of the container's output.
- ``GET /v2/catalog/gpus/{id}`` → ``{price: {secure, community}}``, USD per GPU per hour.
- Errors are RFC 9457 ``{title, status, detail}``; ``Authorization: Bearer KEY``.

The key comes from a Secret block (``api_key_secret_block``) or ``RUNPOD_API_KEY`` in the worker's
environment, and is never logged, written to an artifact or sent to the pod. ``RUNPOD_API_BASE_URL``
points the worker at another server (the test suite's fake).
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Self
from urllib.parse import quote

import anyio
import anyio.abc
import httpx
from prefect.client.schemas.actions import ArtifactCreate
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import InfrastructureNotAvailable, InfrastructureNotFound, ObjectNotFound
from prefect.utilities.slugify import slugify
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from floorplan_ft.redact import MASK, mask_urls_in

DEFAULT_API_BASE_URL = "https://api.runpod.io"
ARTIFACT_KEY = "runpod-pod"
RUNNING, FINISHED = "RUNNING", frozenset({"EXITED", "ERROR", "TERMINATED"})
_SECRET_WORDS = frozenset({"KEY", "SECRET", "TOKEN", "PASSWORD", "PASSWD", "PWD", "CREDENTIAL", "CREDENTIALS", "AUTH"})
_REFERENCE = re.compile(r"^\s*\{\{\s*prefect\.(blocks|variables)\.[^}]+\}\}\s*$")


class RunPodAPISettings(BaseSettings):
    """Where the worker finds RunPod: read from the worker's environment."""

    model_config = SettingsConfigDict(extra="ignore")

    api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("RUNPOD_API_KEY"),
        description="RunPod API key, used when the pool names no Secret block. Never logged.",
    )
    api_base_url: str = Field(
        DEFAULT_API_BASE_URL,
        validation_alias=AliasChoices("RUNPOD_API_BASE_URL"),
        description="RunPod REST API v2 base URL (without /v2); a test server in the suite.",
    )


class RunPodError(RuntimeError):
    """A refusal or a RunPod problem; the message names the field or the API answer, never the key."""


class RunPodAPIError(RunPodError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        return self.status in (408, 409, 425, 429) or self.status >= 500


def secret_env_keys(env: dict[str, Any] | None) -> list[str]:
    """Keys of ``env`` that name a secret (a KEY, TOKEN, SECRET, PASSWORD... word) but hold a literal
    value instead of a ``{{ prefect.blocks.* }}`` / ``{{ prefect.variables.* }}`` reference."""
    found = []
    for key, value in (env or {}).items():
        words = set(re.split(r"[^A-Z0-9]+", str(key).upper()))
        if words & _SECRET_WORDS and isinstance(value, str) and value.strip() and not _REFERENCE.match(value):
            found.append(str(key))
    return sorted(found)


def _template_envs(base_job_template: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Every env value as written (before block references resolve): pool template and job variables."""
    merged: dict[str, Any] = {}
    default = base_job_template.get("variables", {}).get("properties", {}).get("env", {}).get("default")
    for source in (base_job_template.get("job_configuration", {}).get("env"), default, values.get("env")):
        if isinstance(source, dict):
            merged.update(source)
    merged.update({k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("env.")})
    return merged


class RunPodJobConfiguration(BaseJobConfiguration):
    """One pod per flow run. Every field is a job variable: pool default, deployment, or run."""

    image: str = Field(
        "REGISTRY/ft-pipeline-runpod:2026.11",
        description="Container image with the project and Prefect (docker/Dockerfile.runpod); its pull step finds the code.",
    )
    gpu_type: str = Field(
        "NVIDIA A100 80GB PCIe", description="RunPod GPU type id (GET /v2/catalog/gpus), e.g. 'NVIDIA H100 80GB HBM3'."
    )
    gpu_count: int = Field(1, ge=1, description="GPUs in the pod.")
    cloud_type: Literal["SECURE", "COMMUNITY"] = Field(
        "SECURE", description="SECURE (RunPod data centres) or COMMUNITY (cheaper, community hosts)."
    )
    interruptible: bool = Field(
        False,
        description="Spot pod. RunPod's REST API v2 offers no spot option for pods: true is refused before any pod.",
    )
    network_volume_id: str | None = Field(
        None, description="Network volume to mount (the shared data root and model caches); empty: none."
    )
    volume_mount_path: str = Field("/workspace", description="Where the network volume is mounted in the pod.")
    container_disk_gb: int = Field(50, ge=1, description="Container disk in GB (wiped when the pod stops).")
    data_center_ids: list[str] = Field(
        default_factory=list, description="Preferred data centres (the network volume's); empty: any."
    )
    max_runtime_hours: float = Field(
        12.0, gt=0, description="The pod is terminated and the run marked Crashed when it runs longer than this."
    )
    max_price_per_hour: float | None = Field(
        3.0,
        gt=0,
        description="Refuse the run (no pod) when gpu_count x the GPU's price for cloud_type is above this, USD/h; "
        "empty: no limit.",
    )
    start_timeout_seconds: float = Field(
        900.0, gt=0, description="A pod not RUNNING after this long is terminated and the run marked Crashed."
    )
    poll_interval_seconds: float = Field(10.0, gt=0, description="How often the worker reads the pod and the run.")
    stop_grace_seconds: float = Field(
        30.0, ge=0, description="On cancellation: time between stopping the pod (SIGTERM) and terminating it."
    )
    pod_name_prefix: str = Field(
        "prefect", description="Pods are named PREFIX-POOL-FLOW_RUN_ID; a restarted worker owns what matches."
    )
    api_key_secret_block: str | None = Field(
        None, description="Name of a Secret block holding the RunPod API key; empty: RUNPOD_API_KEY of the worker."
    )

    @classmethod
    async def from_template_and_values(cls, base_job_template: dict[str, Any], values: dict[str, Any], client=None):
        literal = secret_env_keys(_template_envs(base_job_template, values))
        if literal:
            raise RunPodError(
                f"env {', '.join(literal)}: a literal value for a secret. Put a block reference in the work "
                "pool's job template instead, e.g. '{{ prefect.blocks.secret.NAME }}' (resolved by the worker at "
                "run time), or let the flow load its keys from blocks."
            )
        return await super().from_template_and_values(base_job_template, values, client=client)

    @staticmethod
    def _base_flow_run_command() -> str:
        return "python -m prefect.engine"  # reads PREFECT__FLOW_RUN_ID, runs the deployment's pull steps

    def owner_prefix(self, pool_name: str) -> str:
        return f"{self.pod_name_prefix}-{slugify(pool_name)}-"


class RunPodVariables(BaseVariables):
    """The pool form's fields (``prefect work-pool get-default-base-job-template --type runpod``)."""

    image: str = Field(
        "REGISTRY/ft-pipeline-runpod:2026.11",
        description="Container image with the project and Prefect (docker/Dockerfile.runpod).",
    )
    gpu_type: str = Field("NVIDIA A100 80GB PCIe", description="RunPod GPU type id (GET /v2/catalog/gpus).")
    gpu_count: int = Field(1, ge=1, description="GPUs in the pod.")
    cloud_type: Literal["SECURE", "COMMUNITY"] = Field("SECURE", description="SECURE or COMMUNITY cloud.")
    interruptible: bool = Field(False, description="Spot pod: not offered by RunPod's REST API v2 (true is refused).")
    network_volume_id: str | None = Field(None, description="Network volume id to mount; empty: none.")
    volume_mount_path: str = Field("/workspace", description="Mount path of the network volume.")
    container_disk_gb: int = Field(50, ge=1, description="Container disk in GB.")
    data_center_ids: list[str] = Field(default_factory=list, description="Preferred data centres; empty: any.")
    max_runtime_hours: float = Field(12.0, gt=0, description="Terminate the pod after this many hours.")
    max_price_per_hour: float | None = Field(
        3.0, gt=0, description="Refuse runs whose pod would cost more than this, USD/h (gpu_count x price)."
    )
    start_timeout_seconds: float = Field(900.0, gt=0, description="Terminate a pod not RUNNING after this long.")
    poll_interval_seconds: float = Field(10.0, gt=0, description="Seconds between reads of the pod and the run.")
    stop_grace_seconds: float = Field(30.0, ge=0, description="Cancellation: seconds between stop and terminate.")
    pod_name_prefix: str = Field("prefect", description="Pods are named PREFIX-POOL-FLOW_RUN_ID.")
    api_key_secret_block: str | None = Field(
        None, description="Secret block with the RunPod API key; empty: the worker's RUNPOD_API_KEY."
    )
    env: dict[str, str | None] = Field(
        default_factory=dict,
        title="Environment Variables",
        description="Environment of the flow run in the pod. Secrets only as block references "
        "('{{ prefect.blocks.secret.NAME }}'), never as values: literal values under KEY/TOKEN/SECRET/PASSWORD "
        "names are refused.",
    )


class RunPodWorkerResult(BaseWorkerResult):
    """The pod id and 0 (the run completed or was cancelled) or 1."""


class RunPodClient:
    """The few REST v2 calls the worker makes; transient failures (429, 5xx, connection) are retried."""

    def __init__(self, api_key: str, base_url: str = DEFAULT_API_BASE_URL, retries: int = 3, timeout_s: float = 30.0):
        self._key = api_key
        self._retries = retries
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout_s
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    def scrub(self, text: str) -> str:
        return mask_urls_in(str(text).replace(self._key, MASK)) if self._key else mask_urls_in(str(text))

    async def _request(self, method: str, path: str, *, ok_404: bool = False, retries: int | None = None, **kw):
        attempts = (self._retries if retries is None else retries) + 1
        for attempt in range(attempts):
            try:
                response = await self._http.request(method, path, **kw)
            except httpx.HTTPError as exc:
                if attempt + 1 >= attempts:
                    raise RunPodAPIError(0, self.scrub(f"{method} {path}: {type(exc).__name__}: {exc}")) from None
            else:
                if response.status_code == 404 and ok_404:
                    return None
                if response.is_success:
                    return response.json() if response.content else {}
                error = RunPodAPIError(response.status_code, self.scrub(f"{method} {path}: {_problem(response)}"))
                if not error.transient or attempt + 1 >= attempts:
                    raise error
            await anyio.sleep(min(0.5 * 2**attempt, 8.0))
        raise AssertionError("unreachable")

    async def create_pod(self, body: dict[str, Any]) -> dict[str, Any]:
        # A 5xx may still have created the pod: before trying again, adopt one with the same name.
        for attempt in range(self._retries + 1):
            try:
                return await self._request("POST", "/v2/pods", json=body, retries=0)
            except RunPodAPIError as exc:
                if not exc.transient or attempt >= self._retries:
                    raise
            await anyio.sleep(min(0.5 * 2**attempt, 8.0))
            existing = [p for p in await self.list_pods() if p.get("name") == body["name"]]
            if existing:
                return existing[0]
        raise AssertionError("unreachable")

    async def get_pod(self, pod_id: str) -> dict[str, Any] | None:
        return await self._request("GET", f"/v2/pods/{pod_id}", ok_404=True)

    async def list_pods(self) -> list[dict[str, Any]]:
        return (await self._request("GET", "/v2/pods")).get("pods", [])

    async def stop_pod(self, pod_id: str) -> None:
        await self._request("POST", f"/v2/pods/{pod_id}/action", json={"action": "stop"}, ok_404=True)

    async def terminate_pod(self, pod_id: str) -> bool:
        """True when the pod is gone (also when it already was)."""
        await self._request("DELETE", f"/v2/pods/{pod_id}", ok_404=True, retries=max(self._retries, 5))
        return True

    async def gpu_price(self, gpu_type: str, cloud: str) -> float | None:
        gpu = await self._request("GET", f"/v2/catalog/gpus/{quote(gpu_type, safe='')}", ok_404=True)
        if gpu is None:
            raise RunPodError(f"gpu_type {gpu_type!r}: not in RunPod's GPU catalog (GET /v2/catalog/gpus)")
        price = (gpu.get("price") or {}).get(cloud.lower())
        return float(price) if price is not None else None

    async def log_tail(self, pod_id: str, lines: int = 40, wait_s: float = 3.0) -> list[str]:
        """The last lines of the container's output (the SSE stream, read for at most ``wait_s``)."""
        out: list[str] = []
        try:
            with anyio.move_on_after(wait_s):
                async with self._http.stream("GET", f"/v2/pods/{pod_id}/logs", params={"tail": lines}) as response:
                    if not response.is_success:
                        return []
                    async for line in response.aiter_lines():
                        if line.startswith("data:"):
                            out.append(self.scrub(line[5:].strip()))
        except httpx.HTTPError:
            pass
        return out[-lines:]


def _problem(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    if isinstance(body, dict):
        text = body.get("detail") or body.get("title") or body.get("message") or ""
        return f"HTTP {response.status_code} {text}".strip()
    return f"HTTP {response.status_code}"


@dataclass
class PodRecord:
    """What the worker saw of one pod: the artifact's numbers."""

    pod_id: str
    gpu: str
    cloud: str
    created_wall: float
    running_since: float | None = None
    ended_wall: float | None = None
    cost_per_hr: float = 0.0
    last_status: str = "PROVISIONING"
    outcome: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def hours(self) -> float:
        if self.running_since is None:
            return 0.0
        return max(0.0, ((self.ended_wall or time.time()) - self.running_since) / 3600.0)

    @property
    def dollars(self) -> float:
        return self.cost_per_hr * self.hours

    def markdown(self) -> str:
        rows = [
            "| pod | GPU | cloud | hours | USD/h | dollars | outcome |",
            "|---|---|---|---|---|---|---|",
            (
                f"| `{self.pod_id}` | {self.gpu} | {self.cloud} | {self.hours:.4f} | {self.cost_per_hr:.3f} | "
                f"{self.dollars:.4f} | {self.outcome} |"
            ),
        ]
        notes = [f"- {n}" for n in self.notes]
        return "\n".join(["## RunPod pod", "", *rows, "", *notes]).rstrip() + "\n"


class RunPodWorker(BaseWorker[RunPodJobConfiguration, RunPodVariables, RunPodWorkerResult]):
    type = "runpod"
    job_configuration = RunPodJobConfiguration
    job_configuration_variables = RunPodVariables
    _description = (
        "Run each flow run in its own RunPod GPU pod, created through RunPod's API and terminated when the run "
        "ends, is cancelled or passes its maximum runtime."
    )
    _display_name = "RunPod"
    _documentation_url = "https://docs.runpod.io/api-reference-v2/overview"
    orphan_sweep_seconds: float = 300.0

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._followed: set[uuid.UUID] = set()
        self._next_sweep = 0.0
        self.terminated_orphans: list[str] = []

    # ------------------------------------------------------------------ API access

    async def _api(self, configuration: RunPodJobConfiguration) -> RunPodClient:
        settings = RunPodAPISettings()
        key: str | None = None
        if configuration.api_key_secret_block:
            from prefect.blocks.system import Secret

            secret = await Secret.aload(configuration.api_key_secret_block)
            key = str(secret.get())
        elif settings.api_key is not None:
            key = settings.api_key.get_secret_value()
        if not key:
            raise RunPodError(
                "no RunPod API key: set RUNPOD_API_KEY in the worker's environment or name a Secret block in the "
                "pool's api_key_secret_block"
            )
        return RunPodClient(key, settings.api_base_url)

    # ------------------------------------------------------------------ one flow run

    async def run(
        self,
        flow_run: FlowRun,
        configuration: RunPodJobConfiguration,
        task_status: anyio.abc.TaskStatus[str] | None = None,
    ) -> RunPodWorkerResult:
        logger = self.get_flow_run_logger(flow_run)
        if configuration.interruptible:
            raise RunPodError(
                "interruptible=true: RunPod's REST API v2 has no spot option for pods; set interruptible=false"
            )
        self._followed.add(flow_run.id)
        try:
            async with await self._api(configuration) as api:
                await self._check_price(api, configuration)
                body = self._create_body(flow_run, configuration)
                pod = await api.create_pod(body)
                record = PodRecord(pod["id"], configuration.gpu_type, configuration.cloud_type, time.time())
                logger.info(f"Created RunPod pod {record.pod_id} ({body['name']}, {configuration.gpu_count}x GPU)")
                if task_status is not None:
                    task_status.started(record.pod_id)
                return await self._follow_and_finish(api, flow_run, configuration, record, logger)
        finally:
            self._followed.discard(flow_run.id)

    async def _check_price(self, api: RunPodClient, configuration: RunPodJobConfiguration) -> None:
        limit = configuration.max_price_per_hour
        if limit is None:
            return
        price = await api.gpu_price(configuration.gpu_type, configuration.cloud_type)
        if price is None:
            raise RunPodError(
                f"max_price_per_hour={limit}: RunPod lists no {configuration.cloud_type} price for "
                f"{configuration.gpu_type!r}; choose another cloud_type or clear max_price_per_hour"
            )
        total = price * configuration.gpu_count
        if total > limit + 1e-9:
            raise RunPodError(
                f"price {total:.3f} USD/h ({configuration.gpu_count} x {configuration.gpu_type}, "
                f"{configuration.cloud_type}) is above max_price_per_hour={limit}: no pod created. Raise "
                "max_price_per_hour or pick a cheaper gpu_type / cloud_type"
            )

    def _create_body(self, flow_run: FlowRun, configuration: RunPodJobConfiguration) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": f"{configuration.owner_prefix(self._work_pool_name)}{flow_run.id}",
            "image": configuration.image,
            "args": configuration.command,
            "env": {k: v for k, v in configuration.env.items() if v is not None},
            "disk": configuration.container_disk_gb,
            "cloud": configuration.cloud_type,
            "gpu": {"id": configuration.gpu_type, "count": configuration.gpu_count},
        }
        if configuration.network_volume_id:
            body["mounts"] = {
                "network": [{"volumeId": configuration.network_volume_id, "path": configuration.volume_mount_path}]
            }
        if configuration.data_center_ids:
            body["dataCenterIds"] = list(configuration.data_center_ids)
        return body

    async def _follow_and_finish(self, api, flow_run, configuration, record: PodRecord, logger) -> RunPodWorkerResult:
        status_code, worker_stopping = 1, False
        try:
            status_code = await self._follow(api, flow_run, configuration, record, logger)
        except anyio.get_cancelled_exc_class():
            # The worker is stopping: the flow run goes on in its pod; a restarted worker follows it.
            worker_stopping = True
            logger.warning(f"Worker stopping: pod {record.pod_id} left running; a restarted worker will follow it")
            raise
        except Exception as exc:
            record.outcome = record.outcome or "worker error"
            record.notes.append(api.scrub(f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            if not worker_stopping:
                with anyio.CancelScope(shield=True):
                    await self._terminate(api, record, logger)
                    await self._write_artifact(flow_run, record, logger)
        return RunPodWorkerResult(identifier=record.pod_id, status_code=status_code)

    async def _follow(self, api, flow_run, configuration, record: PodRecord, logger) -> int:
        """Until the run is final (or cancelled, over time, never started, or its pod died). Returns the
        status code; states the worker sets itself are set here."""
        deadline = record.created_wall + configuration.max_runtime_hours * 3600.0
        start_deadline = record.created_wall + configuration.start_timeout_seconds
        pod_gone_polls = 0
        while True:
            pod = await self._read_pod(api, record, logger)
            if pod is not None:
                self._note_pod(record, pod)
            run = await self.client.read_flow_run(flow_run.id)
            state = run.state
            now = time.time()
            if state is not None and state.is_final():
                record.outcome = state.type.value.lower()
                await self._terminate(api, record, logger)
                return 0 if state.is_completed() or state.is_cancelled() else 1
            if state is not None and state.is_cancelling():
                record.outcome = "cancelled"
                logger.info(f"Flow run cancelling: stopping pod {record.pod_id}")
                await self._stop_then_terminate(api, record, configuration.stop_grace_seconds, logger)
                await self._mark_flow_run_as_cancelled(
                    run, state_updates={"message": f"Cancelled: RunPod pod {record.pod_id} terminated."}
                )
                return 0
            if record.running_since is None and now > start_deadline:
                record.outcome = "never started"
                tail = await api.log_tail(record.pod_id)
                message = (
                    f"RunPod pod {record.pod_id} did not reach RUNNING within start_timeout_seconds="
                    f"{configuration.start_timeout_seconds:g} (last status {record.last_status}): terminated"
                )
                return await self._crash(api, run, record, message, tail, logger)
            if now > deadline:
                record.outcome = "max runtime"
                message = (
                    f"max_runtime_hours={configuration.max_runtime_hours:g} passed: RunPod pod {record.pod_id} "
                    "terminated"
                )
                return await self._crash(api, run, record, message, [], logger)
            limit = configuration.max_price_per_hour
            if limit is not None and record.cost_per_hr > limit + 1e-9:
                record.outcome = "over price"
                message = (
                    f"RunPod pod {record.pod_id} costs {record.cost_per_hr:.3f} USD/h, above max_price_per_hour="
                    f"{limit}: terminated"
                )
                return await self._crash(api, run, record, message, [], logger)
            if record.last_status in FINISHED:
                # The engine reports the final state just before the container exits: give it two polls.
                pod_gone_polls += 1
                if pod_gone_polls > 2:
                    record.outcome = "pod ended"
                    tail = await api.log_tail(record.pod_id)
                    message = (
                        f"RunPod pod {record.pod_id} ended ({record.last_status}) before the flow run reported a "
                        "final state"
                    )
                    return await self._crash(api, run, record, message, tail, logger)
            await anyio.sleep(configuration.poll_interval_seconds)

    async def _read_pod(self, api: RunPodClient, record: PodRecord, logger) -> dict[str, Any] | None:
        try:
            pod = await api.get_pod(record.pod_id)
        except RunPodAPIError as exc:
            logger.warning(f"Reading pod {record.pod_id} failed: {exc}")
            return None
        return pod if pod is not None else {"status": "TERMINATED"}

    @staticmethod
    def _note_pod(record: PodRecord, pod: dict[str, Any]) -> None:
        record.last_status = str(pod.get("status") or record.last_status)
        cost = pod.get("cost")
        if isinstance(cost, int | float) and cost > 0:
            record.cost_per_hr = float(cost)
        if record.last_status == RUNNING and record.running_since is None:
            record.running_since = _wall(pod.get("startedAt")) or time.time()

    async def _crash(self, api, run: FlowRun, record: PodRecord, message: str, tail: list[str], logger) -> int:
        if tail:
            logger.warning(f"Last lines of pod {record.pod_id}:\n" + "\n".join(tail))
        record.notes.append(message)
        await self._terminate(api, record, logger)
        logger.error(message)
        await self._propose_crashed_state(run, message)
        return 1

    async def _stop_then_terminate(self, api: RunPodClient, record: PodRecord, grace_s: float, logger) -> None:
        try:
            await api.stop_pod(record.pod_id)
            with anyio.move_on_after(grace_s):
                while True:
                    pod = await api.get_pod(record.pod_id)
                    if pod is None or pod.get("status") in FINISHED:
                        break
                    await anyio.sleep(min(1.0, max(grace_s / 10, 0.1)))
        except RunPodAPIError as exc:
            logger.warning(f"Stopping pod {record.pod_id} failed ({exc}); terminating it")
        await self._terminate(api, record, logger)

    async def _terminate(self, api: RunPodClient, record: PodRecord, logger) -> None:
        if record.ended_wall is not None:
            return
        try:
            await api.terminate_pod(record.pod_id)
        except RunPodAPIError as exc:
            logger.error(f"Terminating RunPod pod {record.pod_id} failed: {exc}. Terminate it in the RunPod console")
            record.notes.append(f"terminate failed: {exc}")
            return
        record.ended_wall = time.time()
        logger.info(f"Terminated RunPod pod {record.pod_id} ({record.hours:.3f} h, {record.dollars:.2f} USD)")

    async def _write_artifact(self, flow_run: FlowRun, record: PodRecord, logger) -> None:
        try:
            await self.client.create_artifact(
                ArtifactCreate(
                    key=ARTIFACT_KEY,
                    type="markdown",
                    data=record.markdown(),
                    description=f"RunPod pod {record.pod_id}: {record.hours:.3f} h, {record.dollars:.2f} USD",
                    flow_run_id=flow_run.id,
                )
            )
        except Exception as exc:  # noqa: BLE001 - the pod is gone; a missing artifact must not fail the run
            logger.warning(f"Writing the RunPod artifact failed: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ cancellation of a pending run

    async def kill_infrastructure(
        self, infrastructure_pid: str, configuration: RunPodJobConfiguration, grace_seconds: int = 30
    ) -> None:
        async with await self._api(configuration) as api:
            pod = await api.get_pod(infrastructure_pid)
            if pod is None:
                raise InfrastructureNotFound(f"RunPod pod {infrastructure_pid} does not exist")
            if not str(pod.get("name", "")).startswith(configuration.owner_prefix(self._work_pool_name)):
                raise InfrastructureNotAvailable(f"RunPod pod {infrastructure_pid} does not belong to this pool")
            await api.stop_pod(infrastructure_pid)
            await api.terminate_pod(infrastructure_pid)

    # ------------------------------------------------------------------ orphans

    async def sync_with_backend(self) -> None:
        await super().sync_with_backend()
        if self._work_pool is not None and time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + self.orphan_sweep_seconds
            try:
                await self.sweep_orphans()
            except Exception as exc:  # noqa: BLE001 - a failed sweep is retried at the next one
                self._logger.warning(f"RunPod orphan sweep failed: {type(exc).__name__}: {mask_urls_in(str(exc))}")

    async def sweep_orphans(self) -> list[str]:
        """Terminate this pool's pods whose flow run is final or gone; follow the others. Returns the
        terminated pod ids."""
        configuration = await self.job_configuration.from_template_and_values(
            self.work_pool.base_job_template, {}, client=self.client
        )
        prefix = configuration.owner_prefix(self._work_pool_name)
        terminated: list[str] = []
        async with await self._api(configuration) as api:
            for pod in await api.list_pods():
                name = str(pod.get("name", ""))
                if not name.startswith(prefix) or pod.get("status") == "TERMINATED":
                    continue
                try:
                    flow_run_id = uuid.UUID(name[len(prefix) :])
                except ValueError:
                    continue
                if flow_run_id in self._followed:
                    continue
                try:
                    run = await self.client.read_flow_run(flow_run_id)
                except ObjectNotFound:
                    run = None
                if run is None or run.state is None or run.state.is_final():
                    what = "gone" if run is None else run.state.type.value if run.state else "without state"
                    self._logger.warning(f"Terminating orphan RunPod pod {pod['id']} ({name}): flow run {what}")
                    await api.terminate_pod(pod["id"])
                    terminated.append(pod["id"])
                elif self._runs_task_group is not None:
                    self._followed.add(flow_run_id)
                    self._runs_task_group.start_soon(self._follow_orphan, pod, run)
        self.terminated_orphans.extend(terminated)
        return terminated

    async def _follow_orphan(self, pod: dict[str, Any], run: FlowRun) -> None:
        logger = self.get_flow_run_logger(run)
        try:
            try:
                configuration = await self.job_configuration.resolve_for_flow_run(
                    run, client=self.client, work_pool=self.work_pool, worker_name=self.name, worker_id=self.backend_id
                )
            except ObjectNotFound:
                configuration = await self.job_configuration.from_template_and_values(
                    self.work_pool.base_job_template, {}, client=self.client
                )
            logger.info(f"Following RunPod pod {pod['id']} left by a previous worker")
            gpu = (pod.get("gpu") or {}).get("id") or configuration.gpu_type
            created = _wall(pod.get("createdAt")) or time.time()
            record = PodRecord(pod["id"], gpu, str(pod.get("cloud") or configuration.cloud_type), created)
            async with await self._api(configuration) as api:
                await self._follow_and_finish(api, run, configuration, record, logger)
        except Exception as exc:  # noqa: BLE001 - one orphan must not stop the worker
            logger.error(f"Following RunPod pod {pod.get('id')} failed: {type(exc).__name__}: {mask_urls_in(str(exc))}")
        finally:
            self._followed.discard(run.id)


def _wall(value: Any) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None
