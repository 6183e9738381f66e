"""Blocks (teacher keys, data root), `apply_block_secrets`, work-pool templates, the pull step and
deployments/prefect.yaml, against the session's real local Prefect API where a server is needed."""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from blocks.credentials import GeminiCredentials, OpenAICredentials, RunPodCredentials
from blocks.register import BLOCK_TYPES, blocks_from_env, register_all, save_block
from blocks.secrets import apply_block_secrets, load_block
from blocks.storage import DataRootStorage
from floorplan_ft.settings import load_settings
from floorplan_ft.steps import parse_steps
from ft_pipeline import pools
from ft_pipeline.deploy_steps import ROOT_ENV, project_root, set_project_root

ROOT = Path(__file__).resolve().parents[2]
S3_ENV = {
    "OPENAI_API_KEY": "sk-test-openai-123",
    "GEMINI_API_KEY": "gm-test-gemini-456",
    "RUNPOD_API_KEY": "rp-test-runpod-321",
    "FTP_PATHS__DATA_ROOT": "s3://vol-abc123/ft-data",
    "AWS_ENDPOINT_URL": "https://s3api-eur-is-1.runpod.io",
    "AWS_ACCESS_KEY_ID": "AKID-test-789",
    "AWS_SECRET_ACCESS_KEY": "s3-secret-000",
    "AWS_REGION": "EUR-IS-1",
}
SECRETS = ("sk-test-openai-123", "gm-test-gemini-456", "rp-test-runpod-321", "AKID-test-789", "s3-secret-000")


@pytest.fixture
def fsspec_conf():
    import fsspec.config

    saved = copy.deepcopy(fsspec.config.conf)
    yield fsspec.config.conf
    fsspec.config.conf.clear()
    fsspec.config.conf.update(saved)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def block_log():
    """What blocks.secrets logs outside a flow run (Prefect's logging set-up may replace the
    root handlers pytest's caplog relies on, so the handler sits on the logger itself)."""
    logger = logging.getLogger("ft_pipeline.blocks")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def clean_blocks(prefect_api):
    """Blocks saved on the shared test API are deleted afterwards: other tests' flows must not
    pick up these keys."""
    yield
    for cls, name in (
        (OpenAICredentials, "openai"),
        (GeminiCredentials, "gemini"),
        (RunPodCredentials, "runpod"),
        (DataRootStorage, "data-root"),
    ):
        if load_block(cls, name) is not None:
            cls.delete(name, _sync=True)


# --------------------------------------------------------------------------- data root block


def test_data_root_from_s3_url_gives_url_and_fsspec_options():
    block = DataRootStorage.from_data_root(
        "s3://vol-abc123/ft-data/",
        endpoint_url="https://s3api-eur-is-1.runpod.io",
        region="EUR-IS-1",
        access_key_id=SecretStr("AKID-test-789"),
        secret_access_key=SecretStr("s3-secret-000"),
    )
    assert (block.kind, block.bucket, block.prefix) == ("s3", "vol-abc123", "ft-data")
    assert block.data_root() == "s3://vol-abc123/ft-data"
    assert block.storage_options() == {
        "endpoint_url": "https://s3api-eur-is-1.runpod.io",
        "key": "AKID-test-789",
        "secret": "s3-secret-000",
        "client_kwargs": {"region_name": "EUR-IS-1"},
    }
    text = block.describe() + repr(block) + str(block)
    assert not any(s in text for s in SECRETS)


def test_local_data_root_and_validation():
    block = DataRootStorage.from_data_root("/mnt/data")
    assert block.data_root() == "/mnt/data" and block.storage_options() == {}
    with pytest.raises(ValueError, match="needs a path"):
        DataRootStorage(kind="local")
    with pytest.raises(ValueError, match="needs a bucket"):
        DataRootStorage(kind="s3")


def test_configure_fsspec_makes_options_the_s3_default(fsspec_conf):
    from fsspec.config import apply_config

    DataRootStorage.from_data_root(
        "s3://b/p",
        endpoint_url="http://127.0.0.1:9000",
        access_key_id=SecretStr("k"),
        secret_access_key=SecretStr("s"),
    ).configure_fsspec()

    class FakeS3:
        protocol = ("s3", "s3a")

    assert apply_config(FakeS3, {}) == {"endpoint_url": "http://127.0.0.1:9000", "key": "k", "secret": "s"}
    assert apply_config(FakeS3, {"key": "explicit"})["key"] == "explicit"


