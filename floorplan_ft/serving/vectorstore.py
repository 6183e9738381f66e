"""Where the service keeps the criteria vectors: in memory (numpy) or in PostgreSQL with pgvector.

Both backends answer `search(query_vectors, top_k)` with `RetrievedChunk` hits ranked exactly like
phase 2's `retrieve.rank` (cosine similarity, ties to the earlier chunk in corpus order), so the
service builds the same prompt whichever backend holds the vectors.

pgvector layout (all in the DSN's current schema):

* one table per embedding (model, width, corpus), e.g. ``criteria_vectors_768_qwen3_embedding_0_6b_1a2b3c``:
  ``id text primary key, ord int, content text, source text, keywords jsonb, embedding vector(N)``.
  Exact search (``ORDER BY embedding <=> q, ord``): the corpus is small; add an HNSW index if it
  ever grows past ~10k chunks.
* ``vector_tables``: what each table holds (embedding identity, width, corpus hash, rows).
* ``vector_store_active``: the pointer, one row per logical store (``name = 'criteria'``):
  ``table_name`` (live) and ``previous_table`` (what a rollback goes back to).
* ``vector_store_log``: every load, switch, rollback and drop, with the row counts checked.
* the view ``criteria_vectors`` (id, content, source, embedding) over the live table, for other
  readers; recreated on every switch.

The tables are created, filled, switched and dropped by `floorplan_ft.serving.vector_migrations`;
connections, identifiers and table inspection are `floorplan_ft.retrieval.pgvector`'s.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, SecretStr

from floorplan_ft.providers.embeddings import BaseEmbeddingManager, EmbeddingError, normalise_rows
from floorplan_ft.retrieval.corpus import CriteriaChunk, corpus_hash
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
from floorplan_ft.retrieval.retrieve import CorpusIndex, RetrievedChunk, rank

STORE_NAME = "criteria"
REGISTRY_TABLE = "vector_tables"
POINTER_TABLE = "vector_store_active"
LOG_TABLE = "vector_store_log"
VIEW_NAME = "criteria_vectors"
TABLE_PREFIX = "criteria_vectors_"


class MemoryVectorStore(VectorStore):
    """The corpus vectors in a numpy matrix; `search` is `retrieve.rank`."""

    backend = "memory"

    def __init__(
        self,
        chunks: Sequence[CriteriaChunk],
        vectors: np.ndarray,
        *,
        embedding_identity: str | None = None,
    ):
        self.chunks = tuple(chunks)
        self.vectors = normalise_rows(np.asarray(vectors, dtype=np.float32))
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.chunks):
            raise VectorStoreError(f"{len(self.chunks)} chunks but vectors of shape {self.vectors.shape}")
        self.dimensions = int(self.vectors.shape[1])
        self.embedding_identity = embedding_identity
        self.corpus_hash = corpus_hash(list(self.chunks))

    @classmethod
    def build(
        cls,
        manager: BaseEmbeddingManager,
        chunks: Sequence[CriteriaChunk],
        cache_dir: str | Path | None = None,
    ) -> MemoryVectorStore:
        """Embed the corpus (or read phase 2's cache: same key, same files)."""
        index = CorpusIndex.build(manager, chunks, cache_dir)
        return cls(index.chunks, index.vectors, embedding_identity=index.embedding_identity)

    def search(self, query_vectors: np.ndarray, top_k: int) -> list[list[RetrievedChunk]]:
        indices, sims = rank(self.vectors, np.asarray(query_vectors, dtype=np.float32), top_k)
        return [
            [
                RetrievedChunk(
                    rank=r,
                    id=self.chunks[int(i)].id,
                    content=self.chunks[int(i)].content,
                    similarity=round(float(s), 6),
                    source=self.chunks[int(i)].source,
                )
                for r, (i, s) in enumerate(zip(row_i, row_s, strict=True), start=1)
            ]
            for row_i, row_s in zip(indices, sims, strict=True)
        ]

    def count(self) -> int:
        return len(self.chunks)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "rows": self.count()}


