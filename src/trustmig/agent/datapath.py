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
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from trustmig.agent.diskkeys import EXPORTER_LABEL
from trustmig.channel.admit import Admit, AdmitCheck, AdmitOutcome, FirstMessage, Join, make_admit
from trustmig.channel.errors import ChannelError, HandshakeError
from trustmig.channel.handshake import ClientHandshake, HandshakeResult, ServerHandshake
from trustmig.channel.identity import LocalIdentity
from trustmig.channel.join import JoinVerifier, make_join, parse_join
from trustmig.channel.relay import recv_exact, tune_tcp
from trustmig.channel.session import SessionKeys
from trustmig.channel.wire import FRAME_HEADER, MAX_FRAME_BODY
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

    def gate_connect(self, listener: str, ip: str, port: int) -> tuple[int | None, tuple[int, ...]]:
        """A new connection's id (None: refused) and the waiters evicted for it."""

    def proven(self, conn_id: int, proof: str) -> bool: ...
    def proof_failed(self, conn_id: int, rule: str, reason: str) -> None: ...
    def expire_unproven(self) -> list[int]: ...
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

    def admission_key(self, migration_id: bytes) -> bytes | None:
        """The key an expected migration's source must MAC its opening with (None: no such
        migration is expected here)."""

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
    security: ChannelSecurity,
    address: str,
    server_name: str,
    migration_id: str,
    n_streams: int,
    admission_key: bytes,
) -> OutboundSession:
    """Blocking: connect, handshake and join every stream; raises ChannelError/OSError.

    Stream 0 opens with the ``Admit`` the destination's gate checks first: the MAC of the
    ClientHello under ``admission_key``, which the destination gave this source over the
    control channel for this migration (``incoming.prepare``/``incoming.recover``).
    """
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
        hello = hs.start()
        s0.sendall(make_admit(admission_key, mid, hello) + hello)
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


async def favour_latency(relay: RelayHandle | None, streams: tuple[int, ...]) -> None:
    """At the post-copy switch the buffers of the streams that carry requested pages shrink on
    this side (a relay that cannot be asked only costs page-fault latency: logged, never
    fatal)."""
    if relay is None:
        return
    try:
        await asyncio.to_thread(relay.favour_latency, streams)
    except RelayError as e:
        log.warning("post-copy: the relay kept its large buffers: %s", e)


@dataclass
class _InboundSession:
    """A session the handshake finished: its keys judge the joins at once; the target (the
    migration's relay) follows once the migration claimed it (``ready``)."""

    migration_id: bytes
    keys: SessionKeys
    verifier: JoinVerifier
    peer: str
    target: SessionTarget | None = None
    failed: bool = False
    ready: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


_ADMIT_REFUSALS = {
    AdmitOutcome.UNKNOWN: "Admit names no migration expected here (ended, replayed or forged)",
    AdmitOutcome.BAD_MAC: "Admit MAC is wrong: the sender does not hold this migration's key",
    AdmitOutcome.MISMATCH: "Admit and its ClientHello name different migrations",
    AdmitOutcome.REPLAYED: "Admit was already used: a replayed opening",
    AdmitOutcome.EXHAUSTED: "this migration's admission key opened too many sessions",
}


@dataclass
class _Waiter:
    """A connection in the gate's waiting room: its socket and what arrived of its first
    message."""

    sock: socket.socket
    peer: tuple[str, int]
    conn_id: int
    first: FirstMessage = field(default_factory=FirstMessage)
    #: a complete StreamJoin whose session's handshake is finishing on another thread
    parked: Join | None = None


#: The gate's select timeout: how often it drops waiters past the proof deadline.
GATE_TICK_S = 0.1
#: ... and how soon it looks again for the session of a join that overtook its handshake.
PARKED_TICK_S = 0.002
#: Accepts per turn of the gate, so a flood of connects cannot starve the reads.
ACCEPTS_PER_TURN = 64


