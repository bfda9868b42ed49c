"""The planner on generated clusters: no plan may break a policy or a capacity, ever."""

from __future__ import annotations

from collections import defaultdict

import pytest

from trustmig.bench.plan import generate_view, run_plan_bench
from trustmig.placement import ClusterView, Goal, PlanLimits, plan, violations


def test_generated_clusters_are_valid_and_repeatable() -> None:
    view = generate_view(40, 600, seed=7)
    assert view == generate_view(40, 600, seed=7)
    assert view != generate_view(40, 600, seed=8)
    hosts = {h.name: h for h in view.hosts}
    mem: dict[str, int] = defaultdict(int)
    for v in view.vms:
        mem[v.host] += v.mem_mib
        h = hosts[v.host]
        assert not v.allowed_hosts or h.name in v.allowed_hosts
        assert not v.zones or h.zone in v.zones
        assert h.security_level >= v.min_security_level
    assert all(mem[n] <= h.mem_mib for n, h in hosts.items())


@pytest.mark.parametrize("seed", range(1, 7))
@pytest.mark.parametrize("goal", list(Goal))
def test_no_generated_plan_breaks_a_rule(seed: int, goal: Goal) -> None:
    view = generate_view(60, 1200, seed)
    limits = PlanLimits(vcpu_overcommit=4.0)
    target = view.vms[seed].host if goal is Goal.EVACUATE else None
    p = plan(view, goal, host=target, limits=limits)
    assert violations(view, p, limits) == []
    assert len({m.vm for m in p.moves}) == len(p.moves)
    if goal is Goal.EVACUATE:
        left = {v.name for v in view.vms if v.host == target} - {m.vm for m in p.moves}
        assert left == {s.vm for s in p.stuck}
    if goal is Goal.BALANCE:
        assert p.after.imbalance < p.before.imbalance
    if goal is Goal.CONSOLIDATE:
        assert p.after.hosts_in_use <= p.before.hosts_in_use
        assert p.after.hosts_in_use + len(p.freed_hosts) == p.after.hosts


def test_a_tighter_overcommit_is_respected() -> None:
    view = generate_view(30, 500, seed=3)
    limits = PlanLimits(vcpu_overcommit=1.0)
    for goal in (Goal.BALANCE, Goal.CONSOLIDATE):
        p = plan(view, goal, limits=limits)
        moved = {m.vm for m in p.moves}
        assert violations(view, p, limits) == []
        # a move may only land where vCPUs fit 1:1
        vcpus = {h.name: 0 for h in view.hosts}
        final = {v.name: v for v in view.vms}
        dest = {m.vm: m.destination for m in p.moves}
        for v in final.values():
            vcpus[dest.get(v.name, v.host)] += v.vcpus
        cap = {h.name: h.vcpus for h in view.hosts}
        assert all(vcpus[dest[n]] <= cap[dest[n]] * 4 for n in moved)


def test_the_bench_reports_every_goal_with_no_violation() -> None:
    report = run_plan_bench(50, 800, seed=2, repeat=1)
    assert set(report["goals"]) == {"evacuate", "balance", "consolidate"}
    assert report["goal"]["violations"] == 0
    bal = report["goals"]["balance"]
    assert bal["after"]["imbalance"] < bal["before"]["imbalance"]
    assert report["goals"]["consolidate"]["after"]["hosts_in_use"] < report["hosts"]
    assert report["goals"]["evacuate"]["host"] in {f"host-{i:04d}" for i in range(50)}


def test_an_empty_cluster_plans_nothing() -> None:
    view = ClusterView(generate_view(5, 0, seed=1).hosts, ())
    for goal in (Goal.BALANCE, Goal.CONSOLIDATE):
        p = plan(view, goal)
        assert p.moves == ()
