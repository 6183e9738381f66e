"""The write-ahead cost ledger: every attempt's worst case is on disk before its request leaves, so a
run killed with SIGKILL leaves nothing the provider may have billed out of the books."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fakes.faults import FaultMix
from test_labeling import OPENAI_KEY, ROOMY_HEADERS, gpt4o, settings_for, synthetic_items

from floorplan_ft.providers.base import Usage
from floorplan_ft.settings import load_settings
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.factory import make_teacher
from floorplan_ft.teachers.labeling import (
    CostLedger,
    LabelingRun,
    cost_usd,
    messages_tokens,
)


def journal_lines(store: ArtifactStore, teacher: str) -> list[dict]:
    return [json.loads(line) for line in Path(store.layout.cost_journal(teacher)).read_text().splitlines()]


def test_an_attempt_never_settled_stays_counted_at_its_worst_case(tmp_path):
    store = ArtifactStore(tmp_path)
    first = CostLedger(store, "openai")
    first.begin("A", 0.50, 1000, 4096)  # in flight when the process dies
    b = first.begin("B", 0.25, 1000, 4096)
    first.settle(b, "B", Usage(input_tokens=120, output_tokens=45), 0.01, ok=True)
    del first  # no flush, no settle: as after kill -9

    second = CostLedger(store, "openai")
    assert second.totals == {"requests": 2, "input_tokens": 1120, "output_tokens": 4141, "cost_usd": 0.51}
    assert second.unsettled_requests == second.recovered_unsettled == 1
    view = store.read_json(store.layout.cost_ledger("openai"))  # the JSON view is rewritten on open
    assert (view["requests"], view["cost_usd"], view["unsettled_requests"]) == (2, 0.51, 1)
    assert view["unsettled_cost_usd"] == 0.5 and view["possibly_paid_twice"] == 0
    # A later answer for A may be A's second paid one; one for B (settled) is not.
    a = second.begin("A", 0.50, 1000, 4096)
    assert second.totals["requests"] == 3 and second.spent == pytest.approx(1.01)  # in flight: worst case
    second.settle(a, "A", Usage(input_tokens=120, output_tokens=45), 0.01, ok=True)
    again = second.begin("B", 0.25, 1000, 4096)
    second.settle(again, "B", Usage(input_tokens=120, output_tokens=45), 0.01, ok=True)
    second.flush()
    assert second.possibly_paid_twice == 1
    assert second.spent == pytest.approx(0.53)

    # The journal is the truth: any later reader replays to the same figures.
    third = CostLedger(store, "openai")
    assert third.possibly_paid_twice == 1 and third.unsettled_requests == 1
    assert third.totals["requests"] == 4 and third.spent == pytest.approx(0.53)
    assert [r["op"] for r in journal_lines(store, "openai")] == [
        "start",
        "start",
        "settle",
        "start",
        "settle",
        "start",
        "settle",
    ]


def test_a_ledger_from_before_the_journal_and_batch_bookings(tmp_path):
    store = ArtifactStore(tmp_path)
    store.write_json(
        store.layout.cost_ledger("gemini"),
        {"teacher": "gemini", "requests": 7, "input_tokens": 700, "output_tokens": 300, "cost_usd": 1.5},
    )
    ledger = CostLedger(store, "gemini")
    assert ledger.totals == {"requests": 7, "input_tokens": 700, "output_tokens": 300, "cost_usd": 1.5}
    ledger.add(Usage(input_tokens=10, output_tokens=5), 0.25, requests=3)  # the batch runner's way
    view = store.read_json(store.layout.cost_ledger("gemini"))
    assert (view["requests"], view["input_tokens"], view["cost_usd"]) == (10, 710, 1.75)
    assert CostLedger(store, "gemini").spent == pytest.approx(1.75)  # seeded once, not twice


def test_a_broken_journal_line_is_skipped_not_fatal(tmp_path, caplog):
    store = ArtifactStore(tmp_path)
    ledger = CostLedger(store, "openai")
    ledger.settle(ledger.begin("A", 0.1, 10, 10), "A", Usage(input_tokens=1, output_tokens=1), 0.02)
    with open(store.layout.cost_journal("openai"), "a") as fh:
        fh.write("{not json\n")
    ledger.settle(ledger.begin("B", 0.1, 10, 10), "B", None, 0.0)
    with caplog.at_level("WARNING"):
        reread = CostLedger(store, "openai")
    assert reread.totals["requests"] == 2 and reread.spent == pytest.approx(0.02)
    assert "journal.jsonl" in caplog.text and "not JSON" in caplog.text


def test_an_object_store_root_keeps_the_same_books(tmp_path):
    store = ArtifactStore(f"memory://ledger-{os.getpid()}-{time.time_ns()}")
    ledger = CostLedger(store, "openai")
    ledger.begin("A", 0.5, 100, 100)
    ledger.settle(ledger.begin("B", 0.5, 100, 100), "B", Usage(input_tokens=5, output_tokens=5), 0.01, ok=True)
    other = CostLedger(store, "openai")
    assert other.totals["requests"] == 2 and other.spent == pytest.approx(0.51) and other.unsettled_requests == 1
    other.settle(other.begin("A", 0.5, 100, 100), "A", None, 0.01, ok=True)
    assert CostLedger(store, "openai").possibly_paid_twice == 1


class CountingStore(ArtifactStore):
    def __init__(self, root):
        super().__init__(root)
        self.json_writes: list[str] = []

    def write_json(self, path, obj, **kw):
        self.json_writes.append(path)
        return super().write_json(path, obj, **kw)


def test_each_attempt_costs_two_journal_lines_not_a_file_rewrite(fake_provider, tmp_path, no_dotenv):
    fake_provider.rate_limit_headers = dict(ROOMY_HEADERS)
    store = CountingStore(tmp_path / "data")
    settings = settings_for(fake_provider, concurrency=4)
    run = LabelingRun(make_teacher(settings, "openai"), store, settings.teachers)
    summary = asyncio.run(run.run(synthetic_items(60, "W")))
    assert summary.labeled == 60
    lines = journal_lines(store, "openai")
    assert len(lines) == 2 * summary.requests
    starts = {r["id"] for r in lines if r["op"] == "start"}
    assert starts == {r["id"] for r in lines if r["op"] == "settle"}
    views = [p for p in store.json_writes if p == store.layout.cost_ledger("openai")]
    assert len(views) <= 2 + summary.seconds / CostLedger.VIEW_INTERVAL_S + 1  # open, at most 1/s, the end


KILLED = """
import asyncio, sys
sys.path[:0] = {paths!r}
from test_labeling import synthetic_items
from floorplan_ft.settings import load_settings
from floorplan_ft.store import ArtifactStore
from floorplan_ft.teachers.factory import make_teacher
from floorplan_ft.teachers.labeling import LabelingRun
settings = load_settings(teachers={{"concurrency": 4, "requests_per_minute": 100000,
                                    "tokens_per_minute": 100000000}},
                         openai_api_key={key!r}, openai_base_url={url!r})
