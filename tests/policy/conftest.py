"""Fixtures for policy tests; the shared material lives in policy_helpers."""

from __future__ import annotations

import pytest
from policy_helpers import HOST_TOML, MiniPki

from trustmig.policy import HostPolicy, parse_host_policy


@pytest.fixture
def host_policy() -> HostPolicy:
    return parse_host_policy(HOST_TOML)


@pytest.fixture(scope="session")
def pki() -> MiniPki:
    return MiniPki()
