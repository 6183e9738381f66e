"""Loading, migrating and rolling back the service's pgvector tables (layout: `serving.vectorstore`).

`migrate_vectors` re-embeds the corpus into a new table at the new width inside one transaction,
checks row counts, ids and sample queries (top-1 against the in-memory ranking of the same
vectors) and moves the pointer; any failure rolls the whole transaction back, so the old table
stays live and untouched. The old table is kept until `drop_old_tables` (``--drop-old``);
`rollback_vectors` moves the pointer back while it exists; a second rollback changes nothing.
`vector_status` says what is live.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, SecretStr

from floorplan_ft.providers.embeddings import BaseEmbeddingManager, EmbeddingError, normalise_rows
from floorplan_ft.retrieval.corpus import CriteriaChunk, corpus_hash
from floorplan_ft.retrieval.pgvector import (
    VectorStoreError,
    check_identifier,
    connect,
    describe_dsn,
    import_psycopg,
    redacted_line,
    relation_kind,
    table_exists,
    vector_literal,
)
from floorplan_ft.retrieval.retrieve import build_query, rank
from floorplan_ft.serving.vectorstore import (
    LOG_TABLE,
    POINTER_TABLE,
    REGISTRY_TABLE,
    STORE_NAME,
    TABLE_PREFIX,
    VIEW_NAME,
    TableInfo,
    active_table,
    search_table,
    table_info,
)

log = logging.getLogger(__name__)

SAMPLE_STATISTICS: tuple[dict[str, Any], ...] = (
    {
        "structure_type": "판상형",
        "bay_count": 4,
        "windowless_ratio": 10.0,
        "balcony_ratio": 8.0,
        "ldk_ratio": 35.0,
        "storage_ratio": 12.0,
        "master_bedroom_has_window": True,
    },
    {
        "structure_type": "타워형",
        "bay_count": 2,
        "windowless_ratio": 40.0,
        "balcony_ratio": 0.0,
        "ldk_ratio": 25.0,
        "storage_ratio": 3.0,
        "master_bedroom_has_window": False,
    },
    {
        "structure_type": "혼합형",
        "bay_count": 3,
        "windowless_ratio": 20.0,
        "balcony_ratio": 5.0,
        "ldk_ratio": 45.0,
        "storage_ratio": 7.0,
        "master_bedroom_has_window": True,
    },
)
SAMPLE_CHUNK_QUERIES = 5  # plus the text of the first N chunks as queries


class MigrationError(VectorStoreError):
    """A migration step failed; nothing was changed (the transaction was rolled back)."""


def sample_queries(chunks: Sequence[CriteriaChunk]) -> list[str]:
    """The known queries a migration checks: three plan profiles and the first chunks' own text."""
    queries = [build_query(stats) for stats in SAMPLE_STATISTICS]
    queries += [c.content for c in list(chunks)[:SAMPLE_CHUNK_QUERIES]]
    return list(dict.fromkeys(queries))


def table_name_for(
    manager: BaseEmbeddingManager | None = None,
    chunks: Sequence[CriteriaChunk] = (),
    *,
    model: str | None = None,
    dimensions: int | None = None,
    identity: str | None = None,
) -> str:
    """``criteria_vectors_{dims}_{model slug}_{hash}``: one table per (embedding, width, corpus)."""
    model = model if model is not None else manager.model
    dims = int(dimensions if dimensions is not None else manager.dimensions)
    identity = identity if identity is not None else (manager.identity() if manager else model)
    slug = re.sub(r"[^a-z0-9]+", "_", Path(str(model).split(":")[-1]).name.lower()).strip("_")
    digest = hashlib.sha256(f"{identity}\n{dims}\n{corpus_hash(list(chunks)) if chunks else ''}".encode()).hexdigest()[
        :6
    ]
    return f"{TABLE_PREFIX}{dims}_{slug[:28].strip('_') or 'model'}_{digest}"


