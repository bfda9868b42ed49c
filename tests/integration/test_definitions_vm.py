"""Real VMs from definitions: a Debian guest with a disk and a NIC migrates (pre-copy there,
post-copy back) with its processes, files and ssh logins intact; definitions the destination
cannot satisfy are refused in one line before anything starts."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from trustmig.agent.client import ControlClient, ControlError
from trustmig.agent.local_cluster import LocalCluster
from trustmig.hypervisor.debian import (
    DebianImage,
    build_debian_image,
    create_overlay,
    debian_definition,
    guest_ssh,
    wait_for_ssh,
)

from .helpers import arun, assert_running_and_beating, incoming_pids

pytestmark = pytest.mark.vm

SSH_PORT = 2222


@pytest.fixture(scope="session")
def debian_image() -> DebianImage:
    return build_debian_image()


def _ssh(c: LocalCluster, host: str, image: DebianImage, cmd: str) -> str:
    res = guest_ssh(image, c.forward_address(host), SSH_PORT, cmd)
    assert res.ok, f"ssh to the guest on {host} failed: {res.stderr}"
    return res.stdout.strip()


async def _migrate(cl: ControlClient, vm: str, to: str, **options: Any) -> dict[str, Any]:
    return await cl.call("migrate", {"vm": vm, "to": to, "options": options}, timeout=600)


def test_a_debian_guest_with_disk_and_nic_migrates_and_back(
    make_cluster: Any, debian_image: DebianImage, tmp_path: Path
) -> None:
    cluster = make_cluster()
    shared = tmp_path / "shared"  # storage both hosts see
    shared.mkdir()
    disk = create_overlay(debian_image, shared / "web.qcow2")
    # the workload keeps dirtying memory, so the way back really switches to post-copy
    workload = {"mem_mib": 128, "dirty_rate": 64}
    definition = {**debian_definition("web", debian_image, disk, ssh_port=SSH_PORT,
                                      workload=workload), "tenant": "acme"}  # fmt: skip

    async def boot() -> None:
        a = await cluster.client("host-a", "alice")
        try:
            await a.call("vm.define", {"definition": definition})
            policy = cluster.signed_policy("alice", "web")
            await a.call("vm.start", {"name": "web", "policy": policy}, timeout=300)
        finally:
            await a.close()

    arun(boot())
    login = wait_for_ssh(debian_image, cluster.forward_address("host-a"), SSH_PORT)
    assert login.ok, login.stderr
    pid = _ssh(cluster, "host-a", debian_image,
               "nohup sleep 100000 >/dev/null 2>&1 & echo $!")  # fmt: skip
    digest = _ssh(cluster, "host-a", debian_image,
                  "head -c 4M /dev/urandom > data.bin && sync && sha256sum data.bin")  # fmt: skip

    async def there_and_back() -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
        a = await cluster.client("host-a", "alice")
        b = await cluster.client("host-b", "alice")
        try:
            out = await _migrate(a, "web", "host-b", max_bandwidth_mibps=512)
            await assert_running_and_beating(b, "web")
            listed_a = (await a.call("vm.list"))["vms"]
            assert not [v for v in listed_a if v["name"] == "web"], listed_a  # undefined there
            moved = (await b.call("vm.definition", {"name": "web"}))["definition"]
            assert moved["disks"][0]["identity"]
            assert moved["machine"].startswith("pc-i440fx-")  # the alias pinned at start
            # while the guest is on host-b, its process and file are there too
            assert _ssh(cluster, "host-b", debian_image, f"kill -0 {pid} && echo alive") == "alive"
            back = await _migrate(b, "web", "host-a", mode="postcopy", postcopy_after_rounds=1,
                                  max_bandwidth_mibps=128)  # fmt: skip
            await assert_running_and_beating(a, "web")
            check = await a.call("vm.check", {"name": "web"}, timeout=120)
            assert check["bad_pages"] == 0 and check["marker_ok"] == check["marker_total"], check
            return out, back, (await b.call("vm.list"))["vms"]
        finally:
            await a.close()
            await b.close()

    out, back, listed_b = arun(there_and_back())
    assert out["status"] == "completed" and back["status"] == "completed", (out, back)
    assert back.get("mode") == "postcopy", back
    assert not [v for v in listed_b if v["name"] == "web"]
    # the same process (same PID) still runs, the file reads back identical, ssh logs in to
    # the same guest (its host key checked) on the host it now runs on
    assert _ssh(cluster, "host-a", debian_image, f"cat /proc/{pid}/cmdline | tr '\\0' ' '") == (
        "sleep 100000"
    )
    assert _ssh(cluster, "host-a", debian_image, "sha256sum data.bin") == digest


def _lab_with_disk(tmp_path: Path, **disk: Any) -> dict[str, Any]:
    img = tmp_path / "data.raw"
    img.write_bytes(b"\0" * (1 << 20))
    return {
        "name": "vm1", "tenant": "acme", "memory_mib": 256,
        "workload": {"mem_mib": 32},
        "disks": [{"id": "data", "path": str(img), "format": "raw", **disk}],
    }  # fmt: skip


def test_what_the_destination_cannot_run_is_refused_before_anything_starts(
    make_cluster: Any, tmp_path: Path
) -> None:
    cluster = make_cluster()

    async def go() -> tuple[str, str, str, list[int]]:
        a = await cluster.client("host-a", "alice")
        b = await cluster.client("host-b", "alice")
        try:
            bad = {**_lab_with_disk(tmp_path), "memroy_mib": 512}
            with pytest.raises(ControlError) as typo:
                await a.call("vm.define", {"definition": bad})
            missing = _lab_with_disk(tmp_path)
            missing["disks"][0]["path"] = str(tmp_path / "nowhere.raw")
            await a.call("vm.define", {"definition": missing})
            with pytest.raises(ControlError) as absent:
                await a.call("vm.start", {"name": "vm1"}, timeout=120)
            assert not (await a.call("vm.list"))["vms"][0]["pid"]
            forwarded = {**_lab_with_disk(tmp_path), "nics": [{
                "id": "net0", "mac": "52:54:00:aa:bb:02",
                "backend": {"kind": "user", "forwards": [{"host_port": 2299, "guest_port": 22}]},
            }]}  # fmt: skip
            await a.call("vm.define", {"definition": forwarded})
            policy = cluster.signed_policy("alice", "vm1")
            await a.call("vm.start", {"name": "vm1", "policy": policy}, timeout=120)
            with socket.socket() as busy:  # something on host-b holds the guest's port
                busy.bind((cluster.forward_address("host-b"), 2299))
                busy.listen()
                with pytest.raises(ControlError) as local:
                    await _migrate(a, "vm1", "host-b")
            await assert_running_and_beating(a, "vm1")
            return str(typo.value), str(absent.value), str(local.value), await incoming_pids(b)
        finally:
            await a.close()
            await b.close()

    typo, absent, local, incoming = arun(go())
    assert "memroy_mib: unknown field" in typo and "\n" not in typo
    assert "disk data" in absent and "does not exist on this host" in absent
    assert "host-b cannot run VM vm1: forwarded port tcp 127.0.1.2:2299 is not free" in local, local
    assert incoming == []


def test_a_bridge_the_destination_lacks_is_named(make_cluster: Any, tmp_path: Path) -> None:
    cluster = make_cluster()
    spec = {**_lab_with_disk(tmp_path), "disks": [],
            "nics": [{"id": "net0", "mac": "52:54:00:aa:bb:01",
                      "backend": {"kind": "bridge", "bridge": "tmnobr9"}}]}  # fmt: skip

    async def go() -> str:
        a = await cluster.client("host-a", "alice")
        try:
            with pytest.raises(ControlError) as e:
                await a.call("vm.start", {"spec": spec}, timeout=60)
            return str(e.value)
        finally:
            await a.close()

    err = arun(go())
    assert "bridge tmnobr9 does not exist" in err, err
