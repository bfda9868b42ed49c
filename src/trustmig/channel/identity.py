"""Host identities: signing the transcript with the host key and checking the peer's.

Only ECDSA P-256 with SHA-256 and Ed25519 host keys are accepted: both are what the cluster PKI
issues, and refusing anything else removes algorithm-confusion cases from the handshake.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from trustmig.channel.errors import HandshakeError
from trustmig.channel.messages import check_name

HostPrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def _public_raw(key: object) -> bytes:
    if isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    raise HandshakeError(
        f"unsupported host key type {type(key).__name__}: use ECDSA P-256 or Ed25519"
    )


def load_certificate(cert_der: bytes, whose: str) -> x509.Certificate:
    """Parse a DER certificate, turning parser errors into a HandshakeError."""
    try:
        return x509.load_der_x509_certificate(cert_der)
    except Exception as exc:  # the parser raises ValueError and friends on garbage
        raise HandshakeError(f"{whose} certificate is not valid DER X.509: {exc}") from None


def certificate_names(cert: x509.Certificate) -> set[str]:
    """Names a certificate vouches for: subject CN, DNS and URI subject-alternative names."""
    names = {str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return names
    except Exception:
        raise HandshakeError("certificate has a malformed subjectAltName extension") from None
    names.update(san.get_values_for_type(x509.DNSName))
    names.update(san.get_values_for_type(x509.UniformResourceIdentifier))
    return names


@dataclass(frozen=True)
class LocalIdentity:
    """This host's name, certificate (DER) and the matching private key."""

    name: str
    cert_der: bytes
    private_key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

    def __post_init__(self) -> None:
        check_name(self.name, "local host name")
        cert = load_certificate(self.cert_der, "local")
        if _public_raw(cert.public_key()) != _public_raw(self.private_key.public_key()):
            raise HandshakeError(
                f"identity of {self.name}: certificate does not match the private key; "
                "load the key that was certified"
            )
        if isinstance(self.private_key, ec.EllipticCurvePrivateKey) and not isinstance(
            self.private_key.curve, ec.SECP256R1
        ):
            raise HandshakeError(
                f"identity of {self.name}: ECDSA key on {self.private_key.curve.name}, "
                "only P-256 is accepted"
            )
        if self.name not in certificate_names(cert):
            raise HandshakeError(f"identity of {self.name}: certificate is not issued to that name")

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            return self.private_key.sign(data)
        return self.private_key.sign(data, ec.ECDSA(hashes.SHA256()))


def verify_signature(cert: x509.Certificate, signature: bytes, data: bytes, whose: str) -> None:
    """Verify ``signature`` over ``data`` with the certificate's key (P-256/SHA-256, Ed25519)."""
    key = cert.public_key()
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            raise HandshakeError(
                f"{whose} certificate has an unsupported key type: need ECDSA P-256 or Ed25519"
            )
    except InvalidSignature:
        raise HandshakeError(f"{whose} transcript signature is invalid") from None
