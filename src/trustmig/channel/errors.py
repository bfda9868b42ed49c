"""Errors raised by the secure data channel.

Every failure of the channel (malformed input, failed authentication, refused peer, truncated
stream) is reported as a :class:`ChannelError`. Callers handle one exception type and always
close both sockets on it; the message names the stream and record so an operator can tell a
flaky link from tampering.
"""

from __future__ import annotations


class ChannelError(Exception):
    """A secure-channel failure; ``stream`` and ``record`` locate it when known.

    The rendered message is prefixed with ``stream S record R:`` (or ``stream S:``) so log lines
    are self-describing without the attributes.
    """

    def __init__(self, message: str, *, stream: int | None = None, record: int | None = None):
        self.stream = stream
        self.record = record
        self.reason = message
        if stream is not None and record is not None:
            text = f"stream {stream} record {record}: {message}"
        elif stream is not None:
            text = f"stream {stream}: {message}"
        else:
            text = message
        super().__init__(text)


class HandshakeError(ChannelError):
    """The handshake failed: malformed message, refused peer, bad signature or evidence."""


class RecordError(ChannelError):
    """A record failed validation or authentication, or a stream ended without end-of-stream."""
