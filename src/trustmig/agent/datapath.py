"""The agents' data path: secure-channel sessions over TCP, one connection per QEMU stream.

Source: :func:`open_outbound_session` connects to the destination's data listener, runs the
handshake on stream 0 (identities, attestation evidence bound to the transcript) and joins the
remaining streams, all *before* QEMU is told to migrate; nothing of the guest is read before the
peer is authenticated and attested.

Destination: :class:`DataListener` accepts connections (through the guard), dispatches on the
first frame (ClientHello or StreamJoin), and connects each authenticated stream to the incoming
QEMU in order: stream 0 (QEMU's main channel) first, because QEMU takes the first connection as
the main one.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from trustmig.channel.errors import ChannelError
from trustmig.channel.handshake import ClientHandshake, HandshakeResult, ServerHandshake
from trustmig.channel.join import JoinVerifier, make_join, parse_join
from trustmig.channel.relay import StreamFailure, StreamPump, recv_exact, tune_tcp
from trustmig.channel.session import SessionKeys
from trustmig.channel.wire import FRAME_HEADER, MAX_FRAME_BODY, MsgType
from trustmig.config import parse_hostport
from trustmig.guard.ratelog import RateLimitedLog

if TYPE_CHECKING:
    from trustmig.agent.migrate_in import IncomingMigration
    from trustmig.agent.server import Agent

log = logging.getLogger(__name__)
rlog = RateLimitedLog(log)
HANDSHAKE_TIMEOUT = 10.0


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
    max_plaintext: int

    @property
    def n_streams(self) -> int:
        return len(self.sockets)

    @property
    def peer_evidence_summary(self) -> str:
        return self.result.peer_evidence_summary

    def pump(
        self, index: int, qemu_conn: socket.socket, on_failure: Callable[[StreamFailure], None]
    ) -> StreamPump:
        s = self.result.session
        return StreamPump(
            index,
            qemu_conn,
            self.sockets[index],
            s.sealer(index, "c2s"),
            s.opener(index, "s2c"),
            max_plaintext=self.max_plaintext,
            on_failure=on_failure,
            outbound_name="source→destination",
            inbound_name="destination→source (return path)",
        )

    def close(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


def open_outbound_session(
    agent: Agent, address: str, server_name: str, migration_id: str, n_streams: int
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
            identity=agent.channel_identity,
            server_name=server_name,
            migration_id=mid,
            n_streams=n_streams,
            verify_peer=agent.verify_host_cert,
            make_evidence=agent.make_evidence,
            verify_evidence=agent.verify_evidence,
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
        return OutboundSession(result, socks, result.session.limits.max_plaintext)
    except BaseException:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
        raise


@dataclass
class _InboundSession:
    incoming: IncomingMigration
    keys: SessionKeys
    verifier: JoinVerifier
    lock: threading.Lock = field(default_factory=threading.Lock)


class DataListener:
    """Destination data port: authenticates every connection before any byte reaches QEMU."""

    def __init__(self, agent: Agent, host: str, port: int) -> None:
        self.agent = agent
        self.sock = socket.create_server((host, port), backlog=128, reuse_port=False)
        self.address = self.sock.getsockname()[:2]
        self._sessions: dict[bytes, _InboundSession] = {}
        self._claim_lock = threading.Lock()
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

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                if self._stop:
                    return
                time.sleep(0.01)
                continue
            verdict = self.agent.guard_connect("data", peer[0], peer[1])
            if verdict is None:
                with contextlib.suppress(OSError):
                    conn.close()
                continue
            threading.Thread(
                target=self._handle, args=(conn, peer, verdict), name="tm-data-conn", daemon=True
            ).start()

    def _handle(self, conn: socket.socket, peer: tuple[str, int], conn_id: int) -> None:
        tune_tcp(conn)
        conn.settimeout(HANDSHAKE_TIMEOUT)
        dog = HandshakeWatchdog(conn, self.agent.guard.rules.handshake_deadline_s)
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
                    f"handshake not finished within {self.agent.guard.rules.handshake_deadline_s:g}"
                    f" s (guard handshake deadline): {e}"
                )
            rlog.log(
                logging.WARNING,
                "data-refused",
                "data connection from %s:%s refused: %s",
                peer[0],
                peer[1],
                e,
            )
            self.agent.note_refused_data_connection(peer, str(e))
            self.agent.guard_close(conn_id)
            with contextlib.suppress(OSError):
                conn.close()

    def _open_for(self, migration_id: bytes, peer_name: str) -> IncomingMigration:
        """The incoming migration this peer may open a session for, or ChannelError."""
        inc = self.agent.find_incoming(migration_id)
        if inc is None:
            raise ChannelError("no migration with this id is expected here (replayed or forged)")
        if inc.source != peer_name:
            raise ChannelError(
                f"migration {inc.migration_id} is expected from {inc.source}, not {peer_name}"
            )
        if inc.state not in ("prepared", "recovering"):
            raise ChannelError(f"migration {inc.migration_id} already has a session (replay?)")
        return inc

    def _accept_migration(self, migration_id: bytes, client_name: str, n_streams: int) -> None:
        inc = self._open_for(migration_id, client_name)  # early refusal, before any crypto
        if inc.options.channel == "qemu-tls":
            if n_streams != 1:
                raise ChannelError("a qemu-tls migration uses the channel for its handshake only")
        elif n_streams != inc.options.streams:
            raise ChannelError(f"expected {inc.options.streams} streams, client asked {n_streams}")
        # no state change here: the client is not authenticated yet (see _claim_session)

    def _claim_session(self, migration_id: bytes, peer_name: str) -> IncomingMigration:
        """After mutual authentication: the one session this prepared (or recovering)
        migration accepts. Decided under a lock, so two handshakes cannot both win."""
        with self._claim_lock:
            inc = self._open_for(migration_id, peer_name)
            inc.state = "receiving"
            return inc

    def _handshake(
        self, conn: socket.socket, frame: bytes, conn_id: int, dog: HandshakeWatchdog
    ) -> None:
        hs = ServerHandshake(
            identity=self.agent.channel_identity,
            verify_peer=self.agent.verify_host_cert,
            make_evidence=self.agent.make_evidence,
            verify_evidence=self.agent.verify_evidence,
            accept_migration=self._accept_migration,
        )
        self.agent.guard_progress(conn_id, "handshake")
        result = _run_handshake(conn, hs, frame)
        if hs.leftover:
            raise ChannelError("client sent records before the handshake finished")
        inc = self._claim_session(result.migration_id, result.peer_name)
        self.agent.guard_authenticated(conn_id, result.peer_name)
        # handed over to the migration, whose own stall detection supervises it from here
        self.agent.guard_close(conn_id)
        inc.session_summary = {
            "peer": result.peer_name,
            "evidence": result.peer_evidence_summary,
            "transcript_hash": result.transcript_hash.hex(),
        }
        dog.hand_over()
        if inc.options.channel == "qemu-tls":
            # identities and attestation are settled; QEMU carries the data over its own TLS
            with contextlib.suppress(OSError):
                conn.close()
            return
        sess = _InboundSession(inc, result.session, JoinVerifier(result.session))
        self._start_stream(sess, 0, conn)
        self._sessions[result.session_id] = sess

    def _join(
        self, conn: socket.socket, frame: bytes, conn_id: int, dog: HandshakeWatchdog
    ) -> None:
        sid = parse_join(frame).session_id
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        # stream 0 registers its session once connected to QEMU; a join may arrive just before
        while (sess := self._sessions.get(sid)) is None:
            if time.monotonic() > deadline:
                raise ChannelError("stream join for an unknown session")
            time.sleep(0.005)
        with sess.lock:
            index = sess.verifier.verify(frame)
        self.agent.guard_authenticated(conn_id, sess.incoming.source)
        self.agent.guard_close(conn_id)
        dog.hand_over()
        self._start_stream(sess, index, conn)

    def _start_stream(self, sess: _InboundSession, index: int, conn: socket.socket) -> None:
        from trustmig.agent.migrate_in import on_stream_failure

        inc = sess.incoming
        generation = inc.recoveries  # failures of an older session's pumps are stale
        conn.settimeout(None)
        with sess.lock:
            qemu_sock = inc.connect_qemu()
            pump = StreamPump(
                index,
                qemu_sock,
                conn,
                sess.keys.sealer(index, "s2c"),
                sess.keys.opener(index, "c2s"),
                max_plaintext=sess.keys.limits.max_plaintext,
                on_failure=lambda f: on_stream_failure(self.agent, inc, f, generation),
                outbound_name="destination→source (return path)",
                inbound_name="source→destination",
            )
            inc.pumps[index] = pump
            pump.start()
