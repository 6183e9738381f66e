"""Latency of the analysis service per stage (retrieval, llm, total, and the HTTP round trip):
p50/p95 over N `/analyze` requests, each a different synthetic plan, sent one at a time to
`ft-pipeline serve`'s app running on uvicorn on 127.0.0.1 (a real socket).

Providers (``--providers``, comma-separated):
  reference - the rule-based analyst (not an LLM): the service's own overhead, retrieval included
  tiny      - the demo student: a tiny random Qwen3 built here, schema-constrained by xgrammar on CPU
              (one torch thread). Valid JSON, meaningless text: it measures the mechanics, not a
              real student's speed
  settings  - whatever the settings/environment configure (LLM_PROVIDER, serving.*, retrieval.*):
              the real student on a GPU box
Retrieval for reference/tiny: the packaged MiniLM (``packaged:all-MiniLM-L6-v2``, 384 dims) on CPU;
``settings`` uses the configured embeddings. The corpus vectors are embedded once at start-up (not
timed); query vectors are cached per distinct query, as the service does (plans whose statistics
fall in the same criteria buckets share a query), and the JSON reports how many were distinct.

Here (CPU, 2 cores):
    .venv/bin/python bench/bench_service.py --requests 40

On a GPU box against the real student (target: total p95 <= 30 s per analysis):
    # in-process: the LoRA adapter (QLoRA on its 4-bit base) or merged weights
    LLM_PROVIDER=local FTP_SERVING__ADAPTER_PATH=/models/student/adapter \
    FTP_RETRIEVAL__DEVICE=cuda FTP_PATHS__DATA_ROOT=/data \
        python bench/bench_service.py --providers settings --requests 50 --warmup 2
    # or vLLM serving the merged student (`vllm serve /models/student/merged --port 8000`):
    # (served under its own name: say it was trained non-thinking)
    LLM_PROVIDER=openai-compatible FTP_SERVING__BASE_URL=http://127.0.0.1:8000/v1 \
    FTP_SERVING__ENABLE_THINKING=false \
        python bench/bench_service.py --providers settings --requests 50
    # the rollback path for comparison (costs money): LLM_PROVIDER=openai OPENAI_API_KEY=...
Add ``--profile production`` (or ``-c config.toml``) for the team's settings. The result is written
to ``bench/results/service.json`` (``--out``); compare runs only on the same machine.

``--limits`` measures instead whether the service stays up (issue 14), with the tiny models on CPU:
a 20 MB ``/analyze`` body (time to its 413, then a normal request), a local generation past
``serving.timeout_s`` (time to its 503, whether the generator is idle, time to serve the next
request), 10 concurrent requests against one slot and two queue places (how many 503 + Retry-After
and how fast), and SIGTERM to ``ft-pipeline serve`` during a generation (seconds to exit). Written
to ``bench/results/service_limits.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STAGES = ("retrieval_ms", "llm_ms", "total_ms", "http_ms")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summarise(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 50), 2),
        "p95": round(percentile(values, 95), 2),
        "mean": round(statistics.fmean(values), 2),
        "max": round(max(values), 2),
    }


def build_plans(count: int, seed: int) -> list[dict[str, Any]]:
    import numpy as np

    from floorplan_ft.cv import build_topology, detections_from_coco
    from floorplan_ft.synth import generate_plan, plan_to_coco

    plans = []
    for i in range(count):
        plan = generate_plan(np.random.default_rng([seed, i]), f"B{i % 9:02d}_{i:04d}")
        plans.append(build_topology(detections_from_coco(plan_to_coco(plan))).model_dump(mode="json"))
    return plans


def settings_for(provider: str, args: argparse.Namespace, work: Path):
    from floorplan_ft.settings import load_settings

    if provider == "settings":
        return load_settings(args.config, args.profile)
    common = {
        "paths": {"data_root": str(work / "data")},
        "retrieval": {"provider": "local", "model": "packaged:all-MiniLM-L6-v2", "dimensions": 384, "device": "cpu"},
    }
    if provider == "reference":
        return load_settings(**common, serving={"llm_provider": "reference"})
    if provider == "tiny":
        from floorplan_ft.training.tiny import bias_towards_short_json, build_tiny_causal_lm

        student = work / "tiny-student"
        if not (student / "config.json").is_file():
            model, tokenizer = build_tiny_causal_lm(student, seed=0)
            bias_towards_short_json(model, tokenizer, student)
        return load_settings(
            **common,
            serving={
                "llm_provider": "local",
                "adapter_path": str(student),
                "cpu_threads": 1,
                "max_new_tokens": 1500,
                "timeout_s": 120.0,
            },
        )
    raise SystemExit(f"unknown provider {provider!r}: use reference, tiny or settings")


def run_provider(provider: str, plans: list[dict], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import httpx

    from floorplan_ft.retrieval.retrieve import build_query
    from floorplan_ft.serving.api import create_app, serve_in_thread
    from floorplan_ft.serving.service import AnalysisService

    settings = settings_for(provider, args, work)
    started = time.perf_counter()
    service = AnalysisService(settings)
    warm = service.warm_up()  # model loads belong to start-up, not to the first request
    startup_s = time.perf_counter() - started
    health = service.health()
    samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
    tokens_in, tokens_out = [], []
    failures: dict[str, int] = {}
    with (
        serve_in_thread(create_app(service)) as base_url,
        httpx.Client(base_url=base_url, timeout=settings.serving.timeout_s + 30) as client,
    ):
        for i in range(args.warmup):
            client.post("/analyze", json={"topology": plans[i % len(plans)]})
        for plan in plans:
            t0 = time.perf_counter()
            response = client.post("/analyze", json={"topology": plan})
            http_ms = (time.perf_counter() - t0) * 1000.0
            if response.status_code != 200:
                key = f"{response.status_code} {response.json().get('error', '')}"
                failures[key] = failures.get(key, 0) + 1
                continue
            meta = response.json()["meta"]
            for stage in ("retrieval_ms", "llm_ms", "total_ms"):
                samples[stage].append(meta["timings"][stage])
            samples["http_ms"].append(http_ms)
            if meta.get("usage"):
                tokens_in.append(meta["usage"]["input_tokens"])
                tokens_out.append(meta["usage"]["output_tokens"])
    service.close()
    result: dict[str, Any] = {
        "provider": health["llm"]["provider"],
        "model": health["llm"]["model"],
        "is_llm": health["llm"]["is_llm"],
        "device": health["llm"].get("device"),
        "embeddings": health["embeddings"],
        "vector_store": health["vector_store"]["backend"],
        "requests": len(plans),
        "ok": len(samples["total_ms"]),
        "failures": failures,
        "warmup": args.warmup,
        "startup_s": round(startup_s, 2),
        "warm_up_s": warm,
        "distinct_queries": len({build_query(p["statistics"]) for p in plans}),
        "stages_ms": {stage: summarise(v) for stage, v in samples.items() if v},
    }
    if tokens_out:
        llm_s = sum(samples["llm_ms"]) / 1000.0
        result["tokens"] = {
            "input_mean": round(statistics.fmean(tokens_in)),
            "output_mean": round(statistics.fmean(tokens_out)),
            "output_tokens_per_s": round(sum(tokens_out) / llm_s, 1) if llm_s else None,
        }
    return result


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| provider | model | stage | p50 ms | p95 ms | mean ms | max ms |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        model = Path(r["model"]).name if r["provider"] == "local" else r["model"]
        label = r["provider"] + ("" if r["is_llm"] else " (rules, not an LLM)")
        for stage, s in r["stages_ms"].items():
            lines.append(
                f"| {label} | {model} | {stage.removesuffix('_ms')} | {s['p50']} | "
                f"{s['p95']} | {s['mean']} | {s['max']} |"
            )
    return "\n".join(lines)


def rambling_student(work: Path, context: int = 65536) -> Path:
    """The tiny random Qwen3 without the short-JSON bias: it decodes for minutes (a long request)."""
    from floorplan_ft.training.tiny import build_tiny_causal_lm

    student = work / "rambling-student"
    if not (student / "config.json").is_file():
        build_tiny_causal_lm(student, seed=0)
        config = json.loads((student / "config.json").read_text())
        config["max_position_embeddings"] = context
        (student / "config.json").write_text(json.dumps(config))
    return student


def run_limits(plans: list[dict], work: Path) -> dict[str, Any]:
    import signal
    import socket
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import torch

    from floorplan_ft.serving.api import create_app, serve_in_thread
    from floorplan_ft.serving.service import AnalysisService
    from floorplan_ft.settings import load_settings

    torch.set_num_threads(1)
    common = {
        "paths": {"data_root": str(work / "data")},
        "retrieval": {"provider": "local", "model": "packaged:all-MiniLM-L6-v2", "dimensions": 384, "device": "cpu"},
    }
    student = rambling_student(work)
    # A plan on which the rambling student does not stop by chance (the tests' sample plan 2).
    import numpy as np

    from floorplan_ft.cv import build_topology, detections_from_coco
    from floorplan_ft.synth import generate_plan, plan_to_coco

    long_plan = build_topology(
        detections_from_coco(plan_to_coco(generate_plan(np.random.default_rng([11, 2]), "C03_0002")))
    ).model_dump(mode="json")
    local = {"llm_provider": "local", "adapter_path": str(student), "cpu_threads": 1, "max_new_tokens": 40_000}
    out: dict[str, Any] = {}

    print("... limits: a 20 MB /analyze body", file=sys.stderr, flush=True)
    with (
        AnalysisService(load_settings(**common, serving={"llm_provider": "reference"})) as service,
        serve_in_thread(create_app(service)) as url,
        httpx.Client(base_url=url, timeout=120) as http,
    ):
        huge = json.dumps({"topology": {**plans[0], "padding": "x" * (20 * 1024 * 1024)}}).encode()
        t0 = time.perf_counter()
        big = http.post("/analyze", content=huge, headers={"content-type": "application/json"})
        big_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        after = http.post("/analyze", json={"topology": plans[1]})
        out["oversized_body"] = {
            "bytes": len(huge),
            "status": big.status_code,
            "error": big.json().get("error"),
            "seconds": round(big_s, 3),
            "next_status": after.status_code,
            "next_seconds": round(time.perf_counter() - t0, 3),
        }

    print("... limits: a local generation past serving.timeout_s", file=sys.stderr, flush=True)
    with AnalysisService(
        load_settings(**common, serving={**local, "timeout_s": 2.0, "chat_max_tokens": 16})
    ) as service:
        service.warm_up()
        with serve_in_thread(create_app(service)) as url, httpx.Client(base_url=url, timeout=300) as http:
            t0 = time.perf_counter()
            timed_out = http.post("/analyze", json={"topology": long_plan})
            timeout_s = time.perf_counter() - t0
            idle = service.client.generating is False
            t0 = time.perf_counter()
            from floorplan_ft.schemas import TopologyGraph
            from floorplan_ft.teachers.reference import reference_analysis

            analysis = reference_analysis("p.png", TopologyGraph.model_validate(plans[0]))
            service.timeout_s = 60.0
            chat = http.post("/chat", json={"analysis": analysis.model_dump(mode="json"), "question": "수납은?"})
            out["timed_out_generation"] = {
                "timeout_s": 2.0,
                "status": timed_out.status_code,
                "error": timed_out.json().get("error"),
                "seconds_to_503": round(timeout_s, 2),
                "generator_idle_after": idle,
                "next_status": chat.status_code,
                "next_seconds": round(time.perf_counter() - t0, 2),
            }

    print("... limits: 10 concurrent requests, 1 slot, 2 queue places", file=sys.stderr, flush=True)
    with AnalysisService(
        load_settings(**common, serving={**local, "timeout_s": 300.0, "max_concurrency": 1, "max_queue": 2})
    ) as service:
        service.warm_up()
        with serve_in_thread(create_app(service)) as url:

            def post(i: int):
                t0 = time.perf_counter()
                r = httpx.post(url + "/analyze", json={"topology": long_plan}, timeout=300)
                return r, time.perf_counter() - t0

            with ThreadPoolExecutor(10) as pool:
                futures = [pool.submit(post, i) for i in range(10)]
                deadline = time.monotonic() + 120
                while sum(f.done() for f in futures) < 7 and time.monotonic() < deadline:
                    time.sleep(0.05)
                early = [f.result() for f in futures if f.done()]
                gate = service.gate.describe()
                t0 = time.perf_counter()
                service.begin_shutdown()
                rest = [f.result() for f in futures]
                drain_s = time.perf_counter() - t0
        out["queue"] = {
            "sent": 10,
            "max_concurrency": 1,
            "max_queue": 2,
            "rejected_at_once": sum(r.status_code == 503 for r, _ in early),
            "max_seconds_to_503": round(max((e for _, e in early), default=0.0), 2),
            "retry_after": sorted({r.headers.get("retry-after") for r, _ in early}),
            "running_and_waiting": [gate["running"], gate["waiting"]],
            "drained_after_shutdown_s": round(drain_s, 2),
            "statuses": sorted(r.status_code for r, _ in rest),
        }

    print("... limits: SIGTERM to ft-pipeline serve during a generation", file=sys.stderr, flush=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FTP_", "LLM_", "EMBEDDING_"))}
    env.update(
        {
            "FTP_PATHS__DATA_ROOT": str(work / "data"),
            "LLM_PROVIDER": "local",
            "FTP_RETRIEVAL__PROVIDER": "local",
            "FTP_RETRIEVAL__MODEL": "packaged:all-MiniLM-L6-v2",
            "FTP_RETRIEVAL__DIMENSIONS": "384",
            "FTP_RETRIEVAL__DEVICE": "cpu",
            "FTP_SERVING__ADAPTER_PATH": str(student),
            "FTP_SERVING__MAX_NEW_TOKENS": "40000",
            "FTP_SERVING__TIMEOUT_S": "300",
            "FTP_SERVING__CPU_THREADS": "1",
        }
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "ft_pipeline.cli", "serve", "--port", str(port)],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(base + "/health", timeout=5)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("ft-pipeline serve did not come up") from None
                time.sleep(0.2)
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(httpx.post, base + "/analyze", json={"topology": long_plan}, timeout=300)
            while httpx.get(base + "/health", timeout=5).json()["limits"]["running"] < 1:
                time.sleep(0.1)
            time.sleep(1.0)
            t0 = time.perf_counter()
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=120)
            finally:
                exit_s = time.perf_counter() - t0
            response = long.result(timeout=30)
        out["sigterm"] = {
            "seconds_to_exit": round(exit_s, 2),
            "returncode": process.returncode,
            "in_flight_status": response.status_code,
            "in_flight_error": response.json().get("error"),
        }
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", default="reference,tiny")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--config", default=None, help="settings file (provider 'settings')")
    parser.add_argument("--profile", default=None, help="settings profile (provider 'settings')")
    parser.add_argument(
        "--out",
        default=None,
        help="result file (default bench/results/service.json, with --limits service_limits.json)",
    )
    parser.add_argument(
        "--limits",
        action="store_true",
        help="measure the size limit, timeout cancellation, queue bound and SIGTERM instead",
    )
    args = parser.parse_args()

    import torch

    plans = build_plans(args.requests, args.seed)
    if args.limits:
        with tempfile.TemporaryDirectory(prefix="ftp-bench-limits-") as tmp:
            report = {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "results": run_limits(plans, Path(tmp)),
            }
        print(json.dumps(report["results"], indent=2))
        out = Path(args.out or ROOT / "bench" / "results" / "service_limits.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {out}", file=sys.stderr)
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="ftp-bench-service-") as tmp:
        for provider in [p.strip() for p in args.providers.split(",") if p.strip()]:
            print(f"... {provider}: {args.requests} requests", file=sys.stderr, flush=True)
            results.append(run_provider(provider, plans, args, Path(tmp)))
    table = markdown(results)
    print(table)
    report = {
        "requests": args.requests,
        "seed": args.seed,
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "torch_threads_main_thread": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "results": results,
        "table": table,
    }
    out = Path(args.out or ROOT / "bench" / "results" / "service.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
