"""Sans-IO handshake of the secure data channel (docs/protocol.md, "Handshake").

Source host = client, destination host = server, over the stream-0 TCP connection::

    C -> S  ClientHello
    S -> C  ServerHello, ServerAuth
    C -> S  ClientAuth, ClientFinished
    S -> C  ServerFinished

Both sides authenticate with host certificates (checked by an injected ``verify_peer``), sign the
transcript with their host key, and attach attestation evidence bound to the transcript hash of
the hellos. The objects only consume and produce bytes; sockets and timeouts belong to callers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto

from cryptography.hazmat.primitives.asymmetric import x25519

from trustmig.channel.errors import ChannelError, HandshakeError
from trustmig.channel.identity import (
    LocalIdentity,
    certificate_names,
    load_certificate,
    verify_signature,
)
from trustmig.channel.keyschedule import (
    CIPHER_IDS,
    CIPHER_NAMES,
    HASH_SIZE,
    cipher_id,
    hkdf_expand_label,
    hkdf_extract,
)
from trustmig.channel.limits import RecordLimits
from trustmig.channel.messages import (
    MAX_STREAMS,
    MIGRATION_ID_SIZE,
    RANDOM_SIZE,
    AuthMessage,
    ClientHello,
    ServerHello,
    check_name,
    decode_finished,
    encode_finished,
)
from trustmig.channel.session import SessionKeys
from trustmig.channel.wire import FrameReader, MsgType

__all__ = [
    "ClientHandshake",
    "HandshakeResult",
    "LocalIdentity",
    "ServerHandshake",
]

SERVER_AUTH_CONTEXT = b"trustmig server auth"
CLIENT_AUTH_CONTEXT = b"trustmig client auth"
NO_EVIDENCE = "none"

VerifyPeer = Callable[[bytes, str], object]
MakeEvidence = Callable[[bytes], bytes]
VerifyEvidence = Callable[[str, bytes, bytes], str]
AcceptMigration = Callable[[bytes, str, int], None]


@dataclass(frozen=True)
class HandshakeResult:
    """Outcome of a completed handshake.

    ``transcript_hash`` is H(ClientHello || ServerHello), the value both sides' evidence is
    bound to; audit records can pair it with the evidence.
    """

    session: SessionKeys
    peer_name: str
    peer_info: object
    peer_evidence_summary: str
    transcript_hash: bytes
    session_id: bytes
    n_streams: int
    migration_id: bytes = b""
    cipher: str = "aes-256-gcm"


class _State(Enum):
    START = auto()
    WAIT_CLIENT_HELLO = auto()
    WAIT_SERVER_HELLO = auto()
    WAIT_SERVER_AUTH = auto()
    WAIT_CLIENT_AUTH = auto()
    WAIT_CLIENT_FINISHED = auto()
    WAIT_SERVER_FINISHED = auto()
    DONE = auto()
    FAILED = auto()


def _shared_secret(private: x25519.X25519PrivateKey, peer_public: bytes) -> bytes:
    try:
        shared = private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise HandshakeError("peer X25519 key is invalid (low-order point)") from None
    if shared == bytes(len(shared)):
        raise HandshakeError("peer X25519 key is invalid (all-zero shared secret)")
    return shared


def _public_bytes(private: x25519.X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


class _Handshake:
    """Common machinery: frame reassembly, transcript, peer checks, key derivation."""

    def __init__(
        self,
        *,
        identity: LocalIdentity,
        verify_peer: VerifyPeer,
        make_evidence: MakeEvidence | None,
        verify_evidence: VerifyEvidence | None,
        limits: RecordLimits | None,
    ) -> None:
        self._identity = identity
        self._verify_peer = verify_peer
        self._make_evidence = make_evidence
        self._verify_evidence = verify_evidence
        self._limits = limits
        self._reader = FrameReader()
        self._transcript = hashlib.sha256()
        self._ephemeral = x25519.X25519PrivateKey.generate()
        self._random = os.urandom(RANDOM_SIZE)
        self._shared = b""
        self._hs_secret = b""
        self._th = b""
        self._result: HandshakeResult | None = None
        self._state = _State.START
        self._failure = ""
        self.leftover = b""

    @property
    def result(self) -> HandshakeResult | None:
        """Set once the handshake completed."""
        return self._result

    @property
    def done(self) -> bool:
        return self._result is not None

    def receive(self, data: bytes | bytearray | memoryview) -> bytes:
        """Feed received bytes; returns bytes to send (possibly empty). Raises ChannelError."""
        if self._state is _State.FAILED:
            raise HandshakeError(f"handshake already failed ({self._failure})")
        if self._state is _State.START:
            raise HandshakeError("receive() called before the handshake started")
        if self._state is _State.DONE:
            self.leftover += bytes(data)
            return b""
        self._reader.feed(data)
        out = bytearray()
        try:
            while self._state is not _State.DONE:
                frame = self._reader.next_frame()
                if frame is None:
                    break
                mtype, body, raw = frame
                out += self._handle(mtype, body, raw)
            if self._state is _State.DONE:
                self.leftover += self._reader.take_rest()
        except ChannelError as exc:
            self._state = _State.FAILED
            self._failure = str(exc)
            raise
        return bytes(out)

    def _handle(self, mtype: int, body: bytes, raw: bytes) -> bytes:
        raise NotImplementedError

    def _expect(self, mtype: int, wanted: MsgType) -> None:
        if mtype != wanted:
            try:
                got = MsgType(mtype).name
            except ValueError:
                got = f"unknown message type {mtype}"
            raise HandshakeError(f"unexpected {got} during handshake, expected {wanted.name}")

    def _local_evidence(self) -> bytes:
        if self._make_evidence is None:
            return b""
        try:
            evidence = self._make_evidence(self._th)
        except Exception as exc:
            raise HandshakeError(f"could not produce local attestation evidence: {exc}") from exc
        if not isinstance(evidence, bytes | bytearray):
            raise HandshakeError("evidence callback must return bytes")
        return bytes(evidence)

    def _sign_auth(self, mtype: MsgType, context: bytes) -> bytes:
        """Build ServerAuth/ClientAuth: the signature covers H(transcript || cert || evidence)."""
        evidence = self._local_evidence()
        unsigned = AuthMessage(self._identity.cert_der, evidence, b"")
        h = self._transcript.copy()
        h.update(unsigned.signed_part())
        signature = self._identity.sign(h.digest() + context)
        raw = AuthMessage(self._identity.cert_der, evidence, signature).encode(mtype)
        self._transcript.update(raw)
        return raw

    def _check_auth(
        self, body: bytes, raw: bytes, mtype: MsgType, context: bytes, peer_name: str
    ) -> tuple[object, str]:
        """Verify a peer's Auth message; returns (peer_info, evidence summary)."""
        whose = "server" if mtype is MsgType.SERVER_AUTH else "client"
        auth = AuthMessage.decode(body, mtype.name)
        cert = load_certificate(auth.cert_der, f"{whose} {peer_name}")
        try:
            peer_info = self._verify_peer(auth.cert_der, peer_name)
        except Exception as exc:
            raise HandshakeError(f"{whose} certificate for {peer_name} rejected: {exc}") from exc
        if peer_name not in certificate_names(cert):
            raise HandshakeError(
                f"{whose} presented a certificate for {sorted(certificate_names(cert))}, "
                f"not for {peer_name}"
            )
        info_name = getattr(peer_info, "name", peer_name)
        if info_name != peer_name:
            raise HandshakeError(
                f"{whose} certificate belongs to {info_name!r}, expected {peer_name!r}"
            )
        h = self._transcript.copy()
        h.update(auth.signed_part())
        verify_signature(cert, auth.signature, h.digest() + context, f"{whose} {peer_name}")
        summary = NO_EVIDENCE
        if self._verify_evidence is not None:
            try:
                summary = self._verify_evidence(peer_name, auth.evidence, self._th)
            except Exception as exc:
                raise HandshakeError(
                    f"{whose} {peer_name} attestation evidence rejected: {exc}"
                ) from exc
        elif auth.evidence:
            summary = "none (evidence not checked)"
        self._transcript.update(raw)
        return peer_info, str(summary)

    def _after_hellos(self, peer_public: bytes) -> None:
        self._shared = _shared_secret(self._ephemeral, peer_public)
        self._th = self._transcript.digest()
        self._hs_secret = hkdf_extract(self._th, self._shared)

    def _finished_mac(self, label: str) -> bytes:
        key = hkdf_expand_label(self._hs_secret, label, b"", HASH_SIZE)
        return hmac.new(key, self._transcript.digest(), hashlib.sha256).digest()

    def _master(self) -> bytes:
        """Master secret, salted with the transcript through ClientAuth (th_full)."""
        return hkdf_extract(self._transcript.digest(), self._shared)


