"""CPU seconds consumed by one side of a migration (every process on that side).

A channel that encrypts in a separate process (the agent) would look free if only QEMU were
counted, so each side sums all its processes: QEMU alone for QEMU's own channels, QEMU plus the
agent and its migration relay for trustmig's secure channel, plus the IPsec daemon wherever the
traffic goes through the tunnel. Counters come from /proc and include every thread; a process
gone before the reading (the relays, the source QEMU) is added as ``extra`` from its own report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def _used(self, pid: int) -> float:
        base = self.baseline[pid]
        return max(0.0, self.final.get(pid, base) - base)

    def of(self, pid: int | None) -> float | None:
        """One process's share (None if it was not counted)."""
        if not pid or pid not in self.baseline:
            return None
        return round(self._used(pid), 3)

    @property
    def seconds(self) -> float:
        used = sum(self._used(p) for p in self.baseline)
        return round(used + self.extra, 3)
