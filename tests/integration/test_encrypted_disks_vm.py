"""Disks encrypted at rest: keys made and sealed by trustmig, opened by QEMU from an inherited
pipe, released to a destination only inside the attested session, gone from a host the VM left."""

from __future__ import annotations

import base64
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from trustmig.agent.attestation import decrypt_recovery
from trustmig.agent.diskkeys import key_name
from trustmig.agent.local_cluster import LocalCluster
from trustmig.hypervisor.debian import (
    DebianImage,
    build_debian_image,
    create_overlay,
    debian_definition,
    guest_ssh,
    wait_for_ssh,
)

from .helpers import (
    arun,
    assert_running_and_beating,
    incoming_pids,
    migrate_with_hook,
    start_vm,
)

pytestmark = [pytest.mark.vm, pytest.mark.tpm]

SSH_PORT = 2222
MARKER = b"TRUSTMIG-AT-REST-MARKER-5d1e"
SECRET_MIB = 64


@pytest.fixture(scope="session")
def debian_image() -> DebianImage:
    return build_debian_image()


def _ssh(cluster: LocalCluster, host: str, image: DebianImage, cmd: str) -> str:
    res = guest_ssh(image, cluster.forward_address(host), SSH_PORT, cmd, timeout=120)
    assert res.ok, f"ssh on {host}: {res.stderr}"
    return res.stdout.strip()


async def _disk_key_events(cluster: LocalCluster, host: str) -> list[dict[str, Any]]:
    s = await cluster.client(host, "sam")
    try:
        events = (await s.call("audit.show", {"limit": 1000}))["events"]
    finally:
        await s.close()
    return [e for e in events if e.get("kind") == "disk.key"]


def _key_files(cluster: LocalCluster, host: str) -> list[Path]:
    return sorted((cluster.hosts[host].dir / "keys").glob("disk-*"))


def _recovered_key(cluster: LocalCluster, host: str, vm: str, disk: str) -> bytes:
    """The disk key as an administrator recovers it with the CA key (the only way besides
    the host's TPM): the needle the searches below look for."""
    assert cluster.ca is not None
    name = key_name(vm, disk)
    path = cluster.hosts[host].dir / "keys" / f"{name}.recovery"
    return decrypt_recovery(path.read_bytes(), cluster.ca.ca_key, host=host, name=name, path=path)


def _needles(key: bytes) -> list[bytes]:
    b64 = base64.b64encode(key)
    return [key, key.hex().encode(), b64, base64.b64encode(b64), base64.urlsafe_b64encode(key)]


def _files_holding(root: Path, needles: list[bytes]) -> list[str]:
    found = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and not p.name.endswith(".sock"):
            try:
                data = p.read_bytes()
            except OSError:
                continue
            if any(n in data for n in needles):
                found.append(str(p))
    return found


def _processes_holding(needles: list[bytes]) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        for part in ("cmdline", "environ"):
            try:
                data = (proc / part).read_bytes()
            except OSError:
                continue
            if any(n in data for n in needles):
                found.append(f"{proc.name}/{part}")
    return found