def ensure_schema(conn) -> None:
    """The extension and the bookkeeping tables (idempotent)."""
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    conn.execute(
        f"""CREATE TABLE IF NOT EXISTS {REGISTRY_TABLE} (
            table_name text PRIMARY KEY,
            embedding_identity text NOT NULL,
            provider text,
            model text,
            dimensions integer NOT NULL,
            corpus_hash text,
            rows integer NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            verified_at timestamptz,
            legacy boolean NOT NULL DEFAULT false
        )"""
    )
    conn.execute(
        f"""CREATE TABLE IF NOT EXISTS {POINTER_TABLE} (
            name text PRIMARY KEY,
            table_name text NOT NULL,
            previous_table text,
            switched_at timestamptz NOT NULL DEFAULT now()
        )"""
    )
    conn.execute(
        f"""CREATE TABLE IF NOT EXISTS {LOG_TABLE} (
            id bigserial PRIMARY KEY,
            at timestamptz NOT NULL DEFAULT now(),
            action text NOT NULL,
            from_table text,
            to_table text,
            detail jsonb
        )"""
    )


def _meta_exists(conn) -> bool:
    return table_exists(conn, POINTER_TABLE) and table_exists(conn, REGISTRY_TABLE)


class CheckResult(BaseModel):
    name: str
    ok: bool
    detail: str = ""


class MigrationReport(BaseModel):
    action: str  # migrated | loaded | already-current | rolled-back | already-rolled-back | dropped
    old_table: str | None = None
    new_table: str | None = None
    old_rows: int | None = None
    new_rows: int | None = None
    old_dimensions: int | None = None
    new_dimensions: int | None = None
    embedding_identity: str | None = None
    switched: bool = False
    view: str | None = None
    dropped: list[str] = Field(default_factory=list)
    checks: list[CheckResult] = Field(default_factory=list)


def _lock_store(conn, name: str) -> None:
    key = int.from_bytes(hashlib.sha256(f"ftp-vectors:{name}".encode()).digest()[:8], "big", signed=True)
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))


def _log(conn, action: str, from_table: str | None, to_table: str | None, detail: dict) -> None:
    conn.execute(
        f"INSERT INTO {LOG_TABLE} (action, from_table, to_table, detail) VALUES (%s, %s, %s, %s)",
        (action, from_table, to_table, json.dumps(detail, ensure_ascii=False)),
    )


def _point(conn, name: str, table: str, previous: str | None) -> str | None:
    """Move the pointer and the view; returns the view name, or None if a base table has that name."""
    conn.execute(
        f"INSERT INTO {POINTER_TABLE} (name, table_name, previous_table, switched_at) "
        "VALUES (%s, %s, %s, now()) ON CONFLICT (name) DO UPDATE SET "
        "table_name = EXCLUDED.table_name, previous_table = EXCLUDED.previous_table, "
        "switched_at = now()",
        (name, table, previous),
    )
    if name != STORE_NAME:
        return None
    kind = relation_kind(conn, VIEW_NAME)
    if kind not in (None, "v"):
        log.warning("a %s named %s exists; the view is not (re)created", kind, VIEW_NAME)
        return None
    from psycopg import sql

    info = table_info(conn, table)
    conn.execute(sql.SQL("DROP VIEW IF EXISTS {}").format(sql.Identifier(VIEW_NAME)))
    conn.execute(
        sql.SQL(
            "CREATE VIEW {view} AS SELECT {id} AS id, {content} AS content, {source} AS source, "
            "{col} AS embedding FROM {table}"
        ).format(
            view=sql.Identifier(VIEW_NAME),
            id=sql.SQL("id::text") if info.has_id else sql.SQL("ctid::text"),
            content=sql.SQL("content") if info.has_content else sql.SQL("''::text"),
            source=sql.SQL("source") if info.has_source else sql.SQL("''::text"),
            col=sql.Identifier(info.vector_column),
            table=sql.Identifier(table),
        )
    )
    return VIEW_NAME


def _create_table(conn, table: str, dims: int) -> None:
    from psycopg import sql

    conn.execute(
        sql.SQL(
            "CREATE TABLE {} (id text PRIMARY KEY, ord integer NOT NULL UNIQUE, content text NOT NULL, "
            "source text NOT NULL, keywords jsonb NOT NULL DEFAULT '[]'::jsonb, "
            "embedding vector({}) NOT NULL)"
        ).format(sql.Identifier(table), sql.Literal(int(dims)))
    )


