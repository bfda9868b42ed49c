"""CPU seconds consumed by one side of a migration (every process on that side).

A channel that encrypts in a separate process (the agent) would look free if only QEMU were
counted, so each side sums all its processes: QEMU alone for QEMU's own channels, QEMU plus the
agent and its migration relay for trustmig's secure channel, plus the IPsec daemon wherever the
traffic goes through the tunnel. Counters come from /proc and include every thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trustmig.hypervisor.qemu import process_cpu_seconds


@dataclass
class CpuMeter:
    """Difference of user+system CPU seconds between ``start`` and ``stop`` for a set of PIDs.

    A process may join late (``add``): its baseline is taken when it joins, which is how the
    destination QEMU of the secure path is counted, since the agent starts it mid-request.
    """

    baseline: dict[int, float] = field(default_factory=dict)
    final: dict[int, float] = field(default_factory=dict)
    #: CPU seconds known from elsewhere (e.g. reported by an agent for a process now gone).
    extra: float = 0.0

    def add(self, pid: int | None) -> None:
        if pid and pid not in self.baseline:
            self.baseline[pid] = process_cpu_seconds(pid)

    def start(self, *pids: int | None) -> CpuMeter:
        for p in pids:
            self.add(p)
        return self

    def stop(self) -> float:
        """Freeze the readings; returns the CPU seconds consumed since each PID's baseline."""
        for pid in self.baseline:
            self.final[pid] = process_cpu_seconds(pid)
        return self.seconds

    def of(self, pid: int | None) -> float | None:
        """One process's share (None if it was not counted)."""
        if not pid or pid not in self.baseline:
            return None
        return round(max(0.0, self.final.get(pid, self.baseline[pid]) - self.baseline[pid]), 3)

    @property
    def seconds(self) -> float:
        used = sum(max(0.0, self.final.get(p, b) - b) for p, b in self.baseline.items())
        return round(used + self.extra, 3)


def relay_pids(agent_pid: int | None) -> list[int]:
    """The migration relays an agent runs (its children running ``trustmig.relay``): they do the
    channel's encryption, so their CPU counts for the agent's side."""
    if not agent_pid:
        return []
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            if b"trustmig.relay" in (proc / "cmdline").read_bytes():
                out.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return out
