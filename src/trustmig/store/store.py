"""The cluster store: shared state of many hosts in one database (PostgreSQL for a cluster,
SQLite for a single host).

What it holds is what no single host may decide alone: which host owns each VM (and the epoch
of its last handover), the cluster-wide quarantine, every host's last attestation verdict,
attested capacity and measured load, migrations and their state, and the longest audit chain
head each host was seen with.

The one rule it enforces itself: a VM has exactly one owner. A handover is a compare-and-swap
(``UPDATE ... WHERE owner = source AND epoch = expected``) in one transaction, so two hosts can
never both be recorded as owners, whatever order their writes arrive in. Every method raises
:class:`StoreUnavailable` when the database cannot be reached; callers that can carry on (a
migration that needs no cluster decision) queue the write and replay it later.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError

from trustmig.store import schema as s
from trustmig.store.errors import OwnershipConflict, StoreError, StoreUnavailable

CONNECT_TIMEOUT_S = 3


class _Raced(StoreError):
    """Another writer inserted the same row first: the operation is run once more."""

    def __init__(self) -> None:
        super().__init__("conflict", "a concurrent write to the cluster store won; try again")


def _once_more(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a read-then-insert once more when a concurrent insert of the same key won."""

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _Raced:
            return fn(*args, **kwargs)

    run.__doc__, run.__name__ = fn.__doc__, fn.__name__
    return run


@dataclass(frozen=True)
class VmRecord:
    name: str
    tenant: str
    owner: str
    epoch: int
    mem_mib: int
    vcpus: int
    updated_at: float = 0.0


@dataclass(frozen=True)
class HeadCheck:
    """A host's audit head against the longest the store saw: ``ok``, ``shorter`` (the trail
    lost events) or ``diverged`` (same length, other head: rewritten)."""

    verdict: str
    known_length: int
    known_head: str


