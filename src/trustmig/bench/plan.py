"""How fast the planner plans a large cluster, and how much better the cluster looks after.

The cluster is generated from a seed, so a run can be repeated exactly: hosts across zones,
countries and security levels (1% untrusted, as hosts whose attestation expired or that are
quarantined, 0.5% in maintenance), VMs of many tenants with a mix of destination rules (none,
zones, countries, a security level, an explicit host list), some pinned and some cooling after a
recent move, placed validly but skewed so that a third of the hosts carry most of the load.

Each goal is timed (best of ``repeat``; noise only adds) next to one linear pass over the view
(building the planner's working copy and its figures), so that the ratio ``plan/view_pass`` can
be compared across machines of different speed. Every plan is replayed by
:func:`trustmig.placement.violations`; the report counts what it finds (the goal: none).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

from trustmig.placement import (
    ClusterView,
    Goal,
    HostFacts,
    Plan,
    PlanLimits,
    VmFacts,
    plan,
    violations,
)
from trustmig.placement.state import WorkingCluster

ZONES = tuple(f"zone-{i}" for i in range(10))
COUNTRIES = ("DE", "FR", "NL", "SE", "US")
HOST_MEM_MIB = (262_144, 524_288, 786_432)
HOST_VCPUS = (32, 64, 96, 128)
VM_MEM_MIB = (2048, 4096, 8192, 16_384, 32_768)
VM_MEM_WEIGHTS = (10, 25, 30, 25, 10)
VM_VCPUS = (1, 2, 4, 8, 16)
#: the planner's goal for 1000 hosts and 20000 VMs, per goal (seconds)
PLAN_SECONDS_GOAL = 1.0


def _host(rng: random.Random, i: int) -> HostFacts:
    return HostFacts(
        name=f"host-{i:04d}",
        mem_mib=rng.choice(HOST_MEM_MIB),
        vcpus=rng.choice(HOST_VCPUS),
        country=COUNTRIES[i % len(COUNTRIES)],
        zone=ZONES[(i // len(COUNTRIES)) % len(ZONES)],
        security_level=rng.choice((0, 1, 1, 2, 2, 3)),
        trusted=rng.random() >= 0.01,
        accepts=rng.random() >= 0.005,
    )


def _rules(rng: random.Random, hosts: list[HostFacts]) -> dict[str, Any]:
    """A destination-rule mix: most VMs free, the rest bound by one kind of rule."""
    kind = rng.random()
    if kind < 0.60:
        return {}
    if kind < 0.80:
        return {"zones": frozenset(rng.sample(ZONES, rng.randint(1, 3)))}
    if kind < 0.90:
        return {"countries": frozenset(rng.sample(COUNTRIES, rng.randint(1, 2)))}
    if kind < 0.95:
        return {"min_security_level": rng.randint(1, 3)}
    return {"allowed_hosts": frozenset(h.name for h in rng.sample(hosts, rng.randint(5, 20)))}


def _vm(rng: random.Random, i: int, hosts: list[HostFacts]) -> VmFacts:
    vcpus = rng.choice(VM_VCPUS)
    return VmFacts(
        name=f"vm-{i:05d}",
        tenant=f"tenant-{rng.randrange(100):02d}",
        host="",
        mem_mib=rng.choices(VM_MEM_MIB, VM_MEM_WEIGHTS)[0],
        vcpus=vcpus,
        cpu_used=round(vcpus * rng.uniform(0.05, 0.6), 3),
        movable=rng.random() >= 0.01,
        cooling=rng.random() < 0.02,
        **_rules(rng, hosts),
    )


def _labels_allow(vm: VmFacts, host: HostFacts) -> bool:
    """The VM's rules on the host's labels only: VMs already run on untrusted hosts too."""
    return vm.may_run_on(HostFacts(host.name, host.mem_mib, host.vcpus, host.country,
                                   host.zone, host.security_level))  # fmt: skip


def generate_view(n_hosts: int, n_vms: int, seed: int) -> ClusterView:
    """A valid, skewed cluster: every VM on a host its rules allow, within memory, vCPUs
    (overcommit 4) and cores (measured CPU); a VM finding no room in a bounded search is left
    out.

    Raises ValueError for fewer than two hosts or a negative VM count."""
    if n_hosts < 2 or n_vms < 0:
        raise ValueError("a generated cluster needs at least 2 hosts and no negative VM count")
    rng = random.Random(seed)
    hosts = [_host(rng, i) for i in range(n_hosts)]
    heavy = max(1, n_hosts // 3)
    weights = [4.0 if i < heavy else 1.0 for i in range(n_hosts)]
    mem = [0] * n_hosts
    vcpus = [0] * n_hosts
    cpu = [0.0] * n_hosts
    placed: list[VmFacts] = []
    for i in range(n_vms):
        vm = _vm(rng, i, hosts)
        for h in _candidates(rng, vm, hosts, weights):
            host = hosts[h]
            if (mem[h] + vm.mem_mib <= host.mem_mib and vcpus[h] + vm.vcpus <= host.vcpus * 4
                    and cpu[h] + vm.cpu_used <= host.vcpus):  # fmt: skip
                mem[h] += vm.mem_mib
                vcpus[h] += vm.vcpus
                cpu[h] += vm.cpu_used
                placed.append(_on(vm, host.name))
                break
    return ClusterView(tuple(hosts), tuple(placed))


def _candidates(
    rng: random.Random, vm: VmFacts, hosts: list[HostFacts], weights: list[float]
) -> list[int]:
    """Up to 24 skewed draws among the hosts the VM's labels allow."""
    if vm.allowed_hosts:
        pool = [i for i, h in enumerate(hosts) if h.name in vm.allowed_hosts]
        return rng.sample(pool, len(pool))
    draws = rng.choices(range(len(hosts)), weights, k=24)
    return [i for i in draws if _labels_allow(vm, hosts[i])]


