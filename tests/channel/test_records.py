"""Record layer: round trips, tampering, replay, splicing, truncation, key updates."""

from __future__ import annotations

import os
import struct

import pytest

from trustmig.channel import (
    Aborted,
    ChannelError,
    Data,
    EndOfStream,
    HandshakeResult,
    KeyUpdated,
    RecordLimits,
    SessionKeys,
)
from trustmig.channel.records import HEADER, RecordType

Pair = tuple[HandshakeResult, HandshakeResult]


def payloads(events: list) -> bytes:
    return b"".join(e.payload for e in events if isinstance(e, Data))


@pytest.mark.parametrize("size", [0, 1, 15, 16, 4096, 65536, 256 * 1024])
def test_round_trip_sizes(session_pair: Pair, size: int):
    c, s = session_pair
    sealer, opener = c.session.sealer(1, "c2s"), s.session.opener(1, "c2s")
    data = os.urandom(size)
    out = bytearray(sealer.sealed_size(size))
    n = sealer.seal_into(memoryview(data), out)
    assert n == sealer.HEADER_SIZE + size + 16
    assert data[:64] not in out or size < 16  # not sent in clear
    body_len = opener.parse_header(out[: opener.HEADER_SIZE])
    plain = bytearray(size)
    event = opener.open_into(out[:8], memoryview(out)[8:n], memoryview(plain))
    assert event == Data(size) and plain == data
    eos = opener.feed(sealer.end_of_stream())
    assert eos == [EndOfStream(size, 1)] and body_len == size + 16
    opener.close()


def test_return_path_direction(session_pair: Pair):
    c, s = session_pair
    rec = s.session.sealer(0, "s2c").seal(b"page request 0x1000")
    assert c.session.opener(0, "s2c").feed(rec) == [Data(19, b"page request 0x1000")]
    with pytest.raises(ChannelError, match="authentication failed"):
        c.session.opener(0, "c2s").feed(rec)


def test_oversize_payload_refused_by_sealer(session_pair: Pair):
    sealer = session_pair[0].session.sealer(1, "c2s")
    with pytest.raises(ChannelError, match="exceeds the record limit"):
        sealer.seal(bytes(256 * 1024 + 1))


def test_output_buffer_too_small(session_pair: Pair):
    sealer = session_pair[0].session.sealer(1, "c2s")
    with pytest.raises(ChannelError, match="too small"):
        sealer.seal_into(b"x" * 100, bytearray(50))


def _stream(session: SessionKeys, n: int, stream: int = 1) -> tuple[list[bytes], list[bytes]]:
    sealer = session.sealer(stream, "c2s")
    data = [os.urandom(100 + i) for i in range(n)]
    return [sealer.seal(d) for d in data], data


def test_every_bit_flip_detected(session_pair: Pair):
    c, s = session_pair
    records, _ = _stream(c.session, 3)
    target = records[2]
    for bit in range(len(target) * 8):
        opener = s.session.opener(1, "c2s")
        opener.feed(records[0] + records[1])
        bad = bytearray(target)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ChannelError, match=r"^stream 1 record 2: ") as err:
            opener.feed(bytes(bad))
            opener.close()  # a flipped length may leave the record incomplete
        assert err.value.stream == 1
        if bit >= 64:  # body or tag
            assert err.value.record == 2 and "authentication failed" in str(err.value)


def test_failed_open_into_leaves_no_plaintext(session_pair: Pair):
    c, s = session_pair
    rec = bytearray(c.session.sealer(1, "c2s").seal(b"secret page" * 100))
    rec[-1] ^= 1
    opener = s.session.opener(1, "c2s")
    out = bytearray(b"\xaa" * 1100)
    with pytest.raises(ChannelError, match="stream 1 record 0: authentication failed"):
        opener.open_into(rec[:8], memoryview(rec)[8:], out)
    assert out == bytes(1100)
    with pytest.raises(ChannelError, match="already failed"):
        opener.feed(b"")


