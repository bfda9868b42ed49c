"""StreamJoin: binding an additional TCP connection (a multifd stream) to a session.

The client opens one connection per extra stream and sends a single StreamJoin frame. Its MAC
under a key derived from the session's master secret proves the connection comes from the
authenticated peer; the server accepts each index once, so a captured join cannot be replayed
to hijack or duplicate a stream. Stream 0 is the handshake connection and cannot be joined.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from trustmig.channel.errors import HandshakeError
from trustmig.channel.messages import MAC_SIZE, PROTOCOL_VERSION
from trustmig.channel.session import SESSION_ID_SIZE, SessionKeys
from trustmig.channel.wire import FRAME_HEADER, MsgType, encode_frame

_JOIN_BODY = struct.Struct(f">B{SESSION_ID_SIZE}sH{MAC_SIZE}s")
JOIN_SIZE = FRAME_HEADER.size + _JOIN_BODY.size


@dataclass(frozen=True)
class StreamJoin:
    """A parsed (not yet verified) StreamJoin."""

    session_id: bytes
    index: int
    mac: bytes


def _join_mac(session: SessionKeys, index: int) -> bytes:
    data = session.session_id + struct.pack(">H", index)
    return hmac.new(session.join_key, data, hashlib.sha256).digest()


def make_join(session: SessionKeys, index: int) -> bytes:
    """The StreamJoin frame (JOIN_SIZE bytes) the client sends first on stream ``index``."""
    if not 1 <= index < session.n_streams:
        raise HandshakeError(
            f"cannot join stream {index}: this session has extra streams 1..{session.n_streams - 1}"
        )
    body = _JOIN_BODY.pack(PROTOCOL_VERSION, session.session_id, index, _join_mac(session, index))
    return encode_frame(MsgType.STREAM_JOIN, body)


def parse_join(data: bytes | bytearray | memoryview) -> StreamJoin:
    """Parse a StreamJoin frame of exactly JOIN_SIZE bytes (no verification)."""
    data = bytes(data)
    if len(data) != JOIN_SIZE:
        raise HandshakeError(f"StreamJoin must be {JOIN_SIZE} bytes, got {len(data)}")
    size, mtype = FRAME_HEADER.unpack_from(data, 0)
    if mtype != MsgType.STREAM_JOIN or size != _JOIN_BODY.size:
        raise HandshakeError("expected a StreamJoin frame as the first bytes of an extra stream")
    version, session_id, index, mac = _JOIN_BODY.unpack_from(data, FRAME_HEADER.size)
    if version != PROTOCOL_VERSION:
        raise HandshakeError(f"StreamJoin has protocol version {version}, expected 1")
    return StreamJoin(session_id=session_id, index=index, mac=mac)


class JoinVerifier:
    """Server-side check of StreamJoins for one session; each index is accepted at most once."""

    def __init__(self, session: SessionKeys) -> None:
        self._session = session
        self._joined: set[int] = set()

    @property
    def joined(self) -> frozenset[int]:
        return frozenset(self._joined)

    @property
    def complete(self) -> bool:
        """True once every extra stream 1..n_streams-1 has joined."""
        return len(self._joined) == self._session.n_streams - 1

    def verify(self, data: bytes | bytearray | memoryview) -> int:
        """Verify a StreamJoin frame; return its stream index. Raises HandshakeError."""
        join = parse_join(data)
        if not hmac.compare_digest(join.session_id, self._session.session_id):
            raise HandshakeError("StreamJoin names another session: refuse the connection")
        if not 1 <= join.index < self._session.n_streams:
            raise HandshakeError(
                f"StreamJoin for stream {join.index}: this session has extra streams "
                f"1..{self._session.n_streams - 1}"
            )
        if not hmac.compare_digest(join.mac, _join_mac(self._session, join.index)):
            raise HandshakeError(f"StreamJoin for stream {join.index}: MAC verification failed")
        if join.index in self._joined:
            raise HandshakeError(f"stream {join.index} already joined: duplicate StreamJoin")
        self._joined.add(join.index)
        return join.index
