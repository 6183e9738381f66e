"""`ft-pipeline`: run the pipeline, make synthetic plans, inspect settings."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from floorplan_ft.settings import (
    SettingsError,
    check_no_secret_overrides,
    describe_settings,
    load_settings,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
config_app = typer.Typer(no_args_is_help=True, help="Inspect the settings.")
app.add_typer(config_app, name="config")

from ft_pipeline.vectors_cli import vectors_app  # after `app`, which it extends

app.add_typer(vectors_app, name="vectors")
# Prefect server set-up for the deployments (issue 9): work pools and blocks.
from ft_pipeline.ops_cli import blocks_app, pools_app

app.add_typer(pools_app, name="pools")
app.add_typer(blocks_app, name="blocks")
from ft_pipeline.import_cli import import_app

app.add_typer(import_app, name="import")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML or YAML settings file.", exists=True, dir_okay=False)
]
ProfileOpt = Annotated[str | None, typer.Option("--profile", "-p", help="Named profile: production, local-8gb, demo.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override one setting: dotted.name=value (repeatable)."),
]


def _prefect_defaults(data_root: str | None = None) -> None:
    """Environment Prefect reads at import: quiet embedded server, results beside the data."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # No log_prints: the project never prints, and Prefect's print hook would catch libraries'
    # captured output (dill's dis.dis, inside datasets' fingerprinting) and log it as run lines.
    if data_root and "://" not in data_root:
        results = Path(data_root).expanduser().resolve() / ".prefect" / "results"
        os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(results))
        os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")


