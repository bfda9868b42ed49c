"""Bad input and misuse produce one-line AuditError subclasses naming the problem."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trustmig.audit import (
    AuditClosedError,
    AuditConfigError,
    AuditError,
    AuditInputError,
    AuditLog,
    AuditReadOnlyError,
    AuditStorageError,
)

OpenLog = Callable[..., AuditLog]


def test_read_only_log_refuses_writes(
    open_log: OpenLog, db_url: str, key: Ed25519PrivateKey
) -> None:
    writer = open_log(db_url, host="src", signing_key=key)
    writer.append("migration.phase")
    writer.close()
    reader = open_log(db_url, host="src", signing_key=None)
    with pytest.raises(AuditReadOnlyError, match="read-only"):
        reader.append("migration.phase")
    with pytest.raises(AuditReadOnlyError):
        reader.flush()
    assert len(reader.events()) == 1


def test_read_only_open_of_missing_file_does_not_create_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.db"
    with pytest.raises(AuditStorageError, match="does not exist"):
        AuditLog(f"sqlite:///{path}", host="src", signing_key=None)
    assert not path.exists()


def test_read_only_open_of_a_database_without_trail(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "other.db"
    sqlite3.connect(path).close()
    with pytest.raises(AuditStorageError, match="missing tables"):
        AuditLog(f"sqlite:///{path}", host="src", signing_key=None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"url": "not a url", "host": "h"}, "not a valid SQLAlchemy URL"),
        ({"url": "", "host": "h"}, "URL is empty"),
        ({"url": "nosuchdb://x/y", "host": "h"}, "cannot open audit database"),
        ({"url": "sqlite://", "host": ""}, "host name"),
        ({"url": "sqlite://", "host": "h", "checkpoint_every": 0}, "checkpoint_every"),
        ({"url": "sqlite://", "host": "h", "checkpoint_every": "5"}, "checkpoint_every"),
        ({"url": "sqlite://", "host": "h", "signing_key": "secret"}, "Ed25519"),
    ],
)
def test_bad_configuration(kwargs: dict[str, object], match: str) -> None:
    kwargs.setdefault("signing_key", Ed25519PrivateKey.generate())
    url = kwargs.pop("url")
    with pytest.raises(AuditConfigError, match=match):
        AuditLog(url, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "kwargs", "match"),
    [
        ("Migration Phase", {}, "kind"),
        ("", {}, "kind"),
        ("migration.phase", {"vm": ""}, "event vm"),
        ("migration.phase", {"user": 5}, "event user"),
        ("migration.phase", {"data": [1, 2]}, "mapping"),
        ("migration.phase", {"data": {1: "x"}}, "keys must be strings"),
        ("migration.phase", {"data": {"x": float("nan")}}, "finite"),
        ("migration.phase", {"data": {"x": {"y": b"raw"}}}, r"data\.x\.y is a bytes"),
        ("migration.phase", {"data": {"x": (1, 2)}}, "tuple"),
    ],
)
def test_bad_event_input(kind: str, kwargs: dict[str, object], match: str) -> None:
    log = AuditLog("sqlite://", host="h", signing_key=Ed25519PrivateKey.generate())
    try:
        with pytest.raises(AuditInputError, match=match):
            log.append(kind, **kwargs)  # type: ignore[arg-type]
        # a rejected event leaves no trace in the chain
        assert log.append("migration.phase").seq == 1
    finally:
        log.close()


def test_closed_log_refuses_use(key: Ed25519PrivateKey) -> None:
    log = AuditLog("sqlite://", host="h", signing_key=key)
    log.close()
    log.close()  # idempotent
    with pytest.raises(AuditClosedError, match="closed"):
        log.append("migration.phase")
    with pytest.raises(AuditClosedError):
        log.events()


def test_all_errors_share_the_package_base_and_are_one_line(key: Ed25519PrivateKey) -> None:
    log = AuditLog("sqlite://", host="h", signing_key=key)
    try:
        with pytest.raises(AuditError) as info:
            log.events(limit=-1)
        assert "\n" not in str(info.value)
        with pytest.raises(AuditInputError, match="public key"):
            log.verify(key)  # type: ignore[arg-type]
    finally:
        log.close()
