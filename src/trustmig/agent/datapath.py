"""The agents' data path: handshakes here, the streams themselves in a relay process.

Source: :func:`open_outbound_session` connects to the destination's data listener, runs the
handshake on stream 0 (identities, attestation evidence bound to the transcript) and joins the
remaining streams, all *before* QEMU is told to migrate; nothing of the guest is read before the
peer is authenticated and attested. :func:`hand_to_relay` then gives the relay process the
streams and only their record keys.

Destination: :class:`DataListener` accepts connections (through the guard), dispatches on the
first frame (ClientHello or StreamJoin), asks the migration (on the event loop) to claim the
session, and hands every authenticated stream to that migration's relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from trustmig.agent.diskkeys import EXPORTER_LABEL
from trustmig.channel.errors import ChannelError
from trustmig.channel.handshake import ClientHandshake, HandshakeResult, ServerHandshake
from trustmig.channel.identity import LocalIdentity
from trustmig.channel.join import JoinVerifier, make_join, parse_join
from trustmig.channel.relay import recv_exact, tune_tcp
from trustmig.channel.session import SessionKeys
from trustmig.channel.wire import FRAME_HEADER, MAX_FRAME_BODY, MsgType
from trustmig.config import parse_hostport
from trustmig.guard.ratelog import RateLimitedLog
from trustmig.relay.client import RelayError, RelayHandle

log = logging.getLogger(__name__)
rlog = RateLimitedLog(log)
HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True)
class ChannelSecurity:
    """What a handshake needs of the host: its identity and how to judge a peer."""

    identity: LocalIdentity
    verify_peer: Callable[[bytes, str], object]
    make_evidence: Callable[[bytes], bytes] | None
    verify_evidence: Callable[[str, bytes, bytes], str] | None


class DataGuard(Protocol):
    """The guard's hooks around a data connection."""

    @property
    def handshake_deadline_s(self) -> float: ...

    def connect(self, listener: str, ip: str, port: int) -> int | None: ...
    def progress(self, conn_id: int, step: str) -> None: ...
    def authenticated(self, conn_id: int, identity: str) -> None: ...
    def close(self, conn_id: int) -> None: ...
    def refused(self, peer: tuple[str, int], reason: str) -> None: ...


@dataclass
class SessionTarget:
    """Where an accepted session goes: the migration's relay and its incoming QEMU socket."""

    migration_id: str
    relay: RelayHandle | None
    qemu_socket: Path
    #: ``qemu-tls``: the session only authenticates and attests; QEMU carries the data itself.
    handshake_only: bool = False
    #: streams that carry a copied disk, to the incoming QEMU's NBD server socket
    disk_sockets: dict[int, Path] = field(default_factory=dict)


class IncomingSessions(Protocol):
    """The destination's migrations, as the data listener sees them (thread-safe calls)."""

    def expect(self, migration_id: bytes, peer: str, n_streams: int) -> None:
        """Refuse (ChannelError) a session nobody expects, before any expensive crypto."""

    def claim(
        self, migration_id: bytes, peer: str, summary: dict[str, str], disk_key_wrap: bytes
    ) -> SessionTarget:
        """After mutual authentication: the one session this migration accepts, or
        ChannelError. The migration journals that it is receiving before this returns.
        ``disk_key_wrap`` is the session's exporter for disk keys (never journaled)."""


