"""Options shared by the `ft-pipeline` sub-commands that read the settings (import, vectors)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from floorplan_ft.settings import Settings, SettingsError, load_settings

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML or YAML settings file.", exists=True, dir_okay=False),
]
ProfileOpt = Annotated[str | None, typer.Option("--profile", "-p", help="Named profile.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override one setting: dotted.name=value (repeatable).")
]


def settings_from_options(config: Path | None, profile: str | None, set_: list[str] | None) -> Settings:
    """The effective settings of a sub-command; a bad setting exits 2 with its message."""
    from ft_pipeline.cli import _parse_sets
    from tasks.common import nest_overrides

    try:
        return load_settings(config, profile, **nest_overrides(_parse_sets(set_)))
    except SettingsError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
