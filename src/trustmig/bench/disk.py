"""`trustmig bench migrate --disk-mib N`: copying a local disk through trustmig against QEMU's
own NBD mirror over plain TCP, interleaved in the same invocation.

* ``plain``  two bare QEMUs: the destination exports an empty target over NBD on a loopback TCP
  port, the source mirrors its disk into it (``blockdev-mirror``, ``sync=full``) with nothing
  in between: the hypervisor's own ceiling on this host;
* ``secure`` a lab guest with the same disk migrated by two agents: the mirror goes through
  the relay and trustmig's attested, encrypted channel.

Both time the disk copy alone (mirror start to ready) and report MB/s; the ratio secure/plain
is what to compare across machines. The disk is N MiB of random bytes (nothing to compress or
skip), created once per invocation; every run copies it into a fresh target.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trustmig.agent.local_cluster import LocalCluster, free_port
from trustmig.bench.errors import BenchError
from trustmig.bench.secure import DEST, SOURCE, TENANT, USER, USER_ROLES, vm_policy
from trustmig.hypervisor.accel import AccelChoice, choose_accel
from trustmig.hypervisor.blockcopy import (
    BlockCopyError,
    export_disks,
    finish_mirrors,
    mirror_disk,
    tcp_server,
    wait_mirrors_ready,
)
from trustmig.hypervisor.image import GuestImage, build_image
from trustmig.hypervisor.qemu import QemuVM
from trustmig.hypervisor.spec import VMSpec

VM = "bench-disk"
Say = Callable[[str], None]


def _spec(disk: Path, image: GuestImage) -> VMSpec:
    return VMSpec.model_validate({
        "name": VM, "memory_mib": 256, "tenant": TENANT, "image_key": image.key,
        "workload": {"mem_mib": 16},
        "disks": [{"id": "data", "path": str(disk), "format": "raw", "cache": "none"}],
    })  # fmt: skip


def _random_disk(path: Path, mib: int) -> None:
    with path.open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))


async def run_plain(
    spec: VMSpec, image: GuestImage, accel: AccelChoice, work: Path
) -> dict[str, Any]:
    """QEMU to QEMU over NBD on loopback TCP, no agents."""
    target = work / "plain-target.raw"
    target.unlink(missing_ok=True)
    size = spec.disks[0].path.stat().st_size
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(target), str(size)], check=True)
    dst_spec = spec.model_copy(
        update={"disks": [spec.disks[0].model_copy(update={"path": target})]}
    )
    src = QemuVM(spec, image, work / "plain-src", accel, die_with_parent=True)
    dst = QemuVM(dst_spec, image, work / "plain-dst", accel, incoming=True, start_paused=True,
                 die_with_parent=True)  # fmt: skip
    try:
        await src.start()
        await src.console.wait_for("READY", 180)  # a booting guest would compete for the CPU
        await dst.start()
        port = free_port()
        await export_disks(dst, ["data"], tcp_server("127.0.0.1", port))
        cpu0 = src.cpu_seconds() + dst.cpu_seconds()
        t0 = time.monotonic()  # from the NBD connection on, as the secure run counts it
        await mirror_disk(src, "data", tcp_server("127.0.0.1", port))
        try:
            await wait_mirrors_ready(src, spec, poll_s=0.02)
        except BlockCopyError as e:
            raise BenchError(f"QEMU's own mirror failed: {e}") from None
        elapsed = time.monotonic() - t0
        cpu = src.cpu_seconds() + dst.cpu_seconds() - cpu0
        await finish_mirrors(src)
        return {"channel": "plain", "status": "completed", "bytes": size,
                "seconds": round(elapsed, 3), "cpu_s_qemu": round(cpu, 2)}  # fmt: skip
    finally:
        for vm in (src, dst):
            await vm.kill()
        target.unlink(missing_ok=True)


async def run_secure(cluster: LocalCluster, spec: VMSpec) -> dict[str, Any]:
    """The same disk migrated by the agents; the copy time is the mirror's, from the result."""
    src = await cluster.client(SOURCE, USER)
    dst = await cluster.client(DEST, USER)
    try:
        await src.call("vm.start", {"spec": spec.model_dump(mode="json", exclude={"image_key"}),
                                    "policy": vm_policy(cluster, VM)}, timeout=300)  # fmt: skip
        res = await src.call("migrate", {"vm": VM, "to": DEST, "options": {}}, timeout=900)
        disk = res["disks"]["data"]
        return {"channel": "secure", "status": res["status"], "bytes": disk["bytes"],
                "seconds": round(disk["sync_ms"] / 1000, 3)}  # fmt: skip
    finally:
        for c in (src, dst):
            with contextlib.suppress(Exception):  # it runs on one host only
                await c.call("vm.stop", {"name": VM}, timeout=60)
            await c.close()


def run_disk_bench(disk_mib: int, repeat: int, say: Say = lambda s: None) -> dict[str, Any]:
    """Interleaved plain/secure disk copies; medians in MB/s and their ratio."""
    if not 16 <= disk_mib <= 65536:
        raise BenchError("--disk-mib must be between 16 and 65536")
    image = build_image(progress=say)
    accel = choose_accel("auto")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="trustmig-bench-disk-") as tmp:
        work = Path(tmp)
        disk = work / "disk.raw"
        say(f"writing a {disk_mib} MiB disk of random bytes")
        _random_disk(disk, disk_mib)
        spec = _spec(disk, image)
        cluster = LocalCluster(work / "cluster", (SOURCE, DEST))
        try:
            cluster.setup(accept_tenants={SOURCE: [TENANT], DEST: [TENANT]},
                          extra_config={h: "admission = {max_per_vm_per_hour = 1000000}"
                                        for h in (SOURCE, DEST)})  # fmt: skip
            cluster.add_user(USER, list(USER_ROLES), tenant=TENANT)
            cluster.start_agents()
            for rep in range(repeat):
                say(f"run {rep + 1}/{repeat}: plain NBD mirror")
                runs.append(asyncio.run(run_plain(spec, image, accel, work)))
                say(f"run {rep + 1}/{repeat}: through trustmig")
                runs.append(asyncio.run(run_secure(cluster, spec)))
        finally:
            cluster.stop()
    return _report(disk_mib, repeat, accel, runs)


def _report(
    disk_mib: int, repeat: int, accel: AccelChoice, runs: list[dict[str, Any]]
) -> dict[str, Any]:
    for r in runs:
        r["throughput_mbps"] = round(r["bytes"] / 1e6 / r["seconds"], 1) if r["seconds"] else None
    med = {
        ch: statistics.median(r["throughput_mbps"] for r in runs if r["channel"] == ch)
        for ch in ("plain", "secure")
    }
    return {
        "benchmark": "disk-copy",
        "disk_mib": disk_mib,
        "repeat": repeat,
        "accel": accel.accel,
        "runs": runs,
        "median_mbps": med,
        "ratio_secure_plain": round(med["secure"] / med["plain"], 3) if med["plain"] else None,
    }
