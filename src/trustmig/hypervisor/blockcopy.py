"""Local disks that move with their VM: QEMU's NBD server on the destination, a mirror job on
the source, and the bytes in between carried by the migration's attested session.

Destination: a target image of the same format and virtual size is created in the host's own
disk directory, the incoming QEMU opens it, and its NBD server exports it (writable) on a unix
socket that only the migration's relay connects to. Source: an NBD client node connects to the
relay's socket for that disk and a ``blockdev-mirror`` (``sync=full``,
``copy-mode=write-blocking``: every guest write reaches the target before it completes, so the
copy converges whatever the guest writes) copies the disk. The memory migration starts only
once every mirror is ready; once the source guest stopped for good the mirrors are cancelled in
their ready state, which leaves the targets complete and consistent. Everything here is idempotent
(it reads QEMU's live state first), so a restarted agent can finish or undo what its predecessor
began.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustmig.hypervisor.qemu import QemuVM
from trustmig.hypervisor.spec import DiskSpec, VMSpec

JOB_PREFIX = "tm-mirror-"
NODE_PREFIX = "tm-nbd-"
EXPORT_PREFIX = "tm-export-"
READY_TIMEOUT_S = 1800.0
#: the incoming QEMU's NBD server for copied disks, in its private socket directory
NBD_SOCKET = "nbd.sock"


class BlockCopyError(Exception):
    """A disk could not be copied; the message names the disk and QEMU's reason."""


@dataclass(frozen=True)
class DiskProgress:
    """How far each disk's mirror is (bytes), for progress and the result."""

    disk: str
    done: int
    total: int
    ready: bool


def copied_disks(spec: VMSpec) -> list[DiskSpec]:
    """The disks that travel with the VM (not on shared storage, and writable)."""
    return [d for d in spec.disks if not d.shared]


# ---------------------------------------------------------------------------- destination
def target_spec(spec: VMSpec, disk_dir: Path) -> VMSpec:
    """The definition as the destination runs it: copied disks live in its own directory."""
    disks = [
        d if d.shared else d.model_copy(update={"path": disk_dir / f"{d.id}.{d.format}"})
        for d in spec.disks
    ]
    return spec.model_copy(update={"disks": disks})


