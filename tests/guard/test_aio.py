"""guarded_serve on loopback with real sockets and a real TLS 1.3 server (self-signed certs)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from trustmig.guard import ConnState, Guard, GuardRules
from trustmig.guard.aio import guarded_serve, stop_guarded

from .tls_helpers import self_signed

pytestmark = pytest.mark.timeout(60)


@pytest.fixture()
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context requiring a client cert, client context presenting CN=host-b)."""
    s_cert, s_key = self_signed(tmp_path, "host-a")
    c_cert, c_key = self_signed(tmp_path, "host-b")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(s_cert, s_key)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(c_cert)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(s_cert)
    client.load_cert_chain(c_cert, c_key)
    client.check_hostname = False
    return server, client


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def serve(
    guard: Guard, handler: Handler, ssl_ctx: ssl.SSLContext | None, handshake_timeout: float = 5.0
) -> tuple[asyncio.Server, int]:
    server = await guarded_serve(
        guard,
        "control",
        "127.0.0.1",
        0,
        handler,
        ssl_ctx=ssl_ctx,
        handshake_timeout=handshake_timeout,
    )
    return server, server.sockets[0].getsockname()[1]


def test_refuses_non_allowed_network_before_tls(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, client_ctx = tls
    guard = Guard(GuardRules(allowed_networks=["10.0.0.0/8"]))
    called: list[int] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, cid: int) -> None:
        called.append(cid)

    async def scenario() -> tuple[bytes, str]:
        server, port = await serve(guard, handler, server_ctx)
        try:
            # a raw TCP client gets a reset (or EOF) and zero bytes: no ServerHello was produced
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                raw = await asyncio.wait_for(reader.read(100), 10)
                writer.close()
            except ConnectionResetError:
                raw = b""
            # a TLS client cannot complete a handshake
            try:
                await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, ssl=client_ctx), 10
                )
                outcome = "connected"
            except (ssl.SSLError, ConnectionError, OSError) as exc:
                outcome = type(exc).__name__
            return raw, outcome
        finally:
            await stop_guarded(server)

    raw, outcome = asyncio.run(scenario())
    assert raw == b""
    assert outcome != "connected"
    assert called == []
    assert guard.counters() == {"network": 2}
    assert guard.snapshot()["connections"] == []


def test_accepts_mutual_tls_client_and_counts_bytes(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, client_ctx = tls
    guard = Guard(GuardRules(allowed_identities=["host-b"]))
    seen: dict[str, object] = {}

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, cid: int) -> None:
        rec = guard.get(cid)
        seen["state"], seen["identity"] = rec.state, rec.identity
        data = await r.readexactly(4)
        w.write(b"pong:" + data)
        await w.drain()
        await r.read()  # until the client closes
        w.close()

    async def scenario() -> bytes:
        server, port = await serve(guard, handler, server_ctx)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
            writer.write(b"ping")
            await writer.drain()
            reply = await asyncio.wait_for(reader.readexactly(9), 10)
            writer.close()
            for _ in range(200):  # wait until the server side has seen the close
                if guard.snapshot()["summary"]["live"] == 0:
                    break
                await asyncio.sleep(0.02)
            return reply
        finally:
            await stop_guarded(server)

    assert asyncio.run(scenario()) == b"pong:ping"
    assert seen == {"state": ConnState.ESTABLISHED, "identity": "host-b"}
    (conn,) = guard.snapshot()["connections"]
    assert conn["state"] == "closed"
    assert (conn["bytes_in"], conn["bytes_out"]) == (4, 9)
    assert conn["identity"] == "host-b"


def test_refuses_identity_outside_allow_list(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, client_ctx = tls
    guard = Guard(GuardRules(allowed_identities=["host-c"]))
    called: list[int] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, cid: int) -> None:
        called.append(cid)

    async def scenario() -> bytes:
        server, port = await serve(guard, handler, server_ctx)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
            try:
                data = await asyncio.wait_for(reader.read(100), 10)
            except (ssl.SSLError, ConnectionError):
                data = b""
            writer.close()
            return data
        finally:
            await stop_guarded(server)

    assert asyncio.run(scenario()) == b""
    assert called == []
    assert guard.counters()["identity"] == 1
    assert guard.snapshot()["connections"][0]["state"] == "dropped"


def test_sweeper_drops_connection_that_never_authenticates() -> None:
    guard = Guard(GuardRules(handshake_deadline_s=0.3))

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, cid: int) -> None:
        await r.read()  # never calls guard.on_authenticated

    async def scenario() -> bytes:
        server, port = await serve(guard, handler, None)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                data = await asyncio.wait_for(reader.read(100), 10)
            except ConnectionError:
                data = b""
            writer.close()
            return data
        finally:
            await stop_guarded(server)

    assert asyncio.run(scenario()) == b""
    assert guard.counters()["handshake_deadline"] == 1
    (conn,) = guard.snapshot()["connections"]
    assert conn["state"] == "dropped"
    assert conn["handshake_progress"] == "tcp-ready"
