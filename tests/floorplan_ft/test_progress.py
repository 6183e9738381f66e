"""Progress lines: throttled, with rate, ETA and dollars; long lists summarised (issue 14)."""

from __future__ import annotations

import logging
import time

from floorplan_ft.progress import Progress, format_duration, summarize


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_line_has_done_total_failures_rate_eta_and_dollars():
    clock = Clock()
    progress = Progress(
        "phase 3 openai", 200, clock=clock, start_thread=False, logger=logging.getLogger("test.progress")
    )
    clock.now += 60.0
    progress.update(50, failed=2, dollars=1.23456, labeled=48, cached=0)
    line = progress.line()
    assert line.startswith("phase 3 openai: 50/200 plans (25%)")
    assert "2 failed" in line and "labeled 48" in line and "$1.2346" in line
    assert "50.0/min" in line and "ETA 3m00s" in line  # 150 left at 50 a minute
    clock.now += 180.0
    progress.update(200, failed=2)
    assert "took 4m00s" in progress.line() and "ETA" not in progress.line()


def test_flush_prints_only_when_something_changed(caplog):
    clock = Clock()
    progress = Progress(
        "phase 1", 10, unit="images", clock=clock, start_thread=False, logger=logging.getLogger("test.progress")
    )
    with caplog.at_level(logging.INFO, logger="test.progress"):
        assert progress.flush() is not None  # the first line: the step has started
        assert progress.flush() is None  # nothing new since
        progress.update(3)
        assert progress.flush() is not None
        assert progress.flush() is None
        assert progress.flush(force=True) is not None
    assert [r.getMessage() for r in caplog.records][-1].startswith("phase 1: 3/10 images")


def test_side_thread_prints_at_most_a_line_per_interval(caplog):
    logger = logging.getLogger("test.progress.thread")
    with caplog.at_level(logging.INFO, logger="test.progress.thread"):
        progress = Progress("phase 2", 1000, interval_s=0.2, logger=logger)
        start = time.monotonic()
        for i in range(1000):  # 1,000 updates in ~1 s
            progress.update(i + 1)
            time.sleep(0.001)
        final = progress.close()
        elapsed = time.monotonic() - start
    lines = [r.getMessage() for r in caplog.records]
    assert final.startswith("phase 2: 1,000/1,000 plans (100%)") and lines[-1] == final
    # The first line at start, then at most one per 0.2 s, and the final one.
    assert 2 <= len(lines) <= elapsed / 0.2 + 3


def test_summarize_and_durations():
    assert summarize(["a", "b"]) == "a, b"
    text = summarize([f"C{i:04d}" for i in range(2000)], limit=3)
    assert text == "C0000, C0001, C0002 … and 1,997 more"
    assert format_duration(5) == "5s" and format_duration(125) == "2m05s" and format_duration(7260) == "2h01m"


def test_phase3_progress_artifact_carries_the_console_figures(prefect_api, no_dotenv, tmp_path):
    """The same line the console shows ends on the run's progress artifact, at 100 %."""
    import asyncio

    from plans import prepare_plans
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, ArtifactFilterType

    from flows.ft_pipeline import ft_pipeline

    store, stems = prepare_plans(tmp_path / "data", count=3, complexes=1, seed=11)
    store.write_json(store.layout.run_file("sample"), {"stems": stems, "n": len(stems)})
    report = ft_pipeline(
        steps="3a", overrides={"paths.data_root": str(tmp_path / "data"), "teachers.teachers": ["reference"]}
    )
    assert report["3a"]["labeled"] == 3

    async def latest():
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["phase3-progress-reference"]),
                    type=ArtifactFilterType(any_=["progress"]),
                )
            )
            return max(found, key=lambda a: a.updated)

    artifact = asyncio.run(latest())
    assert float(artifact.data) == 100.0
    assert artifact.description.startswith("phase 3 reference: 3/3 plans (100%)")
    assert "labeled 3" in artifact.description


def test_domain_warnings_reach_the_run_log_in_prefect(prefect_api, no_dotenv, tmp_path, fake_provider, monkeypatch):
    """floorplan_ft logs with the standard library; inside a run its lines also land in the run's
    log in Prefect (the UI), once."""
    import asyncio

    from plans import prepare_plans
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.ft_pipeline import ft_pipeline

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-progress-0000000000")
    monkeypatch.setenv("FTP_OPENAI_BASE_URL", fake_provider.openai_base_url)
    store, stems = prepare_plans(tmp_path / "data", count=1, complexes=1, seed=5)
    store.write_json(store.layout.run_file("sample"), {"stems": stems, "n": len(stems)})
    store.write_text(store.path("rate_window_openai.json"), "{not json")  # a hand-broken history
    state = ft_pipeline(steps="3a", overrides={"paths.data_root": str(tmp_path / "data")}, return_state=True)
    assert state.is_completed() and state.result()["3a"]["labeled"] == 1

    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs reach the API in batches

    async def messages() -> list[str]:
        async with get_client() as client:
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
            )
            return [log.message for log in logs]

    lines = [m for m in asyncio.run(messages()) if "rate history ignored" in m]
    assert len(lines) == 1, lines
    assert "rate_window_openai.json" in lines[0]
