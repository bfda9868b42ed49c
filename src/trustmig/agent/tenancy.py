"""Tenancy at the control API: every VM operation passes :func:`decide_vm_access` first.

The VM's tenant and owner come from this host's own record (the journal), never from what the
caller sends. Every denial is an ``access.denied`` audit record naming the operation and the
rule, and the caller gets the rule's one line with code ``denied``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NoReturn

from trustmig.agent.errors import Code, RequestError
from trustmig.agent.vms import AuditFn, ManagedVM, VmManager
from trustmig.pki.identity import PeerIdentity
from trustmig.policy import AccessDecision, VmAction, VmOwnership, decide_vm_access


def ownership_of(vm: ManagedVM) -> VmOwnership:
    return VmOwnership(vm.name, vm.spec.tenant, vm.spec.owner)


class Tenancy:
    """Checks and filters VM operations by tenant, ownership and role."""

    def __init__(self, vms: VmManager, audit: AuditFn) -> None:
        self.vms = vms
        self.audit = audit

    def check(
        self, peer: PeerIdentity, op: str, action: VmAction, ownership: VmOwnership
    ) -> AccessDecision:
        """Allow or raise ``RequestError(denied)`` after an ``access.denied`` audit record."""
        decision = decide_vm_access(peer, action, ownership)
        if not decision.allow:
            self.deny(peer, op, ownership.vm, decision.rule, decision.reason)
        return decision

    def deny(self, peer: PeerIdentity, op: str, vm: str | None, rule: str, reason: str) -> NoReturn:
        self.audit("access.denied", vm=vm, user=peer.name, outcome="denied",
                   data={"op": op, "rule": rule, "reason": reason,
                         "tenant": peer.tenant, "roles": list(peer.roles)})  # fmt: skip
        raise RequestError(f"{op} denied: {reason} (rule {rule})", Code.DENIED)

    def vm(self, peer: PeerIdentity, op: str, action: VmAction, name: str) -> ManagedVM:
        """The VM named ``name`` if ``peer`` may do ``action`` to it.

        A VM of another tenant is reported as denied, not as missing, only after the check:
        an unknown name and a foreign VM give different answers, but neither shows anything
        of the VM itself.
        """
        vm = self.vms.get(name)
        self.check(peer, op, action, ownership_of(vm))
        return vm

    def may_view(self, peer: PeerIdentity, ownership: VmOwnership) -> bool:
        return decide_vm_access(peer, VmAction.VIEW, ownership).allow

    def visible(self, peer: PeerIdentity, vms: Iterable[ManagedVM]) -> list[ManagedVM]:
        return [v for v in vms if self.may_view(peer, ownership_of(v))]

    def visible_rows(
        self, peer: PeerIdentity, rows: Iterable[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Filter described migrations by the VM's tenant and owner they carry."""
        return [r for r in rows if self.may_view(peer, ownership_of_row(r))]


def ownership_of_row(row: dict[str, Any]) -> VmOwnership:
    """The tenant and owner a described migration records for its VM."""
    return VmOwnership(str(row.get("vm")), str(row.get("tenant") or ""), row.get("owner"))
