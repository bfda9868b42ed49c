"""Host enrollment: bind a host's attestation key (AK) to its TPM's endorsement key (EK).

The cluster (CA / security admin) issues a credential-activation challenge: a random secret
encrypted to the EK and bound to the AK's Name. Only the TPM that holds that EK *and* has an AK
with that Name loaded can recover the secret, so a correct answer proves the AK lives in the same
TPM as the EK. The AK is then recorded in the registry, the cluster's list of known AKs, which the
verifier trusts when judging quotes.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from tpm2_pytss import TPM2_ALG, TPMT_PUBLIC, TPMT_SYM_DEF_OBJECT
from tpm2_pytss.utils import make_credential as _tss_make_credential

from trustmig.attest.errors import AttestError
from trustmig.attest.tpm import HostTpm
from trustmig.attest.tpmwire import check_ak_attributes, parse_ak_public

REGISTRY_FORMAT = "trustmig-ak-registry/1"


class EnrollmentError(AttestError):
    """Enrollment of a host failed."""


def make_credential(ek_public_pem: bytes, ak_name: bytes, secret: bytes) -> tuple[bytes, bytes]:
    """Software TPM2_MakeCredential for an EK with the default TCG template (SHA-256 name,
    AES-128-CFB). Returns marshalled (TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET)."""
    if not 0 < len(secret) <= 32:
        raise EnrollmentError(f"credential secret is {len(secret)} bytes; use 1-32 bytes")
    try:
        public = TPMT_PUBLIC.from_pem(
            ek_public_pem,
            nameAlg=TPM2_ALG.SHA256,
            symmetric=TPMT_SYM_DEF_OBJECT.parse("aes128cfb"),
        )
        blob, enc = _tss_make_credential(public, secret, ak_name)
    except Exception as exc:
        raise EnrollmentError(
            f"cannot make a credential for this EK ({exc.__class__.__name__}); "
            "pass the EK public key PEM from TpmKeys"
        ) from None
    return bytes(blob.marshal()), bytes(enc.marshal())


def _pem(data: bytes) -> str:
    return data.decode()


@dataclass(frozen=True)
class EnrollmentRecord:
    """What the cluster knows about an enrolled host's TPM."""

    host: str
    ek_public_pem: str
    ek_cert_pem: str | None
    ak_public_pem: str
    ak_public_tpm: str  # base64 TPM2B_PUBLIC
    ak_name: str  # hex
    enrolled_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EnrollmentRecord:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})  # type: ignore[arg-type]

    @property
    def ak_public_bytes(self) -> bytes:
        return base64.b64decode(self.ak_public_tpm)