def test_blocks_from_env_describes_without_secrets():
    planned = {name: (block, detail) for name, block, detail in blocks_from_env(S3_ENV)}
    assert planned["openai"][0].api_key.get_secret_value() == "sk-test-openai-123"
    assert planned["gemini"][0].api_key.get_secret_value() == "gm-test-gemini-456"
    storage = planned["data-root"][0]
    assert storage.data_root() == "s3://vol-abc123/ft-data"
    assert storage.endpoint_url == "https://s3api-eur-is-1.runpod.io" and storage.region == "EUR-IS-1"
    assert not any(s in detail for _, detail in planned.values() for s in SECRETS)
    empty = {name: block for name, block, _ in blocks_from_env({})}
    assert empty == {"openai": None, "gemini": None, "runpod": None, "data-root": None}
    assert planned["runpod"][0].api_key.get_secret_value() == "rp-test-runpod-321"
    assert {n: b.data_root() for n, b, _ in blocks_from_env({"FTP_PATHS__DATA_ROOT": "/srv/d"}) if b} == {
        "data-root": "/srv/d"
    }


# --------------------------------------------------------------------------- apply_block_secrets


def test_without_a_server_settings_come_back_unchanged(no_dotenv):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    settings = load_settings(openai_api_key="from-settings")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert apply_block_secrets(settings) is settings


def test_missing_blocks_leave_settings_unchanged(prefect_api, no_dotenv):
    settings = load_settings(openai_api_key="from-settings")
    assert apply_block_secrets(settings, openai_block="nope", gemini_block="nope", data_root_block="nope") is settings


def test_unreachable_server_falls_back_to_settings(no_dotenv, block_log):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    settings = load_settings(openai_api_key="from-settings")
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert apply_block_secrets(settings) is settings
    # One warning: after the first failure the other blocks are not tried.
    assert len(block_log.lines) == 1 and "could not read Prefect block" in block_log.text


def test_blocks_override_keys_and_fill_the_default_data_root(clean_blocks, no_dotenv, fsspec_conf, block_log):
    outcomes = {o.ref: o for o in register_all(S3_ENV)}
    assert {o.status for o in outcomes.values()} == {"created"}
    settings = load_settings(openai_api_key="from-settings")
    applied = apply_block_secrets(settings)
    assert applied is not settings
    assert settings.openai_api_key.get_secret_value() == "from-settings"  # input untouched
    assert applied.openai_api_key.get_secret_value() == "sk-test-openai-123"
    assert applied.gemini_api_key.get_secret_value() == "gm-test-gemini-456"
    assert applied.runpod_api_key.get_secret_value() == "rp-test-runpod-321"
    assert applied.paths.data_root == "s3://vol-abc123/ft-data"
    assert fsspec_conf["s3"]["endpoint_url"] == "https://s3api-eur-is-1.runpod.io"
    assert "ft-openai-credentials/openai (api_key)" in block_log.text
    assert "ft-data-root-storage/data-root (s3 credentials)" in block_log.text
    assert not any(s in block_log.text for s in SECRETS)

    # A data root set anywhere (here an override) wins over the block's; keys still come from blocks.
    local = apply_block_secrets(load_settings(paths={"data_root": "/elsewhere"}))
    assert local.paths.data_root == "/elsewhere"
    assert local.openai_api_key.get_secret_value() == "sk-test-openai-123"


def test_register_is_idempotent_and_updates_changed_blocks(clean_blocks):
    first = {o.ref: o.status for o in register_all(S3_ENV)}
    assert first == {
        "ft-openai-credentials/openai": "created",
        "ft-gemini-credentials/gemini": "created",
        "ft-runpod-credentials/runpod": "created",
        "ft-data-root-storage/data-root": "created",
    }
    assert {o.status for o in register_all(S3_ENV)} == {"unchanged"}
    changed = dict(S3_ENV, OPENAI_API_KEY="sk-test-rotated")
    statuses = {o.ref: o.status for o in register_all(changed)}
    assert statuses["ft-openai-credentials/openai"] == "updated"
    assert statuses["ft-gemini-credentials/gemini"] == "unchanged"
    assert load_block(OpenAICredentials, "openai").api_key.get_secret_value() == "sk-test-rotated"
    assert {o.status for o in register_all({})} == {"skipped"}
    assert save_block(GeminiCredentials(api_key="gm-test-gemini-456"), "gemini") == "unchanged"
    assert {cls.get_block_type_slug() for cls in BLOCK_TYPES} == {
        "ft-openai-credentials",
        "ft-gemini-credentials",
        "ft-runpod-credentials",
        "ft-data-root-storage",
    }


# --------------------------------------------------------------------------- work pools


def test_pool_templates_are_process_templates_with_the_flow_run_env():
    from prefect.workers.process import ProcessWorker

    default = ProcessWorker.get_default_base_job_template()
    for pool in pools.POOLS:
        template = pools.load_template(pool)
        assert template["job_configuration"] == default["job_configuration"]
        assert set(template["variables"]["properties"]) == set(default["variables"]["properties"])
        env = pools.template_env(template)
        for key in (
            "FTP_PATHS__DATA_ROOT",
            "CUDA_VISIBLE_DEVICES",
            "HF_HOME",
            "TORCH_HOME",
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH",
        ):
            assert env.get(key), f"{pool}: {key} missing"
        assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"].startswith(env["FTP_PATHS__DATA_ROOT"])
        assert not any(k.endswith(("_KEY", "_SECRET", "_TOKEN")) for k in env)


