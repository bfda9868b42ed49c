"""The host's append-only, hash-chained, signed audit log.

Why checkpoints rather than a signature per event
    Each event carries the hash of its predecessor, so signing the head of the chain signs every
    event before it. A checkpoint row (upto_seq, head_hash, Ed25519 signature over host, upto_seq
    and head_hash) is written every `checkpoint_every` events (default 256), on every flush() and
    on close(). One signature per batch instead of per event is what lets the log keep up with
    tens of thousands of events per second, while every event is still covered by the signature
    of the next checkpoint through the chain.

Durability
    Appends are buffered in memory and inserted in one transaction together with their
    checkpoint. flush() is the durability point: when it returns, every event appended so far is
    committed (SQLite: WAL with synchronous=FULL) and signed. The agent flushes after every
    migration phase and at shutdown, so a crash loses at most the events of the phase in progress.

Truncation window
    A checkpoint covering seq N proves events 1..N existed; someone able to write the database can
    only silently drop events that no checkpoint covers yet. Flushing on every phase keeps that
    window to a handful of events; verify() reports the uncovered tail as a warning (an error
    with strict=True) and a checkpoint pointing beyond the end of the log as truncation.

One writer per host
    Each host's chain lives under its own `host` key, so a cluster can keep every host's trail in
    one PostgreSQL database. Only one AuditLog with a signing key may write a given host's chain;
    a second writer is stopped by the unique (host, seq) index when it commits.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection, func, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from trustmig.audit.canonical import (
    GENESIS_HASH,
    canonical_data,
    canonical_json,
    checkpoint_message,
    event_hash,
    utc_now,
)
from trustmig.audit.errors import (
    AuditClosedError,
    AuditConfigError,
    AuditInputError,
    AuditReadOnlyError,
    AuditStorageError,
)
from trustmig.audit.model import AuditEvent, VerifyReport
from trustmig.audit.receipts import normalise_receipt, verify_receipt
from trustmig.audit.schema import (
    checkpoints_table,
    events_table,
    make_engine,
    metadata,
    receipts_table,
)
from trustmig.audit.verify import StoredCheckpoint, StoredEvent, StoredReceipt, verify_rows

_KIND_RE = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)*$")
_MAX_KIND = 64
_MAX_TEXT = 255
_SIG_LEN = 64

_EVENT_COLUMNS = (
    events_table.c.id,
    events_table.c.seq,
    events_table.c.ts,
    events_table.c.host,
    events_table.c.kind,
    events_table.c.vm,
    events_table.c.migration_id,
    events_table.c.user,
    events_table.c.outcome,
    events_table.c.data,
    events_table.c.prev_hash,
    events_table.c.hash,
)


def _check_text(name: str, value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value or len(value) > _MAX_TEXT:
        raise AuditInputError(
            f"event {name} is {value!r}: pass None or a string of 1..{_MAX_TEXT} characters"
        )


def _row_to_event(row: Any) -> AuditEvent:
    return AuditEvent(
        seq=row.seq,
        ts=row.ts,
        host=row.host,
        kind=row.kind,
        vm=row.vm,
        migration_id=row.migration_id,
        user=row.user,
        outcome=row.outcome,
        data=json.loads(row.data),
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


class AuditLog:
    """A host's audit trail in a SQLAlchemy database (SQLite in WAL mode, or PostgreSQL).

    All methods are thread-safe: one lock serialises appends, flushes and reads, which keeps the
    chain linear and lets an in-memory SQLite database share its single connection.
    """

    def __init__(
        self,
        url: str,
        *,
        host: str,
        signing_key: Ed25519PrivateKey | None,
        checkpoint_every: int = 256,
    ) -> None:
        if not isinstance(host, str) or not host or len(host) > _MAX_TEXT or host != host.strip():
            raise AuditConfigError(
                f"audit host name {host!r} is unusable: pass the host's non-empty name "
                f"(at most {_MAX_TEXT} characters, no surrounding spaces)"
            )
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int):
            raise AuditConfigError(
                f"checkpoint_every is {checkpoint_every!r}: pass a positive integer such as 256"
            )
        if checkpoint_every < 1:
            raise AuditConfigError(
                f"checkpoint_every is {checkpoint_every}: pass a positive integer such as 256"
            )
        if signing_key is not None and not isinstance(signing_key, Ed25519PrivateKey):
            raise AuditConfigError(
                f"audit signing key is a {type(signing_key).__name__}: pass the host's Ed25519 "
                "audit key, or None to open the log read-only"
            )
        self._host = host
        self._key = signing_key
        self._public_key = signing_key.public_key() if signing_key is not None else None
        self._every = checkpoint_every
        self._lock = threading.RLock()
        self._pending: list[dict[str, Any]] = []
        self._closed = False
        if signing_key is None:
            self._refuse_missing_sqlite_file(url)
        self._engine = make_engine(url)
        try:
            self._prepare_schema()
            self._seq, self._head, self._signed_upto = self._load_head()
        except BaseException:
            self._engine.dispose()
            raise

    # ----------------------------------------------------------------- opening

    @staticmethod
    def _refuse_missing_sqlite_file(url: str) -> None:
        """A read-only open must not create an empty database where the trail was expected."""
        try:
            parsed = make_url(url)
        except Exception:
            return  # make_engine reports the bad URL
        if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
            return
        if not os.path.exists(parsed.database):
            raise AuditStorageError(
                f"audit database {parsed.database} does not exist: check the path, or open it "
                "with the host's signing key to create a new trail"
            )

    def _prepare_schema(self) -> None:
        try:
            if self._key is not None:
                metadata.create_all(self._engine)
                return
            names = set(inspect(self._engine).get_table_names())
        except SQLAlchemyError as exc:
            raise AuditStorageError(
                f"cannot open the audit database: {str(exc).splitlines()[0]}; check the URL, "
                "permissions and that the database server is reachable"
            ) from exc
        missing = {t.name for t in metadata.sorted_tables} - names
        if missing:
            raise AuditStorageError(
                f"database holds no audit trail (missing tables {', '.join(sorted(missing))}): "
                "check the URL, or open it with the host's signing key to create one"
            )

    def _load_head(self) -> tuple[int, str, int]:
        ev = events_table.c
        with self._connect() as conn:
            last = conn.execute(
                select(ev.seq, ev.hash)
                .where(ev.host == self._host)
                .order_by(ev.seq.desc(), ev.id.desc())
                .limit(1)
            ).first()
            signed = conn.execute(
                select(func.max(checkpoints_table.c.upto_seq)).where(
                    checkpoints_table.c.host == self._host
                )
            ).scalar()
        if last is None:
            return 0, GENESIS_HASH, int(signed or 0)
        return int(last.seq), str(last.hash), int(signed or 0)

    def _connect(self) -> Connection:
        try:
            return self._engine.connect()
        except SQLAlchemyError as exc:
            raise AuditStorageError(
                f"cannot connect to the audit database: {str(exc).splitlines()[0]}; check the "
                "URL and permissions"
            ) from exc

    # ----------------------------------------------------------------- properties

    @property
    def host(self) -> str:
        """The host whose chain this log reads and writes."""
        return self._host

    @property
    def length(self) -> int:
        """Events in the chain, pending ones included (no disk access)."""
        with self._lock:
            return self._seq

    @property
    def public_key(self) -> Ed25519PublicKey | None:
        """Public half of the signing key (None when read-only): what verify() needs."""
        return self._public_key

    # ----------------------------------------------------------------- writing

    def _check_open(self) -> None:
        if self._closed:
            raise AuditClosedError("audit log is closed: open a new AuditLog to use the trail")

    def _check_writable(self) -> Ed25519PrivateKey:
        self._check_open()
        if self._key is None:
            raise AuditReadOnlyError(
                "audit log was opened read-only (no signing key): open it with the host's audit "
                "key to append, flush or store receipts"
            )
        return self._key

    def append(
        self,
        kind: str,
        *,
        vm: str | None = None,
        migration_id: str | None = None,
        user: str | None = None,
        outcome: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        """Add one event to the chain; durable and signed at the next checkpoint or flush()."""
        if not isinstance(kind, str) or len(kind) > _MAX_KIND or not _KIND_RE.match(kind):
            raise AuditInputError(
                f"event kind {kind!r} is malformed: use dotted lower-case words such as "
                f"'migration.phase' (at most {_MAX_KIND} characters)"
            )
        _check_text("vm", vm)
        _check_text("migration_id", migration_id)
        _check_text("user", user)
        _check_text("outcome", outcome)
        data_obj, data_text = canonical_data(data)
        with self._lock:
            self._check_writable()
            seq = self._seq + 1
            ts = utc_now()
            digest = event_hash(
                seq=seq,
                ts=ts,
                host=self._host,
                kind=kind,
                vm=vm,
                migration_id=migration_id,
                user=user,
                outcome=outcome,
                data=data_obj,
                prev_hash=self._head,
            )
            self._pending.append(
                {
                    "host": self._host,
                    "seq": seq,
                    "ts": ts,
                    "kind": kind,
                    "vm": vm,
                    "migration_id": migration_id,
                    "user": user,
                    "outcome": outcome,
                    "data": data_text,
                    "prev_hash": self._head,
                    "hash": digest,
                }
            )
            prev_hash = self._head
            self._seq = seq
            self._head = digest
            if seq - self._signed_upto >= self._every:
                self._flush_locked()
        return AuditEvent(
            seq=seq,
            ts=ts,
            host=self._host,
            kind=kind,
            vm=vm,
            migration_id=migration_id,
            user=user,
            outcome=outcome,
            data=data_obj,
            prev_hash=prev_hash,
            hash=digest,
        )

    def durable_head(self) -> tuple[int, str]:
        """``(length, head hash)`` of the chain as stored (flushes pending events first when
        writable): what peers witness, so a later truncation or rewrite shows."""
        with self._lock:
            if self._key is not None and not self._closed:
                self._flush_locked()
            return self._seq, self._head

    def hash_at(self, seq: int) -> str | None:
        """Hash of this host's event number ``seq`` (None if the trail holds no such event)."""
        with self._lock:
            self._check_open()
            for row in self._pending:
                if row["seq"] == seq:
                    return str(row["hash"])
            ev = events_table.c
            with self._connect() as conn:
                found = conn.execute(
                    select(ev.hash).where(ev.host == self._host, ev.seq == seq).limit(1)
                ).scalar()
        return None if found is None else str(found)

    def flush(self) -> None:
        """Commit every pending event and sign a checkpoint over the head (the durability point)."""
        with self._lock:
            self._check_writable()
            self._flush_locked()

    def _write(self, checkpoint: bool, extra: Callable[[Connection], None] | None = None) -> None:
        """Insert pending events (plus `extra` rows and a checkpoint) in one transaction."""
        key = self._key
        need_checkpoint = checkpoint and key is not None and self._seq > self._signed_upto
        if not self._pending and extra is None and not need_checkpoint:
            return
        try:
            with self._engine.begin() as conn:
                if self._pending:
                    conn.execute(events_table.insert(), self._pending)
                if extra is not None:
                    extra(conn)
                if need_checkpoint and key is not None:
                    conn.execute(
                        checkpoints_table.insert(),
                        {
                            "host": self._host,
                            "upto_seq": self._seq,
                            "head_hash": self._head,
                            "ts": utc_now(),
                            "signature": key.sign(
                                checkpoint_message(self._host, self._seq, self._head)
                            ).hex(),
                        },
                    )
        except IntegrityError as exc:
            first = self._pending[0]["seq"] if self._pending else self._seq
            raise AuditStorageError(
                f"another writer already stored seq {first} of host {self._host}'s chain (or "
                "this receipt): run exactly one agent per host against the audit database"
            ) from exc
        except SQLAlchemyError as exc:
            raise AuditStorageError(
                f"writing the audit trail failed: {str(exc).splitlines()[0]}; the "
                f"{len(self._pending)} pending event(s) stay buffered, retry flush()"
            ) from exc
        self._pending.clear()
        if need_checkpoint:
            self._signed_upto = self._seq

    def _flush_locked(self, extra: Callable[[Connection], None] | None = None) -> None:
        self._write(checkpoint=True, extra=extra)

    def _commit_pending_locked(self) -> None:
        """Make buffered events visible to queries; they stay unsigned until the next checkpoint."""
        if self._key is not None and not self._closed:
            self._write(checkpoint=False)

    def close(self) -> None:
        """Flush (commit + checkpoint) when writable, then release the database. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._key is not None:
                    self._flush_locked()
            finally:
                self._closed = True
                self._engine.dispose()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------- reading

    def events(
        self,
        *,
        vm: str | None = None,
        migration_id: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
    ) -> list[AuditEvent]:
        """Matching events of this host, oldest first; with `limit`, only the newest `limit`."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise AuditInputError(f"limit is {limit!r}: pass None or a non-negative integer")
        if limit is not None and limit < 0:
            raise AuditInputError(f"limit is {limit}: pass None or a non-negative integer")
        ev = events_table.c
        stmt = select(*_EVENT_COLUMNS).where(ev.host == self._host)
        if vm is not None:
            stmt = stmt.where(ev.vm == vm)
        if migration_id is not None:
            stmt = stmt.where(ev.migration_id == migration_id)
        if kind is not None:
            stmt = stmt.where(ev.kind == kind)
        if limit is not None:
            stmt = stmt.order_by(ev.seq.desc(), ev.id.desc()).limit(limit)
        else:
            stmt = stmt.order_by(ev.seq, ev.id)
        with self._lock:
            self._check_open()
            self._commit_pending_locked()
            with self._connect() as conn:
                rows = conn.execute(stmt).all()
        out = [_row_to_event(r) for r in rows]
        if limit is not None:
            out.reverse()
        return out

    def export_jsonl(self, fp: TextIO) -> int:
        """Write every event of this host as one JSON object per line; return how many."""
        ev = events_table.c
        stmt = select(*_EVENT_COLUMNS).where(ev.host == self._host).order_by(ev.seq, ev.id)
        count = 0
        with self._lock:
            self._check_open()
            self._commit_pending_locked()
            with self._connect() as conn:
                result = conn.execution_options(yield_per=2000).execute(stmt)
                for row in result:
                    fp.write(canonical_json(_row_to_event(row).to_json()))
                    fp.write("\n")
                    count += 1
        return count

    def verify(self, public_key: Ed25519PublicKey, *, strict: bool = False) -> VerifyReport:
        """Walk this host's whole chain, its checkpoints and receipts; report every problem."""
        if not isinstance(public_key, Ed25519PublicKey):
            raise AuditInputError(
                f"verification key is a {type(public_key).__name__}: pass the host's Ed25519 "
                "audit public key"
            )
        ev, cp, rc = events_table.c, checkpoints_table.c, receipts_table.c
        with self._lock:
            self._check_open()
            self._commit_pending_locked()
            with self._connect() as conn:
                rows = [
                    StoredEvent._make(r)
                    for r in conn.execute(
                        select(*_EVENT_COLUMNS).where(ev.host == self._host).order_by(ev.seq, ev.id)
                    )
                ]
                checkpoints = [
                    StoredCheckpoint._make(r)
                    for r in conn.execute(
                        select(cp.id, cp.upto_seq, cp.head_hash, cp.ts, cp.signature)
                        .where(cp.host == self._host)
                        .order_by(cp.upto_seq, cp.id)
                    )
                ]
                receipts = [
                    StoredReceipt._make(r)
                    for r in conn.execute(
                        select(rc.migration_id, rc.fields, rc.own_sig)
                        .where(rc.host == self._host)
                        .order_by(rc.id)
                    )
                ]
        return verify_rows(
            self._host, rows, checkpoints, public_key, receipts=receipts, strict=strict
        )

    # ----------------------------------------------------------------- receipts

    def store_receipt(
        self, fields: Mapping[str, Any], own_sig: bytes, peer_host: str, peer_sig: bytes
    ) -> None:
        """Keep a migration receipt with both hosts' signatures and append it as an event.

        The own signature is checked against this host's key. The peer's signature cannot be
        checked here (the log does not know the peer's key): verify it with verify_receipt and
        the peer's audit public key before calling this.
        """
        receipt = normalise_receipt(fields)
        key = self._check_writable()
        if not isinstance(own_sig, bytes | bytearray) or len(own_sig) != _SIG_LEN:
            raise AuditInputError(
                "own receipt signature is not 64 bytes: pass the result of sign_receipt()"
            )
        if not isinstance(peer_sig, bytes | bytearray) or len(peer_sig) != _SIG_LEN:
            raise AuditInputError(
                "peer receipt signature is not 64 bytes: pass the peer's Ed25519 signature"
            )
        if not verify_receipt(key.public_key(), receipt, bytes(own_sig)):
            raise AuditInputError(
                "own receipt signature does not verify with this host's audit key: sign the same "
                "fields with sign_receipt() and this host's key"
            )
        source, destination = receipt["source"], receipt["destination"]
        if self._host not in (source, destination):
            raise AuditInputError(
                f"receipt moves a VM from {source} to {destination}, not involving this host "
                f"{self._host}: store receipts only on the source and destination"
            )
        expected_peer = destination if self._host == source else source
        if peer_host != expected_peer:
            raise AuditInputError(
                f"receipt peer host is {peer_host!r} but the other end of this migration is "
                f"{expected_peer!r}: pass the other host's name"
            )
        migration_id = str(receipt["migration_id"])
        row = {
            "host": self._host,
            "migration_id": migration_id,
            "vm": receipt["vm"],
            "user": receipt["user"],
            "source": source,
            "destination": destination,
            "stream_digest": receipt["stream_digest"],
            "outcome": receipt["outcome"],
            "ts": receipt["ts"],
            "fields": canonical_json(receipt),
            "own_sig": bytes(own_sig).hex(),
            "peer_host": peer_host,
            "peer_sig": bytes(peer_sig).hex(),
        }
        with self._lock:
            self._check_writable()
            self._commit_pending_locked()
            with self._connect() as conn:
                exists = conn.execute(
                    select(receipts_table.c.id).where(
                        receipts_table.c.host == self._host,
                        receipts_table.c.migration_id == migration_id,
                    )
                ).first()
            if exists is not None:
                raise AuditInputError(
                    f"a receipt for migration {migration_id} is already stored on {self._host}: "
                    "each migration has exactly one receipt"
                )
            self.append(
                "receipt",
                vm=receipt["vm"],
                migration_id=migration_id,
                user=receipt["user"],
                outcome=receipt["outcome"],
                data={
                    "receipt": receipt,
                    "own_sig": row["own_sig"],
                    "peer_host": peer_host,
                    "peer_sig": row["peer_sig"],
                },
            )

            def insert_receipt(conn: Connection) -> None:
                conn.execute(receipts_table.insert(), row)

            self._flush_locked(extra=insert_receipt)

    def receipts(self, migration_id: str | None = None) -> list[dict[str, Any]]:
        """Stored receipts of this host: {migration_id, fields, host, own_sig, peer_host, peer_sig}.

        Signatures are returned as bytes, ready for verify_receipt().
        """
        rc = receipts_table.c
        stmt = select(rc.migration_id, rc.fields, rc.own_sig, rc.peer_host, rc.peer_sig).where(
            rc.host == self._host
        )
        if migration_id is not None:
            stmt = stmt.where(rc.migration_id == migration_id)
        with self._lock:
            self._check_open()
            with self._connect() as conn:
                rows = conn.execute(stmt.order_by(rc.id)).all()
        return [
            {
                "migration_id": r.migration_id,
                "fields": json.loads(r.fields),
                "host": self._host,
                "own_sig": bytes.fromhex(r.own_sig),
                "peer_host": r.peer_host,
                "peer_sig": bytes.fromhex(r.peer_sig),
            }
            for r in rows
        ]
