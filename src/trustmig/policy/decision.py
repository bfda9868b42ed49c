"""Migrate-out and migrate-in decisions: default deny, a fixed rule order, one line per verdict.

Both ends decide. The source asks "may this user send this VM there?" using the VM policy it
holds; the destination asks again with the signed VM policy that travelled with the VM *and* its
own host policy, using its own labels rather than what the source claimed about it. A compromised
or misconfigured source therefore cannot push a VM somewhere its owner or the destination refused.

Rule order (first failing rule decides; see docs/policy.md):

migrate-out
    default-deny (no policy) → policy.vm → policy.validity → role-gate (auditor) →
    migrate.allowed_users / migrate.allowed_roles → migrate.postcopy → migrate.windows →
    migrate.max_per_hour →
    destinations.hosts → destinations.countries → destinations.zones →
    destinations.min_security_level → allow
migrate-in
    host (policy is for this host) → default-deny (no policy) → accept.require_signed_vm_policy
    → accept.sources → accept.tenants → then every migrate-out rule after default-deny, with the
    destination's own labels → allow
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from trustmig.policy.errors import InvalidRequestError
from trustmig.policy.history import MigrationHistory
from trustmig.policy.identity import ROLE_AUDITOR, ROLE_OWNER, describe_roles
from trustmig.policy.models import ANY_HOST, HostLabels, HostPolicy, VmPolicy

MIGRATE_OUT = "migrate-out"
MIGRATE_IN = "migrate-in"


def _fmt_list(items: list[str] | tuple[str, ...]) -> str:
    return "[" + ", ".join(items) + "]"


@dataclass(frozen=True)
class Decision:
    """The verdict and the rule that decided it.

    For a DENY, ``rule`` is the first rule that failed. For an ALLOW, ``rule`` is the rule that
    granted the user access (``migrate.allowed_users`` or ``migrate.allowed_roles``) and
    ``checks`` lists every rule that was evaluated and passed, in order.
    """

    allow: bool
    rule: str
    reason: str
    direction: str = ""
    vm: str = ""
    source: str = ""
    destination: str = ""
    user: str = ""
    checks: tuple[str, ...] = field(default=())

    def line(self) -> str:
        """One line for logs and the audit trail, e.g.
        ``ALLOW migrate-out web-1 hostA -> hostB by alice: rule migrate.allowed_users (...)``."""
        verdict = "ALLOW" if self.allow else "DENY"
        return (
            f"{verdict} {self.direction} {self.vm} {self.source} -> {self.destination} "
            f"by {self.user}: rule {self.rule} ({self.reason})"
        )


@dataclass(frozen=True)
class MigrationRequest:
    """One migration as seen by the deciding host.

    ``destination_labels`` are what the source knows about the destination (from enrollment);
    the destination ignores them and uses the labels from its own host policy.
    """

    user: Any
    vm: str
    source: str
    destination: str
    destination_labels: HostLabels
    postcopy: bool
    now: datetime

    def __post_init__(self) -> None:
        for attr in ("name", "roles", "tenant"):
            if not hasattr(self.user, attr):
                raise InvalidRequestError(
                    f"migration request: user has no {attr!r}; pass the peer identity from the PKI"
                )
        if not isinstance(self.user.name, str) or not self.user.name:
            raise InvalidRequestError("migration request: user name is empty; authenticate first")
        if not isinstance(self.user.roles, tuple | list | frozenset | set):
            raise InvalidRequestError("migration request: user roles must be a tuple of strings")
        for attr in ("vm", "source", "destination"):
            value = getattr(self, attr)
            if not isinstance(value, str) or not value:
                raise InvalidRequestError(f"migration request: {attr} must be a non-empty name")
        if not isinstance(self.destination_labels, HostLabels):
            raise InvalidRequestError(
                "migration request: destination_labels must be HostLabels "
                "from the host's enrollment"
            )
        if not isinstance(self.postcopy, bool):
            raise InvalidRequestError("migration request: postcopy must be True or False")
        if not isinstance(self.now, datetime) or self.now.utcoffset() is None:
            raise InvalidRequestError(
                "migration request: now must be a timezone-aware datetime, e.g. datetime.now(UTC)"
            )


class _Denied(Exception):
    def __init__(self, rule: str, reason: str) -> None:
        super().__init__(rule, reason)
        self.rule = rule
        self.reason = reason


class _Evaluator:
    """Runs rules in order, remembering which passed; the first failure raises ``_Denied``."""

    def __init__(self) -> None:
        self.passed: list[str] = []
        self.details: list[str] = []

    def passed_rule(self, rule: str, detail: str | None = None) -> None:
        self.passed.append(rule)
        if detail:
            self.details.append(detail)


def _deny(rule: str, reason: str) -> _Denied:
    return _Denied(rule, reason)


def _vm_rules(
    ev: _Evaluator,
    req: MigrationRequest,
    policy: VmPolicy,
    history: MigrationHistory | None,
    labels: HostLabels,
) -> tuple[str, str]:
    """Evaluate the VM policy in its fixed order; returns the granting (rule, detail)."""
    user = req.user
    roles = tuple(user.roles)
    if policy.vm != req.vm:
        raise _deny("policy.vm", f"policy is for {policy.vm}, not {req.vm}")
    ev.passed_rule("policy.vm")

    problem = policy.validity_problem(req.now)
    if problem is not None:
        raise _deny("policy.validity", f"the policy of {policy.vm}: {problem}; sign a new one")
    ev.passed_rule("policy.validity")

    if ROLE_AUDITOR in roles:
        raise _deny(
            "role-gate", f"{user.name} has roles {describe_roles(user)}; auditors never migrate"
        )
    ev.passed_rule("role-gate")

    rules = policy.migrate
    same_tenant = user.tenant is None or user.tenant == policy.tenant
    if user.name in rules.allowed_users:
        grant = ("migrate.allowed_users", f"{user.name} in {_fmt_list(rules.allowed_users)}")
    else:
        effective = [
            r
            for r in roles
            if r in rules.allowed_roles
            and (r != ROLE_OWNER or (user.name == policy.owner and same_tenant))
        ]
        if not effective:
            owner_note = ""
            if ROLE_OWNER in roles and ROLE_OWNER in rules.allowed_roles:
                owner_note = f"; owner role counts only for {policy.owner}"
            raise _deny(
                "migrate.allowed_roles",
                f"{user.name} has roles {describe_roles(user)}, not in "
                f"{_fmt_list(rules.allowed_roles)}, and is not in allowed_users "
                f"{_fmt_list(rules.allowed_users)}{owner_note}",
            )
        grant = ("migrate.allowed_roles", f"{user.name} has role {sorted(effective)[0]}")
    ev.passed_rule(grant[0], grant[1])

    if req.postcopy and not rules.postcopy:
        raise _deny("migrate.postcopy", f"post-copy requested but not allowed for {policy.vm}")
    ev.passed_rule("migrate.postcopy")

    if rules.windows:
        windows = rules.parsed_windows()
        if not any(w.contains(req.now) for w in windows):
            raise _deny(
                "migrate.windows",
                f"{req.now.isoformat(timespec='minutes')} is outside {_fmt_list(rules.windows)}",
            )
        ev.passed_rule("migrate.windows", "inside window")

    if rules.max_per_hour is not None and history is not None:
        count = history.count_last_hour(policy.vm, req.now)
        if count >= rules.max_per_hour:
            raise _deny(
                "migrate.max_per_hour",
                f"{count} migrations of {policy.vm} in the last hour, limit {rules.max_per_hour}",
            )
        ev.passed_rule("migrate.max_per_hour", f"{count} < {rules.max_per_hour} per hour")

    dest = policy.destinations
    if dest.hosts:
        if req.destination not in dest.hosts:
            raise _deny("destinations.hosts", f"{req.destination} not in {_fmt_list(dest.hosts)}")
        ev.passed_rule("destinations.hosts", f"{req.destination} listed")
    if dest.countries:
        if labels.country not in dest.countries:
            raise _deny(
                "destinations.countries",
                f"{labels.country} not in {_fmt_list(dest.countries)}",
            )
        ev.passed_rule("destinations.countries", f"{labels.country} in {_fmt_list(dest.countries)}")
    if dest.zones:
        if labels.zone not in dest.zones:
            raise _deny(
                "destinations.zones",
                f"zone {labels.zone or '(none)'} not in {_fmt_list(dest.zones)}",
            )
        ev.passed_rule("destinations.zones", f"zone {labels.zone} listed")
    if labels.security_level < dest.min_security_level:
        raise _deny(
            "destinations.min_security_level",
            f"security level {labels.security_level} < {dest.min_security_level}",
        )
    ev.passed_rule(
        "destinations.min_security_level",
        f"level {labels.security_level} >= {dest.min_security_level}",
    )
    return grant


def _decide(
    direction: str,
    req: MigrationRequest,
    body: Callable[[_Evaluator], tuple[str, str]],
) -> Decision:
    ev = _Evaluator()
    common = {
        "direction": direction,
        "vm": req.vm,
        "source": req.source,
        "destination": req.destination,
        "user": req.user.name,
    }
    try:
        rule, detail = body(ev)
    except _Denied as denied:
        return Decision(
            allow=False, rule=denied.rule, reason=denied.reason, checks=tuple(ev.passed), **common
        )
    reason = "; ".join([detail, *[d for d in ev.details if d != detail]])
    return Decision(allow=True, rule=rule, reason=reason, checks=tuple(ev.passed), **common)


def decide_migrate_out(
    req: MigrationRequest, policy: VmPolicy | None, history: MigrationHistory
) -> Decision:
    """The source's decision: may ``req.user`` send ``req.vm`` to ``req.destination``?"""

    def body(ev: _Evaluator) -> tuple[str, str]:
        if policy is None:
            raise _deny("default-deny (no policy for VM)", f"no policy for {req.vm}")
        return _vm_rules(ev, req, policy, history, req.destination_labels)

    return _decide(MIGRATE_OUT, req, body)


