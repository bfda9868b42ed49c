"""asyncio front door: run every accepted TCP connection through a :class:`Guard`.

The guard decides in ``connection_made``, before the socket is read even once: refused peers
are closed without reading a byte or starting TLS. Accepted connections are upgraded with
``loop.start_tls(server_side=True)`` under the handshake deadline, then handed to the
application handler as a reader/writer pair.

Byte counting is automatic: a small protocol wrapper reports every received plaintext chunk
and a writer wrapper every written one via ``Guard.on_bytes``; handlers need not report bytes.
A handler that starts bulk transfer calls ``guard.on_data_phase(conn_id)`` so the stall rule
applies. When the peer presented a TLS client certificate, its subject CN is passed to
``Guard.on_authenticated`` before the handler runs (a refused identity is closed); otherwise
the handler must authenticate the peer itself and call ``guard.on_authenticated`` before the
handshake deadline, or the sweeper drops the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from trustmig.guard.errors import GuardError
from trustmig.guard.guard import Guard
from trustmig.guard.ratelog import RateLimitedLog
from trustmig.timeouts import within

log = logging.getLogger(__name__)
rlog = RateLimitedLog(log)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]

#: How often the background task calls ``Guard.sweep``.
SWEEP_INTERVAL_S = 0.5


@dataclass
class _Conn:
    raw: asyncio.Transport
    transport: asyncio.BaseTransport | None = None
    task: asyncio.Task[None] | None = None


@dataclass
class _ServeState:
    guard: Guard
    conns: dict[int, _Conn] = field(default_factory=dict)
    sweeper: asyncio.Task[None] | None = None


_STATES: dict[int, _ServeState] = {}


class _CountingStreamProtocol(asyncio.StreamReaderProtocol):
    """StreamReaderProtocol that reports received plaintext bytes to the guard."""

    def __init__(self, reader: asyncio.StreamReader, guard: Guard, conn_id: int) -> None:
        super().__init__(reader)
        self._guard = guard
        self._conn_id = conn_id

    def data_received(self, data: bytes) -> None:
        self._guard.on_bytes(self._conn_id, n_in=len(data))
        super().data_received(data)


class _CountingWriter(asyncio.StreamWriter):
    """StreamWriter that reports written plaintext bytes to the guard."""

    def __init__(
        self,
        transport: asyncio.BaseTransport,
        protocol: asyncio.BaseProtocol,
        reader: asyncio.StreamReader,
        loop: asyncio.AbstractEventLoop,
        guard: Guard,
        conn_id: int,
    ) -> None:
        super().__init__(cast(asyncio.WriteTransport, transport), protocol, reader, loop)
        self._guard = guard
        self._conn_id = conn_id

    def write(self, data: Any) -> None:
        self._guard.on_bytes(self._conn_id, n_out=len(data))
        super().write(data)

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)


def _peer_identity(transport: asyncio.BaseTransport) -> str | None:
    """Subject CN of the verified client certificate, if one was presented."""
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class _GateProtocol(asyncio.Protocol):
    """Raw-socket protocol: asks the guard first, then pauses reading until TLS takes over."""

    def __init__(
        self,
        state: _ServeState,
        listener: str,
        handler: Handler,
        ssl_ctx: ssl.SSLContext | None,
        handshake_timeout: float,
        preadmitted: int | None = None,
    ) -> None:
        self._state = state
        self._listener = listener
        self._handler = handler
        self._ssl_ctx = ssl_ctx
        self._handshake_timeout = handshake_timeout
        self._conn_id: int | None = None
        self._preadmitted: int | None = preadmitted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self._preadmitted is not None:  # the accept loop already asked the guard
            self._adopt(transport, self._preadmitted)
            return
        peer = transport.get_extra_info("peername") or ("", 0)
        guard = self._state.guard
        verdict, conn_id = guard.on_connect(self._listener, str(peer[0]), int(peer[1]))
        if not verdict.accept or conn_id is None:
            rlog.log(
                logging.INFO,
                f"refused:{self._listener}:{verdict.rule}",
                "guard refused %s:%s on %s: %s",
                peer[0],
                peer[1],
                self._listener,
                verdict.reason,
            )
            transport.abort()
            return
        self._adopt(transport, conn_id)

    def _adopt(self, transport: asyncio.Transport, conn_id: int) -> None:
        transport.pause_reading()
        self._conn_id = conn_id
        conn = _Conn(raw=transport)
        self._state.conns[conn_id] = conn
        conn.task = asyncio.get_running_loop().create_task(self._run(conn, conn_id))

    def connection_lost(self, exc: Exception | None) -> None:
        # Only reached while the raw protocol is still installed (before the upgrade).
        if self._conn_id is not None:
            self._state.guard.on_close(self._conn_id)
            conn = self._state.conns.get(self._conn_id)
            if conn is not None and conn.task is not None and conn.transport is None:
                conn.task.cancel()

    def data_received(self, data: bytes) -> None:  # pragma: no cover - reading is paused
        pass

    async def _run(self, conn: _Conn, conn_id: int) -> None:
        guard = self._state.guard
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = _CountingStreamProtocol(reader, guard, conn_id)
        transport: asyncio.BaseTransport = conn.raw
        try:
            if self._ssl_ctx is not None:
                guard.on_handshake_progress(conn_id, "tls-started")
                tls = await within(
                    loop.start_tls(
                        conn.raw,
                        protocol,
                        self._ssl_ctx,
                        server_side=True,
                        ssl_handshake_timeout=self._handshake_timeout,
                    ),
                    self._handshake_timeout,
                )
                if tls is None:
                    raise ConnectionError("TLS upgrade returned no transport")
                transport = tls
                conn.transport = tls
                protocol.connection_made(tls)
                guard.on_handshake_progress(conn_id, "tls-done")
            else:
                conn.transport = conn.raw
                conn.raw.set_protocol(protocol)
                protocol.connection_made(conn.raw)
                conn.raw.resume_reading()
                guard.on_handshake_progress(conn_id, "tcp-ready")
            identity = _peer_identity(transport)
            if identity is not None:
                verdict = guard.on_authenticated(conn_id, identity)
                if not verdict.accept:
                    log.info("guard refused identity on %s: %s", self._listener, verdict.reason)
                    transport.abort()  # type: ignore[attr-defined]
                    return
            writer = _CountingWriter(transport, protocol, reader, loop, guard, conn_id)
            await self._handler(reader, writer, conn_id)
        except (TimeoutError, ssl.SSLError, ConnectionError, OSError) as exc:
            rlog.log(
                logging.INFO,
                f"failed:{self._listener}",
                "connection %d on %s failed: %s",
                conn_id,
                self._listener,
                exc,
            )
        except asyncio.CancelledError:
            pass
        finally:
            guard.on_close(conn_id)
            self._state.conns.pop(conn_id, None)
            closing = conn.transport or conn.raw
            if not closing.is_closing():
                closing.close()


class GuardedServer:
    """A listening socket whose accept loop asks the guard before asyncio sees a connection.

    A refused connection costs one ``accept`` and one ``close`` (with a reset): no transport,
    protocol or task is built for it, which matters when thousands arrive per second. The
    object offers the parts of ``asyncio.Server`` the agent uses (``sockets``, ``close``,
    ``is_serving``, ``wait_closed``).
    """

    #: Connections taken per readiness event before yielding to the event loop.
    ACCEPT_BATCH = 128

    def __init__(
        self,
        sock: socket.socket,
        state: _ServeState,
        listener: str,
        handler: Handler,
        ssl_ctx: ssl.SSLContext | None,
        handshake_timeout: float,
    ) -> None:
        self.sockets = [sock]
        self._sock = sock
        self._state = state
        self._listener = listener
        self._handler = handler
        self._ssl_ctx = ssl_ctx
        self._timeout = handshake_timeout
        self._loop = asyncio.get_running_loop()
        self._serving = True
        self._adopting: set[asyncio.Task[None]] = set()
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def is_serving(self) -> bool:
        return self._serving

    def _on_readable(self) -> None:
        guard = self._state.guard
        for _ in range(self.ACCEPT_BATCH):
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: back off instead of spinning on a ready socket
                rlog.log(logging.WARNING, f"accept:{self._listener}", "accept failed: %s", exc)
                self._loop.remove_reader(self._sock.fileno())
                self._loop.call_later(ACCEPT_BACKOFF_S, self._resume)
                return
            verdict, conn_id = guard.on_connect(self._listener, str(peer[0]), int(peer[1]))
            if not verdict.accept or conn_id is None:
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                conn.close()
                rlog.log(
                    logging.INFO, f"refused:{self._listener}:{verdict.rule}",
                    "guard refused %s:%s on %s: %s", peer[0], peer[1], self._listener,
                    verdict.reason,
                )  # fmt: skip
                continue
            conn.setblocking(False)
            task = self._loop.create_task(self._adopt(conn, conn_id))
            self._adopting.add(task)
            task.add_done_callback(self._adopting.discard)

    def _resume(self) -> None:
        if self._serving:
            self._loop.add_reader(self._sock.fileno(), self._on_readable)

    async def _adopt(self, conn: socket.socket, conn_id: int) -> None:
        try:
            await self._loop.connect_accepted_socket(
                lambda: _GateProtocol(self._state, self._listener, self._handler, self._ssl_ctx,
                                      self._timeout, preadmitted=conn_id),
                sock=conn,
            )  # fmt: skip
        except OSError:
            self._state.guard.on_close(conn_id)
            conn.close()

    def close(self) -> None:
        if self._serving:
            self._serving = False
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()

    async def wait_closed(self) -> None:
        for task in list(self._adopting):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


#: Pause of the accept loop after an accept error (e.g. out of file descriptors).
ACCEPT_BACKOFF_S = 1.0
#: SO_LINGER on, timeout 0: close() sends a reset instead of a FIN handshake.
_RESET = struct.pack("ii", 1, 0)


async def _sweep_forever(server: GuardedServer, state: _ServeState) -> None:
    """Periodically drop connections that broke a deadline and close their transports."""
    while server.is_serving() or state.conns:
        await asyncio.sleep(SWEEP_INTERVAL_S)
        for conn_id, reason in state.guard.sweep():
            conn = state.conns.get(conn_id)
            if conn is None:
                continue
            rlog.log(logging.INFO, "dropped", "guard dropped connection %d: %s", conn_id, reason)
            target = conn.transport or conn.raw
            target.abort()  # type: ignore[attr-defined]
            if conn.task is not None:
                conn.task.cancel()


async def guarded_serve(
    guard: Guard,
    listener_name: str,
    host: str,
    port: int,
    handler: Handler,
    *,
    ssl_ctx: ssl.SSLContext | None,
    handshake_timeout: float,
) -> GuardedServer:
    """Listen on ``host:port`` with every connection screened by ``guard``.

    ``handler(reader, writer, conn_id)`` runs per accepted connection. Stop with
    :func:`stop_guarded` (closes the server, the sweeper and open connections).
    """
    if not isinstance(guard, Guard):
        raise GuardError(f"guard must be a Guard, got {type(guard).__name__}")
    if not handshake_timeout > 0:
        raise GuardError(f"handshake_timeout is {handshake_timeout!r}; it must be > 0 seconds")
    state = _ServeState(guard=guard)
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=1024)
    sock.setblocking(False)
    server = GuardedServer(sock, state, listener_name, handler, ssl_ctx, handshake_timeout)
    state.sweeper = loop.create_task(_sweep_forever(server, state))
    _STATES[id(server)] = state
    return server


async def stop_guarded(server: GuardedServer) -> None:
    """Close a server from :func:`guarded_serve`, its sweeper and all its connections."""
    state = _STATES.pop(id(server), None)
    server.close()
    # connections still being adopted join ``state.conns`` when that finishes: wait for them
    # first, or their handlers would outlive the server (and its event loop)
    await server.wait_closed()
    if state is None:
        return
    tasks = []
    for conn in list(state.conns.values()):
        (conn.transport or conn.raw).abort()  # type: ignore[attr-defined]
        if conn.task is not None:
            conn.task.cancel()
            tasks.append(conn.task)
    if state.sweeper is not None:
        state.sweeper.cancel()
        tasks.append(state.sweeper)
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
