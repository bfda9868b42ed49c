"""Exceptions of the attestation package.

Every message is one line naming what failed and what the operator can do about it, because these
errors end up in agent logs and CLI output where a stack trace helps nobody.
"""

from __future__ import annotations


class AttestError(Exception):
    """Base class for every attestation, TPM, sealing and reference-value failure."""


class TpmUnavailable(AttestError):
    """No TPM could be opened (no device, swtpm missing or did not start)."""


class AttestationFailed(AttestError):
    """Evidence from a peer was refused.

    `measurement` names the offending measurement (e.g. ``"qemu-binary"``) when the refusal is
    about a measured component, so callers (audit, policy) can record *what* was untrusted.
    """

    def __init__(self, message: str, *, measurement: str | None = None) -> None:
        super().__init__(message)
        self.measurement = measurement


class UnsealRefused(AttestError):
    """The TPM refused to unseal because the PCR policy no longer matches."""


class RefValuesError(AttestError):
    """A reference-value file is malformed or its signature does not verify."""
