"""Control API: the host itself (ping, status), VM policies, the audit trail and the guard."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from trustmig import __version__
from trustmig.agent.audit_anchor import AuditAnchor
from trustmig.agent.control import Operations, Request
from trustmig.agent.errors import Code, RequestError
from trustmig.agent.governance import Governance
from trustmig.agent.migrations import MigrationRegistry
from trustmig.agent.tenancy import Tenancy, ownership_of
from trustmig.agent.vms import VmManager
from trustmig.guard import Admission, Guard, GuardError
from trustmig.guard.claims import Quarantine
from trustmig.policy import PolicySignatureError, PolicyStaleError, VmAction
from trustmig.store import StoreError

AUDITORS = ("auditor", "security-admin")
#: Who reaches ``audit.show`` at all; tenant roles then see only their own VM's events.
AUDIT_READERS = (*AUDITORS, "tenant-admin", "owner")


class AdminApi:
    def __init__(
        self,
        host: str,
        gov: Governance,
        vms: VmManager,
        registry: MigrationRegistry,
        guard: Guard,
        admission: Admission,
        quarantine: Quarantine,
        status_extra: Callable[[], dict[str, Any]],
        attestation_status: Callable[[], Any] | None,
        tenancy: Tenancy,
        anchor: AuditAnchor,
    ) -> None:
        self.tenancy = tenancy
        self.anchor = anchor
        self.host = host
        self.gov = gov
        self.vms = vms
        self.registry = registry
        self.guard = guard
        self.admission = admission
        self.quarantine = quarantine
        self.status_extra = status_extra
        self.attestation_status = attestation_status
        #: lifts a quarantine in the cluster store (set when the agent has one)
        self.clear_cluster: Callable[[str, str], Awaitable[Any]] | None = None
        #: told the outcome of every full verification of the chain (the metrics keep it)
        self.on_audit_verified: Callable[[bool], None] | None = None

    def register(self, ops: Operations) -> None:
        ops.add("ping", self.ping, kinds=("user", "host"))
        ops.add("host.status", self.host_status)
        ops.add("policy.set", self.policy_set)
        ops.add("policy.show", self.policy_show)
        ops.add("audit.show", self.audit_show, roles=AUDIT_READERS)
        ops.add("audit.export", self.audit_export, roles=AUDITORS)
        ops.add("audit.verify", self.audit_verify, roles=AUDITORS)
        ops.add("guard.show", self.guard_show)
        ops.add("guard.quarantine", self.guard_quarantine)
        ops.add("guard.clear", self.guard_clear, roles=("security-admin",))

    async def ping(self, req: Request) -> dict[str, Any]:
        return {
            "host": self.host,
            "version": __version__,
            "peer": req.peer.name,
            "peer_kind": req.peer.kind,
            "roles": list(req.peer.roles),
        }

    async def host_status(self, req: Request) -> dict[str, Any]:
        att = await asyncio.to_thread(self.attestation_status) if self.attestation_status else None
        incoming = [
            {
                "migration_id": d.migration_id,
                "vm": d.core.vm,
                "source": d.source,
                "state": d.core.state.value,
                "error": d.core.error,
                "pid": d.vm.qemu.pid if d.vm.qemu.alive() else None,
            }
            for d in self.registry.incoming.values()
            if not d.core.terminal and self.tenancy.may_view(req.peer, ownership_of(d.vm))
        ]
        visible = self.tenancy.visible(req.peer, self.vms.visible())
        return {
            "host": self.host,
            "version": __version__,
            **self.status_extra(),
            "vms": [await m.describe() for m in visible],
            "attestation": att,
            "incoming": incoming,
        }

    async def policy_set(self, req: Request) -> dict[str, Any]:
        """Install a newer signed policy for a VM of this host, signed by who may sign it."""
        vm = self.tenancy.vm(req.peer, req.op, VmAction.POLICY_SIGN, req.param("vm"))
        try:
            pol = self.gov.set_vm_policy(req.param("policy"), ownership_of(vm))
        except (PolicySignatureError, PolicyStaleError) as e:
            rule = "policy.serial" if isinstance(e, PolicyStaleError) else "policy.signature"
            self.tenancy.deny(req.peer, req.op, vm.name, rule, str(e))
        self.gov.event("policy.set", vm=vm.name, user=req.peer.name, outcome="set",
                       data={"signed_by": pol.signed_by, "serial": pol.serial})  # fmt: skip
        return {"vm": vm.name, "signed_by": pol.signed_by, "serial": pol.serial,
                "policy": pol.model_dump(mode="json")}  # fmt: skip

    async def policy_show(self, req: Request) -> dict[str, Any]:
        vm = self.tenancy.vm(req.peer, req.op, VmAction.POLICY_VIEW, req.param("vm"))
        sj = self.gov.vm_policy_json(vm.name)
        if sj is None:
            return {"vm": vm.name, "policy": None, "note": "no policy: every migration is denied"}
        _, pol = self.gov.verify_policy(sj, ownership_of(vm))
        return {"vm": vm.name, "signed_by": pol.signed_by, "serial": pol.serial,
                "policy": pol.model_dump(mode="json")}  # fmt: skip

    async def audit_show(self, req: Request) -> dict[str, Any]:
        vm = req.params.get("vm")
        if not set(req.peer.roles) & set(AUDITORS):
            if not vm:
                self.tenancy.deny(req.peer, req.op, None, "role.audit-view",
                                  f"{req.peer.name} reads only the events of a VM of its own "
                                  "tenant: pass --vm")  # fmt: skip
            self.tenancy.vm(req.peer, req.op, VmAction.AUDIT_VIEW, str(vm))
        evs = self.gov.audit.events(
            vm=vm,
            migration_id=req.params.get("migration_id"),
            limit=int(req.params.get("limit", 200)),
        )
        return {"host": self.host, "events": [e.to_json() for e in evs]}

    async def audit_export(self, req: Request) -> dict[str, Any]:
        return {"host": self.host, "events": [e.to_json() for e in self.gov.audit.events()]}

    async def audit_verify(self, req: Request) -> dict[str, Any]:
        """The chain's own proofs, then the chain against what the peers witnessed of it."""
        self.gov.audit.flush()
        rep = self.gov.audit.verify(self.gov.audit_key.public_key())
        verdict = await self.anchor.verify()
        out = {"host": self.host, **rep.__dict__}
        out["anchor"] = {"code": verdict.code, "detail": verdict.detail,
                         "witnesses": [w.__dict__ for w in verdict.witnesses]}  # fmt: skip
        if verdict.lost:
            out["ok"] = False
            out["problems"] = [*rep.problems, verdict.detail]
        elif verdict.code == "unanchored":
            out["warnings"] = [*rep.warnings, verdict.detail]
        if self.on_audit_verified is not None:
            self.on_audit_verified(bool(out["ok"]))
        return out

    async def guard_show(self, req: Request) -> dict[str, Any]:
        return {
            "host": self.host,
            "guard": self.guard.snapshot(),
            "admission": self.admission.snapshot(),
            "quarantine": self.quarantine.snapshot(),
        }

    async def guard_quarantine(self, req: Request) -> dict[str, Any]:
        return {
            "host": self.host,
            "quarantined": self.quarantine.snapshot(),
            "cleared": self.quarantine.cleared(),
        }

    async def guard_clear(self, req: Request) -> dict[str, Any]:
        host = req.param("host")
        lifted = None
        if self.clear_cluster is not None:  # with a cluster store the quarantine is cluster-wide
            try:
                lifted = await self.clear_cluster(host, req.peer.name)
            except StoreError as e:
                raise RequestError(
                    f"{e}: a quarantine is lifted once for the whole cluster; "
                    "try again when the store is back",
                    Code.REFUSED,
                ) from None
        try:
            self.quarantine.clear(host, by_user=req.peer.name)
        except GuardError as e:
            if lifted is None:
                raise RequestError(str(e), Code.INVALID) from None
        self.gov.event("guard.quarantine", user=req.peer.name, outcome="cleared",
                       data={"host": host})  # fmt: skip
        return {"host": self.host, "cleared": host, "by": req.peer.name}