@pytest.mark.parametrize("case", ["drop", "reorder", "duplicate"])
def test_drop_reorder_duplicate(session_pair: Pair, case: str):
    c, s = session_pair
    r, _ = _stream(c.session, 4)
    sequence = {
        "drop": [r[0], r[2]],
        "reorder": [r[0], r[2], r[1]],
        "duplicate": [r[0], r[1], r[1]],
    }[case]
    opener = s.session.opener(1, "c2s")
    with pytest.raises(ChannelError, match=r"record [12]: authentication failed"):
        for rec in sequence:
            opener.feed(rec)


def test_replay_from_other_session(pki, src_id, dst_id):
    from .helpers import make_pair, run_handshake

    old_c, _ = run_handshake(*make_pair(pki, src_id, dst_id))
    _, new_s = run_handshake(*make_pair(pki, src_id, dst_id))
    captured, _ = _stream(old_c.session, 1)
    with pytest.raises(ChannelError, match="stream 1 record 0: authentication failed"):
        new_s.session.opener(1, "c2s").feed(captured[0])


def test_cross_stream_splice(session_pair: Pair):
    c, s = session_pair
    on_stream1, _ = _stream(c.session, 1, stream=1)
    with pytest.raises(ChannelError, match="stream 2 record 0: authentication failed"):
        s.session.opener(2, "c2s").feed(on_stream1[0])


def test_truncation_without_eos(session_pair: Pair):
    c, s = session_pair
    records, data = _stream(c.session, 3)
    opener = s.session.opener(1, "c2s")
    opener.feed(b"".join(records))
    total = sum(map(len, data))
    with pytest.raises(
        ChannelError,
        match=f"stream 1 record 3: truncated: connection closed without end-of-stream "
        f"after {total} bytes",
    ):
        opener.close()


def test_truncation_mid_record(session_pair: Pair):
    c, s = session_pair
    records, _ = _stream(c.session, 2)
    opener = s.session.opener(1, "c2s")
    opener.feed(records[0] + records[1][:-3])
    with pytest.raises(ChannelError, match="truncated"):
        opener.close()


def test_eos_with_wrong_counts(session_pair: Pair):
    c, s = session_pair
    sealer = c.session.sealer(1, "c2s")
    stream = sealer.seal(b"a" * 10)
    sealer.bytes_sent += 4096  # a lying or buggy sender
    opener = s.session.opener(1, "c2s")
    with pytest.raises(ChannelError, match=r"record 1: end-of-stream mismatch: peer sent 4106"):
        opener.feed(stream + sealer.end_of_stream())


def test_eos_with_wrong_record_count(session_pair: Pair):
    c, s = session_pair
    sealer = c.session.sealer(1, "c2s")
    stream = sealer.seal(b"a")
    sealer.records_sent = 7
    with pytest.raises(ChannelError, match="in 7 records, received 1 bytes in 1 records"):
        s.session.opener(1, "c2s").feed(stream + sealer.end_of_stream())


def test_data_after_eos_rejected(session_pair: Pair):
    c, s = session_pair
    sealer = c.session.sealer(1, "c2s")
    stream = sealer.seal(b"x") + sealer.end_of_stream()
    with pytest.raises(ChannelError, match="already ended"):
        sealer.seal(b"y")
    opener = s.session.opener(1, "c2s")
    assert opener.feed(stream)[-1] == EndOfStream(1, 1)
    with pytest.raises(ChannelError, match="record after end-of-stream"):
        opener.feed(stream[: HEADER.size])


def test_abort(session_pair: Pair):
    c, s = session_pair
    sealer = c.session.sealer(1, "c2s")
    opener = s.session.opener(1, "c2s")
    assert opener.feed(sealer.seal(b"p") + sealer.abort("policy revoked")) == [
        Data(1, b"p"),
        Aborted("policy revoked"),
    ]
    with pytest.raises(ChannelError, match="peer aborted: policy revoked"):
        opener.close()


