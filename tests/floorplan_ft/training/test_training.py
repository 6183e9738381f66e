"""Phase 6: LoRA fine-tune (TRL + PEFT on the CPU) and the student evaluation, with tiny random
Qwen3 models built here (no hub, no GPU)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from pathlib import Path

import pytest
from tiny_models import bias_towards_short_json, build_tiny_causal_lm

from floorplan_ft.store import ArtifactStore
from floorplan_ft.training.config import TrainConfig, TrainConfigError
from floorplan_ft.training.memory import (
    DeviceInfo,
    GiB,
    MemoryCheckError,
    check_memory,
    estimate_memory,
    model_shape,
)

SYSTEM = "당신은 아파트 평면도를 분석하는 건축 전문가입니다. JSON 하나로 답하세요."
STRUCTURES = ("판상형", "타워형", "혼합형")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread_torch):
    """Every test here runs tiny models: one torch thread (conftest)."""


def _learnable_base(directory: Path, hidden_size: int = 32) -> Path:
    """A random 2-layer Qwen3 whose (tied) embeddings are scaled up: at the default init (std 0.02)
    no logit can exceed ~0.6, so no adapter could bring the loss much below ln(vocab)."""
    import torch

    model, _ = build_tiny_causal_lm(directory, seed=1, hidden_size=hidden_size)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return _learnable_base(tmp_path_factory.mktemp("tiny-base") / "base")


@pytest.fixture(scope="module")
def tiny_base_64(tmp_path_factory):
    """The same at hidden size 64: bitsandbytes' CPU NF4 kernels need layers of >= 64 features."""
    return _learnable_base(tmp_path_factory.mktemp("tiny-base-64") / "base", hidden_size=64)


def _row(i: int, long_user: bool = False) -> dict:
    user = f"평면도 C0{i % 3}_{i:04d}.png: 침실 {i % 4 + 1}개, 화장실 {i % 2 + 1}개."
    if long_user:
        user += " 거실 주방 발코니 현관 드레스룸" * 40
    answer = json.dumps(
        {"image_name": f"C0{i % 3}_{i:04d}.png", "structure_type": STRUCTURES[i % 3], "room_count": i % 4 + 1},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
    }


def _write_rows(root: Path, train: list[dict], val: list[dict], train_stems: list[str], val_stems: list[str]):
    store = ArtifactStore(root)
    store.write_jsonl(store.layout.run_file("train"), train)
    store.write_jsonl(store.layout.run_file("val"), val)
    store.write_json(
        store.layout.run_file("stats_report"),
        {
            "teacher": "reference",
            "prompt_version": "test",
            "schema_hash": "test",
            "split": {"train": {"stems": train_stems}, "val": {"stems": val_stems}},
        },
    )
    return store


@pytest.fixture(scope="module")
def short_store(tmp_path_factory):
    """Six short train rows and two val rows (about a hundred tokens each)."""
    root = tmp_path_factory.mktemp("short") / "data"
    train = [_row(i) for i in range(6)]
    val = [_row(i) for i in range(6, 8)]
    return _write_rows(root, train, val, [f"T{i}" for i in range(6)], ["V6", "V7"])


def _config(store: ArtifactStore, base: Path, **changes) -> TrainConfig:
    values = {
        "base_model": str(base),
        "data_root": store.root,
        "train_path": store.layout.run_file("train"),
        "val_path": store.layout.run_file("val"),
        "stats_path": store.layout.run_file("stats_report"),
        "student_name": "student",
        "device": "cpu",
        "load_in_4bit": False,
        "optim": "adamw_torch",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "learning_rate": 2e-2,
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "batch_size": 2,
        "grad_accum": 1,
        "epochs": 1,
        "max_steps": 20,
        "max_length": 512,
        "logging_steps": 1,
        "eval_steps": 5,
        "save_steps": 10,
        "early_stopping_patience": 3,
        "seed": 0,
    }
    values.update(changes)
    return TrainConfig(**values)


def _logits(model, tokenizer, text: str = "평면도 분석: 거실과 침실"):
    import torch

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    model.eval()
    with torch.no_grad():
        return model(**ids).logits


def _load_adapter(adapter_dir: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_ref = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_ref)
    return PeftModel.from_pretrained(base, adapter_dir), base_ref


@pytest.fixture(scope="module")
def trained(short_store, tiny_base):
    from floorplan_ft.training.merge import merge_adapter
    from floorplan_ft.training.sft import train

    config = _config(short_store, tiny_base, student_name="student-a")
    logs: list[dict] = []
    result = train(config, short_store, keep_model=True, on_log=logs.append)
    merged = merge_adapter(config)
    return config, result, merged, logs


# ----------------------------------------------------------------------------- training


