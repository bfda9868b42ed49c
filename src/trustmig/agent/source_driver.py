"""The asyncio code around a :class:`~trustmig.migration.source.SourceCore`.

It only moves facts and carries out actions: QMP events, ``query-migrate`` samples, relay
reports and peer answers become events; the core's actions become QMP commands, control calls,
relay set-up and journal writes. ``Persist`` and ``Audit`` are carried out at once (the journal
holds a state before anything that state allows is done); every other action is queued and run
in order by one worker, and what it observes is fed back to the core as an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trustmig.agent import qemu_tls
from trustmig.agent.claim_check import judge_claim, summary_field
from trustmig.agent.client import ControlClient, ControlError
from trustmig.agent.datapath import favour_latency, hand_to_relay, open_outbound_session
from trustmig.agent.diskkeys import encrypted_disks
from trustmig.agent.errors import Code, RequestError
from trustmig.agent.journal import JournalError, MigrationRow
from trustmig.agent.runtime import HostServices
from trustmig.agent.steps import span_ms
from trustmig.agent.vms import ManagedVM
from trustmig.channel.admit import ADMISSION_KEY_SIZE
from trustmig.hypervisor.blockcopy import (
    DiskProgress,
    copied_disks,
    finish_mirrors,
    start_mirrors,
    wait_mirrors_ready,
)
from trustmig.hypervisor.measure import measure
from trustmig.hypervisor.migration import MigrationOptions, configure_source, query
from trustmig.migration import actions as A
from trustmig.migration import events as ev
from trustmig.migration.source import (
    QEMU_MIGRATING,
    SourceCore,
    SourcePlan,
    SourceState,
)
from trustmig.relay.client import RelayHandle, RelayRecord
from trustmig.timeouts import cancel_and_wait, within

log = logging.getLogger("trustmig.agent.source")


def commit_not_prepared(qemu_alive: bool, error: BaseException) -> ev.Event:
    """The source could not prepare its commit (finish the mirrors, measure the guest), so
    nothing was sent. With its QEMU alive that is a refusal: the guest runs here again and the
    destination discards. With its QEMU gone the destination's copy may be the only complete
    one: the migration stays in doubt (guest kept paused there) for the retries or an
    operator, never a discard."""
    line = str(error).splitlines()[0] if str(error) else type(error).__name__
    if qemu_alive:
        return ev.CommitRefused("refused", f"on the source: {line}")
    return ev.CommitLost(f"the source QEMU is gone before its commit was prepared ({line})")


Emit = Callable[[dict[str, Any]], Awaitable[None]]
S = SourceState
#: Codes of the destination's answers; anything else is "no answer".
PEER_ANSWERS = frozenset({"refused", "denied", "not_found", "invalid", "busy", "aborted",
                          "committed", "in_doubt", "failed", "internal"})  # fmt: skip
ACTIVE_QEMU = ("active", "setup", "device", "pre-switchover", "cancelling")


def admission_key_of(answer: dict[str, Any], peer: str) -> bytes:
    """The data gate's key from a destination's prepare or recover answer.

    Raises RequestError naming the peer when it sent none (an agent too old for the gate).
    """
    try:
        key = bytes.fromhex(str(answer.get("admission_key") or ""))
    except ValueError:
        key = b""
    if len(key) != ADMISSION_KEY_SIZE:
        raise RequestError(
            f"{peer} sent no valid admission key for its data port; "
            "upgrade its agent to this version"
        )
    return key


def source_plan(opts: MigrationOptions, host: Any) -> SourcePlan:
    m = host.migration
    return SourcePlan(
        postcopy=opts.mode == "postcopy",
        postcopy_after_rounds=opts.postcopy_after_rounds,
        postcopy_if_not_converging=opts.postcopy_if_not_converging,
        timeout_s=opts.timeout_s,
        stall_timeout_s=opts.stall_timeout_s,
        peer_grace_s=m.peer_grace_s,
        doubt_report_s=m.doubt_report_s,
    )


@dataclass
class SourceContext:
    """What the driver needs besides the core; journaled with it."""

    options: MigrationOptions
    user: dict[str, Any]
    #: The VM's tenant and owner when the migration began (kept for who may see it later).
    tenant: str = ""
    owner: str | None = None
    data_address: str = ""
    qemu_tls_address: str | None = None
    decision_out: str = ""
    decision_in: str = ""
    peer_audit_pub: str = ""
    resources: Any = None
    relay: RelayRecord | None = None
    qemu_socket: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"] = self.options.model_dump(mode="json")
        d["relay"] = self.relay.to_json() if self.relay else None
        return d

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SourceContext:
        doc = dict(doc)
        doc["options"] = MigrationOptions.model_validate(doc["options"])
        doc["relay"] = RelayRecord.from_json(doc["relay"]) if doc.get("relay") else None
        return cls(**doc)


class MigrationFailed(RequestError):
    """The migration ended without the handover (one line, with its code)."""


def vm_state_for(core: SourceCore) -> str:
    """The VM's journaled state that goes with the migration's."""
    if core.state == S.COMPLETED:
        return "handed-over"
    if core.state in (S.ROLLED_BACK, S.REFUSED):
        return "running"
    if core.state == S.FAILED:
        return "crashed" if core.source_gone or core.postcopy_switched else "paused"
    return "migrating-out"


class SourceDriver:
    """One outgoing migration."""

    def __init__(
        self,
        svc: HostServices,
        core: SourceCore,
        vm: ManagedVM,
        ctx: SourceContext,
        emit: Emit | None = None,
    ) -> None:
        self.svc = svc
        self.core = core
        self.vm = vm
        self.ctx = ctx
        self.emit = emit
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[ev.Event] = asyncio.Queue()
        self.effects: asyncio.Queue[A.Action] = asyncio.Queue()
        self.outcome: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self.ctl: ControlClient | None = None
        self.relay: RelayHandle | None = None
        #: the attested session's exporter for disk keys (memory only, never journaled)
        self._disk_key_wrap: bytes | None = None
        #: the destination's per-migration key for the data gate (memory only, like its own)
        self._admission_key = b""
        self._relay_spawn: asyncio.Task[RelayRecord] | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._main: asyncio.Future[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        #: the latest RAM and disk progress, shown by migration.list while the migration runs
        self.last_progress: dict[str, dict[str, Any]] = {}
        self._resolve_waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._rids = 1
        self.t_request = time.monotonic()
        self.t_transfer: float | None = None
        #: monotonic times of the handover's steps on this host (QEMU completed, commit sent,
        #: commit answered): where the guest's pause goes beyond QEMU's downtime
        self.marks: dict[str, float] = {}
        self.warnings: list[str] = []
        self.last_failure = ""
        #: QEMU accepted this migration's ``migrate``: from now on its status is this one's.
        self.transfer_running = bool(ctx.info.get("migrate_sent"))
        self.done = asyncio.Event()
        ctx.info.setdefault("t_start_wall", time.time())

    @property
    def migration_id(self) -> str:
        return self.core.migration_id

    # ------------------------------------------------------------------ running
    def start(self, first: ev.Event) -> None:
        self._main = asyncio.ensure_future(self._run(first))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """The agent stops: this driver stops acting; QEMU and the relay go on."""
        await cancel_and_wait(self._main, *self._tasks)

    def post(self, event: ev.Event) -> None:
        self.queue.put_nowait(event)

    def post_threadsafe(self, event: ev.Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def _run(self, first: ev.Event) -> None:
        self._unsubscribe = self.vm.qemu.on_event(self._on_qmp_event)
        worker = asyncio.ensure_future(self._effect_worker())
        watcher = asyncio.ensure_future(self._watch_qemu())
        try:
            self._apply(self.core.handle(first, time.monotonic()))
            while not (self.core.terminal and self.effects.empty() and not self._busy):
                timer = self.core.get_timer()
                timeout = None if timer is None else max(0.0, timer - time.monotonic())
                try:
                    # asyncio.timeout, not wait_for: wait_for (3.11) can swallow a cancellation
                    # that arrives as the queue yields, and the driver would never stop
                    async with asyncio.timeout(min(timeout or 0.5, 0.5)):
                        event = await self.queue.get()
                except TimeoutError:
                    self._apply(self.core.handle_timer(time.monotonic()))
                    continue
                self._apply(self.core.handle(event, time.monotonic()))
        except Exception as e:  # noqa: BLE001 - a driver bug must still leave a record
            log.exception("migration %s driver failed", self.migration_id)
            if not self.outcome.done():
                self.outcome.set_exception(
                    MigrationFailed(f"migration driver failed: {e}", Code.INTERNAL)
                )
        finally:
            await cancel_and_wait(worker, watcher)
            if self._unsubscribe is not None:
                self._unsubscribe()
            if self.core.terminal:
                with contextlib.suppress(Exception):
                    await self._close_relay()
            await self._discard_spare_relay()
            if self.ctl is not None:
                await self.ctl.close()
            self.done.set()

    _busy = False

    def _apply(self, actions: list[A.Action]) -> None:
        for a in actions:
            if isinstance(a, A.Persist):
                self._persist()
            elif isinstance(a, A.Audit):
                self.svc.safe_audit(a.kind, vm=self.core.vm, migration_id=self.migration_id,
                                    user=self.ctx.user.get("name"), outcome=a.outcome,
                                    data=a.data)  # fmt: skip
            elif isinstance(a, A.Emit):
                self._emit(a.event)
            else:
                self.effects.put_nowait(a)

    def _emit(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind in ("progress", "disk-progress"):  # what migration.list shows while it runs
            self.last_progress[str(kind)] = {k: v for k, v in event.items() if k != "event"}
        if self.emit is None:
            return
        if event.get("event") == "phase":
            event = {**event, "migration_id": self.migration_id}
        self._spawn(self._safe_emit(event))

    async def _safe_emit(self, event: dict[str, Any]) -> None:
        assert self.emit is not None
        with contextlib.suppress(Exception):
            await self.emit(event)

    def _persist(self) -> bool:
        """Journal the migration; False (logged, kept in the result's warnings) if the write
        failed."""
        row = MigrationRow(
            id=self.migration_id, role="source", vm=self.core.vm, peer=self.core.peer,
            state=self.core.state.value, epoch=self.core.epoch, core=self.core.record(),
            context=self.ctx.to_json(), terminal=self.core.terminal,
        )  # fmt: skip
        self.vm.state = vm_state_for(self.core)
        if self.core.terminal and self.core.state != S.COMPLETED:
            self.vm.migration = None  # the migration is over and the guest stayed here
        try:
            self.svc.journal.put_migration(row, self.vm.row())
        except JournalError as e:
            # the facts go on (a commit cannot be unsent); a restart asks QEMU and the peer
            log.error("%s", e)
            self.warnings.append(str(e))
            return False
        return True

    async def _effect_worker(self) -> None:
        while True:
            action = await self.effects.get()
            self._busy = True
            try:
                await self._carry_out(action)
            except Exception as e:  # noqa: BLE001
                log.exception("migration %s: %s failed", self.migration_id, type(action).__name__)
                self.warnings.append(f"{type(action).__name__}: {e}")
            finally:
                self._busy = self.effects.qsize() > 0

    # ------------------------------------------------------------------ facts -> events
    def _on_qmp_event(self, name: str, data: dict[str, Any]) -> None:
        if name == "MIGRATION" and "status" in data:
            status = str(data["status"])
            if status == "completed":
                self.marks.setdefault("completed", time.monotonic())
            if status in ("failed", "cancelled") and self.relay is not None:
                # QEMU only says it failed; the relay knows which stream broke and why
                self._spawn(self._qemu_failed(status))
            else:
                self.post(ev.QemuStatus(status))

    async def _qemu_failed(self, status: str) -> None:
        relay = self.relay
        failure = None
        if relay is not None:
            with contextlib.suppress(Exception):
                for _ in range(10):  # the relay may notice a moment after QEMU
                    failure = (await asyncio.to_thread(relay.status)).get("failure")
                    if failure:
                        break
                    await asyncio.sleep(0.05)
        if failure:
            self.last_failure = _failure_line(failure)
            self.post(ev.StreamFailed(self.last_failure, status))
        else:
            self.post(ev.QemuStatus(status))

    async def _watch_qemu(self) -> None:
        """Progress samples while QEMU sends, and QEMU's death."""
        with contextlib.suppress(asyncio.CancelledError):
            last_status = ""
            while True:
                if not self.vm.qemu.alive():
                    if self.core.state not in (S.COMPLETED,) and not self.core.terminal:
                        self.post(ev.QemuExited(self.vm.qemu.stderr_tail()))
                    return
                if self.core.state in QEMU_MIGRATING and self.transfer_running:
                    with contextlib.suppress(Exception):
                        p = await query(self.vm.qemu)
                        self.post(ev.Progress(p.status, p.transferred, p.remaining, p.total,
                                              p.rounds, p.dirty_rate_pps,
                                              p.expected_downtime_ms))  # fmt: skip
                        # a failure comes as a QMP event, with the relay's reason attached
                        if p.status != last_status and p.status not in (*ACTIVE_QEMU, "failed",
                                                                        "cancelled"):  # fmt: skip
                            self.post(ev.QemuStatus(p.status))
                        last_status = p.status
                    await asyncio.sleep(0.05)
                else:
                    await asyncio.sleep(0.25)

    def _on_relay_event(self, msg: dict[str, Any]) -> None:
        if msg.get("event") == "failure":
            f = msg.get("failure") or {}
            line = _failure_line(f)
            asyncio.run_coroutine_threadsafe(self._stream_failed(line), self.loop)

    async def _stream_failed(self, line: str) -> None:
        self.last_failure = line
        self.post(ev.StreamFailed(line, await self._qemu_status()))

    async def _qemu_status(self) -> str:
        try:
            return (await within(query(self.vm.qemu), 3.0)).status
        except Exception:  # noqa: BLE001
            return "unknown"

    def _watch_control(self, ctl: ControlClient) -> None:
        async def watch() -> None:
            await ctl.closed.wait()
            if self.ctl is ctl:
                self.post(ev.ControlLost(ctl.close_reason or "closed"))

        self._spawn(watch())

    # ------------------------------------------------------------------ actions
    async def _carry_out(self, a: A.Action) -> None:  # noqa: PLR0911, C901 - a dispatch table
        if isinstance(a, A.CallPeer):
            await self._call_peer(a)
        elif isinstance(a, A.Reconnect):
            await self._reconnect()
        elif isinstance(a, A.OpenDataPath):
            await self._open_data_path()
        elif isinstance(a, A.StartTransfer):
            await self._start_transfer()
        elif isinstance(a, A.StartPostcopy):
            try:
                await self.vm.qemu.cmd("migrate-start-postcopy")
            except Exception as e:  # noqa: BLE001
                self.post(ev.PostcopySwitchRefused(str(e).splitlines()[0]))
                return
            await favour_latency(self.relay, self.ctx.options.latency_streams)
        elif isinstance(a, A.CancelTransfer):
            await self._cancel_transfer()
        elif isinstance(a, A.ResumeGuest):
            await self._resume()
        elif isinstance(a, A.KeepPaused):
            log.warning("migration %s: %s", self.migration_id, a.reason)
        elif isinstance(a, A.Conclude):
            await self._conclude()
        elif isinstance(a, A.RecoverStream):
            await self._recover(a.attempt)
        elif isinstance(a, A.Quarantine):
            self.svc.quarantine.add(a.host, a.reason)
            self.svc.safe_audit("guard.quarantine", vm=self.core.vm,
                                migration_id=self.migration_id, outcome="quarantined",
                                data={"host": a.host, "reason": a.reason})  # fmt: skip
        elif isinstance(a, A.ReleaseAdmission):
            self.svc.admission.release(self.migration_id, completed=a.completed)
        elif isinstance(a, A.Reply):
            fut = self._resolve_waiters.pop(a.request_id, None)
            if fut is not None and not fut.done():
                if a.ok:
                    fut.set_result(a.result)
                else:
                    fut.set_exception(RequestError(a.message, a.code or Code.INVALID))
        elif isinstance(a, A.Finish):
            self._finish(a)

    async def _ensure_ctl(self) -> ControlClient:
        if self.ctl is not None and not self.ctl.closed.is_set():
            return self.ctl
        ctl = await self.svc.connect_peer(self.core.peer)
        self.ctl = ctl
        self._watch_control(ctl)
        return ctl

    async def _reconnect(self) -> None:
        try:
            await self._ensure_ctl()
        except (ControlError, RequestError, OSError) as e:
            self.post(ev.PeerUnreachable(str(e).splitlines()[0]))
            return
        self.post(ev.ControlRestored())

    async def _call(self, op: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
        ctl = await self._ensure_ctl()
        return await ctl.call(op, {"migration_id": self.migration_id, **params}, timeout=timeout)

    async def _call_peer(self, a: A.CallPeer) -> None:
        try:
            if a.op == "prepare":
                self._on_prepared(await self._call("incoming.prepare", self._prepare_params(), 120))
            elif a.op == "commit":
                wait = self.svc.cfg.migration.commit_timeout_s
                try:
                    params = await self._commit_params()
                except Exception as e:  # noqa: BLE001 - judged by what it leaves behind
                    self.post(commit_not_prepared(self.vm.qemu.alive(), e))
                    return
                self.marks.setdefault("commit_sent", time.monotonic())
                res = await self._call("incoming.commit", params, wait)
                self.marks["commit_answered"] = time.monotonic()
                self.ctx.info["destination_handover_ms"] = res.get("handover_ms")
                self.ctx.info["destination_pid"] = res.get("pid")
                if res.get("measurement"):
                    self.ctx.info.setdefault("runtime_measurement", {}).update(res["measurement"])
                self.post(ev.CommitAnswered(res.get("pid"), int(res.get("epoch") or 0)))
            elif a.op == "status":
                res = await self._call("incoming.status", {}, 15)
                self.post(ev.PeerStatus(res.get("state"), int(res.get("epoch") or 0)))
            elif a.op == "abort":
                with contextlib.suppress(ControlError, RequestError, OSError):
                    st = await self._call("incoming.abort", {"reason": a.reason}, 10)
                    if st.get("error") and self.core.error and st["error"] not in self.core.error:
                        self.ctx.info["destination_error"] = st["error"]
        except (ControlError, RequestError, OSError) as e:
            self._peer_failed(a.op, e)

    def _disk_sockets(self) -> dict[int, tuple[str, Path]]:
        """Stream index -> (disk id, the relay's socket for its NBD client): after QEMU's
        migration streams, one per copied disk."""
        assert self.relay is not None
        base, first = self.relay.record.control.parent, self.ctx.options.streams
        return {first + i: (d.id, base / f"disk-{d.id}.sock")
                for i, d in enumerate(copied_disks(self.vm.spec))}  # fmt: skip

    async def _release_disk_keys(self) -> None:
        """The encrypted disks' keys go to the destination now, when its platform is attested
        (the session just opened), its claim accepted and both policies allowed the move, and
        wrapped so that only that session's peer can unwrap them; raises on any failure (the
        migration then rolls back before a byte of the guest left)."""
        spec = self.vm.spec
        if not encrypted_disks(spec):
            return
        if self._disk_key_wrap is None:
            raise RequestError("no attested session to hand the disk keys over in", Code.FAILED)
        wrapped = await self.svc.disk_keys.release(
            spec, self.core.peer, self.migration_id, self._disk_key_wrap,
            str(self.ctx.info.get("attestation_detail") or ""),
        )  # fmt: skip
        await self._call("incoming.disk_keys", {"keys": wrapped}, 120)

    async def _copy_disks(self) -> None:
        """Mirror every copied disk to the destination and wait until all are in sync (the
        memory migration starts only then); raises BlockCopyError."""
        if not copied_disks(self.vm.spec):
            return
        t0 = time.monotonic()
        sockets = {disk: path for disk, path in self._disk_sockets().values()}
        limit = self.ctx.options.max_bandwidth_mibps
        await start_mirrors(self.vm.qemu, self.vm.spec, sockets,
                            limit * 1024 * 1024 if limit else None)  # fmt: skip

        def progress(prog: list[DiskProgress]) -> None:
            done, total = sum(p.done for p in prog), sum(p.total for p in prog)
            self._emit({"event": "disk-progress", "transferred": done, "total": total,
                               "disks": {p.disk: [p.done, p.total] for p in prog}})  # fmt: skip

        prog = await wait_mirrors_ready(self.vm.qemu, self.vm.spec, progress)
        self.ctx.info["disks"] = {
            p.disk: {"bytes": p.total, "sync_ms": round((time.monotonic() - t0) * 1000, 1)}
            for p in prog
        }

    async def _commit_params(self) -> dict[str, Any]:
        """The commit carries the measurement of the stopped source guest, if its definition
        asks for one (taken once: a repeated commit sends the same digests). Raises
        MeasurementError (or whatever a gone QEMU raises), and the commit is then never sent:
        :func:`commit_not_prepared` judges it."""
        if copied_disks(self.vm.spec) and self.vm.qemu.alive():
            # the source is stopped for good: its ready mirrors end with complete targets (a
            # source QEMU gone after its memory was sent had its writes mirrored already)
            await finish_mirrors(self.vm.qemu)
        regions = self.vm.spec.measure
        if not regions:
            return {}
        held = self.ctx.info.get("runtime_measurement") or {}
        if "source" not in held:
            got = await measure(self.vm.qemu, regions)
            held = {"source": got.digests, "source_ms": got.elapsed_ms}
            self.ctx.info["runtime_measurement"] = held
            self._persist()
        return {"measurement": held["source"]}

    def _peer_failed(self, op: str, e: Exception) -> None:
        code = str(getattr(e, "code", "transport"))
        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        answered = code in PEER_ANSWERS and isinstance(e, ControlError)
        if op == "prepare":
            self.post(ev.PeerRefused(code, line) if answered else ev.PeerUnreachable(line))
        elif op == "commit":
            self.post(ev.CommitRefused(code, line) if answered else ev.CommitLost(line))
        elif op == "status":
            if answered and code == "not_found":
                self.post(ev.PeerStatus(None))
            else:
                self.post(ev.PeerUnreachable(line))

    def _prepare_params(self) -> dict[str, Any]:
        self._relay_spawn = asyncio.ensure_future(self.svc.spawn_relay("out"))
        return {
            "spec": self.vm.spec.model_dump(mode="json"),
            "options": self.ctx.options.model_dump(mode="json"),
            "user": self.ctx.user,
            "policy": self.svc.gov.vm_policy_json(self.core.vm),
            "audit_pub": self.svc.gov.audit_public_pem,
            "epoch": self.core.epoch,
            # a defined VM stays defined where it goes; a transient one stays transient
            "persistent": self.core.vm in self.svc.vms.definitions,
        }

    def _data_address(self, advertised: str) -> str:
        """Where the data connections go: the address the destination advertised, or its
        address inside the hosts' IPsec tunnel (``transport = ipsec``)."""
        if self.ctx.options.transport == "ipsec":
            tunnel = self.svc.cfg.peers[self.core.peer].tunnel_data
            if tunnel:
                return tunnel
        return advertised

    def _on_prepared(self, prep: dict[str, Any]) -> None:
        self._admission_key = admission_key_of(prep, self.core.peer)
        self.ctx.data_address = self._data_address(str(prep["data_address"]))
        self.ctx.decision_in = str(prep.get("decision", ""))
        self.ctx.peer_audit_pub = str(prep.get("audit_pub", ""))
        self.ctx.qemu_tls_address = prep.get("qemu_tls_address")
        self.ctx.resources = prep.get("resources")
        self.post(ev.Prepared(self.ctx.data_address, self.ctx.decision_in))

    async def _discard_spare_relay(self) -> None:
        """End a relay spawned for a prepare that never led to a data path (refused, failed)."""
        task, self._relay_spawn = self._relay_spawn, None
        if task is None:
            return
        with contextlib.suppress(Exception):
            record = await task
            await asyncio.to_thread(record.process.kill)

    async def _new_relay(self) -> RelayHandle:
        task, self._relay_spawn = self._relay_spawn, None
        record = await task if task is not None else await self.svc.spawn_relay("out")
        self.ctx.relay = record
        self._persist()  # the journal names every relay, so nothing is ever left behind
        handle = RelayHandle(record, on_event=self._on_relay_event)
        await asyncio.to_thread(handle.connect)
        return handle

    async def _open_data_path(self) -> None:
        opts = self.ctx.options
        t0 = time.monotonic()
        try:
            if opts.channel == "qemu-tls":
                if not self.ctx.qemu_tls_address:
                    raise RequestError(f"{self.core.peer} did not open a QEMU TLS port")
                session = await asyncio.to_thread(
                    open_outbound_session, self.svc.security, self.ctx.data_address,
                    self.core.peer, self.migration_id, 1, self._admission_key,
                )  # fmt: skip
                self._disk_key_wrap = session.disk_key_wrap()
                session.close()
            else:
                self.relay = await self._new_relay()
                sock = self.relay.record.control.parent / "qemu-out.sock"
                self.ctx.qemu_socket = str(sock)
                disks = self._disk_sockets()
                session = await asyncio.to_thread(
                    open_outbound_session, self.svc.security, self.ctx.data_address,
                    self.core.peer, self.migration_id, opts.streams + len(disks),
                    self._admission_key,
                )  # fmt: skip
                self._disk_key_wrap = session.disk_key_wrap()
                await asyncio.to_thread(hand_to_relay, session, self.relay, sock, self.migration_id,
                                        {i: p for i, (_d, p) in disks.items()})  # fmt: skip
        except Exception as e:  # noqa: BLE001 - every failure is a verdict on this peer
            await self._close_relay()
            self.post(ev.DataPathFailed(str(e).splitlines()[0] if str(e) else type(e).__name__))
            return
        ms = (time.monotonic() - t0) * 1000
        summary = session.peer_evidence_summary
        self.ctx.info.update(handshake_ms=round(ms, 2), attestation_detail=summary)
        self.post(ev.Attested(summary, ms))
        self.post(self._judge(summary))

    def _judge(self, summary: str) -> ev.ClaimJudged:
        ssl_obj = self.ctl.ssl_object if self.ctl is not None else None
        cert = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
        if not cert:
            return ev.ClaimJudged(False, False, "claim_unverifiable",
                                  "destination control session has no certificate")  # fmt: skip
        j = judge_claim(
            self.ctx.resources, cert, summary, self.vm.spec, self.migration_id,
            require_attested=self.svc.attesting,
            max_age_s=self.svc.cfg.capacity.max_claim_age_s,
        )  # fmt: skip
        self.svc.safe_audit(
            "guard.claim", vm=self.core.vm, migration_id=self.migration_id,
            user=self.ctx.user.get("name"),
            outcome="accepted" if j.accept else ("lie" if j.lie else "refused"),
            data={"host": self.core.peer, "rule": j.rule, "reason": j.reason, "claim": j.claim},
        )  # fmt: skip
        if j.accept:
            self.ctx.info["destination_claim"] = {"rule": j.rule, "claim": j.claim}
        return ev.ClaimJudged(j.accept, j.lie, j.rule, j.reason)

    async def _start_transfer(self) -> None:
        opts, qemu = self.ctx.options, self.vm.qemu
        try:
            await configure_source(qemu, opts)
            if opts.channel == "qemu-tls":
                await qemu_tls.enable(self.svc.creds, self.svc.host_key_pem, qemu, "client",
                                      peer_host=self.core.peer)  # fmt: skip
                uri = f"tcp:{self.ctx.qemu_tls_address}"
            else:
                uri = f"unix:{self.ctx.qemu_socket}"
            await self._release_disk_keys()
            await self._copy_disks()
            self.t_transfer = time.monotonic()
            self.ctx.info["cpu0"] = qemu.cpu_seconds()
            self.ctx.info["migrate_sent"] = True
            # journaled before QEMU is told, or not told: a restart must know it may have begun
            if not self._persist():
                raise JournalError("the journal cannot record that the memory is about to be "
                                   "sent; free space in the state directory and retry")  # fmt: skip
            self.post(ev.MemoryStreamStarting())
            await qemu.cmd("migrate", {"uri": uri})
        except Exception as e:  # noqa: BLE001
            self.post(ev.TransferStartFailed(str(e).splitlines()[0] or type(e).__name__))
            return
        self.transfer_running = True
        self.post(ev.TransferStarted())

    async def _cancel_transfer(self) -> None:
        qemu = self.vm.qemu
        if qemu.alive():
            with contextlib.suppress(Exception):
                await qemu.cmd("migrate_cancel", timeout=10)
            with contextlib.suppress(Exception):
                await finish_mirrors(qemu, force=True)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and qemu.alive():
                if await self._qemu_status() not in ACTIVE_QEMU:
                    break
                await asyncio.sleep(0.05)
        await self._close_relay()

    async def _resume(self) -> None:
        qemu = self.vm.qemu
        if not qemu.alive():
            self.post(ev.GuestResumed(False, "source QEMU is gone", gone=True))
            return
        state = await qemu.status()
        if copied_disks(self.vm.spec):
            with contextlib.suppress(Exception):
                await finish_mirrors(qemu, force=True)
        if state in ("paused", "postmigrate", "finish-migrate", "prelaunch"):
            with contextlib.suppress(Exception):
                await qemu.cmd("cont")
            state = await qemu.status()
        if self.ctx.options.channel == "qemu-tls":
            await qemu_tls.disable(qemu)  # the guest stays here: drop the key from QEMU
        self.post(ev.GuestResumed(state == "running", f"QEMU is {state}"))

    async def _close_relay(self, stop: bool = True) -> None:
        relay, self.relay = self.relay, None
        if relay is not None:
            self.ctx.info["relay_status"] = await asyncio.to_thread(relay.status)
            await asyncio.to_thread(relay.close, stop=stop)

    async def _recover(self, attempt: int) -> None:
        """One attempt to re-establish a broken post-copy stream over a new attested session."""
        qemu = self.vm.qemu
        try:
            if self.ctx.options.channel == "qemu-tls":
                raise RequestError("QEMU TLS streams cannot be recovered by trustmig")
            status = await self._qemu_status()
            live = self.relay is not None and self.relay.alive()
            if live and status in ("postcopy-active", "postcopy-recover", "completed"):
                self.post(ev.RecoveryDone())  # a stale failure signal
                return
            deadline = time.monotonic() + 20
            while status != "postcopy-paused":
                if time.monotonic() > deadline:
                    raise RequestError(f"source QEMU is {status}, expected postcopy-paused")
                await asyncio.sleep(0.05)
                status = await self._qemu_status()
            await self._close_relay()
            res = await self._call("incoming.recover", {}, 30)
            self.relay = await self._new_relay()
            sock = self.relay.record.control.parent / "qemu-out.sock"
            self.ctx.qemu_socket = str(sock)
            address = self._data_address(str(res.get("data_address") or self.ctx.data_address))
            session = await asyncio.to_thread(
                open_outbound_session, self.svc.security, address, self.core.peer,
                self.migration_id, self.ctx.options.recovery_streams,
                admission_key_of(res, self.core.peer),
            )  # fmt: skip
            await asyncio.to_thread(hand_to_relay, session, self.relay, sock, self.migration_id)
            # the recovered streams are post-copy ones
            await favour_latency(self.relay, self.ctx.options.latency_streams)
            await qemu.cmd("migrate", {"uri": f"unix:{sock}", "resume": True})
            deadline = time.monotonic() + 20
            while (st := await self._qemu_status()) not in (
                "postcopy-recover", "postcopy-active", "completed",
            ):  # fmt: skip
                if time.monotonic() > deadline:
                    raise RequestError(f"source QEMU stayed {st} after migrate resume")
                await asyncio.sleep(0.05)
            cause = self.last_failure or "post-copy stream paused"
            self.ctx.info.setdefault("stream_recoveries", []).append(cause)
            self._persist()
        except Exception as e:  # noqa: BLE001 - each attempt's failure is reported, then retried
            self.post(ev.RecoveryFailed(str(e).splitlines()[0] if str(e) else type(e).__name__))
            return
        self.post(ev.RecoveryDone())

    async def _conclude(self) -> None:
        """After the handover: stop the source copy, settle receipts, build the result."""
        qemu = self.vm.qemu
        prog = None
        if qemu.alive():
            with contextlib.suppress(Exception):
                prog = await query(qemu)
                if prog.status == "completed" and not prog.total_ms:
                    await asyncio.sleep(0.1)  # QEMU 7.2: the first 'completed' may carry zeros
                    prog = await query(qemu)
        if self.core.postcopy_switched:
            with contextlib.suppress(ControlError, RequestError, OSError):
                res = await self._call("incoming.commit", {}, 30)
                self.ctx.info["destination_pid"] = res.get("pid")
        await asyncio.sleep(0.05)  # let the console drain its last heartbeats
        t_start = float(self.ctx.info.get("t_start_wall") or 0)
        src_hbs = [(h.seq, h.host_ts) for h in qemu.console.heartbeats_since(t_start - 1)]
        cpu_src = qemu.cpu_seconds() - float(self.ctx.info.get("cpu0") or 0.0)
        await qemu.stop()
        relay_status = self.ctx.info.get("relay_status")
        if self.relay is not None:
            relay_status = await asyncio.to_thread(self.relay.status)
            await asyncio.to_thread(self.relay.close)
            self.relay = None
        # bookkeeping: each step may fail (a full disk) without changing what happened
        self._step("forget the VM", lambda: self.svc.vms.release(self.vm, "handed-over"))
        try:
            await self.svc.disk_keys.forget(self.vm.spec, self.migration_id, "handed over")
        except Exception as e:  # noqa: BLE001 - reported with the result, the facts stand
            self.warnings.append(f"could not forget the disk keys: {str(e).splitlines()[0]}")
        self._step("count the migration", lambda: self.svc.gov.record_migration(self.core.vm))
        receipt = await self._exchange_receipt(relay_status or {}, src_hbs)
        self._step("drop the VM policy", lambda: self.svc.gov.drop_vm_policy(self.core.vm))
        self.ctx.info["result"] = self._result(prog, src_hbs, cpu_src, relay_status or {}, receipt)
        self.svc.safe_audit(
            "migration.complete", vm=self.core.vm, migration_id=self.migration_id,
            user=self.ctx.user.get("name"), outcome="completed",
            data={k: self.ctx.info["result"].get(k) for k in
                  ("destination", "mode", "channel", "total_ms", "downtime_ms",
                   "bytes_transferred", "throughput_mbps", "handshake_ms")},
        )  # fmt: skip

    def _step(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported with the result, the facts stand
            log.error("migration %s: could not %s: %s", self.migration_id, what, e)
            self.warnings.append(f"could not {what}: {str(e).splitlines()[0]}")

    async def _exchange_receipt(
        self, relay_status: dict[str, Any], src_hbs: list[tuple[int, float]]
    ) -> dict[str, Any]:
        """Both hosts sign the same receipt; each keeps both signatures."""
        fields = {
            "migration_id": self.migration_id, "vm": self.core.vm,
            "user": self.ctx.user.get("name"), "source": self.svc.name,
            "destination": self.core.peer, "stream_digest": stream_digest(relay_status),
            "outcome": "completed", "ts": datetime.now(UTC).isoformat(timespec="seconds"),
        }  # fmt: skip
        try:
            own = self.svc.gov.sign_receipt(fields)
            # the last heartbeats let the destination measure the pause its guest felt
            felt = {"heartbeats": src_hbs[-8:], "channel": self.ctx.options.channel,
                    "mode": "postcopy" if self.core.postcopy_switched else "precopy"}  # fmt: skip
            params = {"fields": fields, "signature": own, "felt": felt}
            res = await self._call("incoming.receipt", params, 30)
            self.svc.gov.check_and_store_receipt(
                fields, own, self.core.peer, res["signature"], self.ctx.peer_audit_pub
            )
        except Exception as e:  # noqa: BLE001 - the VM moved; a missing receipt is reported
            self.svc.safe_audit("receipt", vm=self.core.vm, migration_id=self.migration_id,
                                outcome="missing", data={"error": str(e)})  # fmt: skip
            return {"migration_id": self.migration_id, "error": f"receipt not countersigned: {e}"}
        return {**fields, "source_signature": own, "destination_signature": res["signature"]}

    def _result(
        self,
        prog: Any,
        src_hbs: list[tuple[int, float]],
        cpu_src: float,
        relay: dict[str, Any],
        receipt: dict[str, Any],
    ) -> dict[str, Any]:
        info, opts = self.ctx.info, self.ctx.options
        streams = relay.get("streams") or []
        first = min((s["first_byte_at"] for s in streams if s.get("first_byte_at")), default=None)
        total_ms = getattr(prog, "total_ms", None)
        transferred = getattr(prog, "transferred", None)
        summary = str(info.get("attestation_detail", ""))
        return {
            "status": "completed",
            "migration_id": self.migration_id,
            "vm": self.core.vm,
            "source": self.svc.name,
            "destination": self.core.peer,
            "epoch": self.core.handover_epoch,
            "mode": "postcopy" if self.core.postcopy_switched else "precopy",
            "requested_mode": opts.mode,
            "channel": opts.channel,
            "streams": opts.streams,
            "total_ms": total_ms,
            "wall_ms": round((time.monotonic() - self.t_transfer) * 1000, 1)
            if self.t_transfer
            else None,
            "downtime_ms": getattr(prog, "downtime_ms", None),
            "setup_ms": getattr(prog, "setup_ms", None),
            "bytes_transferred": transferred,
            "bytes_on_channel": sum(int(s.get("bytes_out", 0)) for s in streams),
            "records_on_channel": sum(int(s.get("records_out", 0)) for s in streams),
            "ram_total": getattr(prog, "total", None),
            "rounds": getattr(prog, "rounds", None),
            "postcopy_requests": getattr(prog, "postcopy_requests", None),
            "stream_recoveries": info.get("stream_recoveries", []),
            "runtime_measurement": info.get("runtime_measurement"),
            "disks": info.get("disks"),
            "throughput_mbps": round(transferred / 1e6 / (total_ms / 1000), 1)
            if total_ms and transferred
            else None,
            "handshake_ms": info.get("handshake_ms"),
            "time_to_first_byte_ms": round((first - self.t_request) * 1000, 2)
            if first and first > self.t_request
            else None,
            "attestation": summary.split(" ")[0] if summary else None,
            "attestation_detail": summary,
            "attestation_pcr_digest": summary_field(summary, "pcr_digest"),
            "destination_claim": info.get("destination_claim"),
            "cpu_s_source": round(cpu_src, 3),
            "cpu_s_relay": relay.get("cpu_s"),
            "cpu_s_relay_data": relay.get("cpu_s_data"),
            "relay_records_out": _records_out(relay),
            "destination_pid": info.get("destination_pid"),
            "source_heartbeats": src_hbs,
            "user": self.ctx.user.get("name"),
            "decisions": {"migrate_out": self.ctx.decision_out, "migrate_in": self.ctx.decision_in},
            "receipt_id": receipt.get("migration_id"),
            "receipt": receipt,
            "handover_ms": self._handover_ms(),
            "warnings": self.warnings,
            "error": None,
        }

    def _handover_ms(self) -> dict[str, Any]:
        """The handover's steps in ms: on this host from QEMU's completion to the commit sent
        and answered, and the destination's own (from loaded or commit to running)."""
        return {
            "source_completed_to_commit_sent": span_ms(self.marks, "completed", "commit_sent"),
            "commit_round_trip": span_ms(self.marks, "commit_sent", "commit_answered"),
            "destination": self.ctx.info.get("destination_handover_ms"),
        }

    def _finish(self, a: A.Finish) -> None:
        if self.outcome.done():
            return
        if a.outcome == "completed":
            self.outcome.set_result(self.ctx.info.get("result") or {"status": "completed"})
            return
        code = {"refused": Code.REFUSED, "in-doubt": Code.IN_DOUBT}.get(a.outcome, Code.FAILED)
        line = a.error or f"migration {a.outcome}"
        extra = self.ctx.info.get("destination_error")
        if extra and extra not in line:
            line = f"{line}; destination: {extra}"
        self.outcome.set_exception(MigrationFailed(line, code))

    # ------------------------------------------------------------------ operators
    async def resolve(self, keep: str, user: str) -> dict[str, Any]:
        rid = self._rids = self._rids + 1
        fut: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self._resolve_waiters[rid] = fut
        self.post(ev.ResolveRequested(keep, user, rid))
        return await within(fut, 60)

    def describe(self) -> dict[str, Any]:
        return {
            "migration_id": self.migration_id,
            "role": "source",
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
            "history": [
                {"t": round(t - self.t_request, 3), "state": s} for t, s in self.core.history
            ],
            "progress": self.last_progress.get("progress"),
            "disk_progress": self.last_progress.get("disk-progress"),
        }

    # ------------------------------------------------------------------ restart
    async def attach_relay(self) -> bool:
        """After a restart: re-attach to the journaled relay; whether it still carries data."""
        if self.ctx.relay is None:
            return False
        handle = RelayHandle(self.ctx.relay, on_event=self._on_relay_event)
        if not handle.alive():
            self.ctx.info["relay_status"] = await asyncio.to_thread(handle.status)
            return False
        try:
            await asyncio.to_thread(handle.connect)
        except Exception:  # noqa: BLE001
            return False
        self.relay = handle
        st = await asyncio.to_thread(handle.status)
        self.ctx.info["relay_status"] = st
        return st.get("state") == "running"

    async def restart_status(self) -> str:
        """QEMU's migration status *of this migration* after a restart.

        ``query-migrate`` reports the last migration of the process, which may be an earlier
        one (the incoming migration that brought the guest here says ``completed``). Only a
        ``migrate`` this migration journaled as sent, whose stream QEMU opened on the relay,
        makes QEMU's status this migration's."""
        if not self.vm.qemu.alive():
            return "unknown"
        if not self.ctx.info.get("migrate_sent"):
            return "none"
        status = await self._qemu_status()
        if self.ctx.options.channel != "qemu-tls":
            streams = (self.ctx.info.get("relay_status") or {}).get("streams") or []
            if not streams:
                return "none"  # QEMU never connected to this migration's relay
        return status


def _failure_line(f: dict[str, Any]) -> str:
    rec = f" record {f['record']}" if f.get("record") is not None else ""
    return f"stream {f.get('stream')}{rec} ({f.get('direction')}): {f.get('reason')}"


def _records_out(relay_status: dict[str, Any]) -> int:
    """Records the relay sealed over all its streams (the benchmark's mean record size)."""
    return sum(int(st.get("records_out") or 0) for st in relay_status.get("streams") or [])


def stream_digest(relay_status: dict[str, Any]) -> str:
    """Commit to every stream's authenticated record chain (the channel's running tag digest)."""
    import hashlib

    h = hashlib.sha256()
    for s in sorted(relay_status.get("streams") or [], key=lambda s: int(s["index"])):
        h.update(int(s["index"]).to_bytes(2, "big"))
        h.update(bytes.fromhex(s.get("sealer_digest", "")))
        h.update(int(s.get("bytes_out", 0)).to_bytes(8, "big"))
    return h.hexdigest()


def restore_source(svc: HostServices, row: MigrationRow, vm: ManagedVM) -> SourceDriver:
    core = SourceCore.restore(row.core)
    return SourceDriver(svc, core, vm, SourceContext.from_json(row.context))


__all__ = [
    "MigrationFailed",
    "SourceContext",
    "SourceDriver",
    "restore_source",
    "source_plan",
    "stream_digest",
    "vm_state_for",
]
