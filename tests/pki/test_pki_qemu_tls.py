"""QEMU's tls-creds-x509 reads credentials from the cluster CA.

The layout test only checks file names; the QEMU tests start a real ``qemu-system-x86_64``
(``-machine none``: no guest is booted) listening for an incoming migration over TLS and
connect to it with cluster credentials, so GnuTLS itself judges the certificates and the CRL.
"""

from __future__ import annotations

import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pki_helpers import bundle_for
from qemu.qmp.legacy import QEMUMonitorProtocol

from trustmig.pki import (
    ClusterCA,
    Credentials,
    InvalidInput,
    client_context,
    peer_identity,
    write_qemu_tls_dir,
)

QEMU = shutil.which("qemu-system-x86_64")
STATUS_WAIT_S = 20.0


def test_server_and_client_layout(ca: ClusterCA, host_a: Credentials, tmp_path: Path) -> None:
    server_dir = write_qemu_tls_dir(ca, host_a, tmp_path / "qemu-server", endpoint="server")
    assert sorted(p.name for p in server_dir.iterdir()) == [
        "ca-cert.pem",
        "ca-crl.pem",
        "server-cert.pem",
        "server-key.pem",
    ]
    assert (server_dir / "server-cert.pem").read_bytes() == host_a.cert_path.read_bytes()
    assert (server_dir / "server-key.pem").read_bytes() == host_a.key_path.read_bytes()
    assert (server_dir / "ca-cert.pem").read_bytes() == ca.ca_path.read_bytes()
    assert stat.S_IMODE((server_dir / "server-key.pem").stat().st_mode) == 0o600

    client_dir = write_qemu_tls_dir(None, host_a, tmp_path / "qemu-client", endpoint="client")
    assert sorted(p.name for p in client_dir.iterdir()) == [
        "ca-cert.pem",
        "ca-crl.pem",
        "client-cert.pem",
        "client-key.pem",
    ]
    assert (client_dir / "ca-cert.pem").read_bytes() == host_a.ca_path.read_bytes()
    with pytest.raises(InvalidInput, match="endpoint 'both'"):
        write_qemu_tls_dir(ca, host_a, tmp_path / "x", endpoint="both")  # type: ignore[arg-type]


@contextmanager
def qemu_tls_listener(tls_dir: Path, workdir: Path) -> Iterator[tuple[QEMUMonitorProtocol, int]]:
    """A QEMU waiting for an incoming migration over TLS on 127.0.0.1; killed on exit."""
    qmp_path = str(workdir / "qmp.sock")
    qmp = QEMUMonitorProtocol(qmp_path, server=True)
    assert QEMU is not None
    proc = subprocess.Popen(
        [
            QEMU,
            "-machine", "none",
            "-nodefaults",
            "-display", "none",
            "-incoming", "defer",
            "-object",
            f"tls-creds-x509,id=tls0,dir={tls_dir.resolve()},endpoint=server,verify-peer=on",
            "-qmp", f"unix:{qmp_path}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "qemu.stderr", "wb"),  # noqa: SIM115 - closed with the process
    )  # fmt: skip
    try:
        qmp.accept(timeout=30)
        _qmp(qmp, "migrate-set-parameters", {"tls-creds": "tls0"})
        _qmp(qmp, "migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        info = _qmp(qmp, "query-migrate")
        yield qmp, int(info["socket-address"][0]["port"])
    finally:
        qmp.close()
        proc.kill()
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()


def _qmp(qmp: QEMUMonitorProtocol, name: str, args: dict[str, Any] | None = None) -> Any:
    reply = qmp.cmd_raw(name, args)
    assert "error" not in reply, f"QMP {name} failed: {reply['error']}"
    return reply["return"]


def _wait_status(qmp: QEMUMonitorProtocol, wanted: str) -> str | None:
    """Poll query-migrate until ``wanted`` shows up or the deadline passes; return last status."""
    deadline = time.monotonic() + STATUS_WAIT_S
    status = None
    while time.monotonic() < deadline:
        status = _qmp(qmp, "query-migrate").get("status")
        if status == wanted:
            break
        time.sleep(0.1)
    return status


pytestmark_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")


@pytestmark_qemu
@pytest.mark.vm
def test_qemu_accepts_cluster_host_certificates(
    ca: ClusterCA, host_a: Credentials, host_b: Credentials, tmp_path: Path
) -> None:
    tls_dir = write_qemu_tls_dir(ca, host_a, tmp_path / "qemu-a", endpoint="server")
    bundle = bundle_for(host_b)
    with qemu_tls_listener(tls_dir, tmp_path) as (qmp, port):
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        with client_context(host_b, bundle).wrap_socket(raw) as tls:
            assert tls.version() == "TLSv1.3"
            who = peer_identity(tls, bundle, kind="host", expect_name="host-a")
            assert who.name == "host-a"
            # QEMU verified host-b's certificate and started reading the migration stream.
            assert _wait_status(qmp, "active") == "active"


@pytestmark_qemu
@pytest.mark.vm
def test_qemu_refuses_revoked_client(
    ca: ClusterCA, host_a: Credentials, host_b: Credentials, tmp_path: Path
) -> None:
    ca.revoke("host-b", "host")
    tls_dir = write_qemu_tls_dir(ca, host_a, tmp_path / "qemu-a", endpoint="server")
    # The client does not know it is revoked: it trusts the CA without the CRL.
    bundle = bundle_for(host_b)
    with qemu_tls_listener(tls_dir, tmp_path) as (qmp, port):
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        with client_context(host_b, bundle).wrap_socket(raw) as tls:
            assert tls.version() == "TLSv1.3"
            assert tls.recv(16) == b""  # QEMU hung up after checking our certificate
        assert _qmp(qmp, "query-migrate").get("status") != "active"
    assert "revoked" in (tmp_path / "qemu.stderr").read_text()


def test_pinned_identity_is_the_dn_as_qemu_prints_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from trustmig.agent.qemu_tls import distinguished_name
    from trustmig.pki.authority import ClusterCA

    ca = ClusterCA.init(tmp_path / "ca")
    creds = ca.issue_host("host-a", tmp_path / "a")
    # QEMU 7.2 / gnutls log "TLS x509 authz check for OU=trustmig-host,CN=host-a is denied"
    assert distinguished_name(creds.cert_der()) == "OU=trustmig-host,CN=host-a"
