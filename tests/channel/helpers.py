"""Helpers: a real throwaway PKI (CA + host certificates) and in-memory handshakes."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from trustmig.channel import (
    ClientHandshake,
    HandshakeResult,
    LocalIdentity,
    ServerHandshake,
)

SRC = "src-host.example"
DST = "dst-host.example"


@dataclass(frozen=True)
class PeerInfo:
    name: str
    serial: int


@dataclass
class Pki:
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate

    def issue(
        self,
        name: str,
        *,
        key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> LocalIdentity:
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - dt.timedelta(minutes=5))
            .not_valid_after(not_after or now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        return LocalIdentity(name=name, cert_der=cert.public_bytes(Encoding.DER), private_key=key)

    def verifier(self) -> Callable[[bytes, str], PeerInfo]:
        """A minimal verify_peer: issued by this CA, currently valid, for the expected name."""

        def verify_peer(cert_der: bytes, expected_name: str) -> PeerInfo:
            cert = x509.load_der_x509_certificate(cert_der)
            try:
                cert.verify_directly_issued_by(self.ca_cert)
            except Exception as exc:
                raise ValueError("certificate not issued by the cluster CA") from exc
            now = dt.datetime.now(dt.UTC)
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise ValueError("certificate expired or not yet valid")
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            if expected_name not in san.get_values_for_type(x509.DNSName):
                raise ValueError(f"certificate not issued to {expected_name}")
            return PeerInfo(expected_name, cert.serial_number)

        return verify_peer


def make_pki(cn: str = "trustmig test CA") -> Pki:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Pki(key, cert)


def run_handshake(
    client: ClientHandshake, server: ServerHandshake, *, chunk: int | None = None
) -> tuple[HandshakeResult, HandshakeResult]:
    """Pass bytes between the two sides in memory (optionally in small chunks)."""
    to_server = client.start()
    for _ in range(10):
        to_client = _deliver(server, to_server, chunk)
        if not to_client and server.result is not None and client.result is not None:
            break
        to_server = _deliver(client, to_client, chunk)
        if client.result is not None and server.result is not None:
            break
    assert client.result is not None and server.result is not None
    return client.result, server.result


def _deliver(side: ClientHandshake | ServerHandshake, data: bytes, chunk: int | None) -> bytes:
    if not chunk:
        return side.receive(data)
    out = b""
    for i in range(0, len(data), chunk):
        out += side.receive(data[i : i + chunk])
    return out


def make_pair(
    pki: Pki,
    client_id: LocalIdentity,
    server_id: LocalIdentity,
    *,
    n_streams: int = 3,
    server_name: str = DST,
    client_verifier: Callable[[bytes, str], object] | None = None,
    server_verifier: Callable[[bytes, str], object] | None = None,
    **kwargs: object,
) -> tuple[ClientHandshake, ServerHandshake]:
    client_kw = {k[2:]: v for k, v in kwargs.items() if k.startswith("c_")}
    server_kw = {k[2:]: v for k, v in kwargs.items() if k.startswith("s_")}
    client = ClientHandshake(
        identity=client_id,
        server_name=server_name,
        migration_id=os.urandom(16),
        n_streams=n_streams,
        verify_peer=client_verifier or pki.verifier(),
        **client_kw,  # type: ignore[arg-type]
    )
    server = ServerHandshake(
        identity=server_id,
        verify_peer=server_verifier or pki.verifier(),
        **server_kw,  # type: ignore[arg-type]
    )
    return client, server