def _insert_rows(conn, table: str, chunks: Sequence[CriteriaChunk], vectors: np.ndarray) -> None:
    from psycopg import sql

    statement = sql.SQL(
        "INSERT INTO {} (id, ord, content, source, keywords, embedding) VALUES (%s, %s, %s, %s, %s::jsonb, %s::vector)"
    ).format(sql.Identifier(table))
    with conn.cursor() as cur:
        cur.executemany(
            statement,
            [
                (c.id, i, c.content, c.source, json.dumps(c.keywords, ensure_ascii=False), vector_literal(v))
                for i, (c, v) in enumerate(zip(chunks, vectors, strict=True))
            ],
        )


def _embed(manager: BaseEmbeddingManager, chunks: Sequence[CriteriaChunk]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Corpus and sample-query vectors, before anything is written (a failure changes nothing)."""
    try:
        vectors = normalise_rows(manager.embed_documents([c.content for c in chunks]))
        queries = sample_queries(chunks)
        query_vectors = normalise_rows(manager.embed_queries(queries))
    except EmbeddingError as exc:
        raise MigrationError(f"re-embedding the corpus failed, nothing was changed: {exc}") from None
    dims = int(manager.dimensions)
    if vectors.shape != (len(chunks), dims):
        raise MigrationError(
            f"{manager.identity()}: expected corpus vectors of shape {(len(chunks), dims)}, "
            f"got {vectors.shape}; nothing was changed"
        )
    return vectors, query_vectors, queries


def _verify(
    conn,
    table: str,
    chunks: Sequence[CriteriaChunk],
    vectors: np.ndarray,
    queries: list[str],
    query_vectors: np.ndarray,
) -> list[CheckResult]:
    """Row count, ids and sample queries of a freshly written table (inside its transaction)."""
    from psycopg import sql

    checks: list[CheckResult] = []
    info = table_info(conn, table)
    info.registered = True  # written by us: has ord
    n, distinct = conn.execute(
        sql.SQL("SELECT count(*), count(DISTINCT id) FROM {}").format(sql.Identifier(table))
    ).fetchone()
    checks.append(
        CheckResult(
            name="new row count",
            ok=n == distinct == len(chunks),
            detail=f"{n} rows, {distinct} distinct ids, corpus {len(chunks)}",
        )
    )
    ids = {r[0] for r in conn.execute(sql.SQL("SELECT id FROM {}").format(sql.Identifier(table)))}
    missing = sorted({c.id for c in chunks} - ids)
    checks.append(
        CheckResult(
            name="new ids", ok=not missing, detail="all corpus ids present" if not missing else f"missing {missing[:5]}"
        )
    )
    top_k = min(5, len(chunks))
    expected_idx, _ = rank(vectors, query_vectors, top_k)
    got = search_table(conn, info, query_vectors, top_k)
    for q, exp_row, hits in zip(queries, expected_idx, got, strict=True):
        expected_ids = [chunks[int(i)].id for i in exp_row]
        got_ids = [h.id for h in hits]
        short = q if len(q) <= 40 else q[:40] + "…"
        checks.append(
            CheckResult(
                name=f"sample query top-1: {short}",
                ok=bool(got_ids) and got_ids[0] == expected_ids[0],
                detail=f"pgvector {got_ids[:3]} vs in-memory {expected_ids[:3]}",
            )
        )
    return checks


def _fail_on(checks: list[CheckResult]) -> None:
    failed = [c for c in checks if not c.ok]
    if failed:
        raise MigrationError(
            "verification failed, nothing was changed: " + "; ".join(f"{c.name}: {c.detail}" for c in failed)
        )


def _resolve_old_table(conn, old_table: str | None, live: str | None) -> str | None:
    """The table migrated from: the live one unless named (and then it must be the live one)."""
    if old_table is None:
        old_table = live
    elif live is not None and old_table != live:
        raise MigrationError(
            f"old table {old_table!r} is not the live one ({live!r}); leave out "
            "--old-table to migrate from the live table"
        )
    if old_table is not None:
        check_identifier(old_table)
        if not table_exists(conn, old_table):
            raise MigrationError(f"old table {old_table!r} does not exist")
    return old_table


def _already_current(
    conn, live: str | None, previous: str | None, target: str, identity: str, c_hash: str
) -> MigrationReport | None:
    """The report of a migration with nothing to do (the live table holds this embedding of this
    corpus), or None."""
    if live is None or live != target:
        return None
    info = table_info(conn, target)
    if info.embedding_identity != identity or info.corpus_hash != c_hash:
        return None
    return MigrationReport(
        action="already-current",
        old_table=previous,
        new_table=target,
        new_rows=info.rows,
        new_dimensions=info.dimensions,
        embedding_identity=identity,
        switched=False,
    )


def _write_table(
    conn,
    name: str,
    live: str | None,
    target: str,
    manager: BaseEmbeddingManager,
    chunks: Sequence[CriteriaChunk],
    vectors: np.ndarray,
    *,
    identity: str,
    dims: int,
    c_hash: str,
) -> None:
    """Create and fill `target` and register it (inside the caller's transaction, under the lock)."""
    live_now, _ = active_table(conn, name)
    if live_now != live:
        raise MigrationError(f"the live table changed to {live_now!r} during the migration; run it again")
    if table_exists(conn, target):  # a staged (--no-switch) or abandoned copy
        if target == live_now:
            raise MigrationError(f"{target!r} is live; refusing to rebuild it")
        from psycopg import sql

        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(target)))
    _create_table(conn, target, dims)
    _insert_rows(conn, target, chunks, vectors)
    conn.execute(f"DELETE FROM {REGISTRY_TABLE} WHERE table_name = %s", (target,))
    conn.execute(
        f"INSERT INTO {REGISTRY_TABLE} (table_name, embedding_identity, provider, model, "
        "dimensions, corpus_hash, rows, verified_at) VALUES (%s, %s, %s, %s, %s, %s, %s, now())",
        (
            target,
            identity,
            getattr(manager, "provider", None),
            getattr(manager, "model", None),
            dims,
            c_hash,
            len(chunks),
        ),
    )


