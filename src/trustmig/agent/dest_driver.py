"""The asyncio code around a :class:`~trustmig.migration.destination.DestinationCore`.

Requests of the source (commit, abort, recover) become events with a request id; the core's
``Reply`` action answers them. The control connection the source calls on is the lease: when it
closes, the core starts its orphan timer; any later call for this migration (on a new
connection, from a restarted source agent) renews it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trustmig.agent import qemu_tls
from trustmig.agent.datapath import SessionTarget, favour_latency
from trustmig.agent.diskkeys import encrypted_disks
from trustmig.agent.errors import Code, RequestError
from trustmig.agent.journal import JournalError, MigrationRow
from trustmig.agent.runtime import HostServices
from trustmig.agent.steps import span_ms
from trustmig.agent.vms import ManagedVM
from trustmig.channel.admit import new_admission_key
from trustmig.channel.errors import ChannelError
from trustmig.hypervisor.blockcopy import (
    NBD_SOCKET,
    BlockCopyError,
    add_exports,
    copied_disks,
    remove_targets,
    unexport_targets,
)
from trustmig.hypervisor.diskcrypt import DiskCryptError, create_encrypted
from trustmig.hypervisor.measure import MeasurementError, measure
from trustmig.hypervisor.migration import MigrationOptions, query
from trustmig.hypervisor.qemu import QemuError
from trustmig.hypervisor.spec import DiskSpec
from trustmig.migration import actions as A
from trustmig.migration import events as ev
from trustmig.migration.destination import (
    OWNER,
    DestinationCore,
    DestinationState,
)
from trustmig.policy import SignedPolicy, VmOwnership, VmPolicy
from trustmig.relay.client import RelayHandle, RelayRecord
from trustmig.timeouts import cancel_and_wait, within

log = logging.getLogger("trustmig.agent.destination")
#: gratuitous RARPs after the handover: first after 50 ms, five rounds 100 ms apart
ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}
D = DestinationState


@dataclass
class DestinationContext:
    options: MigrationOptions
    user: dict[str, Any]
    policy_json: str | None
    spec: dict[str, Any] = field(default_factory=dict)
    decision_in: str = ""
    peer_audit_pub: str = ""
    relay: RelayRecord | None = None
    qemu_socket: str = ""
    session: dict[str, str] = field(default_factory=dict)
    recoveries: int = 0
    #: The VM's policy and migration count were installed here (done once, with ownership).
    installed: bool = False
    #: digests of the measured memory regions as the source saw them once stopped
    expected_measurement: dict[str, str] | None = None
    #: what this host measured before running the guest (with the comparison)
    measurement: dict[str, Any] | None = None
    #: target images of copied disks this migration created (deleted if it aborts)
    created_disks: list[str] = field(default_factory=list)
    #: the VM was defined on the source: its definition is kept here once it is ours
    persistent: bool = False
    #: the incoming QEMU's process (also in the VM's row): a restarted agent that lost the row
    #: still finds the very process to end or adopt
    qemu_process: dict[str, int] | None = None
    #: the source's disk keys were (or were about to be) sealed here: an abort forgets them
    disk_keys_received: bool = False
    #: CPU seconds this host's relays spent carrying the migration's data (every session)
    relay_cpu_s_data: float | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"] = self.options.model_dump(mode="json")
        d["relay"] = self.relay.to_json() if self.relay else None
        return d

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DestinationContext:
        doc = dict(doc)
        doc["options"] = MigrationOptions.model_validate(doc["options"])
        doc["relay"] = RelayRecord.from_json(doc["relay"]) if doc.get("relay") else None
        return cls(**doc)


def vm_state_for(core: DestinationCore) -> str:
    if core.state == D.ABORTED:
        return "discarded"
    return "running" if core.state in OWNER else "incoming"


class DriverGone(Exception):
    """The migration ended while a request waited: the journal answers it."""


class DestinationDriver:
    """One incoming migration."""

    def __init__(
        self,
        svc: HostServices,
        core: DestinationCore,
        vm: ManagedVM,
        ctx: DestinationContext,
        forget_session: Callable[[str], None],
    ) -> None:
        self.svc = svc
        self.core = core
        self.vm = vm
        self.ctx = ctx
        self.forget_session = forget_session
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[ev.Event] = asyncio.Queue()
        self.effects: asyncio.Queue[A.Action] = asyncio.Queue()
        self.relay: RelayHandle | None = None
        #: the first attested session's exporter for disk keys (memory only: an agent that
        #: restarts before the keys arrived cannot take them, and the migration rolls back)
        self.disk_key_wrap: bytes | None = None
        #: what the source must MAC its data connections' opening with (memory only: a
        #: restarted agent makes a new one and hands it over in its incoming.recover answer)
        self.admission_key = new_admission_key()
        self._ids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._main: asyncio.Future[None] | None = None
        self._busy = False
        self._lease: asyncio.Event | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self.t0 = time.monotonic()
        #: monotonic times of the handover's steps here (loaded, commit, running)
        self.marks: dict[str, float] = {}
        self._latency_relay: RelayHandle | None = None
        #: the arriving VM's signed policy, verified early (see _verify_policy_early)
        self._verified_policy: tuple[SignedPolicy, VmPolicy] | None = None
        self.done = asyncio.Event()

    @property
    def migration_id(self) -> str:
        return self.core.migration_id

    @property
    def source(self) -> str:
        return self.core.peer

    # ------------------------------------------------------------------ running
    def start(self, first: ev.Event | None = None) -> None:
        self._main = asyncio.ensure_future(self._run(first))
        self._spawn(self._verify_policy_early())

    async def _verify_policy_early(self) -> None:
        """Verify the arriving VM's signed policy while its memory is on the way, so that the
        commit only writes it (the guest waits for the commit, not for a signature check).
        A failure here is not kept: the commit then verifies again and reports it."""
        if not self.ctx.policy_json or self.ctx.installed:
            return
        spec = self.vm.spec
        with contextlib.suppress(Exception):
            self._verified_policy = self.svc.gov.verify_policy(
                self.ctx.policy_json, VmOwnership(spec.name, spec.tenant, spec.owner)
            )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """The agent stops: this driver stops acting; QEMU and the relay go on."""
        await cancel_and_wait(self._main, *self._tasks)

    def post(self, event: ev.Event) -> None:
        self.queue.put_nowait(event)

    async def _run(self, first: ev.Event | None) -> None:
        self._unsubscribe = self.vm.qemu.on_event(self._on_qmp_event)
        worker = asyncio.ensure_future(self._effect_worker())
        watcher = asyncio.ensure_future(self._watch_qemu())
        try:
            if first is not None:
                self._apply(self.core.handle(first, time.monotonic()))
            while not (self.core.terminal and self.effects.empty() and not self._busy):
                timer = self.core.get_timer()
                timeout = 0.5 if timer is None else min(0.5, max(0.0, timer - time.monotonic()))
                try:
                    # asyncio.timeout, not wait_for: wait_for (3.11) can swallow a cancellation
                    # that arrives as the queue yields, and the driver would never stop
                    async with asyncio.timeout(timeout):
                        event = await self.queue.get()
                except TimeoutError:
                    self._apply(self.core.handle_timer(time.monotonic()))
                    continue
                self._apply(self.core.handle(event, time.monotonic()))
            # requests still queued (a repeated commit) are answered by the terminal core
            while not self.queue.empty():
                self._apply(self.core.handle(self.queue.get_nowait(), time.monotonic()))
            while not self.effects.empty() or self._busy:
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001
            log.exception("incoming migration %s driver failed", self.migration_id)
        finally:
            await cancel_and_wait(worker, watcher)
            if self._unsubscribe is not None:
                self._unsubscribe()
            self.done.set()
            for fut in self._waiters.values():
                if not fut.done():
                    fut.set_exception(DriverGone(self.migration_id))

    def _apply(self, actions: list[A.Action]) -> None:
        persisted = False
        for a in actions:
            if isinstance(a, A.Persist):
                # the journal record is the core's state now, the last of the batch: a second
                # write of it (loaded, then committed in one step) would only cost the guest
                if not persisted:
                    self._persist()
                persisted = True
            elif isinstance(a, A.Audit):
                self.svc.safe_audit(a.kind, vm=self.core.vm, migration_id=self.migration_id,
                                    user=self.ctx.user.get("name"), outcome=a.outcome,
                                    data=a.data)  # fmt: skip
            elif isinstance(a, A.Emit):
                pass
            else:
                self.effects.put_nowait(a)

    def _persist(self) -> None:
        if self.vm.qemu.ref is not None:
            self.ctx.qemu_process = self.vm.qemu.ref.to_json()
        row = MigrationRow(
            id=self.migration_id, role="destination", vm=self.core.vm, peer=self.core.peer,
            state=self.core.state.value, epoch=self.core.epoch, core=self.core.record(),
            context=self.ctx.to_json(), terminal=self.core.terminal,
        )  # fmt: skip
        self.vm.state = vm_state_for(self.core)
        if self.core.owns:
            self.vm.epoch = self.core.owner_epoch
        if self.core.state == D.COMMITTED:
            self.vm.migration = None
        if self.core.owns and not self.ctx.installed:
            self._install()
            row.context = self.ctx.to_json()
        try:
            self.svc.journal.put_migration(row, self.vm.row())
        except JournalError as e:
            log.error("%s", e)

    def _install(self) -> None:
        """Ownership comes with the VM's definition, its signed policy and its place in the rate
        limits; all are written with the journal record that makes this host the owner."""
        self.ctx.installed = True
        with contextlib.suppress(Exception):
            self.svc.gov.record_migration(self.core.vm)
        try:
            if self.ctx.persistent:
                self.svc.vms.keep_definition(self.vm)
        except Exception as e:  # noqa: BLE001 - the guest is ours anyway; say why
            log.error("incoming %s: definition not kept: %s", self.migration_id, e)
        if self.ctx.policy_json:
            try:
                spec = self.vm.spec
                ownership = VmOwnership(spec.name, spec.tenant, spec.owner)
                verified = self._verified_policy or self.svc.gov.verify_policy(
                    self.ctx.policy_json, ownership
                )
                self.svc.gov.install_verified_policy(*verified, ownership, same_serial_ok=True)
            except Exception as e:  # noqa: BLE001 - the guest is ours anyway; say why
                log.error("incoming %s: VM policy not installed: %s", self.migration_id, e)

    async def _effect_worker(self) -> None:
        while True:
            action = await self.effects.get()
            self._busy = True
            try:
                await self._carry_out(action)
            except Exception:  # noqa: BLE001
                log.exception("incoming %s: %s failed", self.migration_id, type(action).__name__)
            finally:
                self._busy = self.effects.qsize() > 0

    # ------------------------------------------------------------------ facts -> events
    def _on_qmp_event(self, name: str, data: dict[str, Any]) -> None:
        if name == "MIGRATION" and "status" in data:
            status = str(data["status"])
            if status == "completed":
                self.marks.setdefault("loaded", time.monotonic())
            elif status == "postcopy-active" and self.relay is not self._latency_relay:
                # at the switch, and again on a recovered stream's fresh relay
                self._latency_relay = self.relay
                self._spawn(favour_latency(self.relay, self.ctx.options.latency_streams))
            if status in ("failed", "cancelled") and self.relay is not None:
                # QEMU only says the load failed; the relay knows which record was refused
                self._spawn(self._qemu_failed(status))
            else:
                self.post(ev.QemuStatus(status))

    async def _qemu_failed(self, status: str) -> None:
        relay, failure = self.relay, None
        if relay is not None:
            with contextlib.suppress(Exception):
                for _ in range(10):
                    failure = (await asyncio.to_thread(relay.status)).get("failure")
                    if failure:
                        break
                    await asyncio.sleep(0.05)
        if failure:
            self.post(ev.StreamFailed(_failure_line(failure), status))
        else:
            self.post(ev.QemuStatus(status))

    async def _watch_qemu(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            last = ""
            while not self.core.terminal:
                if not self.vm.qemu.alive():
                    self.post(ev.QemuExited(self.vm.qemu.stderr_tail()))
                    return
                if self.core.state in (D.RECEIVING, D.POSTCOPY, D.RECOVERING):
                    st = await self.qemu_status(timeout=2.0)
                    if st != last and st not in ("unknown", "active", "setup"):
                        self.post(ev.QemuStatus(st))
                    last = st
                await asyncio.sleep(0.5)

    async def qemu_status(self, timeout: float = 2.0) -> str:
        try:
            return (await within(query(self.vm.qemu), timeout)).status
        except Exception:  # noqa: BLE001 - a post-copy QEMU blocked on a page does not answer
            return "unknown"

    def _on_relay_event(self, msg: dict[str, Any]) -> None:
        if msg.get("event") == "failure":
            line = _failure_line(msg.get("failure") or {})
            asyncio.run_coroutine_threadsafe(self._stream_failed(line), self.loop)

    async def _stream_failed(self, line: str) -> None:
        self.post(ev.StreamFailed(line, await self.qemu_status()))

    def lease(self, closed: asyncio.Event) -> None:
        """A call of the source arrived on a connection: that connection is the lease now."""
        if self._lease is closed:
            return
        self._lease = closed
        self.post(ev.ControlRestored())

        async def watch() -> None:
            await closed.wait()
            if self._lease is closed:
                self.post(ev.ControlLost("source control connection closed"))

        self._spawn(watch())

    # ------------------------------------------------------------------ requests
    async def request(
        self, make: Callable[[int], ev.Event], timeout: float = 120
    ) -> dict[str, Any]:
        """Post a request event and wait for the core's reply (DriverGone if it ended)."""
        if self.done.is_set():
            raise DriverGone(self.migration_id)
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self._waiters[rid] = fut
        self.post(make(rid))
        try:
            return await within(fut, timeout)
        except TimeoutError:
            raise RequestError(f"migration {self.migration_id}: no outcome in {timeout:.0f}s",
                               Code.IN_DOUBT) from None  # fmt: skip
        finally:
            self._waiters.pop(rid, None)

    def status(self) -> dict[str, Any]:
        return {
            "state": self.core.state.value,
            "epoch": self.core.owner_epoch if self.core.owns else 0,
            "error": self.core.error,
            "session": self.ctx.session,
            "pid": self.vm.qemu.pid,
        }

    async def claim_session(self, summary: dict[str, str], disk_key_wrap: bytes) -> SessionTarget:
        """The data listener authenticated a session for this migration: accept it once."""
        if not self.core.may_claim_session():
            raise ChannelError(f"migration {self.migration_id} already has a session (replay?)")
        if self.ctx.options.channel != "qemu-tls" and self.relay is None:
            raise ChannelError(f"migration {self.migration_id} has no relay to carry it")
        # a recovered post-copy carries no disk: the mirrors were in sync before the switch
        recovering = self.core.state == DestinationState.RECOVERING
        n_disks = 0 if recovering else len(copied_disks(self.vm.spec))
        self.ctx.session = summary
        self.disk_key_wrap = disk_key_wrap
        self._apply(self.core.handle(ev.SessionClaimed(), time.monotonic()))
        first_disk = self.ctx.options.streams
        nbd = self.vm.qemu.sock_dir / NBD_SOCKET
        disks = {first_disk + i: nbd for i in range(n_disks)}
        return SessionTarget(
            self.migration_id, self.relay, Path(self.ctx.qemu_socket),
            handshake_only=self.ctx.options.channel == "qemu-tls", disk_sockets=disks,
        )  # fmt: skip

    @property
    def n_streams(self) -> int:
        """QEMU's migration streams, then one per copied disk."""
        return self.ctx.options.streams + len(copied_disks(self.vm.spec))

    def describe(self) -> dict[str, Any]:
        return {
            "migration_id": self.migration_id,
            "role": "destination",
            "vm": self.core.vm,
            "peer": self.core.peer,
            "state": self.core.state.value,
            "epoch": self.core.epoch,
            "error": self.core.error,
            "user": self.ctx.user.get("name"),
            "tenant": self.vm.spec.tenant,
            "owner": self.vm.spec.owner,
            "mode": self.ctx.options.mode,
            "channel": self.ctx.options.channel,
            "pid": self.vm.qemu.pid,
            "relay_cpu_s_data": self.ctx.relay_cpu_s_data,
            "history": [{"t": round(t - self.t0, 3), "state": s} for t, s in self.core.history],
        }

    # ------------------------------------------------------------------ actions
    async def _carry_out(self, a: A.Action) -> None:
        if isinstance(a, A.KillIncoming):
            await self._discard(a.reason)
        elif isinstance(a, A.ResumeGuest):
            await self._resume(a.request_id)
        elif isinstance(a, A.AdoptGuest):
            await self._adopt(a.epoch)
        elif isinstance(a, A.ArmRecover):
            await self._arm_recover(a.request_id)
        elif isinstance(a, A.ReleaseAdmission):
            self.svc.admission.release(self.migration_id, completed=a.completed)
        elif isinstance(a, A.Reply):
            fut = self._waiters.get(a.request_id)
            if fut is not None and not fut.done():
                if a.ok:
                    fut.set_result({"state": self.core.state.value, "error": self.core.error,
                                    **a.result, "pid": self.vm.qemu.pid,
                                    "measurement": self.ctx.measurement,
                                    "handover_ms": self._handover_ms()})  # fmt: skip
                else:
                    fut.set_exception(RequestError(a.message, a.code or Code.FAILED))

    def _handover_ms(self) -> dict[str, float | None]:
        pairs = {"loaded_to_running": ("loaded", "running"),
                 "commit_to_running": ("commit", "running"),
                 "loaded_to_commit": ("loaded", "commit")}  # fmt: skip
        return {name: span_ms(self.marks, a, b) for name, (a, b) in pairs.items()}

    async def _discard(self, reason: str) -> None:
        await self.vm.qemu.kill()
        remove_targets([Path(p) for p in self.ctx.created_disks])
        if self.ctx.disk_keys_received:
            await self.svc.disk_keys.forget(self.vm.spec, self.migration_id, "migration aborted")
        await self.close_relay()
        self.forget_session(self.migration_id)
        self.svc.vms.release(self.vm, "discarded")
        log.warning("incoming migration %s of %s discarded: %s", self.migration_id,
                    self.core.vm, reason)  # fmt: skip

    async def _resume(self, rid: int | None) -> None:
        qemu = self.vm.qemu
        if not qemu.alive():
            self.post(ev.GuestResumed(False, "incoming QEMU is gone", rid))
            return
        # QEMU loaded the stream in this process's sight and has not run yet: it is paused
        # (started with -S), so no round trip is spent asking
        fresh = "loaded" in self.marks and "running" not in self.marks and not self.core.switched
        state = "paused" if fresh else await qemu.status()
        if state != "running":
            refusal = await self._release_disks() or await self._verify_measurement()
            if refusal is not None:
                self.post(ev.GuestResumed(False, refusal, rid))
                return
            with contextlib.suppress(Exception):
                await qemu.cmd("cont", timeout=10)
            self.marks.setdefault("running", time.monotonic())
            state = await qemu.status()
        if state in ("unresponsive", "absent") and qemu.alive():
            # no answer is not a "no": the guest may run; only a definite state counts
            log.error("incoming %s: QEMU does not answer after cont", self.migration_id)
            return
        self.post(ev.GuestResumed(state == "running", f"QEMU is {state}", rid))

    async def _release_disks(self) -> str | None:
        """The copied disks stop being served before the guest runs here (nothing else may
        write them then); a refusal line if that fails."""
        if not copied_disks(self.vm.spec):
            return None
        try:
            await unexport_targets(self.vm.qemu)
        except Exception as e:  # noqa: BLE001 - QMP errors and BlockCopyError alike
            return f"the copied disks could not be closed: {e}"
        return None

    async def receive_disk_keys(self, wrapped: dict[str, Any]) -> dict[str, Any]:
        """The source's disk keys, wrapped for this migration's attested session: sealed here,
        then each encrypted disk is created (if copied) and opened in the paused incoming QEMU.
        Raises RequestError; the source then rolls back and the abort forgets the keys."""
        spec = self.vm.spec
        if not encrypted_disks(spec):
            raise RequestError(f"VM {spec.name} has no encrypted disk", Code.INVALID)
        if self.core.state != D.RECEIVING or self.disk_key_wrap is None:
            raise RequestError(
                f"migration {self.migration_id} is {self.core.state.value}: disk keys are taken "
                "only after its attested session opened and before its data flows",
                Code.REFUSED,
            )
        self.ctx.disk_keys_received = True
        self._persist()  # journaled first: whatever happens next, an abort forgets them
        keys = await self.svc.disk_keys.receive(spec, self.source, self.migration_id,
                                                self.disk_key_wrap, wrapped)  # fmt: skip
        try:
            for d in encrypted_disks(spec):
                await self._open_encrypted(d, keys[d.id])
            await add_exports(self.vm.qemu, [d.id for d in copied_disks(spec) if d.encrypt])
        except (DiskCryptError, QemuError, BlockCopyError) as e:
            raise RequestError(f"{self.svc.name} could not open the encrypted disks: {e}",
                               Code.FAILED) from None  # fmt: skip
        return {"disks": sorted(keys)}

    async def _open_encrypted(self, d: DiskSpec, key: bytes) -> None:
        if not d.shared and str(d.path) not in self.ctx.created_disks:
            if d.virtual_size is None:
                raise DiskCryptError(f"disk {d.id}: the source did not say its virtual size")
            self.ctx.created_disks.append(str(d.path))
            self._persist()
            await asyncio.to_thread(create_encrypted, d, d.virtual_size, key)
        await self.vm.qemu.attach_encrypted_disk(d, key)
        self.svc.safe_audit("disk.key", vm=self.vm.name, migration_id=self.migration_id,
                            outcome="used", data={"disk": d.id, "for": "incoming"})  # fmt: skip

    def expect_measurement(self, digests: dict[str, str]) -> None:
        """The source's measurement arrives with its (first) commit request; kept, journaled."""
        if self.ctx.expected_measurement is None:
            self.ctx.expected_measurement = dict(digests)
            self._persist()

    async def _verify_measurement(self) -> str | None:
        """Measure the regions the definition names before the guest runs here; a refusal
        line if they differ from the source's (or it sent none), else None."""
        regions = self.vm.spec.measure
        if not regions or (self.ctx.measurement or {}).get("match"):
            return None
        expected = self.ctx.expected_measurement
        if expected is None:
            return "the source sent no runtime measurement for a VM whose definition asks for one"
        try:
            got = await measure(self.vm.qemu, regions)
        except MeasurementError as e:
            return f"runtime measurement failed: {e}"
        differ = got.differs_from(expected)
        self.ctx.measurement = {"match": not differ, "destination_ms": got.elapsed_ms,
                                "regions": sorted(got.digests), "differ": differ}  # fmt: skip
        self._persist()
        self.svc.safe_audit("migration.measurement", vm=self.vm.name,
                            migration_id=self.migration_id,
                            outcome="match" if not differ else "mismatch",
                            data=self.ctx.measurement)  # fmt: skip
        if differ:
            return (f"runtime measurement of {', '.join(differ)} differs from the source's: "
                    "the memory changed on its way; the guest is not run here")  # fmt: skip
        return None

    async def _adopt(self, epoch: int) -> None:
        self.vm.epoch = epoch
        self.svc.vms.release(self.vm, "running")
        if self.vm.spec.nics:
            # the network learns the guest's new place now (QEMU announces once by itself;
            # a second round covers switches that missed the first)
            with contextlib.suppress(Exception):
                await self.vm.qemu.cmd("announce-self", ANNOUNCE, timeout=5)
        if self.ctx.options.channel == "qemu-tls":
            await qemu_tls.disable(self.vm.qemu)
        await self.close_relay()
        self.forget_session(self.migration_id)

    async def close_relay(self, *, note_cpu: bool = True) -> None:
        """Stop the relay; ``note_cpu`` keeps what it spent first (one status call), which a
        post-copy recovery skips: the guest there waits for pages, not for bookkeeping."""
        relay, self.relay = self.relay, None
        if relay is not None:
            if note_cpu:
                await self._note_relay_cpu(relay)
            await asyncio.to_thread(relay.close)

    async def _note_relay_cpu(self, relay: RelayHandle) -> None:
        """Keep what the relay spent on the data (the benchmark's and the operator's figure)."""
        try:
            spent = (await asyncio.to_thread(relay.status)).get("cpu_s_data")
        except Exception:  # noqa: BLE001 - a relay already gone has nothing left to say
            return
        if isinstance(spent, (int, float)):
            self.ctx.relay_cpu_s_data = round((self.ctx.relay_cpu_s_data or 0.0) + spent, 3)
            self._persist()

    async def new_relay(self) -> None:
        record = await self.svc.spawn_relay("in")
        handle = RelayHandle(record, on_event=self._on_relay_event)
        await asyncio.to_thread(handle.connect)
        self.relay = handle
        self.ctx.relay = record
        self._persist()  # the journal names every relay, so nothing is ever left behind

    async def _arm_recover(self, rid: int) -> None:
        """QEMU listens again (``migrate-recover``, out-of-band: the main loop may be blocked
        on a missing page) and a fresh relay waits for the new, re-attested session."""
        try:
            await self.close_relay(note_cpu=False)
            self.forget_session(self.migration_id)
            await self.new_relay()
            self.ctx.recoveries += 1
            path = self.vm.qemu.sock_dir / f"recover-{self.ctx.recoveries}.sock"
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            deadline = time.monotonic() + 15
            while True:
                try:
                    await self.vm.qemu.cmd("migrate-recover", {"uri": f"unix:{path}"},
                                           timeout=5, oob=True)  # fmt: skip
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            self.ctx.qemu_socket = str(path)
        except Exception as e:  # noqa: BLE001
            self.post(ev.RecoverArmFailed(rid, str(e).splitlines()[0] or type(e).__name__))
            return
        self.post(ev.RecoverArmed(rid))

    # ------------------------------------------------------------------ restart
    async def attach_relay(self) -> bool:
        if self.ctx.relay is None:
            return False
        handle = RelayHandle(self.ctx.relay, on_event=self._on_relay_event)
        if not handle.alive():
            return False
        try:
            await asyncio.to_thread(handle.connect)
        except Exception:  # noqa: BLE001
            return False
        self.relay = handle
        st = await asyncio.to_thread(handle.status)
        return st.get("state") in ("running", "idle")


def _failure_line(f: dict[str, Any]) -> str:
    rec = f" record {f['record']}" if f.get("record") is not None else ""
    return f"stream {f.get('stream')}{rec} ({f.get('direction')}): {f.get('reason')}"
