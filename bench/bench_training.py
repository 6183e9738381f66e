"""Phase 6 memory model against measurement, on the CPU: the estimate of
``floorplan_ft/training/memory.py`` (the number ``check_memory`` and ``ft-pipeline train-plan`` act on)
next to the peak resident memory of real training steps with the project's own ``train()``.

Each configuration runs in a fresh subprocess:
  lora-fp32      LoRA on an fp32 base, no gradient checkpointing (the CPU default)
  lora-fp32-gc   the same with gradient checkpointing
  qlora-nf4-gc   the production profile's set-up: NF4 4-bit base (bitsandbytes' CPU kernels),
                 8-bit AdamW, gradient checkpointing
The model is a random Qwen3 built here (hidden 512, 8 layers, MLP 1536, the tiny byte-level
tokenizer's vocabulary), rows are cut to ``--max-length`` tokens with the answer filling most of
them, batch ``--batch``, a few optimizer steps. Measured = peak RSS (``ru_maxrss``) minus the RSS
after all imports, just before the model loads; the estimate is compared without its fixed 0.5 GiB
process overhead, which that subtraction removes. The children run with glibc returning freed
memory at once (``MALLOC_MMAP_THRESHOLD_=65536``, ``MALLOC_TRIM_THRESHOLD_=0``): with its defaults,
per-thread arenas keep freed blocks resident and the RSS peak says more about the allocator than
about live tensors (measured here: 2-5x the live figure with gradient checkpointing).

What it can and cannot say: the CPU holds fp32 tensors and has no CUDA context or caching
allocator, so it checks the weight / adapter / optimizer / activation arithmetic, not the GPU
overheads. The GPU figure (plan: 25-30 GB for Qwen3-8B QLoRA on an A100) needs a GPU run.

    .venv/bin/python bench/bench_training.py            # writes bench/results/training_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "lora-fp32": {"load_in_4bit": False, "optim": "adamw_torch", "gradient_checkpointing": False},
    "lora-fp32-gc": {"load_in_4bit": False, "optim": "adamw_torch", "gradient_checkpointing": True},
    "qlora-nf4-gc": {"load_in_4bit": True, "optim": "adamw_8bit", "gradient_checkpointing": True},
}

CHILD = r"""
import json, resource, sys
import psutil, torch
torch.set_num_threads(2)
import bitsandbytes, peft, transformers, trl  # noqa: F401 - imported before the baseline
from floorplan_ft.store import ArtifactStore
from floorplan_ft.training.config import TrainConfig
from floorplan_ft.training.memory import memory_breakdown
from floorplan_ft.training.sft import train

values = json.loads(sys.argv[1])
values["target_modules"] = tuple(values["target_modules"])
config = TrainConfig(**values)
estimate = memory_breakdown(config)
baseline = psutil.Process().memory_info().rss
result = train(config, ArtifactStore(config.data_root), force=True)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT " + json.dumps({
    "baseline_bytes": baseline, "peak_bytes": peak, "measured_bytes": peak - baseline,
    "estimate_bytes": estimate.total_bytes - estimate.parts.get("overhead", 0),
    "estimate_parts": estimate.parts, "steps": result.global_step, "last_loss": result.last_loss,
    "params": estimate.shape.params,
}))
"""


def build_model(directory: Path, hidden: int, layers: int) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from floorplan_ft.training.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(directory)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=hidden // 8,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(directory)


def write_rows(root: Path, count: int) -> None:
    from floorplan_ft.store import ArtifactStore

    store = ArtifactStore(root)
    rows = []
    for i in range(count):
        answer = json.dumps({"image_name": f"C{i:02d}.png", "summary": "bright rooms, cross ventilation " * 60})
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "Analyse the plan."},
                    {"role": "user", "content": f"plan C{i:02d}"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    store.write_jsonl(store.layout.run_file("train"), rows)
    store.write_jsonl(store.layout.run_file("val"), rows[:2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "training_memory.json"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-training-"))
    build_model(work / "base", args.hidden, args.layers)
    write_rows(work / "data", 16)
    results = {}
    for name in args.configs.split(","):
        from floorplan_ft.training.config import TrainConfig

        root = work / "data"
        config = TrainConfig(
            base_model=str(work / "base"),
            data_root=str(root),
            train_path=str(root / "train.jsonl"),
            val_path=str(root / "val.jsonl"),
            student_name=f"student-{name}",
            device="cpu",
            lora_r=64,
            lora_alpha=128,
            lora_dropout=0.05,
            batch_size=args.batch,
            grad_accum=1,
            max_steps=args.steps,
            max_length=args.max_length,
            logging_steps=1,
            eval_steps=args.steps,
            save_steps=args.steps,
            early_stopping_patience=0,
            learning_rate=1e-3,
            **CONFIGS[name],
        )
        import dataclasses

        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(dataclasses.asdict(config))],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
            env=env,
        )
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(lines[0].removeprefix("RESULT "))
        r["measured_over_estimate"] = round(r["measured_bytes"] / r["estimate_bytes"], 3)
        results[name] = r
        print(
            f"{name:14s} measured {r['measured_bytes'] / 2**20:8.1f} MiB   estimate {r['estimate_bytes'] / 2**20:8.1f} MiB"
            f"   ratio {r['measured_over_estimate']:.2f}"
        )
    out = {
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "model": {"hidden": args.hidden, "layers": args.layers, "params": next(iter(results.values()))["params"]},
        "batch": args.batch,
        "max_length": args.max_length,
        "steps": args.steps,
        "results": results,
        "command": "python bench/bench_training.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
