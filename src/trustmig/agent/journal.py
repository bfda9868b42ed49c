"""The host journal: what the agent must know again after it was killed, written before it acts.

Two tables in the host's own SQLite database (WAL, ``synchronous=FULL``: a committed write is on
disk when the call returns):

- ``vms``: every VM this host owns or is receiving, with its definition, owner, tenant, epoch,
  state and the QEMU process (PID *and* start time) with its sockets;
- ``migrations``: every migration this host takes part in, with the core's record (state, epoch,
  error) and the context the agent needs to drive it again (peer, relay process, sockets);
- ``policy_serials``: the highest VM policy serial this host ever accepted per VM, so an older
  signed policy is refused after a restart too (it outlives the VM's stay here);
- ``definitions``: the VMs defined on this host (``vm define``), started by name; a definition
  follows its VM when it migrates, so a VM is defined exactly where it lives;
- ``audit_witness``: the longest audit chain each peer (and this host itself) reported, so a
  truncated trail shows (see ``audit/anchor.py``).

Each write is one transaction. The agent writes the new state, then does what the state allows:
an agent killed at any instant restarts from a journal that is never ahead of the facts.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine

metadata = MetaData()

vms_table = Table(
    "vms",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("tenant", String(64), nullable=False),
    Column("owner", String(255), nullable=True),
    Column("epoch", Integer, nullable=False),
    Column("state", String(32), nullable=False),
    Column("definition", Text, nullable=False),
    Column("runtime", Text, nullable=False),
    Column("arrived_by", String(64), nullable=True),
    Column("error", Text, nullable=True),
    Column("updated_at", Float, nullable=False),
)

migrations_table = Table(
    "migrations",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("vm", String(64), nullable=False),
    Column("peer", String(255), nullable=False),
    Column("state", String(32), nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("core", Text, nullable=False),
    Column("context", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("terminal", Integer, nullable=False),
)

policy_serials_table = Table(
    "policy_serials",
    metadata,
    Column("vm", String(64), primary_key=True),
    Column("serial", Integer, nullable=False),
    Column("updated_at", Float, nullable=False),
)

definitions_table = Table(
    "definitions",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("tenant", String(64), nullable=False),
    Column("owner", String(255), nullable=True),
    Column("definition", Text, nullable=False),
    Column("defined_by", String(255), nullable=True),
    Column("updated_at", Float, nullable=False),
)

audit_witness_table = Table(
    "audit_witness",
    metadata,
    Column("host", String(255), primary_key=True),
    Column("length", Integer, nullable=False),
    Column("head", String(64), nullable=False),
    Column("updated_at", Float, nullable=False),
)


class JournalError(Exception):
    """The journal cannot be opened or written (one line naming the file and the cause)."""


@dataclass
class VmRow:
    """One VM as journaled. ``runtime`` holds the QEMU process and its socket paths."""

    name: str
    tenant: str
    owner: str | None
    epoch: int
    state: str
    definition: dict[str, Any]
    runtime: dict[str, Any] = field(default_factory=dict)
    arrived_by: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class DefinitionRow:
    """A VM defined on this host, whether or not it runs."""

    name: str
    tenant: str
    owner: str | None
    definition: dict[str, Any]
    defined_by: str | None = None


@dataclass
class MigrationRow:
    id: str
    role: str
    vm: str
    peer: str
    state: str
    epoch: int
    core: dict[str, Any]
    context: dict[str, Any]
    terminal: bool
    created_at: float = 0.0
    updated_at: float = 0.0


def _engine(path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{path}", future=True)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.close()

    return engine


class Journal:
    """The host journal (one per agent state dir)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not path.exists():
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            self.engine = _engine(path)
            metadata.create_all(self.engine)
        except Exception as e:  # noqa: BLE001 - any cause is reported as one line
            raise JournalError(f"host journal {path} cannot be opened: {e}") from None
        for suffix in ("", "-wal", "-shm"):
            p = Path(f"{path}{suffix}")
            if p.exists():
                os.chmod(p, 0o600)

    def _write(self, stmt: Any) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(stmt)
        except Exception as e:  # noqa: BLE001 - a full disk, a read-only file...
            raise JournalError(f"host journal {self.path}: write failed: {e}") from None

    # ------------------------------------------------------------------ VMs
    def put_vm(self, row: VmRow) -> None:
        try:
            with self.engine.begin() as conn:
                self._put_vm(conn, row)
        except Exception as e:  # noqa: BLE001
            raise JournalError(f"host journal {self.path}: write failed: {e}") from None

    @staticmethod
    def _put_vm(conn: Any, row: VmRow) -> None:
        values = {
            "tenant": row.tenant,
            "owner": row.owner,
            "epoch": row.epoch,
            "state": row.state,
            "definition": json.dumps(row.definition, sort_keys=True),
            "runtime": json.dumps(row.runtime, sort_keys=True),
            "arrived_by": row.arrived_by,
            "error": row.error,
            "updated_at": time.time(),
        }
        n = conn.execute(
            update(vms_table).where(vms_table.c.name == row.name).values(**values)
        ).rowcount
        if not n:
            conn.execute(insert(vms_table).values(name=row.name, **values))

    def drop_vm(self, name: str) -> None:
        self._write(delete(vms_table).where(vms_table.c.name == name))

    def vms(self) -> list[VmRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(vms_table).order_by(vms_table.c.name)).mappings().all()
        return [
            VmRow(
                name=r["name"],
                tenant=r["tenant"],
                owner=r["owner"],
                epoch=r["epoch"],
                state=r["state"],
                definition=json.loads(r["definition"]),
                runtime=json.loads(r["runtime"]),
                arrived_by=r["arrived_by"],
                error=r["error"],
            )
            for r in rows
        ]

    # ------------------------------------------------------------------ definitions
    def put_definition(self, row: DefinitionRow) -> None:
        """Insert or replace the definition of ``row.name``."""
        t = definitions_table
        values = {
            "tenant": row.tenant, "owner": row.owner, "defined_by": row.defined_by,
            "definition": json.dumps(row.definition, sort_keys=True), "updated_at": time.time(),
        }  # fmt: skip
        try:
            with self.engine.begin() as conn:
                n = conn.execute(update(t).where(t.c.name == row.name).values(**values)).rowcount
                if not n:
                    conn.execute(insert(t).values(name=row.name, **values))
        except Exception as e:  # noqa: BLE001
            raise JournalError(f"host journal {self.path}: write failed: {e}") from None

    def drop_definition(self, name: str) -> None:
        self._write(delete(definitions_table).where(definitions_table.c.name == name))

    def definitions(self) -> dict[str, DefinitionRow]:
        t = definitions_table
        with self.engine.connect() as conn:
            rows = conn.execute(select(t).order_by(t.c.name)).mappings().all()
        return {r["name"]: _definition_row(r) for r in rows}

    # ------------------------------------------------------------------ policy serials
    def policy_serial(self, vm: str) -> int:
        """The highest policy serial accepted here for ``vm`` (0 if none ever was)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(policy_serials_table.c.serial).where(policy_serials_table.c.vm == vm)
            ).first()
        return int(row[0]) if row else 0

    def raise_policy_serial(self, vm: str, serial: int) -> None:
        """Remember ``serial`` for ``vm`` unless a higher one is already held."""
        try:
            with self.engine.begin() as conn:
                held = conn.execute(
                    select(policy_serials_table.c.serial).where(policy_serials_table.c.vm == vm)
                ).first()
                if held is None:
                    conn.execute(insert(policy_serials_table).values(
                        vm=vm, serial=serial, updated_at=time.time()))  # fmt: skip
                elif int(held[0]) < serial:
                    conn.execute(update(policy_serials_table)
                                 .where(policy_serials_table.c.vm == vm)
                                 .values(serial=serial, updated_at=time.time()))  # fmt: skip
        except Exception as e:  # noqa: BLE001
            raise JournalError(f"host journal {self.path}: write failed: {e}") from None

    # ------------------------------------------------------------------ audit witnesses
    def witness(self, host: str) -> tuple[int, str] | None:
        """The longest chain ``host`` reported here: ``(length, head)``, or None."""
        t = audit_witness_table.c
        with self.engine.connect() as conn:
            row = conn.execute(select(t.length, t.head).where(t.host == host)).first()
        return (int(row[0]), str(row[1])) if row else None

    def note_witness(
        self, host: str, length: int, head: str, *, reset: bool = False
    ) -> tuple[int, str] | None:
        """Keep ``(length, head)`` for ``host`` if it is longer (or ``reset``, after an
        acknowledged loss); returns what was held before."""
        t = audit_witness_table.c
        try:
            with self.engine.begin() as conn:
                row = conn.execute(select(t.length, t.head).where(t.host == host)).first()
                held = (int(row[0]), str(row[1])) if row else None
                values = {"length": length, "head": head, "updated_at": time.time()}
                if held is None:
                    conn.execute(insert(audit_witness_table).values(host=host, **values))
                elif reset or length >= held[0]:
                    conn.execute(update(audit_witness_table).where(t.host == host).values(**values))
        except Exception as e:  # noqa: BLE001
            raise JournalError(f"host journal {self.path}: write failed: {e}") from None
        return held

    # ------------------------------------------------------------------ migrations
    def put_migration(
        self, row: MigrationRow, vm: VmRow | None = None, *, drop_vm: str | None = None
    ) -> None:
        """Write a migration and, in the same transaction, the VM it changes (or drop it)."""
        now = time.time()
        values = {
            "role": row.role,
            "vm": row.vm,
            "peer": row.peer,
            "state": row.state,
            "epoch": row.epoch,
            "core": json.dumps(row.core, sort_keys=True),
            "context": json.dumps(row.context, sort_keys=True),
            "terminal": int(row.terminal),
            "updated_at": now,
        }
        try:
            with self.engine.begin() as conn:
                n = conn.execute(
                    update(migrations_table).where(migrations_table.c.id == row.id).values(**values)
                ).rowcount
                if not n:
                    conn.execute(
                        insert(migrations_table).values(id=row.id, created_at=now, **values)
                    )
                if vm is not None:
                    self._put_vm(conn, vm)
                if drop_vm is not None:
                    conn.execute(delete(vms_table).where(vms_table.c.name == drop_vm))
        except Exception as e:  # noqa: BLE001
            raise JournalError(f"host journal {self.path}: write failed: {e}") from None

    def migrations(self, *, active_only: bool = False, limit: int = 200) -> list[MigrationRow]:
        q = select(migrations_table).order_by(migrations_table.c.created_at.desc()).limit(limit)
        if active_only:
            q = q.where(migrations_table.c.terminal == 0)
        with self.engine.connect() as conn:
            rows = conn.execute(q).mappings().all()
        return [_migration_row(r) for r in rows]

    def migration(self, migration_id: str) -> MigrationRow | None:
        with self.engine.connect() as conn:
            r = (
                conn.execute(select(migrations_table).where(migrations_table.c.id == migration_id))
                .mappings()
                .first()
            )
        return _migration_row(r) if r is not None else None

    def close(self) -> None:
        self.engine.dispose()


def _definition_row(r: Any) -> DefinitionRow:
    return DefinitionRow(
        name=r["name"],
        tenant=r["tenant"],
        owner=r["owner"],
        definition=json.loads(r["definition"]),
        defined_by=r["defined_by"],
    )


def _migration_row(r: Any) -> MigrationRow:
    return MigrationRow(
        id=r["id"],
        role=r["role"],
        vm=r["vm"],
        peer=r["peer"],
        state=r["state"],
        epoch=r["epoch"],
        core=json.loads(r["core"]),
        context=json.loads(r["context"]),
        terminal=bool(r["terminal"]),
        created_at=r["created_at"],
        updated_at=r["updated_at"],
    )
