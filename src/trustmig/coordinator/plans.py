"""Plans on a gathered view: a fresh one, or a saved dry-run plan checked again before it runs."""

from __future__ import annotations

import time
from typing import Any

from trustmig.coordinator.run import Cluster
from trustmig.placement import Goal, Plan, PlanLimits, plan, violations
from trustmig.placement.errors import PlacementError
from trustmig.placement.wire import saved_plan


def fresh_plan(cluster: Cluster, goal: Goal, limits: PlanLimits) -> tuple[Plan, dict[str, Any]]:
    """Plan ``goal`` and the document to print; raises PlacementError(broken_plan) if the
    planner ever broke its own contract (nothing runs then)."""
    view = cluster.gathered.view
    p = plan(view, goal, limits=limits)
    broken = violations(view, p, limits)
    if broken:
        raise PlacementError("broken_plan", f"the plan breaks {broken[0].code}: {broken[0].why}")
    return p, document(cluster, p)


def replayed_plan(
    cluster: Cluster, saved: Any, goal: Goal, limits: PlanLimits
) -> tuple[Plan, dict[str, Any]]:
    """A saved plan's moves, if they still fit the cluster as it is now.

    Raises PlacementError: bad_plan (not a saved plan of ``goal``) or stale_plan (a move no
    longer fits: the VM moved, a host lost its trust or its room, a policy changed)."""
    p = saved_plan(saved, goal)
    broken = violations(cluster.gathered.view, p, limits)
    if goal is Goal.BALANCE and not broken:  # balance never moves a VM that just moved
        vms = {v.name: v for v in cluster.gathered.view.vms}
        hot = next((m.vm for m in p.moves if m.vm in vms and vms[m.vm].cooling), None)
        if hot is not None:
            raise PlacementError("stale_plan", f"the saved plan no longer fits the cluster: "
                                 f"{hot} moved recently (cooling); make a new plan")  # fmt: skip
    if broken:
        v = broken[0]
        where = f"move {v.index} ({v.vm})" if v.index >= 0 else "the plan"
        raise PlacementError("stale_plan", f"the saved plan no longer fits the cluster: {where}: "
                                           f"{v.code}: {v.why}; make a new plan")  # fmt: skip
    doc = document(cluster, p)
    doc["saved_made_at"] = saved.get("made_at")
    return p, doc


def document(cluster: Cluster, p: Plan) -> dict[str, Any]:
    """The plan as printed: moves, what stays and why, figures, the vantage's verdicts."""
    doc = p.to_json()
    stays = list(cluster.gathered.stays)
    named = {s["vm"] for s in stays}
    doc["stuck"] = stays + [s for s in doc["stuck"] if s["vm"] not in named]
    doc["vantage"] = cluster.gathered.vantage
    doc["hosts"] = cluster.judged
    doc["made_at"] = round(time.time(), 3)
    return doc