def active_table(conn, name: str = STORE_NAME) -> tuple[str | None, str | None]:
    """(live table, previous table) of a logical store; (None, None) before the first load."""
    if not table_exists(conn, POINTER_TABLE):
        return None, None
    row = conn.execute(f"SELECT table_name, previous_table FROM {POINTER_TABLE} WHERE name = %s", (name,)).fetchone()
    return (row[0], row[1]) if row else (None, None)


class TableInfo(BaseModel):
    table: str
    dimensions: int
    rows: int
    vector_column: str
    has_id: bool
    has_content: bool
    has_source: bool
    embedding_identity: str | None = None
    corpus_hash: str | None = None
    registered: bool = False


def table_info(conn, table: str) -> TableInfo:
    """Width, rows and provenance of a vector table (ours or a legacy one with a vector column)."""
    check_identifier(table)
    if not table_exists(conn, table):
        raise VectorStoreError(f"vector table {table!r} does not exist")
    columns = table_columns(conn, table)
    vector_cols = [(c, k) for c, k in columns.items() if k.startswith("vector")]
    if not vector_cols:
        raise VectorStoreError(f"table {table!r} has no vector column")
    column, kind = next(((c, k) for c, k in vector_cols if c == "embedding"), vector_cols[0])
    match = re.match(r"vector\((\d+)\)", kind)
    from psycopg import sql

    rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()[0]
    if match:
        dims = int(match.group(1))
    else:  # an untyped vector column: read one row
        one = conn.execute(
            sql.SQL("SELECT vector_dims({}) FROM {} LIMIT 1").format(sql.Identifier(column), sql.Identifier(table))
        ).fetchone()
        dims = int(one[0]) if one else 0
    info = TableInfo(
        table=table,
        dimensions=dims,
        rows=int(rows),
        vector_column=column,
        has_id="id" in columns,
        has_content="content" in columns,
        has_source="source" in columns,
    )
    if table_exists(conn, REGISTRY_TABLE):
        reg = conn.execute(
            f"SELECT embedding_identity, corpus_hash, legacy FROM {REGISTRY_TABLE} WHERE table_name = %s",
            (table,),
        ).fetchone()
        if reg:
            info.embedding_identity, info.corpus_hash = reg[0], reg[1]
            info.registered = not reg[2]
    return info


def _search_sql(info: TableInfo):
    from psycopg import sql

    order = sql.SQL(", ord") if info.registered else sql.SQL("")
    return sql.SQL(
        "SELECT {id}, {content}, {source}, 1 - ({col} <=> %(q)s::vector) AS similarity "
        "FROM {table} ORDER BY {col} <=> %(q)s::vector{order} LIMIT %(k)s"
    ).format(
        id=sql.SQL("id::text") if info.has_id else sql.SQL("ctid::text"),
        content=sql.SQL("content") if info.has_content else sql.SQL("''"),
        source=sql.SQL("source") if info.has_source else sql.SQL("''"),
        col=sql.Identifier(info.vector_column),
        table=sql.Identifier(info.table),
        order=order,
    )


def search_table(conn, info: TableInfo, query_vectors: np.ndarray, top_k: int) -> list[list[RetrievedChunk]]:
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1 (setting retrieval.top_k), got {top_k}")
    queries = normalise_rows(np.asarray(query_vectors, dtype=np.float32))
    if queries.shape[0] and queries.shape[1] != info.dimensions:
        raise EmbeddingError(
            f"query width {queries.shape[1]} != {info.dimensions} in table {info.table}: the "
            "service's embedding settings do not match the live vector table"
        )
    statement = _search_sql(info)
    out = []
    for row in queries:
        hits = conn.execute(statement, {"q": vector_literal(row), "k": int(top_k)}).fetchall()
        out.append(
            [
                RetrievedChunk(
                    rank=r,
                    id=str(i),
                    content=str(c or ""),
                    similarity=round(float(s), 6),
                    source=str(src or ""),
                )
                for r, (i, c, src, s) in enumerate(hits, start=1)
            ]
        )
    return out


