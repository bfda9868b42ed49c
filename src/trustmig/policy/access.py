"""Who may do what to which VM: tenants, the VM's fixed owner and the cluster-wide roles.

A pure decision, like the migration decisions: a principal, an action and the VM's ownership as
recorded by the host that holds it go in, an :class:`AccessDecision` naming the rule comes out.
The ownership is the host's own record, fixed when the VM was created and changed only by an
explicit transfer; nothing a caller sends (a policy's ``owner`` field, a spec's ``tenant``)
ever widens what they may do.

Roles inside a tenant (they count only for VMs of the user's own tenant):

owner
    the VM's recorded owner: every action on that VM, signing its policy, handing it over;
operator
    runs and migrates the tenant's VMs, reads their policies; never signs a policy;
tenant-admin
    every action on every VM of the tenant, signing their policies and transferring them.

Cluster-wide roles (tenant ignored):

cluster-admin
    operates every VM (start, stop, resume, check, migrate, resolve) and reads everything;
security-admin
    signs any policy, transfers ownership, reads everything, operates every VM;
auditor
    reads everything (VMs, policies, the audit trail), changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from trustmig.policy.identity import (
    ROLE_AUDITOR,
    ROLE_CLUSTER_ADMIN,
    ROLE_OPERATOR,
    ROLE_OWNER,
    ROLE_SECURITY_ADMIN,
    ROLE_TENANT_ADMIN,
    Principal,
    describe_roles,
)


class VmAction(StrEnum):
    """What a caller wants to do with one VM."""

    VIEW = "view"  # list it, show its state, heartbeats, migrations
    OPERATE = "operate"  # start again, stop, resume, check
    MIGRATE = "migrate"  # ask for a migration (the VM policy decides next)
    RESOLVE = "resolve"  # settle an in-doubt migration
    POLICY_VIEW = "policy-view"
    POLICY_SIGN = "policy-sign"  # be the signer of the VM's policy
    TRANSFER = "transfer"  # hand ownership to another user
    AUDIT_VIEW = "audit-view"  # read the VM's audit events


_TENANT_ROLES: Final[dict[VmAction, frozenset[str]]] = {
    VmAction.VIEW: frozenset({ROLE_OPERATOR, ROLE_TENANT_ADMIN}),
    VmAction.OPERATE: frozenset({ROLE_OPERATOR, ROLE_TENANT_ADMIN}),  # start again, stop...
    VmAction.MIGRATE: frozenset({ROLE_OPERATOR, ROLE_TENANT_ADMIN}),
    VmAction.RESOLVE: frozenset({ROLE_OPERATOR, ROLE_TENANT_ADMIN}),
    VmAction.POLICY_VIEW: frozenset({ROLE_OPERATOR, ROLE_TENANT_ADMIN}),
    VmAction.POLICY_SIGN: frozenset({ROLE_TENANT_ADMIN}),
    VmAction.TRANSFER: frozenset({ROLE_TENANT_ADMIN}),
    VmAction.AUDIT_VIEW: frozenset({ROLE_TENANT_ADMIN}),
}
"""Tenant roles that allow an action on any VM of the user's tenant."""

_OWNER_ACTIONS: Final = frozenset(VmAction)
"""What the VM's recorded owner (holding the owner role) may do with it."""

_READ: Final = frozenset({VmAction.VIEW, VmAction.POLICY_VIEW, VmAction.AUDIT_VIEW})
_OPERATE: Final = frozenset({VmAction.OPERATE, VmAction.MIGRATE, VmAction.RESOLVE})
_CLUSTER_ROLES: Final[dict[str, frozenset[VmAction]]] = {
    ROLE_CLUSTER_ADMIN: _READ | _OPERATE,
    ROLE_SECURITY_ADMIN: frozenset(VmAction),
    ROLE_AUDITOR: _READ,
}
"""Cluster-wide roles and the actions they allow on every VM of every tenant."""


@dataclass(frozen=True)
class VmOwnership:
    """A VM's tenant and owner as the holding host recorded them."""

    vm: str
    tenant: str
    owner: str | None


