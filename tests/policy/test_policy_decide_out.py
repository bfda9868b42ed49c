"""Migrate-out decisions at the source: every rule both ways, in the documented order."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from policy_helpers import (
    ALICE,
    AUDITOR,
    CAROL,
    DE3,
    MONDAY_NIGHT,
    OPS,
    SECADMIN,
    Person,
    make_request,
    vm_policy,
)

from trustmig.policy import (
    Decision,
    HostLabels,
    InvalidRequestError,
    MigrationHistory,
    VmPolicy,
    decide_migrate_out,
)


def decide(
    user: object = ALICE,
    policy: VmPolicy | None = None,
    history: MigrationHistory | None = None,
    **kw: Any,
) -> Decision:
    """Decide with the example policy and a fresh history unless given."""
    return decide_migrate_out(
        make_request(user, **kw),
        vm_policy() if policy is None else policy,
        history if history is not None else MigrationHistory(),
    )


def test_owner_listed_user_allowed_with_one_line() -> None:
    d = decide(ALICE)
    assert d.allow
    assert d.rule == "migrate.allowed_users"
    line = d.line()
    assert line.startswith(
        "ALLOW migrate-out web-1 hostA -> hostB by alice: rule migrate.allowed_users"
    )
    assert "DE in [DE, FR]" in line and "\n" not in line
    assert d.checks[-1] == "destinations.min_security_level"


def test_no_policy_is_default_deny() -> None:
    d = decide_migrate_out(make_request(ALICE), None, MigrationHistory())
    assert not d.allow
    assert d.rule == "default-deny (no policy for VM)"
    assert d.line().startswith("DENY migrate-out web-1 hostA -> hostB by alice: rule default-deny")


def test_empty_policy_allows_nobody() -> None:
    p = vm_policy(('allowed_users = ["alice"]', "allowed_users = []"), ('["operator"]', "[]"))
    for user in (ALICE, OPS, SECADMIN):
        assert decide(user, p).rule == "migrate.allowed_roles"
        assert not decide(user, p).allow


def test_policy_for_another_vm_denied() -> None:
    d = decide(ALICE, vm="db-1")
    assert not d.allow and d.rule == "policy.vm"


def test_auditor_denied_even_when_listed_by_name() -> None:
    listed = vm_policy(('allowed_users = ["alice"]', 'allowed_users = ["alice", "bob"]'))
    d = decide(AUDITOR, listed)
    assert not d.allow and d.rule == "role-gate"
    assert "bob has roles [auditor]" in d.line()


def test_operator_with_auditor_role_denied() -> None:
    d = decide(Person("eve", ("operator", "auditor"), tenant=None))
    assert not d.allow and d.rule == "role-gate"


def test_operator_allowed_by_role() -> None:
    d = decide(OPS)
    assert d.allow and d.rule == "migrate.allowed_roles"
    assert "olga has role operator" in d.reason


def test_operator_denied_when_role_not_allowed() -> None:
    d = decide(OPS, vm_policy(('["operator"]', "[]")))
    assert not d.allow and d.rule == "migrate.allowed_roles"
    assert "olga has roles [operator]" in d.reason


def test_security_admin_not_implicitly_allowed() -> None:
    d = decide(SECADMIN)
    assert not d.allow and d.rule == "migrate.allowed_roles"


def test_owner_role_counts_only_for_the_vms_owner() -> None:
    by_role = vm_policy(
        ('allowed_users = ["alice"]', "allowed_users = []"), ('["operator"]', '["owner"]')
    )
    assert decide(ALICE, by_role).allow
    d = decide(CAROL, by_role)  # owner of other VMs
    assert not d.allow and d.rule == "migrate.allowed_roles"
    assert "owner role counts only for alice" in d.reason


def test_owner_name_from_another_tenant_denied() -> None:
    by_role = vm_policy(
        ('allowed_users = ["alice"]', "allowed_users = []"), ('["operator"]', '["owner"]')
    )
    impostor = Person("alice", ("owner",), tenant="globex")
    assert not decide(impostor, by_role).allow


def test_postcopy_refused_when_not_allowed_and_allowed_when_allowed() -> None:
    d = decide(ALICE, postcopy=True)
    assert not d.allow and d.rule == "migrate.postcopy"
    assert decide(ALICE, vm_policy(("postcopy = false", "postcopy = true")), postcopy=True).allow


def test_precopy_allowed_when_postcopy_forbidden() -> None:
    assert decide(ALICE, postcopy=False).allow


def test_windows_across_midnight() -> None:
    p = vm_policy(("windows = []", 'windows = ["Mon-Fri 22:00-06:00 UTC"]'))
    assert decide(ALICE, p, now=MONDAY_NIGHT).allow
    assert decide(ALICE, p, now=MONDAY_NIGHT + dt.timedelta(hours=6)).allow  # Tue 05:30
    d = decide(ALICE, p, now=MONDAY_NIGHT + dt.timedelta(hours=12))  # Tue 11:30
    assert not d.allow and d.rule == "migrate.windows"
    saturday_night = MONDAY_NIGHT + dt.timedelta(days=5)
    assert not decide(ALICE, p, now=saturday_night).allow


def test_rate_limit() -> None:
    history = MigrationHistory()
    p = vm_policy(("max_per_hour = 4", "max_per_hour = 2"))
    for minutes in (50, 10):
        assert decide(ALICE, p, history).allow
        history.record("web-1", MONDAY_NIGHT - dt.timedelta(minutes=minutes))
    d = decide(ALICE, p, history)
    assert not d.allow and d.rule == "migrate.max_per_hour"
    assert "2 migrations of web-1 in the last hour, limit 2" in d.reason
    later = MONDAY_NIGHT + dt.timedelta(minutes=15)  # the 50-minute-old one has aged out
    assert decide(ALICE, p, history, now=later).allow


def test_rate_limit_is_per_vm() -> None:
    history = MigrationHistory()
    p = vm_policy(("max_per_hour = 4", "max_per_hour = 1"))
    history.record("db-1", MONDAY_NIGHT)
    assert decide(ALICE, p, history).allow


def test_destination_outside_countries_denied_with_rule_named() -> None:
    d = decide(ALICE, labels=HostLabels(country="US", security_level=5))
    assert not d.allow and d.rule == "destinations.countries"
    assert "rule destinations.countries (US not in [DE, FR])" in d.line()


def test_destination_host_list() -> None:
    p = vm_policy(("hosts = []", 'hosts = ["hostC"]'))
    d = decide(ALICE, p)
    assert not d.allow and d.rule == "destinations.hosts"
    assert decide(ALICE, p, destination="hostC").allow


def test_destination_zones() -> None:
    p = vm_policy(("zones = []", 'zones = ["eu-2"]'))
    d = decide(ALICE, p)
    assert not d.allow and d.rule == "destinations.zones"
    assert decide(ALICE, p, labels=HostLabels(country="FR", zone="eu-2", security_level=2)).allow
    assert not decide(ALICE, p, labels=HostLabels(country="FR", security_level=2)).allow


def test_security_level() -> None:
    at2 = HostLabels(country="DE", security_level=2)
    at1 = HostLabels(country="DE", security_level=1)
    assert decide(ALICE, labels=at2).allow
    d = decide(ALICE, labels=at1)
    assert not d.allow and d.rule == "destinations.min_security_level"
    assert "security level 1 < 2" in d.reason


def test_first_failing_rule_decides() -> None:
    # Auditor, post-copy, wrong country: the role gate comes first.
    d = decide(AUDITOR, postcopy=True, labels=HostLabels(country="US"))
    assert d.rule == "role-gate"
    # Operator, post-copy, wrong country: post-copy comes before destinations.
    d = decide(OPS, postcopy=True, labels=HostLabels(country="US"))
    assert d.rule == "migrate.postcopy"
    assert d.checks == ("policy.vm", "policy.validity", "role-gate", "migrate.allowed_roles")


def test_request_validation() -> None:
    with pytest.raises(InvalidRequestError, match="timezone-aware"):
        make_request(ALICE, now=dt.datetime(2024, 6, 3, 12, 0))
    with pytest.raises(InvalidRequestError, match="user has no 'name'"):
        make_request(object())
    with pytest.raises(InvalidRequestError, match="destination must be a non-empty name"):
        make_request(ALICE, destination="")
    assert decide(ALICE, labels=DE3).allow


def test_a_policy_outside_its_validity_period_allows_nothing() -> None:
    expired = vm_policy(("serial = 1\n", "serial = 1\nvalid_until = 2024-06-01T00:00:00Z\n"))
    d = decide(ALICE, expired)  # MONDAY_NIGHT is 2024-06-03
    assert not d.allow and d.rule == "policy.validity"
    assert d.reason == (
        "the policy of web-1: serial 1 expired on 2024-06-01T00:00:00+00:00; sign a new one"
    )
    future = vm_policy(("serial = 1\n", "serial = 1\nvalid_from = 2024-07-01T00:00:00Z\n"))
    assert decide(ALICE, future).rule == "policy.validity"
