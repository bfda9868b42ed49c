"""The data port's gate on real loopback sockets: a bogus connection costs an accept and a read,
and a flood from the legitimate peer's own address cannot shut that peer out."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from trustmig.agent.datapath import ChannelSecurity, DataListener, SessionTarget
from trustmig.agent.server import GuardHooks
from trustmig.channel.admit import make_admit, new_admission_key
from trustmig.channel.errors import ChannelError
from trustmig.channel.handshake import ClientHandshake
from trustmig.channel.identity import LocalIdentity
from trustmig.guard import Guard, GuardRules
from trustmig.pki.authority import ClusterCA

SRC, DST = "host-a", "host-b"

REFUSAL = "this test expects no session"


class Sessions:
    """The destination's expected migrations, reduced to their admission keys."""

    def __init__(self) -> None:
        self.keys: dict[bytes, bytes] = {}
        self.expected: list[bytes] = []

    def admission_key(self, migration_id: bytes) -> bytes | None:
        return self.keys.get(migration_id)

    def expect(self, migration_id: bytes, peer: str, n_streams: int) -> None:
        self.expected.append(migration_id)
        raise ChannelError(REFUSAL)

    def claim(self, migration_id: bytes, peer: str, summary: dict[str, str],
              disk_key_wrap: bytes) -> SessionTarget:  # fmt: skip
        raise AssertionError("never reached: expect refuses")


class Pki:
    """Host identities from a real throwaway cluster CA."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = ClusterCA.init(root / "ca")

    def issue(self, name: str) -> LocalIdentity:
        creds = self.ca.issue_host(name, self.root / name)
        return LocalIdentity(name=name, cert_der=creds.cert_der(), private_key=creds.load_key())

    @staticmethod
    def verifier() -> Callable[[bytes, str], object]:
        return lambda der, name: None  # never reached: the gate and expect() decide first


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("gate-pki"))


@pytest.fixture()
def gate(pki: Pki) -> Iterator[tuple[DataListener, Guard, Sessions]]:
    rules = GuardRules(max_unproven=32, proof_deadline_s=0.5, max_conn_rate_per_peer=5.0,
                       max_half_open_per_peer=2)  # fmt: skip
    guard = Guard(rules)
    hooks = GuardHooks(guard, lambda *a, **k: None)
    sec = ChannelSecurity(pki.issue(DST), pki.verifier(), None, None)
    sessions = Sessions()
    listener = DataListener(sec, hooks, sessions, "127.0.0.1", 0)
    listener.start()
    try:
        yield listener, guard, sessions
    finally:
        listener.close()


def _opening(pki: Pki, key: bytes, mid: bytes) -> bytes:
    hs = ClientHandshake(identity=pki.issue(SRC), server_name=DST, migration_id=mid,
                         n_streams=1, verify_peer=pki.verifier())  # fmt: skip
    hello = hs.start()
    return make_admit(key, mid, hello) + hello


def _send(listener: DataListener, data: bytes) -> socket.socket:
    s = socket.create_connection(listener.address, timeout=5)
    if data:
        s.sendall(data)
    return s


def _closed_by_server(s: socket.socket, within_s: float = 5.0) -> bool:
    s.settimeout(within_s)
    try:
        while s.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True
    finally:
        s.close()


def _until(cond: Callable[[], Any], timeout_s: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (got := cond()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return got


def test_garbage_and_unadmitted_hellos_are_closed_after_one_read(gate, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    listener, guard, sessions = gate
    assert _closed_by_server(_send(listener, os.urandom(64)))
    bare_hello = _opening(pki, new_admission_key(), os.urandom(16))[85:]
    assert _closed_by_server(_send(listener, bare_hello))
    assert _until(lambda: guard.counters().get("first_message", 0) == 2)
    assert sessions.expected == []  # no handshake ever started


def test_a_wrong_key_or_a_replayed_opening_never_reaches_the_handshake(gate, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    listener, guard, sessions = gate
    mid, key = os.urandom(16), new_admission_key()
    sessions.keys[mid] = key
    assert _closed_by_server(_send(listener, _opening(pki, new_admission_key(), mid)))
    assert _closed_by_server(_send(listener, _opening(pki, key, os.urandom(16))))  # unknown id
    good = _opening(pki, key, mid)
    assert _closed_by_server(_send(listener, good))  # admitted; the handshake refuses it
    assert _closed_by_server(_send(listener, good))  # the same bytes again: a replay
    c = _until(lambda: (c := guard.counters()).get("admit_replayed") and c)
    assert c["admit_bad_mac"] == 1 and c["admit_unknown_migration"] == 1, c
    assert c["proven"] == 1 and sessions.expected == [mid]
    assert any(REFUSAL in r["reason"] for r in listener.guard.refused_data)  # type: ignore[attr-defined]


def test_a_silent_connection_is_closed_at_the_proof_deadline(gate) -> None:  # type: ignore[no-untyped-def]
    listener, guard, _ = gate
    t0 = time.monotonic()
    assert _closed_by_server(_send(listener, b""), within_s=5.0)
    assert 0.4 < time.monotonic() - t0 < 4.0
    assert guard.counters().get("proof_deadline") == 1


def test_a_half_open_flood_from_the_peers_own_address_does_not_shut_the_peer_out(  # type: ignore[no-untyped-def]
    gate, pki: Pki
) -> None:
    listener, guard, sessions = gate
    mid, key = os.urandom(16), new_admission_key()
    sessions.keys[mid] = key
    flood: list[socket.socket] = []
    try:
        # 3x the waiting room, from 127.0.0.1 like the peer, far past the per-peer budgets
        for _ in range(96):
            flood.append(_send(listener, b""))
        assert _until(lambda: guard.counters().get("evicted", 0) >= 60)
        assert _closed_by_server(_send(listener, _opening(pki, key, mid)))
        assert _until(lambda: sessions.expected == [mid])  # the peer got its handshake
        hits = guard.counters()
        assert hits.get("rate", 0) == 0 and hits.get("half_open_per_peer", 0) == 0, hits
        assert guard.snapshot()["summary"]["unproven"] <= 32
    finally:
        for s in flood:
            with contextlib.suppress(OSError):
                s.close()