def _engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise StoreError("invalid", f"store url {url!r} is not a database URL: {e}") from None
    if parsed.get_backend_name() == "sqlite":
        eng = create_engine(url)

        @event.listens_for(eng, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=5000")
            cur.close()

        return eng
    if parsed.get_backend_name() != "postgresql":
        raise StoreError("invalid", f"store url {url!r}: use postgresql+psycopg:// or sqlite://")
    return create_engine(url, pool_pre_ping=True,
                         connect_args={"connect_timeout": CONNECT_TIMEOUT_S})  # fmt: skip


class ClusterStore:
    """One handle on the store; thread-safe (SQLAlchemy's pool), every call one transaction."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock

    @classmethod
    def open(cls, url: str, clock: Callable[[], float] = time.time) -> ClusterStore:
        """Connect and create missing tables; raises StoreUnavailable or StoreError(invalid)."""
        store = cls(_engine(url), clock)
        with store._tx() as conn:
            s.metadata.create_all(conn)
        return store

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except OperationalError as e:
            first = str(e.orig if e.orig is not None else e).strip().splitlines()
            raise StoreUnavailable(
                f"cluster store unreachable: {first[0] if first else e}"
            ) from None
        except IntegrityError:
            raise _Raced() from None
        except SQLAlchemyError as e:
            raise StoreError("invalid", f"cluster store refused the write: {e}") from None

    # ------------------------------------------------------------------------------- VMs
    @_once_more
    def place(self, vm: str, tenant: str, host: str, epoch: int, mem_mib: int, vcpus: int) -> None:
        """Record that ``host`` runs ``vm`` (it started there). Idempotent for the same owner;
        raises OwnershipConflict when another host owns it."""
        with self._tx() as conn:
            row = conn.execute(select(s.vms).where(s.vms.c.name == vm)).first()
            if row is None:
                conn.execute(insert(s.vms).values(name=vm, tenant=tenant, owner_host=host,
                                                  epoch=epoch, mem_mib=mem_mib, vcpus=vcpus,
                                                  updated_at=self.clock()))  # fmt: skip
                return
            if row.owner_host != host:
                raise OwnershipConflict(vm, row.owner_host, row.epoch,
                                        f"VM {vm} is owned by {row.owner_host} (epoch "
                                        f"{row.epoch}), not {host}")  # fmt: skip
            done = conn.execute(
                update(s.vms)
                .where(s.vms.c.name == vm, s.vms.c.owner_host == host,
                       s.vms.c.epoch == row.epoch)
                .values(epoch=max(epoch, row.epoch), mem_mib=mem_mib, vcpus=vcpus,
                        updated_at=self.clock())
            ).rowcount  # fmt: skip
            if done != 1:  # a handover won meanwhile: report it like any other owner
                raise OwnershipConflict(vm, None, None, f"VM {vm} changed owner meanwhile")

    def hand_over(self, vm: str, source: str, expected_epoch: int, destination: str,
                  new_epoch: int) -> None:  # fmt: skip
        """Move ownership of ``vm`` from ``source`` at ``expected_epoch`` to ``destination`` at
        ``new_epoch``: a compare-and-swap. Replaying a handover that already happened is a
        no-op; anything else that does not match raises OwnershipConflict."""
        if new_epoch <= expected_epoch:
            raise StoreError("invalid", f"handover of {vm}: the new epoch must exceed the old")
        with self._tx() as conn:
            done = conn.execute(
                update(s.vms)
                .where(s.vms.c.name == vm, s.vms.c.owner_host == source,
                       s.vms.c.epoch == expected_epoch)
                .values(owner_host=destination, epoch=new_epoch, updated_at=self.clock())
            ).rowcount  # fmt: skip
            if done == 1:
                return
            row = conn.execute(select(s.vms).where(s.vms.c.name == vm)).first()
        if row is not None and row.owner_host == destination and row.epoch == new_epoch:
            return  # the same handover, replayed after a lost answer
        owner, epoch = (row.owner_host, row.epoch) if row is not None else (None, None)
        raise OwnershipConflict(vm, owner, epoch,
                                f"handover of {vm} {source}@{expected_epoch} -> {destination}: "
                                f"the store has it on {owner} at epoch {epoch}")  # fmt: skip

    def release(self, vm: str, host: str, epoch: int | None = None) -> bool:
        """Forget ``vm`` if ``host`` owns it (at ``epoch``, when given): it stopped, or left in
        a handover. False when the record is not (or no longer) this host's."""
        cond = [s.vms.c.name == vm, s.vms.c.owner_host == host]
        if epoch is not None:
            cond.append(s.vms.c.epoch == epoch)
        with self._tx() as conn:
            return bool(conn.execute(delete(s.vms).where(*cond)).rowcount)

    def owner(self, vm: str) -> VmRecord | None:
        with self._tx() as conn:
            row = conn.execute(select(s.vms).where(s.vms.c.name == vm)).first()
        return None if row is None else _vm(row)

    def vms(self, host: str | None = None) -> list[VmRecord]:
        q = select(s.vms).order_by(s.vms.c.name)
        if host is not None:
            q = q.where(s.vms.c.owner_host == host)
        with self._tx() as conn:
            return [_vm(r) for r in conn.execute(q)]

    # ----------------------------------------------------------------------------- hosts
    def record_attestation(self, host: str, ok: bool, verdict: str,
                           capacity: tuple[int, int] | None) -> None:  # fmt: skip
        values: dict[str, Any] = {"attested": ok, "verdict": verdict[:2000],
                                  "verdict_at": self.clock()}  # fmt: skip
        if capacity is not None:
            values |= {"capacity_mem_mib": capacity[0], "capacity_vcpus": capacity[1]}
        self._upsert_host(host, values)

    def record_load(self, host: str, load: dict[str, Any]) -> None:
        self._upsert_host(host, {"load_json": json.dumps(load, sort_keys=True),
                                 "load_at": self.clock()})  # fmt: skip

    @_once_more
    def _upsert_host(self, host: str, values: dict[str, Any]) -> None:
        with self._tx() as conn:
            done = conn.execute(update(s.hosts).where(s.hosts.c.name == host).values(**values))
            if done.rowcount == 0:
                conn.execute(insert(s.hosts).values(name=host, **{"verdict": "", **values}))

    def hosts(self) -> dict[str, dict[str, Any]]:
        with self._tx() as conn:
            rows = list(conn.execute(select(s.hosts).order_by(s.hosts.c.name)))
        out = {}
        for r in rows:
            doc = dict(r._mapping)
            doc["load"] = json.loads(doc.pop("load_json")) if doc["load_json"] else None
            out[doc.pop("name")] = doc
        return out

    # ------------------------------------------------------------------------ quarantine
    @_once_more
    def quarantine(self, host: str, reason: str, by_host: str) -> None:
        """Quarantine ``host`` cluster-wide (re-adding keeps the first entry)."""
        if not host or not reason:
            raise StoreError("invalid", "quarantine needs a host name and a reason")
        with self._tx() as conn:
            if conn.execute(select(s.quarantine.c.host).where(s.quarantine.c.host == host)).first():
                return
            entry = {"host": host, "reason": reason[:2000], "by_host": by_host,
                     "since": self.clock()}  # fmt: skip
            conn.execute(insert(s.quarantine).values(**entry))

    def clear_quarantine(self, host: str, cleared_by: str) -> dict[str, Any]:
        """Lift ``host``'s quarantine once, for every host; raises StoreError(invalid) when it
        is not quarantined (someone cleared it already)."""
        with self._tx() as conn:
            row = conn.execute(select(s.quarantine).where(s.quarantine.c.host == host)).first()
            gone = conn.execute(delete(s.quarantine).where(s.quarantine.c.host == host)).rowcount
            if row is None or gone != 1:
                raise StoreError("invalid", f"host {host} is not quarantined; nothing to clear")
            entry = {"host": host, "reason": row.reason, "since": row.since,
                     "cleared_by": cleared_by, "cleared_at": self.clock()}  # fmt: skip
            conn.execute(insert(s.quarantine_cleared).values(**entry))
        return entry

    def note_cleared(self, host: str, cleared_by: str) -> None:
        """Record a lift of a quarantine the store never held (it was still only local), so
        that no agent's stale entry pushes it back."""
        entry = {"host": host, "reason": "(local entry)", "since": self.clock(),
                 "cleared_by": cleared_by, "cleared_at": self.clock()}  # fmt: skip
        with self._tx() as conn:
            conn.execute(insert(s.quarantine_cleared).values(**entry))

    def cleared_at(self) -> dict[str, float]:
        """When each host's quarantine was last lifted (hosts never cleared are absent)."""
        c = s.quarantine_cleared.c
        with self._tx() as conn:
            rows = conn.execute(select(c.host, func.max(c.cleared_at)).group_by(c.host))
            return {str(h): float(t) for h, t in rows}

    def quarantined(self) -> dict[str, dict[str, Any]]:
        with self._tx() as conn:
            rows = list(conn.execute(select(s.quarantine)))
        return {r.host: {"reason": r.reason, "by_host": r.by_host, "since": r.since} for r in rows}

    # -------------------------------------------------------------------------- migrations
    @_once_more
    def migration(self, mid: str, vm: str, source: str, destination: str, state: str,
                  error: str | None = None) -> None:  # fmt: skip
        values = {"vm": vm, "source": source, "destination": destination, "state": state,
                  "error": error, "updated_at": self.clock()}  # fmt: skip
        with self._tx() as conn:
            done = conn.execute(update(s.migrations).where(s.migrations.c.id == mid)
                                .values(**values))  # fmt: skip
            if done.rowcount == 0:
                conn.execute(insert(s.migrations).values(id=mid, **values))

    def migrations(self, limit: int = 100) -> list[dict[str, Any]]:
        q = select(s.migrations).order_by(s.migrations.c.updated_at.desc()).limit(limit)
        with self._tx() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    # ------------------------------------------------------------------------ audit heads
    @_once_more
    def check_audit_head(self, host: str, length: int, head: str) -> HeadCheck:
        """Compare ``host``'s chain with the longest seen and keep the longer: a host whose
        trail was truncated or rewritten cannot hide it from the others."""
        with self._tx() as conn:
            row = conn.execute(select(s.audit_heads).where(s.audit_heads.c.host == host)).first()
            if row is None:
                conn.execute(insert(s.audit_heads).values(host=host, length=length, head=head,
                                                          at=self.clock()))  # fmt: skip
                return HeadCheck("ok", length, head)
            if length < row.length:
                return HeadCheck("shorter", row.length, row.head)
            if length == row.length and head != row.head:
                return HeadCheck("diverged", row.length, row.head)
            conn.execute(update(s.audit_heads).where(s.audit_heads.c.host == host)
                         .values(length=length, head=head, at=self.clock()))  # fmt: skip
            return HeadCheck("ok", length, head)


def _vm(row: Any) -> VmRecord:
    return VmRecord(row.name, row.tenant, row.owner_host, row.epoch, row.mem_mib, row.vcpus,
                    row.updated_at)  # fmt: skip
