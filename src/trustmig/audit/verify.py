"""Verification of a host's audit trail: chain, checkpoints and stored receipts.

This is pure logic over rows already loaded from the database, so it can be exercised on any
backend (or on rows read from an export) and names every problem by the entry it concerns.

How each kind of tampering shows up:

* modified: an entry's stored hash no longer matches its content;
* deleted: a gap in seq (and a checkpoint naming a seq that is gone);
* inserted: a duplicate seq, or an entry no other entry links to, sitting between two entries
  that link to each other;
* reordered: an entry whose prev_hash points at an entry elsewhere in the log;
* truncated tail: a validly signed checkpoint covering a seq beyond the end of the log;
* forged checkpoint: a checkpoint signature that does not verify with the host's key.

Events after the last checkpoint are not covered by any signature yet: they are reported as a
warning (an error with ``strict=True``), because whoever can write the database could have
removed or forged them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from trustmig.audit.canonical import GENESIS_HASH, checkpoint_message, event_hash
from trustmig.audit.model import VerifyReport
from trustmig.audit.receipts import receipt_bytes

MAX_LISTED_PROBLEMS = 1000
"""Beyond this many, problems are counted but not listed (a renumbered log names every entry)."""


class StoredEvent(NamedTuple):
    """An event row as read from the database, data still as stored text."""

    id: int
    seq: int
    ts: str
    host: str
    kind: str
    vm: str | None
    migration_id: str | None
    user: str | None
    outcome: str | None
    data: str
    prev_hash: str
    hash: str


class StoredCheckpoint(NamedTuple):
    """A checkpoint row as read from the database."""

    id: int
    upto_seq: int
    head_hash: str
    ts: str
    signature: str


class StoredReceipt(NamedTuple):
    """The parts of a receipt row that verification needs."""

    migration_id: str
    fields: str
    own_sig: str


class _Problems:
    """Collects problems, listing the first MAX_LISTED_PROBLEMS and counting the rest."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.dropped = 0

    def add(self, message: str) -> None:
        if len(self.items) < MAX_LISTED_PROBLEMS:
            self.items.append(message)
        else:
            self.dropped += 1

    def finish(self) -> list[str]:
        if self.dropped:
            self.items.append(f"... and {self.dropped} more problems not listed")
        return self.items


def _content_hash(row: StoredEvent, data: Any, seq: int) -> str:
    return event_hash(
        seq=seq,
        ts=row.ts,
        host=row.host,
        kind=row.kind,
        vm=row.vm,
        migration_id=row.migration_id,
        user=row.user,
        outcome=row.outcome,
        data=data,
        prev_hash=row.prev_hash,
    )


def _check_contents(rows: Sequence[StoredEvent], problems: _Problems) -> None:
    for row in rows:
        try:
            data = json.loads(row.data)
        except ValueError:
            problems.add(f"modified: seq {row.seq} (row id {row.id}) holds data that is not JSON")
            continue
        if _content_hash(row, data, row.seq) == row.hash:
            continue
        renumbered = next(
            (s for s in (row.seq - 1, row.seq + 1) if _content_hash(row, data, s) == row.hash),
            None,
        )
        if renumbered is not None:
            problems.add(
                f"modified: hash mismatch at seq {row.seq} (the entry was renumbered: its hash "
                f"is valid for seq {renumbered})"
            )
        else:
            problems.add(
                f"modified: hash mismatch at seq {row.seq} (its content differs from what was "
                "hashed)"
            )


def _resolve_duplicates(rows: Sequence[StoredEvent], problems: _Problems) -> list[StoredEvent]:
    """Keep one row per seq: the one the chain links through; report the others as inserted."""
    groups: list[list[StoredEvent]] = []
    for row in rows:
        if groups and groups[-1][0].seq == row.seq:
            groups[-1].append(row)
        else:
            groups.append([row])
    chosen: list[StoredEvent] = []
    for gi, group in enumerate(groups):
        if len(group) == 1:
            chosen.append(group[0])
            continue
        next_prev = groups[gi + 1][0].prev_hash if gi + 1 < len(groups) else None
        prev = chosen[-1].hash if chosen else GENESIS_HASH
        pick = next(
            (r for r in group if r.hash == next_prev),
            next((r for r in group if r.prev_hash == prev), group[0]),
        )
        for r in group:
            if r is not pick:
                problems.add(f"inserted: duplicate seq {r.seq} (extra row id {r.id})")
        chosen.append(pick)
    return chosen


