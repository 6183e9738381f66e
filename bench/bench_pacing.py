"""Phase 3 benchmark: pacing against a provider that announces no limits, and across a restart.

A local fake provider speaks Gemini's generateContent with a fixed latency, sends no rate-limit
headers and enforces a request limit per sliding 60 s window, answering a bare 429 (no
Retry-After) beyond it. Every client runs in its own process against its own server instance
(same settings); the rows of a scenario run side by side, (a) then (b), in one run:

  engine@60   floorplan_ft's LabelingRun with the Gemini defaults (60 requests/min)
  engine@500  the same, configured 500/min (an account whose real limit is below what we assume:
              the old default, and the case the issue measured)
  plan        the plan's fixed design: 5 in flight, no limiter, 60 s pause on a 429, <= 5 retries

(a) 60 rpm without headers, 120 items: 429s after the first minute, items lost, achieved rate /
    limit (mean number of accepted requests in the trailing 60 s, sampled every 0.5 s from the
    first minute to the last request, over the limit).
(b) Restart: 150 items; the process is killed with SIGKILL once 125 answers are on disk (past the
    second minute, when a limiter that guessed too high has learnt the real limit), and a new one
    starts at once on the same data root: 429s in the first 60 s after the restart.
    `engine@500, no history` deletes rate_window_gemini.json before the restart (what the
    limiter's memory is worth).

Targets: 0 items lost, >= 0.95 of the allowed rate, <= 2 x 429 after a restart.

    .venv/bin/python bench/bench_pacing.py            # ~6 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

KEY = "bench-placeholder-not-a-key-0123456789"
WINDOW = 60.0


# ------------------------------------------------------------------------------ the child process


def make_items(n: int):
    from floorplan_ft.teachers.labeling import LabelItem

    return [
        LabelItem(
            f"P{i:05d}",
            f"P{i:05d}.png",
            [
                {"role": "system", "content": "평면도 분석가"},
                {"role": "user", "content": f"P{i:05d}.png 를 분석하세요."},
            ],
        )
        for i in range(n)
    ]


def child(args: argparse.Namespace) -> None:
    """One labeling process: the engine or the plan's design, on `args.root`."""
    import asyncio

    from floorplan_ft.settings import load_settings
    from floorplan_ft.store import ArtifactStore
    from floorplan_ft.teachers.factory import make_teacher
    from floorplan_ft.teachers.labeling import LabelingRun

    items = make_items(args.items)
    settings = load_settings(
        teachers={
            "concurrency": 5,
            "budget_usd": 1e9,
            **({"limits": {"gemini": {"requests_per_minute": args.rpm}}} if args.rpm else {}),
        },
        gemini_api_key=KEY,
        gemini_base_url=args.url,
    )
    store = ArtifactStore(args.root)
    if args.design == "engine":
        summary = asyncio.run(LabelingRun(make_teacher(settings, "gemini"), store, settings.teachers).run(items))
        print(
            json.dumps(
                {
                    "labeled": summary.labeled,
                    "cached": summary.cached,
                    "failed": summary.failed,
                    "failures": {k: v["reason"] for k, v in summary.failures.items()},
                }
            ),
            flush=True,
        )
        return

    from floorplan_ft.providers.base import RateLimitError
    from floorplan_ft.schemas import FloorPlanAnalysis

    done_dir = Path(args.root) / "plan_done"
    done_dir.mkdir(parents=True, exist_ok=True)
    teacher = make_teacher(settings, "gemini")

    async def main() -> None:
        sem = asyncio.Semaphore(5)

        async def one(item) -> None:
            if (done_dir / item.stem).exists():
                return
            async with sem:
                for _ in range(1 + 5):  # the plan: retry <= 5 times, a fixed 60 s pause on a 429
                    try:
                        await teacher.client.achat(item.messages, FloorPlanAnalysis, max_tokens=4096)
                        (done_dir / item.stem).write_text("ok")
                        return
                    except RateLimitError:
                        await asyncio.sleep(60)
                (done_dir / f"{item.stem}.lost").write_text("rate_limited")

        await asyncio.gather(*(one(i) for i in items))
        await teacher.aclose()

    asyncio.run(main())


# ------------------------------------------------------------------------------ the parent


def answers(root: Path, design: str) -> int:
    if design == "plan":
        return sum(1 for p in (root / "plan_done").glob("P*") if not p.name.endswith(".lost"))
    return sum(1 for _ in (root / "output").glob("*/llm_analysis_gemini.meta.json"))


def spawn(design: str, rpm: int | None, items: int, url: str, root: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--design",
        design,
        "--items",
        str(items),
        "--url",
        url,
        "--root",
        str(root),
    ] + (["--rpm", str(rpm)] if rpm else [])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FTP_", "GEMINI", "GOOGLE", "OPENAI"))}
    return subprocess.Popen(cmd, cwd=root.parent, env=env, stdout=subprocess.PIPE, text=True)


def server(limit: int, latency: float):
    from fakes.provider_server import FakeProviderServer

    fake = FakeProviderServer().start()
    fake.rate_limit_headers = {}
    fake.rpm_limit, fake.rpm_retry_after, fake.latency_s = limit, False, latency
    return fake


def accepted_times(fake) -> list[float]:
    return sorted(r.at for r in fake.requests if r.method == "POST" and not r.rejected)


def occupancy(times: list[float], start: float, limit: int) -> float | None:
    """Mean accepted requests in the trailing window, from start + window to the last request."""
    end = times[-1] if times else start
    t, samples = start + WINDOW, []
    while t <= end:
        samples.append(sum(1 for u in times if t - WINDOW < u <= t))
        t += 0.5
    return round(sum(samples) / len(samples) / limit, 3) if samples else None