def _check_against_old(
    conn, old_table: str, old_info: TableInfo, chunks: Sequence[CriteriaChunk], allow_count_change: bool
) -> list[CheckResult]:
    """Row count and ids of the old table against the corpus written to the new one."""
    checks: list[CheckResult] = []
    same = old_info.rows == len(chunks)
    checks.append(
        CheckResult(
            name="old vs new row count",
            ok=same or allow_count_change,
            detail=f"old {old_info.rows}, new {len(chunks)}"
            + (
                ""
                if same
                else " (corpus changed; allowed)"
                if allow_count_change
                else " (pass --allow-count-change if the corpus changed on purpose)"
            ),
        )
    )
    if old_info.has_id:
        from psycopg import sql

        old_ids = {r[0] for r in conn.execute(sql.SQL("SELECT id::text FROM {}").format(sql.Identifier(old_table)))}
        lost = sorted(old_ids - {c.id for c in chunks})
        checks.append(
            CheckResult(
                name="old ids kept",
                ok=not lost or allow_count_change,
                detail="every old id is in the new table"
                if not lost
                else f"{len(lost)} old ids not in the corpus: {lost[:5]}",
            )
        )
    return checks


def _adopt_legacy(conn, old_table: str, old_info: TableInfo) -> None:
    """Register a legacy table (not written by us) so that a rollback can point back to it."""
    if old_info.registered is False and old_info.embedding_identity is None:
        conn.execute(
            f"INSERT INTO {REGISTRY_TABLE} (table_name, embedding_identity, dimensions, "
            "rows, legacy) VALUES (%s, %s, %s, %s, true) ON CONFLICT (table_name) DO NOTHING",
            (old_table, "legacy (unknown embedding)", old_info.dimensions, old_info.rows),
        )


