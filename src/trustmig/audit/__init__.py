"""Tamper-evident, signed audit trail of migrations (the non-repudiation dimension).

Every migration request, policy decision, attestation result, migration phase, abort and
completion becomes an :class:`AuditEvent` in the host's append-only hash chain. Checkpoints signed
with the host's Ed25519 audit key cover the chain in batches (see ``trustmig.audit.log`` for why
batches, and what flush() guarantees). At the end of each migration both hosts sign a receipt and
each keeps both signatures.
"""

from trustmig.audit.canonical import GENESIS_HASH
from trustmig.audit.errors import (
    AuditClosedError,
    AuditConfigError,
    AuditError,
    AuditInputError,
    AuditReadOnlyError,
    AuditStorageError,
)
from trustmig.audit.log import AuditLog
from trustmig.audit.model import AuditEvent, VerifyReport
from trustmig.audit.receipts import RECEIPT_FIELDS, receipt_bytes, sign_receipt, verify_receipt

__all__ = [
    "GENESIS_HASH",
    "RECEIPT_FIELDS",
    "AuditClosedError",
    "AuditConfigError",
    "AuditError",
    "AuditEvent",
    "AuditInputError",
    "AuditLog",
    "AuditReadOnlyError",
    "AuditStorageError",
    "VerifyReport",
    "receipt_bytes",
    "sign_receipt",
    "verify_receipt",
]
