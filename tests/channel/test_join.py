"""StreamJoin: extra streams bind to the session once each, with a valid MAC."""

from __future__ import annotations

import pytest

from trustmig.channel import JOIN_SIZE, ChannelError, HandshakeResult, JoinVerifier, make_join
from trustmig.channel.join import parse_join

Pair = tuple[HandshakeResult, HandshakeResult]


def test_join_all_streams(session_pair: Pair):
    c, s = session_pair
    verifier = JoinVerifier(s.session)
    joins = [make_join(c.session, i) for i in (2, 1)]
    assert all(len(j) == JOIN_SIZE for j in joins)
    assert [verifier.verify(j) for j in joins] == [2, 1]
    assert verifier.complete and verifier.joined == {1, 2}
    assert parse_join(joins[0]).session_id == s.session_id


def test_duplicate_index_rejected(session_pair: Pair):
    c, s = session_pair
    verifier = JoinVerifier(s.session)
    join = make_join(c.session, 1)
    assert verifier.verify(join) == 1
    with pytest.raises(ChannelError, match="stream 1 already joined"):
        verifier.verify(join)
    assert not verifier.complete


def test_wrong_mac_rejected(session_pair: Pair):
    c, s = session_pair
    join = bytearray(make_join(c.session, 1))
    join[-1] ^= 0x40
    with pytest.raises(ChannelError, match="stream 1: MAC verification failed"):
        JoinVerifier(s.session).verify(bytes(join))


def test_index_out_of_range_rejected(session_pair: Pair):
    c, s = session_pair
    join = bytearray(make_join(c.session, 2))
    join[4 + 1 + 1 + 16 + 1] = 3  # low byte of the index: 3 == n_streams
    with pytest.raises(ChannelError, match="StreamJoin for stream 3: this session has"):
        JoinVerifier(s.session).verify(bytes(join))
    join[4 + 1 + 1 + 16 + 1] = 0  # stream 0 is the handshake connection
    with pytest.raises(ChannelError, match="stream 0"):
        JoinVerifier(s.session).verify(bytes(join))
    with pytest.raises(ChannelError, match="cannot join stream 3"):
        make_join(c.session, 3)


def test_join_from_other_session_rejected(pki, src_id, dst_id, session_pair: Pair):
    from .helpers import make_pair, run_handshake

    other_c, _ = run_handshake(*make_pair(pki, src_id, dst_id))
    with pytest.raises(ChannelError, match="another session"):
        JoinVerifier(session_pair[1].session).verify(make_join(other_c.session, 1))


@pytest.mark.parametrize("data", [b"", b"\x00" * JOIN_SIZE, b"\x00" * (JOIN_SIZE + 1)])
def test_malformed_join(session_pair: Pair, data: bytes):
    with pytest.raises(ChannelError, match="StreamJoin"):
        JoinVerifier(session_pair[1].session).verify(data)
