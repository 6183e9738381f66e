"""Phase 6 ships a LoRA module the team's vLLM serves by name (``--lora-modules cv_agent=...``).

Before training (nothing loaded but the base model's ``config.json``): the adapter's rank fits the
server's ``--max-lora-rank`` (``finetune.vllm_max_lora_rank``, itself one of the values vLLM
accepts), its target modules exist in the base model and are layers vLLM can serve as LoRA. After
training: the adapter folder holds what ``vllm serve`` loads (adapter_config.json, the weights, the
tokenizer, the chat template). Every failure names the fix.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from floorplan_ft.training.config import TrainConfig, TrainConfigError

# vLLM's --max-lora-rank choices (vllm.config.lora.LoRAConfig.max_lora_rank).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Layers vLLM does not serve as LoRA (embeddings and output heads): train them only for a merged model.
VLLM_UNSERVABLE = frozenset({"embed_tokens", "lm_head", "wte", "wpe", "word_embeddings", "embed_out", "output"})
DEFAULT_LORA_MODULE = "cv_agent"


def vllm_lora_errors(config: TrainConfig) -> list[str]:
    """What stops vLLM from loading this adapter, each with its fix (no I/O)."""
    errors: list[str] = []
    limit = config.vllm_max_lora_rank
    if limit not in VLLM_LORA_RANKS:
        near = min(r for r in VLLM_LORA_RANKS if r >= min(limit, 512)) if limit > 0 else 16
        errors.append(
            f"finetune.vllm_max_lora_rank={limit} is not a rank vLLM accepts for --max-lora-rank "
            f"({', '.join(map(str, VLLM_LORA_RANKS))}): set finetune.vllm_max_lora_rank={near}"
        )
    elif config.lora_r > limit:
        need = next((r for r in VLLM_LORA_RANKS if r >= config.lora_r), None)
        start = (
            f"start vLLM with --max-lora-rank {need} (and set finetune.vllm_max_lora_rank={need})"
            if need
            else f"no vLLM rank reaches {config.lora_r}"
        )
        errors.append(
            f"finetune.lora_r={config.lora_r} exceeds the serving vLLM's --max-lora-rank {limit} "
            f"(finetune.vllm_max_lora_rank): {start} or set finetune.lora_r <= {limit}"
        )
    bad = [m for m in config.target_modules if m.rsplit(".", 1)[-1] in VLLM_UNSERVABLE]
    if bad:
        errors.append(
            f"finetune.target_modules has {bad}, which vLLM cannot serve as a LoRA module: remove them "
            "(vLLM applies LoRA to attention and MLP projections), or keep them and serve "
            "merged_model/ (finetune.merge=true) instead of --lora-modules"
        )
    return errors


def base_linear_names(base_path: str | Path, trust_remote_code: bool = False) -> set[str]:
    """The short names of the base model's linear layers, from its config alone (meta device:
    no weights are read or allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(base_path), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


def check_target_modules(config: TrainConfig, base_path: str | Path) -> None:
    """Every ``finetune.target_modules`` entry names a linear layer of the base model."""
    linear = base_linear_names(base_path, config.trust_remote_code)
    missing = [t for t in config.target_modules if t.rsplit(".", 1)[-1] not in linear]
    if missing:
        raise TrainConfigError(
            f"finetune.target_modules names layers {config.base_model!r} does not have: {missing}. Its linear "
            f"layers are {sorted(linear)}; set finetune.target_modules to its attention and MLP projections"
        )


def preflight(config: TrainConfig, base_path: str | Path) -> None:
    """All checks that need the base model's config (run before any weight is loaded)."""
    errors = vllm_lora_errors(config)
    if errors:
        raise TrainConfigError("the adapter could not be served by vLLM: " + "; ".join(errors))
    check_target_modules(config, base_path)


def vllm_serve_command(config: TrainConfig, base_ref: str, adapter_dir: str | Path, module: str | None = None) -> str:
    """The ``vllm serve`` line that serves this adapter by name beside its base model. The context
    holds a training-length prompt plus the evaluation's ``max_tokens``."""
    module = module or config.lora_module_name or DEFAULT_LORA_MODULE
    rank = next((r for r in VLLM_LORA_RANKS if r >= max(config.lora_r, 1)), config.lora_r)
    rank = max(rank, config.vllm_max_lora_rank) if config.vllm_max_lora_rank in VLLM_LORA_RANKS else rank
    parts = [
        "vllm",
        "serve",
        str(base_ref),
        "--enable-lora",
        "--lora-modules",
        f"{module}={Path(adapter_dir).resolve()}",
        "--max-lora-rank",
        str(rank),
        "--max-model-len",
        str(config.max_length + config.eval_max_tokens),
    ]
    if config.trust_remote_code:
        parts.append("--trust-remote-code")
    return shlex.join(parts)


def finish_adapter(adapter_dir: str | Path, tokenizer: Any) -> list[str]:
    """Make sure the adapter folder holds adapter_config.json, the weights, the tokenizer and the
    chat template; write the tokenizer / template when missing. Returns the file names checked."""
    adapter = Path(adapter_dir)
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.is_file():
        raise TrainConfigError(
            f"{adapter}: adapter_config.json is missing: the adapter was not saved; train again (step 6)"
        )
    if not any(adapter.glob("adapter_model.*")):
        raise TrainConfigError(
            f"{adapter}: no adapter_model.safetensors: the adapter was not saved; train again (step 6)"
        )
    if not ((adapter / "tokenizer.json").is_file() or (adapter / "tokenizer_config.json").is_file()):
        tokenizer.save_pretrained(str(adapter))
    template_file = adapter / "chat_template.jinja"
    tok_cfg_path = adapter / "tokenizer_config.json"
    in_config = False
    if tok_cfg_path.is_file():
        try:
            in_config = bool(json.loads(tok_cfg_path.read_text(encoding="utf-8")).get("chat_template"))
        except ValueError:
            in_config = False
    if not template_file.is_file() and not in_config:
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise TrainConfigError(
                f"{adapter}: the tokenizer of finetune.base_model has no chat template, and vLLM's chat endpoint "
                "needs one: use the instruct model's tokenizer (e.g. Qwen/Qwen3-8B), or start vLLM with --chat-template FILE"
            )
        template_file.write_text(template if isinstance(template, str) else json.dumps(template), encoding="utf-8")
    rank = json.loads(cfg_path.read_text(encoding="utf-8")).get("r")
    names = sorted(p.name for p in adapter.iterdir())
    if rank is None:
        raise TrainConfigError(f"{cfg_path}: no rank 'r': not a LoRA adapter")
    return names
