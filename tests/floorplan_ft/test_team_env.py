"""The team's python/.env beside ours: their keys are read where they mean what ours mean, the rest
are ignored with one line, our FTP_* settings win and `config show` masks every secret."""

from __future__ import annotations

import json
import logging

import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from floorplan_ft.redact import mask_secret, mask_url, masked_dump
from floorplan_ft.settings import SettingsError, load_settings

# Their RAGConfig's full key set (values made up here), plus an unrelated key of their deployment.
TEAM_ENV = """\
EMBEDDING_MODEL=qwen3-embedding-0.6b
EMBEDDING_DIM=1024
POSTGRES_HOST=db.internal
POSTGRES_PORT=6543
POSTGRES_DB=arae
POSTGRES_USER=app
POSTGRES_PASSWORD=p@ss/w:rd#1
LLM_BACKEND=vllm
OPENAI_API_KEY=sk-team-0000000000000000
OPENAI_MODEL=gpt-4o-mini
OPENAI_TEMPERATURE=0.1
VLLM_BASE_URL=http://vllm-pod:8000/v1
VLLM_MODEL_NAME=cv_agent
VLLM_SEARCH_MODEL_NAME=search_agent
TOP_K=7
MAX_CONTEXT_LENGTH=4000
RUNPOD_API_KEY=rp-team-1111111111111111
RUNPOD_ENDPOINT_ID=abc123endpoint
SOME_FRONTEND_FLAG=on
"""
SECRETS = ("p@ss/w:rd#1", "p%40ss%2Fw%3Ard%231", "sk-team-0000000000000000", "rp-team-1111111111111111")


@pytest.fixture
def team_dir(no_dotenv):
    (no_dotenv / ".env").write_text(TEAM_ENV, encoding="utf-8")
    return no_dotenv


def test_their_env_maps_onto_ours(team_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="floorplan_ft.settings"):
        s = load_settings()
    assert s.serving.llm_provider == "openai-compatible"
    assert s.serving.base_url == "http://vllm-pod:8000/v1"
    assert s.serving.llm_model == "cv_agent"
    assert s.serving.enable_thinking is False  # their client always sends enable_thinking=false
    assert s.serving.max_new_tokens == 8000  # and max_tokens=8000
    assert s.retrieval.dimensions == 1024 and s.retrieval.top_k == 7
    assert s.serving.pg_dsn.get_secret_value() == "postgresql://app:p%40ss%2Fw%3Ard%231@db.internal:6543/arae"
    assert s.runpod_api_key.get_secret_value() == "rp-team-1111111111111111"
    assert s.cv.runpod_endpoint_id == "abc123endpoint"
    assert s.openai_api_key.get_secret_value() == "sk-team-0000000000000000"

    lines = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(lines) == 1, lines
    line = lines[0]
    for key in (
        "EMBEDDING_MODEL",
        "OPENAI_TEMPERATURE",
        "VLLM_SEARCH_MODEL_NAME",
        "MAX_CONTEXT_LENGTH",
        "SOME_FRONTEND_FLAG",
    ):
        assert key in line
    for mapped in ("LLM_BACKEND", "VLLM_BASE_URL", "POSTGRES_PASSWORD", "TOP_K"):
        assert mapped not in line
    assert "qwen3-embedding" not in line and "4000" not in line and "search_agent" not in line

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="floorplan_ft.settings"):
        load_settings()  # said once per process, not on every load
    assert not [r for r in caplog.records if "ignored" in r.getMessage()]


def test_the_dsn_is_a_libpq_url_that_parses(team_dir):
    from urllib.parse import unquote, urlsplit

    url = urlsplit(load_settings().serving.pg_dsn.get_secret_value())
    assert (url.hostname, url.port, url.username, unquote(url.password)) == ("db.internal", 6543, "app", "p@ss/w:rd#1")


def test_their_keys_in_the_environment_too(no_dotenv, monkeypatch):
    monkeypatch.setenv("LLM_BACKEND", "openai")
    monkeypatch.setenv("OPENAI_MODEL", "gpt-4.1")
    monkeypatch.setenv("TOP_K", "3")
    monkeypatch.setenv("RUNPOD_ENDPOINT_ID", "env-endpoint")
    s = load_settings()
    assert (s.serving.llm_provider, s.serving.llm_model) == ("openai", "gpt-4.1")
    assert s.retrieval.top_k == 3 and s.cv.runpod_endpoint_id == "env-endpoint"


def test_the_environment_beats_their_dotenv(team_dir, monkeypatch):
    monkeypatch.setenv("VLLM_MODEL_NAME", "cv_agent_v2")
    assert load_settings().serving.llm_model == "cv_agent_v2"


