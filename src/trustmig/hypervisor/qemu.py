"""One QEMU process, driven over QMP (QEMU's own `qemu.qmp` library).

The driver owns the process by PID and never by name: it starts QEMU, connects QMP and the serial
console over unix sockets in the VM's run directory, and stops it with ``quit`` falling back to
SIGKILL of its own child. Incoming (not yet committed) QEMUs get PR_SET_PDEATHSIG so that a
destination agent that dies mid-migration cannot leave a half-received guest behind.
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
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from trustmig.hypervisor.accel import AccelChoice
from trustmig.hypervisor.console import Console
from trustmig.hypervisor.image import GuestImage
from trustmig.hypervisor.spec import VMSpec

log = logging.getLogger(__name__)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1


class QemuError(Exception):
    """QEMU could not be started or driven; the message says what and why."""


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
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


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
    ) -> None:
        self.spec = spec
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
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp = QMPClient(spec.name)
        self.console = Console(self.serial_path, run_dir / "console.log")
        self.started_at = 0.0

    def argv(self) -> list[str]:
        s = self.spec
        args = [
            self.binary,
            "-name", f"{s.name},debug-threads=on",
            "-accel", self.accel.accel,
            "-cpu", self.accel.cpu,
            "-m", f"{s.memory_mib}M",
            "-smp", str(s.vcpus),
            "-nodefaults", "-display", "none", "-no-reboot", "-no-user-config",
            "-kernel", str(self.image.kernel),
            "-initrd", str(self.image.initrd),
            "-append", s.kernel_cmdline(),
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

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self, timeout: float = 20.0) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.sock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for p in (self.qmp_path, self.serial_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        stderr = (self.run_dir / "qemu.stderr").open("ab")
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            preexec_fn=_pdeathsig if self.die_with_parent else None,
            start_new_session=True,
        )
        stderr.close()
        self.started_at = time.time()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise QemuError(f"QEMU for {self.spec.name} exited at start: {self.stderr_tail()}")
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
        return await asyncio.wait_for(self.qmp.execute(name, args or {}, oob=oob), timeout)

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
        return process_cpu_seconds(self.proc.pid) if self.proc else 0.0

    async def stop(self, timeout: float = 5.0) -> None:
        """Quit QEMU, politely first; always reap the child."""
        if self.proc is None:
            return
        if self.alive():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), 2)
        await self._reap(timeout)

    async def kill(self) -> None:
        """Kill QEMU at once (a half-received guest must never run)."""
        if self.proc and self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        await self._reap(5)

    async def _reap(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            while self.proc.poll() is None:
                await asyncio.sleep(0.02)
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(self.qmp.disconnect(), 2)
        await self.console.close()
        if self.sock_dir != self.run_dir:
            import shutil as _sh

            _sh.rmtree(self.sock_dir, ignore_errors=True)
