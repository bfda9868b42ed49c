"""The cluster CA: its directory, issued certificates, records, revocation and blob signing."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pki_helpers import bundle_for

from trustmig.pki import (
    ROLES,
    BadSignature,
    CaStoreError,
    ClusterCA,
    Credentials,
    InvalidInput,
    PeerRejected,
    PkiError,
    TrustBundle,
)
from trustmig.pki.identity import ROLES_EXTENSION_OID


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_lays_out_ca_directory(tmp_path: Path) -> None:
    ca = ClusterCA.init(tmp_path / "ca", name="test cluster CA")
    names = sorted(p.name for p in (tmp_path / "ca").iterdir() if not p.name.startswith("."))
    assert names == ["ca.key", "ca.pem", "crl.pem", "issued.json"]
    assert _mode(tmp_path / "ca" / "ca.key") == 0o600
    assert json.loads((tmp_path / "ca" / "issued.json").read_text()) == []
    cn = ca.ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "test cluster CA"
    assert ca.ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    crl = x509.load_pem_x509_crl((tmp_path / "ca" / "crl.pem").read_bytes())
    assert crl.is_signature_valid(ca.ca_cert.public_key())  # type: ignore[arg-type]
    assert len(list(crl)) == 0


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    first = ClusterCA.init(tmp_path / "ca")
    with pytest.raises(CaStoreError, match=r"already holds a CA.*force=True"):
        ClusterCA.init(tmp_path / "ca")
    assert ClusterCA.load(tmp_path / "ca").ca_cert == first.ca_cert
    second = ClusterCA.init(tmp_path / "ca", force=True)
    assert second.ca_cert != first.ca_cert
    assert ClusterCA.load(tmp_path / "ca").ca_cert == second.ca_cert


def test_load_round_trip_and_refuses_exposed_key(tmp_path: Path) -> None:
    ca = ClusterCA.init(tmp_path / "ca")
    loaded = ClusterCA.load(tmp_path / "ca")
    assert loaded.ca_cert == ca.ca_cert
    assert loaded.ca_key.private_numbers() == ca.ca_key.private_numbers()
    os.chmod(tmp_path / "ca" / "ca.key", 0o644)
    with pytest.raises(CaStoreError, match=r"readable by other users.*chmod 600"):
        ClusterCA.load(tmp_path / "ca")
    with pytest.raises(CaStoreError, match="holds no CA"):
        ClusterCA.load(tmp_path / "nowhere")


def test_host_certificate_shape_and_files(ca: ClusterCA, tmp_path: Path) -> None:
    creds = ca.issue_host("node-1.cluster", tmp_path / "h", ips=["10.0.0.7", "::1"])
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == [
        "ca.pem",
        "crl.pem",
        "host.key",
        "host.pem",
    ]
    assert _mode(creds.key_path) == 0o600
    assert creds.ca_path.read_bytes() == ca.ca_path.read_bytes()
    cert = creds.load_cert()
    subject = {a.oid: a.value for a in cert.subject}
    assert subject[NameOID.COMMON_NAME] == "node-1.cluster"
    assert subject[NameOID.ORGANIZATIONAL_UNIT_NAME] == "trustmig-host"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node-1.cluster"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7", "::1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert 364 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 366
    assert creds.name() == "node-1.cluster"
    assert creds.load_key().curve.name == "secp256r1"
    assert Credentials.in_dir(tmp_path / "h") == creds


def test_user_roles_and_tenant_round_trip(ca: ClusterCA, tmp_path: Path) -> None:
    creds = ca.issue_user(
        "dana@example", tmp_path / "u", roles=["auditor", "operator", "auditor"], tenant="red"
    )
    cert = creds.load_cert()
    orgs = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    assert orgs == ["operator", "auditor"]
    ext = cert.extensions.get_extension_for_oid(ROLES_EXTENSION_OID)
    assert not ext.critical
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    who = bundle_for(creds).verify(cert, kind="user", expect_name="dana@example")
    assert who.roles == ("operator", "auditor")
    assert who.tenant == "red"
    assert 29 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 31
    no_tenant = ca.issue_user("erin", tmp_path / "e", roles=list(ROLES))
    who = bundle_for(no_tenant).verify(no_tenant.cert_der())
    assert (who.roles, who.tenant) == (ROLES, None)


@pytest.mark.parametrize(
    ("roles", "message"),
    [
        (
            ["admin"],
            "unknown role 'admin': valid roles are owner, operator, tenant-admin, cluster-admin",
        ),
        (["owner", "Owner"], "unknown role 'Owner'"),
        ([], "at least one role"),
        ("owner", "must be a list of role names"),
    ],
)
def test_invalid_roles_are_rejected(
    ca: ClusterCA, tmp_path: Path, roles: list[str], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        ca.issue_user("frank", tmp_path / "f", roles=roles)
    assert not (tmp_path / "f").exists()
    assert ca.issued() == []


@pytest.mark.parametrize("name", ["Host-A", "host_a", "-host", "a/b", "", "x" * 64])
def test_invalid_host_names_are_rejected(ca: ClusterCA, tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidInput, match="invalid host name"):
        ca.issue_host(name, tmp_path / "h")


def test_invalid_user_tenant_ip_and_days(ca: ClusterCA, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="invalid user name"):
        ca.issue_user("../etc", tmp_path / "u", roles=["owner"])
    with pytest.raises(InvalidInput, match="invalid tenant"):
        ca.issue_user("gina", tmp_path / "u", roles=["owner"], tenant="a b")
    with pytest.raises(InvalidInput, match=r"invalid IP address '10\.0\.0\.300'"):
        ca.issue_host("host-x", tmp_path / "h", ips=["10.0.0.300"])
    with pytest.raises(InvalidInput, match="days=0"):
        ca.issue_host("host-x", tmp_path / "h", days=0)
    with pytest.raises(InvalidInput, match="outlives the CA certificate"):
        ca.issue_host("host-x", tmp_path / "h", days=100_000)
    assert issubclass(InvalidInput, PkiError)


def test_issued_records_and_revocation(ca: ClusterCA, tmp_path: Path) -> None:
    first = ca.issue_host("host-b", tmp_path / "b1")
    second = ca.issue_host("host-b", tmp_path / "b2")
    other = ca.issue_host("host-c", tmp_path / "c")
    records = ca.issued()
    assert [(r["kind"], r["name"], r["revoked"]) for r in records] == [
        ("host", "host-b", False),
        ("host", "host-b", False),
        ("host", "host-c", False),
    ]
    assert records[0]["serial"] == first.load_cert().serial_number
    assert records[0]["not_after"] == first.load_cert().not_valid_after_utc.isoformat()

    revoked = ca.revoke("host-b", "host")
    assert sorted(revoked) == sorted(
        [first.load_cert().serial_number, second.load_cert().serial_number]
    )
    assert ca.revoke("host-b", "host") == []  # nothing new to revoke
    assert [r["revoked"] for r in ca.issued()] == [True, True, False]
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert sorted(r.serial_number for r in crl) == sorted(revoked)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number >= 3

    bundle = TrustBundle.load(ca.ca_path, ca.crl_path)
    with pytest.raises(PeerRejected, match="'host-b' is revoked"):
        bundle.verify(second.cert_der())
    assert bundle.verify(other.cert_der()).name == "host-c"
    # A user of the same name is a different identity and stays valid.
    with pytest.raises(InvalidInput, match="no user named 'host-b'"):
        ca.revoke("host-b", "user")


def test_reissued_host_is_accepted_after_revocation(ca: ClusterCA, tmp_path: Path) -> None:
    ca.issue_host("host-d", tmp_path / "d-old")
    ca.revoke("host-d", "host")
    fresh = ca.issue_host("host-d", tmp_path / "d-new")
    assert bundle_for(fresh).verify_host(fresh.cert_der(), "host-d").name == "host-d"


def test_crl_from_another_ca_is_refused(ca: ClusterCA, host_a: Credentials, tmp_path: Path) -> None:
    other = ClusterCA.init(tmp_path / "other")
    with pytest.raises(CaStoreError, match="not signed by the CA"):
        TrustBundle.load(host_a.ca_path, other.crl_path)


def test_sign_blob_verifies_only_unaltered_data(ca: ClusterCA, tmp_path: Path) -> None:
    blob = b'{"reference": "pcr-values"}'
    signature = ca.sign_blob(blob)
    bundle = TrustBundle.load(ca.ca_path)
    bundle.verify_blob(blob, signature)
    with pytest.raises(BadSignature, match="does not verify"):
        bundle.verify_blob(blob + b" ", signature)
    other = ClusterCA.init(tmp_path / "other")
    with pytest.raises(BadSignature):
        bundle.verify_blob(blob, other.sign_blob(blob))


def test_ca_certificate_is_not_accepted_as_peer(ca: ClusterCA) -> None:
    with pytest.raises(PeerRejected, match="CA certificate"):
        TrustBundle.load(ca.ca_path, ca.crl_path).verify(ca.ca_cert)


def test_one_name_never_serves_as_both_host_and_user(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # QEMU's TLS checks a destination by name alone: a user named like a host could pass for it
    from trustmig.pki.authority import ClusterCA
    from trustmig.pki.errors import InvalidInput

    ca = ClusterCA.init(tmp_path / "ca")
    ca.issue_host("host-b", tmp_path / "b")
    with pytest.raises(InvalidInput, match="already a host name"):
        ca.issue_user("host-b", tmp_path / "u", roles=["operator"])
    ca.issue_user("alice", tmp_path / "alice", roles=["operator"])
    with pytest.raises(InvalidInput, match="already a user name"):
        ca.issue_host("alice", tmp_path / "h")
