"""Handshake messages: typed views with encode/decode over the canonical field codec.

Field bounds here are the protocol's size limits; decode rejects anything outside them.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from trustmig.channel.errors import HandshakeError
from trustmig.channel.wire import Field, MsgType, decode_fields, encode_fields, encode_frame

MAGIC = b"TMIG"
PROTOCOL_VERSION = 1
MIGRATION_ID_SIZE = 16
RANDOM_SIZE = 32
X25519_SIZE = 32
MAC_SIZE = 32
MAX_NAME = 253
MAX_CERT = 16 * 1024
MAX_EVIDENCE = 192 * 1024
MAX_SIGNATURE = 512
MAX_STREAMS = 256

_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")


def check_name(name: str, what: str) -> str:
    """Host names: 1..253 ASCII letters, digits, '.', '-', '_', alphanumeric at both ends."""
    if not _NAME_RE.match(name):
        raise HandshakeError(
            f"invalid {what} {name!r}: use 1-253 characters of letters, digits, '.', '-', '_'"
        )
    return name


def _decode_name(raw: bytes, what: str) -> str:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise HandshakeError(f"malformed {what}: not ASCII") from None
    return check_name(text, what)


@dataclass(frozen=True)
class ClientHello:
    migration_id: bytes
    client_name: str
    server_name: str
    n_streams: int
    ciphers: bytes
    public_key: bytes
    random: bytes
    version: int = PROTOCOL_VERSION

    SCHEMA = (
        Field("magic", 4, 4),
        Field("version", 1, 1),
        Field("migration_id", MIGRATION_ID_SIZE, MIGRATION_ID_SIZE),
        Field("client_name", 1, MAX_NAME),
        Field("server_name", 1, MAX_NAME),
        Field("n_streams", 2, 2),
        Field("ciphers", 1, 8),
        Field("x25519", X25519_SIZE, X25519_SIZE),
        Field("random", RANDOM_SIZE, RANDOM_SIZE),
    )

    def encode(self) -> bytes:
        body = encode_fields(
            [
                MAGIC,
                _U8.pack(self.version),
                self.migration_id,
                self.client_name.encode("ascii"),
                self.server_name.encode("ascii"),
                _U16.pack(self.n_streams),
                self.ciphers,
                self.public_key,
                self.random,
            ]
        )
        return encode_frame(MsgType.CLIENT_HELLO, body)

    @classmethod
    def decode(cls, body: bytes) -> ClientHello:
        v = decode_fields(body, cls.SCHEMA, "ClientHello")
        if v[0] != MAGIC:
            raise HandshakeError("not a trustmig channel: bad magic in ClientHello")
        if v[1][0] != PROTOCOL_VERSION:
            raise HandshakeError(
                f"unsupported protocol version {v[1][0]}: this side speaks {PROTOCOL_VERSION}"
            )
        (n_streams,) = _U16.unpack(v[5])
        if not 1 <= n_streams <= MAX_STREAMS:
            raise HandshakeError(f"ClientHello asks for {n_streams} streams: allowed 1..256")
        return cls(
            migration_id=v[2],
            client_name=_decode_name(v[3], "client name"),
            server_name=_decode_name(v[4], "server name"),
            n_streams=n_streams,
            ciphers=v[6],
            public_key=v[7],
            random=v[8],
            version=v[1][0],
        )


@dataclass(frozen=True)
class ServerHello:
    server_name: str
    cipher: int
    public_key: bytes
    random: bytes
    version: int = PROTOCOL_VERSION

    SCHEMA = (
        Field("version", 1, 1),
        Field("server_name", 1, MAX_NAME),
        Field("cipher", 1, 1),
        Field("x25519", X25519_SIZE, X25519_SIZE),
        Field("random", RANDOM_SIZE, RANDOM_SIZE),
    )

    def encode(self) -> bytes:
        body = encode_fields(
            [
                _U8.pack(self.version),
                self.server_name.encode("ascii"),
                _U8.pack(self.cipher),
                self.public_key,
                self.random,
            ]
        )
        return encode_frame(MsgType.SERVER_HELLO, body)

    @classmethod
    def decode(cls, body: bytes) -> ServerHello:
        v = decode_fields(body, cls.SCHEMA, "ServerHello")
        if v[0][0] != PROTOCOL_VERSION:
            raise HandshakeError(
                f"server answered with protocol version {v[0][0]}, expected {PROTOCOL_VERSION}"
            )
        return cls(
            server_name=_decode_name(v[1], "server name"),
            cipher=v[2][0],
            public_key=v[3],
            random=v[4],
            version=v[0][0],
        )


@dataclass(frozen=True)
class AuthMessage:
    """ServerAuth / ClientAuth: certificate, attestation evidence, transcript signature."""

    cert_der: bytes
    evidence: bytes
    signature: bytes

    SCHEMA = (
        Field("certificate", 1, MAX_CERT),
        Field("evidence", 0, MAX_EVIDENCE),
        Field("signature", 1, MAX_SIGNATURE),
    )

    def signed_part(self) -> bytes:
        """Encoded certificate and evidence fields: hashed into the signed transcript."""
        return encode_fields([self.cert_der, self.evidence])

    def encode(self, mtype: MsgType) -> bytes:
        return encode_frame(mtype, self.signed_part() + encode_fields([self.signature]))

    @classmethod
    def decode(cls, body: bytes, what: str) -> AuthMessage:
        v = decode_fields(body, cls.SCHEMA, what)
        return cls(cert_der=v[0], evidence=v[1], signature=v[2])


FINISHED_SCHEMA = (Field("mac", MAC_SIZE, MAC_SIZE),)


def encode_finished(mtype: MsgType, mac: bytes) -> bytes:
    return encode_frame(mtype, encode_fields([mac]))


def decode_finished(body: bytes, what: str) -> bytes:
    return decode_fields(body, FINISHED_SCHEMA, what)[0]
