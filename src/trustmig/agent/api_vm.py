"""Control API: the VMs of a host (start, list, stop, resume, check, heartbeats)."""

from __future__ import annotations

from typing import Any

from trustmig.agent.control import Operations, Request
from trustmig.agent.errors import Code, RequestError
from trustmig.agent.governance import Governance
from trustmig.agent.vms import VmManager
from trustmig.hypervisor.spec import VMSpec

OPERATORS = ("owner", "operator", "security-admin")


class VmApi:
    def __init__(self, host: str, vms: VmManager, gov: Governance) -> None:
        self.host = host
        self.vms = vms
        self.gov = gov

    def register(self, ops: Operations) -> None:
        ops.add("vm.start", self.start, roles=OPERATORS)
        ops.add("vm.list", self.list)
        ops.add("vm.stop", self.stop, roles=OPERATORS)
        ops.add("vm.resume", self.resume, roles=OPERATORS)
        ops.add("vm.check", self.check)
        ops.add("vm.heartbeats", self.heartbeats)

    async def start(self, req: Request) -> dict[str, Any]:
        spec = VMSpec.model_validate(req.param("spec", dict))
        spec.check_fits()
        if spec.owner is None:
            spec = spec.model_copy(update={"owner": req.peer.name})
        if req.params.get("policy"):
            pol = self.gov.set_vm_policy(spec.name, str(req.params["policy"]))
            spec = spec.model_copy(update={"tenant": pol.tenant, "owner": pol.owner})
        vm = self.vms.vms.get(spec.name)
        if vm is not None and vm.state not in ("crashed", "handed-over", "discarded"):
            raise RequestError(f"a VM named {spec.name} already exists on {self.host}", Code.BUSY)
        timeout = float(req.params.get("boot_timeout", 180))
        vm = await self.vms.start(spec, req.peer.name, timeout)
        await req.emit({"event": "phase", "phase": "running", "pid": vm.qemu.pid})
        return await vm.describe()

    async def list(self, req: Request) -> dict[str, Any]:
        return {"host": self.host, "vms": [await m.describe() for m in self.vms.visible()]}

    async def stop(self, req: Request) -> dict[str, Any]:
        name = req.param("name")
        await self.vms.stop(name, req.peer.name)
        return {"name": name, "state": "stopped"}

    async def resume(self, req: Request) -> dict[str, Any]:
        vm = await self.vms.resume(req.param("name"), req.peer.name)
        return await vm.describe()

    async def check(self, req: Request) -> dict[str, Any]:
        m = self.vms.get(req.param("name"))
        timeout = float(req.params.get("timeout") or 120)
        try:
            res = await m.qemu.console.check(min(max(timeout, 1.0), 600.0))
        except TimeoutError:
            raise RequestError(
                f"VM {m.name} did not answer its memory check within {timeout:.0f}s", Code.FAILED
            ) from None
        return {"name": m.name, **res.__dict__}

    async def heartbeats(self, req: Request) -> dict[str, Any]:
        m = self.vms.get(req.param("name"))
        since = float(req.params.get("since", 0))
        hbs = m.qemu.console.heartbeats_since(since)
        return {"name": m.name, "heartbeats": [(h.seq, h.host_ts) for h in hbs]}
