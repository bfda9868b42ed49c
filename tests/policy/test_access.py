"""Who may do what to which VM: tenants, the recorded owner and the cluster-wide roles."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from trustmig.policy import (
    AccessDecision,
    VmAction,
    VmOwnership,
    decide_vm_access,
    may_see_tenant,
    owner_for_new_vm,
)

VM = VmOwnership("web-1", "acme", "alice")


def user(name: str, *roles: str, tenant: str | None = "acme") -> SimpleNamespace:
    return SimpleNamespace(name=name, roles=tuple(roles), tenant=tenant)


ALL = tuple(VmAction)
READ = (VmAction.VIEW, VmAction.POLICY_VIEW, VmAction.AUDIT_VIEW)
OPERATE = (VmAction.OPERATE, VmAction.MIGRATE, VmAction.RESOLVE)

# (principal, actions allowed); every other action must be denied
CASES = [
    (user("alice", "owner"), ALL),
    (user("olga", "owner"), ()),  # an owner of other VMs of the tenant
    (user("otto", "operator"), (VmAction.VIEW, *OPERATE, VmAction.POLICY_VIEW)),
    (user("tia", "tenant-admin"), ALL),
    (user("eve", "operator", "tenant-admin", "owner", tenant="evil"), ()),
    (user("alice", "owner", tenant="evil"), ()),  # the owner's name in another tenant
    (user("carl", "cluster-admin", tenant=None), (*READ, *OPERATE)),
    (user("sam", "security-admin", tenant=None), ALL),
    (user("audrey", "auditor", tenant=None), READ),
    (user("bob", "auditor"), READ),
]


@pytest.mark.parametrize(("principal", "allowed"), CASES, ids=lambda c: getattr(c, "name", ""))
def test_every_action_for_every_kind_of_user(principal: SimpleNamespace, allowed: tuple) -> None:
    for action in VmAction:
        d = decide_vm_access(principal, action, VM)
        assert d.allow is (action in allowed), (principal, action, d)
        assert d.rule and d.reason


def test_another_tenant_is_told_nothing_about_the_vm() -> None:
    d = decide_vm_access(user("eve", "operator", tenant="evil"), VmAction.MIGRATE, VM)
    assert d == AccessDecision(
        False,
        "tenant",
        "eve (tenant evil) has no access to VM web-1: it belongs to another tenant",
    )
    assert "acme" not in d.line() and "alice" not in d.line()


def test_denial_names_the_rule_and_what_would_allow_it() -> None:
    d = decide_vm_access(user("olga", "owner"), VmAction.POLICY_SIGN, VM)
    assert d.rule == "role.policy-sign"
    assert "needs its owner or one of [tenant-admin] of tenant acme" in d.reason


def test_owner_role_counts_only_for_the_recorded_owner() -> None:
    assert decide_vm_access(user("alice", "owner"), VmAction.TRANSFER, VM).rule == "owner"
    unowned = VmOwnership("web-2", "acme", None)
    assert not decide_vm_access(user("alice", "owner"), VmAction.TRANSFER, unowned).allow


def test_listing_shows_only_the_users_tenant() -> None:
    assert may_see_tenant(user("otto", "operator"), "acme")
    assert not may_see_tenant(user("otto", "operator"), "evil")
    assert may_see_tenant(user("audrey", "auditor", tenant=None), "evil")


def test_a_new_vm_belongs_to_its_creator_and_their_tenant() -> None:
    assert owner_for_new_vm(user("alice", "owner"), None, None) == ("acme", "alice")
    assert owner_for_new_vm(user("otto", "operator"), "acme", None) == ("acme", "otto")
    assert owner_for_new_vm(user("tia", "tenant-admin"), None, "alice") == ("acme", "alice")
    assert owner_for_new_vm(user("sam", "security-admin", tenant=None), "evil", "eve") == (
        "evil",
        "eve",
    )


@pytest.mark.parametrize(
    ("principal", "tenant", "owner", "rule"),
    [
        (user("eve", "owner", tenant="evil"), "acme", None, "tenant"),
        (user("alice", "owner"), None, "bob", "owner"),
        (user("bob", "auditor"), None, None, "role.create"),
        (user("carl", "cluster-admin", tenant=None), None, None, "tenant"),
    ],
)
def test_what_a_creator_may_not_name(
    principal: SimpleNamespace, tenant: str | None, owner: str | None, rule: str
) -> None:
    got = owner_for_new_vm(principal, tenant, owner)
    assert isinstance(got, AccessDecision) and not got.allow and got.rule == rule
