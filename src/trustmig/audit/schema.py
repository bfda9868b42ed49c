"""Database schema of the audit trail and engine creation.

The schema is portable SQLAlchemy Core (no SQLite-only types or SQL), so a cluster can keep every
host's trail in one PostgreSQL database: each table is keyed by `host`, and each host's chain is
independent. The only backend-specific step is switching SQLite to WAL mode, which lets readers
(verify, export, the CLI) run while the agent appends.

Rows carry a surrogate `id` besides `seq` so that a tampered database holding duplicate or
renumbered seq values can still be loaded and reported on, instead of failing to load.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.pool import StaticPool

from trustmig.audit.errors import AuditConfigError

metadata = MetaData()

# BigInteger ids become plain INTEGER on SQLite so that they stay rowid aliases (autoincrement).
_Id = BigInteger().with_variant(Integer(), "sqlite")

events_table = Table(
    "audit_events",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("host", String(255), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("ts", String(32), nullable=False),
    Column("kind", String(64), nullable=False),
    Column("vm", String(255), nullable=True),
    Column("migration_id", String(255), nullable=True),
    Column("user", String(255), nullable=True),
    Column("outcome", String(255), nullable=True),
    Column("data", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    # Unique: a second writer for the same host fails loudly instead of forking the chain.
    Index("ix_audit_events_host_seq", "host", "seq", unique=True),
    Index("ix_audit_events_host_vm", "host", "vm"),
    Index("ix_audit_events_host_migration", "host", "migration_id"),
)

checkpoints_table = Table(
    "audit_checkpoints",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("host", String(255), nullable=False),
    Column("upto_seq", BigInteger, nullable=False),
    Column("head_hash", String(64), nullable=False),
    Column("ts", String(32), nullable=False),
    Column("signature", String(128), nullable=False),
    Index("ix_audit_checkpoints_host_seq", "host", "upto_seq"),
)

receipts_table = Table(
    "receipts",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("host", String(255), nullable=False),
    Column("migration_id", String(255), nullable=False),
    Column("vm", String(255), nullable=False),
    Column("user", String(255), nullable=True),
    Column("source", String(255), nullable=False),
    Column("destination", String(255), nullable=False),
    Column("stream_digest", String(255), nullable=False),
    Column("outcome", String(255), nullable=False),
    Column("ts", String(255), nullable=False),
    Column("fields", Text, nullable=False),
    Column("own_sig", String(128), nullable=False),
    Column("peer_host", String(255), nullable=False),
    Column("peer_sig", String(128), nullable=False),
    Index("ix_receipts_host_migration", "host", "migration_id", unique=True),
)


def make_engine(url: str) -> Engine:
    """Create an engine for `url`; SQLite files are switched to WAL mode on every connection."""
    if not isinstance(url, str) or not url:
        raise AuditConfigError(
            "audit database URL is empty: pass e.g. 'sqlite:////var/lib/trustmig/audit.db'"
        )
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise AuditConfigError(
            f"audit database URL {url!r} is not a valid SQLAlchemy URL: "
            "use e.g. 'sqlite:////abs/path/audit.db' or 'postgresql://host/db'"
        ) from exc
    is_sqlite = parsed.get_backend_name() == "sqlite"
    kwargs: dict[str, Any] = {}
    in_memory = is_sqlite and parsed.database in (None, "", ":memory:")
    if in_memory:
        # One shared connection, or every pooled connection would see its own empty database.
        kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
    try:
        engine = create_engine(url, **kwargs)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise AuditConfigError(
            f"cannot open audit database {url!r}: {exc}; install the database driver or fix the URL"
        ) from exc
    if is_sqlite and not in_memory:

        @event.listens_for(engine, "connect")
        def _enable_wal(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            try:
                cur.execute("PRAGMA journal_mode=WAL")
                # FULL: a commit is on disk when flush() returns (flush is the durability point).
                cur.execute("PRAGMA synchronous=FULL")
                cur.execute("PRAGMA busy_timeout=10000")
            finally:
                cur.close()

    return engine