def _check_links(chain: Sequence[StoredEvent], problems: _Problems, warnings: list[str]) -> None:
    position = {r.hash: i for i, r in enumerate(chain)}
    referenced = {r.prev_hash for r in chain}
    expected_seq = 1
    prev_hash = GENESIS_HASH
    prev_ts: str | None = None
    for i, row in enumerate(chain):
        if row.seq < 1:
            problems.add(f"inserted: seq {row.seq} (row id {row.id}) is not a valid seq (>= 1)")
        gap = row.seq > expected_seq
        if gap:
            missing = (
                f"seq {expected_seq}"
                if row.seq == expected_seq + 1
                else f"seq {expected_seq}..{row.seq - 1}"
            )
            problems.add(f"deleted: gap: {missing} missing (before seq {row.seq})")
        if row.prev_hash != prev_hash and not gap:
            target = position.get(row.prev_hash)
            between = chain[i - 1] if i >= 1 else None
            if (
                target is not None
                and target == i - 2
                and between is not None
                and between.hash not in referenced
            ):
                problems.add(
                    f"inserted: seq {between.seq} is an extra entry (seq {row.seq} links to "
                    f"seq {chain[target].seq}, skipping it)"
                )
            elif target is not None:
                problems.add(
                    f"reordered: prev_hash mismatch at seq {row.seq} (it links to the entry "
                    f"now at seq {chain[target].seq}, not to seq {row.seq - 1})"
                )
            else:
                problems.add(
                    f"chain break: prev_hash mismatch at seq {row.seq} (it links to no entry in "
                    "the log: its predecessor was replaced or forged)"
                )
        if prev_ts is not None and row.ts < prev_ts:
            warnings.append(f"seq {row.seq}: timestamp {row.ts} is earlier than its predecessor's")
        prev_hash = row.hash
        prev_ts = row.ts
        expected_seq = row.seq + 1


def _check_checkpoints(
    host: str,
    chain: Sequence[StoredEvent],
    checkpoints: Sequence[StoredCheckpoint],
    public_key: Ed25519PublicKey,
    problems: _Problems,
) -> int:
    """Check every checkpoint; return the highest seq covered by a valid, matching checkpoint."""
    last_seq = chain[-1].seq if chain else 0
    by_seq = {r.seq: r for r in chain}
    signed_upto = 0
    for n, cp in enumerate(checkpoints, start=1):
        try:
            public_key.verify(
                bytes.fromhex(cp.signature), checkpoint_message(host, cp.upto_seq, cp.head_hash)
            )
        except (ValueError, InvalidSignature):
            problems.add(
                f"bad checkpoint signature: checkpoint {n} (row id {cp.id}) covering seq "
                f"{cp.upto_seq} does not verify with the given public key"
            )
            continue
        if cp.upto_seq > last_seq:
            problems.add(
                f"truncated: tail truncated: checkpoint {n} covers seq {cp.upto_seq} but the log "
                f"ends at seq {last_seq}"
            )
            continue
        head = by_seq.get(cp.upto_seq)
        if head is None:
            problems.add(
                f"deleted: checkpoint {n} covers seq {cp.upto_seq}, which is missing from the log"
            )
        elif head.hash != cp.head_hash:
            problems.add(
                f"modified: checkpoint {n} signed a different entry at seq {cp.upto_seq} than "
                "the one now in the log"
            )
        else:
            signed_upto = max(signed_upto, cp.upto_seq)
    return signed_upto


def _check_receipts(
    receipts: Iterable[StoredReceipt], public_key: Ed25519PublicKey, problems: _Problems
) -> None:
    for rc in receipts:
        try:
            fields = json.loads(rc.fields)
            public_key.verify(bytes.fromhex(rc.own_sig), receipt_bytes(fields))
        except Exception:
            # Unparseable fields, malformed hex and wrong signatures all mean the same thing here.
            problems.add(
                f"receipt for migration {rc.migration_id}: own signature does not verify with "
                "the given public key (receipt modified or forged)"
            )


def verify_rows(
    host: str,
    rows: Sequence[StoredEvent],
    checkpoints: Sequence[StoredCheckpoint],
    public_key: Ed25519PublicKey,
    *,
    receipts: Iterable[StoredReceipt] = (),
    strict: bool = False,
) -> VerifyReport:
    """Verify one host's events (sorted by seq, then row id), checkpoints and receipts."""
    problems = _Problems()
    warnings: list[str] = []
    _check_contents(rows, problems)
    chain = _resolve_duplicates(rows, problems)
    _check_links(chain, problems, warnings)
    signed_upto = _check_checkpoints(host, chain, checkpoints, public_key, problems)
    _check_receipts(receipts, public_key, problems)
    last_seq = chain[-1].seq if chain else 0
    if last_seq > signed_upto:
        message = (
            f"{last_seq - signed_upto} event(s) after the last checkpoint (seq "
            f"{signed_upto + 1}..{last_seq}) are not covered by a signature"
        )
        if strict:
            problems.add(f"unsigned tail: {message}")
        else:
            warnings.append(message)
    listed = problems.finish()
    return VerifyReport(
        ok=not listed,
        events=len(rows),
        checkpoints=len(checkpoints),
        problems=listed,
        warnings=warnings,
        head_hash=chain[-1].hash if chain else None,
    )
