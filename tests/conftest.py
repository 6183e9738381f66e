"""Shared fixtures. Prefect runs against one real local API for the whole session."""

from __future__ import annotations

import os
import tempfile

# Prefect reads these at import time: keep its home, results and telemetry inside the test run.
_PREFECT_HOME = tempfile.mkdtemp(prefix="ftp-prefect-home-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", os.path.join(_PREFECT_HOME, "results"))
# No test may reach a model hub: tiny models are built locally, real ones come from packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The team's python/.env keys (settings.TEAM_KEYS and the ones it ignores) as well.
_TEAM_VARS = {"LLM_BACKEND", "OPENAI_MODEL", "EMBEDDING_MODEL", "EMBEDDING_DIM", "TOP_K"}
for _key in list(os.environ):
    # A developer's shell must not leak settings or keys into the tests.
    if (
        _key.startswith(("FTP_", "VLLM_", "RUNPOD_", "POSTGRES_"))
        or _key in _TEAM_VARS
        or _key
        in {
            "LLM_PROVIDER",
            "EMBEDDING_PROVIDER",
            "OPENAI_API_KEY",
            "GEMINI_API_KEY",
            "GOOGLE_API_KEY",
            "PREFECT_API_URL",
        }
    ):
        del os.environ[_key]

import pytest


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API on a temporary SQLite database, started once per session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def no_dotenv(tmp_path, monkeypatch):
    """Run in an empty directory so a developer's .env is not read."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def provider_server():
    """A real HTTP server on 127.0.0.1 speaking OpenAI's and Gemini's wire formats."""
    from fakes.provider_server import FakeProviderServer

    with FakeProviderServer() as server:
        yield server


@pytest.fixture
def fake_provider(provider_server):
    provider_server.reset()
    return provider_server


@pytest.fixture(scope="module")
def single_thread_torch():
    """Tiny models run far faster on one thread than on two contended cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def copy_prepared(root, tmp_path):
    """A private copy of a module-scoped prepared data root (tests may change files)."""
    import shutil

    from floorplan_ft.store import ArtifactStore

    shutil.copytree(root, tmp_path / "data")
    return ArtifactStore(tmp_path / "data")


@pytest.fixture(scope="session")
def runpod_server_session():
    """A real HTTP server on 127.0.0.1 speaking RunPod Serverless (CV inference, embeddings)."""
    from fakes.runpod_server import FakeRunPodServer

    with FakeRunPodServer() as server:
        yield server


@pytest.fixture
def runpod_server(runpod_server_session):
    runpod_server_session.reset()
    return runpod_server_session


# One real PostgreSQL (pgvector) per session, shared by every test that needs a database.
@pytest.fixture(scope="session")
def pg_admin_dsn():
    """PostgreSQL 16 + pgvector from the pgserver wheel, moved from its Unix socket to a TCP port on
    127.0.0.1 (as the service would reach a database); stopped at the end of the session."""
    import re  # noqa: F401
    import shutil
    from pathlib import Path

    import pgserver
    from pgserver._commands import pg_ctl
    from pgserver.utils import PostmasterInfo

    # Not under pytest's basetemp: that is private to root, and pgserver runs postgres as its own
    # user when the tests run as root.
    from service_helpers import free_port

    root = Path(tempfile.mkdtemp(prefix="ftp-pgvector-"))
    server = pgserver.get_server(root / "data", cleanup_mode="stop")
    info = server.get_postmaster_info()
    port = free_port()
    try:
        pg_ctl(
            [
                "-w",
                "restart",
                "-m",
                "fast",
                "-o",
                (
                    f"-h 127.0.0.1 -p {port} -k {info.socket_dir} "
                    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
                ),
            ],  # throwaway data
            pgdata=server.pgdata,
            user=server.system_user,
            timeout=20,
        )
        server._postmaster_info = PostmasterInfo.read_from_pgdata(server.pgdata)  # stop the new one
        dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    except Exception:  # noqa: BLE001 - keep testing over the socket pgserver gave us
        dsn = server.get_uri()
    yield dsn
    server.cleanup()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def dsn(pg_admin_dsn, request):
    """A fresh database per test."""
    import re

    from floorplan_ft.retrieval.pgvector import connect

    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50]
    with connect(pg_admin_dsn) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return re.sub(r"/postgres(\?|$)", f"/{name}\\1", pg_admin_dsn)
