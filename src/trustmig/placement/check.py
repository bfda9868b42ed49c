"""Replay a plan against the view it was made from and name every rule it breaks.

The planner's tests hold every generated plan to this, and the executor runs it once more
before the first move, on the view it reads then: a plan made from a stale view is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from trustmig.placement.model import ClusterView, Plan, PlanLimits
from trustmig.placement.state import WorkingCluster


@dataclass(frozen=True)
class Violation:
    """Move ``index`` of the plan breaks rule ``code`` (or -1: the plan as a whole)."""

    index: int
    vm: str
    code: str
    why: str


def violations(view: ClusterView, plan: Plan, limits: PlanLimits | None = None) -> list[Violation]:
    """Every broken rule, in plan order (empty: the plan is sound for ``view``)."""
    limits = limits or PlanLimits()
    wc = WorkingCluster(view)
    found: list[Violation] = []
    moved: set[str] = set()
    for i, m in enumerate(plan.moves):
        problem = _move_problem(wc, m.vm, m.source, m.destination, moved, limits)
        if problem is not None:
            found.append(Violation(i, m.vm, *problem))
            continue
        wc.move(m.vm, m.destination)
        moved.add(m.vm)
    for name in plan.freed_hosts:
        if wc.hosts.get(name) is None or wc.hosts[name].vms:
            why = f"host {name} is named freed but holds VMs"
            found.append(Violation(-1, "", "not_freed", why))
    return found


def _move_problem(
    wc: WorkingCluster, vm_name: str, src: str, dst: str, moved: set[str], limits: PlanLimits
) -> tuple[str, str] | None:
    vm = wc.vms.get(vm_name)
    if vm is None:
        return "unknown_vm", f"VM {vm_name} is not in the view"
    if vm_name in moved:
        return "moved_twice", f"VM {vm_name} moves twice in one plan"
    if wc.where[vm_name] != src:
        return "wrong_source", f"VM {vm_name} runs on {wc.where[vm_name]}, not {src}"
    if not vm.movable:
        return "pinned", f"VM {vm_name} may not migrate"
    target = wc.hosts.get(dst)
    if target is None or dst == src:
        return "bad_destination", f"{dst} is not another host of the view"
    if not vm.may_run_on(target.facts):
        return "policy", f"{dst} is untrusted, not accepting or outside VM {vm_name}'s rules"
    if not target.near.admits(vm):
        return "co_residency", f"{dst}'s residents and VM {vm_name}'s rules forbid sharing it"
    if not target.fits(vm, limits):
        return "capacity", f"{dst} has no room for VM {vm_name} at this point of the plan"
    return None
