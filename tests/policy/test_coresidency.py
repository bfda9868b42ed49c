"""Co-residency: the newcomer's rules and every resident's, decided from what runs on the host;
a denial names a resident only to its own tenant."""

from __future__ import annotations

from trustmig.policy import CoResidencyRules, Neighbour, decide_co_residency


def n(vm: str, tenant: str, neighbours: str = "any", never: tuple[str, ...] = ()) -> Neighbour:
    return Neighbour(vm, tenant, CoResidencyRules(neighbours=neighbours,  # type: ignore[arg-type]
                                                  never_with_tenants=list(never)))  # fmt: skip


def test_any_neighbours_is_the_default_and_allows_everything() -> None:
    d = decide_co_residency(n("a1", "acme"), [n("e1", "evil"), n("a2", "acme")], "h")
    assert d.allow and d.rule == "co_residency.ok"


def test_the_newcomers_own_rules() -> None:
    d = decide_co_residency(n("a1", "acme", "none"), [n("a2", "acme")], "h")
    assert (d.allow, d.rule) == (False, "co_residency.neighbours") and "own" in d.reason
    d = decide_co_residency(n("a1", "acme", "tenant"), [n("a2", "acme"), n("e1", "evil")], "h")
    assert (d.allow, d.rule) == (False, "co_residency.neighbours") and "e1" not in d.reason
    assert decide_co_residency(n("a1", "acme", "tenant"), [n("a2", "acme")], "h").allow
    d = decide_co_residency(n("a1", "acme", never=("evil",)), [n("e1", "evil")], "h")
    assert (d.allow, d.rule) == (False, "co_residency.never_with_tenants")
    assert decide_co_residency(n("a1", "acme", never=("evil",)), [n("o1", "other")], "h").allow
    assert decide_co_residency(n("a1", "acme", "none"), [], "h").allow


def test_every_residents_rules_count_and_foreign_residents_stay_unnamed() -> None:
    d = decide_co_residency(n("e1", "evil"), [n("victim", "acme", "tenant")], "h")
    assert (d.allow, d.rule) == (False, "co_residency.resident_neighbours")
    assert "victim" not in d.reason and "another tenant" in d.reason
    d = decide_co_residency(n("a2", "acme"), [n("a1", "acme", "none")], "h")
    assert (d.allow, d.rule) == (False, "co_residency.resident_neighbours") and "a1" in d.reason
    d = decide_co_residency(n("e1", "evil"), [n("victim", "acme", never=("evil",))], "h")
    assert (d.allow, d.rule) == (False, "co_residency.resident_never_with_tenants")
    assert "victim" not in d.reason
    assert decide_co_residency(n("a2", "acme"), [n("a1", "acme", "tenant")], "h").allow


def test_the_newcomer_is_not_its_own_neighbour() -> None:
    assert decide_co_residency(n("a1", "acme", "none"), [n("a1", "acme", "none")], "h").allow
