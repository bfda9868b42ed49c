"""Appending, checkpointing, persistence, concurrency and reading of the audit chain."""

from __future__ import annotations

import io
import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trustmig.audit import GENESIS_HASH, AuditLog
from trustmig.audit.canonical import event_hash

OpenLog = Callable[..., AuditLog]


def _count(db_path: Path, table: str) -> int:
    with sqlite3.connect(db_path) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def test_append_and_verify_ok(
    open_log: OpenLog, db_url: str, key: Ed25519PrivateKey, db_path: Path
) -> None:
    log = open_log(db_url, host="src", signing_key=key, checkpoint_every=10)
    first = log.append("migrate.request", vm="vm1", migration_id="m1", user="alice")
    second = log.append(
        "policy.decision", vm="vm1", migration_id="m1", outcome="allow", data={"rule": "r1"}
    )
    for i in range(23):
        log.append("migration.phase", vm="vm1", migration_id="m1", data={"phase": i})
    log.flush()

    assert first.seq == 1 and first.prev_hash == GENESIS_HASH
    assert second.seq == 2 and second.prev_hash == first.hash
    assert second.hash == event_hash(
        seq=2,
        ts=second.ts,
        host="src",
        kind="policy.decision",
        vm="vm1",
        migration_id="m1",
        user=None,
        outcome="allow",
        data={"rule": "r1"},
        prev_hash=first.hash,
    )
    report = log.verify(key.public_key())
    assert report.ok, report.problems
    assert report.events == 25
    # automatic checkpoints at 10 and 20, and one from flush() at 25
    assert report.checkpoints == 3 == _count(db_path, "audit_checkpoints")
    assert report.warnings == []
    assert report.problems == []
    stored = log.events()
    assert [e.seq for e in stored] == list(range(1, 26))
    assert report.head_hash == stored[-1].hash
    assert stored[0] == first and stored[1] == second


def test_timestamps_are_utc_microseconds(
    open_log: OpenLog, db_url: str, key: Ed25519PrivateKey
) -> None:
    log = open_log(db_url, host="src", signing_key=key)
    ev = log.append("migrate.request")
    # e.g. 2025-01-31T12:34:56.123456Z
    assert len(ev.ts) == 27 and ev.ts[10] == "T" and ev.ts.endswith("Z") and ev.ts[19] == "."


def test_flush_without_new_events_adds_no_checkpoint(
    open_log: OpenLog, db_url: str, key: Ed25519PrivateKey, db_path: Path
) -> None:
    log = open_log(db_url, host="src", signing_key=key)
    log.flush()
    assert _count(db_path, "audit_checkpoints") == 0
    log.append("migrate.request")
    log.flush()
    log.flush()
    log.close()
    assert _count(db_path, "audit_checkpoints") == 1


def test_flush_is_the_durability_point(
    open_log: OpenLog, db_url: str, key: Ed25519PrivateKey
) -> None:
    writer = open_log(db_url, host="src", signing_key=key)
    for _ in range(3):
        writer.append("migration.phase")
    writer.flush()
    writer.append("migration.phase")
    writer.append("migration.phase")
    reader = open_log(db_url, host="src", signing_key=None)
    assert [e.seq for e in reader.events()] == [1, 2, 3]
    writer.flush()
    assert [e.seq for e in reader.events()] == [1, 2, 3, 4, 5]
    assert reader.verify(key.public_key()).ok


def test_reopen_continues_the_chain(open_log: OpenLog, db_url: str, key: Ed25519PrivateKey) -> None:
    log = open_log(db_url, host="src", signing_key=key)
    for i in range(10):
        log.append("migration.phase", data={"i": i})
    log.close()

    again = open_log(db_url, host="src", signing_key=key)
    last_before = again.events()[-1]
    ev = again.append("migration.complete", outcome="ok")
    assert ev.seq == 11 and ev.prev_hash == last_before.hash
    for _ in range(4):
        again.append("migration.phase")
    again.close()

    reader = open_log(db_url, host="src", signing_key=None)
    report = reader.verify(key.public_key(), strict=True)
    assert report.ok, report.problems
    assert report.events == 15 and report.checkpoints == 2


