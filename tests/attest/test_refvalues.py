from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from trustmig.attest.errors import RefValuesError
from trustmig.attest.refvalues import RefValues

QEMU = hashlib.sha256(b"qemu 7.2").digest()


def test_signed_refvalues_roundtrip(tmp_path: Path, admin_key: ec.EllipticCurvePrivateKey) -> None:
    rv = RefValues()
    rv.add("qemu-binary", QEMU, "qemu 7.2 debian")
    rv.add("qemu-binary", QEMU)  # duplicate is ignored
    rv.add("agent-config", "ab" * 32)
    path = tmp_path / "ref.json"
    rv.save(path, admin_key)
    loaded = RefValues.load(path, admin_key.public_key())
    assert [(e.name, e.digest_hex) for e in loaded.list()] == [
        ("agent-config", "ab" * 32),
        ("qemu-binary", QEMU.hex()),
    ]
    assert loaded.lookup("qemu-binary", QEMU) is not None
    assert loaded.lookup("agent-config", QEMU) is None
    loaded.remove("agent-config", "ab" * 32)
    assert loaded.lookup("agent-config", bytes.fromhex("ab" * 32)) is None


def test_bad_signature_refused(tmp_path: Path, admin_key: ec.EllipticCurvePrivateKey) -> None:
    rv = RefValues()
    rv.add("qemu-binary", QEMU)
    path = tmp_path / "ref.json"
    rv.save(path, admin_key)
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(RefValuesError, match="bad signature"):
        RefValues.load(path, other.public_key())
    # A host that can write the file adds its own software: the signature no longer verifies.
    doc = json.loads(path.read_text())
    doc["body"]["entries"].append({"name": "qemu-binary", "digest_hex": "cd" * 32, "comment": ""})
    path.write_text(json.dumps(doc))
    with pytest.raises(RefValuesError, match="bad signature"):
        RefValues.load(path, admin_key.public_key())


def test_malformed_inputs(tmp_path: Path, admin_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(RefValuesError, match="sha256 hex"):
        RefValues().add("qemu-binary", "zz")
    with pytest.raises(RefValuesError, match="nothing removed"):
        RefValues().remove("qemu-binary", "ab" * 32)
    p = tmp_path / "ref.json"
    p.write_text("[]")
    with pytest.raises(RefValuesError, match="not a signed"):
        RefValues.load(p, admin_key.public_key())
    with pytest.raises(RefValuesError, match="cannot read"):
        RefValues.load(tmp_path / "missing.json", admin_key.public_key())