def test_key_update_across_epochs(session_pair: Pair):
    c, s = session_pair
    limits = RecordLimits(max_plaintext=4096, rekey_bytes=10_000, rekey_records=4)
    sealer = c.session.sealer(2, "c2s", limits=limits)
    opener = s.session.opener(2, "c2s", limits=limits)
    sent = [os.urandom(3000) for _ in range(12)]
    events = []
    for chunk in sent:
        events += opener.feed(sealer.seal(chunk))
    events += opener.feed(sealer.end_of_stream())
    opener.close()
    updates = [e.epoch for e in events if isinstance(e, KeyUpdated)]
    assert updates == list(range(1, len(updates) + 1)) and len(updates) >= 3
    assert sealer.epoch == opener.epoch == updates[-1]
    assert payloads(events) == b"".join(sent)
    assert events[-1] == EndOfStream(36000, 12 + len(updates))


def test_record_from_old_epoch_rejected(session_pair: Pair):
    c, s = session_pair
    limits = RecordLimits(rekey_records=1)
    sealer = c.session.sealer(1, "c2s", limits=limits)
    first = sealer.seal(b"a")
    second = sealer.seal(b"b")  # key update + data under epoch 1
    assert second[0] == RecordType.KEY_UPDATE
    opener = s.session.opener(1, "c2s", limits=limits)
    opener.feed(first + second)
    # a record sealed under epoch 0 keys with the next sequence number
    stale = c.session.sealer(1, "c2s", limits=RecordLimits(rekey_records=1 << 24))
    for _ in range(3):
        rec = stale.seal(b"c")
    with pytest.raises(ChannelError, match="record 3: authentication failed"):
        opener.feed(rec)


def test_oversize_header_rejected_before_body(session_pair: Pair):
    _, s = session_pair
    opener = s.session.opener(1, "c2s")
    header = HEADER.pack(RecordType.DATA, 0, 0, 256 * 1024 + 17)
    with pytest.raises(ChannelError, match="record length 262161 out of range"):
        opener.parse_header(header)
    opener = s.session.opener(1, "c2s")
    with pytest.raises(ChannelError, match="out of range"):
        opener.feed(HEADER.pack(RecordType.DATA, 0, 0, 0xFFFFFFFF))  # header only, no body
    assert len(opener._buf) <= HEADER.size


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (HEADER.pack(9, 0, 0, 32), "unknown record type 9"),
        (HEADER.pack(RecordType.DATA, 1, 0, 32), "non-zero flags"),
        (HEADER.pack(RecordType.DATA, 0, 5, 32), "non-zero flags"),
        (HEADER.pack(RecordType.DATA, 0, 0, 15), "out of range"),
        (HEADER.pack(RecordType.KEY_UPDATE, 0, 0, 64), "out of range"),
        (HEADER.pack(RecordType.ABORT, 0, 0, 2000), "out of range"),
        (b"\x01\x00\x00", "header must be 8 bytes"),
    ],
)
def test_malformed_headers(session_pair: Pair, header: bytes, message: str):
    opener = session_pair[1].session.opener(1, "c2s")
    with pytest.raises(ChannelError, match=message):
        opener.parse_header(header)


def test_stream_index_and_limits_validated(session_pair: Pair):
    c, _ = session_pair
    with pytest.raises(ChannelError, match=r"stream index 3 out of range: .* 0\.\.2"):
        c.session.sealer(3, "c2s")
    with pytest.raises(ChannelError, match="unknown direction"):
        c.session.opener(0, "up")
    with pytest.raises(ChannelError, match="max_plaintext 2097152 out of range"):
        RecordLimits(max_plaintext=2 * 1024 * 1024)


def test_header_layout(session_pair: Pair):
    rec = session_pair[0].session.sealer(0, "c2s").seal(b"abc")
    assert struct.unpack(">BBHI", rec[:8]) == (RecordType.DATA, 0, 0, 3 + 16)
    assert len(rec) == 8 + 3 + 16
