"""Trusted platforms: TPM access, enrollment, measured launch, attestation, sealing.

Implements the paper's Attestation Service (quote bound to the secure channel, verified against
enrolled AKs and signed reference values), Seal Storage (keys sealed to the measured launch) and
the TPM side of the Migration Service (hosts prove their state before a VM moves).
See docs/attestation.md.
"""

from trustmig.attest.errors import (
    AttestationFailed,
    AttestError,
    RefValuesError,
    TpmUnavailable,
    UnsealRefused,
)

__all__ = ["AttestError", "AttestationFailed", "RefValuesError", "TpmUnavailable", "UnsealRefused"]
