"""Canonical byte encodings that the hash chain, checkpoints and receipts are computed over.

A hash or signature is only meaningful if every verifier rebuilds exactly the same bytes, on any
host and from any database backend. So everything signed or hashed goes through one canonical JSON
form (sorted keys, no whitespace, UTF-8, no NaN/Infinity) prefixed by a domain tag, so that an
event hash can never be replayed as a checkpoint or receipt signature input and vice versa.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from trustmig.audit.errors import AuditInputError

GENESIS_HASH = "00" * 32
"""prev_hash of the first event of every host's chain (32 zero bytes, hex)."""

EVENT_DOMAIN = b"trustmig-audit-event-v1\n"
CHECKPOINT_DOMAIN = b"trustmig-audit-checkpoint-v1\n"
RECEIPT_DOMAIN = b"trustmig-migration-receipt-v1\n"

_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def canonical_json(value: Any) -> str:
    """Serialise `value` in the canonical form (sorted keys, compact, no NaN)."""
    return _ENCODER.encode(value)


def _check_json_value(value: Any, where: str) -> None:
    """Reject anything that would not survive a JSON round trip unchanged.

    json.dumps silently turns int keys into strings and tuples into lists; a value that changes on
    the way through the database would make the stored hash unverifiable, so it is refused up front.
    """
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditInputError(f"{where} is {value!r}: use a finite number or a string")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json_value(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditInputError(
                    f"{where} has key {key!r} of type {type(key).__name__}: keys must be strings"
                )
            _check_json_value(item, f"{where}.{key}")
        return
    raise AuditInputError(
        f"{where} is a {type(value).__name__}: use only JSON types "
        "(dict, list, str, int, float, bool, None)"
    )


def canonical_data(data: Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
    """Validate an event's data object; return (normalised dict, canonical JSON text)."""
    if data is None:
        return {}, "{}"
    if not isinstance(data, Mapping):
        raise AuditInputError(
            f"event data is a {type(data).__name__}: pass a mapping of string keys to JSON values"
        )
    _check_json_value(data, "data")
    text = canonical_json(data)
    return json.loads(text), text


def event_hash(
    *,
    seq: int,
    ts: str,
    host: str,
    kind: str,
    vm: str | None,
    migration_id: str | None,
    user: str | None,
    outcome: str | None,
    data: Mapping[str, Any],
    prev_hash: str,
) -> str:
    """SHA-256 (hex) over the canonical encoding of every field of an event, prev_hash included."""
    body = canonical_json(
        {
            "seq": seq,
            "ts": ts,
            "host": host,
            "kind": kind,
            "vm": vm,
            "migration_id": migration_id,
            "user": user,
            "outcome": outcome,
            "data": data,
            "prev_hash": prev_hash,
        }
    )
    return hashlib.sha256(EVENT_DOMAIN + body.encode("utf-8")).hexdigest()


def checkpoint_message(host: str, upto_seq: int, head_hash: str) -> bytes:
    """The bytes a checkpoint signature covers: which host's chain, how far, and its head."""
    body = canonical_json({"host": host, "upto_seq": upto_seq, "head_hash": head_hash})
    return CHECKPOINT_DOMAIN + body.encode("utf-8")


def utc_now() -> str:
    """Current UTC time as ISO-8601 with microseconds and a 'Z' suffix."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
