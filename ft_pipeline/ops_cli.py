"""`ft-pipeline pools ...` and `ft-pipeline blocks ...`: set up a Prefect server for the deployments.

Both talk to the server in PREFECT_API_URL and refuse to run without one (Prefect would otherwise
write to a local default database that no worker reads).
"""

from __future__ import annotations

import re
from typing import Annotated

import typer

pools_app = typer.Typer(no_args_is_help=True, help="Prefect work pools (local-gpu, runpod).")
blocks_app = typer.Typer(no_args_is_help=True, help="Prefect blocks (teacher keys, data root).")

_SECRETISH = re.compile(r"(^|_)(KEY|SECRET|TOKEN|PASSWORD|CREDENTIALS?)(_|$)", re.IGNORECASE)


def _require_server() -> str:
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        typer.secho(
            "error: PREFECT_API_URL is not set. Start a server (prefect server start) and point at it: "
            "prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(2)
    return url


def _parse_env(items: list[str] | None) -> dict[str, str]:
    env = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise typer.BadParameter(f"--env {item!r}: expected NAME=value")
        env[name.strip()] = value
    return env


@pools_app.command("create")
def pools_create(
    pool: Annotated[
        list[str] | None,
        typer.Option("--pool", help="Pool to create or update (repeatable); default: local-gpu and runpod."),
    ] = None,
    data_root: Annotated[
        str | None,
        typer.Option(
            help="Data root of the pool's flow runs: a path on the worker machine or s3://bucket/prefix. "
            "A local path also moves caches and Prefect results beside it."
        ),
    ] = None,
    cache_root: Annotated[
        str | None, typer.Option(help="Directory for HF/torch caches (and results when the data root is a URL).")
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", help="Extra flow-run variable NAME=value (repeatable). Never a secret: use blocks."),
    ] = None,
) -> None:
    """Create the work pools from deployments/pools/*.json, or update them; idempotent."""
    from ft_pipeline.pools import POOLS, create_or_update

    url = _require_server()
    chosen = pool or list(POOLS)
    unknown = [p for p in chosen if p not in POOLS]
    if unknown:
        raise typer.BadParameter(f"unknown pool(s) {', '.join(unknown)} (choose from {', '.join(POOLS)})")
    for name, status, run_env in create_or_update(chosen, data_root, cache_root, _parse_env(env)):
        typer.echo(f"work pool {name} (process): {status}  [{url}]")
        for key, value in run_env.items():
            shown = "****" if _SECRETISH.search(key) else value
            typer.echo(f"    {key}={shown}")


@pools_app.command("show-template")
def pools_show_template(
    pool: Annotated[str, typer.Argument(help="local-gpu or runpod")],
    data_root: Annotated[str | None, typer.Option(help="As for `pools create`.")] = None,
    cache_root: Annotated[str | None, typer.Option(help="As for `pools create`.")] = None,
) -> None:
    """Print the base job template `pools create` would use (for `prefect work-pool create
    --base-job-template`)."""
    import json

    from ft_pipeline.pools import POOLS, customise, load_template

    if pool not in POOLS:
        raise typer.BadParameter(f"unknown pool {pool!r} (choose from {', '.join(POOLS)})")
    typer.echo(json.dumps(customise(load_template(pool), data_root, cache_root), indent=2))


@blocks_app.command("register")
def blocks_register() -> None:
    """Register the block types and create/update blocks from the environment (OPENAI_API_KEY,
    GEMINI_API_KEY, FTP_PATHS__DATA_ROOT and AWS_* for an s3:// root). Prints no secret."""
    url = _require_server()
    from blocks.register import BLOCK_TYPES, register_all

    outcomes = register_all()
    slugs = ", ".join(cls.get_block_type_slug() for cls in BLOCK_TYPES)
    typer.echo(f"block types registered on {url}: {slugs}")
    for outcome in outcomes:
        typer.echo(f"  {outcome.ref:<38} {outcome.status:<9} {outcome.detail}")
