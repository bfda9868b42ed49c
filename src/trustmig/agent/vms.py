"""The VMs a host owns or receives, journaled, and re-adopted by a restarted agent.

A guest's QEMU is not a child that dies with the agent: it runs in a session of its own and is
known by PID and start time in the journal. A restarted agent attaches to every journaled QEMU
that still runs (same process, QMP and console reconnected) and reports the ones that died while
it was down as crashed, with an audit record. The VM manager is the only owner of the
:class:`QemuVM` objects; migrations borrow a VM by *claiming* it, which is atomic (one event
loop, no await between the check and the claim), so two requests cannot both take it.

VM states: ``starting`` → ``running``; ``migrating-out`` while a migration holds it here;
``incoming`` for a guest arriving (not ours yet); ``handed-over`` once another host owns it (the
copy here is stopped and forgotten); ``discarded`` for an incoming guest given up; ``crashed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from trustmig.agent.diskkeys import DiskKeys
from trustmig.agent.errors import Code, RequestError
from trustmig.agent.journal import DefinitionRow, Journal, VmRow
from trustmig.hypervisor.devices import (
    HostCannotRun,
    HostNet,
    machine_types,
    require_host_can_run,
    stamp_disks,
)
from trustmig.hypervisor.qemu import QemuError, QemuVM
from trustmig.hypervisor.spec import VMSpec
from trustmig.proc import ProcessRef

log = logging.getLogger(__name__)

#: States in which the guest's resources count against the host.
HOLDING = frozenset({"starting", "running", "migrating-out", "incoming", "paused"})


class AuditFn(Protocol):
    def __call__(self, kind: str, **fields: Any) -> None: ...


class QemuFactory(Protocol):
    def __call__(
        self,
        spec: VMSpec,
        *,
        incoming: bool,
        run_name: str,
        sock_dir: Path | None = None,
        prealloc: bool = False,
    ) -> QemuVM: ...


@dataclass
class ManagedVM:
    """A guest on this host. ``state`` is the host's view; QEMU's run state is queried live."""

    spec: VMSpec
    qemu: QemuVM
    state: str = "starting"
    epoch: int = 1
    migration: str | None = None
    arrived_by: str | None = None
    error: str | None = None
    created_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.spec.name

    def row(self) -> VmRow:
        runtime = self.qemu.runtime()
        runtime["migration"] = self.migration
        return VmRow(
            name=self.spec.name,
            tenant=self.spec.tenant,
            owner=self.spec.owner,
            epoch=self.epoch,
            state=self.state,
            definition=self.spec.model_dump(mode="json"),
            runtime=runtime,
            arrived_by=self.arrived_by,
            error=self.error,
        )

    async def describe(self) -> dict[str, Any]:
        hbs = self.qemu.console.heartbeats
        return {
            "name": self.spec.name,
            "state": self.state,
            "qemu_state": await self.qemu.status() if self.state != "crashed" else "absent",
            "pid": self.qemu.pid,
            "epoch": self.epoch,
            "memory_mib": self.spec.memory_mib,
            "vcpus": self.spec.vcpus,
            "tenant": self.spec.tenant,
            "owner": self.spec.owner,
            "last_heartbeat": hbs[-1].seq if hbs else None,
            "arrived_by": self.arrived_by,
            "migration": self.migration,
            "error": self.error,
        }


class VmManager:
    """Every VM of the host, in memory and in the journal."""

    def __init__(
        self,
        journal: Journal,
        audit: AuditFn,
        host: str,
        make_qemu: QemuFactory,
        prepare_image: Callable[[], Awaitable[str]],
        host_net: HostNet | None = None,
        disk_keys: DiskKeys | None = None,
    ) -> None:
        self.journal = journal
        self.disk_keys = disk_keys or DiskKeys(None, audit, host)
        self.audit = audit
        self.host = host
        self.make_qemu = make_qemu
        self.prepare_image = prepare_image
        self.host_net = host_net or HostNet()
        self.vms: dict[str, ManagedVM] = {}
        self.definitions: dict[str, DefinitionRow] = journal.definitions()
        self._watch: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lookup
    def get(self, name: str) -> ManagedVM:
        vm = self.vms.get(name)
        if vm is None or vm.state in ("handed-over", "discarded"):
            raise RequestError(
                f"no VM named {name!r} on {self.host} (see 'trustmig vm list')", Code.NOT_FOUND
            )
        return vm

    def visible(self) -> list[ManagedVM]:
        return [v for v in self.vms.values() if v.state not in ("handed-over", "discarded")]

    def used(self) -> tuple[int, int]:
        """Memory (MiB) and vCPUs of the guests that run or arrive here."""
        held = [v.spec for v in self.vms.values() if v.state in HOLDING]
        return sum(s.memory_mib for s in held), sum(s.vcpus for s in held)

    def persist(self, vm: ManagedVM) -> None:
        self.journal.put_vm(vm.row())

    # ------------------------------------------------------------------ life cycle
    async def start(self, spec: VMSpec, user: str, boot_timeout: float) -> ManagedVM:
        """Boot a guest and wait for its workload; journaled before QEMU is spawned."""
        old = self.vms.get(spec.name)
        if old is not None and old.state not in ("crashed", "handed-over", "discarded"):
            raise RequestError(f"a VM named {spec.name} already exists on {self.host}", Code.BUSY)
        image_key = await self.prepare_image()
        spec = spec.model_copy(update={"image_key": image_key})
        spec, keys = await self.disk_keys.for_start(spec, user)
        spec = await asyncio.to_thread(self._checked_for_start, spec)
        old = self.vms.get(spec.name)  # again: another start or an arrival may have come meanwhile
        if old is not None and old.state not in ("crashed", "handed-over", "discarded"):
            raise RequestError(f"a VM named {spec.name} already exists on {self.host}", Code.BUSY)
        qemu = self.make_qemu(spec, incoming=False, run_name=f"vm-{spec.name}")
        qemu.disk_keys = keys
        vm = ManagedVM(spec=spec, qemu=qemu, state="starting")
        self.vms[spec.name] = vm
        try:
            # journaled the moment the process exists, whatever happens to us afterwards
            await qemu.start(on_spawn=lambda: self.persist(vm))
            if spec.waits_for_workload:
                await qemu.console.wait_for("READY", boot_timeout)
        except BaseException as e:
            self.vms.pop(spec.name, None)
            await qemu.kill()
            with contextlib.suppress(Exception):
                self.journal.drop_vm(spec.name)
            if isinstance(e, TimeoutError):
                msg = f"VM {spec.name} did not become ready in time"
                raise RequestError(msg, Code.FAILED) from None
            raise
        vm.state = "running"
        self.persist(vm)
        self.audit("vm.start", vm=spec.name, user=user, outcome="running",
                   data={"pid": qemu.pid, "epoch": vm.epoch})  # fmt: skip
        return vm

    def _checked_for_start(self, spec: VMSpec) -> VMSpec:
        """The definition stamped with its disks' identities and boot files' digests, if this
        host can run it; raises RequestError(refused) naming what is missing."""
        try:
            machine = machine_types(self.host_net.qemu_binary).canonical(spec.machine)
            spec = stamp_disks(spec.model_copy(update={"machine": machine}))
            require_host_can_run(spec, self.host_net, incoming=False, host=self.host)
        except HostCannotRun as e:
            raise RequestError(str(e), Code.REFUSED) from None
        return spec

    # ------------------------------------------------------------------ definitions
    def define(self, spec: VMSpec, user: str) -> DefinitionRow:
        """Store (or replace) a definition; a VM that runs keeps its device model until it is
        stopped, so a running VM's definition cannot be replaced."""
        vm = self.vms.get(spec.name)
        if vm is not None and vm.state in HOLDING:
            raise RequestError(
                f"VM {spec.name} runs on {self.host}: stop it before changing its definition",
                Code.BUSY,
            )
        row = DefinitionRow(spec.name, spec.tenant, spec.owner,
                            spec.model_dump(mode="json"), user)  # fmt: skip
        self.journal.put_definition(row)
        replaced = spec.name in self.definitions
        self.definitions[spec.name] = row
        self.audit("vm.define", vm=spec.name, user=user, outcome="defined",
                   data={"replaced": replaced, "tenant": spec.tenant})  # fmt: skip
        return row

    def undefine(self, name: str, user: str) -> None:
        """Forget a definition; refused while its VM runs or migrates here."""
        if name not in self.definitions:
            raise RequestError(f"no VM named {name!r} is defined on {self.host}", Code.NOT_FOUND)
        vm = self.vms.get(name)
        if vm is not None and vm.state in HOLDING:
            raise RequestError(f"VM {name} runs on {self.host}: stop it first", Code.BUSY)
        self.journal.drop_definition(name)
        del self.definitions[name]
        self.audit("vm.undefine", vm=name, user=user, outcome="undefined")

    def defined(self, name: str) -> VMSpec:
        row = self.definitions.get(name)
        if row is None:
            raise RequestError(
                f"no VM named {name!r} is defined on {self.host}: 'trustmig vm define FILE' "
                "first, or 'trustmig vm start --lab' for a lab guest",
                Code.NOT_FOUND,
            )
        return VMSpec.model_validate(row.definition)

    def _follow(self, vm: ManagedVM, state: str) -> None:
        """A definition follows its VM: it leaves this host with a handover."""
        if state == "handed-over" and vm.name in self.definitions:
            self.journal.drop_definition(vm.name)
            del self.definitions[vm.name]

    def keep_definition(self, vm: ManagedVM) -> None:
        """An arrived VM that was defined on its source is defined here from now on (called
        when this host becomes its owner)."""
        spec = vm.spec
        row = DefinitionRow(spec.name, spec.tenant, spec.owner,
                            spec.model_dump(mode="json"), vm.arrived_by)  # fmt: skip
        self.journal.put_definition(row)
        self.definitions[spec.name] = row

    async def stop(self, name: str, user: str) -> None:
        vm = self.get(name)
        if vm.migration is not None:
            raise RequestError(
                f"VM {name} is held by migration {vm.migration}: see 'trustmig migration show "
                f"{vm.migration}'",
                Code.BUSY,
            )
        await vm.qemu.stop()
        self.vms.pop(name, None)
        self.journal.drop_vm(name)
        self.audit("vm.stop", vm=name, user=user, outcome="stopped")

    async def resume(self, name: str, user: str) -> ManagedVM:
        vm = self.get(name)
        if vm.migration is not None:
            raise RequestError(
                f"VM {name} is held by migration {vm.migration}, whose outcome decides where "
                f"it runs: 'trustmig migration resolve {vm.migration}'",
                Code.IN_DOUBT,
            )
        if vm.state == "crashed":
            raise RequestError(f"VM {name} crashed; start it again", Code.INVALID)
        await vm.qemu.cmd("cont")
        vm.state = "running"
        self.persist(vm)
        self.audit("vm.resume", vm=name, user=user, outcome="running")
        return vm

    def transfer(self, name: str, new_owner: str, user: str) -> tuple[ManagedVM, str | None]:
        """Hand ownership of ``name`` to ``new_owner`` (journaled, audited); the old owner."""
        vm = self.get(name)
        if vm.migration is not None:
            raise RequestError(
                f"VM {name} is held by migration {vm.migration}; transfer it afterwards",
                Code.BUSY,
            )
        old = vm.spec.owner
        vm.spec = vm.spec.model_copy(update={"owner": new_owner})
        self.persist(vm)
        self.audit("vm.transfer", vm=name, user=user, outcome="transferred",
                   data={"from": old, "to": new_owner, "tenant": vm.spec.tenant})  # fmt: skip
        return vm, old

    # ------------------------------------------------------------------ migrations
    def claim(self, name: str, migration_id: str) -> ManagedVM:
        """Take a running VM for an outgoing migration; atomic on the event loop."""
        vm = self.get(name)
        if vm.migration is not None:
            raise RequestError(
                f"VM {name} is already migrating ({vm.migration}); wait for it or see "
                f"'trustmig migration show {vm.migration}'",
                Code.BUSY,
            )
        if vm.state != "running":
            raise RequestError(f"VM {name} is {vm.state}, not running", Code.INVALID)
        vm.migration = migration_id
        vm.state = "migrating-out"
        return vm

    def release(self, vm: ManagedVM, state: str) -> None:
        """The migration that held ``vm`` is over; ``state`` is what it left (journaled)."""
        self._follow(vm, state)
        vm.migration = None
        vm.state = state
        if state in ("handed-over", "discarded"):
            self.vms.pop(vm.name, None)
            self.journal.drop_vm(vm.name)
        else:
            self.persist(vm)

    def add_incoming(self, spec: VMSpec, qemu: QemuVM, migration_id: str, epoch: int) -> ManagedVM:
        old = self.vms.get(spec.name)
        if old is not None and old.state not in ("crashed", "handed-over", "discarded"):
            raise RequestError(f"a VM named {spec.name} already runs on {self.host}", Code.BUSY)
        vm = ManagedVM(
            spec=spec, qemu=qemu, state="incoming", epoch=epoch, migration=migration_id,
            arrived_by=migration_id,
        )  # fmt: skip
        self.vms[spec.name] = vm
        return vm

    # ------------------------------------------------------------------ restart
    async def load(self) -> None:
        """Re-adopt every journaled QEMU that still runs; report the dead ones."""
        for row in self.journal.vms():
            spec = VMSpec.model_validate(row.definition)
            rt = row.runtime
            qemu = self.make_qemu(
                spec, incoming=bool(rt.get("incoming")), run_name=Path(rt["run_dir"]).name,
                sock_dir=Path(rt["sock_dir"]),
            )  # fmt: skip
            vm = ManagedVM(
                spec=spec, qemu=qemu, state=row.state, epoch=row.epoch,
                migration=rt.get("migration"), arrived_by=row.arrived_by, error=row.error,
            )  # fmt: skip
            ref = ProcessRef.from_json(rt.get("process"))
            self.vms[spec.name] = vm
            if row.state in ("handed-over", "discarded"):
                await self._finish_dead_copy(vm, ref)
                continue
            if row.state == "crashed":
                continue
            try:
                if ref is None:
                    raise QemuError("no process was journaled")
                await qemu.attach(ref, float(rt.get("started_at") or 0.0), timeout=30)
            except QemuError as e:
                await self._unreachable(vm, ref, e)
                continue
            if vm.state == "starting":
                vm.state = "running"
            self.persist(vm)
            self.audit("vm.adopt", vm=spec.name, outcome=vm.state,
                       data={"pid": qemu.pid, "epoch": vm.epoch})  # fmt: skip
            if vm.state == "running" and vm.migration is None:
                await self._run_if_paused(vm)

    async def _run_if_paused(self, vm: ManagedVM) -> None:
        """A guest journaled as running here must run: the agent may have been stopped between
        journaling a handover (or a roll-back) and telling QEMU to continue."""
        state = await vm.qemu.status()
        if state not in ("paused", "prelaunch", "postmigrate"):
            return
        with contextlib.suppress(Exception):
            await vm.qemu.cmd("cont")
        reason = f"journaled as running, found {state} at agent start"
        outcome = await vm.qemu.status()
        self.audit("vm.resume", vm=vm.name, outcome=outcome, data={"reason": reason})

    async def _finish_dead_copy(self, vm: ManagedVM, ref: ProcessRef | None) -> None:
        """A copy another host owns (or that was given up): it must not run; forget it."""
        if ref is not None and ref.alive():
            ref.kill()
        self.vms.pop(vm.name, None)
        self.journal.drop_vm(vm.name)
        self.audit("vm.stop", vm=vm.name, outcome="stopped",
                   data={"reason": f"stale {vm.state} copy found at start"})  # fmt: skip

    async def _unreachable(self, vm: ManagedVM, ref: ProcessRef | None, e: QemuError) -> None:
        """A journaled QEMU that is gone, or alive but deaf to QMP. A deaf one in a migration is
        that migration's to settle (it may hold a post-copy guest); any other is ended, so that
        a guest reported crashed can never run beside the copy started again in its place."""
        if ref is not None and ref.alive():
            qemu = vm.qemu
            qemu.ref = ref
            if vm.migration is not None:
                log.error("VM %s: QEMU %d does not answer (%s); its migration decides", vm.name,
                          ref.pid, e)  # fmt: skip
                return
            ref.kill()
            self._crashed(vm, f"QEMU {ref.pid} did not answer at agent start and was ended ({e})")
            return
        self._crashed(vm, f"QEMU gone while the agent was down ({e})")

    def _crashed(self, vm: ManagedVM, reason: str) -> None:
        vm.state = "crashed"
        vm.error = reason
        self.persist(vm)
        self.audit("vm.crashed", vm=vm.name, outcome="crashed", data={"reason": reason})
        log.error("VM %s crashed: %s", vm.name, reason)

    # ------------------------------------------------------------------ watching
    def start_watching(self, interval: float = 1.0) -> None:
        self._watch = asyncio.ensure_future(self._watch_loop(interval))

    async def _watch_loop(self, interval: float) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(interval)
                for vm in list(self.vms.values()):
                    if vm.migration is None and vm.state == "running" and not vm.qemu.alive():
                        self._crashed(vm, f"QEMU exited: {vm.qemu.stderr_tail()}")

    async def detach_all(self) -> None:
        """The agent stops: leave every guest running, drop only our connections to them."""
        if self._watch is not None:
            self._watch.cancel()
        for vm in self.vms.values():
            await vm.qemu.detach()

    async def stop_all(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for vm in list(self.vms.values()):
            await vm.qemu.stop()
            self.journal.drop_vm(vm.name)
        self.vms.clear()
