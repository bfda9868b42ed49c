"""Migrate-in: the destination side.

The destination starts an *incoming* QEMU from the spec the source sent: paused (``-S``) for
pre-copy so that it cannot run before the source has seen the migration complete, and tied to the
agent's life (PDEATHSIG) so a destination agent that dies cannot leave a half-received guest.
It only resumes the guest when the source commits; any earlier failure (data channel
authentication failure, source gone, timeout) kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trustmig.agent import capacity, qemu_tls
from trustmig.channel.relay import StreamFailure, StreamPump
from trustmig.config import parse_hostport
from trustmig.hypervisor.migration import MigrationOptions, configure_destination, query
from trustmig.hypervisor.qemu import QemuVM
from trustmig.hypervisor.spec import VMSpec

if TYPE_CHECKING:
    from trustmig.agent.server import Agent

log = logging.getLogger(__name__)


class IncomingError(Exception):
    pass


@dataclass
class IncomingMigration:
    migration_id: str
    source: str
    spec: VMSpec
    options: MigrationOptions
    user: dict[str, Any]
    qemu: QemuVM
    socket_path: Path
    # prepared | receiving | running | aborted | postcopy-paused | recovering
    state: str = "prepared"
    error: str | None = None
    pumps: dict[int, StreamPump] = field(default_factory=dict)
    created: float = field(default_factory=time.monotonic)
    session_summary: dict[str, Any] = field(default_factory=dict)
    first_byte_at: float | None = None
    peer_audit_pub: str = ""
    policy_json: str | None = None
    decision: str = ""
    failure_event: asyncio.Event = field(default_factory=asyncio.Event)
    recoveries: int = 0

    def connect_qemu(self) -> socket.socket:
        """Open one migration connection to the incoming QEMU (called from data-path threads)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(self.socket_path))
        s.settimeout(None)
        return s


async def prepare(
    agent: Agent, params: dict[str, Any], source_host: str, *, peer_cert_der: bytes | None = None
) -> dict[str, Any]:
    mid = str(params["migration_id"])
    if mid in agent.incoming:
        raise IncomingError(f"migration {mid} is already prepared here")
    spec = VMSpec.model_validate(params["spec"])
    opts = MigrationOptions.model_validate(params["options"])
    user = dict(params.get("user") or {})
    policy_json = params.get("policy")
    decision = agent.gov.decide_in(
        user, policy_json, spec.name, source_host, opts.mode == "postcopy"
    )
    agent.audit_event(
        "policy.decision",
        vm=spec.name,
        migration_id=mid,
        user=user.get("name"),
        outcome="allow" if decision.allow else "deny",
        data={
            "direction": "migrate-in",
            "rule": decision.rule,
            "line": decision.line(),
            "source": source_host,
        },
    )
    if not decision.allow:
        raise IncomingError(decision.line())
    quarantined = agent.quarantine.is_quarantined(source_host)
    if quarantined is not None:
        raise IncomingError(f"source {source_host} is quarantined here ({quarantined})")
    await agent.admit("in", tenant=spec.tenant, vm=spec.name, migration_id=mid)
    if spec.name in agent.vms and agent.vms[spec.name].state not in ("migrated", "stopped"):
        raise IncomingError(f"a VM named {spec.name} already runs on {agent.cfg.name}")
    image = await agent.get_image()
    if spec.image_key and spec.image_key != image.key:
        raise IncomingError(
            f"guest image {spec.image_key[:12]} differs from this host's {image.key[:12]}: "
            "both hosts must build the same image (trustmig image build)"
        )
    from trustmig.agent.server import sock_dir_for

    run_dir = agent.run_dir / f"in-{mid[:8]}-{spec.name}"
    qemu = QemuVM(
        spec,
        image,
        run_dir,
        agent.accel,
        binary=agent.cfg.qemu.binary,
        incoming=True,
        start_paused=opts.mode == "precopy",
        die_with_parent=True,
        prealloc=opts.prealloc_destination,
        sock_dir=sock_dir_for(agent, "in"),
    )
    try:
        await qemu.start()
    except Exception:
        agent.release(mid)
        raise
    sock_path = qemu.sock_dir / "incoming.sock"
    qemu_tls_address = None
    try:
        await configure_destination(qemu, opts)
        if opts.channel == "qemu-tls":
            # QEMU listens itself, TLS only, and only for the source host's certificate
            await qemu_tls.enable(
                agent, qemu, "server", peer_host=source_host, peer_cert_der=peer_cert_der
            )
            listen_host = parse_hostport(agent.cfg.data.listen)[0]
            await qemu.cmd("migrate-incoming", {"uri": f"tcp:{listen_host}:0"})
            info = await qemu.cmd("query-migrate")
            port = int(info["socket-address"][0]["port"])
            qemu_tls_address = f"{parse_hostport(agent.data_advertise)[0]}:{port}"
        else:
            await qemu.cmd("migrate-incoming", {"uri": f"unix:{sock_path}"})
    except Exception:
        await qemu.kill()
        agent.release(mid)
        raise
    inc = IncomingMigration(
        migration_id=mid,
        source=source_host,
        spec=spec,
        options=opts,
        user=user,
        qemu=qemu,
        socket_path=sock_path,
        peer_audit_pub=str(params.get("audit_pub") or ""),
        policy_json=policy_json,
        decision=decision.line(),
    )
    # what this host has free before the arriving VM counts, signed last so that image and
    # QEMU start-up time does not age it; the source checks it against the capacity this host
    # attests to before sending any memory
    resources = capacity.signed_claim(
        capacity.current_claim(agent, mid), agent.channel_identity.private_key
    )
    agent.incoming[mid] = inc
    agent.audit_event(
        "migration.phase",
        vm=spec.name,
        migration_id=mid,
        outcome="prepared",
        data={"source": source_host, "mode": opts.mode, "streams": opts.streams},
    )
    return {
        "data_address": agent.data_advertise,
        "streams": opts.streams,
        "destination_pid": qemu.pid,
        "decision": decision.line(),
        "audit_pub": agent.gov.audit_public_pem,
        "resources": resources,
        "qemu_tls_address": qemu_tls_address,
    }


