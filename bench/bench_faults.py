"""Phase 3 benchmark: completeness under faults and the books after kill -9.

One local fake provider (tests/fakes/provider_server.py) answers OpenAI chat completions; a seeded
fault mix (tests/fakes/faults.py) turns each request, independently, into a 429 (Retry-After 1 s),
a 500, an answer that is not JSON or an answer cut at the token limit. Side by side in one run, on
the same server and the same seeded mix:

  engine - LabelingRun with its defaults: invalid answers get up to 4 more attempts (re-ask quoting
           the error, the re-ask with a larger budget, then fresh asks), cut answers up to 3 (a
           larger budget each time, then fresh asks), per-item caps on attempts and dollars
  plan   - the plan's fixed design, as settings of the same engine: one re-ask
           (max_invalid_attempts=1), one larger budget (max_truncated_attempts=1)

Reported per design: items labeled, requests the server received, repaid answers (valid answers the
server produced for an item that already had one). Then kill -9 and restart (engine only; the fixed
design's ledger booked attempts only after they finished): a subprocess labels against a slow server
and is SIGKILLed mid-run; the ledger's request count (replayed from its write-ahead journal) is
compared with the requests the server received, and a restarted run finishes the items.

    .venv/bin/python bench/bench_faults.py --items 300 --seed 14

The fault mix's 429s are random, not a real per-minute limit: the provider announces roomy limits in
its headers and (where the limiter has the setting) teachers.rate_window_s is 1 s, so the adaptive
limiter recovers from each 429 within seconds; pacing is measured by bench_labeling.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fakes.faults import FaultMix
from fakes.provider_server import FakeProviderServer

from floorplan_ft.settings import TeacherSettings, load_settings
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.factory import make_teacher
from floorplan_ft.teachers.labeling import CostLedger, LabelingRun, LabelItem

KEY = "bench-placeholder-not-a-key"
ROOMY_HEADERS = {
    "x-ratelimit-limit-requests": "100000",
    "x-ratelimit-remaining-requests": "99999",
    "x-ratelimit-reset-requests": "1ms",
    "x-ratelimit-limit-tokens": "100000000",
    "x-ratelimit-remaining-tokens": "99999000",
    "x-ratelimit-reset-tokens": "1ms",
}
WINDOW = {"rate_window_s": 1.0} if "rate_window_s" in TeacherSettings.model_fields else {}
BASE = {"concurrency": 5, "requests_per_minute": 100_000, "tokens_per_minute": 100_000_000, "budget_usd": 1e6, **WINDOW}
PLAN = {"max_invalid_attempts": 1, "max_truncated_attempts": 1}


def make_items(n: int, tag: str) -> list[LabelItem]:
    return [
        LabelItem(
            f"{tag}{i:05d}",
            f"{tag}{i:05d}.png",
            [
                {"role": "system", "content": "평면도 분석가입니다."},
                {"role": "user", "content": f"{tag}{i:05d}.png 평면을 분석하세요."},
            ],
        )
        for i in range(n)
    ]


def settings(server: FakeProviderServer, **teachers):
    return load_settings(teachers={**BASE, **teachers}, openai_api_key=KEY, openai_base_url=server.openai_base_url)


def fault_run(server: FakeProviderServer, design: str, n: int, seed: int, root: Path) -> dict:
    server.reset()
    server.rate_limit_headers = dict(ROOMY_HEADERS)
    mix = FaultMix(seed=seed, retry_after=1).install(server)
    cfg = settings(server, **(PLAN if design == "plan" else {}))
    store = ArtifactStore(root / design)
    items = make_items(n, "F")
    start = time.perf_counter()
    summary = asyncio.run(LabelingRun(make_teacher(cfg, "openai"), store, cfg.teachers).run(items))
    wall = time.perf_counter() - start
    ledger = store.read_json(store.path("cost_ledger_openai.json"))
    return {
        "design": design,
        "items": n,
        "labeled": summary.labeled,
        "failed": summary.failed,
        "failure_reasons": dict(Counter(f["reason"] for f in summary.failures.values())),
        "requests": len(server.requests_to("chat/completions")),
        "ledger_requests": ledger["requests"],
        "faults_drawn": dict(mix.drawn),
        "repaid_answers": mix.repaid,
        "reasked": summary.reasked,
        "larger_budget": summary.larger_budget,
        "fresh_asks": summary.fresh_asks,
        "cost_usd": summary.cost_usd,
        "wall_s": round(wall, 1),
    }


KILLED = """
import asyncio, sys
sys.path[:0] = {paths!r}
from bench_faults import BASE, make_items
from floorplan_ft.settings import load_settings
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.factory import make_teacher
from floorplan_ft.teachers.labeling import LabelingRun
cfg = load_settings(teachers=BASE, openai_api_key={key!r}, openai_base_url={url!r})
store = ArtifactStore({root!r})
asyncio.run(LabelingRun(make_teacher(cfg, "openai"), store, cfg.teachers).run(make_items({n}, "K")))
"""


def kill_run(server: FakeProviderServer, n: int, kill_after: int, latency: float, trial: int, root: Path) -> dict:
    server.reset()
    server.rate_limit_headers = dict(ROOMY_HEADERS)
    mix = FaultMix(seed=trial, rate_limited=0, server_error=0, invalid_json=0, truncated=0).install(server)
    server.latency_s = latency
    store = ArtifactStore(root / f"kill{trial}")
    items = make_items(n, "K")
    script = root / f"killed{trial}.py"
    script.write_text(
        textwrap.dedent(
            KILLED.format(
                paths=[str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")],
                key=KEY,
                url=server.openai_base_url,
                root=str(store.root),
                n=n,
            )
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], cwd=root, env={**os.environ, "PYTHONPATH": ""})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if sum(os.path.exists(store.layout.analysis_meta(i.stem, "openai")) for i in items) >= kill_after:
            break
        time.sleep(0.01)
    time.sleep(latency / 3)  # mid-request for the next ones
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(latency + 0.2)  # the server has recorded everything sent
    answered_at_kill = sum(os.path.exists(store.layout.analysis_meta(i.stem, "openai")) for i in items)
    server_at_kill = len(server.requests_to("chat/completions"))
    ledger = CostLedger(store, "openai")
    at_kill = {
        "ledger_requests": ledger.totals["requests"],
        "server_requests": server_at_kill,
        "unsettled": ledger.unsettled_requests,
        "answered": answered_at_kill,
    }
    server.latency_s = 0.0
    cfg = settings(server)
    summary = asyncio.run(LabelingRun(make_teacher(cfg, "openai"), store, cfg.teachers).run(items))
    view = store.read_json(store.path("cost_ledger_openai.json"))
    return {
        "trial": trial,
        "items": n,
        "at_kill": at_kill,
        "after_restart": {
            "labeled_or_cached": summary.labeled + summary.cached,
            "ledger_requests": view["requests"],
            "server_requests": len(server.requests_to("chat/completions")),
            "possibly_paid_twice": view["possibly_paid_twice"],
            "repaid_on_server": mix.repaid,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--kill-items", type=int, default=60)
    parser.add_argument("--kill-after", type=int, default=20, help="answers stored before the SIGKILL")
    parser.add_argument("--latency", type=float, default=0.5, help="server latency (s) in the kill runs")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument(
        "--window",
        type=float,
        default=1.0,
        help="teachers.rate_window_s of the fault runs (60: the providers' real minute)",
    )
    parser.add_argument("--no-kill", action="store_true", help="only the fault runs")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "faults.json"))
    args = parser.parse_args()
    out = Path(args.out).resolve()
    os.chdir(tempfile.mkdtemp(prefix="bench-faults-cwd-"))  # no .env of the developer's
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp, FakeProviderServer() as server:
        root = Path(tmp)
        WINDOW["rate_window_s"] = BASE["rate_window_s"] = args.window
        designs = [fault_run(server, d, args.items, args.seed, root) for d in ("engine", "plan")]
        kills = (
            []
            if args.no_kill
            else [
                kill_run(server, args.kill_items, args.kill_after, args.latency, t, root)
                for t in range(1, args.trials + 1)
            ]
        )
    result = {
        "bench": "faults",
        "items": args.items,
        "seed": args.seed,
        "rate_window_s": args.window,
        "fault_mix": {
            "rate_limited": 0.10,
            "server_error": 0.05,
            "invalid_json": 0.05,
            "truncated": 0.05,
            "retry_after_s": 1,
        },
        "settings": {"engine": BASE, "plan": {**BASE, **PLAN}},
        "fault_runs": designs,
        "kill_runs": kills,
        "targets": {
            "engine_all_labeled": designs[0]["labeled"] == args.items,
            "ledger_ge_server_at_kill": all(
                k["at_kill"]["ledger_requests"] >= k["at_kill"]["server_requests"] for k in kills
            ),
            "paid_twice_reported": all(
                k["after_restart"]["possibly_paid_twice"] >= k["after_restart"]["repaid_on_server"] for k in kills
            ),
        },
    }
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print("| design | labeled | failed | requests | repaid answers | re-asks / larger budget / fresh | wall s |")
    print("|---|---|---|---|---|---|---|")
    for d in designs:
        print(
            f"| {d['design']} | {d['labeled']}/{d['items']} | {d['failed']} {d['failure_reasons'] or ''} | "
            f"{d['requests']} | {d['repaid_answers']} | {d['reasked']} / {d['larger_budget']} / {d['fresh_asks']} | "
            f"{d['wall_s']} |"
        )
    print()
    print(
        "| kill trial | answered at kill | server requests | ledger requests | unsettled | after restart: "
        "labeled | ledger / server requests | possibly paid twice | repaid on server |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for k in kills:
        a, r = k["at_kill"], k["after_restart"]
        print(
            f"| {k['trial']} | {a['answered']} | {a['server_requests']} | {a['ledger_requests']} | {a['unsettled']} | "
            f"{r['labeled_or_cached']}/{k['items']} | {r['ledger_requests']} / {r['server_requests']} | "
            f"{r['possibly_paid_twice']} | {r['repaid_on_server']} |"
        )
    print(json.dumps(result["targets"]))


if __name__ == "__main__":
    main()
