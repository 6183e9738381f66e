"""The team's criteria table (``retrieval.corpus = "pgvector:TABLE"``, production: ``internal_eval``).

Their service keeps the company criteria in PostgreSQL/pgvector: ``document`` text, ``metadata``
jsonb (an older layout has ``keywords`` instead), ``embedding vector(1024)``, ranked by cosine
distance (``embedding <=> q``). `TeamTableStore` reads that table as it is, read-only, and answers
like the other vector stores (`RetrievedChunk` hits, similarity = 1 - distance, ties by id), so
phase 2 and the service retrieve the same rows production does. DSN: ``serving.pg_dsn``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from pydantic import SecretStr

from floorplan_ft.providers.embeddings import EmbeddingError, normalise_rows
from floorplan_ft.retrieval.pgvector import (
    VectorStore,
    VectorStoreError,
    check_identifier,
    connect,
    describe_dsn,
    import_psycopg,
    redacted_line,
    table_columns,
    table_exists,
    vector_literal,
)
from floorplan_ft.retrieval.retrieve import RetrievedChunk

PREFIX = "pgvector:"


def corpus_table(corpus: str | None) -> str | None:
    """The table of ``retrieval.corpus = "pgvector:TABLE"``; None for the shipped corpus."""
    if not corpus or corpus == "shipped":
        return None
    if not corpus.startswith(PREFIX):
        raise VectorStoreError(
            f"retrieval.corpus = {corpus!r}: use 'shipped' or 'pgvector:TABLE' (e.g. pgvector:internal_eval)"
        )
    return check_identifier(corpus[len(PREFIX) :], "retrieval.corpus table")


def _dsn_of(settings: Any) -> SecretStr:
    dsn = getattr(settings.serving, "pg_dsn", None)
    text = dsn.get_secret_value() if isinstance(dsn, SecretStr) else (dsn or "")
    if not str(text).strip():
        raise VectorStoreError(
            f"retrieval.corpus = {settings.retrieval.corpus!r} reads the criteria from PostgreSQL, but no "
            "database is set: set serving.pg_dsn (FTP_SERVING__PG_DSN, or the team's POSTGRES_* keys)"
        )
    return dsn if isinstance(dsn, SecretStr) else SecretStr(str(dsn))


class TeamTableStore(VectorStore):
    """The team's table, searched exactly as their service searches it (top-k by ``<=>``)."""

    backend = "pgvector-team"

    def __init__(self, dsn: str | SecretStr, table: str, *, statement_timeout_s: float = 30.0):
        self._dsn = dsn if isinstance(dsn, SecretStr) else SecretStr(str(dsn))
        self.table = check_identifier(table, "retrieval.corpus table")
        self._conn = connect(self._dsn, statement_timeout_s=statement_timeout_s)
        try:
            self._inspect()
        except BaseException:
            self._conn.close()
            raise
        self.embedding_identity = None  # the table does not say which model filled it

    @classmethod
    def from_settings(cls, settings: Any) -> TeamTableStore:
        table = corpus_table(settings.retrieval.corpus)
        if table is None:
            raise VectorStoreError("retrieval.corpus is 'shipped': there is no team table to open")
        return cls(_dsn_of(settings), table, statement_timeout_s=float(settings.serving.timeout_s) * 3)

    def _inspect(self) -> None:
        import re

        from psycopg import sql

        where = f"table {self.table!r} ({describe_dsn(self._dsn)})"
        if not table_exists(self._conn, self.table):
            raise VectorStoreError(f"{where} does not exist (setting retrieval.corpus)")
        columns = table_columns(self._conn, self.table)
        kind = columns.get("embedding", "")
        if "document" not in columns or not kind.startswith("vector"):
            raise VectorStoreError(
                f"{where} is not in the team's layout: it needs columns document (text) and "
                f"embedding (vector); it has {sorted(columns)}"
            )
        self.metadata_column = next((c for c in ("metadata", "keywords") if c in columns), None)
        self.has_id = "id" in columns
        match = re.match(r"vector\((\d+)\)", kind)
        if match:
            self.dimensions = int(match.group(1))
        else:
            one = self._conn.execute(
                sql.SQL("SELECT vector_dims(embedding) FROM {} LIMIT 1").format(sql.Identifier(self.table))
            ).fetchone()
            self.dimensions = int(one[0]) if one else 0
        ident = sql.SQL("id::text") if self.has_id else sql.SQL("ctid::text")
        meta = sql.Identifier(self.metadata_column) if self.metadata_column else sql.SQL("NULL")
        self._select = sql.SQL("{ident}, document, {meta}::text").format(ident=ident, meta=meta)
        rows = self._conn.execute(
            sql.SQL("SELECT {cols} FROM {t} ORDER BY 1").format(cols=self._select, t=sql.Identifier(self.table))
        ).fetchall()
        self.rows = len(rows)
        if not rows:
            raise VectorStoreError(f"{where} is empty: load the criteria into it first")
        digest = hashlib.sha256()
        for row in rows:
            digest.update(json.dumps(list(row), ensure_ascii=False).encode() + b"\n")
        # The content of the table (ids, documents, metadata): a changed row changes every
        # context's provenance, so phase 2 retrieves again.
        self.corpus_hash = f"{PREFIX}{self.table}:{digest.hexdigest()[:16]}"

    def _source(self, metadata_text: str | None) -> str:
        try:
            meta = json.loads(metadata_text) if metadata_text else None
        except ValueError:
            meta = None
        if isinstance(meta, dict):
            for key in ("source", "category", "title"):
                if isinstance(meta.get(key), str) and meta[key]:
                    return meta[key]
        return self.table

    def search(self, query_vectors: np.ndarray, top_k: int) -> list[list[RetrievedChunk]]:
        from psycopg import sql

        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 (setting retrieval.top_k), got {top_k}")
        queries = normalise_rows(np.asarray(query_vectors, dtype=np.float32))
        if queries.shape[0] and queries.shape[1] != self.dimensions:
            raise EmbeddingError(
                f"query width {queries.shape[1]} != {self.dimensions} in the team table {self.table}: "
                "set retrieval.dimensions (EMBEDDING_DIM) to the table's width"
            )
        statement = sql.SQL(
            "SELECT {cols}, embedding <=> %(q)s::vector AS distance FROM {t} "
            "ORDER BY embedding <=> %(q)s::vector, 1 LIMIT %(k)s"
        ).format(cols=self._select, t=sql.Identifier(self.table))
        out = []
        try:
            for row in queries:
                hits = self._conn.execute(statement, {"q": vector_literal(row), "k": int(top_k)}).fetchall()
                out.append(
                    [
                        RetrievedChunk(
                            rank=r,
                            id=str(i),
                            content=str(doc or ""),
                            source=self._source(meta),
                            similarity=round(1.0 - float(dist), 6),
                        )
                        for r, (i, doc, meta, dist) in enumerate(hits, start=1)
                    ]
                )
        except import_psycopg().Error as exc:
            raise VectorStoreError(
                f"search in the team table {self.table} failed: {type(exc).__name__}: {redacted_line(str(exc))}"
            ) from None
        return out

    def count(self) -> int:
        return self.rows

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "table": self.table, "rows": self.rows, "database": describe_dsn(self._dsn)}

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