class AkRegistry:
    """JSON file of enrolled hosts and their AKs (host name -> EnrollmentRecord)."""

    def __init__(self, path: Path, records: dict[str, EnrollmentRecord] | None = None) -> None:
        self.path = Path(path)
        self._records: dict[str, EnrollmentRecord] = dict(records or {})

    @classmethod
    def load(cls, path: Path) -> AkRegistry:
        """Load the registry; a missing file is an empty registry."""
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            doc = json.loads(path.read_bytes())
            if doc.get("format") != REGISTRY_FORMAT:
                raise ValueError("format")
            recs = {h: EnrollmentRecord.from_dict(r) for h, r in doc["hosts"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise EnrollmentError(
                f"AK registry {path} is not a {REGISTRY_FORMAT} file; restore it from backup"
            ) from None
        return cls(path, recs)

    def get(self, host: str) -> EnrollmentRecord | None:
        return self._records.get(host)

    def hosts(self) -> list[str]:
        return sorted(self._records)

    def add(self, record: EnrollmentRecord) -> None:
        self._records[record.host] = record

    def remove(self, host: str) -> None:
        if self._records.pop(host, None) is None:
            raise EnrollmentError(f"host {host!r} is not enrolled; nothing to remove")

    def save(self) -> None:
        doc = {
            "format": REGISTRY_FORMAT,
            "hosts": {h: r.to_dict() for h, r in sorted(self._records.items())},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(doc, sort_keys=True, indent=1) + "\n")
        os.replace(tmp, self.path)


def _check_ek_certificate(
    cert_der: bytes, ek_public_pem: bytes, ca_certs_pem: Sequence[bytes]
) -> str:
    """EK certificate must certify this EK and be issued by a trusted TPM manufacturer CA."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError:
        raise EnrollmentError(
            "EK certificate in TPM NV is not valid DER; the TPM is not trusted"
        ) from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(serialization.Encoding.PEM, spki) != (
        serialization.load_pem_public_key(ek_public_pem).public_bytes(
            serialization.Encoding.PEM, spki
        )
    ):
        raise EnrollmentError(
            "EK certificate does not certify this TPM's EK; the TPM is not trusted"
        )
    for ca_pem in ca_certs_pem:
        ca = x509.load_pem_x509_certificate(ca_pem)
        try:
            cert.verify_directly_issued_by(ca)
            break
        except (ValueError, TypeError, InvalidSignature):  # wrong issuer or bad signature
            continue
    else:
        raise EnrollmentError(
            "EK certificate is not issued by a trusted TPM manufacturer CA; add the vendor CA "
            "or refuse this host"
        )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def enroll_host(
    host_name: str,
    tpm: HostTpm,
    registry_path: Path,
    *,
    ek_ca_certs: Sequence[bytes] | None = None,
    replace: bool = False,
) -> EnrollmentRecord:
    """Run the credential-activation challenge against `tpm` and record the host's AK.

    With `ek_ca_certs` (PEM), the EK certificate must exist and chain to one of them. An already
    enrolled host keeps its record unless the EK is the same or `replace` is set, so a swapped
    machine cannot silently take over a host name.
    """
    if not host_name:
        raise EnrollmentError("host name is empty; pass the host's certificate name")
    registry = AkRegistry.load(registry_path)
    keys = tpm.ensure_keys()
    ak = parse_ak_public(keys.ak_public_tpm)
    check_ak_attributes(ak.attributes)
    if ak.name != keys.ak_name:
        raise EnrollmentError(
            "AK name does not match its public area; the TPM answer is inconsistent"
        )
    existing = registry.get(host_name)
    if existing is not None and existing.ek_public_pem != _pem(keys.ek_public_pem) and not replace:
        raise EnrollmentError(
            f"host {host_name!r} is already enrolled with a different EK; remove it from the "
            "registry (or pass replace=True) after confirming the hardware change"
        )
    cert_der = tpm.ek_certificate()
    cert_pem: str | None = None
    if ek_ca_certs is not None:
        if cert_der is None:
            raise EnrollmentError(
                f"host {host_name!r} TPM has no EK certificate; "
                "cannot check it against the vendor CA"
            )
        cert_pem = _check_ek_certificate(cert_der, keys.ek_public_pem, ek_ca_certs)
    elif cert_der is not None:
        try:
            cert_pem = (
                x509.load_der_x509_certificate(cert_der)
                .public_bytes(serialization.Encoding.PEM)
                .decode()
            )
        except ValueError:
            cert_pem = None

    challenge = secrets.token_bytes(32)
    blob, enc = make_credential(keys.ek_public_pem, keys.ak_name, challenge)
    answer = tpm.activate_credential(blob, enc)
    if not hmac.compare_digest(answer, challenge):
        raise EnrollmentError(
            f"host {host_name!r} answered the credential challenge wrongly; "
            "its AK is not in its TPM"
        )
    record = EnrollmentRecord(
        host=host_name,
        ek_public_pem=_pem(keys.ek_public_pem),
        ek_cert_pem=cert_pem,
        ak_public_pem=_pem(keys.ak_public_pem),
        ak_public_tpm=base64.b64encode(keys.ak_public_tpm).decode(),
        ak_name=keys.ak_name.hex(),
        enrolled_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    registry.add(record)
    registry.save()
    return record