def test_encrypted_disks_move_while_the_guest_writes_and_keys_never_leak(
    make_cluster: Any, debian_image: DebianImage, tmp_path: Path
) -> None:
    cluster = make_cluster()
    cluster.add_user("sam", ["security-admin", "auditor"])
    local = tmp_path / "host-a-disks"
    root = create_overlay(debian_image, local / "web.qcow2")  # plain, copied
    definition = debian_definition("web", debian_image, root, ssh_port=SSH_PORT, shared=False)
    definition["tenant"] = "acme"
    definition["disks"] += [
        {"id": "secret", "path": str(local / "secret.qcow2"), "format": "qcow2",
         "encrypt": "luks", "size_mib": SECRET_MIB},
        {"id": "vault", "path": str(local / "vault.luks"), "format": "raw", "encrypt": "luks",
         "size_mib": 16},
        # on storage both hosts see: not copied, its key travels all the same
        {"id": "common", "path": str(tmp_path / "shared" / "common.qcow2"), "format": "qcow2",
         "encrypt": "luks", "size_mib": 16, "shared": True},
    ]  # fmt: skip

    async def boot() -> None:
        a = await cluster.client("host-a", "alice")
        try:
            await a.call("vm.define", {"definition": definition})
            policy = cluster.signed_policy("alice", "web")
            await a.call("vm.start", {"name": "web", "policy": policy}, timeout=300)
        finally:
            await a.close()

    arun(boot())
    assert (local / "secret.qcow2").exists() and (local / "vault.luks").exists()
    assert wait_for_ssh(debian_image, cluster.forward_address("host-a"), SSH_PORT).ok
    # the guest sees plain block devices; a marker goes into both before the migration
    _ssh(cluster, "host-a", debian_image,
         f"yes {MARKER.decode()} | head -c 8M > m.bin && for d in vdc vdd; do dd if=m.bin "
         "of=/dev/$d bs=1M oflag=direct 2>/dev/null; done && sync")  # fmt: skip
    wrote: list[str] = []

    def write_during_copy() -> None:
        wrote.append(_ssh(cluster, "host-a", debian_image,
                          "nohup sh -c 'for i in 1 2 3 4; do cat m.bin; done | dd of=/dev/vdb "
                          "bs=1M oflag=direct' >dd.log 2>&1 & echo started"))  # fmt: skip

    async def out() -> tuple[dict[str, Any] | None, str | None]:
        a = await cluster.client("host-a", "alice")
        b = await cluster.client("host-b", "alice")
        try:

            async def hook() -> None:
                import asyncio

                await asyncio.to_thread(write_during_copy)

            res, err = await migrate_with_hook(cluster, a, "web", "host-b",
                                               {"max_bandwidth_mibps": 256}, when_bytes=0,
                                               hook=hook, on="disk-progress")  # fmt: skip
            if res is not None:
                await assert_running_and_beating(b, "web")
            return res, err
        finally:
            await a.close()
            await b.close()

    res, err = arun(out())
    assert res is not None, err
    assert wrote == ["started"], wrote
    assert res["status"] == "completed" and set(res["disks"]) == {"root", "secret", "vault"}
    done = _ssh(cluster, "host-b", debian_image,
                "while pgrep -x dd >/dev/null; do sleep 0.2; done; tail -1 dd.log")  # fmt: skip
    assert "copied" in done, done
    read = f"dd if=/dev/vdb bs=1M count={SECRET_MIB} 2>/dev/null | sha256sum"
    on_b = _ssh(cluster, "host-b", debian_image, read).split()[0]
    marker_digest = _ssh(cluster, "host-b", debian_image, "sha256sum m.bin").split()[0]
    for dev in ("vdc", "vdd"):
        got = _ssh(cluster, "host-b", debian_image, f"dd if=/dev/{dev} bs=1M count=8 | sha256sum")
        assert got.split()[0] == marker_digest, dev
    assert MARKER not in (tmp_path / "shared" / "common.qcow2").read_bytes()
    # the key moved: host-b holds it sealed, host-a forgot it with the handover
    assert _key_files(cluster, "host-a") == []
    assert len(_key_files(cluster, "host-b")) == 6  # sealed + recovery of the three disks
    # at rest on host-b the disks are ciphertext: no marker in the images
    b_images = list((cluster.hosts["host-b"].dir / "disks").rglob("*"))
    encrypted_images = [
        p for p in b_images if p.suffix in (".qcow2", ".raw") and "root" not in p.name
    ]
    assert len(encrypted_images) == 2, b_images
    assert all(MARKER not in p.read_bytes() for p in encrypted_images)

    async def back() -> dict[str, Any]:
        b = await cluster.client("host-b", "alice")
        a = await cluster.client("host-a", "alice")
        try:
            res = await b.call("migrate", {"vm": "web", "to": "host-a", "options": {
                "mode": "postcopy", "postcopy_after_rounds": 1, "max_bandwidth_mibps": 128}},
                timeout=600)  # fmt: skip
            await assert_running_and_beating(a, "web")
            return res
        finally:
            await a.close()
            await b.close()

    res = arun(back())
    assert res["status"] == "completed" and set(res["disks"]) == {"root", "secret", "vault"}
    assert _ssh(cluster, "host-a", debian_image, read).split()[0] == on_b
    assert _key_files(cluster, "host-b") == [] and len(_key_files(cluster, "host-a")) == 6

    # the keys are in no file, log, command line or environment on either host
    keys = [_recovered_key(cluster, "host-a", "web", d) for d in ("secret", "vault", "common")]
    needles = [n for k in keys for n in _needles(k)]
    assert _files_holding(cluster.root, needles) == []
    assert _files_holding(tmp_path, needles) == []
    assert _processes_holding(needles) == []
    # every step of the keys' life is audited on the host where it happened
    a_events = [(e["outcome"], e.get("data", {}).get("to") or e.get("data", {}).get("from"))
                for e in arun(_disk_key_events(cluster, "host-a"))]  # fmt: skip
    b_events = [(e["outcome"], e.get("data", {}).get("to") or e.get("data", {}).get("from"))
                for e in arun(_disk_key_events(cluster, "host-b"))]  # fmt: skip
    assert ("created", None) in a_events and ("released", "host-b") in a_events
    assert ("forgotten", None) in a_events and ("received", "host-b") in a_events
    assert ("received", "host-a") in b_events and ("released", "host-a") in b_events
    assert ("used", None) in b_events and ("forgotten", None) in b_events


