"""The embedding interface every backend implements (local sentence-transformers, OpenAI,
OpenAI-compatible servers). Vectors come back as float32 rows, L2-normalised after any truncation,
so cosine similarity is a dot product."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class EmbeddingError(RuntimeError):
    """An embedding backend failed; the message names the setting or server, never a key."""


class BaseEmbeddingManager(ABC):
    provider: str
    model: str
    dimensions: int

    def identity(self) -> str:
        """Everything that changes the vectors: part of every vector-cache key."""
        return f"{self.provider}|{self.model}|{self.dimensions}"

    @abstractmethod
    def embed_documents(self, texts: list[str]) -> np.ndarray:
        """Corpus passages → (len(texts), dimensions) float32, unit rows."""

    @abstractmethod
    def embed_queries(self, texts: list[str]) -> np.ndarray:
        """Search queries (with the model's query instruction, if it has one) → unit rows."""


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise each row (zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)
