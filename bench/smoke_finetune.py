"""Phase 6 smoke run on the machine at hand, before a long training run is paid for.

Runs the project's own ``train()`` + ``merge_adapter()`` + ``evaluate_student()`` on a small random
Qwen3 built here (no download) and a few synthetic plans, once per backend set-up:

  trl-lora       TRL + PEFT, 16-bit base (bf16 on CUDA, fp32 on the CPU), AdamW
  trl-qlora      TRL + PEFT, NF4 4-bit base, 8-bit AdamW, gradient checkpointing (the production set-up)
  unsloth-qlora  the same through Unsloth (its CUDA kernels on a GPU, its CPU fallback otherwise)

and prints, per set-up: ok or the error, steps, first/last loss, seconds, the memory estimate and
the measured peak (CUDA allocator, or max RSS on the CPU), schema compliance of the evaluation.
Each set-up runs in its own process (Unsloth patches TRL on import; peaks stay per set-up).

On the RunPod pod (CUDA, the image's ``gpu`` extra), a minute or two:
    python bench/smoke_finetune.py --device cuda
Here (CPU):
    .venv/bin/python bench/smoke_finetune.py --device cpu
Results: ``bench/results/smoke_finetune_{device}.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPS = {
    "trl-lora": {"backend": "trl", "load_in_4bit": False, "optim": "adamw_torch", "gradient_checkpointing": False},
    "trl-qlora": {"backend": "trl", "load_in_4bit": True, "optim": "adamw_8bit", "gradient_checkpointing": True},
    "unsloth-qlora": {
        "backend": "unsloth",
        "load_in_4bit": True,
        "optim": "adamw_8bit",
        "gradient_checkpointing": True,
    },
}

CHILD = r"""
import json, sys, time, traceback
out = {"ok": False}
try:
    from floorplan_ft.settings import load_settings
    from floorplan_ft.store import ArtifactStore
    from floorplan_ft.training.evaluate import evaluate_student
    from floorplan_ft.training.merge import merge_adapter
    from floorplan_ft.training.sft import train
    from floorplan_ft.training.config import TrainConfig

    args = json.loads(sys.argv[1])
    store = ArtifactStore(args["data_root"])
    settings = load_settings(profile="demo", paths={"data_root": args["data_root"]}, finetune=args["finetune"])
    config = TrainConfig.from_settings(settings, store)
    started = time.perf_counter()
    result = train(config, store, force=True)
    train_s = time.perf_counter() - started
    merged = merge_adapter(config, force=True)
    report = evaluate_student(store, merged, settings=settings, limit=args["eval_rows"], max_new_tokens=600,
                              write=False)
    out = {"ok": True, "backend": result.backend, "device": result.device, "steps": result.global_step,
           "first_loss": result.first_loss, "last_loss": result.last_loss, "train_s": round(train_s, 1),
           "estimate_gib": (result.memory or {}).get("total_gib"), "peak_memory": result.peak_memory,
           "schema_compliance": report.summary["schema_compliance"],
           "eval_p50_s": report.summary["latency"]["p50_s"], "warnings": result.warnings}
except Exception as exc:  # noqa: BLE001 - the smoke run reports every failure
    out["error"] = f"{type(exc).__name__}: {exc}"
    out["traceback"] = traceback.format_exc()[-3000:]
print("RESULT " + json.dumps(out, default=str))
"""


def prepare(work: Path, hidden: int) -> Path:
    """Synthetic plans through phases 1-5 (reference teacher), and the random student base."""
    import asyncio

    from floorplan_ft.cv.runner import process_image
    from floorplan_ft.cv.sources import SourceConfig
    from floorplan_ft.dataset import build_training_data, write_training_data
    from floorplan_ft.retrieval.corpus import corpus_hash, load_corpus
    from floorplan_ft.retrieval.retrieve import make_context, write_context
    from floorplan_ft.settings import load_settings
    from floorplan_ft.store import ArtifactStore
    from floorplan_ft.synth import write_dataset
    from floorplan_ft.teachers.items import build_items
    from floorplan_ft.teachers.labeling import LabelingRun, ReferenceTeacher
    from floorplan_ft.training.tiny import bias_towards_short_json, build_tiny_causal_lm

    root = work / "data"
    stems = write_dataset(root, count=12, complexes=4, seed=5)
    store = ArtifactStore(root)
    source = SourceConfig(image_dir=str(root / "images"), annotation_dir=str(root / "annotations"))
    chunks = load_corpus()
    for i, stem in enumerate(stems):
        process_image(store, source, stem)
        picks = [(i + j) % len(chunks) for j in range(3)]
        write_context(
            store,
            stem,
            make_context(
                f"q{i}",
                chunks,
                picks,
                [0.9, 0.8, 0.7],
                embedding_identity="smoke",
                dimensions=8,
                corpus_hash_=corpus_hash(chunks),
                top_k=3,
            ),
        )
    items, _ = build_items(store, stems)
    settings = load_settings(profile="demo", paths={"data_root": str(root)})
    asyncio.run(LabelingRun(ReferenceTeacher(), store, settings.teachers).run(items))
    store.write_text(store.layout.run_file("selected_model"), "reference\n")
    write_training_data(store, build_training_data(store, stems, settings))
    base = work / "base"
    model, tokenizer = build_tiny_causal_lm(base, seed=0, hidden_size=hidden)
    bias_towards_short_json(model, tokenizer, base)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=128, help="hidden size of the random Qwen3 (>= 64 for NF4)")
    ap.add_argument("--eval-rows", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="smoke-finetune-"))
    root = prepare(work, args.hidden)
    results = {}
    for name in args.setups.split(","):
        finetune = {
            **SETUPS[name],
            "base_model": str(work / "base"),
            "student_name": f"smoke-{name}",
            "device": args.device,
            "max_steps": args.steps,
            "eval_steps": args.steps,
            "save_steps": args.steps,
            "logging_steps": 1,
            "max_length": 16384,
            "learning_rate": 5e-3,
            "lora_r": 16,
            "lora_alpha": 32,
        }
        payload = json.dumps({"data_root": str(root), "finetune": finetune, "eval_rows": args.eval_rows})
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, payload],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        r = (
            json.loads(lines[-1].removeprefix("RESULT "))
            if lines
            else {"ok": False, "error": f"exit {proc.returncode}", "traceback": proc.stderr[-3000:]}
        )
        r["process_s"] = round(time.perf_counter() - started, 1)
        results[name] = r
        if r["ok"]:
            print(
                f"{name:14s} ok   {r['backend']}/{r['device']} {r['steps']} steps, loss {r['first_loss']:.2f} -> "
                f"{r['last_loss']:.2f}, train {r['train_s']} s, memory est {r['estimate_gib']} GiB / peak "
                f"{r['peak_memory']}, schema compliance {r['schema_compliance']}"
            )
        else:
            print(f"{name:14s} FAIL {r['error']}")
    out = Path(args.out or ROOT / "bench" / "results" / f"smoke_finetune_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"device": args.device, "steps": args.steps, "hidden": args.hidden, "results": results},
            indent=2,
            default=str,
        )
        + "\n"
    )
    print(f"wrote {out}")
    if not all(r["ok"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
