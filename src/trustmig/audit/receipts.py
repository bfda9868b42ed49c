"""Migration receipts: a statement both hosts sign at the end of a migration.

A receipt binds who moved which VM from where to where, a digest of the migration stream and the
outcome. Each host signs it with its audit key and keeps both signatures, so neither host can later
deny the migration took place (or claim a different outcome) without contradicting a signature
the other party holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from trustmig.audit.canonical import RECEIPT_DOMAIN, canonical_json
from trustmig.audit.errors import AuditInputError

RECEIPT_FIELDS: tuple[str, ...] = (
    "migration_id",
    "vm",
    "user",
    "source",
    "destination",
    "stream_digest",
    "outcome",
    "ts",
)
"""Exactly these keys make a receipt; `user` may be None, every other value is a non-empty str
of at most 255 characters."""

_NULLABLE = frozenset({"user"})
_MAX_VALUE = 255  # column width of the receipts table on every backend


def normalise_receipt(fields: Mapping[str, Any]) -> dict[str, str | None]:
    """Check a receipt's fields and return them as a plain dict in a fixed key order."""
    if not isinstance(fields, Mapping):
        raise AuditInputError(
            f"receipt fields are a {type(fields).__name__}: pass a mapping with keys "
            + ", ".join(RECEIPT_FIELDS)
        )
    missing = [k for k in RECEIPT_FIELDS if k not in fields]
    if missing:
        raise AuditInputError(
            f"receipt is missing {', '.join(missing)}: every receipt needs "
            + ", ".join(RECEIPT_FIELDS)
        )
    extra = sorted(str(k) for k in fields if k not in RECEIPT_FIELDS)
    if extra:
        raise AuditInputError(
            f"receipt has unknown field(s) {', '.join(extra)}: allowed are "
            + ", ".join(RECEIPT_FIELDS)
        )
    out: dict[str, str | None] = {}
    for key in RECEIPT_FIELDS:
        value = fields[key]
        if value is None and key in _NULLABLE:
            out[key] = None
            continue
        if not isinstance(value, str) or not value or len(value) > _MAX_VALUE:
            allowed = f"a string of 1..{_MAX_VALUE} characters" + (
                " or None" if key in _NULLABLE else ""
            )
            raise AuditInputError(f"receipt field {key} is {value!r}: it must be {allowed}")
        out[key] = value
    return out


def receipt_bytes(fields: Mapping[str, Any]) -> bytes:
    """Canonical bytes of a receipt: what both hosts sign."""
    return RECEIPT_DOMAIN + canonical_json(normalise_receipt(fields)).encode("utf-8")


def sign_receipt(key: Ed25519PrivateKey, fields: Mapping[str, Any]) -> bytes:
    """Sign a receipt with a host's audit key; returns the 64-byte Ed25519 signature."""
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditInputError(
            f"receipt signing key is a {type(key).__name__}: pass the host's Ed25519 audit key"
        )
    return key.sign(receipt_bytes(fields))


def verify_receipt(pub: Ed25519PublicKey, fields: Mapping[str, Any], sig: bytes) -> bool:
    """True if `sig` is `pub`'s signature over these receipt fields.

    Malformed fields or a key of the wrong type raise AuditInputError (a caller bug); a signature
    that merely does not match, including one of the wrong length, returns False.
    """
    if not isinstance(pub, Ed25519PublicKey):
        raise AuditInputError(
            f"receipt verification key is a {type(pub).__name__}: pass an Ed25519 public key"
        )
    message = receipt_bytes(fields)
    if not isinstance(sig, bytes | bytearray):
        return False
    try:
        pub.verify(bytes(sig), message)
    except InvalidSignature:
        return False
    return True
