"""Remote attestation in real migrations: a rogue destination never receives guest memory."""

from __future__ import annotations

import shutil
import signal

import pytest

from trustmig.agent.local_cluster import free_port
from trustmig.lab.proxy import MitmProxy, Sniffer

from .helpers import arun, assert_absent, assert_running_and_beating, spec, start_vm

pytestmark = [pytest.mark.vm, pytest.mark.tpm]


def test_destination_with_unknown_qemu_is_refused_before_any_memory(make_cluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rogue = tmp_path / "qemu-system-x86_64"
    real = shutil.which("qemu-system-x86_64")
    rogue.write_text(f'#!/bin/sh\n# hypervisor build 1\nexec {real} "$@"\n')
    rogue.chmod(0o755)
    port = free_port()
    sniff = Sniffer(b"\x00unused")
    with MitmProxy(("127.0.0.1", port), sniff) as proxy:
        cluster = make_cluster
        # provisioned with the genuine binary's digest; the host then runs a modified one
        c = cluster(
            data_listen={"host-b": f"127.0.0.1:{port}"},
            data_advertise={"host-b": proxy.hostport},
            qemu_binary={"host-b": str(rogue)},
            defer_start=True,
        )
        with rogue.open("a") as f:
            f.write("# patched after approval\n")
        c.start_agents()

        async def go():  # type: ignore[no-untyped-def]
            a = await c.client("host-a", "alice")
            b = await c.client("host-b", "alice")
            try:
                await start_vm(a, spec(), c)
                with pytest.raises(Exception) as ei:
                    await a.call("migrate", {"vm": "vm1", "to": "host-b", "options": {}})
                await assert_running_and_beating(a, "vm1")
                await assert_absent(b, "vm1")
                st = await a.call("host.status")
                return str(ei.value), st
            finally:
                await a.close()
                await b.close()

        err, st = arun(go())
    assert "qemu-binary" in err, err
    # only handshake messages crossed the wire: no record of guest memory
    assert sniff.bytes_seen < 64 * 1024, sniff.bytes_seen
    att = st["attestation"]
    assert att is not None


def test_host_identity_key_is_sealed_and_lost_to_changed_software(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster(hosts=("host-a",))
    hh = c.hosts["host-a"]
    plain = hh.dir / "pki" / "host.key"
    sealed = list(hh.dir.rglob("host-identity.sealed"))
    # adopted at first start: sealed in the TPM, escrowed to the CA, no plaintext left
    assert not plain.exists()
    assert len(sealed) == 1 and sealed[0].with_suffix(".recovery").exists()

    async def ping() -> str:
        cl = await c.client("host-a", "alice")
        try:
            return str((await cl.call("ping"))["host"])
        finally:
            await cl.close()

    c.kill_agent("host-a", signal.SIGTERM)
    c.start_agent("host-a")  # unseals the key again in the same measured state
    assert arun(ping()) == "host-a"  # the TLS server authenticates with the unsealed key
    c.kill_agent("host-a", signal.SIGTERM)
    # a trust-relevant setting changed after approval (a comment or a port would not count)
    text = hh.config_path.read_text()
    assert 'country = "DE"' in text
    hh.config_path.write_text(text.replace('country = "DE"', 'country = "XX"', 1))
    with pytest.raises(RuntimeError) as ei:
        c.start_agent("host-a", timeout=60)
    assert "unseal refused" in str(ei.value), str(ei.value)
