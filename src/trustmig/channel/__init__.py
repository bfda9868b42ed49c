"""Secure migration data channel: sans-IO handshake and record layer (docs/protocol.md)."""

from trustmig.channel.errors import ChannelError, HandshakeError, RecordError
from trustmig.channel.events import Aborted, Data, EndOfStream, Event, KeyUpdated
from trustmig.channel.handshake import (
    ClientHandshake,
    HandshakeResult,
    LocalIdentity,
    ServerHandshake,
)
from trustmig.channel.join import JOIN_SIZE, JoinVerifier, make_join, parse_join
from trustmig.channel.limits import RecordLimits
from trustmig.channel.records import RecordOpener, RecordSealer
from trustmig.channel.session import SessionKeys

__all__ = [
    "JOIN_SIZE",
    "Aborted",
    "ChannelError",
    "ClientHandshake",
    "Data",
    "EndOfStream",
    "Event",
    "HandshakeError",
    "HandshakeResult",
    "JoinVerifier",
    "KeyUpdated",
    "LocalIdentity",
    "RecordError",
    "RecordLimits",
    "RecordOpener",
    "RecordSealer",
    "ServerHandshake",
    "SessionKeys",
    "make_join",
    "parse_join",
]
