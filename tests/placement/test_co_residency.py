"""Co-residency in plans: a VM never lands next to a neighbour its rules or a resident's forbid,
and the checker names the rule."""

from __future__ import annotations

import dataclasses

import pytest

from trustmig.bench.plan import generate_view
from trustmig.placement import ClusterView, Goal, HostFacts, Move, Plan, VmFacts, plan, violations


def _view(*vms: VmFacts) -> ClusterView:
    hosts = tuple(HostFacts(h, 4096, 8) for h in ("a", "b", "c"))
    return ClusterView(hosts, vms)


def test_evacuate_skips_hosts_the_rules_forbid() -> None:
    view = _view(
        VmFacts("victim", "acme", "b", 512, 1, neighbours="tenant"),
        VmFacts("loner", "acme", "c", 256, 1, neighbours="none"),
        VmFacts("guest", "evil", "a", 256, 1),
    )
    p = plan(view, Goal.EVACUATE, host="a")
    assert [(s.vm, s.code.value) for s in p.stuck] == [("guest", "co_residency")]
    view = _view(
        VmFacts("a1", "acme", "a", 256, 1, never_with=frozenset({"evil"})),
        VmFacts("e1", "evil", "b", 256, 1),
        VmFacts("o1", "other", "c", 2048, 1),
    )
    assert [(m.vm, m.destination) for m in plan(view, Goal.EVACUATE, host="a").moves] == [
        ("a1", "c")
    ]


def test_the_checker_names_a_co_residency_breach() -> None:
    view = _view(VmFacts("victim", "acme", "b", 512, 1, neighbours="tenant"),
                 VmFacts("spy", "evil", "a", 256, 1))  # fmt: skip
    bad = Plan(Goal.BALANCE, (Move("spy", "a", "b", "next to the victim"),), (),
               plan(view, Goal.BALANCE).before, plan(view, Goal.BALANCE).before)  # fmt: skip
    assert [v.code for v in violations(view, bad)] == ["co_residency"]


@pytest.mark.parametrize("goal", list(Goal))
def test_generated_plans_with_co_residency_rules_break_none(goal: Goal) -> None:
    base = generate_view(40, 800, seed=3)
    vms = []
    for i, v in enumerate(base.vms):
        rules: dict[str, object] = {"tenant": f"t{i % 5}"}
        if i % 17 == 0:
            rules["neighbours"] = "tenant"
        elif i % 29 == 0:
            rules["never_with"] = frozenset({f"t{(i + 1) % 5}"})
        vms.append(dataclasses.replace(v, **rules))  # type: ignore[arg-type]
    view = ClusterView(base.hosts, tuple(vms))
    target = view.vms[3].host if goal is Goal.EVACUATE else None
    p = plan(view, goal, host=target)
    assert violations(view, p) == []
