"""The planner on hand-made clusters: each goal, each reason a VM stays, and the checker."""

from __future__ import annotations

from dataclasses import replace

import pytest

from trustmig.placement import (
    ClusterView,
    Goal,
    HostFacts,
    Move,
    Plan,
    PlanLimits,
    StuckCode,
    VmFacts,
    plan,
    violations,
)
from trustmig.placement.errors import PlacementError

GIB = 1024


def host(name: str, mem_gib: int = 64, vcpus: int = 16, **kw: object) -> HostFacts:
    return HostFacts(name=name, mem_mib=mem_gib * GIB, vcpus=vcpus, **kw)  # type: ignore[arg-type]


def vm(name: str, on: str, mem_gib: int = 8, vcpus: int = 2, **kw: object) -> VmFacts:
    return VmFacts(name=name, tenant="acme", host=on, mem_mib=mem_gib * GIB, vcpus=vcpus,
                   **kw)  # type: ignore[arg-type]  # fmt: skip


def applied(view: ClusterView, p: Plan) -> ClusterView:
    """The view after the plan's moves ran; moved VMs are cooling (they just moved)."""
    dest = {m.vm: m.destination for m in p.moves}
    vms = tuple(replace(v, host=dest[v.name], cooling=True) if v.name in dest else v
                for v in view.vms)  # fmt: skip
    return ClusterView(view.hosts, vms)


def where(view: ClusterView, p: Plan) -> dict[str, str]:
    placed = {v.name: v.host for v in view.vms}
    placed.update({m.vm: m.destination for m in p.moves})
    return placed


# ---------------------------------------------------------------------------------- evacuate
def test_evacuate_empties_the_host_onto_the_least_loaded_allowed_hosts() -> None:
    view = ClusterView(
        (host("a"), host("b"), host("c")),
        (vm("v1", "a", 16), vm("v2", "a", 8), vm("busy", "b", 32)),
    )
    p = plan(view, Goal.EVACUATE, host="a")
    assert violations(view, p) == []
    assert p.stuck == ()
    placed = where(view, p)
    assert "a" not in {placed["v1"], placed["v2"]}
    assert placed["v1"] == "c"  # the largest first, to the emptiest host
    assert p.after.hosts_in_use == 2
    assert all(m.source == "a" and m.why.startswith("evacuate a") for m in p.moves)


def test_evacuate_never_sends_to_an_untrusted_or_draining_host() -> None:
    view = ClusterView(
        (host("a"), host("liar", 512, 128, trusted=False), host("down", accepts=False),
         host("ok")),
        (vm("v1", "a"), vm("v2", "a")),
    )  # fmt: skip
    p = plan(view, Goal.EVACUATE, host="a")
    assert {m.destination for m in p.moves} == {"ok"}
    assert violations(view, p) == []


def test_evacuate_names_every_vm_that_stays_with_its_reason() -> None:
    view = ClusterView(
        (host("a", zone="z1"), host("b", 16, zone="z1"), host("c", 16, zone="z2")),
        (
            vm("pinned", "a", movable=False),
            vm("zone-bound", "a", 4, zones=frozenset({"z3"})),
            vm("too-big", "a", 32),
            vm("fits", "a", 4, zones=frozenset({"z1"})),
        ),
    )
    p = plan(view, Goal.EVACUATE, host="a")
    stuck = {s.vm: s.code for s in p.stuck}
    assert stuck == {"pinned": StuckCode.PINNED, "zone-bound": StuckCode.NO_ALLOWED_HOST,
                     "too-big": StuckCode.NO_CAPACITY}  # fmt: skip
    assert [(m.vm, m.destination) for m in p.moves] == [("fits", "b")]
    assert all(s.why and s.host == "a" for s in p.stuck)


def test_evacuate_respects_memory_vcpu_overcommit_and_measured_cpu() -> None:
    view = ClusterView(
        (host("a", 256, 64), host("b", 64, 4), host("c", 64, 64, cpu_used=63.5)),
        (vm("v1", "a", 8, 16), vm("v2", "a", 8, 2, cpu_used=1.0)),
    )
    p = plan(view, Goal.EVACUATE, host="a", limits=PlanLimits(vcpu_overcommit=2.0))
    placed = where(view, p)
    assert placed["v1"] == "c"  # 16 vCPUs exceed b's 4 x 2; c has the vCPUs
    assert placed["v2"] == "b"  # c has 0.5 core left, v2 uses 1.0
    assert violations(view, p, PlanLimits(vcpu_overcommit=2.0)) == []


@pytest.mark.parametrize(("target", "code"), [(None, "missing_host"), ("nope", "unknown_host")])
def test_evacuate_without_a_known_host_is_refused_with_a_code(
    target: str | None, code: str
) -> None:
    view = ClusterView((host("a"), host("b")), ())
    with pytest.raises(PlacementError) as e:
        plan(view, Goal.EVACUATE, host=target)
    assert e.value.code == code


# ---------------------------------------------------------------------------------- balance
def test_balance_spreads_until_within_the_threshold() -> None:
    vms = tuple(vm(f"v{i}", "a", 8) for i in range(6))
    view = ClusterView((host("a"), host("b"), host("c")), vms)
    p = plan(view, Goal.BALANCE)
    assert violations(view, p) == []
    assert p.before.spread == pytest.approx(0.75)
    assert p.after.spread <= PlanLimits().balance_threshold + 1e-9
    counts = {h: list(where(view, p).values()).count(h) for h in "abc"}
    assert counts == {"a": 2, "b": 2, "c": 2}


