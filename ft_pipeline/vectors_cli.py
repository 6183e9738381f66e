"""`ft-pipeline vectors`: the criteria vectors in PostgreSQL with pgvector (migrate, roll back, drop
the old table, status). The new embedding is the one the settings configure (``retrieval.*`` /
``EMBEDDING_PROVIDER``); the DSN comes from ``--dsn`` or ``serving.pg_dsn`` and is never printed."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from ft_pipeline.options import ConfigOpt, ProfileOpt, SetOpt, settings_from_options

vectors_app = typer.Typer(
    no_args_is_help=True,
    help="Criteria vectors in PostgreSQL/pgvector: migrate to a new embedding, roll back, drop the old table.",
)

DsnOpt = Annotated[
    str | None,
    typer.Option("--dsn", help="PostgreSQL DSN (default: serving.pg_dsn). Never printed."),
]


def _dsn(dsn: str | None, settings: Any) -> str:
    if dsn:
        return dsn
    configured = getattr(settings.serving, "pg_dsn", None)
    if configured is not None:
        value = configured.get_secret_value() if hasattr(configured, "get_secret_value") else str(configured)
        if value:
            return value
    _fail(ValueError("no database: pass --dsn or set serving.pg_dsn (FTP_SERVING__PG_DSN)"))
    raise AssertionError  # unreachable


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _print_report(report: Any, as_json: bool) -> None:
    data = report.model_dump() if hasattr(report, "model_dump") else report
    if as_json:
        typer.echo(json.dumps(data, ensure_ascii=False, indent=2, default=str))
        return
    if data["action"] == "already-rolled-back":
        typer.echo(
            f"already rolled back: {data.get('new_table')} is live (rolled back from "
            f"{data.get('old_table')}); nothing changed"
        )
        typer.echo("  `vectors migrate` (without --rollback) switches to the configured embedding again")
        return
    typer.echo(f"{data['action']}: {data.get('old_table')} -> {data.get('new_table')}")
    if data.get("new_rows") is not None:
        typer.echo(
            f"  rows: old {data.get('old_rows')}, new {data.get('new_rows')}; "
            f"width: old {data.get('old_dimensions')}, new {data.get('new_dimensions')}"
        )
    for check in data.get("checks", []):
        typer.echo(f"  [{'ok' if check['ok'] else 'FAIL'}] {check['name']}: {check['detail']}")
    if data.get("switched"):
        typer.echo(f"  live table is now {data['new_table']}" + (f" (view {data['view']})" if data.get("view") else ""))
    if data.get("dropped"):
        typer.echo(f"  dropped: {', '.join(data['dropped'])}")
    elif data.get("action") in ("migrated", "rolled-back"):
        typer.echo("  the old table is kept: `--rollback` goes back, `--drop-old` removes it")


@vectors_app.command("migrate")
def migrate(
    dsn: DsnOpt = None,
    old_table: Annotated[str | None, typer.Option(help="Table to migrate from (default: the live one).")] = None,
    new_table: Annotated[
        str | None, typer.Option(help="Name of the new table (default: from model, width, corpus).")
    ] = None,
    drop_old: Annotated[
        bool,
        typer.Option(
            "--drop-old", help="Drop the previous table (after a successful switch, or now if already migrated)."
        ),
    ] = False,
    rollback: Annotated[
        bool,
        typer.Option(
            "--rollback",
            help="Point back at the previous table (no re-embedding); a second --rollback changes nothing.",
        ),
    ] = False,
    no_switch: Annotated[
        bool, typer.Option("--no-switch", help="Build and verify the new table but keep the old one live.")
    ] = False,
    allow_count_change: Annotated[
        bool,
        typer.Option(
            "--allow-count-change", help="Accept a corpus whose chunk count or ids differ from the old table's."
        ),
    ] = False,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Re-embed the corpus with the configured embedding into a new table, verify, switch over.

    Checks row counts, ids and sample queries (pgvector top-1 = in-memory top-1) before the
    switch; a failure changes nothing. The old table stays until --drop-old.
    """
    from floorplan_ft.retrieval.pgvector import VectorStoreError
    from floorplan_ft.serving.vector_migrations import (
        drop_old_tables,
        migrate_vectors,
        rollback_vectors,
    )

    settings = settings_from_options(config, profile, set_)
    target = _dsn(dsn, settings)
    if rollback and (drop_old or no_switch):
        _fail(ValueError("--rollback cannot be combined with --drop-old or --no-switch"))
    try:
        if rollback:
            report = rollback_vectors(target)
        else:
            from floorplan_ft.providers.factory import make_embedding_manager
            from floorplan_ft.retrieval.corpus import load_corpus
            from floorplan_ft.serving.vector_migrations import vector_status

            vector_status(target)  # reach the database before loading any model
            manager = make_embedding_manager(settings)
            report = migrate_vectors(
                target,
                old_table,
                manager,
                load_corpus(settings.paths.corpus_path),
                drop_old=drop_old,
                new_table=new_table,
                switch=not no_switch,
                allow_count_change=allow_count_change,
            )
            if drop_old and report.action == "already-current" and not report.dropped:
                report = drop_old_tables(target)
    except (VectorStoreError, ValueError) as exc:
        _fail(exc)
    except Exception as exc:  # noqa: BLE001 - embedding/config errors, named, no traceback
        _fail(exc)
    _print_report(report, as_json)


@vectors_app.command("status")
def status(
    dsn: DsnOpt = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
) -> None:
    """Live and previous table, every registered table, recent switches (JSON)."""
    from floorplan_ft.retrieval.pgvector import VectorStoreError
    from floorplan_ft.serving.vector_migrations import vector_status

    settings = settings_from_options(config, profile, set_)
    try:
        data = vector_status(_dsn(dsn, settings))
    except VectorStoreError as exc:
        _fail(exc)
    typer.echo(json.dumps(data, ensure_ascii=False, indent=2, default=str))
