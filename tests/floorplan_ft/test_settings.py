import pytest

from floorplan_ft.settings import (
    PROFILES,
    Settings,
    SettingsError,
    describe_settings,
    load_settings,
)


@pytest.fixture(autouse=True)
def _isolated(no_dotenv):
    return no_dotenv


def test_defaults_are_the_plans_numbers():
    s = load_settings()
    assert s.sampling.sample_size == 2000 and s.sampling.seed == 42
    assert s.retrieval.top_k == 5 and s.retrieval.dimensions == 768
    assert s.retrieval.model == "Qwen/Qwen3-Embedding-0.6B"
    assert s.teachers.openai_model == "gpt-4o" and s.teachers.concurrency == 5
    assert s.teachers.backoff_s == [2.0, 4.0, 8.0]
    assert s.quality.sample_size == 100 and s.quality.tie_margin == 0.05
    assert s.quality.weights.schema_compliance == 0.30 and s.quality.weights.json_validity == 0.07
    assert s.dataset.train_ratio == 0.9 and s.dataset.seed == 42
    ft = s.finetune
    assert (ft.base_model, ft.lora_r, ft.lora_alpha, ft.lora_dropout) == ("Qwen/Qwen3-8B", 64, 128, 0.05)
    assert (ft.batch_size, ft.grad_accum, ft.max_length, ft.epochs) == (2, 8, 4096, 3)
    assert (ft.eval_steps, ft.save_steps, ft.logging_steps) == (100, 100, 10)
    assert set(ft.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert s.serving.llm_provider == "openai"


def test_every_setting_has_a_description():
    rows = describe_settings()
    assert len(rows) > 60
    missing = [name for name, _, desc in rows if not desc]
    assert missing == []


def test_file_then_env_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[sampling]\nsample_size = 10\nseed = 7\n[teachers]\nconcurrency = 3\n")
    s = load_settings(cfg)
    assert (s.sampling.sample_size, s.sampling.seed, s.teachers.concurrency) == (10, 7, 3)
    monkeypatch.setenv("FTP_SAMPLING__SAMPLE_SIZE", "55")
    s = load_settings(cfg)
    assert s.sampling.sample_size == 55  # env beats file
    assert s.sampling.seed == 7  # the file still wins over defaults
    s = load_settings(cfg, sampling={"sample_size": 3})
    assert s.sampling.sample_size == 3  # explicit overrides beat env


def test_yaml_file_and_profile_layering(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("profile: local-8gb\nfinetune:\n  lora_r: 32\n")
    s = load_settings(cfg)
    assert s.profile == "local-8gb"
    assert s.finetune.base_model == "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct"  # from the profile
    assert s.finetune.lora_r == 32  # the file beats the profile
    assert (s.finetune.batch_size, s.finetune.grad_accum, s.finetune.max_length) == (4, 4, 2048)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profiles_validate(name):
    s = load_settings(profile=name)
    assert s.profile == name


def test_demo_profile_is_offline_and_small():
    s = load_settings(profile="demo")
    assert s.teachers.teachers == ["reference", "local"]
    assert s.finetune.device == "cpu" and s.finetune.load_in_4bit is False
    assert s.sampling.sample_size < 100


def test_unknown_key_in_file_names_it(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[sampling]\nsample_sise = 3\n")
    with pytest.raises(SettingsError, match=r"unknown setting 'sampling.sample_sise'") as exc:
        load_settings(cfg)
    assert str(cfg) in str(exc.value)


def test_unknown_env_variable_names_it(monkeypatch):
    monkeypatch.setenv("FTP_SAMPLING__SIZE", "3")
    with pytest.raises(SettingsError, match="FTP_SAMPLING__SIZE"):
        load_settings()
    monkeypatch.delenv("FTP_SAMPLING__SIZE")
    monkeypatch.setenv("FTP_NOPE", "1")
    with pytest.raises(SettingsError, match="FTP_NOPE"):
        load_settings()


def test_bad_value_names_the_field(monkeypatch):
    monkeypatch.setenv("FTP_TEACHERS__CONCURRENCY", "0")
    with pytest.raises(SettingsError, match=r"teachers\.concurrency"):
        load_settings()


def test_bad_weights_and_percentiles_fail(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[quality.weights]\nschema_compliance = 0.9\n")
    with pytest.raises(SettingsError, match="sum to 1.0"):
        load_settings(cfg)
    with pytest.raises(SettingsError, match="size_low_pct"):
        load_settings(sampling={"size_low_pct": 50, "size_high_pct": 40})


def test_unknown_profile_and_bad_file(tmp_path):
    with pytest.raises(SettingsError, match="unknown profile 'gpu-huge'"):
        load_settings(profile="gpu-huge")
    bad = tmp_path / "c.toml"
    bad.write_text("[sampling\n")
    with pytest.raises(SettingsError, match="cannot parse"):
        load_settings(bad)
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "missing.toml")


def test_dotenv_is_read(no_dotenv):
    (no_dotenv / ".env").write_text("FTP_SAMPLING__SEED=99\n")
    assert load_settings().sampling.seed == 99


def test_provider_switch_is_one_variable(monkeypatch):
    monkeypatch.setenv("LLM_PROVIDER", "local")
    monkeypatch.setenv("EMBEDDING_PROVIDER", "openai")
    s = load_settings()
    assert s.serving.llm_provider == "local" and s.retrieval.provider == "openai"
    monkeypatch.setenv("LLM_PROVIDER", "openai")
    assert load_settings().serving.llm_provider == "openai"


def test_secrets_never_printed(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-value-123456")
    s = load_settings()
    assert s.openai_api_key.get_secret_value() == "sk-test-secret-value-123456"
    for text in (repr(s), str(s), s.model_dump_json()):
        assert "sk-test-secret-value" not in text


def test_paths_are_configurable():
    s = load_settings(paths={"data_root": "/x/root"})
    assert s.image_dir() == "/x/root/images" and s.annotation_dir() == "/x/root/annotations"
    s = load_settings(paths={"data_root": "s3://bucket/p", "image_dir": "/mnt/plans"})
    assert s.image_dir() == "/mnt/plans" and s.annotation_dir() == "s3://bucket/p/annotations"


def test_settings_object_rejects_unknown_keyword():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="nonsense"):
        Settings(nonsense=1)
