"""Local disks move with their VM through the attested session: NBD export on the destination,
a write-blocking mirror on the source, the memory switch only once every disk is in sync."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from trustmig.hypervisor.debian import (
    DebianImage,
    build_debian_image,
    create_overlay,
    debian_definition,
    guest_ssh,
    wait_for_ssh,
)
from trustmig.hypervisor.image import sha256_file

from .helpers import arun, assert_running_and_beating, incoming_pids, migrate_with_hook

pytestmark = pytest.mark.vm

SSH_PORT = 2222
DATA_MIB = 64


@pytest.fixture(scope="session")
def debian_image() -> DebianImage:
    return build_debian_image()


def _sha256_zeros(mib: int) -> str:
    return hashlib.sha256(b"\0" * (mib << 20)).hexdigest()


def _ssh(cluster: Any, host: str, image: DebianImage, cmd: str) -> str:
    res = guest_ssh(image, cluster.forward_address(host), SSH_PORT, cmd, timeout=120)
    assert res.ok, f"ssh on {host}: {res.stderr}"
    return res.stdout.strip()


def test_local_disks_are_copied_while_the_guest_writes(
    make_cluster: Any, debian_image: DebianImage, tmp_path: Path
) -> None:
    cluster = make_cluster()
    local = tmp_path / "host-a-disks"  # only host-a sees this directory's disks
    root = create_overlay(debian_image, local / "web.qcow2")
    data = local / "data.raw"
    data.write_bytes(b"\0" * (DATA_MIB << 20))
    definition = debian_definition("web", debian_image, root, ssh_port=SSH_PORT, shared=False)
    definition["tenant"] = "acme"
    definition["disks"].append({"id": "data", "path": str(data), "format": "raw"})

    async def boot() -> None:
        a = await cluster.client("host-a", "alice")
        try:
            await a.call("vm.define", {"definition": definition})
            await a.call("vm.start", {"name": "web", "policy": cluster.signed_policy("alice",
                                                                                     "web")},
                         timeout=300)  # fmt: skip
        finally:
            await a.close()

    arun(boot())
    assert wait_for_ssh(debian_image, cluster.forward_address("host-a"), SSH_PORT).ok
    pid = _ssh(cluster, "host-a", debian_image, "nohup sleep 100000 >/dev/null 2>&1 & echo $!")
    digest = _ssh(cluster, "host-a", debian_image,
                  "head -c 4M /dev/urandom > f.bin && sync && sha256sum f.bin")  # fmt: skip
    wrote: list[str] = []

    def write_during_copy() -> None:
        """The guest starts writing its data disk while the disks are being mirrored."""
        wrote.append(_ssh(cluster, "host-a", debian_image,
                          f"nohup dd if=/dev/urandom of=/dev/vdb bs=1M count={DATA_MIB // 2} "
                          "oflag=direct >dd.log 2>&1 & echo started"))  # fmt: skip

    async def go() -> tuple[dict[str, Any] | None, str | None, list[dict[str, Any]]]:
        a = await cluster.client("host-a", "alice")
        b = await cluster.client("host-b", "alice")
        events: list[dict[str, Any]] = []
        try:

            async def hook() -> None:
                import asyncio

                await asyncio.to_thread(write_during_copy)

            res, err = await migrate_with_hook(cluster, a, "web", "host-b",
                                               {"max_bandwidth_mibps": 256}, when_bytes=0,
                                               hook=hook, on="disk-progress")  # fmt: skip
            if res is not None:
                await assert_running_and_beating(b, "web")
                moved = (await b.call("vm.definition", {"name": "web"}))["definition"]
                events.append(moved)
            return res, err, events
        finally:
            await a.close()
            await b.close()

    res, err, events = arun(go())
    assert res is not None, err
    assert wrote == ["started"], f"the guest did not write during the copy: {wrote}"
    assert res["status"] == "completed" and set(res["disks"]) == {"root", "data"}, res
    moved_paths = {d["id"]: Path(d["path"]) for d in events[0]["disks"]}
    assert all(str(p).startswith(str(cluster.hosts["host-b"].dir)) for p in moved_paths.values())
    # the guest on host-b: same process, same file, same data disk as the source had at the end
    assert _ssh(cluster, "host-b", debian_image, f"kill -0 {pid} && echo alive") == "alive"
    assert _ssh(cluster, "host-b", debian_image, "sha256sum f.bin") == digest
    # the writer (started on host-a) ends, wherever it is by then; the guest reads its disk
    done = _ssh(cluster, "host-b", debian_image,
                "while pgrep -x dd >/dev/null; do sleep 0.2; done; tail -1 dd.log")  # fmt: skip
    assert "copied" in done, done
    in_guest = _ssh(cluster, "host-b", debian_image,
                    f"dd if=/dev/vdb bs=1M count={DATA_MIB} 2>/dev/null | sha256sum")  # fmt: skip
    in_guest = in_guest.split()[0]
    assert in_guest != _sha256_zeros(DATA_MIB), "nothing was written"

    async def back_postcopy() -> dict[str, Any]:
        """And back to host-a in post-copy: mirrors in sync first, then the memory switch."""
        b = await cluster.client("host-b", "alice")
        a = await cluster.client("host-a", "alice")
        try:
            out = await b.call("migrate", {"vm": "web", "to": "host-a", "options": {
                "mode": "postcopy", "postcopy_after_rounds": 1, "max_bandwidth_mibps": 128}},
                timeout=600)  # fmt: skip
            await assert_running_and_beating(a, "web")
            out["definition"] = (await a.call("vm.definition", {"name": "web"}))["definition"]
            await a.call("vm.stop", {"name": "web"}, timeout=60)
            return out
        finally:
            await a.close()
            await b.close()

    back = arun(back_postcopy())
    assert back["status"] == "completed" and set(back["disks"]) == {"root", "data"}, back
    back_paths = {d["id"]: Path(d["path"]) for d in back["definition"]["disks"]}
    assert all(str(p).startswith(str(cluster.hosts["host-a"].dir)) for p in back_paths.values())
    # what the guest read is on host-b's copy, and host-a's new copy equals it
    assert sha256_file(moved_paths["data"]) == in_guest == sha256_file(back_paths["data"])


def test_a_destination_killed_mid_copy_leaves_the_source_and_its_disk_intact(
    make_cluster: Any, tmp_path: Path
) -> None:
    cluster = make_cluster()
    disk = tmp_path / "data.raw"
    with disk.open("wb") as f:
        for _ in range(256):
            f.write(os.urandom(1 << 20))
    before = sha256_file(disk)
    killed: list[int] = []
    spec = {"name": "vm1", "tenant": "acme", "memory_mib": 256, "workload": {"mem_mib": 32},
            "disks": [{"id": "data", "path": str(disk), "format": "raw"}]}  # fmt: skip

    async def go() -> tuple[dict[str, Any] | None, str | None, list[int]]:
        a = await cluster.client("host-a", "alice")
        b = await cluster.client("host-b", "alice")
        try:
            await a.call("vm.start", {"spec": spec, "policy": cluster.signed_policy("alice",
                                                                                   "vm1")},
                         timeout=120)  # fmt: skip

            async def kill_destination() -> None:
                for pid in await incoming_pids(b):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)

            res, err = await migrate_with_hook(
                cluster, a, "vm1", "host-b", {"max_bandwidth_mibps": 64},
                when_bytes=0, hook=kill_destination, on="disk-progress",
            )  # fmt: skip
            await assert_running_and_beating(a, "vm1")
            return res, err, await incoming_pids(b)
        finally:
            await a.close()
            await b.close()

    res, err, left = arun(go())
    assert killed, "the destination was never killed during the disk copy"
    assert res is None and err and "prepare" not in err, (res, err)
    assert left == []
    disks_b = cluster.hosts["host-b"].dir / "disks"
    assert not disks_b.exists() or not any(disks_b.rglob("*.raw")), list(disks_b.rglob("*"))

    async def stop() -> None:
        a = await cluster.client("host-a", "alice")
        try:
            await a.call("vm.stop", {"name": "vm1"}, timeout=60)
        finally:
            await a.close()

    arun(stop())
    assert sha256_file(disk) == before


def test_a_source_agent_killed_mid_copy_is_undone_after_its_restart(
    make_cluster: Any, tmp_path: Path
) -> None:
    """The agent dies while QEMU mirrors the disk; its successor ends the mirror and rolls the
    migration back, and the next migration of the VM copies the disk completely."""
    import time

    cluster = make_cluster()
    disk = tmp_path / "data.raw"
    with disk.open("wb") as f:
        for _ in range(128):
            f.write(os.urandom(1 << 20))
    before = sha256_file(disk)
    spec = {"name": "vm1", "tenant": "acme", "memory_mib": 256, "workload": {"mem_mib": 32},
            "disks": [{"id": "data", "path": str(disk), "format": "raw"}]}  # fmt: skip
    killed: list[bool] = []

    async def start_and_kill() -> None:
        a = await cluster.client("host-a", "alice")
        try:
            await a.call("vm.start", {"spec": spec, "policy": cluster.signed_policy("alice",
                                                                                   "vm1")},
                         timeout=120)  # fmt: skip

            def kill() -> None:
                cluster.kill_agent("host-a", signal.SIGKILL)
                killed.append(True)

            await migrate_with_hook(cluster, a, "vm1", "host-b", {"max_bandwidth_mibps": 16},
                                    when_bytes=0, hook=kill, on="disk-progress")  # fmt: skip
        finally:
            await a.close()

    arun(start_and_kill())
    assert killed
    cluster.start_agent("host-a")

    async def settled() -> tuple[dict[str, Any], list[int]]:
        a = await cluster.client("host-a", "alice")
        b = await cluster.client("host-b", "alice")
        try:
            deadline = time.monotonic() + 120
            while True:
                vm = next(v for v in (await a.call("vm.list"))["vms"] if v["name"] == "vm1")
                if vm["state"] == "running" and vm["migration"] is None:
                    break
                assert time.monotonic() < deadline, vm
                await asyncio_sleep(0.5)
            await assert_running_and_beating(a, "vm1")
            # no mirror job was left behind: the next migration copies the disk again
            res = await a.call("migrate", {"vm": "vm1", "to": "host-b", "options": {}},
                               timeout=300)  # fmt: skip
            res["definition"] = {
                "disks": [
                    {"id": "data", "path": str(p)}
                    for p in (cluster.hosts["host-b"].dir / "disks").rglob("data.raw")
                ]
            }
            await b.call("vm.stop", {"name": "vm1"}, timeout=60)
            return res, await incoming_pids(b)
        finally:
            await a.close()
            await b.close()

    res, left = arun(settled())
    assert res["status"] == "completed" and left == []
    copies = [Path(d["path"]) for d in res["definition"]["disks"]]
    assert len(copies) == 1, copies  # the rolled-back attempt left no partial image behind
    assert sha256_file(copies[0]) == before == sha256_file(disk)


async def asyncio_sleep(s: float) -> None:
    import asyncio

    await asyncio.sleep(s)


def _random_disk(path: Path, mib: int) -> str:
    with path.open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    return sha256_file(path)


async def _no_incoming_on(c: Any) -> list[int]:
    """The destination's incoming QEMUs, once its discard (started by the source's abort)
    had time to end them."""
    for _ in range(150):
        left = await incoming_pids(c)
        if not left:
            return []
        await asyncio_sleep(0.2)
    return left


def _nothing_left_on(cluster: Any, host: str) -> list[Path]:
    """Images or disk keys a failed arrival left behind on ``host``."""
    d = cluster.hosts[host].dir
    images = [p for p in (d / "disks").rglob("*") if p.is_file()] if (d / "disks").exists() else []
    return images + sorted((d / "keys").glob("disk-*"))


def test_a_disk_stream_cut_mid_copy_leaves_the_source_and_its_disks_intact(
    make_cluster: Any, tmp_path: Path
) -> None:
    from trustmig.agent.local_cluster import free_port
    from trustmig.lab.proxy import Cutter, MitmProxy

    plain = tmp_path / "data.raw"
    before = _random_disk(plain, 64)
    sealed = tmp_path / "sec.luks"
    spec = {"name": "vm1", "tenant": "acme", "memory_mib": 256, "workload": {"mem_mib": 32},
            "disks": [{"id": "data", "path": str(plain), "format": "raw"},
                      {"id": "sec", "path": str(sealed), "format": "raw", "encrypt": "luks",
                       "size_mib": 32}]}  # fmt: skip
    port = free_port()
    cutter = Cutter(after_bytes=8 << 20, conn_index=1)  # the first disk's stream
    with MitmProxy(("127.0.0.1", port), cutter) as proxy:
        cluster = make_cluster(data_listen={"host-b": f"127.0.0.1:{port}"},
                               data_advertise={"host-b": proxy.hostport})  # fmt: skip

        async def go() -> tuple[dict[str, Any] | None, str | None, str]:
            a = await cluster.client("host-a", "alice")
            b = await cluster.client("host-b", "alice")
            try:
                policy = cluster.signed_policy("alice", "vm1")
                await a.call("vm.start", {"spec": spec, "policy": policy}, timeout=120)
                sealed_before = sha256_file(sealed)
                res, err = await migrate_with_hook(cluster, a, "vm1", "host-b",
                                                   {"max_bandwidth_mibps": 32})  # fmt: skip
                await assert_running_and_beating(a, "vm1")
                assert await _no_incoming_on(b) == []
                return res, err, sealed_before
            finally:
                await a.close()
                await b.close()

        res, err, sealed_before = arun(go())
    assert cutter.cut and res is None and err, (res, err)
    assert sha256_file(plain) == before and sha256_file(sealed) == sealed_before
    assert _nothing_left_on(cluster, "host-b") == []
    assert len(sorted((cluster.hosts["host-a"].dir / "keys").glob("disk-*"))) == 2


def test_a_source_qemu_killed_mid_copy_leaves_no_copy_and_the_disk_intact(
    make_cluster: Any, tmp_path: Path
) -> None:
    """The guest dies with its QEMU: it must then run nowhere (the half-filled destination is
    discarded), its disk is untouched, and it starts again from that disk."""
    cluster = make_cluster()
    disk = tmp_path / "data.raw"
    before = _random_disk(disk, 64)
    spec = {"name": "vm1", "tenant": "acme", "memory_mib": 256, "workload": {"mem_mib": 32},
            "disks": [{"id": "data", "path": str(disk), "format": "raw"}]}  # fmt: skip
    killed: list[int] = []

    async def go() -> tuple[str | None, dict[str, Any]]:
        a = await cluster.client("host-a", "alice")
        b = await cluster.client("host-b", "alice")
        try:
            policy = cluster.signed_policy("alice", "vm1")
            vm = await a.call("vm.start", {"spec": spec, "policy": policy}, timeout=120)

            def kill_source() -> None:
                os.kill(int(vm["pid"]), signal.SIGKILL)
                killed.append(int(vm["pid"]))

            res, err = await migrate_with_hook(cluster, a, "vm1", "host-b",
                                               {"max_bandwidth_mibps": 16}, when_bytes=0,
                                               hook=kill_source, on="disk-progress")  # fmt: skip
            assert res is None, res
            assert await _no_incoming_on(b) == []
            assert "vm1" not in [v["name"] for v in (await b.call("vm.list"))["vms"]]
            state = next(v for v in (await a.call("vm.list"))["vms"] if v["name"] == "vm1")
            assert sha256_file(disk) == before
            await a.call("vm.start", {"spec": spec}, timeout=120)  # its policy is still here
            await assert_running_and_beating(a, "vm1")
            return err, state
        finally:
            await a.close()
            await b.close()

    err, state = arun(go())
    assert killed and err, err
    assert state["state"] == "crashed", state
    assert _nothing_left_on(cluster, "host-b") == []
