"""The criteria corpus: JSON chunks {id, content, source, keywords}."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class CriteriaChunk(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    content: str = Field(min_length=1)
    source: str
    keywords: list[str] = Field(default_factory=list)


class CorpusError(ValueError):
    """The corpus file is missing or malformed; the message names the file."""


def default_corpus_path() -> Path:
    return Path(str(resources.files("floorplan_ft") / "data" / "criteria_ko.json"))


def load_corpus(path: str | Path | None = None) -> list[CriteriaChunk]:
    """Load and validate the corpus; duplicate ids and empty files are errors."""
    path = Path(path) if path else default_corpus_path()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorpusError(f"criteria corpus {path}: not found (setting paths.corpus_path)") from None
    except json.JSONDecodeError as exc:
        raise CorpusError(f"criteria corpus {path}: invalid JSON: {exc}") from None
    if not isinstance(raw, list) or not raw:
        raise CorpusError(f"criteria corpus {path}: expected a non-empty JSON list of chunks")
    chunks = []
    for i, item in enumerate(raw):
        try:
            chunks.append(CriteriaChunk.model_validate(item))
        except ValidationError as exc:
            raise CorpusError(f"criteria corpus {path}: chunk {i}: {exc.errors()[0]['msg']}") from None
    ids = [c.id for c in chunks]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise CorpusError(f"criteria corpus {path}: duplicate chunk ids {dupes}")
    return chunks


def corpus_hash(chunks: list[CriteriaChunk]) -> str:
    """Content hash of the corpus: changes whenever any chunk's text or metadata changes."""
    payload = json.dumps([c.model_dump() for c in chunks], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