#: QEMU migration states in which the destination already runs the guest (post-copy): from
#: then on the incoming QEMU holds the only up-to-date CPU state and must never be killed for a
#: broken stream; the stream is recovered instead (``incoming.recover``).
POSTCOPY_STATES = ("postcopy-active", "postcopy-paused", "postcopy-recover")


async def _in_postcopy(inc: IncomingMigration) -> bool:
    """Whether the destination may already run the guest (post-copy switch-over happened).

    A post-copy destination whose stream broke can have its main loop blocked on a missing
    page, so QMP does not answer: for a post-copy migration, silence counts as "yes" (keeping
    a guest that could have been discarded is recoverable; killing the only copy is not).
    """
    if inc.options.mode != "postcopy" or not inc.qemu.alive():
        return False
    try:
        status = (await asyncio.wait_for(query(inc.qemu), 2.0)).status
    except Exception:  # noqa: BLE001
        return True
    return status in POSTCOPY_STATES


async def _on_failure(agent: Agent, inc: IncomingMigration, reason: str) -> None:
    if inc.state in ("running", "aborted", "postcopy-paused", "in-doubt"):
        return
    if await _in_postcopy(inc):
        inc.state = "postcopy-paused"
        inc.error = reason
        for p in inc.pumps.values():
            p.close()
        agent.audit_event(
            "migration.phase",
            vm=inc.spec.name,
            migration_id=inc.migration_id,
            outcome="postcopy-paused",
            data={"reason": reason},
        )
        log.warning(
            "post-copy stream of %s broke (%s): guest kept, waiting for the source to "
            "recover the stream",
            inc.spec.name,
            reason,
        )
        return
    inc.error = reason
    inc.failure_event.set()
    await _kill(agent, inc, reason)  # post-copy was just ruled out: no second QMP query


def on_stream_failure(
    agent: Agent, inc: IncomingMigration, failure: StreamFailure, generation: int | None = None
) -> None:
    """Called from a pump thread: the first failure of a stream kills the incoming guest, unless
    post-copy has started (then the guest is kept and the stream can be recovered)."""

    def _fail() -> None:
        if generation is not None and generation != inc.recoveries:
            return  # a pump of a session that was already replaced by a recovery
        if inc.state not in ("running", "aborted", "postcopy-paused", "in-doubt"):
            agent.spawn(_on_failure(agent, inc, f"data channel {failure.line()}"))

    agent.loop.call_soon_threadsafe(_fail)


async def recover(agent: Agent, inc: IncomingMigration, timeout: float = 15.0) -> dict[str, Any]:
    """Re-open a broken post-copy stream: QEMU listens again (``migrate-recover``) and the data
    listener accepts one new, freshly authenticated and attested session for this migration."""
    if inc.state == "recovering":
        # an earlier attempt already armed QEMU; its listener still waits for the stream
        return {"data_address": agent.data_advertise, "attempt": inc.recoveries}
    if inc.state == "receiving" and await _in_postcopy(inc):
        # the source saw the stream break before this side did: believe it (it is an
        # authenticated peer) and drop the dead stream so QEMU pauses too
        await _on_failure(agent, inc, "source reported the post-copy stream broken")
    if inc.state != "postcopy-paused":
        raise IncomingError(
            f"migration {inc.migration_id} is {inc.state}; only a post-copy migration whose "
            "stream broke can be recovered"
        )
    for p in inc.pumps.values():
        p.close()
    inc.pumps = {}
    inc.recoveries += 1
    path = inc.qemu.sock_dir / f"recover-{inc.recoveries}.sock"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    # QEMU needs a moment to notice the closed stream and pause; migrate-recover runs
    # out-of-band because the main loop may be blocked on a missing page
    deadline = time.monotonic() + timeout
    while True:
        try:
            await inc.qemu.cmd("migrate-recover", {"uri": f"unix:{path}"}, timeout=5, oob=True)
            break
        except Exception as e:  # noqa: BLE001 - retried until the deadline, then reported
            if time.monotonic() > deadline:
                raise IncomingError(f"destination QEMU refused migrate-recover: {e}") from None
            await asyncio.sleep(0.1)
    inc.socket_path = path
    inc.error = None
    inc.failure_event.clear()
    inc.state = "recovering"
    agent.audit_event(
        "migration.phase",
        vm=inc.spec.name,
        migration_id=inc.migration_id,
        outcome="postcopy-recover",
        data={"attempt": inc.recoveries},
    )
    return {"data_address": agent.data_advertise, "attempt": inc.recoveries}