def test_loss_goes_down_and_outputs_are_written(trained, short_store):
    config, result, _, logs = trained
    losses = [r["loss"] for r in logs if "loss" in r]
    assert len(losses) >= 15
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, losses
    assert last < math.log(512) - 1.0, losses  # well below chance: it learns the six short answers
    assert result.global_step == 20 and not result.stopped_early and result.device == "cpu"
    assert result.backend == "trl" and result.best_eval_loss is not None

    history = json.loads(Path(config.log_path).read_text())["history"]
    assert [r["step"] for r in history if r["eval_loss"] is not None] == [5, 10, 15, 20]
    assert all({"step", "loss", "eval_loss", "learning_rate"} <= set(r) for r in history)
    assert history[0]["loss"] > history[-1]["loss"]

    from PIL import Image

    with Image.open(config.curves_path) as img:
        assert img.format == "PNG" and img.size[0] >= 600

    card = (Path(config.adapter_dir) / "README.md").read_text()
    for path in (config.train_path, config.val_path):
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() in card
    assert str(config.base_model) in card and "lora_r" in card and "best validation loss" in card
    assert result.peak_memory["device"] == "cpu" and result.peak_memory["max_rss_gib"] > 0.1
    assert "measured peak" in card and "max RSS" in result.markdown()
    saved = json.loads(Path(config.result_path).read_text())
    assert saved["fingerprint"] == result.fingerprint and saved["global_step"] == 20
    assert (Path(config.adapter_dir) / "tokenizer.json").is_file()
    assert sorted(p.name for p in Path(config.checkpoints_dir).glob("checkpoint-*")) == [
        "checkpoint-10",
        "checkpoint-20",
    ]


def test_adapter_saves_reloads_and_gives_the_same_logits(trained, tiny_base):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, result, _, _ = trained
    tokenizer = AutoTokenizer.from_pretrained(config.adapter_dir)
    reloaded, base_ref = _load_adapter(config.adapter_dir)
    assert Path(base_ref) == Path(tiny_base).resolve()
    trained_logits = _logits(result.model, tokenizer)
    assert torch.allclose(_logits(reloaded, tokenizer), trained_logits, atol=1e-5)
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(tiny_base), tokenizer)
    assert not torch.allclose(base_logits, trained_logits, atol=1e-3)  # the adapter changed something


def test_merged_model_matches_the_adapter(trained):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, _, merged, _ = trained
    assert Path(merged) == Path(config.merged_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    adapter_model, _ = _load_adapter(config.adapter_dir)
    merged_model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in name for name, _ in merged_model.named_parameters())
    assert torch.allclose(_logits(merged_model, tokenizer), _logits(adapter_model, tokenizer), atol=1e-4)


def test_a_finished_run_is_reused_and_a_changed_one_is_not(trained, short_store):
    from floorplan_ft.training.sft import train

    config, result, _, _ = trained
    again = train(config, short_store)
    assert again.reused and again.fingerprint == result.fingerprint and again.global_step == 20
    hashes = {"train": "a", "val": "b"}
    assert config.fingerprint(hashes) != config.replace(learning_rate=1e-3).fingerprint(hashes)
    assert config.fingerprint(hashes) == config.replace(logging_steps=7).fingerprint(hashes)


KILL_AT_STEP_3 = """
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from transformers import TrainerCallback
from floorplan_ft.training.config import TrainConfig
from floorplan_ft.training.sft import train

class KillAtStep3(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # a pre-empted pod: no cleanup, no exception

values = json.loads(sys.argv[1])
values["target_modules"] = tuple(values["target_modules"])
train(TrainConfig(**values), callbacks=[KillAtStep3()])
"""