class HandshakeWatchdog:
    """Shuts a data connection down if it has not become a stream by the guard's deadline.

    Per-recv socket timeouts alone let a peer hold a connection forever by trickling a byte
    at a time; this bounds the whole handshake (or join) instead. Hand-over and expiry are
    decided under one lock, so a stream that was handed over is never cut.
    """

    def __init__(self, conn: socket.socket, deadline_s: float) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.expired = False
        self._handed = False
        self._timer = threading.Timer(deadline_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            if self._handed:
                return
            self.expired = True
        with contextlib.suppress(OSError):
            self._conn.shutdown(socket.SHUT_RDWR)

    def hand_over(self) -> None:
        """The connection becomes a stream: from now on the migration supervises it."""
        with self._lock:
            if self.expired:
                raise ChannelError("handshake deadline passed before the stream started")
            self._handed = True
        self._timer.cancel()

    def cancel(self) -> None:
        self._timer.cancel()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    if n and not recv_exact(sock, memoryview(buf)):
        raise ChannelError("connection closed during the handshake")
    return bytes(buf)


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    hdr = _recv_exact(sock, FRAME_HEADER.size)
    length, mtype = FRAME_HEADER.unpack(hdr)
    if length > MAX_FRAME_BODY:
        raise ChannelError(f"handshake frame of {length} bytes exceeds {MAX_FRAME_BODY}")
    return mtype, hdr + _recv_exact(sock, length)


def _run_handshake(
    sock: socket.socket, hs: ClientHandshake | ServerHandshake, first: bytes
) -> HandshakeResult:
    out = hs.receive(first) if first else b""
    while True:
        if out:
            sock.sendall(out)
        if hs.result is not None:
            return hs.result
        _, frame = _read_frame(sock)
        out = hs.receive(frame)


@dataclass
class OutboundSession:
    result: HandshakeResult
    sockets: list[socket.socket]

    def disk_key_wrap(self) -> bytes:
        """The session's exporter for disk keys (the destination derives the same)."""
        return self.result.session.exporter(EXPORTER_LABEL, self.result.migration_id)

    @property
    def n_streams(self) -> int:
        return len(self.sockets)

    @property
    def peer_evidence_summary(self) -> str:
        return self.result.peer_evidence_summary

    def close(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


def open_outbound_session(
    security: ChannelSecurity, address: str, server_name: str, migration_id: str, n_streams: int
) -> OutboundSession:
    """Blocking: connect, handshake and join every stream; raises ChannelError/OSError."""
    host, port = parse_hostport(address, "data address")
    mid = bytes.fromhex(migration_id.replace("-", ""))
    socks: list[socket.socket] = []
    try:
        s0 = socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT)
        socks.append(s0)
        tune_tcp(s0)
        hs = ClientHandshake(
            identity=security.identity,
            server_name=server_name,
            migration_id=mid,
            n_streams=n_streams,
            verify_peer=security.verify_peer,
            make_evidence=security.make_evidence,
            verify_evidence=security.verify_evidence,
        )
        s0.sendall(hs.start())
        result = _run_handshake(s0, hs, b"")
        for i in range(1, n_streams):
            si = socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT)
            socks.append(si)
            tune_tcp(si)
            si.sendall(make_join(result.session, i))
        for s in socks:
            s.settimeout(None)
        return OutboundSession(result, socks)
    except BaseException:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
        raise


def hand_to_relay(
    session: OutboundSession,
    relay: RelayHandle,
    qemu_socket: Path,
    mid: str,
    disk_sockets: dict[int, Path] | None = None,
) -> None:
    """Blocking: the relay listens for QEMU on ``qemu_socket`` (and for its NBD clients on
    ``disk_sockets``) and carries every stream."""
    keys = session.result.session
    try:
        relay.configure(
            "source",
            [keys.stream_keys(i, "c2s", "s2c") for i in range(session.n_streams)],
            qemu_socket,
            mid,
            disk_sockets,
        )
        for i, s in enumerate(session.sockets):
            relay.add_stream(i, s)
    finally:
        session.close()


async def favour_latency(relay: RelayHandle | None) -> None:
    """At the post-copy switch the memory stream's buffers shrink on this side (a relay that
    cannot be asked only costs page-fault latency: logged, never fatal)."""
    if relay is None:
        return
    try:
        await asyncio.to_thread(relay.favour_latency)
    except RelayError as e:
        log.warning("post-copy: the relay kept its large buffers: %s", e)


@dataclass
class _InboundSession:
    target: SessionTarget
    keys: SessionKeys
    verifier: JoinVerifier
    peer: str
    lock: threading.Lock = field(default_factory=threading.Lock)


