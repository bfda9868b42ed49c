"""Processes known by PID *and* start time, so that a recycled PID is never mistaken for ours.

Guests and relays outlive the agent that started them; a restarted agent finds them again by
what it journaled. A PID alone could by then name an unrelated process: the start time (clock
ticks since boot, from ``/proc/PID/stat``) pins the very process. Signals are only ever sent
after that check.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: split after the last ')'
    return raw.rsplit(")", 1)[1].split()


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it does not exist."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def cpu_seconds(pid: int) -> float:
    """user+system CPU seconds of a process (all threads)."""
    fields = _stat_fields(pid)
    if not fields:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass(frozen=True)
class ProcessRef:
    """One process, as journaled: ``pid`` and ``start`` (ticks since boot)."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        st = start_ticks(pid)
        if st is None:
            raise ProcessLookupError(f"no process {pid}")
        return cls(pid, st)

    def alive(self) -> bool:
        """The very same process exists and is not a zombie (a zombie runs nothing)."""
        fields = _stat_fields(self.pid)
        return bool(fields) and fields[0] != "Z" and int(fields[19]) == self.start  # type: ignore[index]

    def signal(self, sig: int) -> bool:
        """Send ``sig`` if the process is still this one; False if it is gone."""
        if not self.alive():
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
            return True
        return False

    def wait_gone(self, timeout: float) -> bool:
        """Poll until the process is gone (it need not be our child); True if it is."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, os.WNOHANG)  # reap it if it happens to be our child
            time.sleep(0.02)
        return True

    def kill(self, timeout: float = 5.0) -> bool:
        """SIGKILL and wait; True once it is gone."""
        self.signal(signal.SIGKILL)
        return self.wait_gone(timeout)

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start": self.start}

    @classmethod
    def from_json(cls, doc: dict[str, int] | None) -> ProcessRef | None:
        if not doc:
            return None
        return cls(int(doc["pid"]), int(doc["start"]))