def create_targets(spec: VMSpec) -> list[Path]:
    """Empty images for the copied plain disks (same format and virtual size); raises
    BlockCopyError, leaving none behind."""
    made: list[Path] = []
    try:
        for d in copied_disks(spec):
            if d.encrypt:
                continue  # made with its key, once the key arrived
            if d.virtual_size is None:
                raise BlockCopyError(f"disk {d.id}: the source did not say its virtual size")
            d.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if d.path.exists():
                raise BlockCopyError(f"disk {d.id}: {d.path} already exists on this host")
            out = subprocess.run(
                ["qemu-img", "create", "-q", "-f", d.format, str(d.path), str(d.virtual_size)],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            if out.returncode != 0:
                raise BlockCopyError(f"disk {d.id}: qemu-img create failed: {out.stderr.strip()}")
            d.path.chmod(0o600)
            made.append(d.path)
    except BaseException:
        remove_targets(made)
        raise
    return made


def remove_targets(paths: list[Path]) -> None:
    """Delete partial target images (and their directory once empty)."""
    for p in paths:
        p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            p.parent.rmdir()


def unix_server(path: Path) -> dict[str, Any]:
    """An NBD server address on a unix socket (QEMU's SocketAddress)."""
    return {"type": "unix", "path": str(path)}


def tcp_server(host: str, port: int) -> dict[str, Any]:
    """An NBD server address on TCP (QEMU's SocketAddress)."""
    return {"type": "inet", "host": host, "port": str(port)}


async def export_disks(qemu: QemuVM, disk_ids: list[str], server: dict[str, Any]) -> None:
    """QEMU serves the drives of ``disk_ids`` writable over NBD at ``server``, each under its
    disk id as export name."""
    legacy = {"type": server["type"], "data": {k: v for k, v in server.items() if k != "type"}}
    await qemu.cmd("nbd-server-start", {"addr": legacy})  # SocketAddressLegacy there
    await add_exports(qemu, disk_ids)


async def add_exports(qemu: QemuVM, disk_ids: list[str]) -> None:
    """Exports of ``disk_ids`` on the running NBD server (idempotent)."""
    nodes = await _node_names(qemu)
    named = {str(n.get("node-name")) for n in await qemu.cmd("query-named-block-nodes")}
    exported = {str(e.get("id")) for e in await qemu.cmd("query-block-exports")}
    for disk in disk_ids:
        if f"{EXPORT_PREFIX}{disk}" in exported:
            continue
        # a -drive has a device name; an encrypted disk's device sits on a named raw node
        node = nodes.get(f"drive-{disk}") or (f"drive-{disk}" if f"drive-{disk}" in named else None)
        if node is None:
            raise BlockCopyError(f"disk {disk}: the incoming QEMU has no drive-{disk}")
        await qemu.cmd("block-export-add", {"type": "nbd", "id": f"{EXPORT_PREFIX}{disk}",
                                            "node-name": node, "name": disk,
                                            "writable": True})  # fmt: skip


async def export_targets(qemu: QemuVM, spec: VMSpec, socket_path: Path) -> None:
    """The incoming QEMU's NBD server on ``socket_path`` for the copied disks, serving the
    plain ones at once; an encrypted one is added (``add_exports``) once its key arrived."""
    disks = copied_disks(spec)
    if not disks:
        return
    socket_path.unlink(missing_ok=True)
    await export_disks(qemu, [d.id for d in disks if not d.encrypt], unix_server(socket_path))


async def unexport_targets(qemu: QemuVM) -> None:
    """Stop serving the disks (before the guest runs here); idempotent."""
    exports = await qemu.cmd("query-block-exports")
    for e in exports:
        if str(e.get("id", "")).startswith(EXPORT_PREFIX):
            await qemu.cmd("block-export-del", {"id": e["id"], "mode": "hard"})
    if exports:
        deadline = time.monotonic() + 10
        while any(str(e.get("id", "")).startswith(EXPORT_PREFIX)
                  for e in await qemu.cmd("query-block-exports")):  # fmt: skip
            if time.monotonic() > deadline:
                raise BlockCopyError("the disk exports did not close")
            await asyncio.sleep(0.02)
    try:
        await qemu.cmd("nbd-server-stop")
    except Exception as e:  # noqa: BLE001 - "not running" is the goal reached
        if "not running" not in str(e).lower():
            raise


async def _node_names(qemu: QemuVM) -> dict[str, str]:
    blocks = await qemu.cmd("query-block")
    return {b["device"]: b["inserted"]["node-name"] for b in blocks if b.get("inserted")}


# ---------------------------------------------------------------------------- source
async def mirror_disk(
    qemu: QemuVM,
    disk: str,
    server: dict[str, Any],
    *,
    copy_mode: str = "background",
    speed_bps: int | None = None,
) -> None:
    """Connect an NBD client node to ``server``'s export of ``disk`` and mirror the drive of
    that id into it (``sync=full``)."""
    node = f"{NODE_PREFIX}{disk}"
    await qemu.cmd("blockdev-add", {"driver": "nbd", "node-name": node, "export": disk,
                                    "server": server})  # fmt: skip
    args: dict[str, Any] = {"job-id": f"{JOB_PREFIX}{disk}", "device": f"drive-{disk}",
                            "target": node, "sync": "full", "copy-mode": copy_mode,
                            "auto-dismiss": False}  # fmt: skip
    if speed_bps:
        args["speed"] = speed_bps
    await qemu.cmd("blockdev-mirror", args)


async def start_mirrors(
    qemu: QemuVM, spec: VMSpec, sockets: dict[str, Path], speed_bps: int | None = None
) -> None:
    """Mirror every copied disk into its relay socket, write-blocking (``speed_bps`` limits
    the background copy; the guest's own writes are never delayed)."""
    for d in copied_disks(spec):
        await mirror_disk(qemu, d.id, unix_server(sockets[d.id]), copy_mode="write-blocking",
                          speed_bps=speed_bps)  # fmt: skip


async def mirror_progress(qemu: QemuVM) -> list[DiskProgress]:
    """Every trustmig mirror job; raises BlockCopyError if one failed or vanished."""
    out = []
    for j in await qemu.cmd("query-block-jobs"):
        job = str(j.get("device", ""))
        if not job.startswith(JOB_PREFIX):
            continue
        if j.get("status") == "concluded" or j.get("error"):
            raise BlockCopyError(f"disk {job[len(JOB_PREFIX):]}: mirror failed "
                                 f"({j.get('error') or j.get('status')})")  # fmt: skip
        out.append(DiskProgress(job[len(JOB_PREFIX) :], int(j.get("offset", 0)),
                                int(j.get("len", 0)), bool(j.get("ready"))))  # fmt: skip
    return out


async def wait_mirrors_ready(
    qemu: QemuVM,
    spec: VMSpec,
    on_progress: Callable[[list[DiskProgress]], Any] | None = None,
    timeout: float = READY_TIMEOUT_S,
    poll_s: float = 0.1,
) -> list[DiskProgress]:
    """Wait until every copied disk's mirror is in sync; raises BlockCopyError."""
    want = {d.id for d in copied_disks(spec)}
    deadline = time.monotonic() + timeout
    while True:
        prog = await mirror_progress(qemu)
        if {p.disk for p in prog} != want:
            missing = sorted(want - {p.disk for p in prog})
            raise BlockCopyError(f"disk {', '.join(missing)}: mirror job is gone")
        if on_progress is not None:
            on_progress(prog)
        if all(p.ready for p in prog):
            return prog
        if time.monotonic() > deadline:
            raise BlockCopyError(f"disks not in sync after {timeout:.0f}s")
        await asyncio.sleep(poll_s)


async def finish_mirrors(qemu: QemuVM, *, force: bool = False) -> None:
    """End every trustmig mirror and drop its NBD node; idempotent. With the source stopped,
    cancelling a ready mirror leaves the target complete (``force`` for a failed copy)."""
    for j in await qemu.cmd("query-block-jobs"):
        job = str(j.get("device", ""))
        if not job.startswith(JOB_PREFIX):
            continue
        if j.get("status") not in ("concluded", "null"):
            # it may end by itself meanwhile
            with contextlib.suppress(Exception):
                await qemu.cmd("block-job-cancel", {"device": job, "force": force})
    deadline = time.monotonic() + 30
    while True:
        jobs = [j for j in await qemu.cmd("query-block-jobs")
                if str(j.get("device", "")).startswith(JOB_PREFIX)]  # fmt: skip
        for j in jobs:
            if j.get("status") == "concluded":
                await qemu.cmd("job-dismiss", {"id": j["device"]})
        if not jobs:
            break
        if time.monotonic() > deadline:
            raise BlockCopyError("disk mirrors did not end")
        await asyncio.sleep(0.02)
    for node in await qemu.cmd("query-named-block-nodes", {"flat": True}):
        name = str(node.get("node-name", ""))
        if name.startswith(NODE_PREFIX):
            with contextlib.suppress(Exception):  # gone already
                await qemu.cmd("blockdev-del", {"node-name": name})
