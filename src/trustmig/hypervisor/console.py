"""Serial console capture: the guest's only voice.

The console is a unix socket QEMU serves; the agent connects as soon as QEMU starts so no line is
lost, timestamps every line with the host wall clock on arrival (heartbeat gaps across two hosts
assume NTP-synced clocks, which a loopback demo trivially has), and can write commands to the
workload (``check``, ``pause``...).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from trustmig.hypervisor.console_protocol import CheckResult, Heartbeat, parse_console_line
from trustmig.timeouts import within

MAX_LINES = 20000
MAX_HEARTBEATS = 200000


@dataclass(frozen=True)
class StampedHeartbeat:
    seq: int
    mono_ns: int
    host_ts: float


class Console:
    """Reads a QEMU serial socket in the background; keeps bounded history."""

    def __init__(self, path: Path, log_path: Path | None = None) -> None:
        self.path = path
        self.lines: deque[tuple[float, str]] = deque(maxlen=MAX_LINES)
        self.heartbeats: deque[StampedHeartbeat] = deque(maxlen=MAX_HEARTBEATS)
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._log_path = log_path
        self._log: TextIO | None = None
        self._waiters: list[tuple[str, asyncio.Future[str]]] = []
        self.closed = asyncio.Event()

    async def connect(self, timeout: float = 10.0) -> None:
        if self._log_path is not None and self._log is None:
            self._log = self._log_path.open("a", buffering=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)
        self._writer = writer
        self._task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        buf = b""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                ts = time.time()
                buf += data
                *complete, buf = buf.split(b"\n")
                for raw in complete:
                    self._line(ts, raw.decode(errors="replace").strip("\r\x00 "))
                if len(buf) > 65536:
                    buf = buf[-4096:]
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self.closed.set()

    def _line(self, ts: float, line: str) -> None:
        if not line:
            return
        ev = parse_console_line(line)
        if isinstance(ev, Heartbeat):
            self.heartbeats.append(StampedHeartbeat(ev.seq, ev.mono_ns, ts))
            return
        self.lines.append((ts, line))
        if self._log:
            self._log.write(f"{ts:.3f} {line}\n")
        for prefix, fut in list(self._waiters):
            if line.startswith(prefix) and not fut.done():
                fut.set_result(line)
                self._waiters.remove((prefix, fut))

    def grep(self, prefix: str) -> list[str]:
        return [line for _, line in self.lines if line.startswith(prefix)]

    async def wait_for(self, prefix: str, timeout: float) -> str:
        """Wait for a line starting with ``prefix`` (also matches lines already seen)."""
        seen = self.grep(prefix)
        if seen:
            return seen[-1]
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.append((prefix, fut))
        try:
            return await within(fut, timeout)
        finally:
            if (prefix, fut) in self._waiters:
                self._waiters.remove((prefix, fut))

    async def command(self, cmd: str, reply_prefix: str, timeout: float = 60.0) -> str:
        """Send a workload command and wait for the *next* reply line with ``reply_prefix``."""
        if self._writer is None:
            raise RuntimeError("console not connected")
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.append((reply_prefix, fut))
        self._writer.write(cmd.encode() + b"\n")
        await self._writer.drain()
        try:
            return await within(fut, timeout)
        finally:
            if (reply_prefix, fut) in self._waiters:
                self._waiters.remove((reply_prefix, fut))

    async def check(self, timeout: float = 120.0) -> CheckResult:
        line = await self.command("check", "CHECK ", timeout)
        ev = parse_console_line(line)
        if not isinstance(ev, CheckResult):
            raise RuntimeError(f"unexpected reply to check: {line!r}")
        return ev

    def heartbeats_since(self, host_ts: float) -> list[StampedHeartbeat]:
        return [h for h in self.heartbeats if h.host_ts >= host_ts]

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._writer:
            self._writer.close()
        if self._log:
            self._log.close()
            self._log = None
