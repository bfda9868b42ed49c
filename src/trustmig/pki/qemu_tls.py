"""Lay out cluster credentials the way QEMU's ``tls-creds-x509`` object reads them.

QEMU takes a directory (``-object tls-creds-x509,id=tls0,dir=DIR,endpoint=server``) and looks for
fixed file names in it: ``ca-cert.pem``, optional ``ca-crl.pem``, and ``server-cert.pem`` /
``server-key.pem`` or ``client-cert.pem`` / ``client-key.pem``. Host certificates carry both
serverAuth and clientAuth, so the same host identity serves either endpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cryptography.hazmat.primitives import serialization

from trustmig.pki.errors import InvalidInput
from trustmig.pki.files import read_bytes, write_atomic, write_private

if TYPE_CHECKING:
    from trustmig.pki.authority import ClusterCA, Credentials

QEMU_CA_CERT = "ca-cert.pem"
QEMU_CA_CRL = "ca-crl.pem"


def qemu_file_names(endpoint: Literal["server", "client"]) -> tuple[str, str]:
    """(certificate, key) file names QEMU expects for ``endpoint``."""
    if endpoint not in ("server", "client"):
        raise InvalidInput(f"invalid QEMU TLS endpoint {endpoint!r}: use 'server' or 'client'")
    return f"{endpoint}-cert.pem", f"{endpoint}-key.pem"


def write_qemu_tls_dir(
    ca: ClusterCA | None,
    creds: Credentials,
    out_dir: Path,
    *,
    endpoint: Literal["server", "client"],
    key_pem: bytes | None = None,
) -> Path:
    """Write QEMU's TLS directory for ``endpoint`` from ``creds``; returns ``out_dir``.

    The CA certificate and CRL come from ``ca`` when given (the freshest copy), otherwise from
    the copies delivered with ``creds``. The key file is written with mode 0600; ``key_pem``
    supplies the key when it does not live in a file (an agent's TPM-sealed host key).
    """
    cert_name, key_name = qemu_file_names(endpoint)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if ca is not None:
        ca_pem = ca.ca_cert.public_bytes(serialization.Encoding.PEM)
        crl_path: Path | None = ca.crl_path
    else:
        ca_pem = read_bytes(creds.ca_path, "CA certificate")
        crl_path = creds.crl_path
    write_atomic(out_dir / QEMU_CA_CERT, ca_pem)
    if crl_path is not None and crl_path.exists():
        write_atomic(out_dir / QEMU_CA_CRL, read_bytes(crl_path, "revocation list"))
    write_atomic(out_dir / cert_name, read_bytes(creds.cert_path, "certificate"))
    key = key_pem if key_pem is not None else read_bytes(creds.key_path, "key file")
    write_private(out_dir / key_name, key)
    return out_dir