def test_unflushed_events_committed_by_a_read_are_a_warning_then_signed(
    open_log: OpenLog, db_url: str, key: Ed25519PrivateKey
) -> None:
    log = open_log(db_url, host="src", signing_key=key)
    log.append("migration.phase")
    log.flush()
    log.append("migration.phase")
    log.append("migration.phase")
    report = log.verify(key.public_key())
    assert report.ok
    assert report.warnings == [
        "2 event(s) after the last checkpoint (seq 2..3) are not covered by a signature"
    ]
    strict = log.verify(key.public_key(), strict=True)
    assert not strict.ok
    assert strict.problems == [
        "unsigned tail: 2 event(s) after the last checkpoint (seq 2..3) are not covered by a "
        "signature"
    ]
    log.flush()
    assert log.verify(key.public_key(), strict=True).ok


def test_concurrent_appends_keep_one_valid_chain(
    open_log: OpenLog, db_url: str, key: Ed25519PrivateKey
) -> None:
    log = open_log(db_url, host="src", signing_key=key, checkpoint_every=64)
    per_thread = 500
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(per_thread):
                log.append("migration.phase", vm=f"vm{n}", data={"i": i})
                if i % 100 == 0:
                    log.flush()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    log.flush()
    report = log.verify(key.public_key(), strict=True)
    assert report.ok, report.problems[:5]
    assert report.events == 4 * per_thread
    events = log.events()
    assert [e.seq for e in events] == list(range(1, 4 * per_thread + 1))
    for n in range(4):
        mine = [e.data["i"] for e in events if e.vm == f"vm{n}"]
        assert mine == list(range(per_thread))


def test_events_filters_and_limit(open_log: OpenLog, db_url: str, key: Ed25519PrivateKey) -> None:
    log = open_log(db_url, host="src", signing_key=key)
    log.append("migrate.request", vm="a", migration_id="m1")
    log.append("migration.phase", vm="a", migration_id="m1")
    log.append("migrate.request", vm="b", migration_id="m2")
    log.append("migration.abort", vm="b", migration_id="m2", outcome="timeout")
    log.append("migration.phase", vm="a", migration_id="m3")
    assert [e.seq for e in log.events(vm="a")] == [1, 2, 5]
    assert [e.seq for e in log.events(migration_id="m2")] == [3, 4]
    assert [e.seq for e in log.events(kind="migrate.request")] == [1, 3]
    assert [e.seq for e in log.events(vm="a", kind="migration.phase")] == [2, 5]
    assert [e.seq for e in log.events(limit=2)] == [4, 5]
    assert log.events(limit=0) == []
    assert log.events(migration_id="m2")[1].outcome == "timeout"


def test_export_jsonl(open_log: OpenLog, db_url: str, key: Ed25519PrivateKey) -> None:
    log = open_log(db_url, host="src", signing_key=key)
    for i in range(5):
        log.append("migration.phase", vm="vm1", data={"i": i, "nested": {"z": [1, 2.5, None]}})
    buf = io.StringIO()
    assert log.export_jsonl(buf) == 5
    lines = buf.getvalue().splitlines()
    assert len(lines) == 5
    parsed = [json.loads(line) for line in lines]
    assert parsed == [e.to_json() for e in log.events()]
    assert parsed[2]["data"] == {"i": 2, "nested": {"z": [1, 2.5, None]}}
    assert parsed[1]["prev_hash"] == parsed[0]["hash"]


def test_two_hosts_share_one_database(
    open_log: OpenLog, db_url: str, key: Ed25519PrivateKey
) -> None:
    other_key = Ed25519PrivateKey.generate()
    a = open_log(db_url, host="a", signing_key=key)
    b = open_log(db_url, host="b", signing_key=other_key)
    for _ in range(3):
        a.append("migration.phase")
        b.append("migration.phase")
    a.flush()
    b.flush()
    assert [e.host for e in a.events()] == ["a"] * 3
    assert b.events()[0].seq == 1 and b.events()[0].prev_hash == GENESIS_HASH
    assert a.verify(key.public_key(), strict=True).ok
    assert b.verify(other_key.public_key(), strict=True).ok
    wrong = a.verify(other_key.public_key())
    assert not wrong.ok
    assert wrong.problems[0].startswith("bad checkpoint signature: checkpoint 1")


def test_second_writer_for_the_same_host_is_refused(
    open_log: OpenLog, db_url: str, key: Ed25519PrivateKey
) -> None:
    from trustmig.audit import AuditStorageError

    first = open_log(db_url, host="src", signing_key=key)
    second = open_log(db_url, host="src", signing_key=key)
    first.append("migration.phase")
    first.flush()
    second.append("migration.phase")
    with pytest.raises(AuditStorageError, match="one agent per host"):
        second.flush()
    assert first.verify(key.public_key(), strict=True).ok
