"""`ft-pipeline import`: bring the team's existing outputs into the data root.

`import topologies PATH...` takes files or folders of topology graphs (``{stem}/topology_graph.json``,
``{stem}_topology.json``, ``{stem}.json``; ours, the team aggregator's or their frontend's) and
makes each valid one the phase-1 output of its stem, so `ft-pipeline run --steps 2-6` runs on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ft_pipeline.options import ConfigOpt, ProfileOpt, SetOpt, settings_from_options

import_app = typer.Typer(no_args_is_help=True, help="Import the team's existing outputs into the data root.")


@import_app.command("topologies")
def topologies(
    paths: Annotated[list[Path], typer.Argument(help="Topology files or folders of them.", exists=True)],
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
) -> None:
    """Import topology graphs as phase-1 outputs (bytes kept, provenance sidecar, sample list
    extended). Exits 1 only when none imported."""
    from floorplan_ft.store import ArtifactStore
    from floorplan_ft.topology_import import import_topologies

    settings = settings_from_options(config, profile, set_)
    store = ArtifactStore(settings.paths.data_root)
    outcomes = import_topologies(store, list(paths))
    width = max([len(o.stem or "-") for o in outcomes] + [4])
    typer.echo(f"{'stem':<{width}}  {'status':<8}  {'format':<13}  detail")
    for o in outcomes:
        detail = o.reason or o.path
        typer.echo(f"{(o.stem or '-'):<{width}}  {o.status:<8}  {(o.format or '-'):<13}  {detail}")
    imported = sum(o.status == "imported" for o in outcomes)
    failed = len(outcomes) - imported
    typer.echo(f"{imported} imported, {failed} failed, into {store.root}")
    if imported == 0:
        raise typer.Exit(1)


@import_app.command("analyses")
def analyses(
    file: Annotated[Path, typer.Argument(help="Their stored analyses: a ChromaDB/JSON export or a list of analyses.")],
    teacher: Annotated[str, typer.Option(help="Teacher name the answers are written under.")] = "production",
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
) -> None:
    """Import the team's stored analyses as the answers of teacher `production`
    (output/{stem}/llm_analysis_production.json + sidecar), mapped leniently onto our schema;
    compare them in phase 4 with quality.extra_teachers=["production"]. Exits 1 when none imported."""
    from floorplan_ft.store import ArtifactStore
    from floorplan_ft.team_analyses import AnalysesFileError, import_analyses, report_text

    settings = settings_from_options(config, profile, set_)
    store = ArtifactStore(settings.paths.data_root)
    try:
        report = import_analyses(store, file, teacher=teacher, image_dir=settings.image_dir())
    except AnalysesFileError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(report_text(report))
    typer.echo(f"\nReport: {store.layout.import_report(teacher)}")
    if not report.imported:
        raise typer.Exit(1)
