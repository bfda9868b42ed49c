"""One QEMU process, driven over QMP (QEMU's own `qemu.qmp` library).

The driver knows the process by PID *and* start time, never by name: it starts QEMU in a session
of its own (a guest outlives the agent that started it), connects QMP and the serial console over
unix sockets, and stops it with ``quit`` falling back to SIGKILL of that very process. A
restarted agent re-attaches to a running QEMU with :meth:`QemuVM.attach` from what it journaled
(:meth:`QemuVM.runtime`). QMP events are dispatched to callbacks (no unbounded event queue).
Harnesses that must not leave guests behind (benchmarks, lab targets) ask for
``die_with_parent``; agents never do.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.events import EventListener

from trustmig.hypervisor.accel import AccelChoice
from trustmig.hypervisor.console import Console
from trustmig.hypervisor.devices import (
    HostCannotRun,
    HostNet,
    create_tap,
    delete_tap,
    tap_name,
    tenant_bridge,
    tenant_tap,
)
from trustmig.hypervisor.diskcrypt import (
    MASTER_ID,
    MasterKey,
    blockdev_options,
    drive_options,
    secret_id,
    secret_pipe,
)
from trustmig.hypervisor.diskcrypt import qemu_path_opt as _opt
from trustmig.hypervisor.image import GuestImage
from trustmig.hypervisor.spec import (
    BridgeNet,
    DiskBoot,
    DiskSpec,
    KernelBoot,
    TenantNet,
    UserNet,
    VMSpec,
)
from trustmig.proc import ProcessRef
from trustmig.proc import cpu_seconds as _cpu_seconds
from trustmig.timeouts import within

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
EventCallback = Callable[[str, dict[str, Any]], None]


class QemuError(Exception):
    """QEMU could not be started or driven; the message says what and why."""


class _CallbackListener(EventListener):
    """An event listener without the unbounded history of the library's one."""

    async def put(self, event: Any) -> None:
        if self.accept(event):
            await self._queue.put(event)


def _placeholder_args(d: DiskSpec, drive: str) -> list[str]:
    """An incoming QEMU's encrypted disk before its key arrives: the device sits on a raw node
    over an empty placeholder of the disk's size (``attach_encrypted_disk`` swaps in the disk)."""
    if d.virtual_size is None:
        raise QemuError(f"disk {d.id}: the source did not say its virtual size")
    return ["-blockdev", f"driver=null-co,node-name=tm-ph-{d.id},size={d.virtual_size},"
            "read-zeroes=on",
            "-blockdev", f"driver=raw,node-name={drive},file=tm-ph-{d.id}"]  # fmt: skip


def _pdeathsig() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def find_qemu(binary: str = "qemu-system-x86_64") -> str:
    path = shutil.which(binary) if "/" not in binary else binary
    if not path or not os.access(path, os.X_OK):
        raise QemuError(
            f"QEMU binary {binary!r} not found: install qemu-system-x86 (scripts/bootstrap does)"
        )
    return path


def process_cpu_seconds(pid: int) -> float:
    """user+system CPU seconds of a process (all threads), from /proc."""
    return _cpu_seconds(pid)


