"""Property tests and mutation fuzzing: malformed input only ever raises ChannelError.

Each case runs on bounded input with an explicit per-test timeout (a hang fails the test), and
the parsers' internal buffers are checked to stay below one record or one frame.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustmig.channel import ChannelError, HandshakeResult, RecordLimits, ServerHandshake
from trustmig.channel.records import HEADER, TAG_SIZE
from trustmig.channel.wire import FRAME_HEADER, MAX_FRAME_BODY

from .helpers import make_pair

Pair = tuple[HandshakeResult, HandshakeResult]
LIMITS = RecordLimits(max_plaintext=2048, rekey_records=3)
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _valid_stream(session_pair: Pair, n: int = 6, stream: int = 1) -> tuple[bytes, list[bytes]]:
    sealer = session_pair[0].session.sealer(stream, "c2s", limits=LIMITS)
    data = [os.urandom(1 + (i * 397) % 2048) for i in range(n)]
    return b"".join(sealer.seal(d) for d in data) + sealer.end_of_stream(), data


def _feed_all(opener, data: bytes, chunk: int) -> None:
    for i in range(0, len(data), max(chunk, 1)):
        opener.feed(data[i : i + max(chunk, 1)])
        assert len(opener._buf) < HEADER.size + LIMITS.max_plaintext + TAG_SIZE
    opener.close()


@pytest.mark.timeout(120)
@SETTINGS
@given(st.data())
def test_valid_stream_any_chunking_round_trips(session_pair: Pair, data: st.DataObject):
    stream, sent = _valid_stream(session_pair)
    opener = session_pair[1].session.opener(1, "c2s", limits=LIMITS)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    got = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        got += opener.feed(stream[prev:cut])
        prev = cut
    opener.close()
    assert b"".join(e.payload for e in got if hasattr(e, "payload")) == b"".join(sent)


@pytest.mark.timeout(120)
@SETTINGS
@given(st.binary(max_size=4096), st.integers(1, 600))
def test_random_bytes_to_opener(session_pair: Pair, blob: bytes, chunk: int):
    opener = session_pair[1].session.opener(1, "c2s", limits=LIMITS)
    with pytest.raises(ChannelError):
        _feed_all(opener, blob, chunk)


MUTATIONS = ("flip", "truncate", "splice", "insert", "delete", "swap")


def _mutate(rng: random.Random, valid: bytes, other: bytes) -> bytes:
    kind = rng.choice(MUTATIONS)
    b = bytearray(valid)
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del b[rng.randrange(len(b)) :]
    elif kind == "splice":
        i, j = rng.randrange(len(b)), rng.randrange(len(other))
        b[i:] = other[j : j + rng.randint(1, 3000)]
    elif kind == "insert":
        i = rng.randrange(len(b))
        b[i:i] = os.urandom(rng.randint(1, 64))
    elif kind == "delete":
        i = rng.randrange(len(b))
        del b[i : i + rng.randint(1, 64)]
    else:
        i, j = sorted(rng.randrange(len(b)) for _ in range(2))
        b[i:j] = bytes(reversed(b[i:j]))
    return bytes(b) if bytes(b) != valid else bytes(b) + b"\x00"


@pytest.mark.timeout(180)
def test_mutated_record_streams(session_pair: Pair):
    rng = random.Random(1234)
    valid, _ = _valid_stream(session_pair)
    other_stream, _ = _valid_stream(session_pair, stream=2)
    failures = 0
    for _ in range(400):
        mutated = _mutate(rng, valid, other_stream)
        opener = session_pair[1].session.opener(1, "c2s", limits=LIMITS)
        try:
            _feed_all(opener, mutated, rng.choice([1, 7, 512, 1 << 20]))
        except ChannelError:
            failures += 1
    assert failures == 400  # every mutation of an authenticated stream is detected


def _server(pki, src_id, dst_id) -> tuple[bytes, ServerHandshake]:
    client, server = make_pair(pki, src_id, dst_id)
    return client.start(), server


@pytest.mark.timeout(120)
@SETTINGS
@given(st.binary(max_size=2048))
def test_random_bytes_to_server_handshake(pki, src_id, dst_id, blob: bytes):
    _, server = _server(pki, src_id, dst_id)
    try:
        server.receive(blob)
    except ChannelError:
        return
    assert server.result is None  # random bytes never complete a handshake


@pytest.mark.timeout(180)
def test_mutated_handshake_messages(pki, src_id, dst_id):
    rng = random.Random(99)
    for _ in range(300):
        client, server = make_pair(pki, src_id, dst_id)
        hello = client.start()
        mutated = _mutate(rng, hello, os.urandom(400))
        try:
            flight = server.receive(mutated)
        except ChannelError:
            continue
        # a mutation that still parses must not let the handshake complete
        try:
            reply = client.receive(flight) if flight else b""
            fin = server.receive(reply) if reply else b""
            if fin:
                client.receive(fin)
        except ChannelError:
            continue
        assert client.result is None or server.result is None


@pytest.mark.timeout(180)
def test_mutated_client_auth(pki, src_id, dst_id):
    rng = random.Random(7)
    for _ in range(150):
        client, server = make_pair(pki, src_id, dst_id)
        reply = client.receive(server.receive(client.start()))
        try:
            server.receive(_mutate(rng, reply, reply))
        except ChannelError:
            continue
        # only a truncation can pass without error; it leaves the handshake incomplete
        assert server.result is None


def test_handshake_frame_bound(pki, src_id, dst_id):
    _, server = _server(pki, src_id, dst_id)
    header = FRAME_HEADER.pack(MAX_FRAME_BODY, 1)
    server.receive(header + b"\x00" * 1000)  # within the bound: waits for more
    assert len(server._reader._buf) <= FRAME_HEADER.size + MAX_FRAME_BODY
    _, server = _server(pki, src_id, dst_id)
    with pytest.raises(ChannelError, match="limit is"):
        server.receive(FRAME_HEADER.pack(MAX_FRAME_BODY + 1, 1))
