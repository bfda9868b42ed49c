"""False resources against automatic migration: a lying host attracts the balancer's VMs.

The paper's §7.5: "in the case of Dynamic Load Balancing ... a malicious VM might falsely
advertise available resources ... and hence influence the migration policy to migrate the
machine to a compromised target". Here the source host is drained for maintenance. Both sides
use the same planner (:mod:`trustmig.placement`, evacuate: each VM to the host least loaded
once it arrives); they differ only in what they feed it. The baseline balancer reads the hosts'
unsigned adverts, where ``host-l`` claims eight times its capacity, all free: its plan sends the
VM there and the baseline migrates it. trustmig's ``host.evacuate`` reads each peer's measured,
signed and TPM-quoted load, refuses ``host-l``'s report (capacity above the attested one),
quarantines it, and evacuates to the honest host.
"""

from __future__ import annotations

import time
from typing import Any

from trustmig.agent.capacity import host_capacity
from trustmig.config import HostConfig
from trustmig.lab.attack import Attack, Outcome
from trustmig.lab.liar_agent import LIE_FACTOR
from trustmig.lab.targets import CLUSTER_ADMIN, HONEST, LIAR, MEMORY_MIB, SOURCE, LabEnv
from trustmig.placement import ClusterView, Goal, HostFacts, VmFacts, plan

NAME = "false-resources-balancer"


def _advert(host: str, factor: int) -> dict[str, Any]:
    cap = host_capacity(HostConfig(name=host))
    return {"host": host, "total_mem_mib": cap.mem_mib * factor, "total_vcpus": cap.vcpus * factor,
            "free_mem_mib": cap.mem_mib * factor, "ts": time.time()}  # fmt: skip


def advertised_view(adverts: list[dict[str, Any]], vm: str) -> ClusterView:
    """What a balancer that believes adverts plans on: capacity as claimed, nothing checked."""
    hosts = tuple(
        HostFacts(a["host"], a["total_mem_mib"], a["total_vcpus"], accepts=a["host"] != SOURCE)
        for a in adverts
    )
    return ClusterView(hosts, (VmFacts(vm, "acme", SOURCE, MEMORY_MIB, 1),))


async def baseline(env: LabEnv) -> Outcome:
    b = env.baseline
    adverts = [_advert(SOURCE, 1), _advert(HONEST, 1), _advert(LIAR, LIE_FACTOR)]
    p = plan(advertised_view(adverts, NAME), Goal.EVACUATE, host=SOURCE)
    chosen = p.moves[0].destination if p.moves else SOURCE
    prog, guest = await b.migrate_to(NAME, chosen)
    return Outcome(
        compromised=chosen == LIAR and guest["where"] == LIAR,
        outcome=f"the balancer planned on unsigned adverts and evacuated the VM to {chosen} "
        f"(it claimed {LIE_FACTOR}x its real capacity, all free)",
        evidence={"adverts": adverts, "plan": p.to_json(), "migration": prog.status},
        guest=guest,
    )


async def trustmig(env: LabEnv) -> Outcome:
    t = env.trustmig
    await t.boot(NAME, allowed_roles=["operator", "cluster-admin"])
    c = await t.client(SOURCE, CLUSTER_ADMIN)
    try:
        doc = await c.call("host.evacuate", {}, timeout=600)
    finally:
        await c.close()
    guest = await t.state(NAME)
    hosts = {h["host"]: h for h in doc["hosts"]}
    moved_to = [m["destination"] for m in doc["moves"]]
    cleared = await t.clear_quarantine(LIAR)
    return Outcome(
        compromised=LIAR in moved_to or guest["where"] == LIAR,
        outcome=f"evacuated to {', '.join(moved_to) or 'nowhere'}; {LIAR}'s report refused "
        f"({hosts[LIAR]['rule']}) and quarantined",
        evidence={
            "plan": {k: doc[k] for k in ("moves", "stuck", "before", "after")},
            "hosts": doc["hosts"],
            "outcomes": doc.get("outcomes"),
            "cleared_by": cleared,
        },
        guest=guest,
    )


ATTACK = Attack(
    name=NAME,
    title="False resources against the load balancer",
    paper="A malicious host falsely advertises available resources to influence the automatic "
    "(load balancing) migration policy into migrating VMs to it (§7.5).",
    x805=(
        ("availability", "services", "management"),
        ("data_integrity", "services", "management"),
        ("authentication", "services", "management"),
    ),
    baseline=baseline,
    trustmig=trustmig,
)