def test_a_destination_failing_attestation_never_receives_a_disk_key(
    make_cluster: Any, tmp_path: Path
) -> None:
    rogue = tmp_path / "qemu-system-x86_64"
    rogue.write_text(
        f'#!/bin/sh\n# hypervisor build 1\nexec {shutil.which("qemu-system-x86_64")} "$@"\n'
    )
    rogue.chmod(0o755)
    cluster = make_cluster(qemu_binary={"host-b": str(rogue)}, defer_start=True)
    cluster.add_user("sam", ["security-admin", "auditor"])
    with rogue.open("a") as f:
        f.write("# patched after approval\n")
    cluster.start_agents()
    disk = tmp_path / "a" / "sec.qcow2"
    vm = {"name": "vm1", "memory_mib": 256, "tenant": "acme", "workload": {"mem_mib": 32},
          "disks": [{"id": "sec", "path": str(disk), "format": "qcow2", "encrypt": "luks",
                     "size_mib": 32}]}  # fmt: skip

    async def go() -> str:
        a = await cluster.client("host-a", "alice")
        try:
            await start_vm(a, vm, cluster)
            with pytest.raises(Exception) as ei:
                await a.call("migrate", {"vm": "vm1", "to": "host-b", "options": {}}, timeout=300)
            await assert_running_and_beating(a, "vm1")
            return str(ei.value)
        finally:
            await a.close()

    err = arun(go())
    assert "qemu-binary" in err, err
    assert _key_files(cluster, "host-b") == []
    assert len(_key_files(cluster, "host-a")) == 2
    assert arun(_disk_key_events(cluster, "host-b")) == []
    outcomes = [e["outcome"] for e in arun(_disk_key_events(cluster, "host-a"))]
    assert "released" not in outcomes and outcomes.count("created") == 1, outcomes
    key = _recovered_key(cluster, "host-a", "vm1", "sec")
    assert _files_holding(cluster.hosts["host-b"].dir, _needles(key)) == []
    assert not (cluster.hosts["host-b"].dir / "disks").exists() or not any(
        (cluster.hosts["host-b"].dir / "disks").rglob("*.qcow2")
    )


def test_an_encrypted_disk_without_its_key_is_refused(make_cluster: Any, tmp_path: Path) -> None:
    """An existing image trustmig holds no key for, or a missing one without a size, is refused
    in one line before QEMU starts."""
    cluster = make_cluster()
    stranger = tmp_path / "stranger.qcow2"
    stranger.write_bytes(os.urandom(4096))
    cases = {
        "exists but host-a holds no key": {"path": str(stranger)},
        "give it size_mib": {"path": str(tmp_path / "missing.qcow2")},
    }

    async def go() -> dict[str, str]:
        a = await cluster.client("host-a", "alice")
        out = {}
        try:
            for want, disk in cases.items():
                d = {"id": "sec", "format": "qcow2", "encrypt": "luks", **disk}
                vm = {"name": "vm1", "memory_mib": 256, "tenant": "acme", "disks": [d]}
                with pytest.raises(Exception) as ei:
                    await start_vm(a, vm, cluster)
                out[want] = str(ei.value)
            assert (await a.call("vm.list"))["vms"] == []
        finally:
            await a.close()
        return out

    for want, got in arun(go()).items():
        assert want in got and "\n" not in got, got


def test_a_destination_killed_mid_copy_forgets_the_key_it_received(
    make_cluster: Any, tmp_path: Path
) -> None:
    cluster = make_cluster()
    cluster.add_user("sam", ["security-admin", "auditor"])
    disk = tmp_path / "a" / "sec.luks"
    vm = {"name": "vm1", "memory_mib": 256, "tenant": "acme", "workload": {"mem_mib": 32},
          "disks": [{"id": "sec", "path": str(disk), "format": "raw", "encrypt": "luks",
                     "size_mib": 128}]}  # fmt: skip
    killed: list[int] = []

    async def go() -> tuple[dict[str, Any] | None, str | None]:
        a = await cluster.client("host-a", "alice")
        b = await cluster.client("host-b", "alice")
        try:
            await start_vm(a, vm, cluster)

            async def kill_destination() -> None:
                for pid in await incoming_pids(b):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)

            res, err = await migrate_with_hook(
                cluster, a, "vm1", "host-b", {"max_bandwidth_mibps": 32},
                when_bytes=0, hook=kill_destination, on="disk-progress",
            )  # fmt: skip
            await assert_running_and_beating(a, "vm1")
            assert await incoming_pids(b) == []
            return res, err
        finally:
            await a.close()
            await b.close()

    res, err = arun(go())
    assert killed and res is None and err, (killed, res, err)
    # the key had reached host-b (the copy had begun) and is gone again; host-a keeps its own
    b_outcomes = [e["outcome"] for e in arun(_disk_key_events(cluster, "host-b"))]
    assert b_outcomes[:1] == ["received"] and "forgotten" in b_outcomes, b_outcomes
    assert _key_files(cluster, "host-b") == []
    assert len(_key_files(cluster, "host-a")) == 2
    disks_b = cluster.hosts["host-b"].dir / "disks"
    assert not disks_b.exists() or not [p for p in disks_b.rglob("*") if p.is_file()]
