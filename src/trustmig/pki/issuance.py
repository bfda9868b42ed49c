"""Pure builders for keys, the CA certificate, leaf certificates and the CRL.

Nothing here touches the file system, so the exact shape of every certificate (extensions,
criticality, names) is decided and reviewable in one place.

Compatibility notes that shaped the extensions:

* keyUsage on leaves is *non-critical* and holds only digitalSignature. QEMU's tls-creds-x509
  refuses a *critical* keyUsage without keyEncipherment, which makes no sense for ECDSA keys.
* Host certificates carry both serverAuth and clientAuth, because every agent both accepts and
  opens control connections, and QEMU checks the purpose matching its endpoint.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustmig.pki.errors import InvalidInput
from trustmig.pki.identity import (
    OU_HOST,
    OU_USER,
    ROLES_EXTENSION_OID,
    Kind,
    encode_roles_extension,
)

#: Allowance for clocks of different hosts that are a little behind the CA's clock.
CLOCK_SKEW = timedelta(minutes=5)
CA_VALIDITY_DAYS = 3650
#: A CRL stays acceptable this long without a new revocation; the CA rewrites it on every
#: revocation and on every issuance, so an active cluster never gets near the limit.
CRL_VALIDITY_DAYS = 365


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key (the cluster-wide key type)."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM, the form both OpenSSL and GnuTLS load without a passphrase."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(der: bytes) -> str:
    """SHA-256 hex of a DER encoding."""
    return hashlib.sha256(der).hexdigest()


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def build_ca_cert(
    key: ec.EllipticCurvePrivateKey, name: str, *, days: int = CA_VALIDITY_DAYS
) -> x509.Certificate:
    """Self-signed cluster CA certificate (pathlen 0: it only ever signs leaves)."""
    if not name or not name.strip():
        raise InvalidInput(
            "the CA name is empty: pass a descriptive name such as 'prod cluster CA'"
        )
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = now_utc() - CLOCK_SKEW
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def build_leaf_cert(
    *,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    kind: Kind,
    name: str,
    not_before: datetime,
    not_after: datetime,
    ips: Sequence[str] = (),
    roles: tuple[str, ...] = (),
    tenant: str | None = None,
) -> x509.Certificate:
    """A host or user certificate signed by the cluster CA.

    ``name``/``roles``/``tenant`` must already be validated by :mod:`trustmig.pki.identity`.
    """
    if not_after <= not_before:
        raise InvalidInput(
            f"certificate validity ends ({not_after.isoformat()}) before it starts "
            f"({not_before.isoformat()}): use a positive number of days"
        )
    attrs: list[x509.NameAttribute] = []
    if kind == "user":
        attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, role) for role in roles]
    attrs.append(
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, OU_HOST if kind == "host" else OU_USER)
    )
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, name))

    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
    )
    if kind == "host":
        sans: list[x509.GeneralName] = [x509.DNSName(name)]
        sans += [x509.IPAddress(_parse_ip(ip)) for ip in ips]
        builder = builder.add_extension(
            x509.SubjectAlternativeName(sans), critical=False
        ).add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        ).add_extension(
            x509.UnrecognizedExtension(ROLES_EXTENSION_OID, encode_roles_extension(roles, tenant)),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256())


def build_crl(
    *,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    revoked: Sequence[tuple[int, datetime]],
    number: int,
    last_update: datetime | None = None,
    days: int = CRL_VALIDITY_DAYS,
) -> x509.CertificateRevocationList:
    """A complete CRL listing ``(serial, revocation time)`` pairs."""
    now = last_update or now_utc()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(ca_key, hashes.SHA256())


def _parse_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        raise InvalidInput(
            f"invalid IP address {ip!r} for a host certificate: use a literal such as 10.0.0.2"
        ) from None
