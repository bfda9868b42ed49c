"""One cluster view from the hosts' placement answers: sizes from verified reports only, rules
from each VM's own host, nothing planned for what no verified report shows."""

from __future__ import annotations

from typing import Any

import pytest

from trustmig.coordinator import combine
from trustmig.placement import Goal, HostFacts, VmFacts, plan, violations
from trustmig.placement.errors import PlacementError
from trustmig.placement.wire import host_to_json, saved_plan, vm_from_json, vm_to_json


def _vantage(**extra: Any) -> dict[str, Any]:
    hosts = [HostFacts("a", 1024, 8), HostFacts("b", 1024, 8), HostFacts("c", 1024, 8)]
    own = [VmFacts("a1", "acme", "a", 256, 1, allowed_hosts=frozenset({"b", "c"}))]
    doc = {
        "host": "a",
        "hosts": [host_to_json(h) for h in hosts],
        "vms": [vm_to_json(v) for v in own],
        "refused": [],
        "verified_guests": {
            "b": [
                vm_to_json(VmFacts("b/b1", "", "b", 256, 1, cpu_used=0.5, movable=False)),
                vm_to_json(VmFacts("b/b2", "", "b", 256, 1, movable=False)),
            ],
            "c": [],
        },
    }
    return doc | extra


def _answer(host: str, *vms: VmFacts) -> dict[str, Any]:
    return {"host": host, "vms": [vm_to_json(v) for v in vms], "refused": []}


def test_sizes_come_from_the_verified_report_and_rules_from_the_vms_host() -> None:
    claimed = VmFacts("b1", "acme", "b", 16, 1, cpu_used=0.0, allowed_hosts=frozenset({"c"}))
    g = combine(_vantage(), {"b": _answer("b", claimed, VmFacts("b2", "acme", "b", 256, 1)),
                             "c": _answer("c")})  # fmt: skip
    b1 = {v.name: v for v in g.view.vms}["b1"]
    assert (b1.mem_mib, b1.cpu_used, b1.allowed_hosts, b1.movable) == (256, 0.5, {"c"}, True)
    b2 = {v.name: v for v in g.view.vms}["b2"]
    assert not b2.movable  # no allowed host: empty rules must not mean "anywhere"


def test_a_vm_no_verified_report_shows_is_named_and_left_out() -> None:
    hidden = VmFacts("ghost", "acme", "b", 64, 1, allowed_hosts=frozenset({"a"}))
    g = combine(_vantage(), {"b": _answer("b", hidden), "c": _answer("c")})
    assert "ghost" not in {v.name for v in g.view.vms}
    assert [(s["vm"], s["code"]) for s in g.stays] == [("ghost", "unverified")]


def test_an_unanswering_host_keeps_its_vms_counted_and_pinned() -> None:
    g = combine(_vantage(), {"b": "connection refused", "c": _answer("c")})
    pinned = {v.name: v for v in g.view.vms if v.host == "b"}
    assert set(pinned) == {"b1", "b2"} and not any(v.movable for v in pinned.values())
    assert {s["code"] for s in g.stays} == {"pinned"}
    p = plan(g.view, Goal.BALANCE)
    assert not violations(g.view, p) and all(m.source != "b" for m in p.moves)


def test_two_hosts_answering_for_one_vm_is_a_conflict_and_nothing_is_planned() -> None:
    doc = _vantage()
    doc["verified_guests"]["c"] = [vm_to_json(VmFacts("c/a1", "", "c", 256, 1, movable=False))]
    with pytest.raises(PlacementError) as err:
        combine(doc, {"b": _answer("b"), "c": _answer("c")})
    assert err.value.code == "conflict" and "a1" in str(err.value)


def test_malformed_answers_are_one_line_errors() -> None:
    with pytest.raises(PlacementError) as err:
        combine({"host": "a"}, {})
    assert err.value.code == "bad_facts"
    with pytest.raises(PlacementError) as err:
        vm_from_json({"name": "x", "tenant": "t", "host": "a", "mem_mib": 1, "vcpus": 1,
                      "allowed_hosts": "b"})  # fmt: skip
    assert "allowed_hosts" in str(err.value)
    with pytest.raises(PlacementError) as err:
        vm_from_json({"name": "x", "owner_says": "trust me"})
    assert "owner_says" in str(err.value)


def test_a_saved_plan_reads_back_its_moves_and_refuses_another_goal() -> None:
    doc = {"goal": "balance", "moves": [{"vm": "a1", "source": "a", "destination": "b"}]}
    p = saved_plan(doc, Goal.BALANCE)
    assert [(m.vm, m.destination) for m in p.moves] == [("a1", "b")]
    with pytest.raises(PlacementError) as err:
        saved_plan(doc, Goal.CONSOLIDATE)
    assert err.value.code == "bad_plan"
    with pytest.raises(PlacementError):
        saved_plan({"goal": "balance", "moves": [{"vm": "a1"}]}, Goal.BALANCE)


def test_a_saved_plan_that_no_longer_fits_is_caught_by_the_replay() -> None:
    g = combine(_vantage(), {"b": _answer("b"), "c": _answer("c")})
    stale = saved_plan({"goal": "balance", "moves": [
        {"vm": "a1", "source": "b", "destination": "c"}]}, Goal.BALANCE)  # fmt: skip
    assert [v.code for v in violations(g.view, stale)] == ["wrong_source"]
    forbidden = saved_plan({"goal": "balance", "moves": [
        {"vm": "b1", "source": "b", "destination": "a"}]}, Goal.BALANCE)  # fmt: skip
    assert [v.code for v in violations(g.view, forbidden)] == ["pinned"]


def test_a_saved_balance_plan_refuses_a_vm_that_just_moved() -> None:
    from trustmig.coordinator import Cluster, replayed_plan
    from trustmig.placement import PlanLimits

    hot = vm_to_json(VmFacts("a1", "acme", "a", 256, 1, allowed_hosts=frozenset({"b"}),
                             cooling=True))  # fmt: skip
    g = combine(_vantage(vms=[hot]), {"b": _answer("b"), "c": _answer("c")})
    saved = {"goal": "balance", "moves": [{"vm": "a1", "source": "a", "destination": "b"}]}
    with pytest.raises(PlacementError) as err:
        replayed_plan(Cluster(g, {}, []), saved, Goal.BALANCE, PlanLimits())
    assert err.value.code == "stale_plan" and "cooling" in str(err.value)
    consolidate = {**saved, "goal": "consolidate"}
    replayed_plan(Cluster(g, {}, []), consolidate, Goal.CONSOLIDATE, PlanLimits())
