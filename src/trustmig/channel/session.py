"""Session keys produced by a completed handshake: the factory of sealers and openers.

Keeping the master secret inside this object (never in the handshake result's public fields)
means the relay code can only obtain per-stream keys, each bound to its stream and direction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from trustmig.channel.errors import ChannelError
from trustmig.channel.keyschedule import (
    HASH_SIZE,
    direction_code,
    hkdf_expand_label,
    stream_secret,
)
from trustmig.channel.limits import RecordLimits
from trustmig.channel.records import RecordOpener, RecordSealer

SESSION_ID_SIZE = 16


class SessionKeys:
    """Per-session key material; ``session_id`` is public, the master secret is not."""

    def __init__(
        self,
        *,
        master_secret: bytes,
        cipher: str,
        n_streams: int,
        limits: RecordLimits | None = None,
    ) -> None:
        if len(master_secret) != HASH_SIZE:
            raise ChannelError(f"master secret must be {HASH_SIZE} bytes")
        self._master = master_secret
        self.cipher = cipher
        self.n_streams = n_streams
        self.limits = limits or RecordLimits()
        self.session_id = hkdf_expand_label(master_secret, "tm session id", b"", SESSION_ID_SIZE)
        self.join_key = hkdf_expand_label(master_secret, "tm join", b"", HASH_SIZE)

    def __repr__(self) -> str:
        return f"SessionKeys(session_id={self.session_id.hex()}, cipher={self.cipher!r})"

    def exporter(self, label: str, context: bytes, length: int = HASH_SIZE) -> bytes:
        """A secret both ends of this session derive alike and nobody else can (the idea of
        TLS exporters, RFC 8446 7.5): keys for what the agents exchange beside the streams,
        bound to this authenticated, attested handshake. Distinct labels give independent
        values; none of them reveals a traffic key."""
        return hkdf_expand_label(self._master, f"tm exporter {label}", context, length)

    def _secret(self, stream: int, direction: str) -> bytes:
        if not 0 <= stream < self.n_streams:
            raise ChannelError(
                f"stream index {stream} out of range: this session has streams "
                f"0..{self.n_streams - 1}"
            )
        direction_code(direction)
        return stream_secret(self._master, stream, direction)

    def sealer(
        self, stream: int, direction: str, *, limits: RecordLimits | None = None
    ) -> RecordSealer:
        """The sealer for data this side sends on ``stream`` in ``direction`` ("c2s"/"s2c")."""
        return RecordSealer(
            cipher=self.cipher,
            secret=self._secret(stream, direction),
            stream=stream,
            direction=direction,
            limits=limits or self.limits,
        )

    def opener(
        self, stream: int, direction: str, *, limits: RecordLimits | None = None
    ) -> RecordOpener:
        """The opener for data this side receives on ``stream`` in ``direction``."""
        return RecordOpener(
            cipher=self.cipher,
            secret=self._secret(stream, direction),
            stream=stream,
            direction=direction,
            limits=limits or self.limits,
        )

    def stream_keys(self, stream: int, send: str, receive: str) -> StreamKeys:
        """The keys of one stream as a relay needs them: nothing else of the session.

        A relay process gets these for the streams it carries; it cannot derive other
        streams' keys, make stream joins or read the master secret."""
        return StreamKeys(
            cipher=self.cipher,
            stream=stream,
            send_direction=send,
            send_secret=self._secret(stream, send),
            receive_direction=receive,
            receive_secret=self._secret(stream, receive),
            limits=self.limits,
        )


@dataclass(frozen=True)
class StreamKeys:
    """Per-stream record keys, handed to the process that carries the stream."""

    cipher: str
    stream: int
    send_direction: str
    send_secret: bytes
    receive_direction: str
    receive_secret: bytes
    limits: RecordLimits

    def __repr__(self) -> str:
        return f"StreamKeys(stream={self.stream}, cipher={self.cipher!r})"

    def sealer(self) -> RecordSealer:
        return RecordSealer(
            cipher=self.cipher,
            secret=self.send_secret,
            stream=self.stream,
            direction=self.send_direction,
            limits=self.limits,
        )

    def opener(self) -> RecordOpener:
        return RecordOpener(
            cipher=self.cipher,
            secret=self.receive_secret,
            stream=self.stream,
            direction=self.receive_direction,
            limits=self.limits,
        )

    def to_wire(self) -> dict[str, object]:
        """JSON-able form (secrets hex) for a private local socket, never for a file."""
        return {
            "cipher": self.cipher,
            "stream": self.stream,
            "send_direction": self.send_direction,
            "send_secret": self.send_secret.hex(),
            "receive_direction": self.receive_direction,
            "receive_secret": self.receive_secret.hex(),
            "limits": asdict(self.limits),
        }

    @classmethod
    def from_wire(cls, doc: dict[str, Any]) -> StreamKeys:
        try:
            return cls(
                cipher=str(doc["cipher"]),
                stream=int(doc["stream"]),
                send_direction=str(doc["send_direction"]),
                send_secret=bytes.fromhex(doc["send_secret"]),
                receive_direction=str(doc["receive_direction"]),
                receive_secret=bytes.fromhex(doc["receive_secret"]),
                limits=RecordLimits(**doc["limits"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ChannelError(f"malformed stream keys: {e}") from None
