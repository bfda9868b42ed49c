"""The planner's contract: frozen facts in, a plan out.

Every figure here is one the caller *verified*: a host's capacity is its attested capacity
(PCR-bound), its trust is its last attestation verdict and quarantine state, and a VM's use is
what its host measured and signed, accepted only where it agrees with the attested capacity and
with what the cluster store knows runs there. The planner never sees an advertisement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Goal(Enum):
    """Why VMs move (the paper's three reasons to migrate)."""

    #: empty one host for maintenance (fault tolerance)
    EVACUATE = "evacuate"
    #: spread load until every host is within a threshold of the others (load balancing)
    BALANCE = "balance"
    #: pack VMs onto fewer hosts and name the hosts that can be powered down (energy)
    CONSOLIDATE = "consolidate"


class StuckCode(Enum):
    """Why a VM the goal wanted to move stays where it is."""

    #: its policy forbids migration, or it is mid-migration
    PINNED = "pinned"
    #: no trusted host satisfies its destination rules
    NO_ALLOWED_HOST = "no_allowed_host"
    #: allowed hosts exist, but none has room for it
    NO_CAPACITY = "no_capacity"
    #: every allowed host runs a neighbour its co-residency rules (or the neighbour's) forbid
    CO_RESIDENCY = "co_residency"


@dataclass(frozen=True)
class HostFacts:
    """One host as verified: attested capacity, labels, trust and measured CPU use.

    ``trusted`` is False for a host whose attestation failed or expired, or that is
    quarantined: it never receives a VM. ``accepts`` is False for a host being drained or in
    maintenance. ``cpu_used`` is the host's measured CPU use by its guests, in cores."""

    name: str
    mem_mib: int
    vcpus: int
    country: str = "ZZ"
    zone: str | None = None
    security_level: int = 0
    trusted: bool = True
    accepts: bool = True
    cpu_used: float = 0.0

    def __post_init__(self) -> None:
        if self.mem_mib <= 0 or self.vcpus <= 0:
            raise ValueError(f"host {self.name}: capacity must be positive (mem_mib, vcpus)")


@dataclass(frozen=True)
class VmFacts:
    """One VM: where it runs (its single owner host), its size, its measured use, and the
    destination rules of its signed policy (empty sets: no restriction from that rule).

    ``movable`` is False when its policy forbids migration or it is migrating now;
    ``cooling`` is True when it moved recently (no ping-pong: balance leaves it alone).
    ``neighbours`` (``any``, ``tenant``, ``none``) and ``never_with`` are its policy's
    co-residency rules: whom it may share a host with."""

    name: str
    tenant: str
    host: str
    mem_mib: int
    vcpus: int
    cpu_used: float = 0.0
    allowed_hosts: frozenset[str] = frozenset()
    zones: frozenset[str] = frozenset()
    countries: frozenset[str] = frozenset()
    min_security_level: int = 0
    movable: bool = True
    cooling: bool = False
    neighbours: str = "any"
    never_with: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.neighbours not in ("any", "tenant", "none"):
            raise ValueError(f"VM {self.name}: neighbours must be any, tenant or none")

    def rule_key(self) -> tuple[frozenset[str], frozenset[str], frozenset[str], int]:
        """VMs with the same key may go to the same hosts (one eligibility set per key)."""
        return (self.allowed_hosts, self.zones, self.countries, self.min_security_level)

    def may_run_on(self, host: HostFacts) -> bool:
        """The VM's destination rules and the host's trust, without capacity."""
        return (
            host.trusted
            and host.accepts
            and (not self.allowed_hosts or host.name in self.allowed_hosts)
            and (not self.zones or host.zone in self.zones)
            and (not self.countries or host.country in self.countries)
            and host.security_level >= self.min_security_level
        )


@dataclass(frozen=True)
class ClusterView:
    """The cluster's verified state at one instant."""

    hosts: tuple[HostFacts, ...]
    vms: tuple[VmFacts, ...]

    def __post_init__(self) -> None:
        names = [h.name for h in self.hosts]
        if len(set(names)) != len(names):
            raise ValueError("cluster view: a host name appears twice")
        known = set(names)
        seen: set[str] = set()
        for vm in self.vms:
            if vm.name in seen:
                raise ValueError(f"cluster view: VM {vm.name} appears twice (two owners?)")
            if vm.host not in known:
                raise ValueError(f"cluster view: VM {vm.name} runs on unknown host {vm.host}")
            seen.add(vm.name)


@dataclass(frozen=True)
class PlanLimits:
    """The operator's knobs.

    ``vcpu_overcommit``: vCPUs a host may hold per attested core (Nova's
    ``cpu_allocation_ratio``). ``balance_threshold``: balance stops once the most and the least
    loaded host are this close (load as a fraction of capacity). ``consolidate_max_load``: the
    fill level consolidate packs hosts up to, leaving headroom. ``max_moves`` bounds a plan."""

    vcpu_overcommit: float = 4.0
    balance_threshold: float = 0.10
    consolidate_max_load: float = 0.85
    max_moves: int = 10_000

    def __post_init__(self) -> None:
        if self.vcpu_overcommit <= 0:
            raise ValueError("vcpu_overcommit must be positive")
        if not 0 < self.balance_threshold < 1:
            raise ValueError("balance_threshold must lie between 0 and 1 (a load fraction)")
        if not 0 < self.consolidate_max_load <= 1:
            raise ValueError("consolidate_max_load must lie in (0, 1] (a load fraction)")
        if self.max_moves < 0:
            raise ValueError("max_moves must not be negative")


@dataclass(frozen=True)
class Move:
    """Migrate ``vm`` from ``source`` to ``destination``; ``why`` says why there."""

    vm: str
    source: str
    destination: str
    why: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Stuck:
    """A VM the goal wanted to move that stays, with the reason."""

    vm: str
    host: str
    code: StuckCode
    why: str

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "host": self.host, "code": self.code.value, "why": self.why}


@dataclass(frozen=True)
class Figures:
    """How the cluster looks: over trusted, accepting hosts, load as a fraction of capacity
    (the larger of memory and CPU). ``imbalance`` is the standard deviation of the loads."""

    hosts: int
    hosts_in_use: int
    vms: int
    imbalance: float
    spread: float
    max_load: float

    def to_json(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Plan:
    """The moves in the order they may run, what stays and why, figures before and after, and
    (consolidate) the hosts left empty that can be powered down."""

    goal: Goal
    moves: tuple[Move, ...]
    stuck: tuple[Stuck, ...]
    before: Figures
    after: Figures
    freed_hosts: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "goal": self.goal.value,
            "moves": [m.to_json() for m in self.moves],
            "stuck": [s.to_json() for s in self.stuck],
            "before": self.before.to_json(),
            "after": self.after.to_json(),
            "freed_hosts": list(self.freed_hosts),
        }
