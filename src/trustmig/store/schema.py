"""The cluster store's tables (SQLAlchemy Core, the same schema on SQLite and PostgreSQL)."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

#: one row per host: its last attestation verdict and attested capacity, its last measured load
hosts = Table(
    "cluster_hosts",
    metadata,
    Column("name", String(253), primary_key=True),
    Column("attested", Boolean, nullable=True),
    Column("verdict", Text, nullable=False, default=""),
    Column("verdict_at", Float, nullable=True),
    Column("capacity_mem_mib", Integer, nullable=True),
    Column("capacity_vcpus", Integer, nullable=True),
    Column("load_json", Text, nullable=True),
    Column("load_at", Float, nullable=True),
)

#: one row per VM: its single owner host and the epoch of its last handover
vms = Table(
    "cluster_vms",
    metadata,
    Column("name", String(253), primary_key=True),
    Column("tenant", String(253), nullable=False),
    Column("owner_host", String(253), nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("mem_mib", Integer, nullable=False),
    Column("vcpus", Integer, nullable=False),
    Column("updated_at", Float, nullable=False),
)

migrations = Table(
    "cluster_migrations",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("vm", String(253), nullable=False),
    Column("source", String(253), nullable=False),
    Column("destination", String(253), nullable=False),
    Column("state", String(64), nullable=False),
    Column("error", Text, nullable=True),
    Column("updated_at", Float, nullable=False),
)

#: cluster-wide quarantine: one entry per host, cleared once by a security administrator
quarantine = Table(
    "cluster_quarantine",
    metadata,
    Column("host", String(253), primary_key=True),
    Column("reason", Text, nullable=False),
    Column("by_host", String(253), nullable=False),
    Column("since", Float, nullable=False),
)

quarantine_cleared = Table(
    "cluster_quarantine_cleared",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("host", String(253), nullable=False),
    Column("reason", Text, nullable=False),
    Column("since", Float, nullable=False),
    Column("cleared_by", String(253), nullable=False),
    Column("cleared_at", Float, nullable=False),
)

#: the longest audit chain head each host was seen with, so that a truncated trail shows
audit_heads = Table(
    "cluster_audit_heads",
    metadata,
    Column("host", String(253), primary_key=True),
    Column("length", Integer, nullable=False),
    Column("head", String(64), nullable=False),
    Column("at", Float, nullable=False),
)