def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items or []:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise typer.BadParameter(f"--set {item!r}: expected dotted.name=value")
        overrides[name.strip()] = yaml.safe_load(raw) if raw.strip() else raw
    try:
        # Refused before anything runs: a secret here would become a stored flow parameter.
        check_no_secret_overrides(overrides, "--set")
    except SettingsError as exc:
        _fail(exc)
    return overrides


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def run(
    steps: Annotated[str, typer.Option(help="Steps to run: all, '0,1,2,3a,3b,4,5,6', '2-6'.")] = "all",
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run the pipeline on Prefect (the embedded server unless PREFECT_API_URL is set)."""
    from floorplan_ft.steps import parse_steps
    from tasks.common import nest_overrides

    overrides = _parse_sets(set_)
    try:
        parse_steps(steps)
        settings = load_settings(config, profile, **nest_overrides(overrides))
    except (SettingsError, ValueError) as exc:
        _fail(exc)
    _prefect_defaults(settings.paths.data_root)
    from flows.ft_pipeline import ft_pipeline

    try:
        report = ft_pipeline(
            steps=steps,
            config_file=str(config) if config else None,
            profile=profile,
            overrides=overrides or None,
        )
    except Exception as exc:  # noqa: BLE001  (Prefect has logged the traceback; end on one clear line)
        typer.secho(f"\nthe run failed: {type(exc).__name__}: {exc}", fg=typer.colors.RED, err=True)
        typer.echo(f"Finished work is kept under {settings.paths.data_root}; a rerun resumes from it.", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"\nData root: {settings.paths.data_root}")
    for step, outcome in report.items():
        extra = {k: v for k, v in outcome.items() if k != "status"}
        typer.echo(f"  step {step:>2}: {outcome['status']:<14} {json.dumps(extra, ensure_ascii=False)}")


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Output directory (images/, annotations/, truth/).")],
    count: Annotated[int, typer.Option(min=1, help="Number of plans.")] = 100,
    complexes: Annotated[int, typer.Option(min=1, help="Number of apartment complexes.")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same bytes.")] = 42,
) -> None:
    """Write synthetic floor plans: rendered PNG, COCO annotations and true statistics."""
    from floorplan_ft.synth import write_dataset

    stems = write_dataset(out, count=count, complexes=complexes, seed=seed)
    typer.echo(f"wrote {len(stems)} plans under {out} (images/, annotations/, truth/)")


@app.command()
def demo(
    data_root: Annotated[Path, typer.Option(help="Where the demo data and outputs go.")] = Path("demo-data"),
    count: Annotated[int, typer.Option(min=1, help="Synthetic plans to generate.")] = 60,
    steps: Annotated[str, typer.Option(help="Steps to run.")] = "all",
) -> None:
    """Generate synthetic plans (once) and run the pipeline on them with the demo profile."""
    from floorplan_ft.synth import write_dataset

    images = data_root / "images"
    if not images.is_dir() or not any(images.iterdir()):
        stems = write_dataset(data_root, count=count, complexes=6, seed=42)
        typer.echo(f"generated {len(stems)} synthetic plans under {data_root}")
    teacher_dir = data_root / "models" / "tiny-local-teacher"
    if not (teacher_dir / "config.json").is_file():
        from floorplan_ft.training.tiny import bias_towards_short_json, build_tiny_causal_lm

        model, tokenizer = build_tiny_causal_lm(teacher_dir, seed=0)
        bias_towards_short_json(model, tokenizer, teacher_dir)
        typer.echo(f"built the demo's tiny local teacher (random weights) at {teacher_dir}")
    from floorplan_ft.training.tiny import ensure_demo_base

    student_base = ensure_demo_base(data_root / "models" / "tiny-student-base")
    run(
        steps=steps,
        config=None,
        profile="demo",
        set_=[
            f"paths.data_root={data_root}",
            f"teachers.local_model_path={teacher_dir}",
            f"finetune.base_model={student_base}",
        ],
    )


@app.command()
def estimate(
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    items: Annotated[
        int | None, typer.Option(help="Items to label (default: the sample, or sampling.sample_size).")
    ] = None,
) -> None:
    """Expected tokens, dollars and hours per teacher for the planned labeling, before any call."""
    from floorplan_ft.sampling import SamplingError, read_sample
    from floorplan_ft.store import ArtifactStore
    from floorplan_ft.teachers.estimate import estimate_teacher, mean_prompt_tokens
    from floorplan_ft.teachers.items import build_items
    from tasks.common import nest_overrides

    try:
        settings = load_settings(config, profile, **nest_overrides(_parse_sets(set_)))
    except SettingsError as exc:
        _fail(exc)
    store = ArtifactStore(settings.paths.data_root)
    stems: list[str] = []
    try:
        stems = read_sample(store.layout.run_file("sample"))
    except SamplingError:
        pass
    count = items or len(stems) or settings.sampling.sample_size
    built, _ = build_items(store, stems[:200], settings) if stems else ([], [])
    measured = mean_prompt_tokens([i.messages for i in built])
    typer.echo(
        f"Labeling {count} plans ({'sampled' if stems and not items else 'planned'}); "
        f"input tokens per item: {'measured on ' + str(len(built)) + ' prompts' if measured else 'the plan figure'}\n"
    )
    typer.echo("| teacher | model | $ online | $ batch | items/min | limited by | hours | budget |")
    typer.echo("|---|---|---|---|---|---|---|---|")
    for name in settings.teachers.teachers:
        e = estimate_teacher(settings, name, count, measured)
        usd = "n/a (no price)" if e.usd_online is None else f"{e.usd_online:.2f}"
        batch = "n/a" if e.usd_batch is None else f"{e.usd_batch:.2f}"
        flag = " ⚠ over budget" if e.over_budget else ""
        typer.echo(
            f"| {e.teacher} | {e.model} | {usd} | {batch} | {e.items_per_minute} | {e.limited_by} | "
            f"{e.hours} | {e.budget_usd:.2f}{flag} |"
        )


@app.command("train-plan")
def train_plan(
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """What step 6 will do with these settings: steps, tokens, memory and hours per GPU, before any pod."""
    import json

    from floorplan_ft.training.config import TrainConfigError
    from floorplan_ft.training.plan import plan_training
    from tasks.common import nest_overrides

    try:
        settings = load_settings(config, profile, **nest_overrides(_parse_sets(set_)))
        plan = plan_training(settings)
    except (SettingsError, TrainConfigError) as exc:
        _fail(exc)
    typer.echo(json.dumps(plan.to_dict(), indent=2, ensure_ascii=False) if as_json else plan.markdown())


@app.command()
def serve(
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default: serving.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: serving.port).")] = None,
) -> None:
    """Run the analysis HTTP API on uvicorn (POST /analyze, POST /chat, GET /health).

    The provider is LLM_PROVIDER / serving.llm_provider; openai is the rollback.
    """
    from tasks.common import nest_overrides

    try:
        settings = load_settings(config, profile, **nest_overrides(_parse_sets(set_)))
    except SettingsError as exc:
        _fail(exc)
    from floorplan_ft.providers.base import LLMError
    from floorplan_ft.providers.embeddings import EmbeddingError
    from floorplan_ft.serving.api import serve as serve_api
    from floorplan_ft.serving.vectorstore import VectorStoreError

    try:
        serve_api(settings, host=host, port=port)
    except (LLMError, VectorStoreError, EmbeddingError) as exc:  # start-up problems name their setting
        _fail(exc)


@config_app.command("show")
def config_show(
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print the effective settings (secrets masked)."""
    from tasks.common import nest_overrides

    try:
        settings = load_settings(config, profile, **nest_overrides(_parse_sets(set_)))
    except SettingsError as exc:
        _fail(exc)
    from floorplan_ft.redact import masked_dump

    data = masked_dump(settings)  # SecretStr values and passwords inside URLs/DSNs as ****
    if as_json:
        typer.echo(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        typer.echo(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))


@config_app.command("describe")
def config_describe() -> None:
    """List every setting with its default and description."""
    for name, default, description in describe_settings():
        typer.echo(f"{name:<36} {default:<28} {description}")


if __name__ == "__main__":
    app()
