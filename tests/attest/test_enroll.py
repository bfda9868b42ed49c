from __future__ import annotations

import os
from pathlib import Path

import pytest

from trustmig.attest.enroll import AkRegistry, EnrollmentError, enroll_host, make_credential
from trustmig.attest.errors import AttestError
from trustmig.attest.swtpm import SwtpmProcess

from .conftest import TpmFactory

pytestmark = pytest.mark.tpm


def test_enrollment_by_credential_activation(
    tpm_factory: TpmFactory, tmp_path: Path, vendor_ca_dir: Path
) -> None:
    tpm = tpm_factory("host-a")
    reg_path = tmp_path / "registry.json"
    ca = (vendor_ca_dir / "issuercert.pem").read_bytes()
    record = enroll_host("host-a", tpm, reg_path, ek_ca_certs=[ca])
    keys = tpm.ensure_keys()
    assert record.ak_name == keys.ak_name.hex()
    assert record.ek_cert_pem is not None and "BEGIN CERTIFICATE" in record.ek_cert_pem
    loaded = AkRegistry.load(reg_path).get("host-a")
    assert loaded == record
    assert AkRegistry.load(reg_path).get("host-b") is None


def test_credential_for_another_hosts_ek_is_refused(tpm_factory: TpmFactory) -> None:
    a, b = tpm_factory("host-a"), tpm_factory("host-b")
    ka, kb = a.ensure_keys(), b.ensure_keys()
    secret = os.urandom(32)
    # Made for B's EK: A's TPM cannot decrypt the seed.
    blob, enc = make_credential(kb.ek_public_pem, ka.ak_name, secret)
    with pytest.raises(AttestError, match="credential activation refused"):
        a.activate_credential(blob, enc)
    # Made for A's EK but B's AK name: A's TPM has no such AK, the integrity check fails.
    blob, enc = make_credential(ka.ek_public_pem, kb.ak_name, secret)
    with pytest.raises(AttestError, match="credential activation refused"):
        a.activate_credential(blob, enc)
    # The right pairing works.
    blob, enc = make_credential(ka.ek_public_pem, ka.ak_name, secret)
    assert a.activate_credential(blob, enc) == secret


def test_untrusted_ek_ca_and_swapped_hardware_are_refused(
    tpm_factory: TpmFactory, tmp_path: Path
) -> None:
    a = tpm_factory("host-a")
    foreign = SwtpmProcess(tmp_path / "foreign", ca_dir=tmp_path / "foreign-ca")
    with foreign:
        foreign_ca = foreign.manufacturer_ca_cert.read_bytes()
    reg = tmp_path / "registry.json"
    with pytest.raises(EnrollmentError, match="not issued by a trusted TPM manufacturer CA"):
        enroll_host("host-a", a, reg, ek_ca_certs=[foreign_ca])
    assert AkRegistry.load(reg).get("host-a") is None

    enroll_host("host-a", a, reg)
    b = tpm_factory("host-b")
    with pytest.raises(EnrollmentError, match="already enrolled with a different EK"):
        enroll_host("host-a", b, reg)
    record = enroll_host("host-a", b, reg, replace=True)
    assert AkRegistry.load(reg).get("host-a") == record
    assert record.ak_name == b.ensure_keys().ak_name.hex()


def test_make_credential_rejects_bad_inputs() -> None:
    with pytest.raises(EnrollmentError, match="EK public key PEM"):
        make_credential(b"not a pem", b"\x00\x0b" + bytes(32), b"s" * 32)
    with pytest.raises(EnrollmentError, match="1-32 bytes"):
        make_credential(b"", b"", b"s" * 33)


def test_corrupt_registry_is_reported(tmp_path: Path) -> None:
    p = tmp_path / "registry.json"
    p.write_text("{not json")
    with pytest.raises(EnrollmentError, match="restore it from backup"):
        AkRegistry.load(p)