def migrate_vectors(
    dsn: str | SecretStr,
    old_table: str | None,
    new_manager: BaseEmbeddingManager,
    corpus: Sequence[CriteriaChunk],
    *,
    drop_old: bool = False,
    new_table: str | None = None,
    switch: bool = True,
    allow_count_change: bool = False,
    name: str = STORE_NAME,
) -> MigrationReport:
    """Re-embed `corpus` with `new_manager` into a new table, verify it, and make it live.

    `old_table` defaults to the live table; with none at all this is the initial load. Steps: embed
    (nothing written yet) → one transaction: create + fill the new table, check row count and ids
    against the corpus and the old table, check sample queries (pgvector top-1 = in-memory top-1
    of the same vectors), move the pointer and the view → commit. Any failure rolls everything
    back: the old table stays live. The old table is kept (rollback possible) unless `drop_old`.
    If the live table already holds this embedding of this corpus, nothing is re-embedded.
    """
    chunks = list(corpus)
    if not chunks:
        raise MigrationError("the corpus is empty")
    identity, dims = new_manager.identity(), int(new_manager.dimensions)
    c_hash = corpus_hash(chunks)
    target = check_identifier(new_table or table_name_for(new_manager, chunks))
    psycopg = import_psycopg()
    with connect(dsn, statement_timeout_s=300) as conn:
        try:
            with conn.transaction():
                ensure_schema(conn)
                _lock_store(conn, name)
                live, previous = active_table(conn, name)
                old_table = _resolve_old_table(conn, old_table, live)
                current = _already_current(conn, live, previous, target, identity, c_hash)
                if current is not None:
                    if drop_old and previous:
                        current.dropped = _drop_previous(conn, name)
                    return current
                if old_table == target:
                    raise MigrationError(f"old and new table are both {target!r}: nothing to migrate to")
        except psycopg.Error as exc:
            raise MigrationError(f"reading the vector store failed: {redacted_line(str(exc))}") from None

        old_info = None
        if old_table is not None:
            old_info = table_info(conn, old_table)
        vectors, query_vectors, queries = _embed(new_manager, chunks)  # outside any transaction

        report = MigrationReport(
            action="migrated" if old_table else "loaded",
            old_table=old_table,
            new_table=target,
            old_rows=old_info.rows if old_info else None,
            old_dimensions=old_info.dimensions if old_info else None,
            new_dimensions=dims,
            embedding_identity=identity,
        )
        try:
            with conn.transaction():
                _lock_store(conn, name)
                _write_table(
                    conn, name, live, target, new_manager, chunks, vectors, identity=identity, dims=dims, c_hash=c_hash
                )
                checks = _verify(conn, target, chunks, vectors, queries, query_vectors)
                if old_info is not None:
                    checks += _check_against_old(conn, old_table, old_info, chunks, allow_count_change)
                    _adopt_legacy(conn, old_table, old_info)
                report.checks = checks
                _fail_on(checks)
                report.new_rows = len(chunks)
                if switch:
                    report.view = _point(conn, name, target, old_table)
                    report.switched = True
                _log(
                    conn,
                    report.action if switch else "staged",
                    old_table,
                    target,
                    {
                        "rows": len(chunks),
                        "dimensions": dims,
                        "identity": identity,
                        "checks": [c.model_dump() for c in checks],
                    },
                )
        except MigrationError:
            raise
        except VectorStoreError as exc:
            raise MigrationError(f"{exc}; nothing was changed") from None
        except psycopg.Error as exc:
            raise MigrationError(
                f"writing {target} failed, nothing was changed: {type(exc).__name__}: {redacted_line(str(exc))}"
            ) from None

        if drop_old and switch and old_table:
            with conn.transaction():
                _lock_store(conn, name)
                report.dropped = _drop_previous(conn, name)
    return report


def _drop_previous(conn, name: str) -> list[str]:
    from psycopg import sql

    live, previous = active_table(conn, name)
    if not previous:
        return []
    if previous == live:  # pragma: no cover - the pointer never holds this
        raise MigrationError(f"{previous!r} is live; refusing to drop it")
    if table_exists(conn, previous):
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(previous)))
    conn.execute(f"DELETE FROM {REGISTRY_TABLE} WHERE table_name = %s", (previous,))
    conn.execute(f"UPDATE {POINTER_TABLE} SET previous_table = NULL WHERE name = %s", (name,))
    _log(conn, "drop-old", previous, live, {})
    return [previous]