class QemuVM:
    """A running (or incoming) QEMU guest."""

    def __init__(
        self,
        spec: VMSpec,
        image: GuestImage,
        run_dir: Path,
        accel: AccelChoice,
        *,
        binary: str = "qemu-system-x86_64",
        incoming: bool = False,
        start_paused: bool = False,
        die_with_parent: bool = False,
        prealloc: bool = False,
        extra_args: tuple[str, ...] = (),
        sock_dir: Path | None = None,
        host_net: HostNet | None = None,
        launcher: tuple[str, ...] = (),
    ) -> None:
        """``launcher`` prefixes QEMU's command line, e.g. ``ip netns exec NS`` (which execs
        QEMU: the PID stays QEMU's)."""
        self.spec = spec
        self.launcher = launcher
        self.host_net = host_net or HostNet()
        self.image = image
        self.run_dir = run_dir
        self.accel = accel
        self.binary = find_qemu(binary)
        self.incoming = incoming
        self.start_paused = start_paused
        self.die_with_parent = die_with_parent
        self.prealloc = prealloc
        self.extra_args = extra_args
        # unix socket paths are limited to 107 bytes: sockets may live in a short runtime dir
        self.sock_dir = sock_dir or run_dir
        self.qmp_path = self.sock_dir / "qmp.sock"
        self.serial_path = self.sock_dir / "serial.sock"
        self.boot_config_path = self.sock_dir / "boot.cfg"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ref: ProcessRef | None = None
        self.qmp = QMPClient(spec.name)
        # the library's listeners keep every event forever: the default one is told to accept
        # none, and ours hands each event to the callbacks without keeping a history
        self.qmp.events.event_filter = lambda _event: False
        self._listener = _CallbackListener()
        self.qmp.register_listener(self._listener)
        self._event_task: asyncio.Task[None] | None = None
        self._callbacks: list[EventCallback] = []
        self.console = Console(self.serial_path, run_dir / "console.log")
        self.started_at = 0.0
        #: keys of the encrypted disks this QEMU opens at start (held only until it started)
        self.disk_keys: dict[str, bytes] = {}
        #: the key disk passphrases travel under to this QEMU (None: no encrypted disk, or a
        #: QEMU adopted after an agent restart, which can be given no new disk)
        self.master: MasterKey | None = None
        self._master_fd: int | None = None

    def argv(self) -> list[str]:
        s = self.spec
        args = [
            self.binary,
            "-name", f"{s.name},debug-threads=on",
            "-machine", s.machine,
            "-accel", self.accel.accel,
            "-cpu", s.cpu or self.accel.cpu,
            "-m", f"{s.memory_mib}M",
            "-smp", str(s.vcpus),
            "-nodefaults", "-display", "none", "-no-reboot", "-no-user-config",
            *self._boot_args(),
            *self._secret_args(),
            *self._disk_args(),
            *self._nic_args(),
            "-chardev", f"socket,id=ser0,path={self.serial_path},server=on,wait=off",
            "-serial", "chardev:ser0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        if self.prealloc:
            args += ["-mem-prealloc"]
        if self.incoming:
            args += ["-incoming", "defer"]
        if self.start_paused:
            args += ["-S"]
        return args + list(self.extra_args)

    def _boot_args(self) -> list[str]:
        boot = self.spec.boot
        if isinstance(boot, DiskBoot):
            return []
        if isinstance(boot, KernelBoot):
            kernel, initrd = boot.kernel, boot.initrd
        else:
            kernel, initrd = self.image.kernel, self.image.initrd
        args = ["-kernel", _opt(kernel)]
        if initrd is not None:
            args += ["-initrd", _opt(initrd)]
        # the command line can carry the workload's secret: it goes in a private file that
        # QEMU reads, never in argv where every user of the host sees it in ps
        return [*args, "-readconfig", str(self.boot_config_path)]

    def _secret_args(self) -> list[str]:
        """The master key (from an inherited pipe), then each encrypted disk's passphrase
        under it; an incoming QEMU gets its disks' keys later (``attach_encrypted_disk``)."""
        if self._master_fd is None or self.master is None:
            return []
        args = ["-object", f"secret,id={MASTER_ID},file=/dev/fd/{self._master_fd},format=raw"]
        if not self.incoming:
            for d in self.spec.disks:
                if d.encrypt:
                    args += ["-object", self.master.disk_secret_arg(d.id, self._key(d))]
        return args

    def _key(self, d: DiskSpec) -> bytes:
        key = self.disk_keys.get(d.id)
        if key is None:
            raise QemuError(f"VM {self.spec.name}: disk {d.id} is encrypted and has no key")
        return key

    def _disk_args(self) -> list[str]:
        args: list[str] = []
        boot_disk = isinstance(self.spec.boot, DiskBoot)
        for i, d in enumerate(self.spec.disks):
            drive = f"drive-{d.id}"
            ro = "on" if d.read_only else "off"
            if d.encrypt and self.incoming:
                args += _placeholder_args(d, drive)
            elif d.encrypt:
                args += ["-drive", f"file={_opt(d.path)},if=none,id={drive},{drive_options(d)},"
                         f"cache={d.cache},readonly={ro}"]  # fmt: skip
            else:
                args += ["-drive", f"file={_opt(d.path)},if=none,id={drive},format={d.format},"
                         f"cache={d.cache},readonly={ro}"]  # fmt: skip
            dev = "virtio-blk-pci" if d.bus == "virtio-blk" else "nvme"
            opts = f"{dev},drive={drive},id={d.id},serial={d.drive_serial()}"
            if boot_disk:
                opts += f",bootindex={i}"
            args += ["-device", opts]
        return args

    def _nic_args(self) -> list[str]:
        args: list[str] = []
        for n in self.spec.nics:
            netdev = f"net-{n.id}"
            if isinstance(n.backend, UserNet):
                fwd = "".join(
                    f",hostfwd={f.proto}:{self.host_net.forward_address}:{f.host_port}-"
                    f":{f.guest_port}"
                    for f in n.backend.forwards
                )
                # a host that keeps tenants apart lets no user-mode guest reach its own
                # networks (the VXLAN underlay among them): forwarded ports only
                restrict = ",restrict=on" if self.host_net.tenants_only else ""
                args += ["-netdev", f"user,id={netdev}{fwd}{restrict}"]
            else:
                args += ["-netdev", f"tap,id={netdev},ifname={self.tap_for(n.id)},"
                         "script=no,downscript=no"]  # fmt: skip
            args += ["-device", f"{n.model},netdev={netdev},mac={n.mac},id={n.id}"]
        return args

    def tap_for(self, nic_id: str) -> str:
        nic = next((n for n in self.spec.nics if n.id == nic_id), None)
        vni = self.host_net.vni_of(self.spec.tenant)
        if nic is not None and isinstance(nic.backend, TenantNet) and vni is not None:
            return tenant_tap(vni, str(self.run_dir), nic_id)
        return tap_name(str(self.run_dir), nic_id)

    def _bridged_taps(self) -> list[tuple[str, str]]:
        """(tap, bridge) of every NIC on a host bridge: a named one, or its tenant's."""
        out = []
        for n in self.spec.nics:
            if isinstance(n.backend, BridgeNet):
                out.append((self.tap_for(n.id), n.backend.bridge))
            elif isinstance(n.backend, TenantNet):
                vni = self.host_net.vni_of(self.spec.tenant)
                if vni is None:
                    raise QemuError(
                        f"VM {self.spec.name}: tenant {self.spec.tenant} has no "
                        "network segment on this host ([tenant_networks] vnis)"
                    )
                out.append((self.tap_for(n.id), tenant_bridge(vni)))
        return out

    def _write_boot_config(self) -> None:
        """The kernel command line as a QEMU config file readable by its owner only."""
        if isinstance(self.spec.boot, DiskBoot):
            return
        cmdline = self.spec.kernel_cmdline()
        if '"' in cmdline or "\n" in cmdline:
            raise QemuError("kernel command line must not contain quotes or newlines")
        fd = os.open(self.boot_config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f'[machine]\n  append = "{cmdline}"\n')

    @property
    def pid(self) -> int | None:
        return self.ref.pid if self.ref else None

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.ref is not None and self.ref.alive()

    def runtime(self) -> dict[str, Any]:
        """What the journal keeps to find this QEMU again after an agent restart."""
        return {
            "process": self.ref.to_json() if self.ref else None,
            "run_dir": str(self.run_dir),
            "sock_dir": str(self.sock_dir),
            "incoming": self.incoming,
            "started_at": self.started_at,
        }

    def on_event(self, callback: EventCallback) -> Callable[[], None]:
        """Call ``callback(name, data)`` for every QMP event; returns the unsubscriber."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    async def _dispatch_events(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            async for ev in self._listener:
                for cb in list(self._callbacks):
                    try:
                        raw = ev.get("data")
                        cb(str(ev.get("event")), dict(raw) if isinstance(raw, dict) else {})
                    except Exception:  # noqa: BLE001 - a callback bug must not stop the others
                        log.exception("QMP event callback failed")

    async def start(
        self, timeout: float = 20.0, on_spawn: Callable[[], None] | None = None
    ) -> None:
        """Spawn QEMU and connect to it; ``on_spawn`` runs as soon as the process exists (the
        agent journals it there, so no QEMU is ever unknown to a restarted agent)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.sock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for p in (self.qmp_path, self.serial_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self._write_boot_config()
        for tap, bridge in self._bridged_taps():
            try:
                create_tap(tap, bridge, self.host_net.netns)
            except HostCannotRun as e:
                raise QemuError(f"VM {self.spec.name}: {e}") from None
        with contextlib.ExitStack() as stack:
            fds = self._open_master(stack)
            stderr = stack.enter_context((self.run_dir / "qemu.stderr").open("ab"))
            self.proc = subprocess.Popen(
                [*self.launcher, *self.argv()],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                preexec_fn=_pdeathsig if self.die_with_parent else None,
                start_new_session=True,
                pass_fds=fds,
            )
        self._master_fd = None
        self.disk_keys = {}  # QEMU holds them now; the agent keeps only the master key
        self.started_at = time.time()
        try:
            self.ref = ProcessRef.of(self.proc.pid)
        except ProcessLookupError:
            msg = f"QEMU for {self.spec.name} exited at start: {self.stderr_tail()}"
            raise QemuError(msg) from None
        if on_spawn is not None:
            on_spawn()
        await self._connect(timeout)

    def _open_master(self, stack: contextlib.ExitStack) -> list[int]:
        """A fresh master key in a pipe for QEMU to read at start, if any disk is encrypted."""
        if not any(d.encrypt for d in self.spec.disks):
            return []
        self.master = MasterKey()
        self._master_fd = stack.enter_context(secret_pipe(self.master.key))
        return [self._master_fd]

    async def attach_encrypted_disk(self, d: DiskSpec, key: bytes) -> None:
        """Open encrypted disk ``d`` in this incoming QEMU (paused, not yet loaded) now that its
        key arrived: the passphrase object, the LUKS node, then the device's node switched from
        its placeholder to it. Idempotent; raises QemuError."""
        if self.master is None:
            raise QemuError(f"VM {self.spec.name}: this QEMU was started by an earlier agent "
                            "and cannot be given a disk key; migrate again")  # fmt: skip
        nodes = {n.get("node-name") for n in await self.cmd("query-named-block-nodes")}
        real = f"tm-enc-{d.id}"
        if real not in nodes:
            with contextlib.suppress(Exception):  # a repeated attach finds it there
                await self.cmd("object-del", {"id": secret_id(d.id)})
            await self.cmd("object-add", self.master.disk_secret_qmp(d.id, key))
            await self.cmd("blockdev-add", blockdev_options(d, real))
        await self.cmd("blockdev-reopen",
                       {"options": [{"driver": "raw", "node-name": f"drive-{d.id}",
                                     "file": real}]})  # fmt: skip
        if f"tm-ph-{d.id}" in nodes:
            await self.cmd("blockdev-del", {"node-name": f"tm-ph-{d.id}"})

    async def attach(self, ref: ProcessRef, started_at: float = 0.0, timeout: float = 10.0) -> None:
        """Re-attach to a QEMU started earlier (by this agent before it restarted).

        Raises QemuError if the process is gone or its sockets do not answer."""
        if not ref.alive():
            raise QemuError(f"QEMU for {self.spec.name} (pid {ref.pid}) is gone")
        self.ref = ref
        self.started_at = started_at
        await self._connect(timeout)

    async def _connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise QemuError(f"QEMU for {self.spec.name} exited: {self.stderr_tail()}")
            try:
                await self.qmp.connect(str(self.qmp_path))
                break
            except Exception:
                if time.monotonic() > deadline:
                    await self.kill()
                    raise QemuError(
                        f"QEMU for {self.spec.name}: no QMP socket in {timeout}s"
                    ) from None
                await asyncio.sleep(0.02)
        self._event_task = asyncio.create_task(self._dispatch_events())
        await self.console.connect(timeout=max(1.0, deadline - time.monotonic()))

    def stderr_tail(self, n: int = 3) -> str:
        try:
            lines = (self.run_dir / "qemu.stderr").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no stderr)"
        return " | ".join(lines[-n:]) or "(no stderr)"

    async def cmd(
        self,
        name: str,
        args: dict[str, Any] | None = None,
        timeout: float = 30,
        *,
        oob: bool = False,
    ) -> Any:
        """Run a QMP command. ``oob`` uses QEMU's out-of-band execution, which still works when
        the main loop is blocked (e.g. a post-copy destination waiting for missing pages)."""
        if not self.alive():
            raise QemuError(f"QEMU for {self.spec.name} is not running")
        return await within(self.qmp.execute(name, args or {}, oob=oob), timeout)

    async def status(self) -> str:
        """QEMU run state ('running', 'paused', 'inmigrate', 'postmigrate'...) or 'absent'."""
        if not self.alive():
            return "absent"
        try:
            res = await self.cmd("query-status", timeout=5)
            return str(res["status"])
        except Exception:
            return "absent" if not self.alive() else "unresponsive"

    def cpu_seconds(self) -> float:
        return _cpu_seconds(self.ref.pid) if self.ref else 0.0

    async def stop(self, timeout: float = 5.0) -> None:
        """Quit QEMU, politely first; make sure that very process is gone."""
        if self.ref is None:
            return
        if self.alive():
            with contextlib.suppress(Exception):
                await within(self.qmp.execute("quit"), 2)
        await self._reap(timeout)

    async def kill(self) -> None:
        """Kill QEMU at once (a half-received guest must never run)."""
        if self.ref is not None and self.alive():
            self.ref.signal(signal.SIGKILL)
        await self._reap(5)

    async def _reap(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.alive() and self.ref is not None:
            self.ref.signal(signal.SIGKILL)
            while self.alive():
                await asyncio.sleep(0.02)
        await self.detach()
        for tap, _bridge in self._bridged_taps():
            delete_tap(tap, self.host_net.netns)
        if self.sock_dir != self.run_dir:
            shutil.rmtree(self.sock_dir, ignore_errors=True)

    async def detach(self) -> None:
        """Drop QMP and the console but leave QEMU running (the agent is stopping)."""
        if self._event_task is not None:
            self._event_task.cancel()
            with contextlib.suppress(BaseException):
                await self._event_task
            self._event_task = None
        with contextlib.suppress(BaseException):
            await within(self.qmp.disconnect(), 2)
        await self.console.close()