def decide_migrate_in(
    req: MigrationRequest,
    policy: VmPolicy | None,
    host_policy: HostPolicy,
    history: MigrationHistory | None = None,
) -> Decision:
    """The destination's decision, using the VM policy that travelled with the VM.

    ``policy`` should come from :func:`verify_signed_policy`; an unsigned policy is refused when
    the host requires signatures. Destination rules use ``host_policy.labels``, never the
    request's labels, because the destination knows its own jurisdiction and hardening best.
    """

    def body(ev: _Evaluator) -> tuple[str, str]:
        if host_policy.host != req.destination:
            raise _deny(
                "host", f"host policy is for {host_policy.host}, request is for {req.destination}"
            )
        ev.passed_rule("host")
        if policy is None:
            raise _deny("default-deny (no policy for VM)", f"no policy arrived with {req.vm}")
        accept = host_policy.accept
        if accept.require_signed_vm_policy and policy.signed_by is None:
            raise _deny("accept.require_signed_vm_policy", f"policy for {policy.vm} is not signed")
        ev.passed_rule("accept.require_signed_vm_policy")
        if ANY_HOST not in accept.sources and req.source not in accept.sources:
            raise _deny("accept.sources", f"{req.source} not in {_fmt_list(accept.sources)}")
        ev.passed_rule("accept.sources", f"from {req.source}")
        if policy.tenant not in accept.tenants:
            raise _deny(
                "accept.tenants", f"tenant {policy.tenant} not in {_fmt_list(accept.tenants)}"
            )
        ev.passed_rule("accept.tenants", f"tenant {policy.tenant} accepted")
        return _vm_rules(ev, req, policy, history, host_policy.labels)

    return _decide(MIGRATE_IN, req, body)
