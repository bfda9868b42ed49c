"""A connection the peer's guard drops before TLS is marked ``reset`` (worth another try); an
agent that is not listening is not."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct

import pytest

from trustmig.agent.client import ControlClient, ControlError


def _ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_a_dropped_connection_is_marked_reset_and_a_closed_port_is_not() -> None:
    async def go() -> tuple[ControlError, ControlError]:
        async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # RST, as the guard's refusal

        server = await asyncio.start_server(drop, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ControlError) as dropped:
            await ControlClient.connect(f"127.0.0.1:{port}", _ctx(), timeout=5)
        server.close()
        await server.wait_closed()
        with pytest.raises(ControlError) as closed:
            await ControlClient.connect(f"127.0.0.1:{port}", _ctx(), timeout=5)
        return dropped.value, closed.value

    dropped, closed = asyncio.run(go())
    assert dropped.reset and dropped.code == "transport"
    assert not closed.reset and closed.code == "transport"
