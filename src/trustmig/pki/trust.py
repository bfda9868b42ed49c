"""Verification side of the cluster PKI: decides whether a peer is who it claims to be.

A :class:`TrustBundle` needs only public material (``ca.pem`` and ``crl.pem``), so every agent and
CLI holds one. OpenSSL already checks the chain during the TLS handshake; ``verify`` repeats that
check and adds what OpenSSL cannot know: the kind of credential (host or user), the name the peer
must have for this connection, roles and tenant, and revocations newer than the context's CRL.
"""

from __future__ import annotations

import os
import ssl
import threading
import weakref
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustmig.pki.errors import BadSignature, CaStoreError, InvalidInput, PeerRejected
from trustmig.pki.files import read_bytes, write_atomic
from trustmig.pki.identity import (
    KIND_OU,
    ROLES,
    ROLES_EXTENSION_OID,
    Kind,
    PeerIdentity,
    check_kind,
    decode_roles_extension,
)
from trustmig.pki.issuance import fingerprint
from trustmig.pki.tokens import open_token

#: Tokens issued by a CA whose clock is slightly ahead are still accepted.
TOKEN_CLOCK_SKEW = timedelta(minutes=5)


class TrustBundle:
    """The cluster CA certificate plus its current revocation list."""

    def __init__(self, ca_path: Path, ca_cert: x509.Certificate, crl_path: Path | None) -> None:
        self.ca_path = Path(ca_path)
        self.ca_cert = ca_cert
        self.crl_path = Path(crl_path) if crl_path is not None else None
        self.ca_fingerprint = fingerprint(ca_cert.public_bytes(serialization.Encoding.DER))
        self._ca_public = _ec_public_key(ca_cert)
        self._lock = threading.Lock()
        self._crl: x509.CertificateRevocationList | None = None
        self._crl_stamp: tuple[int, int, int] | None = None
        self._contexts: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()

    @classmethod
    def load(cls, ca_path: Path, crl_path: Path | None = None) -> TrustBundle:
        """Load ``ca.pem`` and, if given, ``crl.pem`` (which then must exist)."""
        ca_path = Path(ca_path)
        try:
            ca_cert = x509.load_pem_x509_certificate(read_bytes(ca_path, "CA certificate"))
        except ValueError:
            raise CaStoreError(
                f"{ca_path} is not a PEM certificate: point at the cluster's ca.pem"
            ) from None
        bundle = cls(ca_path, ca_cert, crl_path)
        if crl_path is not None:
            bundle.refresh()
        return bundle

    # ------------------------------------------------------------------ CRL handling
    def refresh(self) -> None:
        """Re-read ``crl.pem`` if it changed on disk; push it into TLS contexts built from us.

        A stat() is all it costs when nothing changed, so verification calls it every time.
        """
        if self.crl_path is None:
            return
        try:
            st = os.stat(self.crl_path)
        except FileNotFoundError:
            raise CaStoreError(
                f"revocation list {self.crl_path} does not exist: copy the CA's crl.pem there "
                "(an agent never runs with revocation checking off)"
            ) from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp == self._crl_stamp:
                return
            data = read_bytes(self.crl_path, "revocation list")
            try:
                crl = x509.load_pem_x509_crl(data)
            except ValueError:
                raise CaStoreError(
                    f"{self.crl_path} is not a PEM CRL: copy crl.pem from the CA"
                ) from None
            if crl.issuer != self.ca_cert.subject or not crl.is_signature_valid(self._ca_public):
                raise CaStoreError(
                    f"{self.crl_path} is not signed by the CA in {self.ca_path}: "
                    "copy crl.pem from the same CA"
                )
            if self._crl is not None and _crl_number(crl) < _crl_number(self._crl):
                # An older CRL reappeared (restore from backup, stale copy): never forget
                # revocations we already know about.
                self._crl_stamp = stamp
                return
            self._crl = crl
            self._crl_stamp = stamp
            for ctx in list(self._contexts):
                ctx.load_verify_locations(cafile=str(self.crl_path))

    @property
    def crl_number(self) -> int | None:
        """Number of the CRL in force (None when revocation is not configured)."""
        with self._lock:
            return _crl_number(self._crl) if self._crl is not None else None

    def install_crl(self, pem: bytes) -> tuple[int, bool]:
        """Replace the CRL file with a newer CA-signed one; ``(number, installed)``.

        A CRL with the number already held is accepted and changes nothing (``installed`` is
        False); an older one is refused: revocations once known are never forgotten. Raises
        ``CaStoreError`` for a CRL that is not the CA's or is older than the one in force.
        """
        if self.crl_path is None:
            raise CaStoreError("this trust bundle has no CRL file configured: set [pki] crl")
        try:
            crl = x509.load_pem_x509_crl(pem)
        except ValueError:
            raise CaStoreError("the pushed revocation list is not a PEM CRL") from None
        if crl.issuer != self.ca_cert.subject or not crl.is_signature_valid(self._ca_public):
            raise CaStoreError(
                f"the pushed revocation list is not signed by the CA in {self.ca_path}"
            )
        number = _crl_number(crl)
        held = self.crl_number
        if held is not None and number < held:
            raise CaStoreError(
                f"the pushed revocation list has number {number}, older than number {held} "
                "in force here: push the CA's current crl.pem"
            )
        if held is not None and number == held:
            return number, False
        write_atomic(self.crl_path, pem)
        self.refresh()
        return number, True

    def attach(self, ctx: ssl.SSLContext) -> None:
        """Trust the cluster CA in ``ctx`` and keep its CRL current on every :meth:`refresh`."""
        ctx.load_verify_locations(
            cadata=self.ca_cert.public_bytes(serialization.Encoding.PEM).decode()
        )
        if self.crl_path is not None:
            self.refresh()
            ctx.load_verify_locations(cafile=str(self.crl_path))
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            with self._lock:
                self._contexts.add(ctx)

    def is_revoked(self, serial: int) -> bool:
        with self._lock:
            crl = self._crl
        return crl is not None and crl.get_revoked_certificate_by_serial_number(serial) is not None

    # ------------------------------------------------------------------ certificates
    def verify(
        self,
        cert: x509.Certificate | bytes,
        *,
        kind: Kind | None = None,
        expect_name: str | None = None,
        now: datetime | None = None,
    ) -> PeerIdentity:
        """Check a peer certificate end to end and say who it belongs to.

        Checks, in order: issued by this CA, inside its validity window, CRL current, not
        revoked, a trustmig leaf of the expected kind, and (if given) the expected name.
        Raises :class:`PeerRejected` with a one-line reason.
        """
        if kind is not None:
            kind = check_kind(kind)
        cert = _parse_cert(cert)
        now = _aware(now)
        self.refresh()

        try:
            cert.verify_directly_issued_by(self.ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            issuer = cert.issuer.rfc4514_string()
            raise PeerRejected(
                f"certificate not issued by this cluster's CA (issuer '{issuer}')"
            ) from None

        name = _single(cert.subject, NameOID.COMMON_NAME)
        label = f"'{name}'" if name is not None else "(no name)"
        if now < cert.not_valid_before_utc:
            start = cert.not_valid_before_utc.isoformat()
            raise PeerRejected(
                f"certificate for {label} is not valid before {start}: "
                "check the clocks of both hosts"
            )
        if now > cert.not_valid_after_utc:
            raise PeerRejected(
                f"certificate for {label} expired on {cert.not_valid_after_utc.isoformat()}"
            )
        self._check_crl_current(now)
        if self.is_revoked(cert.serial_number):
            raise PeerRejected(
                f"certificate for {label} is revoked (serial {hex(cert.serial_number)})"
            )

        cert_kind = _kind_of(cert, label)
        if kind is not None and cert_kind != kind:
            raise PeerRejected(
                f"certificate of {label} is a {cert_kind} certificate but a {kind} certificate "
                "was expected"
            )
        if name is None:
            raise PeerRejected("certificate has no single common name: re-issue it")

        roles: tuple[str, ...] = ()
        tenant: str | None = None
        if cert_kind == "host":
            _require_host_san(cert, name)
            _require_eku(
                cert, label, ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
            )
        else:
            _require_eku(cert, label, ExtendedKeyUsageOID.CLIENT_AUTH)
            roles, tenant = _user_roles(cert, label)

        if expect_name is not None and name != expect_name:
            raise PeerRejected(
                f"peer presented certificate of '{name}' but '{expect_name}' was expected"
            )
        return PeerIdentity(
            kind=cert_kind,
            name=name,
            roles=roles,
            tenant=tenant,
            serial=cert.serial_number,
            fingerprint=fingerprint(cert.public_bytes(serialization.Encoding.DER)),
        )

    def verify_host(self, cert_der: bytes, expected_name: str) -> PeerIdentity:
        """``verify`` for a host that must be ``expected_name`` (the data channel's callback)."""
        return self.verify(cert_der, kind="host", expect_name=expected_name)

    # ------------------------------------------------------------------ tokens and blobs
    def verify_user_token(self, token: str, *, now: datetime | None = None) -> PeerIdentity:
        """Check a token from :meth:`ClusterCA.issue_user_token`: signature, expiry, revocation."""
        now = _aware(now)
        claims, signed = open_token(token, self._ca_public)
        if claims.get("iss") != self.ca_fingerprint:
            raise PeerRejected("user token not issued by this cluster's CA")
        name = claims.get("sub")
        iat, exp, jti = claims.get("iat"), claims.get("exp"), claims.get("jti")
        if (
            claims.get("kind") != "user"
            or not isinstance(name, str)
            or not isinstance(iat, int)
            or not isinstance(exp, int)
            or not isinstance(jti, str)
        ):
            raise PeerRejected("user token claims are incomplete: request a new token")
        try:
            serial = int(jti, 16)
        except ValueError:
            raise PeerRejected("user token serial is malformed: request a new token") from None
        expires = datetime.fromtimestamp(exp, UTC)
        if now >= expires:
            raise PeerRejected(f"user token for '{name}' expired on {expires.isoformat()}")
        if datetime.fromtimestamp(iat, UTC) > now + TOKEN_CLOCK_SKEW:
            raise PeerRejected(f"user token for '{name}' is issued in the future: check clocks")
        self.refresh()
        self._check_crl_current(now)
        if self.is_revoked(serial):
            raise PeerRejected(f"user token for '{name}' is revoked (serial {hex(serial)})")
        roles, tenant = claims.get("roles"), claims.get("tenant")
        if (
            not isinstance(roles, list)
            or not roles
            or any(r not in ROLES for r in roles)
            or (tenant is not None and not isinstance(tenant, str))
        ):
            raise PeerRejected(f"user token for '{name}' carries invalid roles or tenant")
        return PeerIdentity(
            kind="user",
            name=name,
            roles=tuple(roles),
            tenant=tenant,
            serial=serial,
            fingerprint=fingerprint(signed),
        )

    def verify_blob(self, data: bytes, signature: bytes) -> None:
        """Check a signature made by :meth:`ClusterCA.sign_blob`; raises :class:`BadSignature`."""
        try:
            self._ca_public.verify(bytes(signature), bytes(data), ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError, TypeError):
            raise BadSignature(
                "signature does not verify against the cluster CA: the data was altered or "
                "signed by another CA"
            ) from None

    # ------------------------------------------------------------------ internals
    def _check_crl_current(self, now: datetime) -> None:
        with self._lock:
            crl = self._crl
        if crl is None:
            return
        next_update = crl.next_update_utc
        if next_update is not None and now > next_update:
            raise PeerRejected(
                f"revocation list {self.crl_path} expired on {next_update.isoformat()}: "
                "run ClusterCA.refresh_crl() and distribute the new crl.pem"
            )


def _parse_cert(cert: x509.Certificate | bytes) -> x509.Certificate:
    if isinstance(cert, x509.Certificate):
        return cert
    if isinstance(cert, bytes | bytearray | memoryview):
        raw = bytes(cert)
        try:
            if raw.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(raw)
            return x509.load_der_x509_certificate(raw)
        except ValueError:
            raise PeerRejected("peer certificate is not a valid X.509 certificate") from None
    raise InvalidInput(f"verify needs an x509.Certificate or DER bytes, got {type(cert).__name__}")


def _aware(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise InvalidInput("now must be timezone-aware: pass datetime.now(UTC)")
    return now


def _ec_public_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CaStoreError("the CA certificate does not hold an ECDSA key: it is not a trustmig CA")
    return key


def _single(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if len(values) == 1 else None


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def _kind_of(cert: x509.Certificate, label: str) -> Kind:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is not None and bc.ca:
        raise PeerRejected(f"certificate {label} is a CA certificate, not a host or user identity")
    ous = {
        str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    }
    kinds = [k for k, ou in KIND_OU.items() if ou in ous]
    if len(kinds) != 1:
        raise PeerRejected(
            f"certificate for {label} is neither a trustmig host nor a trustmig user certificate"
        )
    return check_kind(kinds[0])


def _require_host_san(cert: x509.Certificate, name: str) -> None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is None or name not in san.get_values_for_type(x509.DNSName):
        raise PeerRejected(f"host certificate for '{name}' lacks a DNS name matching its CN")


def _require_eku(cert: x509.Certificate, label: str, *needed: x509.ObjectIdentifier) -> None:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise PeerRejected(f"certificate for {label} has no extended key usage") from None
    missing = [oid._name for oid in needed if oid not in eku]
    if missing:
        raise PeerRejected(f"certificate for {label} is not allowed for {', '.join(missing)}")


def _user_roles(cert: x509.Certificate, label: str) -> tuple[tuple[str, ...], str | None]:
    try:
        ext = cert.extensions.get_extension_for_oid(ROLES_EXTENSION_OID).value
    except x509.ExtensionNotFound:
        raise PeerRejected(f"user certificate for {label} carries no roles extension") from None
    if not isinstance(ext, x509.UnrecognizedExtension):
        raise PeerRejected(f"user certificate for {label} has an unreadable roles extension")
    try:
        roles, tenant = decode_roles_extension(ext.value)
    except ValueError as exc:
        raise PeerRejected(
            f"user certificate for {label} has a malformed roles extension: {exc}"
        ) from None
    if not roles or any(r not in ROLES for r in roles):
        raise PeerRejected(f"user certificate for {label} carries unknown roles {list(roles)}")
    return roles, tenant
