"""Fixtures for the PKI tests: a fresh CA and two host identities per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustmig.pki import ClusterCA, Credentials


@pytest.fixture
def ca(tmp_path: Path) -> ClusterCA:
    return ClusterCA.init(tmp_path / "ca")


@pytest.fixture
def host_a(ca: ClusterCA, tmp_path: Path) -> Credentials:
    return ca.issue_host("host-a", tmp_path / "host-a", ips=["127.0.0.1"])


@pytest.fixture
def host_b(ca: ClusterCA, tmp_path: Path) -> Credentials:
    return ca.issue_host("host-b", tmp_path / "host-b")
