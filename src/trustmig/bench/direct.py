"""QEMU-to-QEMU migration with no agent in the path: the plaintext baseline and QEMU's own TLS.

``plain`` is QEMU's direct TCP migration. It exists only here and in the attack lab: trustmig
itself never migrates in plaintext, but every figure of the secure channel means something only
next to what the bare hypervisor achieves on the same host. ``qemu-tls`` is QEMU's native TLS
migration with host certificates from the cluster CA, the obvious alternative to trustmig's
channel. Both drive two :class:`QemuVM` objects directly, with the same migration parameters the
agents set (:func:`configure_source` / :func:`configure_destination`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustmig.bench.cpu import CpuMeter
from trustmig.bench.errors import BenchError
from trustmig.bench.record import finish_record, heartbeat_record, integrity_record, new_record
from trustmig.hypervisor.accel import AccelChoice
from trustmig.hypervisor.image import GuestImage
from trustmig.hypervisor.migration import (
    MigrationOptions,
    MigrationProgress,
    configure_destination,
    configure_source,
    query,
)
from trustmig.hypervisor.qemu import QemuVM
from trustmig.hypervisor.spec import VMSpec

TLS_OBJECT_ID = "bench-tls0"
READY_TIMEOUT_S = 300.0
CHECK_TIMEOUT_S = 180.0
_ENDED = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class QemuTls:
    """QEMU TLS directories (see ``write_qemu_tls_dir``) and the name the server proves."""

    server_dir: Path
    client_dir: Path
    server_hostname: str


async def _add_tls(vm: QemuVM, tls_dir: Path, endpoint: str, hostname: str | None) -> None:
    """Give QEMU a tls-creds-x509 object and make its migrations use it.

    The destination (server) verifies the source's client certificate; the source checks that
    the destination's certificate names ``hostname``.
    """
    args: dict[str, Any] = {
        "qom-type": "tls-creds-x509",
        "id": TLS_OBJECT_ID,
        "dir": str(tls_dir.resolve()),
        "endpoint": endpoint,
    }
    if endpoint == "server":
        args["verify-peer"] = True
    await vm.cmd("object-add", args)
    params: dict[str, Any] = {"tls-creds": TLS_OBJECT_ID}
    if hostname:
        params["tls-hostname"] = hostname
    await vm.cmd("migrate-set-parameters", params)


async def boot_source(
    spec: VMSpec, image: GuestImage, run_dir: Path, accel: AccelChoice,
    launcher: tuple[str, ...] = (),
) -> QemuVM:  # fmt: skip
    """Start the source guest and wait until its workload has filled memory (READY)."""
    vm = QemuVM(spec, image, run_dir, accel, launcher=launcher)
    try:
        await vm.start()
        await vm.console.wait_for("READY", READY_TIMEOUT_S)
    except TimeoutError:
        await vm.kill()
        raise BenchError(
            f"source guest not READY within {READY_TIMEOUT_S:.0f}s: lower --fill or --memory"
        ) from None
    except BaseException:
        await vm.kill()
        raise
    return vm


async def _incoming_port(dst: QemuVM) -> int:
    info = await dst.cmd("query-migrate")
    try:
        return int(info["socket-address"][0]["port"])
    except (KeyError, IndexError, TypeError, ValueError):
        raise BenchError(f"destination QEMU reported no listening port: {info}") from None


async def _wait_source(
    src: QemuVM, opts: MigrationOptions, t0: float
) -> tuple[MigrationProgress, bool]:
    """Poll the source until the migration ends; switch to post-copy when asked.

    Returns the last progress and whether post-copy was started.
    """
    postcopy_started = False
    while True:
        if not src.alive():
            raise BenchError(f"source QEMU exited during migration: {src.stderr_tail()}")
        prog = await query(src)
        if prog.status in _ENDED:
            return prog, postcopy_started
        if (
            opts.mode == "postcopy"
            and not postcopy_started
            and prog.status == "active"
            and prog.rounds >= opts.postcopy_after_rounds
        ):
            await src.cmd("migrate-start-postcopy")
            postcopy_started = True
        if time.monotonic() - t0 > opts.timeout_s:
            raise BenchError(
                f"migration did not finish within {opts.timeout_s:.0f}s "
                f"({prog.transferred} bytes moved): lower --memory or check the host load"
            )
        await asyncio.sleep(0.01 if prog.remaining < 64 * 1024 * 1024 else 0.05)


async def _wait_destination(dst: QemuVM, timeout: float) -> None:
    """The destination has loaded the whole stream (its own ``query-migrate`` says completed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not dst.alive():
            raise BenchError(f"destination QEMU exited while loading: {dst.stderr_tail()}")
        prog = await query(dst)
        if prog.status == "completed":
            return
        if prog.status == "failed":
            raise BenchError(f"destination QEMU failed to load the stream: {prog.error}")
        await asyncio.sleep(0.005)
    raise BenchError(f"destination did not finish loading within {timeout:.0f}s")


def _beats(vm: QemuVM, since: float) -> list[tuple[int, float]]:
    return [(h.seq, h.host_ts) for h in vm.console.heartbeats_since(since - 2.0)]


@dataclass(frozen=True)
class DirectPath:
    """Where the two QEMUs run and meet: launchers (``ip netns exec NS``) for each side, the
    address the destination listens on, and processes whose CPU counts for each side (the
    IPsec daemons, which do the ESP work)."""

    src_launcher: tuple[str, ...] = ()
    dst_launcher: tuple[str, ...] = ()
    address: str = "127.0.0.1"
    src_helpers: tuple[int, ...] = ()
    dst_helpers: tuple[int, ...] = ()
    #: the destination's listening port (0: any free one)
    port: int = 0


LOOPBACK = DirectPath()


async def run_direct(
    channel: str,
    spec: VMSpec,
    image: GuestImage,
    accel: AccelChoice,
    run_dir: Path,
    opts: MigrationOptions,
    tls: QemuTls | None,
    path: DirectPath = LOOPBACK,
) -> dict[str, Any]:
    """One migration between two fresh QEMUs (on loopback, or in the hosts' namespaces over
    ``path``); returns the run's record.

    Both QEMUs are stopped (by their own PIDs) whatever happens.
    """
    if channel == "qemu-tls" and tls is None:
        raise BenchError("qemu-tls needs TLS directories: none were prepared")
    rec = new_record(channel, spec, opts.mode)
    src: QemuVM | None = None
    dst: QemuVM | None = None
    try:
        src = await boot_source(spec, image, run_dir / "src", accel, path.src_launcher)
        before = await src.console.check(CHECK_TIMEOUT_S)
        dst = QemuVM(
            spec, image, run_dir / "dst", accel,
            incoming=True, start_paused=False, die_with_parent=True,
            prealloc=opts.prealloc_destination, launcher=path.dst_launcher,
        )  # fmt: skip
        await dst.start()
        await configure_destination(dst, opts)
        await configure_source(src, opts)
        if channel == "qemu-tls":
            assert tls is not None
            await _add_tls(dst, tls.server_dir, "server", None)
            await _add_tls(src, tls.client_dir, "client", tls.server_hostname)
        await dst.cmd("migrate-incoming", {"uri": f"tcp:{path.address}:{path.port}"})
        port = await _incoming_port(dst)
        cpu_src = CpuMeter().start(src.pid, *path.src_helpers)
        cpu_dst = CpuMeter().start(dst.pid, *path.dst_helpers)
        t0, t_wall = time.monotonic(), time.time()
        await src.cmd("migrate", {"uri": f"tcp:{path.address}:{port}"})
        prog, postcopy_started = await _wait_source(src, opts, t0)
        if prog.status != "completed":
            raise BenchError(
                f"{channel} migration ended {prog.status}: {prog.error or 'no reason given'}"
            )
        await _wait_destination(dst, 60)
        wall_ms = (time.monotonic() - t0) * 1000
        cpu_src.stop()
        cpu_dst.stop()
        if not prog.total_ms:
            await asyncio.sleep(0.2)  # QEMU 7.2: the first 'completed' may carry zeros
            prog = await query(src)
        if await dst.status() != "running":
            await dst.cmd("cont")
        state = await dst.status()
        if state != "running":
            raise BenchError(f"destination guest did not run after migration (state {state})")
        after = await dst.console.check(CHECK_TIMEOUT_S)
        rec.update(integrity_record(before, after, spec.needs_workload.dirty_rate))
        rec.update(heartbeat_record(_beats(src, t_wall), _beats(dst, t_wall)))
        finish_record(
            rec,
            prog,
            wall_ms=wall_ms,
            cpu_s_source=cpu_src.seconds,
            cpu_s_destination=cpu_dst.seconds,
            mode_used="postcopy" if postcopy_started else "precopy",
        )
    except Exception as e:  # a failed run is a result, reported per run
        rec["status"] = "failed"
        rec["error"] = (str(e).splitlines() or [type(e).__name__])[0]
        if src is not None and src.alive():
            with contextlib.suppress(Exception):
                await src.cmd("migrate_cancel", timeout=5)
    finally:
        if dst is not None:
            await dst.kill()
        if src is not None:
            await src.stop()
    return rec
