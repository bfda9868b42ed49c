"""The VMs a host owns, and the per-VM facts the agent reports."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from trustmig.hypervisor.qemu import QemuVM
from trustmig.hypervisor.spec import VMSpec


@dataclass
class ManagedVM:
    """A guest this host owns. ``state`` is the agent's view; QEMU's run state is queried live."""

    spec: VMSpec
    qemu: QemuVM
    state: str = "starting"  # starting | running | migrating-out | migrated | stopped | failed
    created_at: float = field(default_factory=time.time)
    arrived_by: str | None = None  # migration id that brought it here
    history: list[dict[str, Any]] = field(default_factory=list)

    async def describe(self) -> dict[str, Any]:
        hbs = self.qemu.console.heartbeats
        return {
            "name": self.spec.name,
            "state": self.state,
            "qemu_state": await self.qemu.status(),
            "pid": self.qemu.pid,
            "memory_mib": self.spec.memory_mib,
            "vcpus": self.spec.vcpus,
            "tenant": self.spec.tenant,
            "owner": self.spec.owner,
            "last_heartbeat": hbs[-1].seq if hbs else None,
            "arrived_by": self.arrived_by,
        }
