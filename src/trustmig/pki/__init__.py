"""Cluster PKI: one CA issues host identities and user credentials for mutual TLS 1.3.

Typical use::

    ca = ClusterCA.init(Path("/etc/trustmig/ca"))
    creds = ca.issue_host("host-a", Path("/etc/trustmig/host"))
    bundle = TrustBundle.load(creds.ca_path, creds.crl_path)
    ctx = server_context(creds, bundle)
    ...
    who = peer_identity(tls_socket, bundle, kind="host", expect_name="host-b")
"""

from trustmig.pki.authority import ClusterCA, Credentials
from trustmig.pki.errors import BadSignature, CaStoreError, InvalidInput, PeerRejected, PkiError
from trustmig.pki.identity import ROLES, PeerIdentity
from trustmig.pki.qemu_tls import write_qemu_tls_dir
from trustmig.pki.tls import client_context, peer_identity, server_context
from trustmig.pki.trust import TrustBundle

__all__ = [
    "ROLES",
    "BadSignature",
    "CaStoreError",
    "ClusterCA",
    "Credentials",
    "InvalidInput",
    "PeerIdentity",
    "PeerRejected",
    "PkiError",
    "TrustBundle",
    "client_context",
    "peer_identity",
    "server_context",
    "write_qemu_tls_dir",
]