def test_training_killed_after_a_checkpoint_resumes_at_the_right_step(short_store, tiny_base):
    import dataclasses
    import signal
    import subprocess
    import sys

    from floorplan_ft.training.sft import train

    config = _config(
        short_store,
        tiny_base,
        student_name="student-resume",
        max_steps=4,
        save_steps=2,
        eval_steps=2,
        early_stopping_patience=0,
    )
    proc = subprocess.run(
        [sys.executable, "-c", KILL_AT_STEP_3, json.dumps(dataclasses.asdict(config))],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpts = sorted(p.name for p in Path(config.checkpoints_dir).glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2"] and not Path(config.adapter_dir).exists()
    partial = Path(config.checkpoints_dir) / "checkpoint-3"  # as if killed in the middle of a save
    partial.mkdir()
    (partial / "trainer_state.json").write_text("{")

    logs: list[dict] = []
    result = train(config, short_store, on_log=logs.append)
    assert result.resumed_from is not None and Path(result.resumed_from).name == "checkpoint-2"
    assert result.global_step == 4
    assert min(r["step"] for r in logs if "loss" in r) == 3  # nothing before the checkpoint was redone
    history = json.loads(Path(config.log_path).read_text())["history"]
    assert [r["step"] for r in history if r["loss"] is not None] == [1, 2, 3, 4]  # the first run's log kept
    assert (Path(config.adapter_dir) / "adapter_model.safetensors").is_file()
    assert not partial.exists()


def test_early_stopping_keeps_the_best_checkpoint(tmp_path, tiny_base):
    """Validation answers the train rows never contain: fitting the train answers makes the
    validation loss rise from the first evaluation, so patience 2 stops at the third."""
    from safetensors.torch import load_file

    from floorplan_ft.training.sft import train

    def unseen_answer(i: int) -> dict:
        row = _row(i)
        row["messages"][-1]["content"] = "QXJVWKZ qxjvwkz 0987 " * 6
        return row

    store = _write_rows(
        tmp_path / "data",
        [_row(i) for i in range(6)],
        [unseen_answer(i) for i in range(2)],
        [f"T{i}" for i in range(6)],
        ["V0", "V1"],
    )
    config = _config(
        store, tiny_base, student_name="student-es", max_steps=40, eval_steps=2, save_steps=2, early_stopping_patience=2
    )
    result = train(config, store)
    evals = [
        (r["step"], r["eval_loss"])
        for r in json.loads(Path(config.log_path).read_text())["history"]
        if r["eval_loss"] is not None
    ]
    assert [s for s, _ in evals] == [2, 4, 6] and evals[0][1] < evals[1][1] < evals[2][1], evals
    assert result.stopped_early and result.global_step == 6 and result.max_steps == 40
    assert Path(result.best_checkpoint).name == "checkpoint-2" and result.best_eval_loss == evals[0][1]
    saved = load_file(Path(config.adapter_dir) / "adapter_model.safetensors")
    best = load_file(Path(result.best_checkpoint) / "adapter_model.safetensors")
    last = load_file(Path(config.checkpoints_dir) / "checkpoint-6" / "adapter_model.safetensors")
    assert saved.keys() == best.keys() and all(torch_equal(saved[k], best[k]) for k in saved)
    assert not all(torch_equal(saved[k], last[k]) for k in saved)  # the best, not the last, was kept
    assert "stopped early" in result.markdown()


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


UNSLOTH_RUN = """
import json, sys
import torch
torch.set_num_threads(1)
from floorplan_ft.training.config import TrainConfig
from floorplan_ft.training.sft import train

values = json.loads(sys.argv[1])
values["target_modules"] = tuple(values["target_modules"])
logs = []
result = train(TrainConfig(**values), on_log=logs.append)
import trl
print("RESULT " + json.dumps({
    "backend": result.backend, "steps": result.global_step, "eval": result.best_eval_loss,
    "losses": [r["loss"] for r in logs if "loss" in r], "unsloth_loaded": "unsloth" in sys.modules,
    "trainer": trl.SFTTrainer.__qualname__, "warnings": result.warnings,
}))
"""


def test_unsloth_backend_trains_and_writes_an_adapter_plain_peft_loads(short_store, tiny_base_64):
    """``finetune.backend=unsloth`` through our loader and trainer, on Unsloth's CPU fallback (its
    CUDA kernels need a GPU). In a subprocess: importing unsloth patches TRL for the whole process."""
    import dataclasses
    import subprocess
    import sys

    import torch

    from floorplan_ft.training.merge import merge_adapter

    base = tiny_base_64
    config = _config(
        short_store,
        base,
        student_name="student-unsloth",
        backend="unsloth",
        load_in_4bit=True,
        gradient_checkpointing=True,
        max_steps=12,
        eval_steps=4,
        save_steps=4,
    )
    proc = subprocess.run(
        [sys.executable, "-c", UNSLOTH_RUN, json.dumps(dataclasses.asdict(config))],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    out = json.loads(line.removeprefix("RESULT "))
    assert out["backend"] == "unsloth" and out["unsloth_loaded"] and out["steps"] == 12
    assert "<locals>" in out["trainer"], out["trainer"]  # TRL's SFTTrainer was replaced by Unsloth's subclass
    assert any("Unsloth's CPU fallback" in w for w in out["warnings"])
    losses = out["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0, losses

    # What Unsloth wrote is a plain PEFT adapter: our serving path loads it and merges it.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.adapter_dir)
    adapter_model, base_ref = _load_adapter(config.adapter_dir)
    assert Path(base_ref) == base.resolve()
    merged = merge_adapter(config.replace(backend="trl"))
    merged_model = AutoModelForCausalLM.from_pretrained(merged)
    assert torch.allclose(_logits(merged_model, tokenizer), _logits(adapter_model, tokenizer), atol=1e-4)


def test_production_profile_qlora_path_runs_on_the_cpu(short_store, tiny_base_64, no_dotenv):
    """The production profile as the A100 runs it (NF4 4-bit base, LoRA r 64 / alpha 128 on every
    projection, 8-bit AdamW, cosine with warmup, gradient checkpointing, merge), with bitsandbytes'
    CPU kernels, a tiny model, short rows and a few steps at a higher learning rate."""
    import torch
    from transformers import TrainerCallback

    from floorplan_ft.settings import load_settings
    from floorplan_ft.training.sft import prepare, run_finetune, train

    base = tiny_base_64
    production = load_settings(profile="production")
    settings = load_settings(
        profile="production",
        paths={"data_root": short_store.root},
        finetune={
            "base_model": str(base),
            "student_name": "student-qlora",
            "device": "cpu",
            "max_length": 512,
            "max_steps": 8,
            "eval_steps": 4,
            "save_steps": 4,
            "logging_steps": 1,
            "grad_accum": 2,
            "learning_rate": 2e-2,
            "gradient_checkpointing": True,
        },
    )
    ft, prod = settings.finetune, production.finetune
    for name in (
        "load_in_4bit",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "lr_scheduler",
        "warmup_ratio",
        "batch_size",
        "optim",
        "merge",
        "backend",
    ):
        assert getattr(ft, name) == getattr(prod, name), name
    assert ft.load_in_4bit and ft.optim == "adamw_8bit" and ft.lora_r == 64 and ft.merge

    config = TrainConfig.from_settings(settings, short_store)
    prepared = prepare(config)
    peft_model = prepared.trainer.model
    layers = {
        type(m).__name__
        for n, m in peft_model.named_modules()
        if n.endswith(("q_proj.base_layer", "down_proj.base_layer"))
    }
    assert layers == {"Linear4bit"} and prepared.backend == "trl"
    assert peft_model.is_gradient_checkpointing and prepared.memory.assumptions["load_in_4bit"]
    prepared = peft_model = None

    seen: dict[str, set] = {"optimizer": set(), "state": set()}

    class OptimizerProbe(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            inner = getattr(optimizer, "optimizer", optimizer)
            seen["optimizer"].add(f"{type(inner).__module__}.{type(inner).__name__}")
            for st in inner.state.values():
                seen["state"].update(str(v.dtype) for v in st.values() if hasattr(v, "dtype"))

    logs: list[dict] = []
    out = train(config, short_store, on_log=logs.append, callbacks=[OptimizerProbe()])
    assert seen["optimizer"] == {"bitsandbytes.optim.adamw.AdamW"} and "torch.uint8" in seen["state"], seen
    losses = [r["loss"] for r in logs if "loss" in r]
    assert out.global_step == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0, losses
    assert out.parameters["load_in_4bit"] and out.parameters["optim"] == "adamw_8bit"

    merged = run_finetune(settings, short_store)  # reuses the finished run, then merges on an unquantised base
    assert merged["reused"] and merged["merged_dir"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged["merged_dir"])
    merged_model = AutoModelForCausalLM.from_pretrained(merged["merged_dir"])
    adapter_model, _ = _load_adapter(out.adapter_dir)
    assert all(p.dtype == torch.float32 for p in merged_model.parameters())
    assert torch.allclose(_logits(merged_model, tokenizer), _logits(adapter_model, tokenizer), atol=1e-4)


def test_loss_mask_covers_only_the_answer_tokens(short_store, tiny_base):
    from floorplan_ft.dataset import read_rows
    from floorplan_ft.training.data import IGNORE_INDEX
    from floorplan_ft.training.sft import prepare

    prepared = prepare(_config(short_store, tiny_base, student_name="student-mask", batch_size=3))
    tok = prepared.tokenizer
    expected = {}  # full token sequence -> (prompt length, answer), computed from the template here
    for row in read_rows(short_store, "train"):
        prompt = tok.apply_chat_template(
            row["messages"][:-1], add_generation_prompt=True, tokenize=False, enable_thinking=False
        )
        assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # non-thinking mode
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        answer = row["messages"][-1]["content"]
        a_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        expected[tuple(p_ids + a_ids)] = (len(p_ids), answer)

    batch = next(iter(prepared.trainer.get_train_dataloader()))  # what the trainer feeds the model
    assert batch["input_ids"].shape[0] == 3
    for i in range(3):
        length = int(batch["attention_mask"][i].sum())
        ids, labels = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
        plen, answer = expected[tuple(ids[:length])]
        assert all(t == IGNORE_INDEX for t in labels[:plen])  # system, user and the generation prompt
        assert labels[plen:length] == ids[plen:length]  # every answer token and the EOS after it
        assert tok.decode(labels[plen:length]) == answer + tok.eos_token
        assert all(t == IGNORE_INDEX for t in labels[length:])  # padding


def test_max_length_warning_names_the_overlong_rows(tmp_path, tiny_base):
    from floorplan_ft.training.sft import prepare

    train = [_row(0), _row(1, long_user=True), _row(2), _row(3, long_user=True)]
    store = _write_rows(tmp_path / "data", train, [_row(4)], ["P0", "LONG1", "P2", "LONG3"], ["V4"])
    prepared = prepare(_config(store, tiny_base, max_length=300))
    (warning,) = [w for w in prepared.warnings if "longer than finetune.max_length=300" in w]
    assert "LONG1" in warning and "LONG3" in warning and "P0" not in warning and "P2" not in warning
    assert prepared.train.overlong == ["LONG1", "LONG3"]
    assert all(len(e["input_ids"]) <= 300 for e in prepared.train.examples)

    with pytest.raises(TrainConfigError, match=r"set finetune.max_length >= \d+"):
        prepare(_config(store, tiny_base, max_length=20))


# ----------------------------------------------------------------------------- configuration and memory


def test_config_errors_name_the_setting_and_the_fix(short_store, tiny_base, tmp_path):
    with pytest.raises(
        TrainConfigError,
        match=r"finetune.load_in_4bit=true needs bitsandbytes, which is not installed.*"
        r"finetune.load_in_4bit=false",
    ):
        _config(short_store, tiny_base, load_in_4bit=True).validate(cuda_available=False, bnb_version=None)
    with pytest.raises(TrainConfigError, match=r"finetune.optim='adamw_8bit' needs bitsandbytes.*adamw_torch"):
        _config(short_store, tiny_base, optim="adamw_8bit").validate(cuda_available=False, bnb_version=None)
    with pytest.raises(TrainConfigError, match=r"on the CPU needs bitsandbytes >= 0.50 \(CPU kernels\), but 0.45.5"):
        _config(short_store, tiny_base, load_in_4bit=True).validate(cuda_available=False, bnb_version="0.45.5")
    _config(short_store, tiny_base, load_in_4bit=True, device="auto").validate(
        cuda_available=True, bnb_version="0.45.5"
    )
    with pytest.raises(TrainConfigError, match=r"save_steps=15 must be a multiple of finetune.eval_steps=10"):
        _config(short_store, tiny_base, eval_steps=10, save_steps=15).validate(cuda_available=False)
    with pytest.raises(TrainConfigError, match="finetune.device=cuda but CUDA is not available"):
        _config(short_store, tiny_base, device="cuda").validate(cuda_available=False)
    with pytest.raises(TrainConfigError, match="finetune.backend=unsloth but unsloth is not installed"):
        _config(short_store, tiny_base, backend="unsloth").validate(cuda_available=False, unsloth=None)
    with pytest.raises(TrainConfigError, match=r"unsloth on the CPU needs Unsloth's CPU fallback.*backend=trl"):
        _config(short_store, tiny_base, backend="unsloth").validate(cuda_available=False, unsloth="2025.3.1")
    with pytest.raises(TrainConfigError, match="run step 5"):
        _config(short_store, tiny_base, train_path=str(tmp_path / "none.jsonl")).check_data()
    _config(short_store, tiny_base).validate(cuda_available=False)  # the CPU set-up is fine
    # The dev set-up installs bitsandbytes with CPU kernels: QLoRA settings validate on the CPU.
    _config(short_store, tiny_base, load_in_4bit=True, optim="adamw_8bit").validate(cuda_available=False)


def test_train_config_takes_its_defaults_and_help_from_the_finetune_settings(tmp_path, no_dotenv):
    """One place for every default: each TrainConfig field that is a finetune setting has the
    FinetuneSettings default and description, and from_settings copies every one of them."""
    import dataclasses

    from floorplan_ft.settings import FinetuneSettings, load_settings
    from floorplan_ft.training.config import setting_fields

    settings_fields = FinetuneSettings.model_fields
    shared = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name in settings_fields}
    assert set(shared) == set(setting_fields()) and len(shared) >= 29
    assert shared["base_model"].default is dataclasses.MISSING  # required: a run names its base model
    defaults = FinetuneSettings()
    from_settings = TrainConfig.from_settings(load_settings(paths={"data_root": str(tmp_path)}))
    for name, f in shared.items():
        expected = getattr(defaults, name)
        expected = tuple(expected) if isinstance(expected, list) else expected
        if name != "base_model":
            assert f.default == expected, name
        assert getattr(from_settings, name) == expected, name
        assert f.metadata["help"] == settings_fields[name].description, name


def test_memory_check_refuses_an_impossible_profile_with_advice(tiny_base, no_dotenv):
    from floorplan_ft.settings import load_settings

    rtx3070 = DeviceInfo("cuda", "NVIDIA GeForce RTX 3070", 8 * GiB)
    eight_b_bf16 = TrainConfig.from_settings(load_settings(profile="production")).replace(load_in_4bit=False)
    with pytest.raises(MemoryCheckError) as info:
        check_memory(eight_b_bf16, rtx3070)
    message = str(info.value)
    assert "use the local-8gb profile (EXAONE 2.4B QLoRA" in message and "Qwen/Qwen3-8B" in message
    assert "8.2B parameters" in message and info.value.estimate.total_bytes > 16 * GiB

    # The profiles fit the machines they were written for.
    production = TrainConfig.from_settings(load_settings(profile="production"))
    estimate = check_memory(production, DeviceInfo("cuda", "NVIDIA A100-SXM4-80GB", 80 * GiB))
    assert 10 * GiB < estimate.total_bytes < 30 * GiB
    local = TrainConfig.from_settings(load_settings(profile="local-8gb"))
    assert check_memory(local, rtx3070).total_bytes < 7.6 * GiB
    with pytest.raises(MemoryCheckError, match="local-8gb"):
        check_memory(production, rtx3070)  # 8B even in 4 bits

    # Shapes: the table for hub ids, config.json for a local model.
    assert abs(model_shape("Qwen/Qwen3-8B").params - 8.19e9) < 0.05e9
    assert abs(model_shape("LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct").params - 2.7e9) < 0.1e9
    from transformers import AutoModelForCausalLM

    shape = model_shape(str(tiny_base))
    assert shape.source == "config.json"
    assert shape.params == AutoModelForCausalLM.from_pretrained(tiny_base).num_parameters()
    assert estimate_memory(8_000_000_000, load_in_4bit=True, lora_r=64, batch=2, max_length=4096) < estimate_memory(
        8_000_000_000, load_in_4bit=False, lora_r=64, batch=2, max_length=4096
    )


# ----------------------------------------------------------------------------- evaluation


def test_rouge_l_and_field_agreement():
    from floorplan_ft.training.evaluate import field_agreement, lcs_length, rouge_l

    assert lcs_length("가나다라", "가다라") == 3
    assert rouge_l("채광이 좋습니다", "채광이좋습니다") == 1.0  # whitespace ignored
    assert rouge_l("가나다라", "가다") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert rouge_l("", "") == 1.0 and rouge_l("가", "") == 0.0
    teacher = {
        "structure_type": "판상형",
        "bay_count": 3,
        "balcony_ratio": 10.0,
        "summary": "3베이 판상형",
        "compliance": {"overall_grade": "우수", "summary": "양호"},
    }
    same = field_agreement(teacher, teacher)
    assert same["scalar_exact_match"] == 1.0 and same["rouge_l"] == 1.0
    other = field_agreement({**teacher, "bay_count": 2, "balcony_ratio": 10.04, "summary": "판상형"}, teacher)
    assert other["scalars"]["bay_count"] == 0.0 and other["scalars"]["balcony_ratio"] == 1.0
    assert 0 < other["texts"]["summary"] < 1


@pytest.fixture(scope="module")
def plans_store(tmp_path_factory):
    """Synthetic plans with topologies and contexts, labeled by the reference teacher, phase 5 run."""
    from floorplan_ft.cv.runner import process_image
    from floorplan_ft.cv.sources import SourceConfig
    from floorplan_ft.dataset import build_training_data, write_training_data
    from floorplan_ft.retrieval.corpus import corpus_hash, load_corpus
    from floorplan_ft.retrieval.retrieve import make_context, write_context
    from floorplan_ft.settings import load_settings
    from floorplan_ft.synth import write_dataset
    from floorplan_ft.teachers.items import build_items
    from floorplan_ft.teachers.labeling import LabelingRun, ReferenceTeacher

    root = tmp_path_factory.mktemp("plans") / "data"
    stems = write_dataset(root, count=10, complexes=5, seed=3)
    store = ArtifactStore(root)
    config = SourceConfig(image_dir=str(root / "images"), annotation_dir=str(root / "annotations"))
    chunks = load_corpus()
    for i, stem in enumerate(stems):
        assert process_image(store, config, stem).status == "built"
        picks = [(i + j) % len(chunks) for j in range(3)]
        write_context(
            store,
            stem,
            make_context(
                f"q{i}",
                chunks,
                picks,
                [0.9, 0.8, 0.7],
                embedding_identity="test",
                dimensions=8,
                corpus_hash_=corpus_hash(chunks),
                top_k=3,
            ),
        )
    items, _ = build_items(store, stems)
    settings = load_settings()
    asyncio.run(LabelingRun(ReferenceTeacher(), store, settings.teachers).run(items))
    store.write_text(store.layout.run_file("selected_model"), "reference\n")
    data = build_training_data(store, stems, settings)
    write_training_data(store, data)
    assert data.val
    return store


def test_evaluation_produces_schema_valid_answers_and_a_report(plans_store, tmp_path, no_dotenv):
    from floorplan_ft.dataset import read_rows
    from floorplan_ft.settings import load_settings
    from floorplan_ft.training.evaluate import evaluate_student

    student = tmp_path / "terse-student"
    model, tokenizer = build_tiny_causal_lm(student, seed=2)
    bias_towards_short_json(model, tokenizer, student)
    settings = load_settings(profile="demo", paths={"data_root": plans_store.root})
    report = evaluate_student(plans_store, student, settings=settings, limit=2, max_new_tokens=800)

    assert report.summary["rows"] == min(2, len(read_rows(plans_store, "val")))
    assert report.summary["schema_compliance"] == 1.0 and report.summary["meets_compliance_target"]
    assert all(r["schema_valid"] and r["error"] is None for r in report.rows)
    q = report.summary["quality"]
    assert q["teacher"] > q["student"] > 0 and q["ratio"] == pytest.approx(q["student"] / q["teacher"], abs=1e-3)
    lat = report.summary["latency"]
    assert 0 < lat["p50_s"] <= lat["p95_s"] and lat["tokens_per_s"] > 0 and lat["meets_target"]
    assert report.device["kind"] == "cpu" and report.device["name"]
    assert report.rows[0]["teacher"]["metrics"]["schema_compliance"] == 1.0
    saved = json.loads(Path(report.path).read_text())
    assert saved["summary"] == report.summary and Path(report.path).name == "eval_report.json"
    assert Path(report.path).parent.name == settings.finetune.student_name
    md = report.markdown()
    assert "schema compliance" in md and "quality relative to the teacher" in md and "p50" in md


def test_demo_profile_finetune_and_evaluation_end_to_end(plans_store, no_dotenv):
    from floorplan_ft.settings import load_settings
    from floorplan_ft.training.evaluate import run_evaluation
    from floorplan_ft.training.sft import run_finetune
    from floorplan_ft.training.tiny import ensure_demo_base

    base = ensure_demo_base(Path(plans_store.root) / "models" / "tiny-student-base")
    assert ensure_demo_base(base) == base  # built once
    settings = load_settings(
        profile="demo",
        paths={"data_root": plans_store.root},
        finetune={
            "base_model": base,
            "student_name": "demo-student",
            "max_steps": 2,
            "eval_steps": 2,
            "save_steps": 2,
            "logging_steps": 1,
            "max_length": 16384,
            "merge": True,
            "learning_rate": 5e-3,
        },
    )
    out = run_finetune(settings, plans_store)
    assert out["global_step"] == 2 and out["merged_dir"] and out["backend"] == "trl"
    assert "Phase 6: student fine-tune" in out["markdown"]
    ev = run_evaluation(settings, plans_store)
    assert Path(ev["model_dir"]).name == "merged_model"  # the merged model, made from the current adapter
    assert ev["summary"]["schema_compliance"] == 1.0 and Path(ev["path"]).is_file()


def test_train_plan_counts_the_rows_with_the_base_models_tokenizer(plans_store, no_dotenv):
    from transformers import AutoTokenizer

    from floorplan_ft.dataset import read_rows
    from floorplan_ft.settings import load_settings
    from floorplan_ft.training.data import encode_row
    from floorplan_ft.training.plan import plan_training
    from floorplan_ft.training.tiny import ensure_demo_base

    base = ensure_demo_base(Path(plans_store.root) / "models" / "tiny-student-base")
    settings = load_settings(
        profile="demo", paths={"data_root": plans_store.root}, finetune={"base_model": base, "max_length": 4096}
    )
    plan = plan_training(settings, plans_store)
    rows = read_rows(plans_store, "train")
    tokenizer = AutoTokenizer.from_pretrained(base)
    lengths = [len(encode_row(tokenizer, r)[0]) for r in rows]
    assert plan.rows == len(rows) and plan.tokens_source == "counted with the tokenizer"
    assert plan.longest_row == max(lengths) > 4096  # byte-level tokenizer: Korean rows are long
    assert plan.rows_over_max_length == sum(n > 4096 for n in lengths)
    assert plan.tokens_per_epoch == sum(min(n, 4096) for n in lengths)
    assert "rows exceed finetune.max_length" in plan.markdown()


def test_evaluation_through_an_openai_compatible_server(plans_store, fake_provider, no_dotenv, monkeypatch):
    """``finetune.eval_base_url``: the student served by vLLM (here the fake server, speaking the
    OpenAI wire protocol on 127.0.0.1) answers the val prompts; it answers with the teacher's own
    answers, so every agreement measure is exactly 1."""
    from fakes.provider_server import Reply

    from floorplan_ft.dataset import read_rows
    from floorplan_ft.settings import load_settings
    from floorplan_ft.training.data import split_stems
    from floorplan_ft.training.evaluate import run_evaluation

    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-reach-the-student-server-0123")
    rows = read_rows(plans_store, "val")
    settings = load_settings(
        profile="demo",
        paths={"data_root": plans_store.root},
        finetune={
            "student_name": "served-student",
            "eval_base_url": fake_provider.openai_base_url,
            "eval_model": "floorplan-student",
            "base_model": "Qwen/Qwen3-8B",
        },
    )
    stems = split_stems(TrainConfig.from_settings(settings, plans_store), "val", len(rows))
    for stem, row in zip(stems, rows, strict=True):
        fake_provider.push_for(stem, Reply.ok(row["messages"][-1]["content"]))

    out = run_evaluation(settings, plans_store)
    s = out["summary"]
    assert s["rows"] == len(rows) and s["schema_compliance"] == 1.0 and s["quality"]["ratio"] == 1.0
    assert s["field_agreement"]["scalar_exact_match"] == 1.0 and s["field_agreement"]["rouge_l"] == 1.0
    assert s["quality"]["expected_band"] == [0.85, 0.95]  # from the base model the student was trained on
    assert out["device"]["kind"] == "server" and fake_provider.openai_base_url in out["device"]["name"]
    assert s["latency"]["p50_s"] > 0
    chats = fake_provider.requests_to("/chat/completions")
    assert len(chats) == len(rows)
    for req in chats:
        assert req.body["model"] == "floorplan-student"
        assert req.body["chat_template_kwargs"] == {"enable_thinking": False}  # as trained, whatever its name
        assert req.body["response_format"]["type"] == "json_schema"
        assert "sk-must-not-reach" not in (req.header("authorization") or "")
    report = json.loads(Path(out["path"]).read_text())
    assert report["summary"] == s and Path(out["path"]).parent.name == "served-student"


@pytest.mark.prefect
def test_ft_pipeline_run_steps_6_trains_evaluates_and_publishes(prefect_api, plans_store, no_dotenv):
    """`ft-pipeline run --steps 6` with the demo profile, through the parent flow on a real Prefect
    API: the report line, the outputs, and the three phase-6 artifacts."""
    import httpx
    from typer.testing import CliRunner

    from floorplan_ft.training.tiny import ensure_demo_base
    from ft_pipeline.cli import app

    base = ensure_demo_base(Path(plans_store.root) / "models" / "tiny-student-base")
    sets = {
        "paths.data_root": plans_store.root,
        "finetune.base_model": base,
        "finetune.student_name": "cli-student",
        "finetune.max_steps": 3,
        "finetune.eval_steps": 3,
        "finetune.save_steps": 3,
        "finetune.logging_steps": 1,
        "finetune.max_length": 16384,
        "finetune.eval_limit": 1,
    }
    args = ["run", "--profile", "demo", "--steps", "6"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (line,) = [x for x in result.output.splitlines() if x.strip().startswith("step  6:")]
    assert "done" in line and '"steps": 3' in line and '"schema_compliance": 1.0' in line
    student = Path(plans_store.root) / "cli-student"
    for name in (
        "adapter_model/adapter_model.safetensors",
        "adapter_model/README.md",
        "merged_model/config.json",
        "training_log.json",
        "training_curves.png",
        "train_result.json",
        "eval_report.json",
    ):
        assert (student / name).is_file(), name

    from prefect.settings import PREFECT_API_URL

    response = httpx.post(
        f"{PREFECT_API_URL.value()}/artifacts/filter",
        json={
            "artifacts": {"key": {"any_": ["phase6-training", "phase6-loss-curve", "phase6-evaluation"]}},
            "limit": 20,
            "offset": 0,
            "sort": "CREATED_DESC",
        },
    )
    latest = {}
    for artifact in response.json():
        latest.setdefault(artifact["key"], artifact)
    assert set(latest) == {"phase6-training", "phase6-loss-curve", "phase6-evaluation"}
    assert "Phase 6: student fine-tune" in latest["phase6-training"]["data"]
    assert "schema compliance" in latest["phase6-evaluation"]["data"]
    table = json.loads(latest["phase6-loss-curve"]["data"])
    assert [r["step"] for r in table if r["loss"] is not None] == [1, 2, 3] and table[-1]["eval_loss"] is not None
