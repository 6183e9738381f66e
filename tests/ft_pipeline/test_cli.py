import json

from typer.testing import CliRunner

from ft_pipeline.cli import app

runner = CliRunner()


def test_estimate_matches_the_plan_figures(no_dotenv):
    result = runner.invoke(app, ["estimate"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("| openai"))
    # 2,000 items x (3K in x $2.50 + 1.5K out x $10.00) / 1M = $45; batch half; tier-1 TPM: 5 h.
    assert "| 45.00 | 22.50 |" in row and "| 5.0 |" in row


def test_estimate_flags_a_budget_overrun(no_dotenv):
    result = runner.invoke(app, ["estimate", "--set", "teachers.budget_usd=10"])
    assert "over budget" in result.output


def test_config_show_masks_secrets(no_dotenv, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-cli-secret-0123456789abcdef")
    result = runner.invoke(app, ["config", "show", "--json"])
    assert result.exit_code == 0 and "sk-cli-secret" not in result.output
    assert json.loads(result.output)["openai_api_key"] == "****"  # floorplan_ft.redact.MASK


def test_bad_input_exits_2_with_the_setting_named(no_dotenv):
    result = runner.invoke(app, ["run", "--steps", "0,9"])
    assert result.exit_code == 2 and "unknown step '9'" in result.output
    result = runner.invoke(app, ["run", "--set", "sampling.sample_size=-1"])
    assert result.exit_code == 2 and "sampling.sample_size" in result.output


def test_a_failed_run_ends_on_one_clear_line(prefect_api, no_dotenv, tmp_path):
    from floorplan_ft.store import ArtifactStore

    store = ArtifactStore(tmp_path / "data")
    store.write_json(store.layout.run_file("sample"), {"stems": ["C00_0000"], "n": 1})
    result = runner.invoke(app, ["run", "--steps", "3a", "--set", f"paths.data_root={tmp_path / 'data'}"])
    assert result.exit_code == 1
    assert "the run failed: ConfigError" in result.output and "OPENAI_API_KEY" in result.output


def test_train_plan_for_the_production_profile(no_dotenv, tmp_path):
    import json

    result = runner.invoke(
        app, ["train-plan", "--profile", "production", "--json", "--set", f"paths.data_root={tmp_path / 'empty'}"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    # 2,000 plans x 0.9 = 1,800 rows; batch 2 x accumulation 8: ceil(900 / 8) = 113 steps an epoch.
    assert plan["rows"] == 1800 and plan["effective_batch"] == 16 and plan["steps_per_epoch"] == 113
    assert plan["total_steps"] == 339 and plan["evaluations"] == 3 and plan["checkpoints"] == 3
    assert plan["tokens_total"] == 1800 * 4096 * 3  # the plan's ~4.5K-token rows, capped at max_length
    gpus = {g["device"]: g for g in plan["gpus"]}
    a100 = gpus["NVIDIA A100 80GB"]
    assert a100["fits"] and 10 < a100["memory_gib"] < 30
    low, high = a100["hours"]
    assert 1.5 < low < high < 8  # 8 FLOPs x 8.2B params x 22M tokens at 25-45 % of 312 TFLOPS
    rtx3070 = gpus["NVIDIA RTX 3070 8GB"]
    assert not rtx3070["fits"] and rtx3070["hours"] is None and "local-8gb" in rtx3070["advice"]

    local = json.loads(
        runner.invoke(
            app, ["train-plan", "--profile", "local-8gb", "--json", "--set", f"paths.data_root={tmp_path / 'empty'}"]
        ).output
    )
    local_3070 = {g["device"]: g for g in local["gpus"]}["NVIDIA RTX 3070 8GB"]
    assert local_3070["fits"] and local_3070["tight"] and not a100["tight"]  # 6.7 of 7.6 usable GiB
    assert local["tokens_total"] == 1800 * 2048 * 3
    # The plan's ~3K-token prompts do not fit the local profile's 2,048 tokens: said before any pod.
    assert any("max_length=2048" in w and "dropped" in w for w in local["warnings"])
    # ~4.5K-token rows against 4,096: the plan's own numbers cut the end of the answers.
    (warning,) = plan["warnings"]
    assert "max_length=4096" in warning and "answers would be cut" in warning
