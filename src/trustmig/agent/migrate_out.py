"""Migrate-out: the source side, and the owner of the VM until the destination runs it.

Order of events (pre-copy):
 1. decisions and reservations (policy, admission) — nothing touches QEMU yet;
 2. ``incoming.prepare`` on the destination over mutually authenticated TLS;
 3. secure data channel: handshake (identities, attestation evidence) on stream 0, joins for the
    multifd streams — *before* QEMU produces a single byte;
 4. ``migrate`` to a unix socket the agent listens on; each QEMU connection is paired with one
    channel stream and pumped;
 5. progress is watched (events + polling); stall, timeout, channel failure or loss of the
    destination cancel the migration and resume the guest;
 6. on ``completed`` the destination is asked to commit (it resumes its paused guest); only its
    "running" answer lets the source quit its own QEMU.
If the destination's answer to the commit never arrives, the source keeps its guest paused and
reports the ambiguity instead of risking two running copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trustmig.agent import qemu_tls
from trustmig.agent.claim_check import judge_claim, summary_field
from trustmig.agent.client import ControlClient, ControlError
from trustmig.agent.datapath import OutboundSession, open_outbound_session
from trustmig.agent.governance import stream_digest
from trustmig.channel.errors import ChannelError
from trustmig.channel.relay import StreamFailure, StreamPump
from trustmig.hypervisor.migration import (
    MigrationOptions,
    MigrationProgress,
    configure_source,
    query,
)

if TYPE_CHECKING:
    from trustmig.agent.server import Agent
    from trustmig.agent.vms import ManagedVM

log = logging.getLogger(__name__)
Emit = Callable[[dict[str, Any]], Awaitable[None]]


class MigrationFailed(Exception):
    pass


@dataclass
class OutgoingMigration:
    migration_id: str
    vm: str
    destination: str
    options: MigrationOptions
    user: str
    started: float = field(default_factory=time.time)
    phase: str = "requested"
    failure: StreamFailure | None = None
    failure_event: asyncio.Event = field(default_factory=asyncio.Event)
    pumps: list[StreamPump] = field(default_factory=list)
    postcopy_started: bool = False
    result: dict[str, Any] = field(default_factory=dict)
    recoveries: int = 0
    recovered_from: list[str] = field(default_factory=list)


def _accept_qemu_streams(
    listener: socket.socket,
    session: OutboundSession,
    mig: OutgoingMigration,
    on_failure: Callable[[StreamFailure], None],
    stop: Callable[[], bool],
) -> None:
    """Thread: pair QEMU's connections, in arrival order, with the channel's streams."""
    listener.settimeout(0.2)
    idx = 0
    while idx < session.n_streams and not stop():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        conn.settimeout(None)
        pump = session.pump(idx, conn, on_failure)
        mig.pumps.append(pump)
        pump.start()
        idx += 1


@dataclass
class _DataPath:
    """One channel session and the unix socket QEMU migrates into; torn down as a unit."""

    session: OutboundSession
    listener: socket.socket
    sock_path: Path
    thread: Any = None
    stopped: bool = False

    async def close(self, mig: OutgoingMigration) -> None:
        self.stopped = True
        for p in mig.pumps:
            if not p.done:
                await asyncio.to_thread(p.join, 5)
            if not p.done:
                p.close()
        self.session.close()
        self.listener.close()
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join, 2)
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()


async def _open_data_path(
    agent: Agent,
    mig: OutgoingMigration,
    data_addr: str,
    sock_path: Path,
    on_failure: Callable[[StreamFailure], None],
) -> _DataPath:
    """Handshake (identities + attestation) and join every stream, then listen for QEMU."""
    session = await asyncio.to_thread(
        open_outbound_session, agent, data_addr, mig.destination, mig.migration_id,
        mig.options.streams,
    )  # fmt: skip
    try:
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(sock_path))
        listener.listen(mig.options.streams + 1)
    except BaseException:
        session.close()
        raise
    dp = _DataPath(session, listener, sock_path)
    dp.thread = agent.start_thread(
        _accept_qemu_streams, listener, session, mig, on_failure, lambda: dp.stopped
    )
    return dp


#: How many times a broken post-copy stream is re-established before giving up.
MAX_POSTCOPY_RECOVERIES = 5


async def migrate_out(
    agent: Agent,
    managed: ManagedVM,
    destination: str,
    opts: MigrationOptions,
    user: dict[str, Any],
    emit: Emit,
    *,
    principal: Any,
) -> dict[str, Any]:
    vm = managed.qemu
    name = managed.spec.name
    mid = str(uuid.uuid4())
    mig = OutgoingMigration(mid, name, destination, opts, user.get("name", "?"))
    agent.outgoing[mid] = mig
    t_request = time.monotonic()
    peer = agent.cfg.peers.get(destination)
    if peer is None:
        raise MigrationFailed(
            f"unknown destination host {destination!r}: add it under [peers] in the host config"
        )
    if managed.state != "running":
        raise MigrationFailed(f"VM {name} is {managed.state}, not running")
    qstate = await vm.status()
    if qstate != "running":
        raise MigrationFailed(f"VM {name}: QEMU state is {qstate}, not running")

    # 1. migrate-out decision, before any connection to the destination
    decision = agent.gov.decide_out(principal, name, destination, opts.mode == "postcopy")
    agent.audit_event(
        "policy.decision",
        vm=name,
        migration_id=mid,
        user=mig.user,
        outcome="allow" if decision.allow else "deny",
        data={
            "direction": "migrate-out",
            "rule": decision.rule,
            "line": decision.line(),
            "destination": destination,
        },
    )
    if not decision.allow:
        raise MigrationFailed(decision.line())
    quarantined = agent.quarantine.is_quarantined(destination)
    if quarantined is not None:
        agent.audit_event(
            "guard.quarantine",
            vm=name,
            migration_id=mid,
            user=mig.user,
            outcome="refused",
            data={"host": destination, "reason": quarantined},
        )
        raise MigrationFailed(
            f"destination {destination} is quarantined ({quarantined}); a security-admin must "
            f"clear it first: trustmig guard clear {destination}"
        )
    await agent.admit("out", tenant=managed.spec.tenant, vm=name, migration_id=mid)
    ctl: ControlClient | None = None
    dp: _DataPath | None = None
    sock_path = vm.sock_dir / f"out-{mid[:8]}.sock"
    committed = False
    in_doubt = False
    hb_start = time.time()
    managed.state = "migrating-out"
    agent.audit_event(
        "migration.phase",
        vm=name,
        migration_id=mid,
        user=mig.user,
        outcome="start",
        data={"destination": destination, "mode": opts.mode},
    )

    def on_failure(f: StreamFailure) -> None:
        def _set() -> None:
            if mig.failure is None:
                mig.failure = f
            mig.failure_event.set()

        agent.loop.call_soon_threadsafe(_set)

    try:
        await emit({"event": "phase", "phase": "prepare", "migration_id": mid})
        ctl = await agent.connect_peer(destination)
        prep = await ctl.call(
            "incoming.prepare",
            {
                "migration_id": mid,
                "spec": managed.spec.model_dump(mode="json"),
                "options": opts.model_dump(mode="json"),
                "user": user,
                "policy": agent.gov.vm_policy_json(name),
                "audit_pub": agent.gov.audit_public_pem,
            },
            timeout=120,
        )
        in_decision = str(prep.get("decision", ""))
        peer_audit_pub = str(prep.get("audit_pub", ""))
        data_addr = str(prep["data_address"])
        mig.phase = "handshake"
        await emit({"event": "phase", "phase": "handshake", "data_address": data_addr})
        t_hs = time.monotonic()
        qemu_tls_addr = prep.get("qemu_tls_address")
        if opts.channel == "qemu-tls":
            if not qemu_tls_addr:
                raise MigrationFailed(f"{destination} did not open a QEMU TLS port for qemu-tls")
            # identities and attestation over trustmig's handshake; QEMU's TLS carries the data
            session = await asyncio.to_thread(
                open_outbound_session, agent, data_addr, destination, mid, 1
            )
            session.close()
        else:
            dp = await _open_data_path(agent, mig, data_addr, sock_path, on_failure)
            session = dp.session
        handshake_ms = (time.monotonic() - t_hs) * 1000
        agent.audit_event(
            "attest.result",
            vm=name,
            migration_id=mid,
            outcome=session.peer_evidence_summary,
            data={"peer": destination, "handshake_ms": round(handshake_ms, 2)},
        )
        resources = _judge_resources(
            agent, ctl, destination, prep, session.peer_evidence_summary, managed, mid, mig.user
        )

        # 4. QEMU -> unix socket -> pumps
        await configure_source(vm, opts)
        if opts.channel == "qemu-tls":
            await qemu_tls.enable(agent, vm, "client", peer_host=destination)
        mig.phase = "transfer"
        t0 = time.monotonic()
        cpu0 = vm.cpu_seconds()
        uri = f"tcp:{qemu_tls_addr}" if opts.channel == "qemu-tls" else f"unix:{sock_path}"
        await vm.cmd("migrate", {"uri": uri})
        await emit({"event": "phase", "phase": "transfer"})

        async def recover_postcopy() -> None:
            nonlocal dp
            assert ctl is not None
            if dp is None:
                raise MigrationFailed(
                    f"{_reason(Exception(), mig)}; QEMU TLS streams cannot be recovered by trustmig"
                )
            dp = await _recover_postcopy(agent, mig, vm, ctl, dp, data_addr, on_failure, emit)

        prog = await _watch(agent, mig, vm, ctl, opts, emit, t0, recover_postcopy)
        wall_ms = (time.monotonic() - t0) * 1000
        cpu_src = vm.cpu_seconds() - cpu0
        if prog.status != "completed":
            raise MigrationFailed(prog.error or f"migration ended in state {prog.status}")
        if not prog.total_ms:
            await asyncio.sleep(0.2)  # QEMU 7.2: the first 'completed' may carry zeros
            prog = await query(vm)
        # 6. commit
        mig.phase = "commit"
        await emit({"event": "phase", "phase": "commit"})
        try:
            res = await ctl.call("incoming.commit", {"migration_id": mid}, timeout=90)
        except ControlError as e:
            # only the destination's own answer is a refusal (its guest does not run); a lost
            # connection or a timeout says nothing about whether it runs
            if str(e).startswith(("commit failed:", "no incoming migration")):
                raise MigrationFailed(f"destination refused to commit: {e}") from None
            managed.state = "in-doubt"
            in_doubt = True
            raise MigrationFailed(
                f"destination did not confirm its guest runs ({e}); the source guest stays "
                "paused to avoid two running copies: check the destination, then "
                f"'trustmig vm resume {name}' or 'trustmig vm stop {name}'"
            ) from None
        committed = True
        dest_pid = res.get("pid")
        first_byte = min(
            (p.stats.first_byte_at for p in mig.pumps if p.stats.first_byte_at), default=None
        )
        bytes_on_wire = sum(p.stats.bytes_out for p in mig.pumps)
        # let the source console drain its last lines before QEMU goes away
        await asyncio.sleep(0.05)
        src_hbs = [(h.seq, h.host_ts) for h in vm.console.heartbeats_since(hb_start - 1)]
        await vm.stop()
        managed.state = "migrated"
        agent.forget_vm(name)
        agent.gov.record_migration(name)
        receipt = await _exchange_receipt(agent, ctl, mig, stream_digest(mig.pumps), peer_audit_pub)
        agent.gov.drop_vm_policy(name)
        result = {
            "status": "completed",
            "migration_id": mid,
            "vm": name,
            "source": agent.cfg.name,
            "destination": destination,
            "mode": "postcopy" if mig.postcopy_started else "precopy",
            "requested_mode": opts.mode,
            "channel": opts.channel,
            "streams": opts.streams,
            "total_ms": prog.total_ms,
            "wall_ms": round(wall_ms, 1),
            "downtime_ms": prog.downtime_ms,
            "setup_ms": prog.setup_ms,
            "bytes_transferred": prog.transferred,
            "bytes_on_channel": bytes_on_wire,
            "records_on_channel": sum(p.stats.records_out for p in mig.pumps),
            "ram_total": prog.total,
            "rounds": prog.rounds,
            "postcopy_requests": prog.postcopy_requests,
            "stream_recoveries": mig.recovered_from,
            "throughput_mbps": round(prog.transferred / 1e6 / (prog.total_ms / 1000), 1)
            if prog.total_ms
            else None,
            "handshake_ms": round(handshake_ms, 2),
            "time_to_first_byte_ms": round((first_byte - t_request) * 1000, 2)
            if first_byte
            else None,
            "attestation": session.peer_evidence_summary.split(" ")[0],
            "attestation_detail": session.peer_evidence_summary,
            "attestation_pcr_digest": _pcr_digest(session.peer_evidence_summary),
            "destination_claim": resources,
            "cpu_s_source": round(cpu_src, 3),
            "destination_pid": dest_pid,
            "source_heartbeats": src_hbs,
            "user": mig.user,
            "decisions": {"migrate_out": decision.line(), "migrate_in": in_decision},
            "receipt_id": receipt.get("migration_id"),
            "receipt": receipt,
            "error": None,
        }
        mig.result = result
        agent.audit_event(
            "migration.complete",
            vm=name,
            migration_id=mid,
            user=mig.user,
            outcome="completed",
            data={
                k: result[k]
                for k in ("destination", "mode", "total_ms", "downtime_ms", "bytes_transferred")
            },
        )
        return result
    except BaseException as e:
        reason = _reason(e, mig)
        if not committed and not in_doubt:
            await _recover_source(agent, managed, mig)
            if opts.channel == "qemu-tls" and vm.alive():
                await qemu_tls.disable(vm)  # the guest stays here: drop the key from QEMU
            # after the post-copy switch the destination runs the guest: never kill it from here
            if ctl is not None and not ctl.closed.is_set() and not mig.postcopy_started:
                with contextlib.suppress(Exception):
                    st = await ctl.call(
                        "incoming.abort", {"migration_id": mid, "reason": reason}, timeout=10
                    )
                    # the destination's view helps when the channel failed; after a refusal
                    # decided here it would only describe the consequences of hanging up
                    if mig.failure is not None and st.get("error") and st["error"] not in reason:
                        reason = f"{reason}; destination: {st['error']}"
        agent.audit_event(
            "migration.abort",
            vm=name,
            migration_id=mid,
            user=mig.user,
            outcome="failed",
            data={"reason": reason, "phase": mig.phase},
        )
        if isinstance(e, asyncio.CancelledError):
            raise
        raise MigrationFailed(reason) from None
    finally:
        agent.release(mid)
        if dp is not None:
            await dp.close(mig)
        if ctl is not None:
            await ctl.close()


async def _exchange_receipt(
    agent: Agent, ctl: ControlClient, mig: OutgoingMigration, digest: str, peer_pub: str
) -> dict[str, Any]:
    """Both hosts sign the same receipt; each keeps both signatures."""
    fields = {
        "migration_id": mig.migration_id, "vm": mig.vm, "user": mig.user,
        "source": agent.cfg.name, "destination": mig.destination,
        "stream_digest": digest, "outcome": "completed",
        "ts": datetime.now(UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    own = agent.gov.sign_receipt(fields)
    try:
        res = await ctl.call(
            "incoming.receipt",
            {"migration_id": mig.migration_id, "fields": fields, "signature": own},
        )
        agent.gov.check_and_store_receipt(fields, own, mig.destination, res["signature"], peer_pub)
    except Exception as e:  # noqa: BLE001 - the VM moved; a missing receipt is reported
        agent.audit_event(
            "receipt",
            vm=mig.vm,
            migration_id=mig.migration_id,
            outcome="missing",
            data={"error": str(e)},
        )
        return {"migration_id": mig.migration_id, "error": f"receipt not countersigned: {e}"}
    return {**fields, "source_signature": own, "destination_signature": res["signature"]}


def _pcr_digest(summary: str) -> str | None:
    return summary_field(summary, "pcr_digest")


def _judge_resources(
    agent: Agent,
    ctl: ControlClient,
    dest: str,
    prep: dict[str, Any],
    evidence_summary: str,
    managed: ManagedVM,
    mid: str,
    user: str,
) -> dict[str, Any]:
    """Refuse a destination whose signed resource claim is implausible; quarantine liars."""
    sslobj = ctl.ssl_object
    cert = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    if not cert:
        raise MigrationFailed("destination control session has no certificate to check its claim")
    j = judge_claim(agent, prep.get("resources"), cert, evidence_summary, managed.spec, mid)
    name = managed.spec.name
    agent.audit_event(
        "guard.claim",
        vm=name,
        migration_id=mid,
        user=user,
        outcome="accepted" if j.accept else ("lie" if j.lie else "refused"),
        data={"host": dest, "rule": j.rule, "reason": j.reason, "claim": j.claim},
    )
    if j.accept:
        return {"rule": j.rule, "claim": j.claim}
    if j.lie:
        agent.quarantine.add(dest, f"{j.rule}: {j.reason}")
        agent.audit_event(
            "guard.quarantine",
            vm=name,
            migration_id=mid,
            user=user,
            outcome="quarantined",
            data={"host": dest, "rule": j.rule, "reason": j.reason},
        )
        raise MigrationFailed(
            f"destination {dest} refused and quarantined: {j.reason} ({j.rule}); no memory was "
            f"sent; a security-admin can clear it with 'trustmig guard clear {dest}'"
        )
    raise MigrationFailed(f"destination {dest} refused: {j.reason} ({j.rule})")


def _reason(e: BaseException, mig: OutgoingMigration) -> str:
    if mig.failure is not None:
        return f"data channel {mig.failure.line()}"
    msg = str(e) or type(e).__name__
    return msg.splitlines()[0]


async def _recover_source(agent: Agent, managed: ManagedVM, mig: OutgoingMigration) -> None:
    """Cancel QEMU's migration and make sure the guest runs again on the source."""
    vm = managed.qemu
    if not vm.alive():
        managed.state = "failed"
        return
    try:
        status = (await query(vm)).status
    except Exception:  # noqa: BLE001 - unknown: decide by the flag alone
        status = "unknown"
    if mig.postcopy_started or status.startswith("postcopy"):
        # After the switch the destination runs the guest and the source holds the pages it
        # has not sent yet: cancelling would lose the VM, resuming would run a stale copy. Both
        # sides stay paused; the migration can be recovered once the network is back.
        managed.state = "in-doubt"
        agent.audit_event(
            "migration.phase",
            vm=mig.vm,
            migration_id=mig.migration_id,
            user=mig.user,
            outcome="in-doubt",
            data={"reason": "post-copy stream lost; both sides kept paused"},
        )
        return
    with contextlib.suppress(Exception):
        await vm.cmd("migrate_cancel", timeout=10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            prog = await query(vm)
        except Exception:
            break
        if prog.status not in ("active", "cancelling", "setup", "device", "pre-switchover"):
            break
        await asyncio.sleep(0.05)
    state = await vm.status()
    if state in ("paused", "postmigrate", "finish-migrate"):
        with contextlib.suppress(Exception):
            await vm.cmd("cont")
        state = await vm.status()
    managed.state = "running" if state == "running" else "failed"


async def _watch(
    agent: Agent,
    mig: OutgoingMigration,
    vm: Any,
    ctl: ControlClient,
    opts: MigrationOptions,
    emit: Emit,
    t0: float,
    recover: Callable[[], Awaitable[None]] | None = None,
) -> MigrationProgress:
    last_bytes, last_change = -1, time.monotonic()
    last_emit = 0.0
    prev_remaining: list[int] = []
    while True:
        if mig.failure_event.is_set():
            if not (mig.postcopy_started and recover is not None):
                raise MigrationFailed(_reason(Exception(), mig))
            await recover()
            last_bytes, last_change = -1, time.monotonic()
            continue
        if ctl.closed.is_set():
            raise MigrationFailed(f"destination {mig.destination} control connection lost")
        if not vm.alive():
            raise MigrationFailed("source QEMU exited during migration")
        prog = await query(vm)
        now = time.monotonic()
        if prog.status in ("completed", "failed", "cancelled"):
            if prog.status != "completed" and mig.failure is not None:
                raise MigrationFailed(_reason(Exception(), mig))
            return prog
        if prog.status == "postcopy-paused" and not mig.failure_event.is_set():
            # QEMU noticed the broken stream before the pumps did
            mig.failure = mig.failure or StreamFailure(
                0, None, "source→destination", "post-copy stream paused"
            )
            mig.failure_event.set()
            continue
        if prog.transferred != last_bytes:
            last_bytes, last_change = prog.transferred, now
        elif now - last_change > opts.stall_timeout_s:
            raise MigrationFailed(
                f"migration stalled: no progress for {opts.stall_timeout_s:.0f}s at "
                f"{prog.transferred} bytes"
            )
        if now - t0 > opts.timeout_s:
            raise MigrationFailed(f"migration timed out after {opts.timeout_s:.0f}s")
        if opts.mode == "postcopy" and not mig.postcopy_started and prog.status == "active":
            prev_remaining.append(prog.remaining)
            not_converging = (
                opts.postcopy_if_not_converging
                and prog.rounds >= 2
                and len(prev_remaining) > 20
                and prog.remaining >= min(prev_remaining[-20:])
            )
            if prog.rounds >= opts.postcopy_after_rounds or not_converging:
                await vm.cmd("migrate-start-postcopy")
                mig.postcopy_started = True
                await emit({"event": "phase", "phase": "postcopy", "after_rounds": prog.rounds})
        if now - last_emit > 0.2:
            last_emit = now
            await emit(
                {"event": "progress", **prog.to_json(), "elapsed_ms": round((now - t0) * 1000)}
            )
        await asyncio.sleep(0.01 if prog.remaining < 64 * 1024 * 1024 else 0.05)


async def _wait_status(vm: Any, wanted: tuple[str, ...], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = "unknown"
    while time.monotonic() < deadline:
        status = (await query(vm)).status
        if status in wanted:
            return status
        await asyncio.sleep(0.05)
    raise MigrationFailed(f"source QEMU is {status}, expected {' or '.join(wanted)}")


async def _recover_postcopy(
    agent: Agent,
    mig: OutgoingMigration,
    vm: Any,
    ctl: ControlClient,
    dp: _DataPath,
    data_addr: str,
    on_failure: Callable[[StreamFailure], None],
    emit: Emit,
) -> _DataPath:
    """Re-establish a broken post-copy stream over a fresh, re-attested channel session.

    After the switch-over the guest runs on the destination while the source still holds the
    pages it has not sent: cancelling is impossible and killing either side loses the VM. Both
    QEMUs pause the migration (``postcopy-paused``); the destination listens again
    (``migrate-recover``), a new session is authenticated and attested like the first one, and
    the source resumes (``migrate resume=true``). After ``MAX_POSTCOPY_RECOVERIES`` failed
    attempts both sides stay paused and the migration is reported in doubt: never two copies.
    """
    cause = _reason(Exception(), mig)
    last_error = cause
    for attempt in range(1, MAX_POSTCOPY_RECOVERIES + 1):
        mig.recoveries += 1
        agent.audit_event(
            "migration.phase",
            vm=mig.vm,
            migration_id=mig.migration_id,
            user=mig.user,
            outcome="postcopy-recover",
            data={"reason": last_error, "attempt": attempt},
        )
        await emit(
            {
                "event": "phase",
                "phase": "postcopy-recover",
                "attempt": attempt,
                "reason": last_error,
            }
        )
        try:
            status = (await query(vm)).status
            if status in ("completed", "postcopy-active", "postcopy-recover"):
                # the stream is (again) alive: a stale failure signal, nothing to recover
                mig.failure = None
                mig.failure_event.clear()
                return dp
            await _wait_status(vm, ("postcopy-paused",), 20)
            await dp.close(mig)
            res = await ctl.call("incoming.recover", {"migration_id": mig.migration_id}, timeout=30)
            mig.failure = None
            mig.failure_event.clear()
            sock = dp.sock_path.with_name(f"{dp.sock_path.stem}-r{mig.recoveries}.sock")
            dp = await _open_data_path(
                agent, mig, str(res.get("data_address") or data_addr), sock, on_failure
            )
            await vm.cmd("migrate", {"uri": f"unix:{sock}", "resume": True})
            # QEMU leaves postcopy-paused asynchronously; do not mistake the old state for a
            # new failure
            await _wait_status(vm, ("postcopy-recover", "postcopy-active", "completed"), 20)
            mig.recovered_from.append(cause)
            return dp
        except (MigrationFailed, ControlError, OSError, ChannelError) as e:
            last_error = str(e).splitlines()[0] if str(e) else type(e).__name__
            await asyncio.sleep(min(2.0 * attempt, 5.0))
    await dp.close(mig)  # the last attempt's session, if it got that far
    raise MigrationFailed(
        f"post-copy stream broke ({cause}) and could not be recovered ({last_error}); the "
        f"guest is kept paused on {mig.destination} and the pages it lacks on {agent.cfg.name} "
        "(in doubt): neither copy is killed, do not start the VM elsewhere"
    )
