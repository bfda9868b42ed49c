"""Admission of a data connection before any state is kept for it (docs/protocol.md, "Admit").

A destination cannot tell a legitimate source from a flood by its address: cluster peers, guests
NATed behind a host and any process on a peer host share addresses. So the first bytes of every
data connection must prove, for the price of one HMAC, that the sender holds a secret only an
authenticated, policy-approved peer was given (WireGuard's ``mac1`` is the model):

* stream 0 opens with ``Admit`` then its ``ClientHello``. ``Admit`` carries the migration id and
  ``HMAC-SHA256(admission_key, label || migration_id || ClientHello frame)``. The admission key
  is 32 random bytes the destination handed the source in its answer to ``incoming.prepare``
  (or ``incoming.recover``) over the mutually authenticated control channel, so only the peer
  the destination's policy accepted for *this* migration can make it;
* extra streams open with ``StreamJoin`` (:mod:`trustmig.channel.join`), whose MAC under the
  session's join key is the same kind of proof.

:class:`FirstMessage` reassembles those first bytes with hard size bounds and :class:`AdmitCheck`
judges an ``Admit``, remembering the MACs it admitted per migration so that a captured opening
replayed from the wire is refused before the handshake spends an X25519 exchange, a signature
or a TPM quote on it. Both are pure logic: sockets and clocks belong to the caller.

WireGuard answers load with cookies (``mac2``) because UDP has no return-routability check; over
TCP the kernel's three-way handshake (with SYN cookies) already proves the address, and a valid
``mac1`` here can only come from the one peer holding this migration's key, whose openings are
counted (:data:`MAX_OPENINGS`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from enum import Enum

from trustmig.channel.errors import HandshakeError
from trustmig.channel.join import JOIN_SIZE
from trustmig.channel.messages import MAC_SIZE, MIGRATION_ID_SIZE, PROTOCOL_VERSION, ClientHello
from trustmig.channel.wire import FRAME_HEADER, MsgType, encode_frame

ADMISSION_KEY_SIZE = 32
_ADMIT_BODY = struct.Struct(f">B{MIGRATION_ID_SIZE}s{MAC_SIZE}s")
ADMIT_SIZE = FRAME_HEADER.size + _ADMIT_BODY.size
#: A ClientHello is a few hundred bytes (two names, a key, a random); more is not a hello.
MAX_HELLO_BODY = 2048
#: Openings (stream-0 handshakes) one migration's key admits: the first, and reconnections of a
#: post-copy recovery. A key that opens more is being replayed or abused.
MAX_OPENINGS = 16
_LABEL = b"trustmig admit v1"


def new_admission_key() -> bytes:
    """A fresh per-migration admission key (the destination makes one per incoming migration)."""
    return os.urandom(ADMISSION_KEY_SIZE)


def admit_mac(key: bytes, migration_id: bytes, hello_frame: bytes) -> bytes:
    """The MAC that binds an opening to its migration's key and to the exact ClientHello."""
    return hmac.new(key, _LABEL + migration_id + hello_frame, hashlib.sha256).digest()


def make_admit(key: bytes, migration_id: bytes, hello_frame: bytes) -> bytes:
    """The ``Admit`` frame (ADMIT_SIZE bytes) a source sends right before its ClientHello.

    Raises HandshakeError for a key or id of the wrong size (a caller's bug, said plainly).
    """
    if len(key) != ADMISSION_KEY_SIZE:
        raise HandshakeError(f"admission key must be {ADMISSION_KEY_SIZE} bytes, got {len(key)}")
    if len(migration_id) != MIGRATION_ID_SIZE:
        raise HandshakeError(f"migration id must be {MIGRATION_ID_SIZE} bytes")
    body = _ADMIT_BODY.pack(PROTOCOL_VERSION, migration_id,
                            admit_mac(key, migration_id, hello_frame))  # fmt: skip
    return encode_frame(MsgType.ADMIT, body)


@dataclass(frozen=True)
class Admit:
    """A parsed, not yet verified, ``Admit`` and the ClientHello frame that followed it."""

    migration_id: bytes
    mac: bytes
    hello_frame: bytes


@dataclass(frozen=True)
class Join:
    """A complete StreamJoin frame (verified by the session's JoinVerifier, not here)."""

    frame: bytes


