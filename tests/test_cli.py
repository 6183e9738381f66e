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
    assert result.exit_code == 0 and "sk-cli-secret" not in result.output and "**********" in result.output


def test_bad_input_exits_2_with_the_setting_named(no_dotenv):
    result = runner.invoke(app, ["run", "--steps", "0,9"])
    assert result.exit_code == 2 and "unknown step '9'" in result.output
    result = runner.invoke(app, ["run", "--set", "sampling.sample_size=-1"])
    assert result.exit_code == 2 and "sampling.sample_size" in result.output


def test_a_failed_run_ends_on_one_clear_line(prefect_api, no_dotenv, tmp_path):
    from floorplan_ft.store import ArtifactStore

    store = ArtifactStore(tmp_path / "data")
    store.write_json(store.run_file("sample"), {"stems": ["C00_0000"], "n": 1})
    result = runner.invoke(app, ["run", "--steps", "3a", "--set", f"paths.data_root={tmp_path / 'data'}"])
    assert result.exit_code == 1
    assert "the run failed: ConfigError" in result.output and "OPENAI_API_KEY" in result.output