def _on(vm: VmFacts, host: str) -> VmFacts:
    fields = dict(vm.__dict__)
    fields["host"] = host
    return VmFacts(**fields)


def _best_time(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def _busiest_trusted(view: ClusterView) -> str:
    counts = Counter(vm.host for vm in view.vms)
    trusted = [h.name for h in view.hosts if h.trusted and h.accepts]
    return max(trusted, key=lambda n: (counts[n], n))


def _goal_report(view: ClusterView, p: Plan, seconds: float, limits: PlanLimits) -> dict[str, Any]:
    stuck = Counter(s.code.value for s in p.stuck)
    return {
        "plan_seconds": round(seconds, 4),
        "moves": len(p.moves),
        "moved_mib": sum(vm_mem for vm_mem in _moved_mem(view, p)),
        "stuck": dict(sorted(stuck.items())),
        "freed_hosts": len(p.freed_hosts),
        "before": p.before.to_json(),
        "after": p.after.to_json(),
        "violations": len(violations(view, p, limits)),
    }


def _moved_mem(view: ClusterView, p: Plan) -> list[int]:
    mem = {vm.name: vm.mem_mib for vm in view.vms}
    return [mem[m.vm] for m in p.moves]


def run_plan_bench(
    n_hosts: int, n_vms: int, seed: int = 1, repeat: int = 3, limits: PlanLimits | None = None
) -> dict[str, Any]:
    """Generate the cluster, plan each goal, and report times, figures and violations."""
    limits = limits or PlanLimits()
    view = generate_view(n_hosts, n_vms, seed)
    view_pass, _ = _best_time(lambda: WorkingCluster(view).figures(), repeat)
    target = _busiest_trusted(view)
    goals: dict[str, Any] = {}
    for goal in Goal:
        host = target if goal is Goal.EVACUATE else None
        seconds, p = _best_time(partial(plan, view, goal, host=host, limits=limits), repeat)
        goals[goal.value] = _goal_report(view, p, seconds, limits)
        goals[goal.value]["ratio_vs_view_pass"] = round(seconds / max(view_pass, 1e-9), 1)
    goals[Goal.EVACUATE.value]["host"] = target
    slowest = max(g["plan_seconds"] for g in goals.values())
    return {
        "hosts": len(view.hosts),
        "vms": len(view.vms),
        "vms_asked": n_vms,
        "seed": seed,
        "repeat": repeat,
        "view_pass_seconds": round(view_pass, 4),
        "goals": goals,
        "goal": {
            "plan_seconds_max": PLAN_SECONDS_GOAL,
            "slowest_plan_seconds": slowest,
            "met": slowest <= PLAN_SECONDS_GOAL,
            "violations": sum(g["violations"] for g in goals.values()),
        },
    }
