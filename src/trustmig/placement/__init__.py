"""Placement: where VMs should run for maintenance, load balancing and energy (the paper's §2).

A pure function of the cluster's verified state: hosts with their attested capacity and trust,
VMs with their measured use and the destination rules of their signed policies. No I/O, no
clock: the agents and the cluster store build the view, the planner returns a plan, and the
executor carries it out under the usual per-migration policy, attestation and audit.
"""

from trustmig.placement.check import Violation, violations
from trustmig.placement.model import (
    ClusterView,
    Figures,
    Goal,
    HostFacts,
    Move,
    Plan,
    PlanLimits,
    Stuck,
    StuckCode,
    VmFacts,
)
from trustmig.placement.planner import plan

__all__ = [
    "ClusterView",
    "Figures",
    "Goal",
    "HostFacts",
    "Move",
    "Plan",
    "PlanLimits",
    "Stuck",
    "StuckCode",
    "Violation",
    "VmFacts",
    "plan",
    "violations",
]
