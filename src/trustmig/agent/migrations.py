"""Every migration of the host: starting them, answering the peer, finding them after a restart.

:class:`MigrationRegistry` owns the drivers (one per migration and side). It makes the
decisions that come before a core exists (policy, quarantine, admission, may this peer ask at
all), implements the data listener's view of incoming sessions, answers peers about migrations
that already ended from the journal, and at agent start restores every migration the journal
holds as unfinished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from trustmig.agent import capacity, qemu_tls
from trustmig.agent.datapath import SessionTarget
from trustmig.agent.dest_driver import (
    DestinationContext,
    DestinationDriver,
    DriverGone,
)
from trustmig.agent.errors import Code, RequestError
from trustmig.agent.journal import MigrationRow
from trustmig.agent.neighbours import policy_of
from trustmig.agent.runtime import HostServices
from trustmig.agent.source_driver import SourceContext, SourceDriver, source_plan
from trustmig.agent.vms import ManagedVM
from trustmig.channel.errors import ChannelError
from trustmig.config import parse_hostport
from trustmig.hypervisor import blockcopy
from trustmig.hypervisor.devices import HostCannotRun, require_host_can_run
from trustmig.hypervisor.migration import MigrationOptions, configure_destination
from trustmig.hypervisor.qemu import QemuError
from trustmig.hypervisor.spec import VMSpec
from trustmig.migration import events as ev
from trustmig.migration.destination import DestinationCore, DestinationPlan
from trustmig.migration.source import SourceCore
from trustmig.policy import VmOwnership
from trustmig.proc import ProcessRef

log = logging.getLogger("trustmig.agent")
Emit = Callable[[dict[str, Any]], Awaitable[None]]


def _checked_options(spec: VMSpec, opts: MigrationOptions) -> MigrationOptions:
    """What the VM's definition allows of the options. Copied disks travel through trustmig's
    channel (``qemu-tls`` carries memory only). A VM with measured memory migrates pre-copy
    only: after a post-copy switch the destination runs before all of its memory arrived, so
    nothing could be compared first. Raises RequestError(invalid)."""
    if blockcopy.copied_disks(spec) and opts.channel == "qemu-tls":
        raise RequestError(
            f"VM {spec.name} has local disks, which are copied through trustmig's channel: "
            "use --channel secure (or put the disks on shared storage)",
            Code.INVALID,
        )
    if not spec.measure:
        return opts
    if opts.mode == "postcopy":
        raise RequestError(
            f"VM {spec.name} has measured memory regions, which need a pre-copy migration "
            "(drop --postcopy, or remove [[measure]] from its definition)",
            Code.INVALID,
        )
    return opts.model_copy(update={"postcopy_if_not_converging": False})


class MigrationRegistry:
    """The host's migrations (outgoing and incoming)."""

    def __init__(self, svc: HostServices) -> None:
        self.svc = svc
        self.loop = asyncio.get_running_loop()
        self.outgoing: dict[str, SourceDriver] = {}
        self.incoming: dict[str, DestinationDriver] = {}
        self.forget_session: Callable[[str], None] = lambda mid: None
        self._tasks: set[asyncio.Future[Any]] = set()

    # ------------------------------------------------------------------ outgoing
    async def migrate_out(
        self, name: str, dest: str, opts: MigrationOptions, principal: Any, emit: Emit
    ) -> dict[str, Any]:
        svc = self.svc
        if dest == svc.name:
            raise RequestError(f"{name} already runs on {dest}", Code.INVALID)
        if dest not in svc.cfg.peers:
            raise RequestError(
                f"unknown destination host {dest!r}: add it under [peers] in the host config",
                Code.INVALID,
            )
        if opts.transport == "ipsec" and not svc.cfg.peers[dest].tunnel_data:
            raise RequestError(
                f"--transport ipsec: {svc.name} knows no tunnel address of {dest}; set "
                f"tunnel_data under [peers.{dest}] once the IPsec tunnel is up",
                Code.INVALID,
            )
        mid = str(uuid.uuid4())
        opts = _checked_options(svc.vms.get(name).spec, opts)
        vm = svc.vms.claim(name, mid)  # atomic: a second request for this VM gets 'busy'
        user = {"name": principal.name, "roles": list(principal.roles),
                "tenant": principal.tenant, "fingerprint": principal.fingerprint}  # fmt: skip
        ctx = SourceContext(options=opts, user=user, tenant=vm.spec.tenant, owner=vm.spec.owner)
        core = SourceCore(mid, name, dest, vm.epoch, source_plan(opts, svc.cfg))
        driver = SourceDriver(svc, core, vm, ctx, emit)
        self.outgoing[mid] = driver
        try:
            decided = await self._decide_out(vm, dest, opts, principal, mid, ctx)
        except BaseException:
            svc.vms.release(vm, "running")
            self.outgoing.pop(mid, None)
            raise
        driver.start(decided)
        self._forget_later(self.outgoing, mid, driver)
        return await asyncio.shield(driver.outcome)

    async def _decide_out(
        self,
        vm: ManagedVM,
        dest: str,
        opts: MigrationOptions,
        principal: Any,
        mid: str,
        ctx: SourceContext,
    ) -> ev.Decided:
        svc, name = self.svc, vm.name
        svc.audit("migrate.request", vm=name, migration_id=mid, user=principal.name,
                  data={"destination": dest, "options": opts.model_dump(mode="json")})  # fmt: skip
        if vm.qemu.alive() and await vm.qemu.status() != "running":
            raise RequestError(f"VM {name}: QEMU is not running", Code.INVALID)
        ownership = VmOwnership(name, vm.spec.tenant, vm.spec.owner)
        decision = svc.gov.decide_out(principal, ownership, dest, opts.mode == "postcopy")
        ctx.decision_out = decision.line()
        svc.audit("policy.decision", vm=name, migration_id=mid, user=principal.name,
                  outcome="allow" if decision.allow else "deny",
                  data={"direction": "migrate-out", "rule": decision.rule,
                        "line": decision.line(), "destination": dest})  # fmt: skip
        if not decision.allow:
            return ev.Decided(False, decision.rule, decision.line())
        quarantined = svc.quarantine.is_quarantined(dest)
        if quarantined is not None:
            svc.audit("guard.quarantine", vm=name, migration_id=mid, user=principal.name,
                      outcome="refused", data={"host": dest, "reason": quarantined})  # fmt: skip
            line = (
                f"destination {dest} is quarantined ({quarantined}); a security-admin must "
                f"clear it first: trustmig guard clear {dest}"
            )
            return ev.Decided(False, "quarantine", line)
        try:
            await svc.admission.admit("out", tenant=vm.spec.tenant, vm=name, migration_id=mid)
        except RequestError as e:
            return ev.Decided(False, "admission", str(e))
        return ev.Decided(True, decision.rule, decision.line())

    def _forget_later(self, table: dict[str, Any], mid: str, driver: Any) -> None:
        async def forget() -> None:
            await driver.done.wait()
            table.pop(mid, None)

        task = asyncio.ensure_future(forget())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ incoming
    async def prepare_in(
        self, params: dict[str, Any], source: str, peer_cert_der: bytes | None,
        lease: asyncio.Event,
    ) -> dict[str, Any]:  # fmt: skip
        svc = self.svc
        mid = str(params.get("migration_id") or "")
        try:
            uuid.UUID(mid)
        except ValueError:
            msg = "incoming.prepare: migration_id must be a UUID"
            raise RequestError(msg, Code.INVALID) from None
        if mid in self.incoming or svc.journal.migration(mid) is not None:
            raise RequestError(f"migration {mid} is already known here", Code.INVALID)
        self._require_peer(source, mid)
        spec = VMSpec.model_validate(params["spec"])
        opts = MigrationOptions.model_validate(params["options"])
        user = dict(params.get("user") or {})
        policy_json = params.get("policy")
        epoch = int(params.get("epoch") or 1)
        ownership = VmOwnership(spec.name, spec.tenant, spec.owner)
        decision = svc.gov.decide_in(user, policy_json, ownership, source,
                                     opts.mode == "postcopy")  # fmt: skip
        svc.audit("policy.decision", vm=spec.name, migration_id=mid, user=user.get("name"),
                  outcome="allow" if decision.allow else "deny",
                  data={"direction": "migrate-in", "rule": decision.rule,
                        "line": decision.line(), "source": source,
                        "options": {"channel": opts.channel, "mode": opts.mode}})  # fmt: skip
        if not decision.allow:
            raise RequestError(decision.line(), Code.REFUSED)
        existing = svc.vms.vms.get(spec.name)
        if existing is not None and existing.state not in ("crashed", "handed-over", "discarded"):
            raise RequestError(f"a VM named {spec.name} already runs on {svc.name}", Code.BUSY)
        await self._require_can_run(spec)
        svc.disk_keys.require_keeper(spec)
        opts = _checked_options(spec, opts)  # the source's checks, on what arrived here
        # who it would run next to: this host's own residents, not the source's word
        with svc.neighbours.reserve(spec.name, spec.tenant, policy_of(policy_json),
                                    user=user.get("name"), migration_id=mid):  # fmt: skip
            await svc.admission.admit("in", tenant=spec.tenant, vm=spec.name, migration_id=mid)
            try:
                return await self._start_incoming(
                    mid, spec, opts, user, policy_json, epoch, source, decision.line(), params,
                    peer_cert_der, lease,
                )  # fmt: skip
            except BaseException:
                svc.admission.release(mid)
                raise

    async def _require_can_run(self, spec: VMSpec) -> None:
        """Refuse, before anything is allocated, a definition this host cannot satisfy: the
        same lab image, boot files, shared disks, bridges, free forwarded ports."""
        svc = self.svc
        image_key = await svc.prepare_image()
        if spec.boot.kind == "lab" and spec.image_key and spec.image_key != image_key:
            raise RequestError(
                f"guest image {spec.image_key[:12]} differs from this host's {image_key[:12]}: "
                "both hosts must build the same image (trustmig image build)",
                Code.REFUSED,
            )
        try:
            await asyncio.to_thread(require_host_can_run, spec, svc.vms.host_net,
                                    incoming=True, host=svc.name)  # fmt: skip
        except HostCannotRun as e:
            raise RequestError(str(e), Code.REFUSED) from None

    def _require_peer(self, source: str, mid: str) -> None:
        """Only configured, unquarantined peers get anything allocated for them."""
        svc = self.svc
        if source not in svc.cfg.peers:
            reason = (f"{source} is not a peer of {svc.name}; only hosts under [peers] in "
                      "the host config may send migrations")  # fmt: skip
            rule = "peers"
        else:
            quarantined = svc.quarantine.is_quarantined(source)
            if quarantined is None:
                return
            reason = f"source {source} is quarantined on {svc.name} ({quarantined})"
            rule = "quarantine"
        svc.audit("access.denied", migration_id=mid, outcome="denied",
                  data={"op": "incoming.prepare", "rule": rule, "host": source,
                        "reason": reason})  # fmt: skip
        raise RequestError(reason, Code.DENIED)

    async def _start_incoming(
        self, mid: str, spec: VMSpec, opts: MigrationOptions, user: dict[str, Any],
        policy_json: str | None, epoch: int, source: str, decision: str,
        params: dict[str, Any], peer_cert_der: bytes | None, lease: asyncio.Event,
    ) -> dict[str, Any]:  # fmt: skip
        svc = self.svc
        # copied disks get empty targets in this host's own directory, deleted if this fails
        spec = blockcopy.target_spec(spec, svc.disk_dir / f"{spec.name}-{mid[:8]}")
        created = await asyncio.to_thread(blockcopy.create_targets, spec)
        qemu = svc.make_qemu(spec, incoming=True, run_name=f"in-{mid[:8]}-{spec.name}",
                             prealloc=opts.prealloc_destination)  # fmt: skip
        vm = svc.vms.add_incoming(spec, qemu, mid, epoch)
        sock = qemu.sock_dir / "incoming.sock"
        ctx = DestinationContext(
            options=opts, user=user, policy_json=policy_json, spec=spec.model_dump(mode="json"),
            decision_in=decision, peer_audit_pub=str(params.get("audit_pub") or ""),
            qemu_socket=str(sock), created_disks=[str(p) for p in created],
            persistent=bool(params.get("persistent")),
        )  # fmt: skip
        m = svc.cfg.migration
        plan = DestinationPlan(
            postcopy=opts.mode == "postcopy", orphan_timeout_s=m.orphan_timeout_s
        )
        core = DestinationCore(mid, spec.name, source, epoch, plan, now=time.monotonic())
        driver = DestinationDriver(svc, core, vm, ctx, self.forget_session)
        tls_address = None
        try:
            # the incoming QEMU is journaled the moment it exists
            await qemu.start(on_spawn=driver._persist)
            await configure_destination(qemu, opts)
            if opts.channel == "qemu-tls":
                if peer_cert_der is None:
                    raise RequestError("qemu-tls needs the source's certificate", Code.INVALID)
                await qemu_tls.enable(svc.creds, svc.host_key_pem, qemu, "server",
                                      peer_host=source, peer_cert_der=peer_cert_der)  # fmt: skip
                listen_host = parse_hostport(svc.cfg.data.listen)[0]
                await qemu.cmd("migrate-incoming", {"uri": f"tcp:{listen_host}:0"})
                info = await qemu.cmd("query-migrate")
                port = int(info["socket-address"][0]["port"])
                tls_address = f"{parse_hostport(svc.data_advertise())[0]}:{port}"
            else:
                await blockcopy.export_targets(qemu, spec, qemu.sock_dir / blockcopy.NBD_SOCKET)
                await qemu.cmd("migrate-incoming", {"uri": f"unix:{sock}"})
                await driver.new_relay()
                driver._persist()
        except BaseException as e:
            await qemu.kill()
            blockcopy.remove_targets(created)
            await driver.close_relay()
            # the core records the abort (its one place that changes a state); nothing else
            # of it runs: QEMU is already gone
            driver._apply(core.handle(ev.QemuExited(f"prepare failed: {e}"), time.monotonic()))
            svc.vms.release(vm, "discarded")
            raise
        self.incoming[mid] = driver
        driver.lease(lease)
        driver.start()
        self._forget_later(self.incoming, mid, driver)
        # what this host has free before the arriving VM counts, signed last so that image and
        # QEMU start-up time does not age it
        used_mem, used_cpus = svc.vms.used()
        claim = capacity.current_claim(
            svc.cfg, (used_mem - spec.memory_mib, used_cpus - spec.vcpus), mid
        )
        return {
            "data_address": svc.data_advertise(),
            "admission_key": driver.admission_key.hex(),
            "streams": opts.streams,
            "destination_pid": qemu.pid,
            "decision": decision,
            "audit_pub": svc.gov.audit_public_pem,
            "resources": capacity.signed_claim(claim, svc.security.identity.private_key),
            "qemu_tls_address": tls_address,
        }

    def _incoming_driver(self, mid: str, source: str) -> DestinationDriver | None:
        d = self.incoming.get(mid)
        if d is not None and d.source != source:
            raise RequestError(f"no incoming migration {mid} from {source}", Code.NOT_FOUND)
        return d

    def _journal_answer(self, mid: str, source: str) -> dict[str, Any]:
        """A migration that ended: its journaled state answers (commit/abort/status)."""
        row = self.svc.journal.migration(mid)
        if row is None or row.role != "destination" or row.peer != source:
            raise RequestError(f"no incoming migration {mid} from {source}", Code.NOT_FOUND)
        epoch = row.epoch + 1 if row.state == "committed" else 0
        return {"state": row.state, "epoch": epoch, "error": row.core.get("error")}

    async def _ask(
        self, mid: str, source: str, lease: asyncio.Event, make: Callable[[int], ev.Event],
        timeout: float = 120,
    ) -> dict[str, Any]:  # fmt: skip
        d = self._incoming_driver(mid, source)
        if d is not None:
            d.lease(lease)
            with contextlib.suppress(DriverGone):
                return await d.request(make, timeout)
        return self._answer_ended(mid, source, make(0))

    def _answer_ended(self, mid: str, source: str, request: ev.Event) -> dict[str, Any]:
        st = self._journal_answer(mid, source)
        if isinstance(request, ev.CommitRequested):
            if st["state"] == "committed":
                return st
            raise RequestError(f"incoming migration aborted: {st['error']}", Code.ABORTED)
        if isinstance(request, ev.AbortRequested):
            if st["state"] == "aborted":
                return st
            raise RequestError("the guest already runs here", Code.COMMITTED)
        raise RequestError(f"migration {mid} is {st['state']}", Code.INVALID)

    async def commit_in(
        self, mid: str, source: str, lease: asyncio.Event, measurement: dict[str, str] | None
    ) -> dict[str, Any]:
        d = self._incoming_driver(mid, source)
        if d is not None:
            d.marks.setdefault("commit", time.monotonic())
        if d is not None and measurement is not None:
            d.expect_measurement(measurement)
        return await self._ask(mid, source, lease, ev.CommitRequested, timeout=90)

    async def abort_in(
        self, mid: str, source: str, reason: str, lease: asyncio.Event
    ) -> dict[str, Any]:
        return await self._ask(mid, source, lease, lambda rid: ev.AbortRequested(rid, reason))

    async def recover_in(self, mid: str, source: str, lease: asyncio.Event) -> dict[str, Any]:
        res = await self._ask(mid, source, lease, ev.RecoverRequested, timeout=30)
        d = self._incoming_driver(mid, source)
        key = d.admission_key.hex() if d is not None else ""
        return {**res, "data_address": self.svc.data_advertise(), "admission_key": key}

    async def disk_keys_in(
        self, mid: str, source: str, lease: asyncio.Event, wrapped: dict[str, Any]
    ) -> dict[str, Any]:
        d = self._incoming_driver(mid, source)
        if d is None or d.done.is_set():
            raise RequestError(f"no incoming migration {mid} from {source} in progress",
                               Code.NOT_FOUND)  # fmt: skip
        d.lease(lease)
        return await d.receive_disk_keys(wrapped)

    def status_in(self, mid: str, source: str, lease: asyncio.Event) -> dict[str, Any]:
        d = self._incoming_driver(mid, source)
        if d is not None and not d.done.is_set():
            d.lease(lease)
            return d.status()
        return self._journal_answer(mid, source)

    def incoming_for_receipt(self, mid: str, source: str) -> tuple[str, str]:
        """(VM name, the source's audit key) of an incoming migration, for its receipt."""
        d = self.incoming.get(mid)
        if d is not None and d.source == source:
            return d.core.vm, d.ctx.peer_audit_pub
        row = self.svc.journal.migration(mid)
        if row is None or row.role != "destination" or row.peer != source:
            raise RequestError(f"no incoming migration {mid} from {source}", Code.NOT_FOUND)
        return row.vm, str(row.context.get("peer_audit_pub") or "")

    # ------------------------------------------------------------------ data listener's view
    def _by_raw_id(self, raw: bytes) -> DestinationDriver | None:
        want = raw.hex()
        for mid, d in list(self.incoming.items()):
            if mid.replace("-", "") == want:
                return d
        return None

    def admission_key(self, migration_id: bytes) -> bytes | None:
        d = self._by_raw_id(migration_id)
        return d.admission_key if d is not None and not d.done.is_set() else None

    def expect(self, migration_id: bytes, peer: str, n_streams: int) -> None:
        d = self._by_raw_id(migration_id)
        if d is None:
            raise ChannelError("no migration with this id is expected here (replayed or forged)")
        if d.source != peer:
            raise ChannelError(
                f"migration {d.migration_id} is expected from {d.source}, not {peer}"
            )
        if not d.core.may_claim_session():
            raise ChannelError(f"migration {d.migration_id} already has a session (replay?)")
        opts = d.ctx.options
        if opts.channel == "qemu-tls":
            if n_streams != 1:
                raise ChannelError("a qemu-tls migration uses the channel for its handshake only")
        elif d.core.state.value == "prepared" and n_streams != d.n_streams:
            raise ChannelError(f"expected {d.n_streams} streams, client asked {n_streams}")
        elif d.core.state.value == "recovering" and n_streams != opts.recovery_streams:
            raise ChannelError(
                f"a recovered stream set has {opts.recovery_streams} streams, client asked "
                f"{n_streams}"
            )

    def claim(
        self, migration_id: bytes, peer: str, summary: dict[str, str], disk_key_wrap: bytes
    ) -> SessionTarget:
        d = self._by_raw_id(migration_id)
        if d is None or d.source != peer:
            raise ChannelError("no migration with this id is expected here (replayed or forged)")
        fut = asyncio.run_coroutine_threadsafe(d.claim_session(summary, disk_key_wrap),
                                               self.loop)  # fmt: skip
        return fut.result(timeout=15)

    # ------------------------------------------------------------------ listing and operators
    def describe_all(self, limit: int = 100) -> list[dict[str, Any]]:
        live: dict[str, SourceDriver | DestinationDriver] = {**self.outgoing, **self.incoming}
        out: list[dict[str, Any]] = []
        for row in self.svc.journal.migrations(limit=limit):
            d = live.get(row.id)
            out.append(d.describe() if d is not None and row.role == _role(d) else _describe(row))
        return out

    def describe(self, mid: str) -> dict[str, Any]:
        d = self.outgoing.get(mid) or self.incoming.get(mid)
        if d is not None:
            return d.describe()
        row = self.svc.journal.migration(mid)
        if row is None:
            raise RequestError(f"no migration {mid} on {self.svc.name}", Code.NOT_FOUND)
        return _describe(row)

    async def resolve(self, mid: str, keep: str, user: str) -> dict[str, Any]:
        d = self.outgoing.get(mid)
        if d is None:
            if mid in self.incoming:
                raise RequestError(
                    f"migration {mid} is resolved on its source host; run the command there",
                    Code.INVALID,
                )
            raise RequestError(f"no migration {mid} in progress on {self.svc.name}", Code.NOT_FOUND)
        return await d.resolve(keep, user)

    # ------------------------------------------------------------------ restart
    async def restore_all(self) -> list[str]:
        """Drive again every migration the journal holds as unfinished."""
        restored: list[str] = []
        for row in self.svc.journal.migrations(active_only=True, limit=10000):
            try:
                if row.role == "source":
                    await self._restore_source(row)
                else:
                    await self._restore_destination(row)
                restored.append(row.id)
            except Exception:  # noqa: BLE001 - one broken record must not stop the others
                log.exception("migration %s could not be restored", row.id)
        return restored

    async def _restore_source(self, row: MigrationRow) -> None:
        svc = self.svc
        vm = svc.vms.vms.get(row.vm)
        if vm is None:
            spec = VMSpec(name=row.vm)
            vm = ManagedVM(spec=spec, qemu=svc.make_qemu(spec, incoming=False,
                           run_name=f"lost-{row.vm}"), state="crashed")  # fmt: skip
        vm.migration = row.id
        ctx = SourceContext.from_json(row.context)
        driver = SourceDriver(svc, SourceCore.restore(row.core), vm, ctx)
        relay_alive = await driver.attach_relay()
        qemu_alive = vm.qemu.alive()
        status = await driver.restart_status()
        svc.admission.readmit("out", tenant=vm.spec.tenant, vm=vm.name, migration_id=row.id)
        self.outgoing[row.id] = driver
        driver.outcome.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
        sent = bool(ctx.info.get("migrate_sent"))
        driver.start(ev.Restarted(qemu_alive, status, relay_alive, memory_sent=sent))
        self._forget_later(self.outgoing, row.id, driver)
        log.warning("resumed outgoing migration %s of %s in state %s", row.id, row.vm, row.state)

    async def _restore_destination(self, row: MigrationRow) -> None:
        svc = self.svc
        ctx = DestinationContext.from_json(row.context)
        vm = svc.vms.vms.get(row.vm)
        if vm is None or vm.migration not in (row.id, None):
            spec = VMSpec.model_validate(ctx.spec) if ctx.spec else VMSpec(name=row.vm)
            vm = ManagedVM(spec=spec, qemu=svc.make_qemu(spec, incoming=True,
                           run_name=f"lost-{row.id[:8]}"), state="incoming")  # fmt: skip
            await _find_incoming_qemu(vm, ctx)
        vm.migration = row.id
        core = DestinationCore.restore(row.core)
        driver = DestinationDriver(svc, core, vm, ctx, self.forget_session)
        relay_alive = await driver.attach_relay()
        qemu_alive = vm.qemu.alive()
        status = await driver.qemu_status() if qemu_alive else "unknown"
        svc.admission.readmit("in", tenant=vm.spec.tenant, vm=vm.name, migration_id=row.id)
        self.incoming[row.id] = driver
        driver.start(ev.Restarted(qemu_alive, status, relay_alive))
        self._forget_later(self.incoming, row.id, driver)
        log.warning("resumed incoming migration %s of %s in state %s", row.id, row.vm, row.state)

    async def detach(self) -> None:
        """The agent stops: drivers stop acting (before QMP and the audit trail close); their
        QEMUs and relays go on."""
        drivers: list[SourceDriver | DestinationDriver] = [*self.outgoing.values(),
                                                           *self.incoming.values()]  # fmt: skip
        await asyncio.gather(*(d.stop() for d in drivers), return_exceptions=True)


