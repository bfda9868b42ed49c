"""Value types handed out by the audit log: events as stored, and verification reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AuditEvent:
    """One entry of a host's hash chain, exactly as stored.

    `hash` is SHA-256 over the canonical encoding of every other field (see
    ``trustmig.audit.canonical.event_hash``); `prev_hash` is the hash of entry ``seq - 1`` or
    32 zero bytes for the first entry.
    """

    seq: int
    ts: str
    host: str
    kind: str
    vm: str | None
    migration_id: str | None
    user: str | None
    outcome: str | None
    data: dict[str, Any]
    prev_hash: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict (the form used by export_jsonl)."""
        return {
            "seq": self.seq,
            "ts": self.ts,
            "host": self.host,
            "kind": self.kind,
            "vm": self.vm,
            "migration_id": self.migration_id,
            "user": self.user,
            "outcome": self.outcome,
            "data": self.data,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass
class VerifyReport:
    """Outcome of walking a host's chain and checkpoints.

    `problems` are proofs of tampering (or of a wrong key); `warnings` are facts an auditor should
    know but that do not prove tampering, such as events not yet covered by a signed checkpoint.
    """

    ok: bool
    events: int
    checkpoints: int
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    head_hash: str | None = None
