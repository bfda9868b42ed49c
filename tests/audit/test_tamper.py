"""Tampering with the database behind the log's back is detected and named by verify()."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trustmig.audit import AuditLog, VerifyReport
from trustmig.audit.canonical import GENESIS_HASH, checkpoint_message, event_hash

OpenLog = Callable[..., AuditLog]


def _build(url: str, key: Ed25519PrivateKey, n: int, every: int = 256) -> None:
    log = AuditLog(url, host="src", signing_key=key, checkpoint_every=every)
    try:
        for i in range(n):
            log.append("migration.phase", vm="vm1", migration_id="m1", data={"i": i})
    finally:
        log.close()


def _sql(db_path: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    conn = sqlite3.connect(db_path)
    try:
        for stmt, params in statements:
            conn.execute(stmt, params)
        conn.commit()
    finally:
        conn.close()


def _verify(open_log: OpenLog, url: str, key: Ed25519PrivateKey, **kw: bool) -> VerifyReport:
    return open_log(url, host="src", signing_key=None).verify(key.public_key(), **kw)


def _row(db_path: Path, seq: int) -> dict[str, object]:
    conn = sqlite3.connect(db_path)
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute("SELECT * FROM audit_events WHERE seq = ?", (seq,)).fetchone()
        return dict(row)
    finally:
        conn.close()


def _forge(seq: int, prev_hash: str, data: dict[str, object]) -> dict[str, object]:
    """A row an attacker who knows the hash algorithm (but not the key) can compute."""
    ts = "2030-01-01T00:00:00.000000Z"
    fields = dict(
        seq=seq,
        ts=ts,
        host="src",
        kind="migration.complete",
        vm="vm1",
        migration_id="m1",
        user="mallory",
        outcome="ok",
        data=data,
        prev_hash=prev_hash,
    )
    return {**fields, "data": json.dumps(data), "hash": event_hash(**fields)}  # type: ignore[arg-type]


_FORGE_KEYS = (
    "host",
    "seq",
    "ts",
    "kind",
    "vm",
    "migration_id",
    "user",
    "outcome",
    "data",
    "prev_hash",
    "hash",
)
_INSERT = (
    f"INSERT INTO audit_events ({', '.join(_FORGE_KEYS)}) "
    f"VALUES ({', '.join('?' * len(_FORGE_KEYS))})"
)


def _insert(forged: dict[str, object]) -> tuple[str, tuple[object, ...]]:
    return _INSERT, tuple(forged[k] for k in _FORGE_KEYS)


def test_untouched_log_verifies(
    open_log: OpenLog, db_url: str, db_path: Path, key: Ed25519PrivateKey
) -> None:
    _build(db_url, key, 30)
    report = _verify(open_log, db_url, key, strict=True)
    assert report.ok and report.problems == [] and report.events == 30


def test_modified_row_is_named(
    open_log: OpenLog, db_url: str, db_path: Path, key: Ed25519PrivateKey
) -> None:
    _build(db_url, key, 30)
    _sql(db_path, ("UPDATE audit_events SET data = ? WHERE seq = 7", ('{"i":999}',)))
    report = _verify(open_log, db_url, key)
    assert not report.ok
    assert len(report.problems) == 1
    assert report.problems[0].startswith("modified: hash mismatch at seq 7 ")


def test_modified_outcome_column_is_named(
    open_log: OpenLog, db_url: str, db_path: Path, key: Ed25519PrivateKey
) -> None:
    _build(db_url, key, 12)
    _sql(db_path, ("UPDATE audit_events SET outcome = 'ok', user = 'root' WHERE seq = 12", ()))
    report = _verify(open_log, db_url, key)
    assert [p.split(" (")[0] for p in report.problems] == ["modified: hash mismatch at seq 12"]


def test_rewritten_chain_is_caught_by_the_checkpoint(
    open_log: OpenLog, db_url: str, db_path: Path, key: Ed25519PrivateKey
) -> None:
    """Rewriting an event and recomputing every later hash still contradicts the signature."""
    _build(db_url, key, 20)
    prev = str(_row(db_path, 9)["hash"])
    statements = []
    for seq in range(10, 21):
        row = _row(db_path, seq)
        data = json.loads(str(row["data"]))
        if seq == 10:
            data = {"i": "rewritten"}
        fields = {
            k: row[k]
            for k in ("seq", "ts", "host", "kind", "vm", "migration_id", "user", "outcome")
        }
        digest = event_hash(**fields, data=data, prev_hash=prev)  # type: ignore[arg-type]
        statements.append(
            (
                "UPDATE audit_events SET data = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                (json.dumps(data), prev, digest, seq),
            )
        )
        prev = digest
    _sql(db_path, *statements)
    report = _verify(open_log, db_url, key)
    assert report.problems == [
        "modified: checkpoint 1 signed a different entry at seq 20 than the one now in the log"
    ]


def test_deleted_middle_row_is_named(
    open_log: OpenLog, db_url: str, db_path: Path, key: Ed25519PrivateKey
) -> None:
    _build(db_url, key, 30)
    _sql(db_path, ("DELETE FROM audit_events WHERE seq = 10", ()))
    report = _verify(open_log, db_url, key)
    assert report.problems == ["deleted: gap: seq 10 missing (before seq 11)"]
    assert report.events == 29


def test_deleted_range_is_named(
    open_log: OpenLog, db_url: str, db_path: Path, key: Ed25519PrivateKey
) -> None:
    _build(db_url, key, 30)
    _sql(db_path, ("DELETE FROM audit_events WHERE seq BETWEEN 3 AND 5", ()))
    report = _verify(open_log, db_url, key)
    assert report.problems == ["deleted: gap: seq 3..5 missing (before seq 6)"]


def test_forged_row_inserted_in_the_middle_is_named(
    open_log: OpenLog, db_url: str, db_path: Path, key: Ed25519PrivateKey
) -> None:
    _build(db_url, key, 30)
    forged = _forge(16, str(_row(db_path, 15)["hash"]), {"note": "forged"})
    _sql(
        db_path,
        # make room at seq 16 (two steps: the unique index is checked row by row)
        ("UPDATE audit_events SET seq = seq + 1000000 WHERE seq > 15", ()),
        ("UPDATE audit_events SET seq = seq - 999999 WHERE seq > 1000000", ()),
        _insert(forged),
    )
    report = _verify(open_log, db_url, key)
    assert not report.ok
    assert "inserted: seq 16 is an extra entry (seq 17 links to seq 15, skipping it)" in (
        report.problems
    )
    # every shifted entry is named as renumbered, and the signed head no longer matches
    assert (
        "modified: hash mismatch at seq 17 (the entry was renumbered: its hash is valid for "
        "seq 16)" in report.problems
    )
    assert not any(p.startswith("truncated") for p in report.problems)
    assert (
        "modified: checkpoint 1 signed a different entry at seq 30 than the one now in the log"
        in report.problems
    )


def test_forged_duplicate_seq_is_named(
    open_log: OpenLog, db_url: str, db_path: Path, key: Ed25519PrivateKey
) -> None:
    _build(db_url, key, 30)
    forged = _forge(12, str(_row(db_path, 11)["hash"]), {"note": "forged"})
    _sql(
        db_path,
        ("DROP INDEX ix_audit_events_host_seq", ()),
        _insert(forged),
    )
    conn = sqlite3.connect(db_path)
    try:
        forged_id = conn.execute("SELECT max(id) FROM audit_events").fetchone()[0]
    finally:
        conn.close()
    report = _verify(open_log, db_url, key)
    assert report.problems == [f"inserted: duplicate seq 12 (extra row id {forged_id})"]


def test_forged_row_after_the_last_checkpoint_is_only_flagged_as_unsigned(
    open_log: OpenLog, db_url: str, db_path: Path, key: Ed25519PrivateKey
) -> None:
    """The documented limit: an unsigned tail is not proof of tampering, unless strict."""
    _build(db_url, key, 30)
    forged = _forge(31, str(_row(db_path, 30)["hash"]), {"note": "forged"})
    _sql(db_path, _insert(forged))
    lenient = _verify(open_log, db_url, key)
    assert lenient.ok
    assert lenient.warnings == [
        "1 event(s) after the last checkpoint (seq 31..31) are not covered by a signature"
    ]
    strict = _verify(open_log, db_url, key, strict=True)
    assert not strict.ok
    assert strict.problems[0].startswith("unsigned tail: 1 event(s)")


def test_swapped_rows_are_named(
    open_log: OpenLog, db_url: str, db_path: Path, key: Ed25519PrivateKey
) -> None:
    _build(db_url, key, 30)
    _sql(
        db_path,
        ("UPDATE audit_events SET seq = -5 WHERE seq = 5", ()),
        ("UPDATE audit_events SET seq = 5 WHERE seq = 6", ()),
        ("UPDATE audit_events SET seq = 6 WHERE seq = -5", ()),
    )
    report = _verify(open_log, db_url, key)
    assert not report.ok
    reordered = [p for p in report.problems if p.startswith("reordered")]
    assert reordered, report.problems
    assert any("at seq 5 " in p for p in reordered)
    assert any("at seq 6 " in p or "at seq 7 " in p for p in reordered)
    assert not any(p.startswith("inserted") for p in report.problems)
    assert (
        "modified: hash mismatch at seq 5 (the entry was renumbered: its hash is valid for seq 6)"
        in report.problems
    )


def test_swapped_contents_are_named(
    open_log: OpenLog, db_url: str, db_path: Path, key: Ed25519PrivateKey
) -> None:
    """Swapping every column but seq (rows keep their place, contents change order)."""
    _build(db_url, key, 10)
    a, b = _row(db_path, 4), _row(db_path, 5)
    cols = ("ts", "data", "prev_hash", "hash")
    _sql(
        db_path,
        (
            f"UPDATE audit_events SET {', '.join(c + ' = ?' for c in cols)} WHERE seq = 4",
            tuple(b[c] for c in cols),
        ),
        (
            f"UPDATE audit_events SET {', '.join(c + ' = ?' for c in cols)} WHERE seq = 5",
            tuple(a[c] for c in cols),
        ),
    )
    report = _verify(open_log, db_url, key)
    assert any(p.startswith("reordered: prev_hash mismatch at seq 4") for p in report.problems)
    assert any(p.startswith("modified: hash mismatch at seq 4") for p in report.problems)


def test_truncated_tail_is_reported(
    open_log: OpenLog, db_url: str, db_path: Path, key: Ed25519PrivateKey
) -> None:
    _build(db_url, key, 300, every=100)
    _sql(db_path, ("DELETE FROM audit_events WHERE seq > 250", ()))
    report = _verify(open_log, db_url, key)
    assert report.problems == [
        "truncated: tail truncated: checkpoint 3 covers seq 300 but the log ends at seq 250"
    ]
    # and the events after the last checkpoint still in the log are flagged as unsigned
    assert report.warnings == [
        "50 event(s) after the last checkpoint (seq 201..250) are not covered by a signature"
    ]


def test_truncating_events_and_their_checkpoint_leaves_only_an_unsigned_window(
    open_log: OpenLog, db_url: str, db_path: Path, key: Ed25519PrivateKey
) -> None:
    """Deleting the last checkpoint too cannot reach below the previous checkpoint's seq."""
    _build(db_url, key, 300, every=100)
    _sql(
        db_path,
        ("DELETE FROM audit_events WHERE seq > 250", ()),
        ("DELETE FROM audit_checkpoints WHERE upto_seq = 300", ()),
    )
    report = _verify(open_log, db_url, key)
    assert report.ok
    assert report.warnings == [
        "50 event(s) after the last checkpoint (seq 201..250) are not covered by a signature"
    ]
    _sql(db_path, ("DELETE FROM audit_events WHERE seq > 150", ()))
    report = _verify(open_log, db_url, key)
    assert report.problems == [
        "truncated: tail truncated: checkpoint 2 covers seq 200 but the log ends at seq 150"
    ]