class FirstMessage:
    """Reassembles the first message of a data connection from arbitrary chunks.

    ``feed`` returns None until a whole ``Admit`` + ``ClientHello`` or ``StreamJoin`` arrived,
    then the parsed message. Anything else raises HandshakeError as soon as its header shows it:
    a wrong type, a version, an announced size beyond the bounds. At most
    ``ADMIT_SIZE + 5 + MAX_HELLO_BODY`` bytes are ever buffered. A reader asks :meth:`wanted`
    how much to receive next, so that it never takes bytes past the first message (records may
    follow a StreamJoin at once; they belong to the stream, not to the gate).
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def wanted(self) -> int:
        """Bytes still missing from the first message as far as its headers tell (> 0)."""
        have = len(self._buf)
        if have < FRAME_HEADER.size:
            return FRAME_HEADER.size - have
        _size, mtype = FRAME_HEADER.unpack_from(self._buf, 0)
        if mtype == MsgType.STREAM_JOIN:
            return max(1, JOIN_SIZE - have)
        head = ADMIT_SIZE + FRAME_HEADER.size
        if have < head:
            return head - have
        hsize, _ = FRAME_HEADER.unpack_from(self._buf, ADMIT_SIZE)
        return max(1, head + hsize - have)

    def feed(self, data: bytes) -> Admit | Join | None:
        """Add received bytes; the message once complete. Raises HandshakeError."""
        self._buf += data
        if len(self._buf) < FRAME_HEADER.size:
            return None
        size, mtype = FRAME_HEADER.unpack_from(self._buf, 0)
        if mtype == MsgType.STREAM_JOIN:
            return self._join(size)
        if mtype == MsgType.ADMIT:
            return self._admit(size)
        raise HandshakeError(
            f"first message is type {mtype}; a data connection opens with Admit or StreamJoin "
            "(the source needs this migration's admission key from incoming.prepare)"
        )

    def _join(self, size: int) -> Join | None:
        if size != JOIN_SIZE - FRAME_HEADER.size:
            raise HandshakeError(f"StreamJoin of {size} bytes; it is always {JOIN_SIZE - 5}")
        if len(self._buf) < JOIN_SIZE:
            return None
        self._trailing(JOIN_SIZE)
        return Join(bytes(self._buf))

    def _admit(self, size: int) -> Admit | None:
        if size != _ADMIT_BODY.size:
            raise HandshakeError(f"Admit of {size} bytes; it is always {_ADMIT_BODY.size}")
        if len(self._buf) < ADMIT_SIZE + FRAME_HEADER.size:
            return None
        version, mid, mac = _ADMIT_BODY.unpack_from(self._buf, FRAME_HEADER.size)
        if version != PROTOCOL_VERSION:
            raise HandshakeError(f"Admit has protocol version {version}, expected 1")
        hsize, htype = FRAME_HEADER.unpack_from(self._buf, ADMIT_SIZE)
        if htype != MsgType.CLIENT_HELLO:
            raise HandshakeError(f"Admit must be followed by a ClientHello, not type {htype}")
        if hsize > MAX_HELLO_BODY:
            raise HandshakeError(f"ClientHello of {hsize} bytes exceeds {MAX_HELLO_BODY}")
        end = ADMIT_SIZE + FRAME_HEADER.size + hsize
        if len(self._buf) < end:
            return None
        self._trailing(end)
        return Admit(migration_id=mid, mac=mac, hello_frame=bytes(self._buf[ADMIT_SIZE:end]))

    def _trailing(self, end: int) -> None:
        """The peer speaks next only after the server answered: early bytes are a violation."""
        if len(self._buf) > end:
            raise HandshakeError("bytes after the first message before the server answered")


class AdmitOutcome(Enum):
    """How an ``Admit`` was judged; every refusal has its own name (guard counters, audit)."""

    ADMITTED = "admitted"
    UNKNOWN = "unknown_migration"
    BAD_MAC = "bad_mac"
    MISMATCH = "hello_mismatch"
    REPLAYED = "replayed"
    EXHAUSTED = "exhausted"


class AdmitCheck:
    """Judges openings against per-migration keys, refusing replays and over-use.

    Memory is bounded by the migrations a host accepts (the admission queue) times
    :data:`MAX_OPENINGS` MACs; :meth:`forget` drops a migration's record when it ends.
    """

    def __init__(self, max_openings: int = MAX_OPENINGS) -> None:
        self._max = max_openings
        self._seen: dict[bytes, set[bytes]] = {}

    def check(self, key: bytes | None, admit: Admit) -> AdmitOutcome:
        """``key`` is the migration's admission key, None when no such migration is expected."""
        if key is None:
            return AdmitOutcome.UNKNOWN
        want = admit_mac(key, admit.migration_id, admit.hello_frame)
        if not hmac.compare_digest(want, admit.mac):
            return AdmitOutcome.BAD_MAC
        try:
            hello = ClientHello.decode(admit.hello_frame[FRAME_HEADER.size :])
        except HandshakeError:
            return AdmitOutcome.MISMATCH
        if hello.migration_id != admit.migration_id:
            return AdmitOutcome.MISMATCH
        seen = self._seen.setdefault(admit.migration_id, set())
        if admit.mac in seen:
            return AdmitOutcome.REPLAYED
        if len(seen) >= self._max:
            return AdmitOutcome.EXHAUSTED
        seen.add(admit.mac)
        return AdmitOutcome.ADMITTED

    def forget(self, migration_id: bytes) -> None:
        """The migration ended (or got a fresh key): its record goes."""
        self._seen.pop(migration_id, None)

    def __len__(self) -> int:
        return len(self._seen)
