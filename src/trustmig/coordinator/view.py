"""One cluster-wide view from the hosts' answers to ``host.placement`` (pure).

The vantage host (the agent the operator points at) contributes what it verified: itself, the
peers whose signed, TPM-quoted load reports it accepted (attested capacity, labels) and the
guests each of those reports shows. Every host contributes, for its own VMs, the peers its
migrate-out policy allows for the caller. Sizes and use come from the verified reports only; a
VM a host names that its verified report does not show is left out and named, and a VM of a
host that did not answer stays where it is (it is counted, never moved).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from trustmig.placement import ClusterView, VmFacts
from trustmig.placement.errors import PlacementError
from trustmig.placement.wire import host_from_json, vm_from_json


@dataclass(frozen=True)
class Gathered:
    """The view to plan on, and the VMs that stay whatever the plan (with the reason)."""

    view: ClusterView
    stays: tuple[dict[str, Any], ...]
    vantage: str


def combine(vantage: dict[str, Any], answers: dict[str, dict[str, Any] | str]) -> Gathered:
    """Build the view; ``answers`` maps each verified peer to its ``host.placement`` answer or
    to why it gave none. Raises PlacementError for answers that are not placement documents
    or describe a VM twice (two hosts claiming one VM: nothing is planned then)."""
    try:
        hosts = [host_from_json(h) for h in vantage["hosts"]]
        own = [vm_from_json(v) for v in vantage["vms"]]
        verified: dict[str, list[Any]] = vantage["verified_guests"]
        me = str(vantage["host"])
    except (KeyError, TypeError):
        raise PlacementError(
            "bad_facts", "the vantage host's answer has no verified view"
        ) from None
    stays: list[dict[str, Any]] = list(vantage.get("refused") or [])
    vms = list(own)
    for peer, guests in sorted(verified.items()):
        answer = answers.get(peer, "not asked")
        got, left = _peer_vms(peer, [vm_from_json(g) for g in guests], answer)
        vms.extend(got)
        stays.extend(left)
    try:
        view = ClusterView(tuple(hosts), tuple(vms))
    except ValueError as e:
        raise PlacementError("conflict", str(e)) from None
    return Gathered(view, tuple(stays), me)


def _peer_vms(
    peer: str, guests: list[VmFacts], answer: dict[str, Any] | str
) -> tuple[list[VmFacts], list[dict[str, Any]]]:
    """A verified peer's guests, movable where the peer's own policy answer allows it."""
    if isinstance(answer, str):
        why = f"{peer} did not answer for its VMs ({answer}); they stay"
        return [_pinned(peer, g) for g in guests], [
            {"vm": _short(peer, g), "host": peer, "code": "pinned", "why": why} for g in guests
        ]
    rules = {v.name: v for v in (vm_from_json(d) for d in answer.get("vms") or [])}
    stays: list[dict[str, Any]] = list(answer.get("refused") or [])
    out = []
    for g in guests:
        name = _short(peer, g)
        r = rules.pop(name, None)
        if r is None:  # the report shows a guest the host's own answer does not: count it only
            out.append(_pinned(peer, g))
            continue
        # only its destination rules come from the host's answer; the rest is what was verified
        out.append(replace(r, host=peer, tenant=g.tenant, mem_mib=g.mem_mib, vcpus=g.vcpus,
                           cpu_used=g.cpu_used, neighbours=g.neighbours, never_with=g.never_with,
                           movable=r.movable and bool(r.allowed_hosts)))  # fmt: skip
    for name in sorted(rules):
        why = f"{peer}'s verified report does not show {name}: it is not planned"
        stays.append({"vm": name, "host": peer, "code": "unverified", "why": why})
    return out, stays


def _short(peer: str, g: VmFacts) -> str:
    prefix = f"{peer}/"
    return g.name[len(prefix) :] if g.name.startswith(prefix) else g.name


def _pinned(peer: str, g: VmFacts) -> VmFacts:
    return replace(g, name=_short(peer, g), host=peer, movable=False)