def test_checkpoint_signed_by_another_key_is_named(
    open_log: OpenLog, db_url: str, db_path: Path, key: Ed25519PrivateKey
) -> None:
    _build(db_url, key, 30, every=10)
    head = str(_row(db_path, 20)["hash"])
    mallory = Ed25519PrivateKey.generate()
    forged_sig = mallory.sign(checkpoint_message("src", 20, head)).hex()
    _sql(db_path, ("UPDATE audit_checkpoints SET signature = ? WHERE upto_seq = 20", (forged_sig,)))
    report = _verify(open_log, db_url, key)
    assert report.problems == [
        "bad checkpoint signature: checkpoint 2 (row id 2) covering seq 20 does not verify with "
        "the given public key"
    ]


def test_garbage_signature_and_unparseable_data(
    open_log: OpenLog, db_url: str, db_path: Path, key: Ed25519PrivateKey
) -> None:
    _build(db_url, key, 10)
    _sql(
        db_path,
        ("UPDATE audit_checkpoints SET signature = 'zz'", ()),
        ("UPDATE audit_events SET data = '{not json' WHERE seq = 3", ()),
    )
    report = _verify(open_log, db_url, key)
    assert "modified: seq 3 (row id 3) holds data that is not JSON" in report.problems
    assert any(p.startswith("bad checkpoint signature: checkpoint 1") for p in report.problems)


def test_first_entry_must_link_to_genesis(
    open_log: OpenLog, db_url: str, db_path: Path, key: Ed25519PrivateKey
) -> None:
    _build(db_url, key, 3)
    _sql(db_path, ("DELETE FROM audit_events WHERE seq = 1", ()))
    forged = _forge(1, "ab" * 32, {})
    _sql(db_path, _insert(forged))
    report = _verify(open_log, db_url, key)
    assert any(p.startswith("chain break: prev_hash mismatch at seq 1") for p in report.problems)
    assert GENESIS_HASH == "0" * 64