store = ArtifactStore({root!r})
asyncio.run(LabelingRun(make_teacher(settings, "openai"), store, settings.teachers).run(synthetic_items(16, "K")))
"""


def test_kill_9_leaves_no_billed_request_unrecorded_and_the_cap_holds(fake_provider, tmp_path, no_dotenv):
    mix = FaultMix(seed=1, rate_limited=0, server_error=0, invalid_json=0, truncated=0).install(fake_provider)
    fake_provider.latency_s = 0.5
    fake_provider.rate_limit_headers = dict(ROOMY_HEADERS)
    # Long answers to short prompts: each costs most of its worst case (the full 4,096-token budget).
    fake_provider.usage = {"prompt_tokens": 30, "completion_tokens": 3000, "cached_tokens": 0, "reasoning_tokens": 0}
    per_answer = gpt4o(30, 3000)
    root = tmp_path / "data"
    store = ArtifactStore(root)
    items = synthetic_items(16, "K")
    here = Path(__file__).resolve().parents[2]
    script = tmp_path / "killed.py"
    script.write_text(
        textwrap.dedent(
            KILLED.format(
                paths=[str(here.parent), str(here), str(Path(__file__).resolve().parent)],
                key=OPENAI_KEY,
                url=fake_provider.openai_base_url,
                root=str(store.root),
            )
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if sum(Path(store.layout.analysis_meta(i.stem, "openai")).exists() for i in items) >= 4:
            break
        time.sleep(0.02)
    time.sleep(0.15)  # the next requests are on their way
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.3)  # let the server record whatever was already sent
    answered = {i.stem for i in items if Path(store.layout.analysis_meta(i.stem, "openai")).exists()}
    assert 4 <= len(answered) < 16
    seen = len(fake_provider.requests_to("chat/completions"))

    after_kill = CostLedger(store, "openai")
    assert after_kill.totals["requests"] >= seen  # every request the provider saw is in the books
    server_bill = seen * per_answer
    assert after_kill.spent >= server_bill
    orphans = [
        r
        for r in journal_lines(store, "openai")
        if r["op"] == "start"
        and r["id"] not in {s["id"] for s in journal_lines(store, "openai") if s["op"] == "settle"}
    ]
    assert len(orphans) == after_kill.unsettled_requests >= 1
    unanswered_orphans = {r["stem"] for r in orphans} - answered

    # A rerun capped just above the recorded spend stays under the cap, on our books and the provider's.
    fake_provider.latency_s = 0.0
    price = load_settings().teachers.prices["gpt-4o"]
    worst = cost_usd(price, messages_tokens(items[0].messages) * 3 // 2, 4096)
    cap = after_kill.spent + 2.5 * worst
    capped = settings_for(fake_provider, budget_usd=cap, concurrency=2)
    summary = asyncio.run(LabelingRun(make_teacher(capped, "openai"), store, capped.teachers).run(items))
    assert summary.recovered_unsettled == len(orphans)
    assert summary.stopped == "budget" and 1 <= summary.requests <= 3
    assert store.read_json(store.layout.cost_ledger("openai"))["cost_usd"] <= cap
    assert len(fake_provider.requests_to("chat/completions")) * per_answer <= cap

    # With room, the rest is labeled, and the report says which answers may have been paid twice.
    roomy = settings_for(fake_provider)
    final = asyncio.run(LabelingRun(make_teacher(roomy, "openai"), store, roomy.teachers).run(items))
    assert final.labeled + final.cached == 16
    ledger = store.read_json(store.layout.cost_ledger("openai"))
    assert ledger["requests"] >= len(fake_provider.requests_to("chat/completions"))
    assert ledger["unsettled_requests"] == len(orphans)
    assert final.possibly_paid_twice == ledger["possibly_paid_twice"] == len(unanswered_orphans)
    assert final.possibly_paid_twice >= mix.repaid  # every answer the provider produced twice is reported
