"""Exceptions of the cluster PKI.

Every failure carries a one-line message that names what was wrong and what to do, because
these messages end up in agent logs and CLI output read by operators under pressure.
"""

from __future__ import annotations


class PkiError(Exception):
    """Base class for every error raised by :mod:`trustmig.pki`."""


class InvalidInput(PkiError):
    """A caller passed a bad name, role, tenant, validity or path."""


class CaStoreError(PkiError):
    """The CA directory is missing, incomplete, unreadable or would be overwritten."""


class PeerRejected(PkiError):
    """A peer's certificate or token is not acceptable (wrong CA, expired, revoked, wrong name)."""


class BadSignature(PkiError):
    """A blob signed with :meth:`ClusterCA.sign_blob` does not verify against the cluster CA."""
