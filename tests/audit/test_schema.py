"""The schema stays portable (PostgreSQL DDL compiles) and SQLite files run in WAL mode."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex, CreateTable

from trustmig.audit import AuditLog
from trustmig.audit.schema import metadata


def test_schema_compiles_for_postgresql() -> None:
    dialect = postgresql.dialect()
    ddl = "\n".join(
        [str(CreateTable(t).compile(dialect=dialect)) for t in metadata.sorted_tables]
        + [
            str(CreateIndex(i).compile(dialect=dialect))
            for t in metadata.sorted_tables
            for i in t.indexes
        ]
    )
    assert "CREATE TABLE audit_events" in ddl and "CREATE TABLE receipts" in ddl
    assert '"user" VARCHAR(255)' in ddl  # reserved word on PostgreSQL, quoted
    assert "CREATE UNIQUE INDEX ix_audit_events_host_seq ON audit_events (host, seq)" in ddl
    assert "BIGSERIAL" in ddl


def test_sqlite_file_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = AuditLog(f"sqlite:///{path}", host="h", signing_key=Ed25519PrivateKey.generate())
    try:
        log.append("migration.phase")
        log.flush()
    finally:
        log.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