def test_ours_win_over_theirs(team_dir, monkeypatch, tmp_path):
    (team_dir / ".env").write_text(
        TEAM_ENV + "FTP_RETRIEVAL__TOP_K=9\nFTP_SERVING__LLM_MODEL=student_v3\n", encoding="utf-8"
    )
    monkeypatch.setenv("FTP_SERVING__BASE_URL", "http://127.0.0.1:9/v1")
    s = load_settings()
    assert s.retrieval.top_k == 9  # FTP_ in .env beats TOP_K
    assert s.serving.llm_model == "student_v3"
    assert s.serving.base_url == "http://127.0.0.1:9/v1"  # FTP_ in the environment beats VLLM_BASE_URL
    monkeypatch.setenv("LLM_PROVIDER", "openai")  # our switch beats their LLM_BACKEND
    assert load_settings().serving.llm_provider == "openai"
    cfg = tmp_path / "c.toml"
    cfg.write_text("[retrieval]\ndimensions = 512\n")
    assert load_settings(cfg).retrieval.dimensions == 512  # a config file beats EMBEDDING_DIM
    assert load_settings(profile="demo").retrieval.dimensions == 384  # so does a profile


def test_our_typos_still_stop_the_run(team_dir):
    (team_dir / ".env").write_text(TEAM_ENV + "FTP_SERVING__LLM_MODLE=x\n", encoding="utf-8")
    with pytest.raises(SettingsError, match=r"unknown setting .serving\.llm_modle"):
        load_settings()


def test_our_typos_in_the_environment_still_stop_the_run(team_dir, monkeypatch):
    monkeypatch.setenv("FTP_RETRIEVAL__TOPK", "3")
    with pytest.raises(SettingsError, match=r"retrieval\.topk"):
        load_settings()


def test_a_bad_value_of_theirs_is_ignored_not_fatal(no_dotenv, caplog):
    (no_dotenv / ".env").write_text("TOP_K=five\nLLM_BACKEND=ollama\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="floorplan_ft.settings"):
        s = load_settings()
    assert s.retrieval.top_k == 5 and s.serving.llm_provider == "openai"
    line = " ".join(r.getMessage() for r in caplog.records)
    assert "TOP_K" in line and "LLM_BACKEND" in line and "five" not in line and "ollama" not in line


@pytest.mark.parametrize(
    ("overrides", "width"),
    [
        ({}, 768),
        ({"retrieval": {"corpus": "pgvector:internal_eval"}}, 1024),
        ({"retrieval": {"provider": "runpod"}}, 1024),
        ({"retrieval": {"corpus": "pgvector:internal_eval", "dimensions": 768}}, 768),
    ],
)
def test_default_width_follows_their_table(no_dotenv, overrides, width):
    assert load_settings(**overrides).retrieval.dimensions == width


def test_default_width_follows_a_later_assignment(no_dotenv):
    s = load_settings()
    s.retrieval.corpus = "pgvector:internal_eval"
    assert s.retrieval.dimensions == 1024


def test_embedding_dim_of_theirs_is_explicit(no_dotenv):
    (no_dotenv / ".env").write_text("EMBEDDING_DIM=640\n", encoding="utf-8")
    assert load_settings(retrieval={"corpus": "pgvector:internal_eval"}).retrieval.dimensions == 640


def test_mask_url():
    assert mask_url("postgresql://u:secret@h/db") == "postgresql://u:****@h/db"
    assert mask_url("https://user:pw@host:8443/v1") == "https://user:****@host:8443/v1"
    assert mask_url("https://tok3n@host/v1") == "https://****@host/v1"
    assert mask_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert mask_url("host=db user=u password=secret") == "host=db user=u password=****"
    assert "abc" not in mask_url("https://h/x?api_key=abc&page=2") and "page=2" in mask_url(
        "https://h/x?api_key=abc&page=2"
    )
    assert mask_secret(SecretStr("sk-123")) == "****"
    assert mask_secret(SecretStr("postgresql://u:pw@h:5432/db")) == "postgresql://u:****@h:5432/db"


def test_masked_dump_masks_every_secret(team_dir):
    s = load_settings(serving={"base_url": "https://bob:hunter2@vllm:8000/v1"})
    text = json.dumps(masked_dump(s))
    assert "hunter2" not in text and "https://bob:****@vllm:8000/v1" in text
    for secret in SECRETS:
        assert secret not in text


@pytest.mark.parametrize("as_json", [True, False])
def test_config_show_masks_dsn_url_and_keys(team_dir, monkeypatch, as_json):
    from ft_pipeline.cli import app

    monkeypatch.setenv("FTP_SERVING__BASE_URL", "https://bob:hunter2@vllm:8000/v1")
    monkeypatch.setenv("FTP_GEMINI_API_KEY", "gem-secret-222")
    result = CliRunner().invoke(app, ["config", "show", *(["--json"] if as_json else [])])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "postgresql://app:****@db.internal:6543/arae" in out
    assert "https://bob:****@vllm:8000/v1" in out
    for secret in (*SECRETS, "hunter2", "gem-secret-222"):
        assert secret not in out
    if as_json:
        data = json.loads(out[out.index("{") :])
        assert data["openai_api_key"] == "****" and data["runpod_api_key"] == "****"
        assert data["gemini_api_key"] == "****"
