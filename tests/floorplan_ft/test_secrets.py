"""Secrets never become flow parameters, log lines, results or error text (issue 14)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from floorplan_ft.settings import SettingsError, check_no_secret_overrides
from ft_pipeline.cli import app

runner = CliRunner()
KEY = "sk-test-secret-0123456789abcdefXYZ"


@pytest.mark.parametrize(
    ("setting", "where"),
    [
        ("openai_api_key", "OPENAI_API_KEY"),
        ("OPENAI_API_KEY", "OPENAI_API_KEY"),
        ("gemini_api_key", "GEMINI_API_KEY"),
        ("GOOGLE_API_KEY", "GEMINI_API_KEY"),
        ("runpod_api_key", "RUNPOD_API_KEY"),
        ("serving.pg_dsn", "FTP_SERVING__PG_DSN"),
    ],
)
def test_set_of_a_secret_is_refused_with_where_to_put_it(no_dotenv, setting, where):
    result = runner.invoke(app, ["run", "--steps", "0", "--set", f"{setting}={KEY}"])
    assert result.exit_code == 2
    assert "is a secret" in result.output and where in result.output
    assert KEY not in result.output


def test_every_subcommand_with_set_refuses_secrets(no_dotenv):
    for command in (["estimate"], ["config", "show"], ["train-plan"]):
        result = runner.invoke(app, [*command, "--set", f"openai_api_key={KEY}"])
        assert result.exit_code == 2, (command, result.output)
        assert "is a secret" in result.output and KEY not in result.output


def test_a_password_inside_a_url_override_is_refused_and_masked(no_dotenv):
    url = "http://proxyuser:hunter2-pass@127.0.0.1:9/v1"
    result = runner.invoke(app, ["run", "--set", f"teachers.compatible_base_url={url}"])
    assert result.exit_code == 2
    assert "hunter2-pass" not in result.output and "proxyuser:****@127.0.0.1" in result.output


def test_nested_override_and_ordinary_settings():
    with pytest.raises(SettingsError, match="serving.pg_dsn"):
        check_no_secret_overrides({"serving": {"pg_dsn": "postgresql://a:b@h/db"}}, "overrides")
    # Ordinary settings and URLs without a password pass.
    check_no_secret_overrides({"sampling.sample_size": 5, "teachers.compatible_base_url": "http://h:8000/v1"})


def test_refused_cli_secret_creates_no_flow_run(prefect_api, no_dotenv):
    from prefect.client.orchestration import get_client

    async def count() -> int:
        async with get_client() as client:
            return len(await client.read_flow_runs(limit=200))

    before = asyncio.run(count())
    result = runner.invoke(app, ["run", "--steps", "0", "--set", f"openai_api_key={KEY}"])
    assert result.exit_code == 2
    assert asyncio.run(count()) == before


def test_flow_refuses_secret_overrides_before_any_step(prefect_api, no_dotenv, tmp_path):
    """A run started from the UI or `prefect deployment run` with a key in `overrides` fails at
    once, naming the setting and not the value; no step runs, nothing is written."""
    from flows.ft_pipeline import ft_pipeline

    data = tmp_path / "data"
    with pytest.raises(SettingsError) as info:
        ft_pipeline(steps="0", overrides={"paths.data_root": str(data), "gemini_api_key": KEY})
    assert "gemini_api_key" in str(info.value) and KEY not in str(info.value)
    assert not data.exists()


def test_key_from_the_environment_is_stored_nowhere(prefect_api, no_dotenv, tmp_path, monkeypatch, fake_provider):
    """A phase-3 run with the key in the environment: the flow run's parameters, its logs, its
    artifacts and the persisted task results in Prefect's database never contain the key."""
    from plans import prepare_plans
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    from flows.ft_pipeline import ft_pipeline

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("FTP_OPENAI_BASE_URL", fake_provider.openai_base_url)
    store, stems = prepare_plans(tmp_path / "data", count=2, complexes=1, seed=7)
    store.write_json(store.layout.run_file("sample"), {"stems": stems, "n": len(stems)})
    state = ft_pipeline(steps="3a", overrides={"paths.data_root": str(tmp_path / "data")}, return_state=True)
    assert state.is_completed(), state
    report = state.result()
    assert report["3a"]["teacher"] == "openai" and report["3a"]["labeled"] == 2
    # The key did travel where it belongs: to the provider, in the request header.
    assert fake_provider.requests_to("/chat/completions")[0].header("authorization") == f"Bearer {KEY}"
    flow_run_id = state.state_details.flow_run_id

    async def stored() -> str:
        async with get_client() as client:
            run = (await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))))[
                0
            ]
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            artifacts = await client.read_artifacts()
            return json.dumps(
                {
                    "parameters": run.parameters,
                    "logs": [log.message for log in logs],
                    "artifacts": [str(a.data) for a in artifacts],
                },
                default=str,
            )

    stored_text = asyncio.run(stored())
    assert "paths.data_root" in stored_text and "Phase 3" in stored_text  # parameters, artifacts read
    assert KEY not in stored_text
    # Persisted results (the conftest points them at the session's Prefect home).
    result_dir = Path(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"])
    files = [p for p in result_dir.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path
    for path in (tmp_path / "data").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_error_text_masks_url_passwords():
    from floorplan_ft.cv.runpod import RunPodError
    from floorplan_ft.providers.base import ConnectionFailed

    error = ConnectionFailed("cannot reach http://bob:pw-in-url@10.0.0.1:8000/v1 (ConnectError)", provider="compatible")
    assert "pw-in-url" not in str(error) and "bob:****@10.0.0.1" in str(error)
    error = RunPodError("cannot reach https://tok:sekrit@api.example/v2 (ConnectError)")
    assert "sekrit" not in str(error)
