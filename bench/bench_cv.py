"""Phase 1 benchmark: orchestration overhead, cached rerun, memory as the count grows.

Side by side in one run, on the same synthetic plans (annotation source):
  loop     - a plain Python loop over the builder (process_image), no Prefect
  flow     - the cv-batch flow: one mapped task per image on Prefect's embedded server
  rerun    - the same flow again: every topology is fresh, so no task runs
Memory: the flow alone in a fresh process per count, peak RSS of that process (ru_maxrss).

    .venv/bin/python bench/bench_cv.py --count 2000 --memory-counts 500,2000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _overrides(plans: Path, out: Path, concurrency: int) -> dict:
    return {
        "paths.data_root": str(out),
        "paths.image_dir": str(plans / "images"),
        "paths.annotation_dir": str(plans / "annotations"),
        "cv.concurrency": concurrency,
    }


def run_flow(plans: Path, out: Path, concurrency: int) -> tuple[float, dict]:
    from flows.cv_batch import cv_batch_with_concurrency

    start = time.perf_counter()
    report = cv_batch_with_concurrency(concurrency)(scope="all", overrides=_overrides(plans, out, concurrency))
    return time.perf_counter() - start, report


def warm_up() -> float:
    """Start the embedded server before timing anything (users pay this once per process)."""
    from prefect import flow

    @flow(name="bench-warm-up")
    def noop() -> int:
        return 1

    start = time.perf_counter()
    noop()
    return time.perf_counter() - start


def wait_for_idle_server(limit_s: float = 120.0) -> float:
    """Wait until the server has worked off the first run's events (a trivial flow runs fast)."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        if warm_up() < 0.5:
            break
        time.sleep(2)
    return time.perf_counter() - start


def run_loop(plans: Path, out: Path, stems: list[str]) -> float:
    from floorplan_ft.cv.runner import process_image
    from floorplan_ft.cv.sources import SourceConfig
    from floorplan_ft.store import ArtifactStore

    store = ArtifactStore(out)
    config = SourceConfig(image_dir=str(plans / "images"), annotation_dir=str(plans / "annotations"))
    start = time.perf_counter()
    for stem in stems:
        assert process_image(store, config, stem, force=True).status == "built"
    return time.perf_counter() - start


def memory_child(plans: Path, count: int, concurrency: int) -> None:
    """Run the flow over the first `count` plans in this process and print its peak RSS."""
    subset = Path(tempfile.mkdtemp(prefix=f"bench-cv-{count}-"))
    for kind in ("images", "annotations"):
        (subset / kind).mkdir()
        for path in sorted((plans / kind).iterdir())[:count]:
            (subset / kind / path.name).symlink_to(path)
    seconds, report = run_flow(subset, subset / "out", concurrency)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"count": count, "seconds": seconds, "built": report["built"], "peak_rss_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--memory-counts", default="500,2000")
    parser.add_argument("--plans", type=Path, help="reuse a synth directory")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cv.json")
    args = parser.parse_args()

    if args.memory_child:
        memory_child(args.plans, args.memory_child, args.concurrency)
        return

    from floorplan_ft.synth import write_dataset

    plans = args.plans or Path(tempfile.mkdtemp(prefix="bench-cv-plans-"))
    if not (plans / "images").is_dir():
        t = time.perf_counter()
        write_dataset(plans, count=args.count, complexes=40, seed=42)
        print(f"generated {args.count} plans in {time.perf_counter() - t:.1f} s → {plans}", flush=True)
    stems = sorted(p.stem for p in (plans / "images").iterdir())[: args.count]

    work = Path(tempfile.mkdtemp(prefix="bench-cv-out-"))
    print(f"server start: {warm_up():.1f} s (not counted)", flush=True)
    loop_s = run_loop(plans, work / "loop", stems)
    print(f"loop:  {loop_s:.2f} s", flush=True)
    flow_s, report = run_flow(plans, work / "flow", args.concurrency)
    assert report["built"] == len(stems), report
    print(f"flow:  {flow_s:.2f} s", flush=True)
    busy_rerun_s, rerun = run_flow(plans, work / "flow", args.concurrency)
    assert rerun["built"] == 0 and rerun["cached"] == len(stems), rerun
    print(f"rerun right after (server still busy): {busy_rerun_s:.2f} s", flush=True)
    settle_s = wait_for_idle_server()
    rerun_s, rerun = run_flow(plans, work / "flow", args.concurrency)
    assert rerun["built"] == 0 and rerun["cached"] == len(stems), rerun
    print(f"rerun once the server is idle ({settle_s:.0f} s later): {rerun_s:.2f} s", flush=True)

    memory = []
    for count in [int(c) for c in args.memory_counts.split(",") if c]:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--plans",
                str(plans),
                "--memory-child",
                str(count),
                "--concurrency",
                str(args.concurrency),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        memory.append(json.loads(out.stdout.strip().splitlines()[-1]))

    n = len(stems)
    result = {
        "count": n,
        "concurrency": args.concurrency,
        "loop_s": round(loop_s, 2),
        "flow_s": round(flow_s, 2),
        "overhead_ms_per_image": round((flow_s - loop_s) / n * 1000, 2),
        "rerun_s": round(rerun_s, 2),
        "rerun_right_after_s": round(busy_rerun_s, 2),
        "rerun_share_of_first": round(rerun_s / flow_s, 4),
        "memory": memory,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n| measure | value | target |\n|---|---|---|")
    print(f"| plain loop, {n} images | {loop_s:.2f} s ({loop_s / n * 1000:.1f} ms/image) | |")
    print(f"| mapped flow, {n} images | {flow_s:.2f} s ({flow_s / n * 1000:.1f} ms/image) | |")
    print(f"| orchestration overhead | {result['overhead_ms_per_image']} ms/image | ≤ 15 ms |")
    print(f"| cached rerun | {rerun_s:.2f} s = {result['rerun_share_of_first']:.1%} of the first run | ≤ 10% |")
    print(f"| cached rerun started while the server still digests the first run's events | {busy_rerun_s:.2f} s | |")
    for m in memory:
        print(f"| peak RSS, flow over {m['count']} images | {m['peak_rss_mb']:.0f} MB | flat |")


if __name__ == "__main__":
    main()