class DataListener:
    """Destination data port: authenticates every connection before any byte reaches QEMU.

    One gate thread accepts every connection and reads its first message without blocking:
    an ``Admit`` + ``ClientHello`` whose MAC needs this migration's admission key, or a
    ``StreamJoin`` whose MAC needs the session's join key. Only a connection that proved
    itself gets a thread, a handshake and a guard slot; anything else costs one accept, a
    read and a close. A flood, from any address (a peer's too), can only shorten how long a
    connection may wait in the gate's bounded room.
    """

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
        self.sock = socket.create_server((host, port), backlog=1024, reuse_port=False)
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()[:2]
        self._inbound: dict[bytes, _InboundSession] = {}
        self._admits = AdmitCheck()
        self._admits_lock = threading.Lock()
        self._waiting: dict[int, _Waiter] = {}
        #: waiters whose join overtook its session's handshake
        self._parked: set[int] = set()
        self._stop = False
        self._thread = threading.Thread(target=self._gate_loop, name="tm-data-gate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop = True
        if self._thread.is_alive():
            self._thread.join(1.0)  # the gate sees the flag within one tick
        with contextlib.suppress(OSError):
            self.sock.close()

    def forget(self, migration_id: str) -> None:
        """Drop the session keys kept for stream joins and the openings admitted (the
        migration ended)."""
        raw = bytes.fromhex(migration_id.replace("-", ""))
        for sid, sess in list(self._inbound.items()):
            if sess.migration_id == raw:
                self._inbound.pop(sid, None)
        with self._admits_lock:
            self._admits.forget(raw)

    # ------------------------------------------------------------------ the gate
    def _gate_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, None)
        next_expiry = 0.0
        try:
            while not self._stop:
                for key, _ in sel.select(PARKED_TICK_S if self._parked else GATE_TICK_S):
                    if key.data is None:
                        self._accept(sel)
                    else:
                        self._read(sel, key.data)
                if time.monotonic() >= next_expiry:
                    next_expiry = time.monotonic() + GATE_TICK_S
                    for conn_id in self.guard.expire_unproven():
                        self._drop(sel, conn_id)
                for w in [self._waiting[c] for c in list(self._parked) if c in self._waiting]:
                    assert w.parked is not None
                    self._judge_join(sel, w, w.parked)
        except Exception:  # pragma: no cover - the gate must be visible if it ever dies
            log.exception("data listener gate stopped")
        finally:
            for conn_id in list(self._waiting):
                self._drop(sel, conn_id)
            sel.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                if not self._stop:
                    log.warning("data listener: accept failed", exc_info=True)
                return
            conn_id, evicted = self.guard.gate_connect("data", peer[0], peer[1])
            for old in evicted:
                self._drop(sel, old)
            if conn_id is None:
                with contextlib.suppress(OSError):
                    conn.close()
                continue
            conn.setblocking(False)
            waiter = _Waiter(conn, (str(peer[0]), int(peer[1])), conn_id)
            self._waiting[conn_id] = waiter
            sel.register(conn, selectors.EVENT_READ, waiter)

    def _drop(self, sel: selectors.BaseSelector, conn_id: int) -> None:
        self._parked.discard(conn_id)
        waiter = self._waiting.pop(conn_id, None)
        if waiter is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(waiter.sock)
        with contextlib.suppress(OSError):
            waiter.sock.close()

    def _refuse(self, sel: selectors.BaseSelector, w: _Waiter, rule: str, reason: str) -> None:
        self.guard.proof_failed(w.conn_id, rule, reason)
        rlog.log(logging.INFO, f"data-gate:{rule}", "data connection from %s:%s refused: %s",
                 w.peer[0], w.peer[1], reason)  # fmt: skip
        self.guard.refused(w.peer, reason)
        self._drop(sel, w.conn_id)

    def _read(self, sel: selectors.BaseSelector, w: _Waiter) -> None:
        try:
            data = w.sock.recv(w.first.wanted())
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._refuse(
                sel, w, "first_message", f"connection failed before its first message: {e}"
            )
            return
        if not data:
            self._refuse(sel, w, "first_message", "connection closed before its first message")
            return
        try:
            msg = w.first.feed(data)
        except HandshakeError as e:
            self._refuse(sel, w, "first_message", str(e))
            return
        if isinstance(msg, Admit):
            self._judge_admit(sel, w, msg)
        elif isinstance(msg, Join):
            self._judge_join(sel, w, msg)

    def _judge_admit(self, sel: selectors.BaseSelector, w: _Waiter, admit: Admit) -> None:
        key = self.sessions.admission_key(admit.migration_id)
        with self._admits_lock:
            outcome = self._admits.check(key, admit)
        if outcome is not AdmitOutcome.ADMITTED:
            self._refuse(sel, w, f"admit_{outcome.value}", _ADMIT_REFUSALS[outcome])
            return
        if self._hand_off(sel, w, "admit"):
            args = (w.sock, w.peer, w.conn_id, admit.hello_frame)
            threading.Thread(target=self._handle, args=args, name="tm-data-conn",
                             daemon=True).start()  # fmt: skip

    def _judge_join(self, sel: selectors.BaseSelector, w: _Waiter, join: Join) -> None:
        sess = self._inbound.get(parse_join(join.frame).session_id)
        if sess is None:
            # stream 0's server thread registers the session just after its last message; a
            # join may overtake it: it waits (within the proof deadline), without a thread
            if w.parked is None:
                w.parked = join
                self._parked.add(w.conn_id)
                with contextlib.suppress(KeyError, ValueError):
                    sel.unregister(w.sock)
            return
        self._parked.discard(w.conn_id)
        try:
            with sess.lock:
                index = sess.verifier.verify(join.frame)
        except HandshakeError as e:
            self._refuse(sel, w, "join_refused", str(e))
            return
        if self._hand_off(sel, w, "stream-join"):
            threading.Thread(target=self._joined, args=(w.sock, w.peer, w.conn_id, sess, index),
                             name="tm-data-join", daemon=True).start()  # fmt: skip

    def _hand_off(self, sel: selectors.BaseSelector, w: _Waiter, proof: str) -> bool:
        """Out of the waiting room into a guard slot and a thread of its own."""
        self._parked.discard(w.conn_id)
        self._waiting.pop(w.conn_id, None)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(w.sock)
        if not self.guard.proven(w.conn_id, proof):
            with contextlib.suppress(OSError):
                w.sock.close()
            return False
        w.sock.setblocking(True)
        return True

    # ------------------------------------------------------------------ proven connections
    def _handle(
        self, conn: socket.socket, peer: tuple[str, int], conn_id: int, hello: bytes
    ) -> None:
        self._proven(conn, peer, conn_id, lambda dog: self._handshake(conn, hello, conn_id, dog))

    def _joined(
        self,
        conn: socket.socket,
        peer: tuple[str, int],
        conn_id: int,
        sess: _InboundSession,
        index: int,
    ) -> None:
        self._proven(conn, peer, conn_id, lambda dog: self._join(conn, sess, index, conn_id, dog))

    def _proven(
        self,
        conn: socket.socket,
        peer: tuple[str, int],
        conn_id: int,
        run: Callable[[HandshakeWatchdog], None],
    ) -> None:
        tune_tcp(conn)
        conn.settimeout(HANDSHAKE_TIMEOUT)
        dog = HandshakeWatchdog(conn, self.guard.handshake_deadline_s)
        try:
            run(dog)
        except Exception as e:  # noqa: BLE001 - a bad peer must never take the listener down
            dog.cancel()
            if dog.expired:
                e = ChannelError(
                    f"handshake not finished within {self.guard.handshake_deadline_s:g} s "
                    f"(guard handshake deadline): {e}"
                )
            rlog.log(logging.WARNING, "data-refused", "data connection from %s:%s refused: %s",
                     peer[0], peer[1], e)  # fmt: skip
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
        keys = result.session
        # the joins are judged by their MAC the moment they arrive, before the claim
        sess = _InboundSession(result.migration_id, keys, JoinVerifier(keys), result.peer_name)
        self._inbound[result.session_id] = sess
        try:
            target = self._claim(result)
        except BaseException:
            self._inbound.pop(result.session_id, None)
            sess.failed = True
            sess.ready.set()
            raise
        self.guard.authenticated(conn_id, result.peer_name)
        # handed over to the migration, whose own stall detection supervises it from here
        self.guard.close(conn_id)
        dog.hand_over()
        if target.handshake_only or target.relay is None:
            self._inbound.pop(result.session_id, None)
            with contextlib.suppress(OSError):
                conn.close()
            return
        target.relay.configure(
            "destination",
            [keys.stream_keys(i, "s2c", "c2s") for i in range(keys.n_streams)],
            target.qemu_socket,
            target.migration_id,
            target.disk_sockets,
        )
        sess.target = target
        sess.ready.set()
        conn.settimeout(None)
        target.relay.add_stream(0, conn)

    def _claim(self, result: HandshakeResult) -> SessionTarget:
        summary = {
            "peer": result.peer_name,
            "evidence": result.peer_evidence_summary,
            "transcript_hash": result.transcript_hash.hex(),
        }
        wrap = result.session.exporter(EXPORTER_LABEL, result.migration_id)
        return self.sessions.claim(result.migration_id, result.peer_name, summary, wrap)

    def _join(
        self,
        conn: socket.socket,
        sess: _InboundSession,
        index: int,
        conn_id: int,
        dog: HandshakeWatchdog,
    ) -> None:
        if not sess.ready.wait(HANDSHAKE_TIMEOUT) or sess.failed or sess.target is None:
            raise ChannelError(f"stream {index} joined a session its migration did not claim")
        self.guard.authenticated(conn_id, sess.peer)
        self.guard.close(conn_id)
        dog.hand_over()
        assert sess.target.relay is not None
        conn.settimeout(None)
        sess.target.relay.add_stream(index, conn)
