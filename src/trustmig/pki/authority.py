"""The cluster certificate authority and the credential files it hands out.

One CA per cluster issues every host identity and user credential. Its state is a directory::

    <ca_dir>/ca.key       CA private key (0600)
    <ca_dir>/ca.pem       CA certificate
    <ca_dir>/crl.pem      CRL signed by the CA, rewritten on every revocation
    <ca_dir>/issued.json  one record per certificate or token ever issued

``issued.json`` is what makes revocation by *name* possible: a CRL only knows serials, so the CA
keeps the serial of everything it issued and revokes all serials of a name at once.
"""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmig.pki import issuance
from trustmig.pki.errors import CaStoreError, InvalidInput
from trustmig.pki.files import locked, read_bytes, write_atomic, write_private
from trustmig.pki.identity import (
    Kind,
    check_host_name,
    check_kind,
    check_name,
    check_roles,
    check_tenant,
    check_user_name,
)
from trustmig.pki.tokens import sign_token

CA_KEY = "ca.key"
CA_CERT = "ca.pem"
CRL = "crl.pem"
ISSUED = "issued.json"
#: Longest lifetime of a user token; longer-lived access should use a certificate.
MAX_TOKEN_TTL_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Credentials:
    """Paths of one identity's key pair plus the cluster trust files delivered with it."""

    cert_path: Path
    key_path: Path
    ca_path: Path
    crl_path: Path

    @classmethod
    def in_dir(cls, directory: Path, kind: Kind = "host") -> Credentials:
        """Credentials laid out in ``directory`` by ``issue_host`` / ``issue_user``."""
        kind = check_kind(kind)
        directory = Path(directory)
        creds = cls(
            cert_path=directory / f"{kind}.pem",
            key_path=directory / f"{kind}.key",
            ca_path=directory / CA_CERT,
            crl_path=directory / CRL,
        )
        for path in (creds.cert_path, creds.key_path, creds.ca_path):
            if not path.is_file():
                raise CaStoreError(
                    f"{path} is missing: issue {kind} credentials into {directory} first"
                )
        return creds

    def load_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(read_bytes(self.key_path, "key file"), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CaStoreError(f"{self.key_path} is not an ECDSA key: re-issue the credentials")
        return key

    def load_cert(self) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(read_bytes(self.cert_path, "certificate"))
        except ValueError:
            raise CaStoreError(f"{self.cert_path} is not a PEM certificate") from None

    def cert_der(self) -> bytes:
        return self.load_cert().public_bytes(serialization.Encoding.DER)

    def name(self) -> str:
        """The CN of the certificate: the host or user name."""
        return _common_name(self.load_cert())


class ClusterCA:
    """The cluster CA, loaded from (or created in) its directory."""

    def __init__(
        self, ca_dir: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
    ) -> None:
        self.ca_dir = Path(ca_dir)
        self.ca_cert = ca_cert
        self.ca_key = ca_key

    # ------------------------------------------------------------------ creation / loading
    @classmethod
    def init(
        cls, ca_dir: Path, *, name: str = "trustmig cluster CA", force: bool = False
    ) -> ClusterCA:
        """Create a new CA in ``ca_dir``; refuses to replace an existing one unless ``force``."""
        ca_dir = Path(ca_dir)
        existing = [p.name for p in (ca_dir / CA_KEY, ca_dir / CA_CERT) if p.exists()]
        if existing and not force:
            raise CaStoreError(
                f"{ca_dir} already holds a CA ({', '.join(existing)}): load it with "
                "ClusterCA.load, or pass force=True to replace it and invalidate everything "
                "it issued"
            )
        ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = issuance.new_key()
        cert = issuance.build_ca_cert(key, name)
        with locked(ca_dir):
            write_private(ca_dir / CA_KEY, issuance.key_pem(key))
            write_atomic(ca_dir / CA_CERT, issuance.cert_pem(cert))
            write_atomic(ca_dir / ISSUED, b"[]\n")
            ca = cls(ca_dir, cert, key)
            ca._write_crl([])
        return ca

    @classmethod
    def load(cls, ca_dir: Path) -> ClusterCA:
        """Load an existing CA; checks that key and certificate belong together."""
        ca_dir = Path(ca_dir)
        if not (ca_dir / CA_CERT).exists():
            raise CaStoreError(
                f"{ca_dir} holds no CA ({CA_CERT} missing): create one with ClusterCA.init"
            )
        key_path = ca_dir / CA_KEY
        key_data = read_bytes(key_path, "CA key")
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            raise CaStoreError(
                f"CA key {key_path} is readable by other users (mode {mode:04o}): chmod 600 it"
            )
        try:
            key = serialization.load_pem_private_key(key_data, None)
            cert = x509.load_pem_x509_certificate(read_bytes(ca_dir / CA_CERT, "CA certificate"))
        except ValueError as exc:
            raise CaStoreError(
                f"CA files in {ca_dir} are corrupt ({exc}): restore them from backup"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CaStoreError(f"CA key {key_path} is not an ECDSA key: re-create the CA")
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        enc = serialization.Encoding.DER
        if key.public_key().public_bytes(enc, pub) != cert.public_key().public_bytes(enc, pub):
            raise CaStoreError(f"{CA_KEY} and {CA_CERT} in {ca_dir} do not belong together")
        ca = cls(ca_dir, cert, key)
        if not (ca_dir / CRL).exists() or not (ca_dir / ISSUED).exists():
            with locked(ca_dir):
                if not (ca_dir / ISSUED).exists():
                    write_atomic(ca_dir / ISSUED, b"[]\n")
                ca._write_crl(ca._revoked_pairs(ca._read_issued()))
        return ca

    # ------------------------------------------------------------------ paths
    @property
    def ca_path(self) -> Path:
        return self.ca_dir / CA_CERT

    @property
    def crl_path(self) -> Path:
        return self.ca_dir / CRL

    # ------------------------------------------------------------------ issuing
    def issue_host(
        self,
        name: str,
        out_dir: Path,
        *,
        ips: Sequence[str] = (),
        days: int = 365,
        _not_before: datetime | None = None,
        _not_after: datetime | None = None,
    ) -> Credentials:
        """Issue a host identity into ``out_dir`` (host.key, host.pem, ca.pem, crl.pem).

        ``_not_before``/``_not_after`` exist only so tests can create expired certificates.
        """
        check_host_name(name)
        if isinstance(ips, str):
            raise InvalidInput(f"ips must be a list of addresses, not the string {ips!r}")
        return self._issue(
            "host",
            name,
            Path(out_dir),
            ips=tuple(ips),
            roles=(),
            tenant=None,
            window=self._window(days, _not_before, _not_after),
        )

    def issue_user(
        self,
        name: str,
        out_dir: Path,
        *,
        roles: Sequence[str],
        tenant: str | None = None,
        days: int = 30,
        _not_before: datetime | None = None,
        _not_after: datetime | None = None,
    ) -> Credentials:
        """Issue a user certificate into ``out_dir`` (user.key, user.pem, ca.pem, crl.pem)."""
        check_user_name(name)
        canonical = check_roles(roles)
        check_tenant(tenant)
        return self._issue(
            "user",
            name,
            Path(out_dir),
            ips=(),
            roles=canonical,
            tenant=tenant,
            window=self._window(days, _not_before, _not_after),
        )

    def issue_user_token(
        self,
        name: str,
        roles: Sequence[str],
        tenant: str | None = None,
        ttl_s: int = 900,
    ) -> str:
        """A signed short-lived user token; verify it with :meth:`TrustBundle.verify_user_token`."""
        check_user_name(name)
        canonical = check_roles(roles)
        check_tenant(tenant)
        if (
            isinstance(ttl_s, bool)
            or not isinstance(ttl_s, int)
            or not 0 < ttl_s <= MAX_TOKEN_TTL_S
        ):
            raise InvalidInput(
                f"invalid token lifetime ttl_s={ttl_s!r}: use 1..{MAX_TOKEN_TTL_S} seconds, "
                "or a user certificate for longer access"
            )
        now = datetime.now(UTC).replace(microsecond=0)
        expires = now + timedelta(seconds=ttl_s)
        self._check_within_ca(expires)
        serial = x509.random_serial_number()
        claims: dict[str, Any] = {
            "kind": "user",
            "sub": name,
            "roles": list(canonical),
            "tenant": tenant,
            "iat": int(now.timestamp()),
            "exp": int(expires.timestamp()),
            "jti": hex(serial),
            "iss": issuance.fingerprint(self.ca_cert.public_bytes(serialization.Encoding.DER)),
        }
        token = sign_token(self.ca_key, claims)
        self._record(
            serial=serial,
            kind="user",
            name=name,
            roles=canonical,
            tenant=tenant,
            not_after=expires,
            form="token",
            fp=None,
        )
        return token

    # ------------------------------------------------------------------ revocation
    def revoke(self, name: str, kind: Kind) -> list[int]:
        """Revoke every certificate and token issued to ``name``; rewrite ``crl.pem``.

        Returns the serials revoked by this call (already revoked ones are not repeated).
        """
        kind = check_kind(kind)
        check_name(kind, name)
        now = issuance.now_utc()
        with locked(self.ca_dir):
            records = self._read_issued()
            matching = [r for r in records if r["kind"] == kind and r["name"] == name]
            if not matching:
                raise InvalidInput(
                    f"no {kind} named {name!r} was issued by this CA: check the name "
                    "(see ClusterCA.issued())"
                )
            newly: list[int] = []
            for rec in matching:
                if not rec["revoked"]:
                    rec["revoked"] = True
                    rec["revoked_at"] = now.isoformat()
                    newly.append(int(rec["serial"]))
            self._write_issued(records)
            self._write_crl(self._revoked_pairs(records))
        return newly

    def refresh_crl(self) -> Path:
        """Re-sign ``crl.pem`` with a fresh validity window (for clusters with no recent change)."""
        with locked(self.ca_dir):
            self._write_crl(self._revoked_pairs(self._read_issued()))
        return self.crl_path

    def issued(self) -> list[dict[str, Any]]:
        """Copies of all issuance records (serial, kind, name, roles, tenant, revoked, ...)."""
        return [dict(r) for r in self._read_issued()]

    # ------------------------------------------------------------------ signing
    def sign_blob(self, data: bytes) -> bytes:
        """DER ECDSA-SHA256 signature of ``data`` by the CA key (reference values, policies).

        Verify with :meth:`TrustBundle.verify_blob`.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidInput(f"sign_blob needs bytes, got {type(data).__name__}: encode it first")
        return self.ca_key.sign(bytes(data), ec.ECDSA(hashes.SHA256()))

    # ------------------------------------------------------------------ internals
    def _window(
        self, days: int, not_before: datetime | None, not_after: datetime | None
    ) -> tuple[datetime, datetime]:
        if not_before is not None or not_after is not None:
            start = not_before or issuance.now_utc() - issuance.CLOCK_SKEW
            end = not_after or start + timedelta(days=days)
            return start, end
        if isinstance(days, bool) or not isinstance(days, int) or days < 1:
            raise InvalidInput(f"invalid validity days={days!r}: use a whole number of days >= 1")
        start = issuance.now_utc() - issuance.CLOCK_SKEW
        end = start + timedelta(days=days)
        self._check_within_ca(end)
        return start, end

    def _check_within_ca(self, end: datetime) -> None:
        ca_end = self.ca_cert.not_valid_after_utc
        if end > ca_end:
            raise InvalidInput(
                f"requested validity until {end.isoformat()} outlives the CA certificate "
                f"(expires {ca_end.isoformat()}): use fewer days or renew the CA"
            )

    def _issue(
        self,
        kind: Kind,
        name: str,
        out_dir: Path,
        *,
        ips: tuple[str, ...],
        roles: tuple[str, ...],
        tenant: str | None,
        window: tuple[datetime, datetime],
    ) -> Credentials:
        other = "user" if kind == "host" else "host"
        if any(r["kind"] == other and r["name"] == name for r in self._read_issued()):
            # QEMU's TLS checks a destination by name only: a user certificate named like a
            # host could pass for it, so one name never serves both kinds
            raise InvalidInput(
                f"{name!r} is already a {other} name in this cluster; pick another {kind} name"
            )
        key = issuance.new_key()
        cert = issuance.build_leaf_cert(
            ca_key=self.ca_key,
            ca_cert=self.ca_cert,
            public_key=key.public_key(),
            kind=kind,
            name=name,
            not_before=window[0],
            not_after=window[1],
            ips=ips,
            roles=roles,
            tenant=tenant,
        )
        self._record(
            serial=cert.serial_number,
            kind=kind,
            name=name,
            roles=roles,
            tenant=tenant,
            not_after=window[1],
            form="certificate",
            fp=issuance.fingerprint(cert.public_bytes(serialization.Encoding.DER)),
        )
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        creds = Credentials(
            cert_path=out_dir / f"{kind}.pem",
            key_path=out_dir / f"{kind}.key",
            ca_path=out_dir / CA_CERT,
            crl_path=out_dir / CRL,
        )
        write_private(creds.key_path, issuance.key_pem(key))
        write_atomic(creds.cert_path, issuance.cert_pem(cert))
        if out_dir.resolve() != self.ca_dir.resolve():
            write_atomic(creds.ca_path, self.ca_path.read_bytes())
            write_atomic(creds.crl_path, self._current_crl())
        return creds

    def _current_crl(self) -> bytes:
        """The CA's CRL, re-signed first if less than half of its validity remains."""
        with locked(self.ca_dir):
            data = self.crl_path.read_bytes() if self.crl_path.exists() else b""
            fresh = False
            if data:
                crl = x509.load_pem_x509_crl(data)
                next_update = crl.next_update_utc
                half = timedelta(days=issuance.CRL_VALIDITY_DAYS / 2)
                fresh = next_update is not None and next_update - issuance.now_utc() > half
            if not fresh:
                self._write_crl(self._revoked_pairs(self._read_issued()))
                data = self.crl_path.read_bytes()
        return data

    def _record(
        self,
        *,
        serial: int,
        kind: Kind,
        name: str,
        roles: tuple[str, ...],
        tenant: str | None,
        not_after: datetime,
        form: str,
        fp: str | None,
    ) -> None:
        record = {
            "serial": serial,
            "serial_hex": hex(serial),
            "kind": kind,
            "form": form,
            "name": name,
            "roles": list(roles),
            "tenant": tenant,
            "not_after": not_after.isoformat(),
            "fingerprint": fp,
            "revoked": False,
            "revoked_at": None,
        }
        with locked(self.ca_dir):
            records = self._read_issued()
            records.append(record)
            self._write_issued(records)

    def _read_issued(self) -> list[dict[str, Any]]:
        path = self.ca_dir / ISSUED
        if not path.exists():
            return []
        try:
            data = json.loads(path.read_text())
        except (ValueError, OSError) as exc:
            raise CaStoreError(f"{path} is unreadable ({exc}): restore it from backup") from None
        if not isinstance(data, list):
            raise CaStoreError(f"{path} must hold a JSON list: restore it from backup")
        return data

    def _write_issued(self, records: list[dict[str, Any]]) -> None:
        write_atomic(self.ca_dir / ISSUED, (json.dumps(records, indent=1) + "\n").encode())

    @staticmethod
    def _revoked_pairs(records: list[dict[str, Any]]) -> list[tuple[int, datetime]]:
        pairs: list[tuple[int, datetime]] = []
        for rec in records:
            if rec.get("revoked"):
                when = rec.get("revoked_at")
                at = datetime.fromisoformat(when) if when else issuance.now_utc()
                pairs.append((int(rec["serial"]), at))
        return pairs

    def _write_crl(self, revoked: list[tuple[int, datetime]]) -> None:
        """Sign and write a CRL whose lastUpdate is strictly newer than the previous one.

        OpenSSL keeps every CRL loaded into a long-lived context and picks the one with the
        latest lastUpdate; two CRLs signed within the same second would tie and the older one
        could win. Waiting for the next second (only when revocations come that fast) keeps
        the newest CRL unambiguous without ever dating one in the future.
        """
        number = 1
        previous: datetime | None = None
        if self.crl_path.exists():
            try:
                old = x509.load_pem_x509_crl(self.crl_path.read_bytes())
                previous = old.last_update_utc
                number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
            except (ValueError, x509.ExtensionNotFound):
                number = 1
        now = issuance.now_utc()
        while previous is not None and now <= previous and previous - now < timedelta(seconds=5):
            time.sleep(0.1)
            now = issuance.now_utc()
        crl = issuance.build_crl(
            ca_key=self.ca_key,
            ca_cert=self.ca_cert,
            revoked=revoked,
            number=number,
            last_update=now,
        )
        write_atomic(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))


def _common_name(cert: x509.Certificate) -> str:
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(values) != 1:
        raise CaStoreError("certificate has no single common name: it was not issued by trustmig")
    return str(values[0].value)


def copy_file(src: Path, dst: Path, *, private: bool = False) -> None:
    """Copy ``src`` to ``dst`` atomically (mode 0600 when ``private``)."""
    data = read_bytes(src, "file")
    if private:
        write_private(dst, data)
    else:
        write_atomic(dst, data)


__all__ = ["ClusterCA", "Credentials", "copy_file"]