async def abort(agent: Agent, inc: IncomingMigration, reason: str) -> None:
    if inc.state in ("aborted", "running", "in-doubt"):
        return
    if await _in_postcopy(inc):
        # the guest may already run only here: never kill it automatically (an operator can
        # still stop it with 'trustmig vm stop' once it is known which copy is current)
        inc.state = "in-doubt"
        inc.error = inc.error or reason
        agent.audit_event(
            "migration.phase",
            vm=inc.spec.name,
            migration_id=inc.migration_id,
            outcome="in-doubt",
            data={"reason": reason},
        )
        log.error("kept post-copy guest %s although %s", inc.spec.name, reason)
        return
    await _kill(agent, inc, reason)


async def _kill(agent: Agent, inc: IncomingMigration, reason: str) -> None:
    """Discard the incoming guest (the caller made sure it cannot be the only running copy)."""
    if inc.state in ("aborted", "running", "in-doubt"):
        return
    prev = inc.state
    inc.state = "aborted"
    inc.error = inc.error or reason
    for p in inc.pumps.values():
        p.close()
    await inc.qemu.kill()
    agent.release(inc.migration_id)
    agent.audit_event(
        "migration.abort",
        vm=inc.spec.name,
        migration_id=inc.migration_id,
        outcome="aborted",
        data={"reason": inc.error, "phase": prev},
    )
    log.warning("migration %s of %s aborted: %s", inc.migration_id, inc.spec.name, inc.error)


async def commit(agent: Agent, inc: IncomingMigration, timeout: float = 60.0) -> dict[str, Any]:
    """The source saw its migration complete: check ours completed too, then run the guest."""
    if inc.state == "aborted":
        raise IncomingError(f"incoming migration was aborted: {inc.error}")
    deadline = time.monotonic() + timeout
    status = "unknown"
    while time.monotonic() < deadline:
        if inc.error:
            raise IncomingError(inc.error)
        if not inc.qemu.alive():
            raise IncomingError(f"destination QEMU exited: {inc.qemu.stderr_tail()}")
        prog = await query(inc.qemu)
        status = prog.status
        if status == "completed":
            break
        if status == "failed":
            raise IncomingError(f"destination QEMU failed to load the stream: {prog.error}")
        await asyncio.sleep(0.005)
    else:
        raise IncomingError(f"destination did not finish loading within {timeout:.0f}s ({status})")
    run_state = await inc.qemu.status()
    if run_state != "running":
        await inc.qemu.cmd("cont")
        run_state = await inc.qemu.status()
    if run_state != "running":
        raise IncomingError(f"destination guest did not start (state {run_state})")
    inc.state = "running"
    if inc.options.channel == "qemu-tls":
        await qemu_tls.disable(inc.qemu)
    agent.adopt_incoming(inc)
    agent.release(inc.migration_id)
    agent.gov.record_migration(inc.spec.name)
    if inc.policy_json:
        agent.gov.set_vm_policy(inc.spec.name, inc.policy_json)
    agent.audit_event(
        "migration.phase",
        vm=inc.spec.name,
        migration_id=inc.migration_id,
        outcome="running",
        data={"source": inc.source},
    )
    return {"state": run_state, "pid": inc.qemu.pid}


async def watch_control(agent: Agent, inc: IncomingMigration, closed: asyncio.Event) -> None:
    """The source's control connection is the lease: losing it before commit aborts."""
    with contextlib.suppress(asyncio.CancelledError):
        await closed.wait()
        if inc.state in ("running", "aborted"):
            return
        if await _in_postcopy(inc):
            # the guest already runs here: killing it would lose the VM; keep it and say so
            agent.audit_event(
                "migration.phase",
                vm=inc.spec.name,
                migration_id=inc.migration_id,
                outcome="in-doubt",
                data={"reason": "source control connection lost during post-copy"},
            )
            log.error(
                "source of %s vanished during post-copy: guest kept, state in doubt", inc.spec.name
            )
            return
        await abort(agent, inc, "source control connection lost before commit")