def drop_old_tables(dsn: str | SecretStr, *, name: str = STORE_NAME) -> MigrationReport:
    """Drop the table a rollback would go back to (after the new one has proven itself)."""
    with connect(dsn) as conn, conn.transaction():
        if not _meta_exists(conn):
            raise MigrationError("no vector store here yet: nothing to drop")
        _lock_store(conn, name)
        live, _ = active_table(conn, name)
        dropped = _drop_previous(conn, name)
        return MigrationReport(action="dropped", new_table=live, dropped=dropped)


def _rolled_back_from(conn, live: str | None, previous: str | None) -> bool:
    """Whether the live table got there by a rollback from `previous`: the last pointer move onto
    the live table (in the log, written in the same transaction as every move) was a rollback
    from the table that is now the previous one."""
    if not live or not previous or not table_exists(conn, LOG_TABLE):
        return False
    row = conn.execute(
        f"SELECT action, from_table FROM {LOG_TABLE} WHERE to_table = %s "
        "AND action IN ('loaded', 'migrated', 'rollback') ORDER BY id DESC LIMIT 1",
        (live,),
    ).fetchone()
    return bool(row) and row[0] == "rollback" and row[1] == previous


def rollback_vectors(dsn: str | SecretStr, *, name: str = STORE_NAME) -> MigrationReport:
    """Point the store back at the previous table (which must still exist); the table rolled
    back from becomes the previous one (kept, so `--drop-old` can remove it; a `migrate` with its
    embedding rebuilds it and switches forward again).

    Idempotent: when the live table is already the result of a rollback from the previous one,
    nothing changes and the report's action is ``already-rolled-back``; a second rollback never
    switches forward again."""
    with connect(dsn) as conn, conn.transaction():
        if not _meta_exists(conn):
            raise MigrationError("no vector store here yet: nothing to roll back")
        _lock_store(conn, name)
        live, previous = active_table(conn, name)
        if not previous:
            raise MigrationError(f"no previous table to roll back to (live: {live!r}); it was dropped or never existed")
        if _rolled_back_from(conn, live, previous):
            info = table_info(conn, live)
            return MigrationReport(
                action="already-rolled-back",
                old_table=previous,
                new_table=live,
                new_rows=info.rows,
                new_dimensions=info.dimensions,
                embedding_identity=info.embedding_identity,
                switched=False,
            )
        if not table_exists(conn, previous):
            raise MigrationError(f"the previous table {previous!r} was dropped; cannot roll back")
        info = table_info(conn, previous)
        view = _point(conn, name, previous, live)
        _log(conn, "rollback", live, previous, {"rows": info.rows, "dimensions": info.dimensions})
        return MigrationReport(
            action="rolled-back",
            old_table=live,
            new_table=previous,
            new_rows=info.rows,
            new_dimensions=info.dimensions,
            embedding_identity=info.embedding_identity,
            switched=True,
            view=view,
        )


def vector_status(dsn: str | SecretStr, *, name: str = STORE_NAME) -> dict[str, Any]:
    """The live and previous tables, every registered table, and the last log entries."""
    with connect(dsn) as conn:
        if not _meta_exists(conn):
            return {"live": None, "previous": None, "tables": [], "log": [], "database": describe_dsn(dsn)}
        live, previous = active_table(conn, name)
        tables = []
        for (table,) in conn.execute(f"SELECT table_name FROM {REGISTRY_TABLE} ORDER BY created_at"):
            if table_exists(conn, table):
                info = table_info(conn, table)
                tables.append({**info.model_dump(), "live": table == live, "previous": table == previous})
        entries = conn.execute(
            f"SELECT at, action, from_table, to_table FROM {LOG_TABLE} ORDER BY id DESC LIMIT 10"
        ).fetchall()
        return {
            "live": live,
            "previous": previous,
            "tables": tables,
            "log": [{"at": str(a), "action": b, "from": c, "to": d} for a, b, c, d in entries],
            "database": describe_dsn(dsn),
        }