def scenario_a(name: str, design: str, rpm: int | None, items: int, limit: int, latency: float, out: dict) -> None:
    fake = server(limit, latency)
    root = Path(tempfile.mkdtemp(prefix=f"pacing-a-{name}-")) / "data"
    root.mkdir(parents=True)
    start = time.monotonic()
    proc = spawn(design, rpm, items, fake.gemini_base_url, root)
    stdout, _ = proc.communicate(timeout=900)
    wall = time.monotonic() - start
    times = accepted_times(fake)
    first = min([r.at for r in fake.requests] or [start])
    done = answers(root, design)
    out[name] = {
        "wall_s": round(wall, 1),
        "requests": fake.request_count,
        "rejected_429": len(fake.rejected_429),
        "rejected_429_first_minute": sum(1 for t in fake.rejected_429 if t - first < WINDOW),
        "rejected_429_after_first_minute": sum(1 for t in fake.rejected_429 if t - first >= WINDOW),
        "items": items,
        "answered": done,
        "lost": items - done,
        "achieved_over_allowed": occupancy(times, first, limit),
        "child": stdout.strip().splitlines()[-1] if stdout.strip() else None,
    }
    fake.stop()
    print(f"(a) {name}: {json.dumps(out[name])}", flush=True)


def scenario_b(
    name: str,
    design: str,
    rpm: int | None,
    items: int,
    limit: int,
    latency: float,
    kill_at: int,
    keep_history: bool,
    out: dict,
) -> None:
    fake = server(limit, latency)
    root = Path(tempfile.mkdtemp(prefix=f"pacing-b-{name}-")) / "data"
    root.mkdir(parents=True)
    first = spawn(design, rpm, items, fake.gemini_base_url, root)
    deadline = time.monotonic() + 600
    while answers(root, design) < kill_at and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_with = answers(root, design)
    history = root / "rate_window_gemini.json"
    if not keep_history:
        history.unlink(missing_ok=True)
    restart = time.monotonic()
    before = len(fake.rejected_429)
    second = spawn(design, rpm, items, fake.gemini_base_url, root)
    second.communicate(timeout=900)
    after = fake.rejected_429[before:]
    done = answers(root, design)
    out[name] = {
        "items": items,
        "killed_with_answers": killed_with,
        "history_kept": keep_history,
        "rejected_429_before_restart": before,
        "rejected_429_first_60s_after_restart": sum(1 for t in after if t - restart < WINDOW),
        "rejected_429_after_restart": len(after),
        "answered": done,
        "lost": items - done,
        "wall_after_restart_s": round(time.monotonic() - restart, 1),
    }
    fake.stop()
    print(f"(b) {name}: {json.dumps(out[name])}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--design", default="engine")
    parser.add_argument("--url")
    parser.add_argument("--root")
    parser.add_argument("--rpm", type=int, default=None)
    parser.add_argument("--items", type=int, default=120)
    parser.add_argument("--limit", type=int, default=60, help="the provider's requests per 60 s")
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--restart-items", type=int, default=150)
    parser.add_argument("--kill-at", type=int, default=125, help="answers on disk when the first process is killed")
    parser.add_argument("--only", choices=["a", "b"], help="run one scenario")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pacing.json")
    args = parser.parse_args()
    if args.child:
        return child(args)

    rows_a = {"engine@60": ("engine", None), "engine@500": ("engine", 500), "plan": ("plan", None)}
    rows_b = {
        "engine@60": ("engine", None, True),
        "engine@500": ("engine", 500, True),
        "engine@500, no history": ("engine", 500, False),
        "plan": ("plan", None, True),
    }
    a: dict = {}
    b: dict = {}
    group_a = [
        threading.Thread(target=scenario_a, args=(n, d, r, args.items, args.limit, args.latency, a))
        for n, (d, r) in rows_a.items()
    ]
    group_b = [
        threading.Thread(
            target=scenario_b, args=(n, d, r, args.restart_items, args.limit, args.latency, args.kill_at, keep, b)
        )
        for n, (d, r, keep) in rows_b.items()
    ]
    started = time.monotonic()
    groups = {"a": [group_a], "b": [group_b]}.get(args.only, [group_a, group_b])
    for group in groups:  # the rows of one scenario side by side, the scenarios in turn
        for t in group:
            t.start()
        for t in group:
            t.join()
    result = {
        "provider": {"limit_per_60s": args.limit, "latency_s": args.latency, "headers": "none", "retry_after": "none"},
        "a_no_headers": a,
        "b_restart": b,
        "restart_items": args.restart_items,
        "kill_at": args.kill_at,
        "bench_wall_s": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")

    print(f"\n(a) {args.limit} rpm without headers, {args.items} items, {args.latency} s latency\n")
    print("| design | 429s in the 1st minute | 429s after it | items lost | achieved / allowed rate | wall |")
    print("|---|---|---|---|---|---|")
    for name, r in a.items():
        print(
            f"| {name} | {r['rejected_429_first_minute']} | {r['rejected_429_after_first_minute']} | "
            f"{r['lost']} | {r['achieved_over_allowed']} | {r['wall_s']:.0f} s |"
        )
    print(f"\n(b) restart: {args.restart_items} items, SIGKILL at {args.kill_at} answers, restarted at once\n")
    print("| design | 429s before the kill | 429s in the 60 s after the restart | items lost |")
    print("|---|---|---|---|")
    for name, r in b.items():
        print(
            f"| {name} | {r['rejected_429_before_restart']} | {r['rejected_429_first_60s_after_restart']} | "
            f"{r['lost']} |"
        )
    return None


if __name__ == "__main__":
    main()
