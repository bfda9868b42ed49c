"""The host identity key: sealed in the TPM, never left on disk in clear.

``trustmig host enroll`` writes the new key as a plaintext file. The first agent start with
attestation adopts it: the key is sealed to the measured launch (PCRs 11+12, with a recovery copy
encrypted to the cluster CA) and the plaintext file is overwritten and removed. Later starts
unseal it; an agent whose measured software changed cannot, and refuses to start.

``ssl`` only loads keys from files, so TLS contexts are built once at start from a short-lived
file in a private directory that is removed as soon as the contexts hold the key.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustmig.agent.attestation import AgentAttestation, AgentAttestationError
from trustmig.pki.authority import Credentials

SEALED_NAME = "host-identity"


def _wipe(path: Path) -> None:
    """Overwrite then remove a plaintext key file (best effort on copy-on-write filesystems)."""
    with contextlib.suppress(OSError):
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            fh.write(os.urandom(size))
            fh.flush()
            os.fsync(fh.fileno())
    path.unlink(missing_ok=True)


def _public_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_matches_cert(pem: bytes, creds: Credentials, origin: str) -> None:
    key = serialization.load_pem_private_key(pem, None)
    cert_key = creds.load_cert().public_key()
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
        cert_key, ec.EllipticCurvePublicKey
    ):
        raise AgentAttestationError(f"host key from {origin} is not an ECDSA key; re-enroll")
    if _public_der(key.public_key()) != _public_der(cert_key):
        raise AgentAttestationError(
            f"host key from {origin} does not belong to {creds.cert_path}; re-enroll the host "
            "('trustmig host enroll NAME') so key and certificate match"
        )


def load_host_key(creds: Credentials, attestation: AgentAttestation) -> bytes:
    """PEM of the host identity key, adopting a freshly enrolled plaintext key into the TPM."""
    plain = creds.key_path
    if plain.exists():
        pem = plain.read_bytes()
        _check_matches_cert(pem, creds, str(plain))
        attestation.seal_new(SEALED_NAME, pem)
        _wipe(plain)
        return pem
    pem_or_none = attestation.unseal(SEALED_NAME)
    if pem_or_none is None:
        raise AgentAttestationError(
            f"host identity key is neither at {plain} nor sealed in this host's TPM; enroll the "
            "host ('trustmig host enroll NAME') or restore it with 'trustmig host reseal'"
        )
    _check_matches_cert(pem_or_none, creds, f"sealed key {SEALED_NAME}")
    return pem_or_none


@contextlib.contextmanager
def transient_key_file(creds: Credentials, pem: bytes, directory: Path) -> Iterator[Credentials]:
    """Credentials whose key file exists only inside the ``with`` block (mode 0600)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, name = tempfile.mkstemp(prefix=".hk-", dir=directory)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        yield replace(creds, key_path=path)
    finally:
        _wipe(path)
