"""Phase 6's adapter is one the team's vLLM can serve as a LoRA module, and evaluation through such
a server sends the team client's request (structured output, thinking off, max_tokens 8000, one
retry at temperature 0.2 after a length cut)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_training as _tt

from floorplan_ft.training.config import TrainConfigError
from floorplan_ft.training.preflight import VLLM_LORA_RANKS, vllm_lora_errors, vllm_serve_command

# Phase 6's own fixtures (a learnable tiny Qwen3, short rows, labeled synthetic plans).
_config = _tt._config
_one_thread, plans_store, short_store, tiny_base = _tt._one_thread, _tt.plans_store, _tt.short_store, _tt.tiny_base


def test_rank_over_the_servers_limit_fails_naming_the_fix(short_store, tiny_base):
    config = _config(short_store, tiny_base, lora_r=64, vllm_max_lora_rank=16)
    with pytest.raises(TrainConfigError, match=r"start vLLM with --max-lora-rank 64 .*or set finetune.lora_r <= 16"):
        config.validate(cuda_available=False)
    with pytest.raises(TrainConfigError, match=r"finetune.vllm_max_lora_rank=48 is not a rank vLLM accepts.*=64"):
        _config(short_store, tiny_base, vllm_max_lora_rank=48).validate(cuda_available=False)
    assert vllm_lora_errors(_config(short_store, tiny_base, lora_r=16, vllm_max_lora_rank=16)) == []
    assert 320 in VLLM_LORA_RANKS and 48 not in VLLM_LORA_RANKS


def test_modules_vllm_cannot_serve_are_refused(short_store, tiny_base):
    config = _config(short_store, tiny_base, target_modules=("q_proj", "v_proj", "lm_head", "embed_tokens"))
    with pytest.raises(TrainConfigError, match=r"\['lm_head', 'embed_tokens'\].*vLLM cannot serve.*merged_model"):
        config.validate(cuda_available=False)


def test_missing_target_module_fails_before_any_weight_is_loaded(short_store, tiny_base, monkeypatch):
    from transformers import AutoModelForCausalLM

    from floorplan_ft.training.sft import train

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the target modules were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    config = _config(short_store, tiny_base, student_name="bad-targets", target_modules=("q_proj", "c_attn"))
    with pytest.raises(TrainConfigError, match=r"does not have: \['c_attn'\].*linear layers are \[.*'q_proj'"):
        train(config, short_store, force=True)


def test_adapter_folder_holds_what_vllm_loads_and_the_serve_line(short_store, tiny_base):
    from floorplan_ft.training.sft import train

    config = _config(
        short_store,
        tiny_base,
        student_name="served",
        max_steps=2,
        eval_steps=2,
        save_steps=2,
        lora_module_name="cv_agent",
        vllm_max_lora_rank=16,
    )
    result = train(config, short_store, force=True)
    adapter = Path(result.adapter_dir)
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    template = (
        (adapter / "chat_template.jinja").read_text()
        if "chat_template.jinja" in names
        else json.loads((adapter / "tokenizer_config.json").read_text())["chat_template"]
    )
    assert "<|im_start|>" in template and "enable_thinking" in template
    line = result.vllm_serve
    assert line.startswith(
        f"vllm serve {tiny_base.resolve()} --enable-lora --lora-modules cv_agent={adapter.resolve()}"
    )
    assert "--max-lora-rank 16" in line and f"--max-model-len {512 + 8000}" in line
    assert json.loads(Path(config.result_path).read_text())["vllm_serve"] == line
    assert line in (adapter / "README.md").read_text()


def test_a_missing_chat_template_is_written_from_the_tokenizer(tmp_path):
    from tiny_models import build_tiny_tokenizer

    from floorplan_ft.training.preflight import finish_adapter

    tokenizer = build_tiny_tokenizer(tmp_path / "tok")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    finish_adapter(adapter, tokenizer)
    assert (adapter / "tokenizer.json").is_file()
    (adapter / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((adapter / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (adapter / "tokenizer_config.json").write_text(json.dumps(cfg))
    finish_adapter(adapter, tokenizer)
    assert (adapter / "chat_template.jinja").read_text() == tokenizer.chat_template
    tokenizer.chat_template = None
    (adapter / "chat_template.jinja").unlink()
    with pytest.raises(TrainConfigError, match="no chat template.*--chat-template"):
        finish_adapter(adapter, tokenizer)


def test_serve_line_rounds_the_rank_up_to_a_vllm_value(short_store, tiny_base):
    line = vllm_serve_command(
        _config(short_store, tiny_base, lora_r=24, vllm_max_lora_rank=32), "Qwen/Qwen3-8B", "/srv/adapter_model"
    )
    assert line == (
        "vllm serve Qwen/Qwen3-8B --enable-lora --lora-modules cv_agent=/srv/adapter_model "
        "--max-lora-rank 32 --max-model-len 8512"
    )


def test_evaluation_sends_the_team_clients_request(plans_store, fake_provider, no_dotenv):
    """finetune.eval_base_url + eval_model=cv_agent: json_schema response format, thinking off,
    max_tokens=finetune.eval_max_tokens; a length cut is asked once more at temperature 0.2."""
    from fakes.provider_server import Reply

    from floorplan_ft.dataset import read_rows
    from floorplan_ft.settings import load_settings
    from floorplan_ft.training.evaluate import run_evaluation

    rows = read_rows(plans_store, "val")[:1]
    settings = load_settings(
        profile="demo",
        paths={"data_root": plans_store.root},
        finetune={
            "student_name": "lora-served",
            "eval_base_url": fake_provider.openai_base_url,
            "eval_model": "cv_agent",
            "eval_limit": 1,
        },
    )
    assert settings.finetune.eval_max_tokens == 8000
    fake_provider.push(Reply.truncated(), Reply.ok(rows[0]["messages"][-1]["content"]))
    out = run_evaluation(settings, plans_store)
    assert out["summary"]["schema_compliance"] == 1.0 and out["summary"]["latency"]["max_new_tokens"] == 8000
    first, second = fake_provider.requests_to("/chat/completions")
    for req in (first, second):
        body = req.body
        assert body["model"] == "cv_agent" and body["max_tokens"] == 8000
        assert body["chat_template_kwargs"] == {"enable_thinking": False}
        fmt = body["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "FloorPlanAnalysis"
        assert "spaces" in fmt["json_schema"]["schema"]["properties"]
    assert first.body.get("temperature") != 0.2 and second.body["temperature"] == 0.2
    assert Path(out["path"]).name == "eval_report.json"


def test_a_second_length_cut_is_reported_not_retried_again(fake_provider):
    from fakes.provider_server import Reply

    from floorplan_ft.providers.base import OutputTruncated
    from floorplan_ft.providers.openai_client import OpenAICompatibleChatClient
    from floorplan_ft.schemas import FloorPlanAnalysis

    client = OpenAICompatibleChatClient(
        fake_provider.openai_base_url, "cv_agent", enable_thinking=False, length_retry_temperature=0.2, max_tokens=8000
    )
    fake_provider.push(Reply.truncated(), Reply.truncated())
    try:
        with pytest.raises(OutputTruncated):
            client.chat([{"role": "user", "content": "x"}], FloorPlanAnalysis)
    finally:
        client.close()
    assert len(fake_provider.requests_to("/chat/completions")) == 2 and client.length_retries == 1
