"""The control API's wire format: a sans-IO framer for small versioned JSON messages.

Each frame is a 4-byte big-endian length and a UTF-8 JSON object carrying ``"v"`` (protocol
version). Requests carry ``"op"`` and ``"id"``; replies carry the same ``"id"`` and either
``"ok": true, "result": {...}``, ``"ok": false, "error": "one line"``, or, for long operations,
any number of ``"event": ...`` frames before the final reply. Frames are capped so that a peer
cannot make the agent buffer without bound.
"""

from __future__ import annotations

import json
import struct
from typing import Any

VERSION = 1
MAX_FRAME = 4 * 1024 * 1024
#: Deepest nesting of objects and lists a frame may have (real requests need fewer than 10).
MAX_DEPTH = 32
_LEN = struct.Struct(">I")


class ProtocolError(Exception):
    """A peer sent something that is not a valid control frame."""


def encode(msg: dict[str, Any]) -> bytes:
    body = json.dumps({"v": VERSION, **msg}, separators=(",", ":"), default=str).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"control message of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Feed bytes, get whole messages back; never holds more than one frame plus a header."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if n > self._max:
                raise ProtocolError(f"control frame of {n} bytes exceeds the {self._max} limit")
            if len(self._buf) < 4 + n:
                break
            raw = bytes(self._buf[4 : 4 + n])
            del self._buf[: 4 + n]
            out.append(decode_body(raw))
        return out


def _depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                return d
            stack.extend((x, d + 1) for x in v)
    return deepest


def decode_body(raw: bytes) -> dict[str, Any]:
    """Parse one frame body; raises ``ProtocolError`` with one line saying what was wrong."""
    try:
        msg = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"control frame is not JSON: {e}") from None
    except RecursionError:
        raise ProtocolError(f"control frame nests deeper than {MAX_DEPTH} levels") from None
    if _depth(msg) > MAX_DEPTH:
        raise ProtocolError(f"control frame nests deeper than {MAX_DEPTH} levels")
    if not isinstance(msg, dict):
        raise ProtocolError("control frame must be a JSON object")
    v = msg.get("v")
    if v != VERSION:
        raise ProtocolError(
            f"unsupported control protocol version {v!r} (this agent speaks {VERSION})"
        )
    return msg
