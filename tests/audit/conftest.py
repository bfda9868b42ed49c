"""Shared fixtures: a fresh audit key and a SQLite file per test, logs closed even on failure."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trustmig.audit import AuditError, AuditLog


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


@pytest.fixture
def db_url(db_path: Path) -> str:
    return f"sqlite:///{db_path}"


@pytest.fixture
def open_log() -> Iterator[Callable[..., AuditLog]]:
    """Factory opening AuditLogs that are all closed at teardown, whatever the test did."""
    opened: list[AuditLog] = []

    def factory(url: str, **kwargs: object) -> AuditLog:
        log = AuditLog(url, **kwargs)  # type: ignore[arg-type]
        opened.append(log)
        return log

    try:
        yield factory
    finally:
        for log in opened:
            # a log a test left unflushable (e.g. a refused second writer) must not mask results
            with contextlib.suppress(AuditError):
                log.close()
