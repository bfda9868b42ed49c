"""QEMU's native TLS for a migration (``--channel qemu-tls``), with the cluster's credentials.

For operators who want QEMU itself to encrypt: both QEMUs get a ``tls-creds-x509`` object built
from the host's CA-issued certificate. The source checks that the destination's certificate
names the destination host (``tls-hostname``); the destination requires a client certificate
(``verify-peer``) and only accepts the source host's (``tls-authz`` with an ``authz-simple``
object naming its distinguished name). The host key exists on disk only while QEMU loads it,
and in QEMU only until the migration ends (``disable``). The trustmig handshake with attestation
still runs first, so a destination is verified before QEMU opens its connection.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cryptography import x509

from trustmig.pki.qemu_tls import qemu_file_names, write_qemu_tls_dir

if TYPE_CHECKING:
    from trustmig.hypervisor.qemu import QemuVM
    from trustmig.pki.authority import Credentials

TLS_ID = "tm-tls0"
AUTHZ_ID = "tm-authz0"


def distinguished_name(cert_der: bytes) -> str:
    """The subject DN as QEMU's gnutls prints it for ``authz-simple``: RFC 4514 escaping, but
    the RDNs in certificate order (``OU=trustmig-host,CN=host-a``), not RFC 4514's reversed one."""
    subject = x509.load_der_x509_certificate(cert_der).subject
    return ",".join(rdn.rfc4514_string() for rdn in subject.rdns)


async def enable(
    creds: Credentials,
    host_key_pem: bytes,
    vm: QemuVM,
    endpoint: Literal["server", "client"],
    *,
    peer_host: str,
    peer_cert_der: bytes | None = None,
) -> None:
    """Give ``vm`` TLS credentials and make its migration use them (peer pinned)."""
    tls_dir = Path(vm.run_dir) / "qemu-tls"
    write_qemu_tls_dir(None, creds, tls_dir, endpoint=endpoint, key_pem=host_key_pem)
    key_file = tls_dir / qemu_file_names(endpoint)[1]
    args: dict[str, object] = {"qom-type": "tls-creds-x509", "id": TLS_ID,
                               "dir": str(tls_dir.resolve()), "endpoint": endpoint}  # fmt: skip
    if endpoint == "server":
        args["verify-peer"] = True
    for stale in (AUTHZ_ID, TLS_ID):  # left by an earlier, failed attempt on this QEMU
        with contextlib.suppress(Exception):
            await vm.cmd("object-del", {"id": stale})
    try:
        await vm.cmd("object-add", args)  # QEMU reads the files now
    finally:
        with contextlib.suppress(OSError):
            key_file.write_bytes(os.urandom(key_file.stat().st_size))
        key_file.unlink(missing_ok=True)
    params: dict[str, object] = {"tls-creds": TLS_ID}
    if endpoint == "client":
        params["tls-hostname"] = peer_host
    else:
        if peer_cert_der is None:
            raise ValueError("the TLS server side needs the source's certificate to pin it")
        await vm.cmd("object-add", {"qom-type": "authz-simple", "id": AUTHZ_ID,
                                    "identity": distinguished_name(peer_cert_der)})  # fmt: skip
        params["tls-authz"] = AUTHZ_ID
    await vm.cmd("migrate-set-parameters", params)


async def disable(vm: QemuVM) -> None:
    """Drop the TLS objects once the migration is over, so a running guest's QEMU no longer
    holds the host key (best effort: a QEMU that already exited holds nothing)."""
    with contextlib.suppress(Exception):
        await vm.cmd("migrate-set-parameters", {"tls-creds": "", "tls-authz": ""})
    for obj in (AUTHZ_ID, TLS_ID):
        with contextlib.suppress(Exception):
            await vm.cmd("object-del", {"id": obj})
