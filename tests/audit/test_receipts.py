"""Migration receipts: canonical bytes, signatures, and storage with both hosts' signatures."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trustmig.audit import (
    AuditInputError,
    AuditLog,
    receipt_bytes,
    sign_receipt,
    verify_receipt,
)

OpenLog = Callable[..., AuditLog]


def _fields(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "migration_id": "m-42",
        "vm": "vm1",
        "user": "alice",
        "source": "src",
        "destination": "dst",
        "stream_digest": "sha256:" + "ab" * 32,
        "outcome": "completed",
        "ts": "2025-01-31T12:00:00.000000Z",
    }
    base.update(over)
    return base


def test_receipt_bytes_are_canonical() -> None:
    f = _fields()
    reordered = dict(reversed(list(f.items())))
    assert receipt_bytes(f) == receipt_bytes(reordered)
    assert receipt_bytes(f) != receipt_bytes(_fields(outcome="aborted"))
    assert b'"destination":"dst"' in receipt_bytes(f)
    assert receipt_bytes(_fields(user=None)).count(b'"user":null') == 1


def test_sign_and_verify_round_trip() -> None:
    key = Ed25519PrivateKey.generate()
    sig = sign_receipt(key, _fields())
    assert len(sig) == 64
    assert verify_receipt(key.public_key(), _fields(), sig) is True


def test_forged_or_altered_receipt_fails() -> None:
    key = Ed25519PrivateKey.generate()
    mallory = Ed25519PrivateKey.generate()
    sig = sign_receipt(key, _fields())
    assert verify_receipt(key.public_key(), _fields(), sign_receipt(mallory, _fields())) is False
    assert verify_receipt(key.public_key(), _fields(outcome="aborted"), sig) is False
    assert verify_receipt(key.public_key(), _fields(), sig[:-1] + bytes([sig[-1] ^ 1])) is False
    assert verify_receipt(key.public_key(), _fields(), b"short") is False


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({k: v for k, v in _fields().items() if k != "stream_digest"}, "missing stream_digest"),
        (_fields(extra="x"), "unknown field"),
        (_fields(vm=""), "receipt field vm"),
        (_fields(outcome=None), "receipt field outcome"),
        (_fields(ts=12), "receipt field ts"),
    ],
)
def test_malformed_receipt_fields(fields: dict[str, Any], match: str) -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(AuditInputError, match=match):
        sign_receipt(key, fields)
    with pytest.raises(AuditInputError, match=match):
        verify_receipt(key.public_key(), fields, b"\0" * 64)


def test_both_hosts_store_both_signatures(open_log: OpenLog, tmp_path: Path) -> None:
    src_key, dst_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    src = open_log(f"sqlite:///{tmp_path / 'src.db'}", host="src", signing_key=src_key)
    dst = open_log(f"sqlite:///{tmp_path / 'dst.db'}", host="dst", signing_key=dst_key)
    fields = _fields()
    src.append("migration.complete", vm="vm1", migration_id="m-42", outcome="completed")
    src_sig, dst_sig = sign_receipt(src_key, fields), sign_receipt(dst_key, fields)
    # each side checks the other's signature with the peer's public key before storing
    assert verify_receipt(dst_key.public_key(), fields, dst_sig)
    assert verify_receipt(src_key.public_key(), fields, src_sig)
    src.store_receipt(fields, src_sig, "dst", dst_sig)
    dst.store_receipt(fields, dst_sig, "src", src_sig)

    for log, own, peer, peer_host in (
        (src, src_key, dst_key, "dst"),
        (dst, dst_key, src_key, "src"),
    ):
        (stored,) = log.receipts("m-42")
        assert stored["fields"] == fields
        assert stored["peer_host"] == peer_host
        assert verify_receipt(own.public_key(), stored["fields"], stored["own_sig"])
        assert verify_receipt(peer.public_key(), stored["fields"], stored["peer_sig"])
        event = log.events(kind="receipt")[-1]
        assert event.migration_id == "m-42" and event.outcome == "completed"
        assert event.data["receipt"] == fields
        assert bytes.fromhex(event.data["peer_sig"]) == stored["peer_sig"]
        report = log.verify(own.public_key(), strict=True)
        assert report.ok, report.problems
    assert src.receipts("other") == []
    assert len(src.receipts()) == 1


def test_store_receipt_refuses_bad_input(open_log: OpenLog, db_url: str) -> None:
    key, peer = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    log = open_log(db_url, host="src", signing_key=key)
    fields = _fields()
    good, peer_sig = sign_receipt(key, fields), sign_receipt(peer, fields)
    with pytest.raises(AuditInputError, match="does not verify with this host's audit key"):
        log.store_receipt(fields, peer_sig, "dst", peer_sig)
    with pytest.raises(AuditInputError, match="peer host is 'elsewhere'"):
        log.store_receipt(fields, good, "elsewhere", peer_sig)
    with pytest.raises(AuditInputError, match="not 64 bytes"):
        log.store_receipt(fields, good, "dst", b"x")
    third = _fields(source="a", destination="b")
    with pytest.raises(AuditInputError, match="not involving this host"):
        log.store_receipt(third, sign_receipt(key, third), "b", peer_sig)
    assert log.receipts() == [] and log.events() == []
    log.store_receipt(fields, good, "dst", peer_sig)
    with pytest.raises(AuditInputError, match="already stored"):
        log.store_receipt(fields, good, "dst", peer_sig)
    assert len(log.receipts()) == 1 and len(log.events(kind="receipt")) == 1


def test_modified_stored_receipt_is_reported(open_log: OpenLog, db_url: str, db_path: Path) -> None:
    key, peer = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    log = open_log(db_url, host="src", signing_key=key)
    fields = _fields()
    log.store_receipt(fields, sign_receipt(key, fields), "dst", sign_receipt(peer, fields))
    log.close()
    conn = sqlite3.connect(db_path)
    try:
        conn.execute("UPDATE receipts SET fields = replace(fields, 'completed', 'aborted')")
        conn.commit()
    finally:
        conn.close()
    report = open_log(db_url, host="src", signing_key=None).verify(key.public_key())
    assert report.problems == [
        "receipt for migration m-42: own signature does not verify with the given public key "
        "(receipt modified or forged)"
    ]


def test_overlong_receipt_value_is_refused() -> None:
    with pytest.raises(AuditInputError, match="receipt field stream_digest"):
        receipt_bytes(_fields(stream_digest="x" * 256))