class ClientHandshake(_Handshake):
    """Source-host side of the handshake."""

    def __init__(
        self,
        *,
        identity: LocalIdentity,
        server_name: str,
        migration_id: bytes,
        n_streams: int,
        verify_peer: VerifyPeer,
        make_evidence: MakeEvidence | None = None,
        verify_evidence: VerifyEvidence | None = None,
        cipher: str = "aes-256-gcm",
        limits: RecordLimits | None = None,
    ) -> None:
        super().__init__(
            identity=identity,
            verify_peer=verify_peer,
            make_evidence=make_evidence,
            verify_evidence=verify_evidence,
            limits=limits,
        )
        check_name(server_name, "server name")
        if len(migration_id) != MIGRATION_ID_SIZE:
            raise HandshakeError(
                f"migration_id must be {MIGRATION_ID_SIZE} bytes, got {len(migration_id)}"
            )
        if not 1 <= n_streams <= MAX_STREAMS:
            raise HandshakeError(f"n_streams {n_streams} out of range: use 1..{MAX_STREAMS}")
        self._server_name = server_name
        self._migration_id = bytes(migration_id)
        self._n_streams = n_streams
        self._cipher_id = cipher_id(cipher)
        self._peer_info: object = None
        self._summary = NO_EVIDENCE
        self._expected_server_finished = b""

    def start(self) -> bytes:
        """Return the ClientHello to send first."""
        if self._state is not _State.START:
            raise HandshakeError("start() called twice")
        hello = ClientHello(
            migration_id=self._migration_id,
            client_name=self._identity.name,
            server_name=self._server_name,
            n_streams=self._n_streams,
            ciphers=bytes([self._cipher_id]),
            public_key=_public_bytes(self._ephemeral),
            random=self._random,
        ).encode()
        self._transcript.update(hello)
        self._state = _State.WAIT_SERVER_HELLO
        return hello

    def _handle(self, mtype: int, body: bytes, raw: bytes) -> bytes:
        if self._state is _State.WAIT_SERVER_HELLO:
            self._expect(mtype, MsgType.SERVER_HELLO)
            hello = ServerHello.decode(body)
            if hello.server_name != self._server_name:
                raise HandshakeError(
                    f"connected to host {hello.server_name!r}, expected {self._server_name!r}"
                )
            if hello.cipher != self._cipher_id:
                raise HandshakeError(f"server chose cipher {hello.cipher}, which was not offered")
            self._transcript.update(raw)
            self._after_hellos(hello.public_key)
            self._state = _State.WAIT_SERVER_AUTH
            return b""
        if self._state is _State.WAIT_SERVER_AUTH:
            self._expect(mtype, MsgType.SERVER_AUTH)
            self._peer_info, self._summary = self._check_auth(
                body, raw, MsgType.SERVER_AUTH, SERVER_AUTH_CONTEXT, self._server_name
            )
            client_auth = self._sign_auth(MsgType.CLIENT_AUTH, CLIENT_AUTH_CONTEXT)
            self._master_secret = self._master()
            finished = encode_finished(
                MsgType.CLIENT_FINISHED, self._finished_mac("tm client finished")
            )
            self._transcript.update(finished)
            self._expected_server_finished = self._finished_mac("tm server finished")
            self._state = _State.WAIT_SERVER_FINISHED
            return client_auth + finished
        if self._state is _State.WAIT_SERVER_FINISHED:
            self._expect(mtype, MsgType.SERVER_FINISHED)
            mac = decode_finished(body, "ServerFinished")
            if not hmac.compare_digest(mac, self._expected_server_finished):
                raise HandshakeError("ServerFinished MAC mismatch: server derived different keys")
            self._transcript.update(raw)
            session = SessionKeys(
                master_secret=self._master_secret,
                cipher=CIPHER_NAMES[self._cipher_id],
                n_streams=self._n_streams,
                limits=self._limits,
            )
            self._result = HandshakeResult(
                session=session,
                peer_name=self._server_name,
                peer_info=self._peer_info,
                peer_evidence_summary=self._summary,
                transcript_hash=self._th,
                session_id=session.session_id,
                n_streams=self._n_streams,
                migration_id=self._migration_id,
                cipher=session.cipher,
            )
            self._state = _State.DONE
            return b""
        raise HandshakeError(f"unexpected message in state {self._state.name}")


