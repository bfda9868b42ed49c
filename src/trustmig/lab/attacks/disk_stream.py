"""The disk's way: a man in the middle reads and rewrites a local disk while it is copied.

The guest's data disk holds a marker file's content (64 copies of a secret line). Against the
baseline (QEMU's own NBD mirror over plain TCP, as storage migrations run without trustmig) a
sniffer counts the marker in the NBD stream and a rewriter replaces it, and the destination's
disk then holds the forged bytes. Against trustmig the same taps sit on the session's disk
stream: the marker is never seen, and bytes overwritten blindly fail the copy closed, with the
guest and its disk untouched on the source and no partial disk left on the destination.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

from trustmig.agent.local_cluster import free_port
from trustmig.hypervisor.blockcopy import (
    export_disks,
    finish_mirrors,
    mirror_disk,
    tcp_server,
    unexport_targets,
    wait_mirrors_ready,
)
from trustmig.hypervisor.spec import VMSpec
from trustmig.lab.attack import Attack, Outcome
from trustmig.lab.proxy import BlindTamper, MitmProxy, Rewriter, Sniffer
from trustmig.lab.targets import HONEST, OWNER, SOURCE, LabEnv, guest_spec

NAME = "disk-stream"
MARKER = b"TRUSTMIG-DISK-SECRET:card=4929-1234-5678-9012;"
FORGED = b"TRUSTMIG-DISK-SECRET:card=0000-0000-0000-0000;"
DISK_MIB = 32
#: the disk stream is the session's second connection; past its NBD greeting
TAMPER_AT = 1024 * 1024


def _disk_with_marker(path: Path) -> str:
    """A raw disk whose content a sniffer would want: the marker every 512 KiB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = bytearray(DISK_MIB << 20)
    for i in range(64):
        off = i * (512 << 10) + 4096
        data[off : off + len(MARKER)] = MARKER
    path.write_bytes(bytes(data))
    return hashlib.sha256(data).hexdigest()


def _spec(name: str, disk: Path, image_key: str | None = None) -> VMSpec:
    base = guest_spec(name).model_dump(mode="json", exclude={"image_key", "owner"})
    base["disks"] = [{"id": "data", "path": str(disk), "format": "raw"}]
    if image_key:
        base["image_key"] = image_key
    return VMSpec.model_validate(base)


async def _baseline_copy(env: LabEnv, tap: Sniffer | Rewriter, disk: Path) -> dict[str, Any]:
    """QEMU's storage migration without trustmig: NBD over TCP, then the memory."""
    b = env.baseline
    spec = _spec(NAME, disk, env.image.key)
    target = b.workdir / f"{NAME}-target.raw"
    target.unlink(missing_ok=True)
    made = await asyncio.create_subprocess_exec(
        "qemu-img", "create", "-q", "-f", "raw", str(target), str(DISK_MIB << 20)
    )
    await made.wait()
    src = await b.boot_spec(spec)
    dst_disk = spec.disks[0].model_copy(update={"path": target})
    dst_spec = spec.model_copy(update={"disks": [dst_disk]})
    dst, port = await b.destination_spec(dst_spec)
    nbd_port = free_port()
    await export_disks(dst, ["data"], tcp_server("127.0.0.1", nbd_port))
    with MitmProxy(("127.0.0.1", nbd_port), tap) as proxy:
        await mirror_disk(src, "data", tcp_server("127.0.0.1", proxy.address[1]))
        await wait_mirrors_ready(src, spec, timeout=60)
        prog = await b.migrate(src, port)
        await finish_mirrors(src)
        await unexport_targets(dst)
        await b.settle(dst)
    guest = await b.state({"source": src, "destination": dst})
    content = target.read_bytes()
    await b.close()
    target.unlink(missing_ok=True)
    return {"migration": prog.status, "guest": guest,
            "destination_markers": content.count(MARKER),
            "destination_forged": content.count(FORGED)}  # fmt: skip