class DataListener:
    """Destination data port: authenticates every connection before any byte reaches QEMU."""

    def __init__(
        self,
        security: ChannelSecurity,
        guard: DataGuard,
        sessions: IncomingSessions,
        host: str,
        port: int,
    ) -> None:
        self.security = security
        self.guard = guard
        self.sessions = sessions
        self.sock = socket.create_server((host, port), backlog=128, reuse_port=False)
        self.address = self.sock.getsockname()[:2]
        self._inbound: dict[bytes, _InboundSession] = {}
        self._stop = False
        self._thread = threading.Thread(
            target=self._accept_loop, name="tm-data-accept", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()

    def forget(self, migration_id: str) -> None:
        """Drop the session keys kept for stream joins (the migration ended)."""
        for sid, sess in list(self._inbound.items()):
            if sess.target.migration_id == migration_id:
                self._inbound.pop(sid, None)

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                if self._stop:
                    return
                time.sleep(0.01)
                continue
            conn_id = self.guard.connect("data", peer[0], peer[1])
            if conn_id is None:
                with contextlib.suppress(OSError):
                    conn.close()
                continue
            threading.Thread(
                target=self._handle, args=(conn, peer, conn_id), name="tm-data-conn", daemon=True
            ).start()

    def _handle(self, conn: socket.socket, peer: tuple[str, int], conn_id: int) -> None:
        tune_tcp(conn)
        conn.settimeout(HANDSHAKE_TIMEOUT)
        dog = HandshakeWatchdog(conn, self.guard.handshake_deadline_s)
        try:
            mtype, frame = _read_frame(conn)
            if mtype == MsgType.CLIENT_HELLO:
                self._handshake(conn, frame, conn_id, dog)
            elif mtype == MsgType.STREAM_JOIN:
                self._join(conn, frame, conn_id, dog)
            else:
                raise ChannelError(f"unexpected first message type {mtype}")
        except Exception as e:  # noqa: BLE001 - a bad peer must never take the listener down
            dog.cancel()
            if dog.expired:
                e = ChannelError(
                    f"handshake not finished within {self.guard.handshake_deadline_s:g} s "
                    f"(guard handshake deadline): {e}"
                )
            rlog.log(
                logging.WARNING,
                "data-refused",
                "data connection from %s:%s refused: %s",
                peer[0],
                peer[1],
                e,
            )
            self.guard.refused(peer, str(e))
            self.guard.close(conn_id)
            with contextlib.suppress(OSError):
                conn.close()

    def _handshake(
        self, conn: socket.socket, frame: bytes, conn_id: int, dog: HandshakeWatchdog
    ) -> None:
        hs = ServerHandshake(
            identity=self.security.identity,
            verify_peer=self.security.verify_peer,
            make_evidence=self.security.make_evidence,
            verify_evidence=self.security.verify_evidence,
            accept_migration=self.sessions.expect,
        )
        self.guard.progress(conn_id, "handshake")
        result = _run_handshake(conn, hs, frame)
        if hs.leftover:
            raise ChannelError("client sent records before the handshake finished")
        summary = {
            "peer": result.peer_name,
            "evidence": result.peer_evidence_summary,
            "transcript_hash": result.transcript_hash.hex(),
        }
        wrap = result.session.exporter(EXPORTER_LABEL, result.migration_id)
        target = self.sessions.claim(result.migration_id, result.peer_name, summary, wrap)
        self.guard.authenticated(conn_id, result.peer_name)
        # handed over to the migration, whose own stall detection supervises it from here
        self.guard.close(conn_id)
        dog.hand_over()
        if target.handshake_only or target.relay is None:
            with contextlib.suppress(OSError):
                conn.close()
            return
        keys = result.session
        target.relay.configure(
            "destination",
            [keys.stream_keys(i, "s2c", "c2s") for i in range(keys.n_streams)],
            target.qemu_socket,
            target.migration_id,
            target.disk_sockets,
        )
        sess = _InboundSession(target, keys, JoinVerifier(keys), result.peer_name)
        self._inbound[result.session_id] = sess
        conn.settimeout(None)
        target.relay.add_stream(0, conn)

    def _join(
        self, conn: socket.socket, frame: bytes, conn_id: int, dog: HandshakeWatchdog
    ) -> None:
        sid = parse_join(frame).session_id
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        # stream 0 registers its session once handed to the relay; a join may arrive just before
        while (sess := self._inbound.get(sid)) is None:
            if time.monotonic() > deadline:
                raise ChannelError("stream join for an unknown session")
            time.sleep(0.005)
        with sess.lock:
            index = sess.verifier.verify(frame)
        self.guard.authenticated(conn_id, sess.peer)
        self.guard.close(conn_id)
        dog.hand_over()
        assert sess.target.relay is not None
        conn.settimeout(None)
        sess.target.relay.add_stream(index, conn)