async def _find_incoming_qemu(vm: ManagedVM, ctx: DestinationContext) -> None:
    """The VM's row is gone but the migration names its incoming QEMU: attach to that very
    process (or at least hold it, so that a discard ends it)."""
    ref = ProcessRef.from_json(ctx.qemu_process)
    if ref is None or not ref.alive():
        return
    try:
        await vm.qemu.attach(ref)
    except QemuError:
        vm.qemu.ref = ref  # QMP does not answer: the process is still this migration's


def _role(d: Any) -> str:
    return "source" if isinstance(d, SourceDriver) else "destination"


def _describe(row: MigrationRow) -> dict[str, Any]:
    opts = row.context.get("options") or {}
    spec = row.context.get("spec") or {}
    return {
        "migration_id": row.id,
        "role": row.role,
        "vm": row.vm,
        "peer": row.peer,
        "state": row.state,
        "epoch": row.epoch,
        "error": row.core.get("error"),
        "user": (row.context.get("user") or {}).get("name"),
        "tenant": row.context.get("tenant") or spec.get("tenant"),
        "owner": row.context.get("owner") or spec.get("owner"),
        "mode": opts.get("mode"),
        "channel": opts.get("channel"),
        "relay_cpu_s_data": row.context.get("relay_cpu_s_data"),
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }
