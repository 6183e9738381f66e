"""Phase 6 merge: base + adapter as full weights for vLLM, made once per adapter.

``merged_model/merged_from.json`` records the adapter's content hash; a merge of the same adapter is
not made again (``force=True`` remakes it)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from floorplan_ft.training.config import TrainConfig, TrainConfigError, is_local_model_dir, resolve_base_model
from floorplan_ft.training.memory import free_memory

MERGE_FILE = "merged_from.json"


def adapter_hash(adapter_dir: str | Path) -> str:
    """Content hash of an adapter (config + weights): what a merged model was made from."""
    adapter = Path(adapter_dir)
    h = hashlib.sha256((adapter / "adapter_config.json").read_bytes())
    for w in sorted(adapter.glob("adapter_model.*")):
        h.update(w.read_bytes())
    return h.hexdigest()


def merge_adapter(
    config: TrainConfig, adapter_dir: str | None = None, out_dir: str | None = None, *, force: bool = False
) -> str:
    """Base + adapter merged into full weights (``PeftModel.merge_and_unload``) for vLLM: loaded
    unquantised (bf16 on CUDA, fp32 on the CPU), never on the 4-bit training model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = Path(adapter_dir or config.adapter_dir)
    out = Path(out_dir or config.merged_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise TrainConfigError(f"no adapter in {adapter}: train first (step 6)")
    digest = adapter_hash(adapter)
    marker = out / MERGE_FILE
    if not force and marker.is_file():
        try:
            if json.loads(marker.read_text()).get("adapter_sha256") == digest:
                return str(out)
        except ValueError:
            pass
    base_ref = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    base_path = base_ref if is_local_model_dir(base_ref) else resolve_base_model(base_ref)[0]
    device = config.resolved_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    trust = config.trust_remote_code
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, trust_remote_code=trust)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    if out.exists():
        shutil.rmtree(out)
    merged.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(str(out))
    card = adapter / "README.md"
    if card.is_file():
        shutil.copyfile(card, out / "README.md")
    marker.write_text(
        json.dumps(
            {
                "adapter": str(adapter),
                "adapter_sha256": digest,
                "base_model": base_ref,
                "dtype": str(dtype).replace("torch.", ""),
            },
            indent=2,
        )
    )
    base = merged = None
    free_memory()
    return str(out)
