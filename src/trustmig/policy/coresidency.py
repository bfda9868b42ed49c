"""Who may run next to whom: the co-residency decision (pure).

A host decides it whenever a VM would start there or arrive there, from what really runs there
(its own runtime, never the source's word). Both sides count: the newcomer's rules about its
neighbours, and every resident's rules about newcomers. A denial names the rule, and names the
resident that forbids it only when that resident belongs to the newcomer's own tenant, so that
one tenant never learns another tenant's VM names from a refusal.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from trustmig.policy.models import CoResidencyRules, VmPolicy

ANY = CoResidencyRules()


@dataclass(frozen=True)
class Neighbour:
    """A VM as the co-residency decision sees it: its tenant and its rules."""

    vm: str
    tenant: str
    rules: CoResidencyRules = field(default=ANY)

    @classmethod
    def of(cls, vm: str, tenant: str, policy: VmPolicy | None) -> Neighbour:
        return cls(vm, tenant, policy.co_residency if policy is not None else ANY)


@dataclass(frozen=True)
class CoResidencyDecision:
    """``rule`` is ``co_residency.ok`` when allowed, else the rule that forbids it."""

    allow: bool
    rule: str
    reason: str


def decide_co_residency(
    newcomer: Neighbour, residents: Iterable[Neighbour], host: str
) -> CoResidencyDecision:
    """May ``newcomer`` run on ``host`` next to ``residents`` (itself excluded)?"""
    others = [r for r in residents if r.vm != newcomer.vm]
    own = newcomer.rules
    # cross-tenant reasons stay generic: a refusal must not tell which tenants run where
    if own.neighbours == "none" and others:
        why = f"{newcomer.vm} requires a host of its own and {host} is not empty"
        return _deny("co_residency.neighbours", why)
    for r in others:
        if own.neighbours == "tenant" and r.tenant != newcomer.tenant:
            return _deny("co_residency.neighbours", f"{newcomer.vm} shares a host only with "
                         f"tenant {newcomer.tenant}, and {host} does not qualify")  # fmt: skip
        if r.tenant in own.never_with_tenants:
            return _deny("co_residency.never_with_tenants",
                         f"{newcomer.vm}'s excluded tenants rule out {host}")  # fmt: skip
        denial = _resident_forbids(newcomer, r, host)
        if denial is not None:
            return denial
    return CoResidencyDecision(True, "co_residency.ok", f"no co-residency rule forbids {host}")


def _resident_forbids(newcomer: Neighbour, r: Neighbour, host: str) -> CoResidencyDecision | None:
    who = f"resident {r.vm}" if r.tenant == newcomer.tenant else "a resident VM of another tenant"
    if r.rules.neighbours == "none":
        return _deny("co_residency.resident_neighbours",
                     f"{who} on {host} requires a host of its own")  # fmt: skip
    if r.rules.neighbours == "tenant" and r.tenant != newcomer.tenant:
        return _deny("co_residency.resident_neighbours",
                     f"{who} on {host} shares its host only with its own tenant")  # fmt: skip
    if newcomer.tenant in r.rules.never_with_tenants:
        return _deny("co_residency.resident_never_with_tenants",
                     f"{who} on {host} must never share a host with tenant "
                     f"{newcomer.tenant}")  # fmt: skip
    return None


def _deny(rule: str, reason: str) -> CoResidencyDecision:
    return CoResidencyDecision(False, rule, reason)
