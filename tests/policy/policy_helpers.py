"""Shared material for policy tests: identities, example policies and a small real PKI."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmig.policy import HostLabels, MigrationRequest, VmPolicy, parse_vm_policy

VM_TOML = """\
vm = "web-1"
tenant = "acme"
owner = "alice"
serial = 1

[migrate]
allowed_users = ["alice"]
allowed_roles = ["operator"]
postcopy = false
max_per_hour = 4
windows = []

[destinations]
hosts = []
countries = ["DE", "FR"]
zones = []
min_security_level = 2

[attestation]
profile = "strict"
"""

VM_YAML = """\
vm: web-1
tenant: acme
owner: alice
serial: 1
migrate:
  allowed_users: [alice]
  allowed_roles: [operator]
  postcopy: false
  max_per_hour: 4
destinations:
  countries: [DE, FR]
  min_security_level: 2
"""

HOST_TOML = """\
host = "hostB"

[labels]
country = "DE"
zone = "eu-1"
security_level = 3

[accept]
sources = ["hostA", "hostC"]
tenants = ["acme"]
require_signed_vm_policy = true
"""

# A Monday, 23:30 UTC: inside "Mon-Fri 22:00-06:00 UTC".
MONDAY_NIGHT = dt.datetime(2024, 6, 3, 23, 30, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Person:
    """Shape of the PKI's PeerIdentity (kind, name, roles, tenant, serial, fingerprint)."""

    name: str
    roles: tuple[str, ...]
    tenant: str | None = "acme"
    kind: str = "user"
    serial: int = 0
    fingerprint: str = ""


ALICE = Person("alice", ("owner",))
CAROL = Person("carol", ("owner",))  # owns other VMs of the same tenant
OPS = Person("olga", ("operator",), tenant=None)
AUDITOR = Person("bob", ("auditor",), tenant=None)
SECADMIN = Person("sam", ("security-admin",), tenant=None)

DE3 = HostLabels(country="DE", zone="eu-1", security_level=3)


def make_request(
    user: object = ALICE,
    *,
    vm: str = "web-1",
    source: str = "hostA",
    destination: str = "hostB",
    labels: HostLabels = DE3,
    postcopy: bool = False,
    now: dt.datetime = MONDAY_NIGHT,
) -> MigrationRequest:
    return MigrationRequest(
        user=user,
        vm=vm,
        source=source,
        destination=destination,
        destination_labels=labels,
        postcopy=postcopy,
        now=now,
    )


def vm_policy(*replacements: tuple[str, str]) -> VmPolicy:
    """The example VM policy with textual ``(old, new)`` replacements applied to the TOML."""
    text = VM_TOML
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    return parse_vm_policy(text)


@dataclass
class Issued:
    name: str
    key: ec.EllipticCurvePrivateKey
    cert_der: bytes


@dataclass
class MiniPki:
    """A real cluster CA issuing ECDSA P-256 user certificates; roles travel in OU fields."""

    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    revoked: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test cluster CA")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, name: str, roles: tuple[str, ...], tenant: str | None = "acme") -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
        if tenant:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, tenant))
        attrs += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, r) for r in roles]
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(self.key, hashes.SHA256())
        )
        return Issued(name, key, cert.public_bytes(serialization.Encoding.DER))

    def verifier(self) -> Callable[[bytes], Person]:
        """Like the PKI trust bundle: checks issuer signature and revocation, returns identity."""

        def verify(cert_der: bytes) -> Person:
            cert = x509.load_der_x509_certificate(cert_der)
            cert.verify_directly_issued_by(self.cert)  # raises if not from this CA
            if cert.serial_number in self.revoked:
                raise ValueError(f"certificate {cert.serial_number:x} is revoked")
            subject = cert.subject

            def values(oid: x509.ObjectIdentifier) -> list[str]:
                return [str(a.value) for a in subject.get_attributes_for_oid(oid)]

            tenants = values(NameOID.ORGANIZATION_NAME)
            return Person(
                name=values(NameOID.COMMON_NAME)[0],
                roles=tuple(values(NameOID.ORGANIZATIONAL_UNIT_NAME)),
                tenant=tenants[0] if tenants else None,
                serial=cert.serial_number,
            )

        return verify
