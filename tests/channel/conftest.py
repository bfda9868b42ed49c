"""Fixtures: a real throwaway PKI (CA + two host certificates) and one completed session."""

from __future__ import annotations

import pytest

from trustmig.channel import HandshakeResult, LocalIdentity

from .helpers import DST, SRC, Pki, make_pair, make_pki, run_handshake


@pytest.fixture(scope="session")
def pki() -> Pki:
    return make_pki()


@pytest.fixture(scope="session")
def src_id(pki: Pki) -> LocalIdentity:
    return pki.issue(SRC)


@pytest.fixture(scope="session")
def dst_id(pki: Pki) -> LocalIdentity:
    return pki.issue(DST)


@pytest.fixture(scope="session")
def session_pair(
    pki: Pki, src_id: LocalIdentity, dst_id: LocalIdentity
) -> tuple[HandshakeResult, HandshakeResult]:
    """(client result, server result) of one completed handshake with 3 streams."""
    client, server = make_pair(pki, src_id, dst_id)
    return run_handshake(client, server)
