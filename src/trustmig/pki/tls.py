"""TLS 1.3 contexts with mutual certificate authentication for all control traffic.

Both sides present a certificate from the cluster CA and OpenSSL checks chain and CRL during the
handshake. Host names are *not* checked by OpenSSL (``check_hostname`` is off): a connection is
addressed to a trustmig host name, not to a DNS name, and :func:`peer_identity` checks that name
right after the handshake together with kind, roles and the newest CRL.
"""

from __future__ import annotations

import ssl

from trustmig.pki.authority import Credentials
from trustmig.pki.errors import CaStoreError, PeerRejected
from trustmig.pki.identity import Kind, PeerIdentity
from trustmig.pki.trust import TrustBundle


def server_context(creds: Credentials, bundle: TrustBundle) -> ssl.SSLContext:
    """Context for a listener: TLS 1.3 only, client certificate required, no resumption."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(ctx, creds, bundle)
    # No session tickets: every connection runs a full handshake with a certificate, so a
    # revocation takes effect on the next connection.
    ctx.num_tickets = 0
    return ctx


def client_context(creds: Credentials, bundle: TrustBundle) -> ssl.SSLContext:
    """Context for outgoing connections: TLS 1.3 only, server certificate required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    _configure(ctx, creds, bundle)
    return ctx


def peer_identity(
    sslobj: ssl.SSLObject | ssl.SSLSocket,
    bundle: TrustBundle,
    *,
    kind: Kind | None = None,
    expect_name: str | None = None,
) -> PeerIdentity:
    """Verify the certificate the peer presented in a completed handshake."""
    version = sslobj.version()
    if version is None:
        raise PeerRejected("TLS handshake has not completed: call do_handshake() first")
    if version != "TLSv1.3":
        raise PeerRejected(f"peer negotiated {version}: trustmig requires TLSv1.3")
    der = sslobj.getpeercert(binary_form=True)
    if not der:
        raise PeerRejected("peer presented no certificate: configure its cluster credentials")
    return bundle.verify(der, kind=kind, expect_name=expect_name)


def _configure(ctx: ssl.SSLContext, creds: Credentials, bundle: TrustBundle) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(str(creds.cert_path), str(creds.key_path))
    except (OSError, ssl.SSLError) as exc:
        raise CaStoreError(
            f"cannot load credentials {creds.cert_path} / {creds.key_path} ({exc}): "
            "check that both files exist and belong together"
        ) from None
    bundle.attach(ctx)