class ServerHandshake(_Handshake):
    """Destination-host side of the handshake.

    ``accept_migration(migration_id, client_name, n_streams)`` lets the agent refuse unknown
    migrations or unexpected source hosts by raising; it runs before any key material is sent.
    """

    def __init__(
        self,
        *,
        identity: LocalIdentity,
        verify_peer: VerifyPeer,
        make_evidence: MakeEvidence | None = None,
        verify_evidence: VerifyEvidence | None = None,
        accept_migration: AcceptMigration | None = None,
        ciphers: tuple[str, ...] = ("aes-256-gcm", "chacha20-poly1305"),
        limits: RecordLimits | None = None,
    ) -> None:
        super().__init__(
            identity=identity,
            verify_peer=verify_peer,
            make_evidence=make_evidence,
            verify_evidence=verify_evidence,
            limits=limits,
        )
        self._accept_migration = accept_migration
        self._allowed = {cipher_id(c) for c in ciphers}
        self._hello: ClientHello | None = None
        self._cipher = 0
        self._peer_info: object = None
        self._summary = NO_EVIDENCE
        self._expected_client_finished = b""
        self._state = _State.WAIT_CLIENT_HELLO

    def start(self) -> bytes:
        """The server speaks second: nothing to send before the ClientHello."""
        return b""

    def _handle(self, mtype: int, body: bytes, raw: bytes) -> bytes:
        if self._state is _State.WAIT_CLIENT_HELLO:
            self._expect(mtype, MsgType.CLIENT_HELLO)
            hello = ClientHello.decode(body)
            if hello.server_name != self._identity.name:
                raise HandshakeError(
                    f"client expects host {hello.server_name!r}, this is {self._identity.name!r}"
                )
            chosen = next((c for c in hello.ciphers if c in self._allowed), None)
            if chosen is None:
                offered = [CIPHER_NAMES.get(c, str(c)) for c in hello.ciphers]
                raise HandshakeError(
                    f"no common cipher: client offered {offered}, "
                    f"this host allows {sorted(CIPHER_IDS)}"
                )
            if self._accept_migration is not None:
                try:
                    self._accept_migration(hello.migration_id, hello.client_name, hello.n_streams)
                except Exception as exc:
                    raise HandshakeError(
                        f"migration {hello.migration_id.hex()} from {hello.client_name} "
                        f"refused: {exc}"
                    ) from exc
            self._hello = hello
            self._cipher = chosen
            self._transcript.update(raw)
            server_hello = ServerHello(
                server_name=self._identity.name,
                cipher=chosen,
                public_key=_public_bytes(self._ephemeral),
                random=self._random,
            ).encode()
            self._transcript.update(server_hello)
            self._after_hellos(hello.public_key)
            server_auth = self._sign_auth(MsgType.SERVER_AUTH, SERVER_AUTH_CONTEXT)
            self._state = _State.WAIT_CLIENT_AUTH
            return server_hello + server_auth
        assert self._hello is not None
        if self._state is _State.WAIT_CLIENT_AUTH:
            self._expect(mtype, MsgType.CLIENT_AUTH)
            self._peer_info, self._summary = self._check_auth(
                body, raw, MsgType.CLIENT_AUTH, CLIENT_AUTH_CONTEXT, self._hello.client_name
            )
            self._master_secret = self._master()
            self._expected_client_finished = self._finished_mac("tm client finished")
            self._state = _State.WAIT_CLIENT_FINISHED
            return b""
        if self._state is _State.WAIT_CLIENT_FINISHED:
            self._expect(mtype, MsgType.CLIENT_FINISHED)
            mac = decode_finished(body, "ClientFinished")
            if not hmac.compare_digest(mac, self._expected_client_finished):
                raise HandshakeError("ClientFinished MAC mismatch: client derived different keys")
            self._transcript.update(raw)
            finished = encode_finished(
                MsgType.SERVER_FINISHED, self._finished_mac("tm server finished")
            )
            self._transcript.update(finished)
            session = SessionKeys(
                master_secret=self._master_secret,
                cipher=CIPHER_NAMES[self._cipher],
                n_streams=self._hello.n_streams,
                limits=self._limits,
            )
            self._result = HandshakeResult(
                session=session,
                peer_name=self._hello.client_name,
                peer_info=self._peer_info,
                peer_evidence_summary=self._summary,
                transcript_hash=self._th,
                session_id=session.session_id,
                n_streams=self._hello.n_streams,
                migration_id=self._hello.migration_id,
                cipher=session.cipher,
            )
            self._state = _State.DONE
            return finished
        raise HandshakeError(f"unexpected message in state {self._state.name}")