class PgVectorStore(VectorStore):
    """Criteria vectors in PostgreSQL with pgvector; `table=None` reads the live table from the
    ``vector_store_active`` pointer (resolved once, when the store is opened)."""

    backend = "pgvector"

    def __init__(
        self,
        dsn: str | SecretStr,
        table: str | None = None,
        *,
        name: str = STORE_NAME,
        connect_timeout_s: float = 5.0,
        statement_timeout_s: float = 10.0,
    ):
        self._dsn = dsn if isinstance(dsn, SecretStr) else SecretStr(str(dsn))
        self._timeouts = (connect_timeout_s, statement_timeout_s)
        self._lock = threading.Lock()
        self._conn = None
        self.name = name
        with self._lock:
            conn = self._connection()
            pinned = table is not None
            if table is None:
                table, _ = active_table(conn, name)
                if table is None:
                    raise VectorStoreError(
                        "no live vector table: load one with `ft-pipeline vectors migrate --dsn ...` "
                        "or set serving.vector_table"
                    )
            self.info = table_info(conn, table)
        self.table = table
        self.pinned = pinned
        self.dimensions = self.info.dimensions
        self.embedding_identity = self.info.embedding_identity
        self.corpus_hash = self.info.corpus_hash
        if not self.info.has_content:
            raise VectorStoreError(f"table {table!r} has no content column: the prompt needs the text")

    def _connection(self):
        if self._conn is None or self._conn.closed:
            self._conn = connect(
                self._dsn,
                connect_timeout_s=self._timeouts[0],
                statement_timeout_s=self._timeouts[1],
            )
        return self._conn

    def _run(self, fn):
        psycopg = import_psycopg()
        with self._lock:
            for attempt in (1, 2):  # one reconnect: a restarted server drops idle connections
                try:
                    return fn(self._connection())
                except psycopg.OperationalError as exc:
                    if self._conn is not None:
                        self._conn.close()
                    self._conn = None
                    if attempt == 2:
                        raise VectorStoreError(
                            f"pgvector search in {self.table} failed: {redacted_line(str(exc))}"
                        ) from None
                except psycopg.Error as exc:
                    raise VectorStoreError(
                        f"pgvector search in {self.table} failed: {type(exc).__name__}: {redacted_line(str(exc))}"
                    ) from None

    def search(self, query_vectors: np.ndarray, top_k: int) -> list[list[RetrievedChunk]]:
        return self._run(lambda conn: search_table(conn, self.info, query_vectors, top_k))

    def count(self) -> int:
        from psycopg import sql

        return self._run(
            lambda conn: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(self.table))).fetchone()[
                0
            ]
        )

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "table": self.table,
            "pinned": self.pinned,
            "rows": self.info.rows,
            "registered": self.info.registered,
            "database": describe_dsn(self._dsn),
        }

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


@dataclass
class IdentityCheck:
    ok: bool
    warning: str | None = None


def check_identity(store: VectorStore, manager: BaseEmbeddingManager) -> IdentityCheck:
    """Whether the service's embedding settings can query `store`. Width and (provider, model)
    must match; a different model fingerprint / library version is only a warning."""
    if store.dimensions != int(manager.dimensions):
        raise VectorStoreError(
            f"the vector store holds {store.dimensions}-dim vectors "
            f"({store.describe().get('table') or store.backend}) but retrieval.dimensions is "
            f"{manager.dimensions}: set the embedding settings the table was built with, or migrate "
            "it (`ft-pipeline vectors migrate`)"
        )
    stored = store.embedding_identity
    if stored is None or stored.startswith("legacy"):
        return IdentityCheck(
            True, f"the vector table's embedding is unknown ({stored or 'unregistered'}); only its width was checked"
        )
    if stored == manager.identity():
        return IdentityCheck(True)

    def head(text: str) -> str:  # provider|model|dims
        return "|".join(text.split("|")[:3])

    if head(stored) != head(manager.identity()):
        raise VectorStoreError(
            f"the vector table was built with {head(stored)} but the service embeds with "
            f"{head(manager.identity())}: fix retrieval.provider/model (EMBEDDING_PROVIDER) or "
            "migrate the table"
        )
    return IdentityCheck(True, f"same model, different fingerprint: table {stored}, service {manager.identity()}")