@dataclass(frozen=True)
class AccessDecision:
    """The verdict, the rule that decided it and a line for the caller and the audit trail."""

    allow: bool
    rule: str
    reason: str

    def line(self) -> str:
        return f"{'ALLOW' if self.allow else 'DENY'}: rule {self.rule} ({self.reason})"


def decide_vm_access(principal: Principal, action: VmAction, vm: VmOwnership) -> AccessDecision:
    """May ``principal`` do ``action`` to ``vm``? First cluster roles, then the tenant's."""
    roles = set(principal.roles)
    for role in sorted(roles & set(_CLUSTER_ROLES)):
        if action in _CLUSTER_ROLES[role]:
            return AccessDecision(True, f"cluster-role.{role}", f"{principal.name} is {role}")
    if principal.tenant != vm.tenant:
        # the other tenant's VM is not even named back: only that it is not theirs
        return AccessDecision(
            False,
            "tenant",
            f"{principal.name} (tenant {principal.tenant or 'none'}) has no access to VM "
            f"{vm.vm}: it belongs to another tenant",
        )
    if ROLE_OWNER in roles and principal.name == vm.owner and action in _OWNER_ACTIONS:
        return AccessDecision(True, "owner", f"{principal.name} owns {vm.vm}")
    granted = sorted(roles & _TENANT_ROLES[action])
    if granted:
        return AccessDecision(
            True, f"tenant-role.{granted[0]}", f"{granted[0]} of tenant {vm.tenant}"
        )
    return AccessDecision(
        False,
        f"role.{action.value}",
        f"{principal.name} has roles {describe_roles(principal)}; {action.value} on {vm.vm} "
        f"needs its owner or one of [{', '.join(sorted(_TENANT_ROLES[action]))}] of tenant "
        f"{vm.tenant}, or a cluster role allowing it",
    )


def may_see_tenant(principal: Principal, tenant: str) -> bool:
    """Whether a listing may show ``tenant``'s VMs to ``principal`` at all."""
    if set(principal.roles) & set(_CLUSTER_ROLES):
        return True
    return principal.tenant == tenant


def owner_for_new_vm(
    principal: Principal, tenant: str | None, owner: str | None
) -> tuple[str, str] | AccessDecision:
    """The (tenant, owner) a new VM gets, or the denial: who creates a VM, owns it.

    A user of a tenant creates VMs of their own tenant only, owned by themselves unless they
    are its tenant-admin; a cluster-admin or security-admin names any tenant and owner.
    """
    roles = set(principal.roles)
    cluster = bool(roles & {ROLE_CLUSTER_ADMIN, ROLE_SECURITY_ADMIN})
    want_tenant = tenant or principal.tenant
    if want_tenant is None:
        return AccessDecision(
            False, "tenant", f"{principal.name} has no tenant: name the VM's tenant"
        )
    want_owner = owner or principal.name
    if cluster:
        return want_tenant, want_owner
    if want_tenant != principal.tenant:
        return AccessDecision(
            False,
            "tenant",
            f"{principal.name} (tenant {principal.tenant or 'none'}) may not create a VM of "
            f"tenant {want_tenant}",
        )
    if want_owner != principal.name and ROLE_TENANT_ADMIN not in roles:
        return AccessDecision(
            False,
            "owner",
            f"{principal.name} may not create a VM owned by {want_owner}: only a tenant-admin "
            "names another owner",
        )
    if not roles & {ROLE_OWNER, ROLE_OPERATOR, ROLE_TENANT_ADMIN}:
        return AccessDecision(
            False,
            "role.create",
            f"{principal.name} has roles {describe_roles(principal)}; creating a VM needs "
            "owner, operator or tenant-admin",
        )
    return want_tenant, want_owner


__all__ = [
    "AccessDecision",
    "VmAction",
    "VmOwnership",
    "decide_vm_access",
    "may_see_tenant",
    "owner_for_new_vm",
]
