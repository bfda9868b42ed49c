"""The host agent: one long-running asyncio process per host.

It owns the host's VMs, serves the control API (TLS 1.3, mutual certificates) to users and peer
agents, runs the data listener of the secure channel, and carries out migrate-out and
migrate-in. Each request is authorised against the caller's *verified* certificate identity:
host certificates may only use the agent-to-agent operations, user certificates only the user
ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trustmig import __version__
from trustmig.agent import migrate_in
from trustmig.agent.attestation import AgentAttestation
from trustmig.agent.client import ControlClient, ControlError
from trustmig.agent.datapath import DataListener
from trustmig.agent.governance import Governance, load_or_create_ed25519, new_ed25519_pem
from trustmig.agent.host_key import load_host_key, transient_key_file
from trustmig.agent.migrate_in import IncomingMigration
from trustmig.agent.migrate_out import MigrationFailed, OutgoingMigration, migrate_out
from trustmig.agent.protocol import FrameDecoder, ProtocolError, encode
from trustmig.agent.vms import ManagedVM
from trustmig.channel.identity import LocalIdentity
from trustmig.config import HostConfig, parse_hostport
from trustmig.guard import Admission, AdmissionLimits, Guard, GuardError, GuardRules
from trustmig.guard.aio import GuardedServer, guarded_serve, stop_guarded
from trustmig.guard.claims import Quarantine
from trustmig.guard.ratelog import RateLimitedLog, Throttle
from trustmig.hypervisor.accel import choose_accel
from trustmig.hypervisor.image import GuestImage, build_image
from trustmig.hypervisor.migration import MigrationOptions
from trustmig.hypervisor.qemu import QemuVM
from trustmig.hypervisor.spec import VMSpec
from trustmig.pki.authority import Credentials
from trustmig.pki.errors import PkiError
from trustmig.pki.identity import PeerIdentity
from trustmig.pki.tls import client_context, peer_identity, server_context
from trustmig.pki.trust import TrustBundle
from trustmig.policy import PolicyError

log = logging.getLogger("trustmig.agent")
rlog = RateLimitedLog(log)

Handler = Callable[["Request"], Awaitable[dict[str, Any]]]
HOST_OPS = {
    "incoming.prepare",
    "incoming.commit",
    "incoming.abort",
    "incoming.status",
    "incoming.receipt",
    "incoming.recover",
    "ping",
}
USER_OPS = {
    "ping", "host.status", "vm.start", "vm.list", "vm.stop", "vm.check", "vm.heartbeats",
    "vm.resume", "migrate", "migration.list", "policy.set", "policy.show", "audit.show",
    "audit.export", "audit.verify", "guard.show", "guard.quarantine", "guard.clear",
}  # fmt: skip
ROLE_GATES = {
    "audit.show": ("auditor", "security-admin"),
    "audit.export": ("auditor", "security-admin"),
    "audit.verify": ("auditor", "security-admin"),
    "vm.start": ("owner", "operator", "security-admin"),
    "vm.stop": ("owner", "operator", "security-admin"),
    "vm.resume": ("owner", "operator", "security-admin"),
    "policy.set": ("owner", "security-admin"),
    "guard.clear": ("security-admin",),
}


class RequestError(Exception):
    """A request was refused; the message is the one line the caller sees."""


class Request:
    def __init__(
        self,
        agent: Agent,
        conn: Connection,
        rid: int,
        op: str,
        params: dict[str, Any],
    ) -> None:
        self.agent = agent
        self.conn = conn
        self.id = rid
        self.op = op
        self.params = params

    @property
    def peer(self) -> PeerIdentity:
        return self.conn.peer

    async def emit(self, event: dict[str, Any]) -> None:
        await self.conn.send({"id": self.id, **event})

    def param(self, key: str, kind: type = str) -> Any:
        if key not in self.params:
            raise RequestError(f"{self.op}: missing parameter {key!r}")
        val = self.params[key]
        if kind is not Any and not isinstance(val, kind):
            raise RequestError(f"{self.op}: parameter {key!r} must be {kind.__name__}")
        return val


class Connection:
    def __init__(self, writer: asyncio.StreamWriter, peer: PeerIdentity) -> None:
        self.writer = writer
        self.peer = peer
        self.closed = asyncio.Event()
        self._lock = asyncio.Lock()

    async def send(self, msg: dict[str, Any]) -> None:
        if self.closed.is_set():
            return
        async with self._lock:
            try:
                self.writer.write(encode(msg))
                await self.writer.drain()
            except (ConnectionError, OSError):
                self.closed.set()


class Agent:
    def __init__(self, cfg: HostConfig, config_path: Path | None = None) -> None:
        self.cfg = cfg
        self.state_dir = cfg.state_dir
        self.run_dir = self.state_dir / "run"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.sock_root = short_socket_root(self.state_dir)
        self.creds = Credentials(
            cert_path=cfg.pki.cert, key_path=cfg.pki.key, ca_path=cfg.pki.ca, crl_path=cfg.pki.crl
        )
        self.bundle = TrustBundle.load(cfg.pki.ca, cfg.pki.crl if cfg.pki.crl.exists() else None)
        if self.creds.name() != cfg.name:
            raise RuntimeError(
                f"host certificate names {self.creds.name()!r} but the config says {cfg.name!r}: "
                f"enroll this host with 'trustmig host enroll {cfg.name}'"
            )
        self.attestation: AgentAttestation | None = None
        if cfg.attestation.enabled:
            ca_pub = x509.load_pem_x509_certificate(cfg.pki.ca.read_bytes()).public_key()
            self.attestation = AgentAttestation.start(
                cfg,
                ca_public_key=ca_pub,  # type: ignore[arg-type]
                config_path=config_path or (cfg.state_dir / "host.toml"),
            )
            self.make_evidence = self.attestation.make_evidence
            self.verify_evidence = self.attestation.verify_evidence
            # the identity key lives sealed to the measured launch, like the audit key
            self.host_key_pem = load_host_key(self.creds, self.attestation)
        else:
            self.host_key_pem = self.creds.key_path.read_bytes()
        host_key = serialization.load_pem_private_key(self.host_key_pem, None)
        assert isinstance(host_key, ec.EllipticCurvePrivateKey)
        self.channel_identity = LocalIdentity(
            name=cfg.name, cert_der=self.creds.cert_der(), private_key=host_key
        )
        with transient_key_file(self.creds, self.host_key_pem, self.sock_root) as tmp_creds:
            self.server_ctx = server_context(tmp_creds, self.bundle)
            self.client_ctx = client_context(tmp_creds, self.bundle)
        if self.attestation is not None:
            # the audit signing key is only usable in the measured software state
            audit_key = serialization.load_pem_private_key(
                self.attestation.unseal_or_create("audit-signing", new_ed25519_pem), None
            )
            assert isinstance(audit_key, Ed25519PrivateKey)
        else:
            log.warning("attestation disabled in the host config: peers cannot verify this host")
            audit_key = load_or_create_ed25519(self.state_dir / "keys" / "audit.key")
        self.gov = Governance(cfg, self.bundle, audit_key)
        guard_cfg = {
            "idle_timeout_s": 3600.0,
            "stall_timeout_s": 3600.0,
            "reserved_peers": _peer_ips(cfg),
            **cfg.guard,
        }
        self.guard = Guard(GuardRules(**guard_cfg))
        self.admission = Admission(AdmissionLimits(**cfg.admission))
        self.admission_wait_s = float(cfg.admission.get("queue_timeout_s", 300))
        self.quarantine = Quarantine(self.state_dir / "quarantine.json")
        self.accel = choose_accel(cfg.qemu.accel)
        if self.accel.warning:
            log.warning("%s", self.accel.warning)
        self.vms: dict[str, ManagedVM] = {}
        self.incoming: dict[str, IncomingMigration] = {}
        self.outgoing: dict[str, OutgoingMigration] = {}
        self.refused_data: list[dict[str, Any]] = []
        self._refusal_audit = Throttle(burst=10, interval_s=60.0)
        self._image: GuestImage | None = None
        self._image_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._background: set[asyncio.Future[Any]] = set()
        self._server: GuardedServer | None = None
        self.data: DataListener | None = None
        self.control_address = ""
        self.data_advertise = ""
        self.loop: asyncio.AbstractEventLoop = asyncio.get_event_loop()
        self.handlers: dict[str, Handler] = {
            "ping": self.op_ping,
            "host.status": self.op_host_status,
            "vm.start": self.op_vm_start,
            "vm.list": self.op_vm_list,
            "vm.stop": self.op_vm_stop,
            "vm.resume": self.op_vm_resume,
            "vm.check": self.op_vm_check,
            "vm.heartbeats": self.op_vm_heartbeats,
            "migrate": self.op_migrate,
            "migration.list": self.op_migration_list,
            "incoming.prepare": self.op_incoming_prepare,
            "incoming.commit": self.op_incoming_commit,
            "incoming.abort": self.op_incoming_abort,
            "incoming.status": self.op_incoming_status,
            "incoming.receipt": self.op_incoming_receipt,
            "incoming.recover": self.op_incoming_recover,
            "policy.set": self.op_policy_set,
            "policy.show": self.op_policy_show,
            "audit.show": self.op_audit_show,
            "audit.export": self.op_audit_export,
            "audit.verify": self.op_audit_verify,
            "guard.show": self.op_guard_show,
            "guard.quarantine": self.op_guard_quarantine,
            "guard.clear": self.op_guard_clear,
        }

    # ------------------------------------------------------------------ hooks for other parts
    def audit_event(self, kind: str, **fields: Any) -> None:
        """Record an audit event in the host's signed, hash-chained trail."""
        log.info("audit %s %s", kind, json.dumps(fields, default=str))
        self.gov.event(kind, **fields)

    def guard_connect(self, listener: str, ip: str, port: int) -> int | None:
        """Screen a raw connection before any crypto; returns a tracking id or None."""
        verdict, cid = self.guard.on_connect(listener, ip, port)
        if not verdict.accept:
            rlog.log(
                logging.INFO,
                f"refused:{listener}:{verdict.rule}",
                "guard refused %s:%s on %s: %s",
                ip,
                port,
                listener,
                verdict.reason,
            )
        return cid if verdict.accept else None

    def guard_progress(self, conn_id: int, step: str) -> None:
        with contextlib.suppress(GuardError):
            self.guard.on_handshake_progress(conn_id, step)

    def guard_authenticated(self, conn_id: int, identity: str) -> None:
        with contextlib.suppress(GuardError):
            v = self.guard.on_authenticated(conn_id, identity)
            if not v.accept:
                raise RequestError(v.reason)

    def guard_close(self, conn_id: int) -> None:
        with contextlib.suppress(GuardError):
            self.guard.on_close(conn_id)

    async def admit(self, direction: str, *, tenant: str, vm: str, migration_id: str) -> None:
        """Admission control: caps per host, per tenant, per VM and hour; fair queue."""
        res = self.admission.request(
            direction,  # type: ignore[arg-type]
            tenant=tenant,
            vm=vm,
            migration_id=migration_id,
        )
        if res.status == "refused":
            self.audit_event(
                "admission",
                vm=vm,
                migration_id=migration_id,
                outcome="refused",
                data={"direction": direction, "reason": res.reason},
            )
            raise RequestError(f"migration {res.reason}")
        if res.status == "queued":
            self.audit_event(
                "admission",
                vm=vm,
                migration_id=migration_id,
                outcome="queued",
                data={"direction": direction, "reason": res.reason},
            )
            assert res.ticket is not None
            res = await self.admission.wait(res.ticket, self.admission_wait_s)
            if res.status != "admitted":
                raise RequestError(f"migration {res.reason}")

    def release(self, migration_id: str) -> None:
        with contextlib.suppress(Exception):
            self.admission.release(migration_id)

    def note_refused_data_connection(self, peer: tuple[str, int], reason: str) -> None:
        self.refused_data.append(
            {"peer": f"{peer[0]}:{peer[1]}", "reason": reason, "ts": time.time()}
        )
        del self.refused_data[:-100]
        # audited, but throttled: garbage thrown at the data port must not grow the audit trail
        # without bound (the guard counts every refusal)
        suppressed = self._refusal_audit.admit(f"channel.refused:{peer[0]}")
        if suppressed is not None:
            self.audit_event(
                "channel.refused",
                data={"peer": f"{peer[0]}:{peer[1]}", "reason": reason, "suppressed": suppressed},
            )

    def verify_host_cert(self, cert_der: bytes, expected_name: str) -> object:
        self.bundle.refresh()
        return self.bundle.verify_host(cert_der, expected_name)

    make_evidence: Callable[[bytes], bytes] | None = None
    verify_evidence: Callable[[str, bytes, bytes], str] | None = None

    # ------------------------------------------------------------------ helpers
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a background task, keeping a reference so it is not garbage-collected."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def start_thread(self, fn: Callable[..., Any], *args: Any) -> threading.Thread:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        return t

    async def get_image(self) -> GuestImage:
        async with self._image_lock:
            if self._image is None:
                self._image = await asyncio.to_thread(build_image, self.cfg.image_cache)
            return self._image

    def find_incoming(self, migration_id: bytes) -> IncomingMigration | None:
        for inc in self.incoming.values():
            if inc.migration_id.replace("-", "") == migration_id.hex():
                return inc
        return None

    def adopt_incoming(self, inc: IncomingMigration) -> None:
        self.vms[inc.spec.name] = ManagedVM(
            spec=inc.spec, qemu=inc.qemu, state="running", arrived_by=inc.migration_id
        )

    def forget_vm(self, name: str) -> None:
        self.vms.pop(name, None)

    async def connect_peer(self, host: str) -> ControlClient:
        peer = self.cfg.peers.get(host)
        if peer is None:
            raise RequestError(f"unknown host {host!r}: add it under [peers] in the host config")
        ctx = self.client_ctx
        client = await ControlClient.connect(peer.control, ctx)
        sslobj = client.ssl_object
        try:
            if sslobj is None:
                raise PkiError("no TLS session")
            self.bundle.refresh()
            peer_identity(sslobj, self.bundle, kind="host", expect_name=host)
        except PkiError as e:
            await client.close()
            raise RequestError(f"peer {host} refused: {e}") from None
        return client

    # ------------------------------------------------------------------ lifecycle
    async def run(self, ready_file: Path | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        host, port = parse_hostport(self.cfg.control.listen)
        ctx = self.server_ctx
        self._server = await guarded_serve(
            self.guard,
            "control",
            host,
            port,
            self._serve_guarded,
            ssl_ctx=ctx,
            handshake_timeout=self.guard.rules.handshake_deadline_s,
        )
        sock = self._server.sockets[0].getsockname()
        self.control_address = f"{sock[0]}:{sock[1]}"
        dhost, dport = parse_hostport(self.cfg.data.listen)
        self.data = DataListener(self, dhost, dport)
        self.data.start()
        self.data_advertise = (
            self.cfg.data.advertise or f"{self.data.address[0]}:{self.data.address[1]}"
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._stop.set)
        info = {
            "host": self.cfg.name,
            "pid": os.getpid(),
            "control": self.control_address,
            "data": f"{self.data.address[0]}:{self.data.address[1]}",
            "data_advertise": self.data_advertise,
            "accel": self.accel.accel,
            "accel_warning": self.accel.warning,
        }
        self.audit_event("agent.start", data=info)
        if ready_file:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(info))
            tmp.replace(ready_file)
        log.info(
            "agent %s ready: control %s, data %s", self.cfg.name, self.control_address, info["data"]
        )
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        log.info("agent %s stopping", self.cfg.name)
        if self._server:
            await stop_guarded(self._server)
        if self.data:
            self.data.close()
        for inc in list(self.incoming.values()):
            if inc.state not in ("running",):
                await migrate_in.abort(self, inc, "agent shutting down")
        for m in list(self.vms.values()):
            await m.qemu.stop()
        self.audit_event("agent.stop")
        self.gov.close()
        if self.attestation:
            self.attestation.close()

    def request_stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ control API
    async def _serve_guarded(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_id: int
    ) -> None:
        try:
            await self._serve(reader, writer, conn_id)
        finally:
            self.guard_close(conn_id)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_id: int = -1
    ) -> None:
        sslobj = writer.get_extra_info("ssl_object")
        try:
            self.bundle.refresh()
            peer = peer_identity(sslobj, self.bundle)
        except PkiError as e:
            rlog.log(logging.WARNING, "control-refused", "control connection refused: %s", e)
            self.audit_event("control.refused", data={"reason": str(e)})
            writer.close()
            return
        if conn_id >= 0:
            self.guard_authenticated(conn_id, peer.name)
        conn = Connection(writer, peer)
        dec = FrameDecoder()
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for msg in dec.feed(data):
                    t = asyncio.create_task(self._dispatch(conn, msg))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
        except (ProtocolError, ConnectionError, OSError) as e:
            log.info("control connection from %s closed: %s", peer.name, e)
        finally:
            conn.closed.set()
            writer.close()

    async def _dispatch(self, conn: Connection, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        op = str(msg.get("op", ""))
        params = msg.get("params") or {}
        try:
            if not isinstance(rid, int) or not isinstance(params, dict):
                raise RequestError("malformed request: 'id' must be an integer, 'params' an object")
            allowed = HOST_OPS if conn.peer.kind == "host" else USER_OPS
            if op not in self.handlers:
                raise RequestError(f"unknown operation {op!r}")
            if op not in allowed:
                raise RequestError(f"{op} is not allowed for a {conn.peer.kind} certificate")
            gate = ROLE_GATES.get(op)
            if gate and conn.peer.kind == "user" and not set(gate) & set(conn.peer.roles):
                self.audit_event(
                    "access.denied",
                    user=conn.peer.name,
                    outcome="denied",
                    data={"op": op, "roles": list(conn.peer.roles)},
                )
                raise RequestError(
                    f"{op} denied: {conn.peer.name} has roles [{', '.join(conn.peer.roles)}], "
                    f"needs one of [{', '.join(gate)}]"
                )
            result = await self.handlers[op](Request(self, conn, rid, op, params))
            await conn.send({"id": rid, "ok": True, "result": result})
        except (
            RequestError,
            MigrationFailed,
            ControlError,
            ValueError,
            PkiError,
            PolicyError,
        ) as e:
            await conn.send({"id": rid, "ok": False, "error": str(e).splitlines()[0]})
        except Exception as e:  # noqa: BLE001 - report, never crash the agent
            log.exception("%s failed", op)
            await conn.send(
                {"id": rid, "ok": False, "error": f"{op} failed: {type(e).__name__}: {e}"}
            )

    # ------------------------------------------------------------------ user operations
    async def op_ping(self, req: Request) -> dict[str, Any]:
        return {
            "host": self.cfg.name,
            "version": __version__,
            "peer": req.peer.name,
            "peer_kind": req.peer.kind,
            "roles": list(req.peer.roles),
        }

    async def op_host_status(self, req: Request) -> dict[str, Any]:
        return {
            "host": self.cfg.name,
            "version": __version__,
            "accel": self.accel.accel,
            "accel_warning": self.accel.warning,
            "control": self.control_address,
            "data_advertise": self.data_advertise,
            "vms": [await m.describe() for m in self.vms.values()],
            "labels": self.cfg.labels,
            "attestation": await asyncio.to_thread(self.attestation.status)
            if self.attestation
            else None,
            "refused_data_connections": self.refused_data[-10:],
            "incoming": [
                {
                    "migration_id": i.migration_id,
                    "vm": i.spec.name,
                    "source": i.source,
                    "state": i.state,
                    "error": i.error,
                    "pid": i.qemu.pid if i.qemu.alive() else None,
                }
                for i in self.incoming.values()
            ],
        }

    def _vm(self, name: str) -> ManagedVM:
        m = self.vms.get(name)
        if m is None:
            raise RequestError(f"no VM named {name!r} on {self.cfg.name} (see 'trustmig vm list')")
        return m

    async def op_vm_start(self, req: Request) -> dict[str, Any]:
        spec = VMSpec.model_validate(req.param("spec", dict))
        spec.check_fits()
        if spec.name in self.vms:
            raise RequestError(f"a VM named {spec.name} already exists on {self.cfg.name}")
        if spec.owner is None:
            spec = spec.model_copy(update={"owner": req.peer.name})
        if req.params.get("policy"):
            pol = self.gov.set_vm_policy(spec.name, str(req.params["policy"]))
            spec = spec.model_copy(update={"tenant": pol.tenant, "owner": pol.owner})
        image = await self.get_image()
        spec = spec.model_copy(update={"image_key": image.key})
        qemu = QemuVM(
            spec,
            image,
            self.run_dir / f"vm-{spec.name}",
            self.accel,
            binary=self.cfg.qemu.binary,
            sock_dir=sock_dir_for(self, "vm"),
        )
        managed = ManagedVM(spec=spec, qemu=qemu)
        self.vms[spec.name] = managed
        try:
            await qemu.start()
            await req.emit({"event": "phase", "phase": "booting", "pid": qemu.pid})
            timeout = float(req.params.get("boot_timeout", 180))
            await qemu.console.wait_for("READY", timeout)
        except BaseException as e:
            self.vms.pop(spec.name, None)
            await qemu.kill()
            if isinstance(e, TimeoutError):
                raise RequestError(f"VM {spec.name} did not become ready in time") from None
            raise
        managed.state = "running"
        self.audit_event("vm.start", vm=spec.name, user=req.peer.name, outcome="running")
        return await managed.describe()

    async def op_vm_list(self, req: Request) -> dict[str, Any]:
        return {"host": self.cfg.name, "vms": [await m.describe() for m in self.vms.values()]}

    async def op_vm_stop(self, req: Request) -> dict[str, Any]:
        m = self._vm(req.param("name"))
        await m.qemu.stop()
        m.state = "stopped"
        self.vms.pop(m.spec.name, None)
        self.audit_event("vm.stop", vm=m.spec.name, user=req.peer.name, outcome="stopped")
        return {"name": m.spec.name, "state": "stopped"}

    async def op_vm_resume(self, req: Request) -> dict[str, Any]:
        m = self._vm(req.param("name"))
        await m.qemu.cmd("cont")
        m.state = "running"
        self.audit_event("vm.resume", vm=m.spec.name, user=req.peer.name, outcome="running")
        return await m.describe()

    async def op_vm_check(self, req: Request) -> dict[str, Any]:
        m = self._vm(req.param("name"))
        timeout = float(req.params.get("timeout") or 120)
        try:
            res = await m.qemu.console.check(min(max(timeout, 1.0), 600.0))
        except TimeoutError:
            raise RequestError(
                f"VM {m.spec.name} did not answer its memory check within {timeout:.0f}s"
            ) from None
        return {"name": m.spec.name, **res.__dict__}

    async def op_vm_heartbeats(self, req: Request) -> dict[str, Any]:
        m = self._vm(req.param("name"))
        since = float(req.params.get("since", 0))
        hbs = m.qemu.console.heartbeats_since(since)
        return {"name": m.spec.name, "heartbeats": [(h.seq, h.host_ts) for h in hbs]}

    async def op_migrate(self, req: Request) -> dict[str, Any]:
        name = req.param("vm")
        dest = req.param("to")
        if dest == self.cfg.name:
            raise RequestError(f"{name} already runs on {dest}")
        opts = MigrationOptions.model_validate(req.params.get("options") or {})
        m = self._vm(name)
        user = {
            "name": req.peer.name,
            "roles": list(req.peer.roles),
            "tenant": req.peer.tenant,
            "fingerprint": req.peer.fingerprint,
        }
        self.audit_event(
            "migrate.request",
            vm=name,
            user=req.peer.name,
            data={"destination": dest, "options": opts.model_dump(mode="json")},
        )
        return await migrate_out(self, m, dest, opts, user, req.emit, principal=req.peer)

    async def op_migration_list(self, req: Request) -> dict[str, Any]:
        return {
            "outgoing": [
                {
                    "migration_id": m.migration_id,
                    "vm": m.vm,
                    "destination": m.destination,
                    "phase": m.phase,
                    "user": m.user,
                    "error": m.failure.line() if m.failure else None,
                }
                for m in self.outgoing.values()
            ]
        }

    async def op_policy_set(self, req: Request) -> dict[str, Any]:
        vm = req.param("vm")
        pol = self.gov.set_vm_policy(vm, req.param("policy"))
        self.audit_event(
            "policy.set",
            vm=vm,
            user=req.peer.name,
            outcome="set",
            data={"signed_by": pol.signed_by},
        )
        return {"vm": vm, "signed_by": pol.signed_by, "policy": pol.model_dump(mode="json")}

    async def op_policy_show(self, req: Request) -> dict[str, Any]:
        vm = req.param("vm")
        sj = self.gov.vm_policy_json(vm)
        if sj is None:
            return {"vm": vm, "policy": None, "note": "no policy: every migration is denied"}
        _, pol = self.gov.verify_policy(sj)
        return {"vm": vm, "signed_by": pol.signed_by, "policy": pol.model_dump(mode="json")}

    async def op_guard_show(self, req: Request) -> dict[str, Any]:
        return {
            "host": self.cfg.name,
            "guard": self.guard.snapshot(),
            "admission": self.admission.snapshot(),
            "quarantine": self.quarantine.snapshot(),
        }

    async def op_guard_quarantine(self, req: Request) -> dict[str, Any]:
        return {
            "host": self.cfg.name,
            "quarantined": self.quarantine.snapshot(),
            "cleared": self.quarantine.cleared(),
        }

    async def op_guard_clear(self, req: Request) -> dict[str, Any]:
        host = req.param("host")
        try:
            self.quarantine.clear(host, by_user=req.peer.name)
        except GuardError as e:
            raise RequestError(str(e)) from None
        self.audit_event(
            "guard.quarantine", user=req.peer.name, outcome="cleared", data={"host": host}
        )
        return {"host": self.cfg.name, "cleared": host, "by": req.peer.name}

    async def op_audit_show(self, req: Request) -> dict[str, Any]:
        evs = self.gov.audit.events(
            vm=req.params.get("vm"),
            migration_id=req.params.get("migration_id"),
            limit=int(req.params.get("limit", 200)),
        )
        return {"host": self.cfg.name, "events": [e.to_json() for e in evs]}

    async def op_audit_export(self, req: Request) -> dict[str, Any]:
        evs = self.gov.audit.events()
        return {"host": self.cfg.name, "events": [e.to_json() for e in evs]}

    async def op_audit_verify(self, req: Request) -> dict[str, Any]:
        self.gov.audit.flush()
        rep = self.gov.audit.verify(self.gov.audit_key.public_key())
        return {"host": self.cfg.name, **rep.__dict__}

    # ------------------------------------------------------------------ host operations
    async def op_incoming_prepare(self, req: Request) -> dict[str, Any]:
        try:
            sslobj = req.conn.writer.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            res = await migrate_in.prepare(self, req.params, req.peer.name, peer_cert_der=der)
        except migrate_in.IncomingError as e:
            raise RequestError(str(e)) from None
        inc = self.incoming[str(req.params["migration_id"])]
        self.spawn(migrate_in.watch_control(self, inc, req.conn.closed))
        return res

    def _incoming(self, req: Request) -> IncomingMigration:
        mid = req.param("migration_id")
        inc = self.incoming.get(mid)
        if inc is None or inc.source != req.peer.name:
            raise RequestError(f"no incoming migration {mid} from {req.peer.name}")
        return inc

    async def op_incoming_commit(self, req: Request) -> dict[str, Any]:
        inc = self._incoming(req)
        try:
            return await migrate_in.commit(self, inc)
        except migrate_in.IncomingError as e:
            await migrate_in.abort(self, inc, str(e))
            raise RequestError(f"commit failed: {e}") from None

    async def op_incoming_abort(self, req: Request) -> dict[str, Any]:
        inc = self._incoming(req)
        await migrate_in.abort(self, inc, str(req.params.get("reason") or "source aborted"))
        return {"state": inc.state, "error": inc.error}

    async def op_incoming_receipt(self, req: Request) -> dict[str, Any]:
        inc = self._incoming(req)
        fields = dict(req.param("fields", dict))
        if (
            fields.get("migration_id") != inc.migration_id
            or fields.get("destination") != self.cfg.name
        ):
            raise RequestError("receipt does not describe this migration")
        own = self.gov.sign_receipt(fields)
        self.gov.check_and_store_receipt(
            fields, own, inc.source, req.param("signature"), inc.peer_audit_pub
        )
        return {"signature": own}

    async def op_incoming_recover(self, req: Request) -> dict[str, Any]:
        inc = self._incoming(req)
        try:
            return await migrate_in.recover(self, inc)
        except migrate_in.IncomingError as e:
            raise RequestError(f"recover failed: {e}") from None

    async def op_incoming_status(self, req: Request) -> dict[str, Any]:
        inc = self._incoming(req)
        return {"state": inc.state, "error": inc.error, "session": inc.session_summary}


def _peer_ips(cfg: HostConfig) -> list[str]:
    """IP addresses of the configured peers (literal control addresses; names are skipped)."""
    import ipaddress

    ips: list[str] = []
    for peer in cfg.peers.values():
        host = parse_hostport(peer.control)[0]
        with contextlib.suppress(ValueError):
            ips.append(str(ipaddress.ip_address(host)))
    return sorted(set(ips))


def short_socket_root(state_dir: Path) -> Path:
    """A short private directory for unix sockets (paths must stay under 108 bytes)."""
    import hashlib
    import tempfile

    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    tag = hashlib.sha256(str(state_dir).encode()).hexdigest()[:10]
    root = base / f"trustmig-{tag}"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return root


def sock_dir_for(agent: Agent, label: str) -> Path:
    import uuid as _uuid

    return agent.sock_root / f"{label[:2]}-{_uuid.uuid4().hex[:8]}"


def run_agent(
    cfg: HostConfig, ready_file: Path | None = None, config_path: Path | None = None
) -> None:
    async def _main() -> None:
        agent = Agent(cfg, config_path)
        await agent.run(ready_file)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())
