from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from trustmig.attest.errors import AttestError, UnsealRefused
from trustmig.attest.sealing import predict_pcrs, reseal
from trustmig.attest.swtpm import open_tpm
from trustmig.attest.tpm import UNSEAL_REFUSED_MSG
from trustmig.attest.tpmwire import pcr_policy_digest

from .conftest import TpmFactory

pytestmark = pytest.mark.tpm
PCRS = [11, 12]


def test_seal_unseal_bound_to_pcrs_and_reseal_for_upgrade(tpm_factory: TpmFactory) -> None:
    tpm = tpm_factory("host-a")
    v1 = [
        ("qemu-binary", hashlib.sha256(b"qemu 7.2").digest(), "q"),
        ("agent-config", hashlib.sha256(b"cfg").digest(), "c"),
    ]
    for name, digest, _ in v1:
        tpm.extend(11 if name == "qemu-binary" else 12, digest)
    key = os.urandom(32)
    blob = tpm.seal(key, PCRS)
    assert tpm.unseal(blob) == key
    assert tpm.pcr_read(PCRS) == predict_pcrs(v1, PCRS)

    # Authorized upgrade to QEMU 7.3: reseal to the predicted post-upgrade PCRs before it happens.
    v2 = [("qemu-binary", hashlib.sha256(b"qemu 7.3").digest(), "q"), v1[1]]
    new_blob = reseal(tpm, blob, predict_pcrs(v2, PCRS))

    tpm.extend(11, hashlib.sha256(b"unapproved change").digest())
    with pytest.raises(UnsealRefused) as ei:
        tpm.unseal(blob)
    assert str(ei.value) == UNSEAL_REFUSED_MSG
    assert "trustmig host reseal" in str(ei.value)
    with pytest.raises(UnsealRefused):
        tpm.unseal(new_blob)  # the unapproved state does not match the upgrade either


def test_resealed_blob_unseals_after_the_upgrade(tmp_path: Path) -> None:
    v1 = [("qemu-binary", hashlib.sha256(b"qemu 7.2").digest(), "q")]
    v2 = [("qemu-binary", hashlib.sha256(b"qemu 7.3").digest(), "q")]
    state = tmp_path / "host"
    tpm = open_tpm(state, prefer_device=False)
    try:
        tpm.extend(11, v1[0][1])
        key = os.urandom(32)
        old = tpm.seal(key, [11])
        new = reseal(tpm, old, predict_pcrs(v2, [11]))
    finally:
        tpm.close()
    tpm = open_tpm(state, prefer_device=False)  # reboot into the upgraded software
    try:
        tpm.extend(11, v2[0][1])
        with pytest.raises(UnsealRefused):
            tpm.unseal(old)
        assert tpm.unseal(new) == key
    finally:
        tpm.close()


def test_seal_inputs_and_foreign_blob(tpm_factory: TpmFactory) -> None:
    a, b = tpm_factory("host-a"), tpm_factory("host-b")
    blob = a.seal(b"k" * 32, PCRS)
    with pytest.raises(AttestError, match="cannot be loaded by this TPM"):
        b.unseal(blob)
    with pytest.raises(AttestError, match="not a trustmig-sealed/1"):
        a.unseal(b"junk")
    with pytest.raises(AttestError, match="seal 1-128 bytes"):
        a.seal(b"", PCRS)
    with pytest.raises(AttestError, match="fix the prediction"):
        a.seal(b"k", PCRS, pcr_values={11: bytes(32)})
    # The offline policy prediction equals what the sealed object carries.
    assert json.loads(blob)["policy"] == pcr_policy_digest(a.pcr_read(PCRS)).hex()
