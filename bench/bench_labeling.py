"""Phase 3 benchmark: labeling against a rate-limited provider, ours vs the plan's fixed design.

A local server speaks OpenAI's chat completions with a fixed latency and enforces a request limit
per sliding minute (429 + Retry-After beyond it), announcing that limit in x-ratelimit headers as
OpenAI does. Two clients label the same items side by side in one run:

  engine - floorplan_ft's LabelingRun: 5 in flight, a client-side limiter that starts from the
           settings (500/min) and adopts the limit the headers announce
  plan   - the first plan's design: 5 in flight, no limiter, a 60 s pause on HTTP 429

Reported: achieved rate over the allowed rate (target >= 0.9), 429s received after the first
minute (target 0), wall time of each.

    .venv/bin/python bench/bench_labeling.py --items 500 --latency 2 --rpm 120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fakes.provider_server import FakeProviderServer

from floorplan_ft.providers.base import RateLimitError
from floorplan_ft.providers.openai_client import OpenAIChatClient
from floorplan_ft.schemas import FloorPlanAnalysis
from floorplan_ft.settings import load_settings
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.labeling import LabelingRun, LabelItem, LLMTeacher

KEY = "bench-placeholder-not-a-key"


def make_items(n: int, tag: str) -> list[LabelItem]:
    return [
        LabelItem(
            f"{tag}{i:05d}",
            f"{tag}{i:05d}.png",
            [
                {"role": "system", "content": "평면도 분석가"},
                {"role": "user", "content": f"{tag}{i:05d}.png 를 분석하세요."},
            ],
        )
        for i in range(n)
    ]


def configure(server: FakeProviderServer, latency: float, rpm: int) -> None:
    server.reset()
    server.latency_s = latency
    server.rpm_limit = rpm
    server.rate_limit_headers = {
        "x-ratelimit-limit-requests": str(rpm),
        "x-ratelimit-remaining-requests": str(rpm - 1),
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "10000000",
        "x-ratelimit-remaining-tokens": "9999000",
        "x-ratelimit-reset-tokens": "1s",
    }


def rejected_after_first_minute(server: FakeProviderServer, start: float) -> int:
    return sum(1 for t in server.rejected_429 if t - start >= 60.0)


def steady_rate_per_min(server: FakeProviderServer, start: float) -> float | None:
    """Accepted requests per minute after the first minute (a sliding window lets the first
    minute's full allowance go at once, which flatters any whole-run average)."""
    times = sorted(r.at for r in server.requests if r.method == "POST" and not r.rejected and r.at - start >= 60.0)
    if len(times) < 2:
        return None
    return (len(times) - 1) / (times[-1] - times[0]) * 60.0


def run_engine(server: FakeProviderServer, items: list[LabelItem], root: Path) -> dict:
    settings = load_settings(
        teachers={"concurrency": 5, "requests_per_minute": 500, "tokens_per_minute": 10_000_000, "budget_usd": 1e9}
    )
    client = OpenAIChatClient("gpt-4o", api_key=KEY, base_url=server.openai_base_url, timeout_s=60)
    teacher = LLMTeacher("openai", client, 0.2)
    start_mono, start = time.monotonic(), time.perf_counter()
    summary = asyncio.run(LabelingRun(teacher, ArtifactStore(root), settings.teachers).run(items))
    wall = time.perf_counter() - start
    assert summary.labeled == len(items), summary
    return {
        "wall_s": wall,
        "requests": server.request_count,
        "rejected_429": len(server.rejected_429),
        "rejected_429_after_first_minute": rejected_after_first_minute(server, start_mono),
        "steady_per_min": steady_rate_per_min(server, start_mono),
    }


def run_plan_design(server: FakeProviderServer, items: list[LabelItem]) -> dict:
    client = OpenAIChatClient("gpt-4o", api_key=KEY, base_url=server.openai_base_url, timeout_s=60)

    async def main() -> None:
        sem = asyncio.Semaphore(5)

        async def one(item: LabelItem) -> None:
            async with sem:
                while True:
                    try:
                        await client.achat(item.messages, FloorPlanAnalysis)
                        return
                    except RateLimitError:
                        await asyncio.sleep(60)  # the plan: a fixed 60 s pause on HTTP 429

        await asyncio.gather(*(one(i) for i in items))
        await client.aclose()

    start_mono, start = time.monotonic(), time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "requests": server.request_count,
        "rejected_429": len(server.rejected_429),
        "rejected_429_after_first_minute": rejected_after_first_minute(server, start_mono),
        "steady_per_min": steady_rate_per_min(server, start_mono),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--latency", type=float, default=2.0)
    parser.add_argument("--rpm", type=int, default=120)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "labeling.json")
    args = parser.parse_args()

    results = {}
    with FakeProviderServer() as server:
        configure(server, args.latency, args.rpm)
        results["engine"] = run_engine(server, make_items(args.items, "E"), Path(tempfile.mkdtemp()))
        print("engine:", json.dumps(results["engine"]), flush=True)
        time.sleep(61)  # let the provider's window empty before the second client starts
        configure(server, args.latency, args.rpm)
        results["plan"] = run_plan_design(server, make_items(args.items, "P"))
        print("plan:  ", json.dumps(results["plan"]), flush=True)

    ideal_s = max(args.items / args.rpm * 60.0, 0.0)
    for r in results.values():
        r["achieved_over_allowed"] = (r["steady_per_min"] or 0.0) / args.rpm
    out = {"items": args.items, "latency_s": args.latency, "rpm_limit": args.rpm, "ideal_wall_s": ideal_s, **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    e, p = results["engine"], results["plan"]
    print(f"\n{args.items} items, {args.latency} s latency, provider limit {args.rpm}/min (ideal {ideal_s:.0f} s)\n")
    print(
        "| design | wall time | achieved / allowed rate (after the 1st minute) | requests | 429s | 429s after 1st minute |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in (("engine (limiter + headers)", e), ("plan (5 fixed, 60 s pause)", p)):
        print(
            f"| {name} | {r['wall_s']:.0f} s | {r['achieved_over_allowed']:.2f} | {r['requests']} | "
            f"{r['rejected_429']} | {r['rejected_429_after_first_minute']} |"
        )
    print(f"\nengine wall time / plan wall time: {e['wall_s'] / p['wall_s']:.2f}")


if __name__ == "__main__":
    main()
