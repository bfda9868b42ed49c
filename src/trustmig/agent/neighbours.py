"""The co-residency check of ``vm start`` and of an arriving migration, from this host's runtime.

Residents are the VMs this host holds now (starting, running, paused, migrating out, arriving),
each with the co-residency rules of the signed policy this host verified when the VM came, so a
newcomer is judged against what really runs here and never against a source's word. A
newcomer's own rules come from the policy it brings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from trustmig.agent.errors import Code, RequestError
from trustmig.agent.vms import HOLDING, VmManager
from trustmig.policy import (
    CoResidencyDecision,
    Neighbour,
    SignedPolicy,
    VmPolicy,
    decide_co_residency,
    parse_vm_policy,
)

log = logging.getLogger(__name__)


def policy_of(signed_json: str | None) -> VmPolicy | None:
    """The policy inside a stored (already verified) signed policy; None if there is none.
    A stored policy that no longer parses counts as the strictest rules, never as none."""
    if not signed_json:
        return None
    try:
        sp = SignedPolicy.from_json(signed_json)
        return parse_vm_policy(sp.policy_text, source="stored policy", fmt=sp.fmt)  # type: ignore[arg-type]
    except Exception as e:  # noqa: BLE001 - judged strictly below
        log.error("stored VM policy unreadable (%s): it counts as 'a host of its own'", e)
        return VmPolicy.model_validate({"vm": "unreadable", "tenant": "unreadable",
                                        "owner": "unreadable", "serial": 1,
                                        "co_residency": {"neighbours": "none"}})  # fmt: skip


class Neighbours:
    """Decides co-residency for this host; ``stored_policy(vm)`` is the signed JSON it holds."""

    def __init__(self, host: str, vms: VmManager, stored_policy: Callable[[str], str | None],
                 audit: Callable[..., None]) -> None:  # fmt: skip
        self.host = host
        self.vms = vms
        self.stored_policy = stored_policy
        self.audit = audit
        #: newcomers decided but not yet held by the VM manager (a boot, an arrival)
        self._reserved: dict[str, Neighbour] = {}
        #: the policy an arriving VM brought, until this host stores it at the handover
        self._brought: dict[str, VmPolicy | None] = {}

    def _policy(self, vm: str, arriving: bool) -> VmPolicy | None:
        """An arriving VM is judged by the policy it brought (a file left from an earlier stay
        here may be older); a resident by the one this host stored."""
        if arriving and vm in self._brought:
            return self._brought[vm]
        stored = self.stored_policy(vm)
        return policy_of(stored) if stored else self._brought.get(vm)

    def residents(self, *, excluding: str) -> list[Neighbour]:
        held = [
            Neighbour.of(vm.name, vm.spec.tenant, self._policy(vm.name, vm.state == "incoming"))
            for vm in self.vms.vms.values()
            if vm.state in HOLDING and vm.name != excluding
        ]
        names = {n.vm for n in held}
        return held + [n for n in self._reserved.values() if n.vm not in names | {excluding}]

    @contextmanager
    def reserve(self, vm: str, tenant: str, policy: VmPolicy | None, *, user: str | None,
                migration_id: str | None = None) -> Iterator[None]:  # fmt: skip
        """Decide, then hold the newcomer's place until the ``with`` body has registered it:
        two newcomers deciding at once see each other (decide and reserve run without an
        await between them). Raises RequestError(refused) like :meth:`require`."""
        held = self.vms.vms.get(vm)
        if vm in self._reserved or (held is not None and held.state in HOLDING):
            raise RequestError(f"a VM named {vm} is already starting, arriving or running on "
                               f"{self.host}", Code.BUSY)  # fmt: skip
        self.require(vm, tenant, policy, user=user, migration_id=migration_id)
        self._reserved[vm] = Neighbour.of(vm, tenant, policy)
        self._brought[vm] = policy
        try:
            yield
        except BaseException:
            self._brought.pop(vm, None)
            raise
        finally:
            self._reserved.pop(vm, None)

    def decide(self, vm: str, tenant: str, policy: VmPolicy | None) -> CoResidencyDecision:
        return decide_co_residency(Neighbour.of(vm, tenant, policy),
                                   self.residents(excluding=vm), self.host)  # fmt: skip

    def require(self, vm: str, tenant: str, policy: VmPolicy | None, *, user: str | None,
                migration_id: str | None = None) -> None:  # fmt: skip
        """Raises RequestError(refused) naming the rule when the newcomer may not run here;
        every denial is audited."""
        d = self.decide(vm, tenant, policy)
        if d.allow:
            return
        self.audit("policy.decision", vm=vm, migration_id=migration_id, user=user,
                   outcome="deny", data={"direction": "co-residency", "rule": d.rule,
                                         "line": d.reason})  # fmt: skip
        raise RequestError(f"{self.host} refuses {vm}: rule {d.rule} ({d.reason})", Code.REFUSED)
