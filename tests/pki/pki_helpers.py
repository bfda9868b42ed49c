"""Helpers for the PKI tests: real TLS handshakes over loopback sockets."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from trustmig.pki import Credentials, PeerIdentity, TrustBundle, peer_identity

IO_TIMEOUT_S = 10.0


def bundle_for(creds: Credentials) -> TrustBundle:
    return TrustBundle.load(creds.ca_path, creds.crl_path)


@dataclass
class Side:
    """What one end of a handshake observed."""

    error: BaseException | None = None
    identity: PeerIdentity | None = None
    version: str | None = None
    received: bytes = b""
    notes: list[str] = field(default_factory=list)


@dataclass
class Handshake:
    server: Side
    client: Side


def run_handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    server_check: Callable[[ssl.SSLSocket], PeerIdentity] | None = None,
    client_check: Callable[[ssl.SSLSocket], PeerIdentity] | None = None,
) -> Handshake:
    """Run one TLS connection over 127.0.0.1 and report what each side saw.

    The server verifies the peer (``server_check``) and answers ``ok``; the client verifies the
    server (``client_check``) and reads that answer. Every socket is closed on every path.
    """
    server, client = Side(), Side()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(IO_TIMEOUT_S)
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError as exc:
            server.error = exc
            return
        conn.settimeout(IO_TIMEOUT_S)
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                server.version = tls.version()
                if server_check is not None:
                    server.identity = server_check(tls)
                tls.sendall(b"ok")
        except Exception as exc:
            server.error = exc
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
        try:
            with client_ctx.wrap_socket(raw) as tls:
                client.version = tls.version()
                if client_check is not None:
                    client.identity = client_check(tls)
                client.received = tls.recv(16)
        except Exception as exc:
            client.error = exc
        finally:
            raw.close()
    finally:
        thread.join(IO_TIMEOUT_S)
        listener.close()
    assert not thread.is_alive(), "server thread did not finish"
    return Handshake(server=server, client=client)


def checker(
    bundle: TrustBundle, *, kind: str | None = None, expect_name: str | None = None
) -> Callable[[ssl.SSLSocket], PeerIdentity]:
    def check(tls: ssl.SSLSocket) -> PeerIdentity:
        return peer_identity(tls, bundle, kind=kind, expect_name=expect_name)  # type: ignore[arg-type]

    return check