def test_customise_moves_caches_and_results_beside_a_local_data_root(tmp_path):
    template = pools.load_template("runpod")
    env = pools.template_env(pools.customise(template, data_root=str(tmp_path / "d")))
    root = str((tmp_path / "d").resolve())
    assert env["FTP_PATHS__DATA_ROOT"] == root
    assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == f"{root}/.prefect/results"
    assert env["HF_HOME"] == f"{root}/.cache/huggingface"

    url = pools.template_env(
        pools.customise(template, data_root="s3://vol/ft-data", cache_root=str(tmp_path / "c"), env={"EXTRA": "1"})
    )
    assert url["FTP_PATHS__DATA_ROOT"] == "s3://vol/ft-data"
    assert url["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == f"{(tmp_path / 'c').resolve()}/prefect-results"
    assert url["EXTRA"] == "1"
    assert pools.template_env(template) == pools.template_env(pools.load_template("runpod"))  # no mutation


def test_pools_create_is_idempotent(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        first = {p: s for p, s, _ in pools.create_or_update(data_root=str(tmp_path))}
        assert first == {"local-gpu": "created", "runpod": "created"}
        assert {s for _, s, _ in pools.create_or_update(data_root=str(tmp_path))} == {"unchanged"}
        moved = pools.create_or_update(["runpod"], data_root=str(tmp_path / "other"))
        assert [(p, s) for p, s, _ in moved] == [("runpod", "updated")]
        with get_client(sync_client=True) as client:
            pool = client.read_work_pool("runpod")
            gpu_pool = client.read_work_pool("local-gpu")
        assert pool.type == "process"
        assert gpu_pool.concurrency_limit == 1 and pool.concurrency_limit is None
        assert pool.base_job_template["variables"]["properties"]["env"]["default"]["FTP_PATHS__DATA_ROOT"] == str(
            (tmp_path / "other").resolve()
        )
    finally:
        with get_client(sync_client=True) as client:
            for pool in pools.POOLS:
                with contextlib.suppress(ObjectNotFound):
                    client.delete_work_pool(pool)


# --------------------------------------------------------------------------- pull step


def test_project_root_from_argument_env_and_installed_package(tmp_path, monkeypatch):
    monkeypatch.delenv(ROOT_ENV, raising=False)
    assert project_root() == ROOT
    monkeypatch.setenv(ROOT_ENV, str(ROOT))
    assert project_root() == ROOT
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=ROOT_ENV):
        project_root()
    assert project_root(str(ROOT)) == ROOT


def test_set_project_root_changes_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ROOT_ENV, str(ROOT))
    assert set_project_root() == {"directory": str(ROOT)}
    assert Path.cwd() == ROOT


# --------------------------------------------------------------------------- prefect.yaml


def _deployments() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    assert spec["pull"] == [{"ft_pipeline.deploy_steps.set_project_root": {}}]
    return {d["name"]: d for d in spec["deployments"]}


def _flow_of(entrypoint: str):
    import importlib

    path, _, name = entrypoint.partition(":")
    assert (ROOT / path).is_file(), path
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def test_deployment_file_matches_the_flows_and_pools():
    deployments = _deployments()
    assert set(deployments) == {"runpod", "local-gpu", "overnight"}
    expected = {
        "runpod": ("ft-pipeline", "runpod"),
        "local-gpu": ("ft-pipeline", "local-gpu"),
        "overnight": ("cv-batch", "local-gpu"),
    }
    for name, (flow_name, pool) in expected.items():
        spec = deployments[name]
        flow = _flow_of(spec["entrypoint"])
        assert flow.name == flow_name
        assert spec["work_pool"]["name"] == pool and pool in pools.POOLS
        params = inspect.signature(flow.fn).parameters
        assert set(spec.get("parameters", {})) <= set(params), f"{name}: unknown parameters"
    assert parse_steps(deployments["runpod"]["parameters"]["steps"]) == ["2", "3a", "3b", "4", "5", "6"]
    assert parse_steps(deployments["local-gpu"]["parameters"]["steps"]) == ["0", "1"]
    assert deployments["overnight"]["parameters"] == {"scope": "all"}
    assert deployments["overnight"]["schedules"] == [{"cron": "0 1 * * *", "timezone": "Asia/Seoul", "active": True}]
    text = json.dumps(deployments)
    assert "api_key" not in text.lower() and "secret" not in text.lower()


def test_orchestrate_splits_cv_steps_and_skips_without_them():
    from flows.orchestrate import run_cv_on_local_gpu, split_cv_steps

    assert split_cv_steps("all") == (["0", "1"], ["2", "3a", "3b", "4", "5", "6"])
    assert split_cv_steps("1-3") == (["1"], ["2", "3a", "3b"])
    assert run_cv_on_local_gpu("2-6") == {}  # nothing for the local-gpu pool: no run started
