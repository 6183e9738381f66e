"""`ft-pipeline blocks register`: register the block types, create blocks from the environment.

Environment read (the same names the settings and the AWS tools use):

- ``OPENAI_API_KEY`` (+ ``FTP_OPENAI_BASE_URL``)                 → ft-openai-credentials/openai
- ``GEMINI_API_KEY`` or ``GOOGLE_API_KEY`` (+ ``FTP_GEMINI_BASE_URL``) → ft-gemini-credentials/gemini
- ``RUNPOD_API_KEY``                                             → ft-runpod-credentials/runpod
- ``FTP_PATHS__DATA_ROOT`` (a path or ``s3://bucket/prefix``) with, for S3,
  ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` or ``AWS_DEFAULT_REGION`` → ft-data-root-storage/data-root

Idempotent: a block whose stored values equal the new ones is left alone ("unchanged"), a
different one is overwritten ("updated"). The report names blocks and fields, never values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from prefect.blocks.core import Block
from pydantic import SecretStr

from blocks.credentials import (
    GEMINI_BLOCK,
    OPENAI_BLOCK,
    RUNPOD_BLOCK,
    GeminiCredentials,
    OpenAICredentials,
    RunPodCredentials,
)
from blocks.secrets import load_block
from blocks.storage import DATA_ROOT_BLOCK, DataRootStorage
from floorplan_ft.redact import mask_url

BLOCK_TYPES: tuple[type[Block], ...] = (OpenAICredentials, GeminiCredentials, RunPodCredentials, DataRootStorage)


@dataclass(frozen=True)
class BlockOutcome:
    ref: str  # slug/name
    status: str  # created | updated | unchanged | skipped
    detail: str  # what it holds, without secret values


def register_block_types() -> list[str]:
    """Register (or update) the three block types and their schemas; return their slugs."""
    for cls in BLOCK_TYPES:
        cls.register_type_and_schema(_sync=True)
    return [cls.get_block_type_slug() for cls in BLOCK_TYPES]


def _first(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


def _comparable(block: Block) -> dict:
    """Field values with secrets revealed, for equality only (never printed)."""
    out = {}
    for name in type(block).model_fields:
        value = getattr(block, name)
        out[name] = value.get_secret_value() if isinstance(value, SecretStr) else value
    return out


def save_block(block: Block, name: str) -> str:
    """Save `block` as `name` unless an equal one is stored; 'created', 'updated' or 'unchanged'."""
    existing = load_block(type(block), name)
    if existing is not None and _comparable(existing) == _comparable(block):
        return "unchanged"
    block.save(name, overwrite=True, _sync=True)
    return "created" if existing is None else "updated"


def blocks_from_env(env: Mapping[str, str] | None = None) -> list[tuple[str, Block | None, str]]:
    """(name, block or None, description) for each block the environment defines."""
    env = os.environ if env is None else env
    planned: list[tuple[str, Block | None, str]] = []

    key = _first(env, "OPENAI_API_KEY", "FTP_OPENAI_API_KEY")
    base = _first(env, "FTP_OPENAI_BASE_URL")
    planned.append(
        (
            OPENAI_BLOCK,
            OpenAICredentials(api_key=key, base_url=base) if key else None,
            f"api_key set, base_url {mask_url(base) if base else '-'}" if key else "OPENAI_API_KEY is not set",
        )
    )

    key = _first(env, "GEMINI_API_KEY", "GOOGLE_API_KEY", "FTP_GEMINI_API_KEY")
    base = _first(env, "FTP_GEMINI_BASE_URL")
    planned.append(
        (
            GEMINI_BLOCK,
            GeminiCredentials(api_key=key, base_url=base) if key else None,
            f"api_key set, base_url {mask_url(base) if base else '-'}"
            if key
            else "GEMINI_API_KEY / GOOGLE_API_KEY is not set",
        )
    )

    key = _first(env, "RUNPOD_API_KEY", "FTP_RUNPOD_API_KEY")
    planned.append(
        (
            RUNPOD_BLOCK,
            RunPodCredentials(api_key=key) if key else None,
            "api_key set" if key else "RUNPOD_API_KEY is not set",
        )
    )

    root = _first(env, "FTP_PATHS__DATA_ROOT")
    if root:
        key_id = _first(env, "AWS_ACCESS_KEY_ID")
        secret = _first(env, "AWS_SECRET_ACCESS_KEY")
        storage = (
            DataRootStorage.from_data_root(
                root,
                endpoint_url=_first(env, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
                region=_first(env, "AWS_REGION", "AWS_DEFAULT_REGION"),
                access_key_id=SecretStr(key_id) if key_id else None,
                secret_access_key=SecretStr(secret) if secret else None,
            )
            if root.startswith("s3://")
            else DataRootStorage.from_data_root(root)
        )
        planned.append((DATA_ROOT_BLOCK, storage, storage.describe()))
    else:
        planned.append((DATA_ROOT_BLOCK, None, "FTP_PATHS__DATA_ROOT is not set"))
    return planned


def register_all(env: Mapping[str, str] | None = None) -> list[BlockOutcome]:
    """Register the types, then create/update every block the environment defines."""
    register_block_types()
    outcomes = []
    by_name = {
        OPENAI_BLOCK: OpenAICredentials,
        GEMINI_BLOCK: GeminiCredentials,
        RUNPOD_BLOCK: RunPodCredentials,
        DATA_ROOT_BLOCK: DataRootStorage,
    }
    for name, block, detail in blocks_from_env(env):
        ref = f"{by_name[name].get_block_type_slug()}/{name}"
        if block is None:
            outcomes.append(BlockOutcome(ref, "skipped", detail))
        else:
            outcomes.append(BlockOutcome(ref, save_block(block, name), detail))
    return outcomes
