"""Handshake framing and the canonical field codec (see docs/protocol.md, "Framing").

A frame is ``length u32 BE | type u8 | body`` where ``length`` counts the body only. A body is a
fixed, per-message sequence of fields, each ``u32 BE length | bytes``. There is exactly one
encoding of any message (fixed order, no optional fields, no trailing bytes), so transcript
hashes computed by both sides agree and a parser cannot be confused by alternative encodings.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from trustmig.channel.errors import HandshakeError

FRAME_HEADER = struct.Struct(">IB")
FIELD_LENGTH = struct.Struct(">I")
MAX_FRAME_BODY = 256 * 1024


class MsgType(IntEnum):
    """Handshake message types."""

    CLIENT_HELLO = 1
    SERVER_HELLO = 2
    SERVER_AUTH = 3
    CLIENT_AUTH = 4
    CLIENT_FINISHED = 5
    SERVER_FINISHED = 6
    STREAM_JOIN = 7
    ADMIT = 8


@dataclass(frozen=True)
class Field:
    """Schema of one field: a name for error messages and inclusive size bounds."""

    name: str
    min_size: int
    max_size: int


def encode_fields(values: Sequence[bytes]) -> bytes:
    """Concatenate length-prefixed fields."""
    return b"".join(FIELD_LENGTH.pack(len(v)) + v for v in values)


def decode_fields(body: bytes, schema: Sequence[Field], what: str) -> list[bytes]:
    """Parse exactly ``schema``'s fields from ``body``; anything else is a HandshakeError."""
    values: list[bytes] = []
    pos = 0
    for field in schema:
        if len(body) - pos < FIELD_LENGTH.size:
            raise HandshakeError(f"malformed {what}: truncated before field {field.name}")
        (size,) = FIELD_LENGTH.unpack_from(body, pos)
        pos += FIELD_LENGTH.size
        if not field.min_size <= size <= field.max_size:
            raise HandshakeError(
                f"malformed {what}: field {field.name} is {size} bytes, "
                f"allowed {field.min_size}..{field.max_size}"
            )
        if len(body) - pos < size:
            raise HandshakeError(f"malformed {what}: field {field.name} truncated")
        values.append(body[pos : pos + size])
        pos += size
    if pos != len(body):
        raise HandshakeError(f"malformed {what}: {len(body) - pos} trailing bytes")
    return values


def encode_frame(mtype: MsgType, body: bytes) -> bytes:
    """Frame a message body."""
    if len(body) > MAX_FRAME_BODY:
        raise HandshakeError(
            f"{mtype.name} body of {len(body)} bytes exceeds {MAX_FRAME_BODY}: "
            "shrink the certificate or evidence"
        )
    return FRAME_HEADER.pack(len(body), mtype) + body


class FrameReader:
    """Reassembles frames from arbitrary byte chunks; holds at most one incomplete frame.

    The announced length is checked as soon as the 5-byte frame header is present, so a peer
    announcing a huge frame is refused before anything is buffered for it.
    """

    def __init__(self, max_body: int = MAX_FRAME_BODY) -> None:
        self._buf = bytearray()
        self._max_body = max_body

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def next_frame(self) -> tuple[int, bytes, bytes] | None:
        """Return ``(type, body, raw_frame)`` of the next complete frame, or None."""
        if len(self._buf) < FRAME_HEADER.size:
            return None
        size, mtype = FRAME_HEADER.unpack_from(self._buf, 0)
        if size > self._max_body:
            raise HandshakeError(
                f"handshake frame announces {size} bytes, limit is {self._max_body}"
            )
        end = FRAME_HEADER.size + size
        if len(self._buf) < end:
            return None
        raw = bytes(self._buf[:end])
        del self._buf[:end]
        return mtype, raw[FRAME_HEADER.size :], raw

    def take_rest(self) -> bytes:
        """Hand over buffered bytes that follow the last frame (they belong to the records)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest
