"""Embeddings from the team's RunPod Serverless endpoint (``EMBEDDING_PROVIDER=runpod``): its
``embed_batch`` action (``{"texts"}`` → ``{"embeddings"}``), Qwen3-Embedding-0.6B at 1024 dims.

Texts go in batches of ``retrieval.batch_size``; each batch is one job with the endpoint's retry
rules (`floorplan_ft.cv.runpod`). Queries and documents are sent as they are, as the team's
service sends them. Vectors are cut to ``dimensions`` if wider and L2-normalised.
"""

from __future__ import annotations

import numpy as np

from floorplan_ft.cv.runpod import RunPodEndpoint, RunPodError, get_client, register_key
from floorplan_ft.providers.embeddings import BaseEmbeddingManager, EmbeddingError, normalise_rows

TEAM_EMBEDDING_MODEL = "Qwen/Qwen3-Embedding-0.6B"


class RunPodEmbeddingManager(BaseEmbeddingManager):
    provider = "runpod"

    def __init__(
        self,
        endpoint: RunPodEndpoint,
        api_key,
        *,
        dimensions: int = 1024,
        batch_size: int = 32,
        model: str = TEAM_EMBEDDING_MODEL,
    ):
        self.endpoint = endpoint
        self.dimensions = dimensions
        self.batch_size = batch_size
        self.model = model
        self._client = get_client(endpoint, register_key(api_key))

    def identity(self) -> str:
        return f"{super().identity()}|{self.endpoint.url}"

    def embed_documents(self, texts: list[str]) -> np.ndarray:
        return self._embed(texts)

    def embed_queries(self, texts: list[str]) -> np.ndarray:
        return self._embed(texts)

    def describe(self) -> dict:
        return {
            "provider": self.provider,
            "model": self.model,
            "dimensions": self.dimensions,
            "endpoint": self.endpoint.url,
        }

    def __repr__(self) -> str:
        return f"RunPodEmbeddingManager({self.describe()})"

    def _embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        rows = [self._batch(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return normalise_rows(np.concatenate(rows, axis=0))

    def _batch(self, batch: list[str]) -> np.ndarray:
        try:
            vectors = np.asarray(self._client.embed_batch(batch), dtype=np.float32)
        except RunPodError as exc:  # the refused key included: its message names RUNPOD_API_KEY
            raise EmbeddingError(str(exc)) from None
        except ValueError as exc:  # ragged rows
            raise EmbeddingError(f"{self.endpoint.url}: embed_batch returned malformed vectors ({exc})") from None
        if vectors.ndim != 2 or vectors.shape[1] < self.dimensions:
            raise EmbeddingError(
                f"{self.endpoint.url}: embed_batch returned vectors of shape {vectors.shape}; "
                f"set retrieval.dimensions to at most {vectors.shape[-1] if vectors.ndim else 0}"
            )
        return vectors[:, : self.dimensions]


def runpod_embedding_manager(settings) -> RunPodEmbeddingManager:
    """The manager for ``retrieval.provider = "runpod"``: the endpoint of cv.runpod_*, the key
    RUNPOD_API_KEY; a missing one is a ConfigError naming the setting."""
    from floorplan_ft.cv.runpod import KEY_SETTING, endpoint_from_settings
    from floorplan_ft.providers.factory import ConfigError

    cv = settings.cv
    if not cv.runpod_endpoint_id:
        raise ConfigError(
            "retrieval.provider is 'runpod' but no endpoint is set: set cv.runpod_endpoint_id (RUNPOD_ENDPOINT_ID)"
        )
    key = settings.runpod_api_key
    if key is None or not key.get_secret_value().strip():
        raise ConfigError(f"retrieval.provider is 'runpod' but no key is set: set {KEY_SETTING}")
    return RunPodEmbeddingManager(
        endpoint_from_settings(settings),
        key,
        dimensions=settings.retrieval.dimensions,
        batch_size=settings.retrieval.batch_size,
    )
