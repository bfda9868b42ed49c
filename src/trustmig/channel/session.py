"""Session keys produced by a completed handshake: the factory of sealers and openers.

Keeping the master secret inside this object (never in the handshake result's public fields)
means the relay code can only obtain per-stream keys, each bound to its stream and direction.
"""

from __future__ import annotations

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