async def baseline(env: LabEnv) -> Outcome:
    disk = env.baseline.workdir / f"{NAME}.raw"
    _disk_with_marker(disk)
    sniff = Sniffer(MARKER)
    read = await _baseline_copy(env, sniff, disk)
    rw = Rewriter(MARKER, FORGED)
    rewritten = await _baseline_copy(env, rw, disk)
    return Outcome(
        compromised=sniff.hits > 0 or rewritten["destination_forged"] > 0,
        outcome=f"marker read {sniff.hits}x in the NBD stream; {rw.replaced} rewritten in "
        f"flight: the destination's disk holds {rewritten['destination_forged']} forged and "
        f"{rewritten['destination_markers']} genuine copies",
        evidence={
            "marker_hits": sniff.hits,
            "rewritten": rw.replaced,
            "destination_forged": rewritten["destination_forged"],
            "destination_markers": rewritten["destination_markers"],
            "migration": rewritten["migration"],
            "read_migration": read["migration"],
        },
        guest=rewritten["guest"],
    )


async def _trustmig_copy(env: LabEnv, name: str, disk: Path, tap: Any) -> dict[str, Any]:
    t = env.trustmig
    c = await t.client(SOURCE)
    try:
        await c.call("vm.start", {"spec": _spec(name, disk).model_dump(mode="json"),
                                  "policy": t.cluster.signed_policy(OWNER, name)},
                     timeout=300)  # fmt: skip
    finally:
        await c.close()
    t.tap(HONEST, tap)
    try:
        res, err = await t.migrate(name, HONEST, {"max_bandwidth_mibps": 64})
    finally:
        t.tap(HONEST, None)
    guest = await t.state(name)
    # targets of this VM's migrations left on the destination (a completed copy stays there;
    # an aborted one's is deleted as the destination discards it, within moments)
    left: list[Path] = []
    for _ in range(100 if res is None else 0):
        left = list((t.cluster.hosts[HONEST].dir / "disks").glob(f"{name}-*/*"))
        if not left:
            break
        await asyncio.sleep(0.1)
    await t.stop_vm(name)
    return {"result": res, "error": err, "guest": guest, "left_on_destination": len(left)}


async def trustmig(env: LabEnv) -> Outcome:
    t = env.trustmig
    disk_read = t.workdir / f"{NAME}-read.raw"
    _disk_with_marker(disk_read)
    sniff = Sniffer(MARKER)
    read = await _trustmig_copy(env, "disk-read", disk_read, sniff)
    disk = t.workdir / f"{NAME}.raw"
    before = _disk_with_marker(disk)
    tamper = BlindTamper(MARKER, FORGED, at_offset=TAMPER_AT, conn_index=1)
    rewrite = await _trustmig_copy(env, NAME, disk, tamper)
    after = hashlib.sha256(disk.read_bytes()).hexdigest()
    completed = rewrite["result"] is not None
    return Outcome(
        compromised=sniff.hits > 0
        or completed
        or after != before
        or rewrite["left_on_destination"] > 0,
        outcome=f"marker read {sniff.hits}x in {sniff.bytes_seen / 1e6:.0f} MB of ciphertext "
        f"(copy {'completed' if read['result'] else 'failed'}); blind rewrite: "
        + (f"copy aborted ({rewrite['error']})" if not completed else "copy completed")
        + f", source disk {'unchanged' if after == before else 'CHANGED'}",
        evidence={
            "marker_hits": sniff.hits,
            "bytes_seen": sniff.bytes_seen,
            "read_copy": "completed" if read["result"] else read["error"],
            "bytes_tampered": tamper.tampered,
            "error": rewrite["error"],
            "source_disk_unchanged": after == before,
            "left_on_destination": rewrite["left_on_destination"],
        },
        guest=rewrite["guest"],
    )


ATTACK = Attack(
    name=NAME,
    title="Reading and rewriting a disk in flight",
    paper="Storage migrated in clear can be read and altered like memory; the paper asks to "
    "encrypt the VM's storage data in transit as well (§7.7).",
    x805=(
        ("data_confidentiality", "infrastructure", "end_user"),
        ("data_integrity", "infrastructure", "end_user"),
        ("communication_security", "infrastructure", "end_user"),
    ),
    baseline=baseline,
    trustmig=trustmig,
)