def test_balance_moves_each_vm_once_and_leaves_cooling_vms_alone() -> None:
    vms = (*(vm(f"v{i}", "a", 8, cooling=True) for i in range(4)), vm("free", "a", 8))
    view = ClusterView((host("a"), host("b")), vms)
    p = plan(view, Goal.BALANCE)
    assert [m.vm for m in p.moves] == ["free"]
    assert p.after.spread > PlanLimits().balance_threshold  # it stops rather than ping-pong


def test_balance_after_balance_moves_nothing() -> None:
    vms = tuple(vm(f"v{i}", "a", 2 + i % 5) for i in range(30))
    view = ClusterView(tuple(host(n) for n in "abcde"), vms)
    first = plan(view, Goal.BALANCE)
    assert first.moves
    assert plan(applied(view, first), Goal.BALANCE).moves == ()


def test_balance_ignores_untrusted_hosts_as_targets_and_in_the_figures() -> None:
    view = ClusterView((host("a"), host("b"), host("q", trusted=False)),
                       tuple(vm(f"v{i}", "a", 8) for i in range(4)))  # fmt: skip
    p = plan(view, Goal.BALANCE)
    assert {m.destination for m in p.moves} == {"b"}
    assert p.before.hosts == 2


def test_balance_of_a_balanced_cluster_is_empty() -> None:
    view = ClusterView((host("a"), host("b")), (vm("v1", "a"), vm("v2", "b")))
    assert plan(view, Goal.BALANCE).moves == ()


# ------------------------------------------------------------------------------ consolidate
def test_consolidate_packs_light_hosts_and_names_the_freed_ones() -> None:
    view = ClusterView(
        tuple(host(n) for n in "abcd"),
        (vm("a1", "a", 8), vm("b1", "b", 8), vm("c1", "c", 12), vm("d1", "d", 24)),
    )
    p = plan(view, Goal.CONSOLIDATE)
    assert violations(view, p) == []
    assert p.after.hosts_in_use < p.before.hosts_in_use
    placed = where(view, p)
    for freed in p.freed_hosts:
        assert freed not in placed.values()
    assert p.after.max_load <= PlanLimits().consolidate_max_load + 1e-9
    assert len(p.freed_hosts) == 3


def test_consolidate_keeps_a_host_whose_vm_cannot_leave_with_all_its_vms() -> None:
    view = ClusterView(
        (host("a"), host("b"), host("c")),
        (vm("pinned", "a", 2, movable=False), vm("friend", "a", 2), vm("b1", "b", 40),
         vm("c1", "c", 40)),
    )  # fmt: skip
    p = plan(view, Goal.CONSOLIDATE)
    assert [m.vm for m in p.moves if m.source == "a"] == []
    assert {s.vm: s.code for s in p.stuck}["pinned"] is StuckCode.PINNED
    assert violations(view, p) == []


def test_consolidate_counts_already_empty_hosts_as_free() -> None:
    view = ClusterView((host("a"), host("b"), host("spare")), (vm("v", "a", 60), vm("w", "b", 60)))
    p = plan(view, Goal.CONSOLIDATE)
    assert p.moves == ()
    assert p.freed_hosts == ("spare",)


# ---------------------------------------------------------------------------------- checker
def test_the_checker_names_each_broken_rule() -> None:
    view = ClusterView(
        (host("a"), host("b", 16), host("q", trusted=False)),
        (vm("v1", "a", 8), vm("v2", "a", 12), vm("pin", "a", movable=False),
         vm("zoned", "a", zones=frozenset({"z9"}))),
    )  # fmt: skip
    bad = Plan(
        Goal.EVACUATE,
        (
            Move("v1", "a", "b", ""),
            Move("v1", "b", "a", ""),
            Move("v2", "a", "b", ""),
            Move("pin", "a", "b", ""),
            Move("zoned", "a", "b", ""),
            Move("v1", "a", "q", ""),
            Move("ghost", "a", "b", ""),
            Move("v2", "b", "a", ""),
        ),
        (),
        plan(view, Goal.BALANCE).before,
        plan(view, Goal.BALANCE).before,
        freed_hosts=("a",),
    )
    codes = [(v.index, v.code) for v in violations(view, bad)]
    assert codes == [(1, "moved_twice"), (2, "capacity"), (3, "pinned"), (4, "policy"),
                     (5, "moved_twice"), (6, "unknown_vm"), (7, "wrong_source"),
                     (-1, "not_freed")]  # fmt: skip


def test_a_view_with_two_owners_of_one_vm_or_an_unknown_host_is_refused() -> None:
    with pytest.raises(ValueError, match="appears twice"):
        ClusterView((host("a"), host("b")), (vm("v", "a"), vm("v", "b")))
    with pytest.raises(ValueError, match="unknown host"):
        ClusterView((host("a"),), (vm("v", "z"),))
    with pytest.raises(ValueError, match="capacity must be positive"):
        host("a", 0)


def test_plan_json_names_codes_and_figures() -> None:
    view = ClusterView((host("a"), host("b")), (vm("v", "a", movable=False),))
    doc = plan(view, Goal.EVACUATE, host="a").to_json()
    assert doc["goal"] == "evacuate"
    assert doc["stuck"] == [{"vm": "v", "host": "a", "code": "pinned",
                             "why": "its policy or state pins it"}]  # fmt: skip
    assert set(doc["before"]) == {"hosts", "hosts_in_use", "vms", "imbalance", "spread",
                                  "max_load"}  # fmt: skip
