"""The data connection's opening: Admit + ClientHello and StreamJoin, reassembled and judged."""

from __future__ import annotations

import os
import struct

import pytest

from trustmig.channel import HandshakeResult, LocalIdentity
from trustmig.channel.admit import (
    ADMIT_SIZE,
    MAX_HELLO_BODY,
    Admit,
    AdmitCheck,
    AdmitOutcome,
    FirstMessage,
    Join,
    make_admit,
    new_admission_key,
)
from trustmig.channel.errors import HandshakeError
from trustmig.channel.handshake import ClientHandshake
from trustmig.channel.join import JOIN_SIZE, make_join
from trustmig.channel.wire import FRAME_HEADER, MsgType

from .helpers import DST, Pki


def _hello(pki: Pki, ident: LocalIdentity, mid: bytes) -> bytes:
    hs = ClientHandshake(identity=ident, server_name=DST, migration_id=mid, n_streams=1,
                         verify_peer=pki.verifier())  # fmt: skip
    return hs.start()


@pytest.fixture()
def opening(pki: Pki, src_id: LocalIdentity) -> tuple[bytes, bytes, bytes, bytes]:
    key, mid = new_admission_key(), os.urandom(16)
    hello = _hello(pki, src_id, mid)
    return key, mid, hello, make_admit(key, mid, hello) + hello


def test_admit_and_hello_reassemble_byte_by_byte(opening: tuple[bytes, ...]) -> None:
    key, mid, hello, wire = opening
    first = FirstMessage()
    got = [first.feed(wire[i : i + 1]) for i in range(len(wire))]
    assert got[:-1] == [None] * (len(wire) - 1)
    msg = got[-1]
    assert isinstance(msg, Admit) and msg.migration_id == mid and msg.hello_frame == hello
    assert AdmitCheck().check(key, msg) is AdmitOutcome.ADMITTED


def test_a_join_is_recognised_whole(
    session_pair: tuple[HandshakeResult, HandshakeResult],
) -> None:
    frame = make_join(session_pair[0].session, 1)
    first = FirstMessage()
    assert first.feed(frame[:-1]) is None
    assert first.feed(frame[-1:]) == Join(frame) and len(frame) == JOIN_SIZE


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (FRAME_HEADER.pack(100, MsgType.CLIENT_HELLO), r"opens with Admit or StreamJoin"),
        (b"GET / HTTP/1.1\r\n", r"first message is type"),
        (FRAME_HEADER.pack(10, MsgType.ADMIT), r"Admit of 10 bytes"),
        (FRAME_HEADER.pack(3, MsgType.STREAM_JOIN), r"StreamJoin of 3 bytes"),
    ],
)
def test_anything_else_is_refused_from_its_header(wire: bytes, match: str) -> None:
    with pytest.raises(HandshakeError, match=match):
        FirstMessage().feed(wire)


def test_admit_must_be_followed_by_a_small_hello(opening: tuple[bytes, ...]) -> None:
    _key, _mid, _hello, wire = opening
    admit = wire[:ADMIT_SIZE]
    with pytest.raises(HandshakeError, match=r"followed by a ClientHello"):
        FirstMessage().feed(admit + FRAME_HEADER.pack(4, MsgType.CLIENT_FINISHED))
    with pytest.raises(HandshakeError, match=r"exceeds 2048"):
        FirstMessage().feed(admit + FRAME_HEADER.pack(MAX_HELLO_BODY + 1, MsgType.CLIENT_HELLO))
    bad_version = bytearray(admit)
    bad_version[FRAME_HEADER.size] = 9
    with pytest.raises(HandshakeError, match=r"protocol version 9"):
        FirstMessage().feed(bytes(bad_version) + wire[ADMIT_SIZE:])


def test_bytes_before_the_servers_answer_are_a_violation(opening: tuple[bytes, ...]) -> None:
    with pytest.raises(HandshakeError, match=r"bytes after the first message"):
        FirstMessage().feed(opening[3] + b"x")


def _parsed(wire: bytes) -> Admit:
    msg = FirstMessage().feed(wire)
    assert isinstance(msg, Admit)
    return msg


def test_the_check_names_every_refusal(pki: Pki, src_id: LocalIdentity,
                                       opening: tuple[bytes, ...]) -> None:  # fmt: skip
    key, mid, _frame, wire = opening
    check = AdmitCheck(max_openings=2)
    assert check.check(None, _parsed(wire)) is AdmitOutcome.UNKNOWN
    assert check.check(new_admission_key(), _parsed(wire)) is AdmitOutcome.BAD_MAC
    flipped = bytearray(wire)
    flipped[-1] ^= 1  # a bit of the hello's random: the MAC covers the exact hello
    assert check.check(key, _parsed(bytes(flipped))) is AdmitOutcome.BAD_MAC
    other = _hello(pki, src_id, os.urandom(16))  # a hello for another migration, MAC'd under A
    assert check.check(key, _parsed(make_admit(key, mid, other) + other)) is AdmitOutcome.MISMATCH
    assert check.check(key, _parsed(wire)) is AdmitOutcome.ADMITTED
    assert check.check(key, _parsed(wire)) is AdmitOutcome.REPLAYED
    second = _hello(pki, src_id, mid)
    assert check.check(key, _parsed(make_admit(key, mid, second) + second)) is AdmitOutcome.ADMITTED
    third = _hello(pki, src_id, mid)
    outcome = check.check(key, _parsed(make_admit(key, mid, third) + third))
    assert outcome is AdmitOutcome.EXHAUSTED
    check.forget(mid)
    assert len(check) == 0 and check.check(key, _parsed(wire)) is AdmitOutcome.ADMITTED


def test_make_admit_refuses_wrong_sizes() -> None:
    with pytest.raises(HandshakeError, match=r"admission key must be 32 bytes"):
        make_admit(b"short", os.urandom(16), b"")
    with pytest.raises(HandshakeError, match=r"migration id must be 16 bytes"):
        make_admit(new_admission_key(), b"x", b"")
    assert struct.calcsize(">B16s32s") + FRAME_HEADER.size == ADMIT_SIZE


def test_a_reader_that_asks_wanted_never_takes_a_byte_past_the_first_message(
    opening: tuple[bytes, ...], session_pair: tuple[HandshakeResult, HandshakeResult]
) -> None:
    for wire in (opening[3], make_join(session_pair[0].session, 2)):
        stream = wire + b"records that follow belong to the stream"
        first, pos, msg = FirstMessage(), 0, None
        while msg is None:
            n = first.wanted()
            msg = first.feed(stream[pos : pos + n])
            pos += n
        assert pos == len(wire) and msg is not None
