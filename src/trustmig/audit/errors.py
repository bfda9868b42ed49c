"""Exceptions of the audit package.

Every message is one line naming what was wrong and what to do, because audit errors surface in
agent logs and CLI output, where operators must act on them without reading a stack trace.
"""

from __future__ import annotations


class AuditError(Exception):
    """Base class for every failure to open, write, read or verify the audit trail."""


class AuditConfigError(AuditError):
    """The audit log was opened with an unusable URL, host name or checkpoint interval."""


class AuditInputError(AuditError):
    """An event, receipt or signature handed to the audit log was malformed."""


class AuditReadOnlyError(AuditError):
    """A write was attempted on a log opened without a signing key."""


class AuditClosedError(AuditError):
    """The log was used after close()."""


class AuditStorageError(AuditError):
    """The database refused a read or write (missing tables, conflicting writer, I/O error)."""
