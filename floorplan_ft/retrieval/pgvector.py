"""PostgreSQL/pgvector access shared by every vector store: connections, identifiers, vector
literals, table inspection, and the `VectorStore` interface the stores answer.

Phase 2 reads the team's table through it (`team_table`), the service its own tables
(`floorplan_ft.serving.vectorstore`). Errors never quote the DSN's password.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import SecretStr

from floorplan_ft.retrieval.retrieve import RetrievedChunk

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class VectorStoreError(RuntimeError):
    """The vector store cannot be read or written; the message names the table or setting, never
    the DSN's password."""


class VectorStore(ABC):
    """Criteria chunks with their vectors, searchable by cosine similarity."""

    backend: str
    dimensions: int
    embedding_identity: str | None
    corpus_hash: str | None

    @abstractmethod
    def search(self, query_vectors: np.ndarray, top_k: int) -> list[list[RetrievedChunk]]:
        """Top-k hits per query row, best first (similarity = cosine)."""

    @abstractmethod
    def count(self) -> int:
        """Number of chunks held."""

    def describe(self) -> dict[str, Any]:
        """What the store holds, for /health (never a password)."""
        return {
            "backend": self.backend,
            "dimensions": self.dimensions,
            "embedding_identity": self.embedding_identity,
            "corpus_hash": self.corpus_hash,
        }

    def close(self) -> None:
        """Release connections."""


# ============================================================================ connections


def import_psycopg():
    """The psycopg module, or a VectorStoreError that says how to install it."""
    try:
        import psycopg
    except ImportError:  # pragma: no cover - a missing optional dependency
        raise VectorStoreError("the pgvector store needs psycopg: pip install 'psycopg[binary]'") from None
    return psycopg


def _dsn_text(dsn: str | SecretStr) -> str:
    return dsn.get_secret_value() if isinstance(dsn, SecretStr) else str(dsn)


def describe_dsn(dsn: str | SecretStr) -> dict[str, str]:
    """Host, port, database and user of a DSN, without the password (for logs and /health)."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(_dsn_text(dsn))
    except Exception:  # noqa: BLE001 - an unparseable DSN is reported, not echoed
        return {"dsn": "(unparseable)"}
    return {k: str(info[k]) for k in ("host", "port", "dbname", "user") if info.get(k)}


def connect(dsn: str | SecretStr, *, connect_timeout_s: float = 5.0, statement_timeout_s: float = 30.0):
    """A psycopg connection with bounded connect and statement times; errors never quote the DSN."""
    psycopg = import_psycopg()
    try:
        # Autocommit: every multi-statement change runs in an explicit `conn.transaction()`.
        return psycopg.connect(
            _dsn_text(dsn),
            autocommit=True,
            connect_timeout=max(1, round(connect_timeout_s)),
            options=f"-c statement_timeout={int(statement_timeout_s * 1000)}",
        )
    except psycopg.Error as exc:
        where = describe_dsn(dsn)
        raise VectorStoreError(
            f"cannot connect to PostgreSQL ({where}): {type(exc).__name__}: "
            f"{redacted_line(str(exc))} (setting serving.pg_dsn / --dsn)"
        ) from None


def redacted_line(text: str) -> str:
    """The first line of a database error, any ``password=...`` redacted, at most 300 characters."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return re.sub(r"password=\S+", "password=[redacted]", line)[:300]


# ============================================================================ identifiers and literals


def check_identifier(name: str, what: str = "table") -> str:
    if not _IDENT.match(name or ""):
        raise VectorStoreError(f"{what} name {name!r}: use lowercase letters, digits and _ (at most 63 characters)")
    return name


def vector_literal(vector: Sequence[float] | np.ndarray) -> str:
    """pgvector's text form; 9 significant digits round-trip a float32 exactly."""
    values = np.asarray(vector, dtype=np.float32)
    if not np.all(np.isfinite(values)):
        raise VectorStoreError("a vector holds NaN or infinity")
    return "[" + ",".join(f"{float(v):.9g}" for v in values) + "]"


# ============================================================================ table inspection


def relation_kind(conn, name: str) -> str | None:
    """'r' table, 'v' view, None absent (in the current schema)."""
    row = conn.execute(
        "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = %s AND n.nspname = current_schema()",
        (name,),
    ).fetchone()
    return row[0] if row else None


def table_exists(conn, name: str) -> bool:
    return relation_kind(conn, name) in ("r", "p")


def table_columns(conn, table: str) -> dict[str, str]:
    """Column name -> SQL type (``format_type``, e.g. ``vector(768)``) of a table."""
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = %s AND n.nspname = current_schema() AND a.attnum > 0 "
        "AND NOT a.attisdropped",
        (table,),
    ).fetchall()
    return {name: kind for name, kind in rows}
