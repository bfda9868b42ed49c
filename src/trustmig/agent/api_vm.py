"""Control API: the VMs of a host (start, list, stop, resume, check, heartbeats, transfer).

Every call names a VM and passes the tenancy check for it first (see ``agent/tenancy.py``): the
VM's tenant and owner are this host's record, fixed when the VM was created here or arrived,
and changed only by ``vm.transfer``.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from trustmig.agent.control import Operations, Request
from trustmig.agent.errors import Code, RequestError
from trustmig.agent.governance import Governance
from trustmig.agent.journal import DefinitionRow
from trustmig.agent.neighbours import Neighbours, policy_of
from trustmig.agent.tenancy import Tenancy, ownership_of
from trustmig.agent.vms import VmManager
from trustmig.hypervisor.spec import DefinitionError, VMSpec, parse_definition
from trustmig.pki.errors import InvalidInput
from trustmig.pki.identity import check_user_name
from trustmig.policy import AccessDecision, VmAction, VmOwnership, VmPolicy, owner_for_new_vm


def ownership_of_definition(row: DefinitionRow | None, name: str) -> VmOwnership | None:
    return None if row is None else VmOwnership(name, row.tenant, row.owner)


class VmApi:
    def __init__(
        self, host: str, vms: VmManager, gov: Governance, tenancy: Tenancy, neighbours: Neighbours
    ) -> None:
        self.host = host
        self.vms = vms
        self.gov = gov
        self.tenancy = tenancy
        self.neighbours = neighbours

    def register(self, ops: Operations) -> None:
        ops.add("vm.start", self.start)
        ops.add("vm.list", self.list)
        ops.add("vm.stop", self.stop)
        ops.add("vm.resume", self.resume)
        ops.add("vm.check", self.check)
        ops.add("vm.probe", self.probe)
        ops.add("vm.heartbeats", self.heartbeats)
        ops.add("vm.transfer", self.transfer)
        ops.add("vm.define", self.define)
        ops.add("vm.undefine", self.undefine)
        ops.add("vm.definition", self.definition)

    def _new_ownership(self, req: Request, raw: dict[str, Any], name: str) -> VmOwnership:
        """Tenant and owner of a VM created now: the creator's, within what they may name."""
        old = self.vms.vms.get(name)
        if old is not None:  # a crashed or departed record keeps its tenant and owner
            own = ownership_of(old)
            self.tenancy.check(req.peer, req.op, VmAction.OPERATE, own)
            return own
        got = owner_for_new_vm(req.peer, raw.get("tenant"), raw.get("owner"))
        if isinstance(got, AccessDecision):
            self.tenancy.deny(req.peer, req.op, name, got.rule, got.reason)
        return VmOwnership(name, got[0], got[1])

    def _parse(self, op: str, raw: Any) -> VMSpec:
        if not isinstance(raw, dict):
            raise RequestError(f"{op}: the VM definition must be a table of fields", Code.INVALID)
        try:
            return parse_definition(raw)
        except DefinitionError as e:
            head = str(e).split(":", 1)[0]
            named = " " not in head and head != "definition"  # "memory_mib: ..." names a field
            raise RequestError(f"{op}: {'field ' if named else ''}{e}", Code.INVALID) from None

    async def start(self, req: Request) -> dict[str, Any]:
        """Start a defined VM by ``name``, or a transient one from a ``spec``."""
        defined: VmOwnership | None = None
        if req.params.get("spec") is None:
            name = req.param("name")
            defined = ownership_of_definition(self.vms.definitions.get(name), name)
            if defined is not None:  # ownership was fixed when it was defined
                self.tenancy.check(req.peer, req.op, VmAction.OPERATE, defined)
            spec = self.vms.defined(name)
        else:
            raw = req.param("spec", dict)
            spec = self._parse(req.op, raw)
            if spec.name in self.vms.definitions:
                raise RequestError(
                    f"a VM named {spec.name} is defined on {self.host}: start it by name "
                    f"('trustmig vm start {spec.name}'), or pick another name",
                    Code.BUSY,
                )
        vm = self.vms.vms.get(spec.name)
        if vm is not None and vm.state not in ("crashed", "handed-over", "discarded"):
            raise RequestError(f"a VM named {spec.name} already exists on {self.host}", Code.BUSY)
        own = defined or self._new_ownership(req, raw, spec.name)
        spec = spec.model_copy(update={"tenant": own.tenant, "owner": own.owner})
        brought = req.params.get("policy")
        if brought:
            policy: VmPolicy | None = self.gov.verify_policy(str(brought), own)[1]
        elif vm is None and spec.name not in self.vms.definitions:
            policy = None
        else:
            policy = policy_of(self.gov.vm_policy_json(spec.name))
        timeout = float(req.params.get("boot_timeout", 180))
        with self.neighbours.reserve(spec.name, own.tenant, policy, user=req.peer.name):
            if brought:
                self.gov.set_vm_policy(str(brought), own)
            elif policy is None:
                self.gov.drop_vm_policy(spec.name)  # a stale file of an earlier VM of this name
            vm = await self.vms.start(spec, req.peer.name, timeout)
        await req.emit({"event": "phase", "phase": "running", "pid": vm.qemu.pid})
        return await vm.describe()

    async def define(self, req: Request) -> dict[str, Any]:
        """Store a definition; its tenant and owner are fixed here like a started VM's."""
        raw = req.param("definition", dict)
        spec = self._parse(req.op, raw)
        old = self.vms.definitions.get(spec.name)
        if old is not None:
            own = ownership_of_definition(old, spec.name)
            assert own is not None
            self.tenancy.check(req.peer, req.op, VmAction.OPERATE, own)
        else:
            own = self._new_ownership(req, raw, spec.name)
        spec = spec.model_copy(update={"tenant": own.tenant, "owner": own.owner})
        self.vms.define(spec, req.peer.name)
        return {
            "name": spec.name,
            "tenant": spec.tenant,
            "owner": spec.owner,
            "replaced": old is not None,
            "definition": spec.model_dump(mode="json"),
        }

    async def undefine(self, req: Request) -> dict[str, Any]:
        name = req.param("name")
        own = ownership_of_definition(self.vms.definitions.get(name), name)
        if own is not None:
            self.tenancy.check(req.peer, req.op, VmAction.OPERATE, own)
        self.vms.undefine(name, req.peer.name)
        return {"name": name, "state": "undefined"}

    async def definition(self, req: Request) -> dict[str, Any]:
        name = req.param("name")
        own = ownership_of_definition(self.vms.definitions.get(name), name)
        if own is not None:
            self.tenancy.check(req.peer, req.op, VmAction.VIEW, own)
        return {"name": name, "definition": self.vms.defined(name).model_dump(mode="json")}

    async def list(self, req: Request) -> dict[str, Any]:
        visible = self.tenancy.visible(req.peer, self.vms.visible())
        rows = [await m.describe() for m in visible]
        live = {r["name"] for r in rows}
        for name, d in sorted(self.vms.definitions.items()):
            own = ownership_of_definition(d, name)
            if name in live or own is None or not self.tenancy.may_view(req.peer, own):
                continue
            spec = VMSpec.model_validate(d.definition)
            rows.append({"name": name, "state": "defined", "qemu_state": "absent", "pid": None,
                         "memory_mib": spec.memory_mib, "vcpus": spec.vcpus,
                         "tenant": d.tenant, "owner": d.owner})  # fmt: skip
        for r in rows:
            r["defined"] = r["name"] in self.vms.definitions
        return {"host": self.host, "vms": rows}

    async def stop(self, req: Request) -> dict[str, Any]:
        name = req.param("name")
        self.tenancy.vm(req.peer, req.op, VmAction.OPERATE, name)
        await self.vms.stop(name, req.peer.name)
        return {"name": name, "state": "stopped"}

    async def resume(self, req: Request) -> dict[str, Any]:
        name = req.param("name")
        self.tenancy.vm(req.peer, req.op, VmAction.OPERATE, name)
        vm = await self.vms.resume(name, req.peer.name)
        return await vm.describe()

    async def check(self, req: Request) -> dict[str, Any]:
        m = self.tenancy.vm(req.peer, req.op, VmAction.OPERATE, req.param("name"))
        timeout = float(req.params.get("timeout") or 120)
        try:
            res = await m.qemu.console.check(min(max(timeout, 1.0), 600.0))
        except TimeoutError:
            raise RequestError(
                f"VM {m.name} did not answer its memory check within {timeout:.0f}s", Code.FAILED
            ) from None
        return {"name": m.name, **res.__dict__}

    async def probe(self, req: Request) -> dict[str, Any]:
        """The lab guest connects, from inside, to ``address:port`` and says what came back
        (``ok`` with the bytes read, ``refused``, ``timeout``, ``unreachable``): what one
        guest can reach of another."""
        m = self.tenancy.vm(req.peer, req.op, VmAction.OPERATE, req.param("name"))
        address, port = str(req.param("address")), req.params.get("port")
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            raise RequestError(
                f"vm.probe: {address!r} is not an IPv4 address", Code.INVALID
            ) from None
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise RequestError("vm.probe: port must be 1-65535", Code.INVALID)
        if m.spec.workload is None:
            raise RequestError(f"VM {m.name} runs no lab workload to probe from", Code.INVALID)
        try:
            line = await m.qemu.console.command(f"connect {address} {port}", "NET ", timeout=15)
        except TimeoutError:
            raise RequestError(f"VM {m.name} did not answer the probe", Code.FAILED) from None
        words = line.split()
        result = words[2] if len(words) > 2 else "error"
        got = next((int(w[6:]) for w in words if w.startswith("bytes=")), 0)
        return {"name": m.name, "address": address, "port": port, "result": result, "bytes": got}

    async def heartbeats(self, req: Request) -> dict[str, Any]:
        m = self.tenancy.vm(req.peer, req.op, VmAction.VIEW, req.param("name"))
        since = float(req.params.get("since", 0))
        hbs = m.qemu.console.heartbeats_since(since)
        return {"name": m.name, "heartbeats": [(h.seq, h.host_ts) for h in hbs]}

    async def transfer(self, req: Request) -> dict[str, Any]:
        """Ownership moves only here; the VM's policy must then be signed by the new owner."""
        name = req.param("name")
        try:
            new_owner = check_user_name(req.param("to"))
        except InvalidInput as e:
            raise RequestError(f"vm.transfer: {e}", Code.INVALID) from None
        self.tenancy.vm(req.peer, req.op, VmAction.TRANSFER, name)
        vm, old = self.vms.transfer(name, new_owner, req.peer.name)
        return {
            "name": name,
            "tenant": vm.spec.tenant,
            "from": old,
            "to": new_owner,
            "note": f"every migration of {name} is denied until {new_owner} (or a tenant-admin) "
            "signs a new policy for it",
        }
