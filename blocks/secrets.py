"""Secrets from Prefect blocks when a Prefect server is configured, else from the settings.

Call `apply_block_secrets(settings)` at the start of a flow. It returns a copy of the settings with:

- `openai_api_key` / `openai_base_url` from the `ft-openai-credentials/openai` block,
- `gemini_api_key` / `gemini_base_url` from the `ft-gemini-credentials/gemini` block,
- `runpod_api_key` from the `ft-runpod-credentials/runpod` block,
- `paths.data_root` from the `ft-data-root-storage/data-root` block when no source (profile, file,
  environment, override) set a data root, and, for an s3:// data root, the block's S3 credentials
  installed as fsspec's defaults for this process.

A block that does not exist (or a server that cannot be reached) leaves that part unchanged. Only
block and field names are logged, never values.
"""

from __future__ import annotations

import logging
from typing import Any

from floorplan_ft.settings import Settings

_log = logging.getLogger("ft_pipeline.blocks")


def prefect_server_configured() -> bool:
    """True when PREFECT_API_URL points at a server (not Prefect's ephemeral in-process API)."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def _logger() -> Any:
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return _log


class _Unreachable(Exception):
    """The server did not answer: the remaining blocks are not tried."""


def _load(block_cls: type, name: str) -> Any | None:
    try:
        return block_cls.load(name, _sync=True)
    except ValueError:
        # Prefect raises ValueError for a missing document or an unregistered block type.
        return None
    except Exception as exc:  # noqa: BLE001 - network, auth, schema drift: use the settings
        _logger().warning(
            "could not read Prefect block %s/%s (%s): using settings instead",
            block_cls.get_block_type_slug(),
            name,
            type(exc).__name__,
        )
        raise _Unreachable from None


def load_block(block_cls: type, name: str) -> Any | None:
    """The block document `name` of `block_cls`, or None when it (or its type) does not exist or
    the server cannot be reached. Never raises."""
    try:
        return _load(block_cls, name)
    except _Unreachable:
        return None


def apply_block_secrets(
    settings: Settings,
    *,
    openai_block: str | None = None,
    gemini_block: str | None = None,
    data_root_block: str | None = None,
) -> Settings:
    """Return `settings` with credentials (and the data root) taken from Prefect blocks where they
    exist; the input object is never modified. Without a configured server: `settings` as is."""
    if not prefect_server_configured():
        return settings
    from blocks.credentials import (
        GEMINI_BLOCK,
        OPENAI_BLOCK,
        RUNPOD_BLOCK,
        GeminiCredentials,
        OpenAICredentials,
        RunPodCredentials,
    )
    from blocks.storage import DATA_ROOT_BLOCK, DataRootStorage

    update: dict[str, Any] = {}
    used: list[str] = []
    try:
        for cls, name, prefix in (
            (OpenAICredentials, openai_block or OPENAI_BLOCK, "openai"),
            (GeminiCredentials, gemini_block or GEMINI_BLOCK, "gemini"),
            (RunPodCredentials, RUNPOD_BLOCK, "runpod"),
        ):
            block = _load(cls, name)
            if block is None:
                continue
            fields = ["api_key"]
            update[f"{prefix}_api_key"] = block.api_key
            if block.base_url and prefix != "runpod":
                update[f"{prefix}_base_url"] = block.base_url
                fields.append("base_url")
            used.append(f"{cls.get_block_type_slug()}/{name} ({', '.join(fields)})")

        storage_name = data_root_block or DATA_ROOT_BLOCK
        storage = _load(DataRootStorage, storage_name)
    except _Unreachable:
        return settings
    if storage is not None:
        ref = f"{DataRootStorage.get_block_type_slug()}/{storage_name}"
        data_root = settings.paths.data_root
        if "data_root" not in settings.paths.model_fields_set:
            data_root = storage.data_root()
            update["paths"] = settings.paths.model_copy(update={"data_root": data_root})
            used.append(f"{ref} (data_root)")
        if storage.kind == "s3" and data_root.startswith("s3://"):
            storage.configure_fsspec()
            used.append(f"{ref} (s3 credentials)")

    if used:
        _logger().info("settings from Prefect blocks: %s", "; ".join(used))
    return settings.model_copy(update=update) if update else settings
