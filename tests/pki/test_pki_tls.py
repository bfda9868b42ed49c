"""Real TLS 1.3 handshakes with mutual certificate authentication over loopback."""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pki_helpers import bundle_for, checker, run_handshake

from trustmig.pki import (
    ClusterCA,
    Credentials,
    PeerRejected,
    client_context,
    peer_identity,
    server_context,
)


def test_mutual_auth_names_both_peers_over_tls13(host_a: Credentials, host_b: Credentials) -> None:
    server_bundle, client_bundle = bundle_for(host_a), bundle_for(host_b)
    result = run_handshake(
        server_context(host_a, server_bundle),
        client_context(host_b, client_bundle),
        server_check=checker(server_bundle, kind="host", expect_name="host-b"),
        client_check=checker(client_bundle, kind="host", expect_name="host-a"),
    )
    assert result.server.error is None and result.client.error is None
    assert result.server.version == "TLSv1.3"
    assert result.client.version == "TLSv1.3"
    assert result.server.identity is not None and result.server.identity.name == "host-b"
    assert result.server.identity.kind == "host"
    assert result.server.identity.fingerprint == _sha256(host_b.cert_der())
    assert result.client.identity is not None and result.client.identity.name == "host-a"
    assert result.client.received == b"ok"


def test_contexts_refuse_older_tls_versions(host_a: Credentials) -> None:
    bundle = bundle_for(host_a)
    for ctx in (server_context(host_a, bundle), client_context(host_a, bundle)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED


def test_user_certificate_carries_roles_through_handshake(
    ca: ClusterCA, host_a: Credentials, tmp_path: Path
) -> None:
    alice = ca.issue_user(
        "alice", tmp_path / "alice", roles=["security-admin", "owner"], tenant="blue"
    )
    bundle = bundle_for(host_a)
    result = run_handshake(
        server_context(host_a, bundle),
        client_context(alice, bundle_for(alice)),
        server_check=checker(bundle, kind="user"),
    )
    assert result.server.error is None
    who = result.server.identity
    assert who is not None
    assert (who.kind, who.name, who.roles, who.tenant) == (
        "user",
        "alice",
        ("owner", "security-admin"),
        "blue",
    )
    assert result.client.received == b"ok"


def test_client_from_another_ca_is_refused(host_a: Credentials, tmp_path: Path) -> None:
    other_ca = ClusterCA.init(tmp_path / "other-ca")
    intruder = other_ca.issue_host("host-b", tmp_path / "intruder")
    bundle = bundle_for(host_a)
    result = run_handshake(
        server_context(host_a, bundle),
        # The intruder trusts our CA so that only the server's check can stop it.
        client_context(intruder, bundle_for(host_a)),
        server_check=checker(bundle, kind="host"),
    )
    assert isinstance(result.server.error, ssl.SSLCertVerificationError)
    assert result.server.identity is None
    assert result.client.received == b""
    with pytest.raises(PeerRejected, match="not issued by this cluster's CA"):
        bundle.verify(intruder.cert_der(), kind="host")


def test_server_from_another_ca_is_refused(host_b: Credentials, tmp_path: Path) -> None:
    other_ca = ClusterCA.init(tmp_path / "other-ca")
    fake_a = other_ca.issue_host("host-a", tmp_path / "fake-a")
    result = run_handshake(
        server_context(fake_a, bundle_for(host_b)),
        client_context(host_b, bundle_for(host_b)),
    )
    assert isinstance(result.client.error, ssl.SSLCertVerificationError)
    assert result.client.received == b""


def test_expired_certificate_is_refused(ca: ClusterCA, host_a: Credentials, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    stale = ca.issue_host(
        "host-b",
        tmp_path / "stale",
        _not_before=now - timedelta(days=10),
        _not_after=now - timedelta(days=1),
    )
    bundle = bundle_for(host_a)
    result = run_handshake(
        server_context(host_a, bundle),
        client_context(stale, bundle_for(stale)),
        server_check=checker(bundle, kind="host"),
    )
    assert isinstance(result.server.error, ssl.SSLCertVerificationError)
    assert "expired" in result.server.error.verify_message
    assert result.client.received == b""
    with pytest.raises(PeerRejected, match=r"certificate for 'host-b' expired on \d{4}-"):
        bundle.verify(stale.cert_der())


def test_revoked_host_is_refused_by_a_context_built_before_revocation(
    ca: ClusterCA, host_a: Credentials, host_b: Credentials
) -> None:
    bundle = bundle_for(host_a)
    server_ctx = server_context(host_a, bundle)
    client_ctx = client_context(host_b, bundle_for(host_b))
    before = run_handshake(server_ctx, client_ctx, server_check=checker(bundle, kind="host"))
    assert before.server.error is None and before.client.received == b"ok"

    serials = ca.revoke("host-b", "host")
    assert serials == [host_b.load_cert().serial_number]
    # Distribute the new CRL to host-a, as an operator or the agent would.
    host_a.crl_path.write_bytes(ca.crl_path.read_bytes())
    bundle.refresh()

    after = run_handshake(server_ctx, client_ctx, server_check=checker(bundle, kind="host"))
    assert isinstance(after.server.error, ssl.SSLCertVerificationError)
    assert "revoked" in after.server.error.verify_message
    assert after.client.received == b""
    with pytest.raises(PeerRejected) as info:
        bundle.verify_host(host_b.cert_der(), "host-b")
    assert str(info.value) == f"certificate for 'host-b' is revoked (serial {hex(serials[0])})"


def test_revocation_seen_by_peer_identity_without_context_crl(
    ca: ClusterCA, host_a: Credentials, host_b: Credentials
) -> None:
    """A new CRL on disk is honoured after the handshake even before any explicit refresh."""
    bundle = bundle_for(host_a)
    server_ctx = server_context(host_a, bundle)
    ca.revoke("host-b", "host")
    host_a.crl_path.write_bytes(ca.crl_path.read_bytes())
    # The context still holds the old CRL: OpenSSL lets host-b in, peer_identity must not.
    result = run_handshake(
        server_ctx,
        client_context(host_b, bundle_for(host_b)),
        server_check=checker(bundle, kind="host", expect_name="host-b"),
    )
    assert isinstance(result.server.error, PeerRejected)
    assert "is revoked" in str(result.server.error)
    assert result.client.received == b""


def test_peer_with_wrong_name_is_rejected_naming_both(
    ca: ClusterCA, host_a: Credentials, tmp_path: Path
) -> None:
    host_c = ca.issue_host("host-c", tmp_path / "host-c")
    bundle = bundle_for(host_a)
    result = run_handshake(
        server_context(host_a, bundle),
        client_context(host_c, bundle_for(host_c)),
        server_check=checker(bundle, kind="host", expect_name="host-b"),
    )
    assert result.server.version == "TLSv1.3"
    assert isinstance(result.server.error, PeerRejected)
    assert str(result.server.error) == (
        "peer presented certificate of 'host-c' but 'host-b' was expected"
    )
    assert result.client.received == b""


def test_user_certificate_cannot_pose_as_host(
    ca: ClusterCA, host_a: Credentials, tmp_path: Path
) -> None:
    bob = ca.issue_user("host-b", tmp_path / "bob", roles=["operator"])
    bundle = bundle_for(host_a)
    result = run_handshake(
        server_context(host_a, bundle),
        client_context(bob, bundle_for(bob)),
        server_check=checker(bundle, kind="host", expect_name="host-b"),
    )
    assert isinstance(result.server.error, PeerRejected)
    assert "user certificate but a host certificate was expected" in str(result.server.error)


def test_user_certificate_cannot_serve(ca: ClusterCA, host_b: Credentials, tmp_path: Path) -> None:
    """User certificates lack serverAuth, so OpenSSL itself refuses them as a server."""
    carol = ca.issue_user("carol", tmp_path / "carol", roles=["owner"])
    result = run_handshake(
        server_context(carol, bundle_for(carol)),
        client_context(host_b, bundle_for(host_b)),
    )
    assert isinstance(result.client.error, ssl.SSLCertVerificationError)
    assert "purpose" in result.client.error.verify_message


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_successive_revocations_all_reach_a_long_lived_context(
    ca: ClusterCA, host_a: Credentials, host_b: Credentials, tmp_path: Path
) -> None:
    """Two CRLs signed back to back: OpenSSL must use the newest one, which lists both."""
    host_c = ca.issue_host("host-c", tmp_path / "host-c")
    bundle = bundle_for(host_a)
    server_ctx = server_context(host_a, bundle)
    for name in ("host-b", "host-c"):
        ca.revoke(name, "host")
        host_a.crl_path.write_bytes(ca.crl_path.read_bytes())
        bundle.refresh()
    for peer in (host_b, host_c):
        result = run_handshake(server_ctx, client_context(peer, bundle_for(peer)))
        assert isinstance(result.server.error, ssl.SSLCertVerificationError)
        assert "revoked" in result.server.error.verify_message


def test_asyncio_streams_expose_peer_identity(host_a: Credentials, host_b: Credentials) -> None:
    """The agent runs on asyncio: peer_identity works on the SSLObject of a stream."""
    server_bundle, client_bundle = bundle_for(host_a), bundle_for(host_b)
    seen: list[str] = []

    async def main() -> tuple[str, bytes]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sslobj = writer.get_extra_info("ssl_object")
            seen.append(sslobj.version())
            who = peer_identity(sslobj, server_bundle, kind="host", expect_name="host-b")
            writer.write(who.name.encode())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(
            handle, "127.0.0.1", 0, ssl=server_context(host_a, server_bundle)
        )
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(host_b, client_bundle)
            )
            who = peer_identity(
                writer.get_extra_info("ssl_object"), client_bundle, expect_name="host-a"
            )
            data = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return who.name, data
        finally:
            server.close()
            await server.wait_closed()

    name, data = asyncio.run(main())
    assert (name, data) == ("host-a", b"host-b")
    assert seen == ["TLSv1.3"]
