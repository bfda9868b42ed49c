"""Migrate-in decisions at the destination: host policy plus the signed VM policy."""

from __future__ import annotations

import datetime as dt

from policy_helpers import (
    ALICE,
    AUDITOR,
    HOST_TOML,
    MONDAY_NIGHT,
    OPS,
    VM_TOML,
    MiniPki,
    make_request,
    vm_policy,
)

from trustmig.policy import (
    HostLabels,
    HostPolicy,
    MigrationHistory,
    VmPolicy,
    decide_migrate_in,
    parse_host_policy,
    sign_policy,
    verify_signed_policy,
)


def signed(pki: MiniPki, text: str = VM_TOML) -> VmPolicy:
    alice = pki.issue("alice", ("owner",))
    return verify_signed_policy(
        sign_policy(text, "toml", "alice", alice.cert_der, alice.key), pki.verifier()
    )


def test_signed_policy_from_accepted_source_allowed(pki: MiniPki, host_policy: HostPolicy) -> None:
    d = decide_migrate_in(make_request(ALICE), signed(pki), host_policy)
    assert d.allow, d.line()
    assert d.line().startswith("ALLOW migrate-in web-1 hostA -> hostB by alice")
    assert d.checks[:4] == (
        "host",
        "accept.require_signed_vm_policy",
        "accept.sources",
        "accept.tenants",
    )


def test_no_vm_policy_is_default_deny(host_policy: HostPolicy) -> None:
    d = decide_migrate_in(make_request(ALICE), None, host_policy)
    assert not d.allow and d.rule == "default-deny (no policy for VM)"


def test_unsigned_policy_refused_when_signature_required(host_policy: HostPolicy) -> None:
    d = decide_migrate_in(make_request(ALICE), vm_policy(), host_policy)
    assert not d.allow and d.rule == "accept.require_signed_vm_policy"
    relaxed = parse_host_policy(
        HOST_TOML.replace("require_signed_vm_policy = true", "require_signed_vm_policy = false")
    )
    assert decide_migrate_in(make_request(ALICE), vm_policy(), relaxed).allow


def test_source_not_accepted(pki: MiniPki, host_policy: HostPolicy) -> None:
    d = decide_migrate_in(make_request(ALICE, source="hostZ"), signed(pki), host_policy)
    assert not d.allow and d.rule == "accept.sources"
    assert "hostZ not in [hostA, hostC]" in d.line()


def test_any_enrolled_source(pki: MiniPki) -> None:
    any_src = parse_host_policy(HOST_TOML.replace('["hostA", "hostC"]', '["*"]'))
    assert decide_migrate_in(make_request(ALICE, source="hostZ"), signed(pki), any_src).allow


def test_tenant_not_accepted(pki: MiniPki) -> None:
    other = parse_host_policy(HOST_TOML.replace('tenants = ["acme"]', 'tenants = ["globex"]'))
    d = decide_migrate_in(make_request(ALICE), signed(pki), other)
    assert not d.allow and d.rule == "accept.tenants"
    assert "tenant acme not in [globex]" in d.reason


def test_host_policy_for_other_host(pki: MiniPki, host_policy: HostPolicy) -> None:
    d = decide_migrate_in(make_request(ALICE, destination="hostC"), signed(pki), host_policy)
    assert not d.allow and d.rule == "host"


def test_destination_uses_its_own_labels_not_the_claimed_ones(pki: MiniPki) -> None:
    in_us = parse_host_policy(HOST_TOML.replace('country = "DE"', 'country = "US"'))
    claims_de = make_request(ALICE, labels=HostLabels(country="DE", security_level=9))
    d = decide_migrate_in(claims_de, signed(pki), in_us)
    assert not d.allow and d.rule == "destinations.countries"
    weak = parse_host_policy(HOST_TOML.replace("security_level = 3", "security_level = 1"))
    d = decide_migrate_in(make_request(ALICE), signed(pki), weak)
    assert not d.allow and d.rule == "destinations.min_security_level"


def test_vm_rules_reapplied_at_destination(pki: MiniPki, host_policy: HostPolicy) -> None:
    d = decide_migrate_in(make_request(AUDITOR), signed(pki), host_policy)
    assert not d.allow and d.rule == "role-gate"
    d = decide_migrate_in(make_request(OPS, postcopy=True), signed(pki), host_policy)
    assert not d.allow and d.rule == "migrate.postcopy"
    windowed = signed(pki, VM_TOML.replace("windows = []", 'windows = ["Sat 00:00-24:00 UTC"]'))
    d = decide_migrate_in(make_request(ALICE), windowed, host_policy)
    assert not d.allow and d.rule == "migrate.windows"


def test_rate_limit_with_destination_history(pki: MiniPki, host_policy: HostPolicy) -> None:
    history = MigrationHistory()
    one = signed(pki, VM_TOML.replace("max_per_hour = 4", "max_per_hour = 1"))
    assert decide_migrate_in(make_request(ALICE), one, host_policy, history).allow
    history.record("web-1", MONDAY_NIGHT - dt.timedelta(minutes=1))
    d = decide_migrate_in(make_request(ALICE), one, host_policy, history)
    assert not d.allow and d.rule == "migrate.max_per_hour"
