"""Teacher credentials as Prefect blocks: the key lives on the server, encrypted, never in a flow
parameter or a job template (both show in the UI in plain text).

Flows pick them up through `blocks.secrets.apply_block_secrets`; `ft-pipeline blocks register`
creates them from OPENAI_API_KEY / GEMINI_API_KEY.
"""

from __future__ import annotations

from typing import ClassVar

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

# Block document names the flows look for (one set per Prefect server / workspace).
OPENAI_BLOCK = "openai"
GEMINI_BLOCK = "gemini"
RUNPOD_BLOCK = "runpod"


class OpenAICredentials(Block):
    """OpenAI API key (teacher 3a, OpenAI embeddings) and an optional base URL (a proxy)."""

    # Own slugs: the prefect-openai collection also ships an "openai-credentials" type.
    _block_type_name: ClassVar[str] = "ft-pipeline OpenAI Credentials"
    _block_type_slug: ClassVar[str] = "ft-openai-credentials"
    _description: ClassVar[str] = (
        "OpenAI API key for ft-pipeline's teacher and embeddings; read by the flows at run time."
    )

    api_key: SecretStr = Field(..., description="OpenAI API key (sk-...).")
    base_url: str | None = Field(
        None, description="Override of the API base URL (a proxy or an OpenAI-compatible gateway)."
    )


class GeminiCredentials(Block):
    """Google Gemini API key (teacher 3b) and an optional base URL."""

    _block_type_name: ClassVar[str] = "ft-pipeline Gemini Credentials"
    _block_type_slug: ClassVar[str] = "ft-gemini-credentials"
    _description: ClassVar[str] = "Google Gemini API key for ft-pipeline's teacher; read by the flows at run time."

    api_key: SecretStr = Field(..., description="Gemini API key (Google AI Studio).")
    base_url: str | None = Field(None, description="Override of the Gemini API base URL.")


class RunPodCredentials(Block):
    """RunPod key for the team's Serverless CV/embedding endpoint (cv.source=runpod)."""

    _block_type_name: ClassVar[str] = "ft-pipeline RunPod Credentials"
    _block_type_slug: ClassVar[str] = "ft-runpod-credentials"
    _description: ClassVar[str] = (
        "RunPod API key for the team's Serverless CV and embedding endpoint; read by the flows at run time."
    )

    api_key: SecretStr = Field(..., description="RunPod API key.")
    base_url: str | None = Field(None, description="Unused; kept for symmetry with the other credentials.")
