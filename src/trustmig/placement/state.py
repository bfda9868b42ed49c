"""The planner's working copy of a cluster: per-host sums that moves update in O(1).

Internal to the placement package; the planner and the checker share it so that both count
capacity the same way.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from trustmig.placement.model import ClusterView, Figures, HostFacts, PlanLimits, VmFacts

RuleKey = tuple[frozenset[str], frozenset[str], frozenset[str], int]


@dataclass
class Neighbourhood:
    """Who runs on a host, as co-residency needs it: counts that a move updates in O(1)."""

    count: int = 0
    tenants: Counter[str] = field(default_factory=Counter)
    alone: int = 0  # residents that want a host of their own
    tenant_only: Counter[str] = field(default_factory=Counter)  # per tenant: "own tenant only"
    tenant_only_total: int = 0
    excluded: Counter[str] = field(default_factory=Counter)  # tenants some resident refuses

    def add(self, vm: VmFacts, sign: int = 1) -> None:
        """Count ``vm`` in (``sign`` 1) or out (-1)."""
        self.count += sign
        _bump(self.tenants, vm.tenant, sign)
        self.alone += sign * (vm.neighbours == "none")
        if vm.neighbours == "tenant":
            _bump(self.tenant_only, vm.tenant, sign)
            self.tenant_only_total += sign
        for t in vm.never_with:
            _bump(self.excluded, t, sign)

    def admits(self, vm: VmFacts) -> bool:
        """The newcomer's rules and every resident's (the newcomer is not counted in)."""
        plain = not (self.alone or self.tenant_only_total or self.excluded)
        if plain and vm.neighbours == "any" and not vm.never_with:
            return True  # the common case, kept cheap: nobody here or there has a rule
        foreign = self.count - self.tenants.get(vm.tenant, 0)
        if (vm.neighbours == "none" and self.count) or (vm.neighbours == "tenant" and foreign):
            return False
        if self.alone or any(t in self.tenants for t in vm.never_with):
            return False
        foreign_tenant_only = self.tenant_only_total - self.tenant_only.get(vm.tenant, 0)
        return not foreign_tenant_only and vm.tenant not in self.excluded


def _bump(c: Counter[str], key: str, by: int) -> None:
    c[key] += by
    if c[key] <= 0:
        del c[key]


@dataclass
class HostUse:
    """What one host holds now, in the plan being built."""

    facts: HostFacts
    mem_mib: int = 0
    vcpus: int = 0
    cpu_used: float = 0.0
    vms: set[str] = field(default_factory=set)
    near: Neighbourhood = field(default_factory=Neighbourhood)

    def load(self) -> float:
        """The larger of memory and CPU use, as a fraction of attested capacity."""
        f = self.facts
        return max(self.mem_mib / f.mem_mib, self.cpu_used / f.vcpus)

    def load_with(self, vm: VmFacts) -> float:
        f = self.facts
        return max((self.mem_mib + vm.mem_mib) / f.mem_mib, (self.cpu_used + vm.cpu_used) / f.vcpus)

    def load_without(self, vm: VmFacts) -> float:
        f = self.facts
        return max((self.mem_mib - vm.mem_mib) / f.mem_mib, (self.cpu_used - vm.cpu_used) / f.vcpus)

    def fits(self, vm: VmFacts, limits: PlanLimits) -> bool:
        """Memory is never overcommitted; vCPUs up to the operator's ratio; the CPU the guests
        measurably use must stay within the host's cores."""
        f = self.facts
        return (
            self.mem_mib + vm.mem_mib <= f.mem_mib
            and self.vcpus + vm.vcpus <= f.vcpus * limits.vcpu_overcommit
            and self.cpu_used + vm.cpu_used <= f.vcpus
            and self.near.admits(vm)
        )

    def active(self) -> bool:
        """Counted in the figures and eligible for balance and consolidate."""
        return self.facts.trusted and self.facts.accepts


class WorkingCluster:
    """Hosts' sums, VMs' current hosts, and eligibility sets cached per rule key."""

    def __init__(self, view: ClusterView) -> None:
        self.hosts = {h.name: HostUse(h, cpu_used=h.cpu_used) for h in view.hosts}
        self.vms = {vm.name: vm for vm in view.vms}
        self.where = {vm.name: vm.host for vm in view.vms}
        guest_cpu = dict.fromkeys(self.hosts, 0.0)
        for vm in view.vms:
            use = self.hosts[vm.host]
            use.mem_mib += vm.mem_mib
            use.vcpus += vm.vcpus
            use.vms.add(vm.name)
            use.near.add(vm)
            guest_cpu[vm.host] += vm.cpu_used
        for name, use in self.hosts.items():
            # a host's measured use is at least its guests' (the rest is its own overhead)
            use.cpu_used = max(use.cpu_used, guest_cpu[name])
        self._eligible: dict[RuleKey, frozenset[str]] = {}
        self._by_vm: dict[str, frozenset[str]] = {}

    def eligible(self, vm: VmFacts) -> frozenset[str]:
        """Hosts whose trust and labels satisfy the VM's rules (capacity not considered)."""
        found = self._by_vm.get(vm.name)
        if found is not None:
            return found
        key = vm.rule_key()
        found = self._eligible.get(key)
        if found is None:
            pool = (
                [self.hosts[n] for n in vm.allowed_hosts if n in self.hosts]
                if vm.allowed_hosts
                else self.hosts.values()
            )
            found = frozenset(u.facts.name for u in pool if vm.may_run_on(u.facts))
            self._eligible[key] = found
        self._by_vm[vm.name] = found
        return found

    def move(self, vm_name: str, destination: str) -> None:
        vm = self.vms[vm_name]
        src, dst = self.hosts[self.where[vm_name]], self.hosts[destination]
        src.mem_mib -= vm.mem_mib
        src.vcpus -= vm.vcpus
        src.cpu_used -= vm.cpu_used
        src.vms.discard(vm_name)
        src.near.add(vm, -1)
        dst.near.add(vm)
        dst.mem_mib += vm.mem_mib
        dst.vcpus += vm.vcpus
        dst.cpu_used += vm.cpu_used
        dst.vms.add(vm_name)
        self.where[vm_name] = destination

    def figures(self) -> Figures:
        active = [u for u in self.hosts.values() if u.active()]
        loads = [u.load() for u in active]
        if not loads:
            return Figures(0, 0, len(self.vms), 0.0, 0.0, 0.0)
        mean = sum(loads) / len(loads)
        sd = math.sqrt(sum((x - mean) ** 2 for x in loads) / len(loads))
        in_use = sum(1 for u in active if u.vms)
        return Figures(len(active), in_use, len(self.vms), sd, max(loads) - min(loads), max(loads))
